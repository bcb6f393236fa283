//! The durable queue (`raceguard::queue::durable`) against real Redis
//! servers: a worker killed mid-job, a crash and restart with AOF, the
//! capacity bound, idempotency keys, ownership of acknowledgements,
//! dead-lettering, hostile input, blocking reads, and a Cluster.
//!
//! No sleeps as synchronisation: a worker signals through a channel that it
//! holds its job before it is aborted, reclaims use a minimum idle time of
//! zero, and the blocking-read test waits on the server's own
//! `blocked_clients` count (`wait_until`). No timing assertions.
#![cfg(all(feature = "redis", feature = "test-util"))]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use raceguard::keys::{Key, ScopeId};
use raceguard::queue::durable::{
    AckOutcome, DurableQueue, DurableQueueConfig, JobStatus, MAX_IDEMPOTENCY_KEY_LEN, RunOptions,
    Submitted,
};
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::{RedisServer, wait_until};
use raceguard::{Error, ErrorKind};

const NONE: Duration = Duration::ZERO;

fn redis_config() -> RedisConfig {
    RedisConfig::default()
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
}

async fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::connect(server.url(), redis_config())
        .await
        .unwrap()
}

fn job_key(queue: &str, idem: &str) -> String {
    Key::builder("rq")
        .unwrap()
        .owner(&ScopeId::new(queue).unwrap())
        .part("job")
        .part(idem)
        .build()
        .unwrap()
        .into_string()
}

/// Runs `f` until it succeeds, retrying only retryable errors (a connection
/// that saw the server die fails once, then reconnects). Only used for
/// idempotent reads.
async fn retrying<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = raceguard::Result<T>>,
{
    let mut last = None;
    for _ in 0..50 {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.is_retryable() => last = Some(e),
            Err(e) => panic!("non-retryable error: {e}"),
        }
    }
    panic!("still failing after 50 attempts: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_is_reclaimed_and_completed_once() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue = DurableQueue::new(
        backend(&server).await,
        "webhooks",
        DurableQueueConfig::default(),
    )
    .unwrap();
    assert!(
        queue
            .submit("evt-1", b"charge.succeeded")
            .await
            .unwrap()
            .is_accepted()
    );
    let completions = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));

    // Worker A takes the job (through a blocking read on a dedicated
    // connection), says so, and is killed while "working".
    let (took, took_rx) = tokio::sync::oneshot::channel();
    let worker_a = queue.consumer("worker-a").unwrap();
    let done_a = completions.clone();
    let task = tokio::spawn(async move {
        let job = worker_a
            .next(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("a job is waiting");
        took.send((job.idempotency_key().to_owned(), job.attempts()))
            .unwrap();
        std::future::pending::<()>().await; // the handler never finishes
        if job.ack().await.unwrap() == AckOutcome::Completed {
            *done_a
                .lock()
                .unwrap()
                .entry(job.idempotency_key().into())
                .or_default() += 1;
        }
    });
    let (key, attempts) = took_rx.await.unwrap();
    assert_eq!((key.as_str(), attempts), ("evt-1", 1));
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    // The job is not lost: it is pending under the dead worker.
    assert_eq!(queue.len().await.unwrap(), 1);
    assert_eq!(
        queue.status("evt-1").await.unwrap(),
        Some(JobStatus::Queued)
    );
    let pending: Vec<redis::Value> = server
        .query(&["XPENDING", queue.stream_key().as_str(), "workers"])
        .unwrap();
    assert_eq!(pending[0], redis::Value::Int(1), "{pending:?}");

    // A new read by B does not see it (it was delivered); a reclaim does.
    let worker_b = queue.consumer("worker-b").unwrap();
    assert!(worker_b.next(NONE).await.unwrap().is_none());
    let jobs = worker_b.reclaim(NONE, 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.idempotency_key(), "evt-1");
    assert_eq!(job.payload(), b"charge.succeeded");
    assert_eq!(job.attempts(), 2, "the second delivery");
    if job.ack().await.unwrap() == AckOutcome::Completed {
        *completions
            .lock()
            .unwrap()
            .entry(job.idempotency_key().into())
            .or_default() += 1;
    }

    assert_eq!(
        *completions.lock().unwrap(),
        BTreeMap::from([("evt-1".to_owned(), 1)])
    );
    assert_eq!(
        queue.status("evt-1").await.unwrap(),
        Some(JobStatus::Completed)
    );
    assert_eq!(queue.len().await.unwrap(), 0);
    assert!(worker_b.reclaim(NONE, 10).await.unwrap().is_empty());
    // A retry of the original submit (say, the webhook sender retried) is
    // deduplicated, not run again.
    assert_eq!(
        queue.submit("evt-1", b"charge.succeeded").await.unwrap(),
        Submitted::Duplicate {
            id: job.id().clone(),
            status: JobStatus::Completed
        }
    );
    assert!(worker_b.next(NONE).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_job_completes_exactly_once_across_a_crash_with_aof() {
    let Some(server) = RedisServer::builder()
        .config_line("appendonly yes")
        .config_line("appendfsync always")
        .start_or_skip()
    else {
        return;
    };
    let backend = backend(&server).await;
    let queue = DurableQueue::new(
        backend.clone(),
        "jobs",
        DurableQueueConfig::default().capacity(100),
    )
    .unwrap();
    let mut completions = BTreeMap::<String, usize>::new();
    let mut accepted = Vec::new();
    let mut complete = |key: &str, payload: &[u8], outcome: AckOutcome| {
        assert_eq!(payload, format!("payload of {key}").as_bytes());
        if outcome == AckOutcome::Completed {
            *completions.entry(key.to_owned()).or_default() += 1;
        }
    };

    for i in 0..40 {
        let key = format!("job-{i}");
        let s = queue
            .submit(&key, format!("payload of {key}").as_bytes())
            .await
            .unwrap();
        assert!(s.is_accepted(), "{key}: {s:?}");
        accepted.push(key);
    }
    for i in 0..5 {
        let s = queue.submit(&format!("job-{i}"), b"again").await.unwrap();
        assert!(
            matches!(
                s,
                Submitted::Duplicate {
                    status: JobStatus::Queued,
                    ..
                }
            ),
            "{s:?}"
        );
    }

    // Worker A completes 10 jobs and is in the middle of 5 more; worker B
    // is in the middle of 5 others. Then Redis crashes (SIGKILL).
    let a = queue.consumer("a").unwrap();
    let b = queue.consumer("b").unwrap();
    let batch = a.next_batch(15, NONE).await.unwrap();
    assert_eq!(batch.len(), 15);
    for job in &batch[..10] {
        let outcome = job.ack().await.unwrap();
        assert_eq!(outcome, AckOutcome::Completed);
        complete(job.idempotency_key(), job.payload(), outcome);
    }
    assert_eq!(b.next_batch(5, NONE).await.unwrap().len(), 5);
    assert_eq!(queue.len().await.unwrap(), 30);

    tokio::task::block_in_place(|| {
        server.kill().unwrap();
        server.restart().unwrap();
    });
    // The shared connection saw the server die: the first call fails,
    // the connection reconnects by itself.
    retrying(|| queue.len()).await;

    // Everything acknowledged before the crash is still completed, every
    // other accepted job is still there.
    assert_eq!(queue.len().await.unwrap(), 30);
    assert_eq!(
        queue.status("job-0").await.unwrap(),
        Some(JobStatus::Completed)
    );
    assert!(matches!(
        queue.submit("job-0", b"x").await.unwrap(),
        Submitted::Duplicate {
            status: JobStatus::Completed,
            ..
        }
    ));
    assert!(matches!(
        queue.submit("job-39", b"x").await.unwrap(),
        Submitted::Duplicate {
            status: JobStatus::Queued,
            ..
        }
    ));
    for i in 40..50 {
        let key = format!("job-{i}");
        let s = queue
            .submit(&key, format!("payload of {key}").as_bytes())
            .await
            .unwrap();
        assert!(s.is_accepted(), "{key}: {s:?}");
        accepted.push(key);
    }

    // Worker C (A and B are gone) reclaims their in-flight jobs, then reads
    // the rest.
    let c = queue.consumer("c").unwrap();
    let reclaimed = c.reclaim(NONE, 100).await.unwrap();
    assert_eq!(reclaimed.len(), 10, "5 from a, 5 from b");
    for job in &reclaimed {
        assert_eq!(job.attempts(), 2, "{job:?}");
        let outcome = job.ack().await.unwrap();
        assert_eq!(outcome, AckOutcome::Completed);
        complete(job.idempotency_key(), job.payload(), outcome);
    }
    loop {
        let batch = c.next_batch(16, NONE).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for job in &batch {
            assert_eq!(job.attempts(), 1);
            let outcome = job.ack().await.unwrap();
            complete(job.idempotency_key(), job.payload(), outcome);
        }
    }

    assert_eq!(accepted.len(), 50);
    assert_eq!(
        completions.len(),
        accepted.len(),
        "every accepted job completed"
    );
    for key in &accepted {
        assert_eq!(
            completions.get(key),
            Some(&1),
            "{key} completed exactly once"
        );
        assert_eq!(queue.status(key).await.unwrap(), Some(JobStatus::Completed));
    }
    assert_eq!(queue.len().await.unwrap(), 0);
    assert!(c.reclaim(NONE, 100).await.unwrap().is_empty());
    let pending: Vec<redis::Value> = server
        .query(&["XPENDING", queue.stream_key().as_str(), "workers"])
        .unwrap();
    assert_eq!(pending[0], redis::Value::Int(0), "{pending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_persistence_loses_the_queue_but_not_its_usability() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue =
        DurableQueue::new(backend(&server).await, "q", DurableQueueConfig::default()).unwrap();
    let worker = queue.consumer("w").unwrap();
    // First use by a consumer, before any submit: the group is created.
    assert!(worker.next(NONE).await.unwrap().is_none());
    queue.submit("before", b"1").await.unwrap();
    tokio::task::block_in_place(|| server.restart().unwrap());
    retrying(|| queue.len()).await;
    // Stream and group are gone (no AOF): reads recreate the group instead
    // of failing with NOGROUP, and new jobs flow again.
    assert_eq!(queue.len().await.unwrap(), 0);
    assert!(worker.next(NONE).await.unwrap().is_none());
    assert!(worker.reclaim(NONE, 4).await.unwrap().is_empty());
    assert!(queue.submit("after", b"2").await.unwrap().is_accepted());
    let job = worker.next(NONE).await.unwrap().unwrap();
    assert_eq!(job.idempotency_key(), "after");
    assert_eq!(job.ack().await.unwrap(), AckOutcome::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_submits_enqueue_once() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue = DurableQueue::new(
        backend(&server).await,
        "dups",
        DurableQueueConfig::default(),
    )
    .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (queue, barrier) = (queue.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                queue
                    .submit("same-key", format!("attempt {i}").as_bytes())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let accepted: Vec<_> = results.iter().filter(|s| s.is_accepted()).collect();
    assert_eq!(accepted.len(), 1, "{results:?}");
    for s in &results {
        assert_eq!(s.id(), accepted[0].id(), "every caller learns the same job");
    }
    assert_eq!(queue.len().await.unwrap(), 1);
    let job = queue
        .consumer("w")
        .unwrap()
        .next(NONE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.id(), accepted[0].id());
    assert!(job.payload().starts_with(b"attempt "));
    assert_eq!(job.ack().await.unwrap(), AckOutcome::Completed);
    assert!(
        queue
            .consumer("w")
            .unwrap()
            .next(NONE)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_exact_under_concurrent_submits() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue = DurableQueue::new(
        backend(&server).await,
        "bounded",
        DurableQueueConfig::default().capacity(5),
    )
    .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (queue, barrier) = (queue.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                (format!("k{i}"), queue.submit(&format!("k{i}"), b"x").await)
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut full = 0;
    for t in tasks {
        match t.await.unwrap() {
            (key, Ok(Submitted::Accepted(_))) => accepted.push(key),
            (_, Err(Error::CapacityExceeded { resource, capacity })) => {
                assert_eq!((resource, capacity), ("durable queue", 5));
                full += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((accepted.len(), full), (5, 15));
    assert_eq!(queue.len().await.unwrap(), 5);

    // Full: a new key is refused at once, with a retryable capacity error;
    // a retry of an accepted key is still recognised.
    let err = queue.submit("new", b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity);
    assert!(err.is_retryable());
    assert!(matches!(
        queue.submit(&accepted[0], b"x").await.unwrap(),
        Submitted::Duplicate {
            status: JobStatus::Queued,
            ..
        }
    ));
    // A refused key was not recorded: it is accepted once there is room.
    assert_eq!(queue.status("new").await.unwrap(), None);

    // A delivered but unacknowledged job still holds its place.
    let w = queue.consumer("w").unwrap();
    let job = w.next(NONE).await.unwrap().unwrap();
    assert!(queue.submit("new", b"x").await.is_err());
    assert_eq!(job.ack().await.unwrap(), AckOutcome::Completed);
    assert!(queue.submit("new", b"x").await.unwrap().is_accepted());
    assert!(queue.submit("newer", b"x").await.is_err());
    assert_eq!(queue.len().await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_by_a_non_owner_or_twice_are_reported_no_ops() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue =
        DurableQueue::new(backend(&server).await, "own", DurableQueueConfig::default()).unwrap();
    let (a, b) = (queue.consumer("a").unwrap(), queue.consumer("b").unwrap());
    queue.submit("x", b"1").await.unwrap();
    let from_a = a.next(NONE).await.unwrap().unwrap();
    // A is slow; B takes the job over.
    let from_b = b.reclaim(NONE, 4).await.unwrap().pop().unwrap();
    assert_eq!(from_b.id(), from_a.id());
    assert_eq!(from_a.ack().await.unwrap(), AckOutcome::NotOwned);
    assert_eq!(queue.status("x").await.unwrap(), Some(JobStatus::Queued));
    assert_eq!(
        queue.len().await.unwrap(),
        1,
        "a non-owner's ack changed nothing"
    );
    assert_eq!(from_b.ack().await.unwrap(), AckOutcome::Completed);
    assert_eq!(from_b.ack().await.unwrap(), AckOutcome::AlreadyCompleted);
    assert_eq!(from_a.ack().await.unwrap(), AckOutcome::AlreadyCompleted);
    assert_eq!(queue.len().await.unwrap(), 0);

    // A job whose key is already completed (here: marked by hand, as after
    // a partial restore) is acknowledged by reclaim, not delivered again.
    queue.submit("y", b"2").await.unwrap();
    let stale = a.next(NONE).await.unwrap().unwrap();
    server
        .cmd(&["HSET", &job_key("own", "y"), "s", "d"])
        .unwrap();
    assert!(b.reclaim(NONE, 4).await.unwrap().is_empty());
    assert_eq!(
        queue.len().await.unwrap(),
        0,
        "the leftover entry is removed"
    );
    assert_eq!(stale.ack().await.unwrap(), AckOutcome::AlreadyCompleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_over_max_attempts_go_to_dead_letters() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue = DurableQueue::new(
        backend(&server).await,
        "poison",
        DurableQueueConfig::default().max_attempts(Some(2)),
    )
    .unwrap();
    let id = queue.submit("bad-job", b"boom").await.unwrap().id().clone();
    queue.submit("good-job", b"fine").await.unwrap();
    let w = queue.consumer("w").unwrap();
    let first = w.next(NONE).await.unwrap().unwrap();
    assert_eq!((first.idempotency_key(), first.attempts()), ("bad-job", 1));
    // The handler crashes each time; attempt 2 is still delivered ...
    let second = w.reclaim(NONE, 1).await.unwrap().pop().unwrap();
    assert_eq!(
        (second.idempotency_key(), second.attempts()),
        ("bad-job", 2)
    );
    // ... attempt 3 is not: the job is dead-lettered.
    assert!(w.reclaim(NONE, 10).await.unwrap().is_empty());
    assert_eq!(second.ack().await.unwrap(), AckOutcome::NotOwned);
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].source_id, id);
    assert_eq!(dead[0].idempotency_key, "bad-job");
    assert_eq!(dead[0].payload, b"boom");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(
        queue.status("bad-job").await.unwrap(),
        Some(JobStatus::DeadLettered)
    );
    assert!(matches!(
        queue.submit("bad-job", b"boom").await.unwrap(),
        Submitted::Duplicate {
            status: JobStatus::DeadLettered,
            ..
        }
    ));
    // The other job was never affected.
    assert_eq!(queue.len().await.unwrap(), 1);
    let good = w.next(NONE).await.unwrap().unwrap();
    assert_eq!(good.idempotency_key(), "good-job");
    assert_eq!(good.ack().await.unwrap(), AckOutcome::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_not_delivered() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue = DurableQueue::new(
        backend(&server).await,
        "mixed",
        DurableQueueConfig::default(),
    )
    .unwrap();
    queue.submit("ok-1", b"a").await.unwrap();
    let stream = queue.stream_key().as_str().to_owned();
    server
        .cmd(&["XADD", &stream, "*", "foreign", "entry"])
        .unwrap();
    queue.submit("ok-2", b"b").await.unwrap();
    let w = queue.consumer("w").unwrap();
    let jobs = w.next_batch(10, NONE).await.unwrap();
    let keys: Vec<_> = jobs.iter().map(|j| j.idempotency_key()).collect();
    assert_eq!(keys, ["ok-1", "ok-2"]);
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].idempotency_key, "");
    for j in &jobs {
        assert_eq!(j.ack().await.unwrap(), AckOutcome::Completed);
    }
    assert_eq!(
        queue.len().await.unwrap(),
        0,
        "nothing left to block the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_keys_are_escaped_or_rejected() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let backend = backend(&server).await;
    let config = || DurableQueueConfig::default().max_payload(64);

    // Names that try to reach another queue's keys get their own keys.
    let names = ["q", "q}:{x", "q:stream", "*", "{q}", "q\n"];
    let queues: Vec<_> = names
        .iter()
        .map(|n| DurableQueue::new(backend.clone(), n, config()).unwrap())
        .collect();
    let idems = [
        "stream",
        "job:stream",
        "*",
        "}{",
        "a:b:c",
        "ü\u{0}\r\n",
        &"k".repeat(MAX_IDEMPOTENCY_KEY_LEN),
    ];
    for q in &queues {
        for (i, idem) in idems.iter().enumerate() {
            let s = q
                .submit(idem, format!("{}/{i}", q.name()).as_bytes())
                .await
                .unwrap();
            assert!(s.is_accepted(), "{} {idem:?}: {s:?}", q.name());
        }
    }
    for q in &queues {
        assert_eq!(q.len().await.unwrap(), idems.len(), "{}", q.name());
        let w = q.consumer("w").unwrap();
        let jobs = w.next_batch(100, NONE).await.unwrap();
        assert_eq!(jobs.len(), idems.len());
        for (i, (job, idem)) in jobs.iter().zip(idems).enumerate() {
            assert_eq!(job.idempotency_key(), idem);
            assert_eq!(job.payload(), format!("{}/{i}", q.name()).as_bytes());
            assert_eq!(job.ack().await.unwrap(), AckOutcome::Completed);
        }
    }
    // Every key the queues wrote is a valid raceguard key owned by its queue.
    let keys: Vec<String> = server.query(&["KEYS", "*"]).unwrap();
    assert!(!keys.is_empty());
    for k in &keys {
        let d = Key::decode(k).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        assert_eq!(d.namespace, "rq");
        assert!(names.contains(&d.owner.as_deref().unwrap()), "{k:?}");
    }

    // Bad input is a typed error, never a panic.
    let q = &queues[0];
    let invalid = |r: raceguard::Result<()>, what: &str| match r {
        Err(Error::InvalidInput { what: w, .. }) => assert_eq!(w, what),
        other => panic!("{what}: {other:?}"),
    };
    invalid(q.submit("", b"x").await.map(drop), "idempotency_key");
    invalid(
        q.submit(&"k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1), b"x")
            .await
            .map(drop),
        "idempotency_key",
    );
    invalid(
        q.submit("big", &[0; 65]).await.map(drop),
        "durable_queue.payload",
    );
    invalid(q.status("").await.map(drop), "idempotency_key");
    invalid(
        DurableQueue::new(backend.clone(), "", config()).map(drop),
        "scope_id",
    );
    invalid(
        DurableQueue::new(backend.clone(), "q", config().namespace("bad ns")).map(drop),
        "key.namespace",
    );
    invalid(
        DurableQueue::new(backend.clone(), "q", config().capacity(0)).map(drop),
        "durable_queue.capacity",
    );
    for name in ["", "a\nb", &"c".repeat(129)] {
        invalid(q.consumer(name).map(drop), "durable_queue.consumer");
    }
    let w = q.consumer("w").unwrap();
    invalid(w.next_batch(0, NONE).await.map(drop), "durable_queue.batch");
    invalid(
        w.reclaim(NONE, 100_000).await.map(drop),
        "durable_queue.batch",
    );
    invalid(q.dead_letters(0).await.map(drop), "durable_queue.batch");
    assert_eq!(q.status("big").await.unwrap(), None, "nothing recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_read_does_not_hold_the_shared_connection() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue = DurableQueue::new(
        backend(&server).await,
        "block",
        DurableQueueConfig::default(),
    )
    .unwrap();
    let w = queue.consumer("w").unwrap();
    // Create the group first, so the blocking read is the only thing
    // waiting on the server.
    assert!(w.next(NONE).await.unwrap().is_none());
    // Blocks far longer than the shared connection's response timeout (2 s):
    // if it ran on the shared connection, the submit below would time out.
    let reader = tokio::spawn(async move { w.next(Duration::from_secs(30)).await });
    let blocked = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            let info: String = server.query(&["INFO", "clients"]).unwrap();
            info.contains("blocked_clients:1")
        })
    });
    assert!(blocked, "the read never blocked");
    assert!(queue.submit("wake", b"up").await.unwrap().is_accepted());
    let job = reader
        .await
        .unwrap()
        .unwrap()
        .expect("the blocked read got the job");
    assert_eq!(job.idempotency_key(), "wake");
    assert_eq!(job.ack().await.unwrap(), AckOutcome::Completed);

    // An idle bounded read returns None.
    let w = queue.consumer("w").unwrap();
    assert!(w.next(Duration::from_millis(20)).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_retries_failures_and_completes_each_job_once() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let queue =
        DurableQueue::new(backend(&server).await, "run", DurableQueueConfig::default()).unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("job-{i}")).collect();
    for k in &keys {
        assert!(queue.submit(k, k.as_bytes()).await.unwrap().is_accepted());
    }
    let effects = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let (in_flight, max_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (failed_once, panicked_once) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = queue.consumer("runner").unwrap();
    let runner = tokio::spawn({
        let (effects, in_flight, max_in_flight) =
            (effects.clone(), in_flight.clone(), max_in_flight.clone());
        let (failed_once, panicked_once) = (failed_once.clone(), panicked_once.clone());
        let shutdown = shutdown.clone();
        async move {
            let options = RunOptions::default()
                .concurrency(3)
                .block(Duration::from_millis(50))
                .reclaim_idle(NONE);
            worker
                .run(options, shutdown, move |job| {
                    let (effects, in_flight, max_in_flight, done_tx) = (
                        effects.clone(),
                        in_flight.clone(),
                        max_in_flight.clone(),
                        done_tx.clone(),
                    );
                    let (failed_once, panicked_once) = (failed_once.clone(), panicked_once.clone());
                    async move {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_in_flight.fetch_max(now, Ordering::SeqCst);
                        struct Leave(Arc<AtomicUsize>);
                        impl Drop for Leave {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        let _leave = Leave(in_flight);
                        let key = job.idempotency_key().to_owned();
                        assert_eq!(job.payload(), key.as_bytes());
                        if key == "job-7" && !failed_once.swap(true, Ordering::SeqCst) {
                            return Err("downstream said 500");
                        }
                        if key == "job-13" && !panicked_once.swap(true, Ordering::SeqCst) {
                            panic!("handler bug");
                        }
                        *effects.lock().unwrap().entry(key.clone()).or_default() += 1;
                        done_tx.send(key).unwrap();
                        Ok(())
                    }
                })
                .await
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < keys.len() {
        seen.insert(done_rx.recv().await.unwrap());
    }
    shutdown.cancel();
    let report = runner.await.unwrap().unwrap();
    assert_eq!(report.completed, 30, "{report:?}");
    assert_eq!(report.failed, 2, "{report:?}");
    assert_eq!(report.superseded, 0, "{report:?}");
    assert!(failed_once.load(Ordering::SeqCst) && panicked_once.load(Ordering::SeqCst));
    assert!(max_in_flight.load(Ordering::SeqCst) <= 3);
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), 30);
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
    assert_eq!(queue.len().await.unwrap(), 0);
    for k in &keys {
        assert_eq!(queue.status(k).await.unwrap(), Some(JobStatus::Completed));
    }
}

#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_cluster() {
    use raceguard::testing::RedisCluster;
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let backend = RedisBackend::connect_cluster(&cluster.urls(), redis_config())
        .await
        .unwrap();
    // Queues whose keys land on different masters.
    for name in ["alpha", "beta", "gamma", "delta"] {
        let queue = DurableQueue::new(
            backend.clone(),
            name,
            DurableQueueConfig::default().capacity(3),
        )
        .unwrap();
        for i in 0..3 {
            assert!(
                queue
                    .submit(&format!("k{i}"), b"p")
                    .await
                    .unwrap()
                    .is_accepted()
            );
        }
        assert!(queue.submit("k3", b"p").await.is_err(), "capacity holds");
        let a = queue.consumer("a").unwrap();
        let b = queue.consumer("b").unwrap();
        let first = a.next(Duration::from_millis(100)).await.unwrap().unwrap();
        let taken = b.reclaim(NONE, 8).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id(), first.id());
        assert_eq!(first.ack().await.unwrap(), AckOutcome::NotOwned);
        assert_eq!(taken[0].ack().await.unwrap(), AckOutcome::Completed);
        for job in b.next_batch(8, NONE).await.unwrap() {
            assert_eq!(job.ack().await.unwrap(), AckOutcome::Completed);
        }
        assert_eq!(queue.len().await.unwrap(), 0);
        assert_eq!(
            queue.status("k1").await.unwrap(),
            Some(JobStatus::Completed)
        );
    }
}
