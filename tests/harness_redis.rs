//! Tests of the real-Redis test harness, `raceguard::testing`.
//!
//! Every test that needs `redis-server` skips (with a notice) when it is not
//! installed, unless `RACEGUARD_REQUIRE_REDIS=1`.
//!
//! The tests observe processes through `/proc`, hence Linux only.
#![cfg(feature = "test-util")]
#![cfg(target_os = "linux")]

use raceguard::testing::{
    HarnessError, RedisCluster, RedisServer, RedisServers, SkipPolicy, find_binary_in, wait_until,
};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Deadline of every eventual condition in these tests.
const DEADLINE: Duration = Duration::from_secs(10);
/// Tells a re-executed copy of this test binary which helper role to play.
const CHILD_ENV: &str = "RACEGUARD_HARNESS_CHILD";

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `/proc/<pid>` disappears only once the process is dead *and* reaped.
fn gone_within(pid: u32, timeout: Duration) -> bool {
    wait_until(timeout, || !proc_exists(pid))
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn redis_available() -> bool {
    SkipPolicy::from_env().should_run(&["redis-server"])
}

#[test]
fn harness_types_are_send_and_sync() {
    fn assert_bounds<T: Send + Sync>() {}
    assert_bounds::<RedisServer>();
    assert_bounds::<RedisServers>();
    assert_bounds::<RedisCluster>();
    assert_bounds::<HarnessError>();
}

#[test]
fn server_answers_set_get_on_its_own_port() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    assert_eq!(comm(server.pid()), "redis-server");
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    assert_eq!(
        server.addr().to_string(),
        format!("127.0.0.1:{}", server.port())
    );

    // Through the convenience API ...
    assert_eq!(server.cmd(&["SET", "k", "v1"]).unwrap(), redis::Value::Okay);
    assert_eq!(server.query::<String>(&["GET", "k"]).unwrap(), "v1");
    // ... and through a plain redis client on the URL.
    let mut con = server.client().get_connection().unwrap();
    redis::cmd("SET").arg("k").arg("v2").exec(&mut con).unwrap();
    assert_eq!(server.query::<String>(&["GET", "k"]).unwrap(), "v2");

    // It is our process on our port, with the harness's defaults.
    let info: String = server.query(&["INFO", "server"]).unwrap();
    assert!(
        info.contains(&format!("process_id:{}\r\n", server.pid())),
        "{info}"
    );
    assert!(
        info.contains(&format!("tcp_port:{}\r\n", server.port())),
        "{info}"
    );
    let save: Vec<String> = server.query(&["CONFIG", "GET", "save"]).unwrap();
    assert_eq!(save, ["save", ""]);
    let aof: Vec<String> = server.query(&["CONFIG", "GET", "appendonly"]).unwrap();
    assert_eq!(aof, ["appendonly", "no"]);
    let dir: Vec<String> = server.query(&["CONFIG", "GET", "dir"]).unwrap();
    assert_eq!(Path::new(&dir[1]), server.dir().canonicalize().unwrap());
    assert!(server.log_tail().contains("Ready to accept connections"));
    assert!(matches!(
        server.cmd(&[]),
        Err(HarnessError::InvalidArgument { .. })
    ));
}

#[test]
fn independent_servers_are_distinct() {
    let Some(servers) = RedisServers::start_or_skip(3) else {
        return;
    };
    assert_eq!(servers.len(), 3);
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    let mut pids: Vec<u32> = servers.iter().map(RedisServer::pid).collect();
    ports.sort_unstable();
    ports.dedup();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!((ports.len(), pids.len()), (3, 3));
    assert_eq!(servers.urls().len(), 3);
    assert_eq!(servers.clients().len(), 3);

    servers[0].cmd(&["SET", "shared-name", "zero"]).unwrap();
    servers[1].cmd(&["SET", "shared-name", "one"]).unwrap();
    assert_eq!(
        servers[0].query::<String>(&["GET", "shared-name"]).unwrap(),
        "zero"
    );
    assert_eq!(
        servers[1].query::<String>(&["GET", "shared-name"]).unwrap(),
        "one"
    );
    assert_eq!(
        servers[2].cmd(&["GET", "shared-name"]).unwrap(),
        redis::Value::Nil
    );
    assert_eq!(servers[2].query::<i64>(&["DBSIZE"]).unwrap(), 0);

    // Faulting one leaves the others up.
    servers[1].kill().unwrap();
    assert!(!servers[1].is_running());
    assert!(servers[0].is_running() && servers[2].is_running());
    assert_eq!(
        servers[0].query::<String>(&["GET", "shared-name"]).unwrap(),
        "zero"
    );
}

#[test]
fn restart_keeps_the_port_and_loses_unpersisted_data() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let (port, pid) = (server.port(), server.pid());
    server.cmd(&["SET", "k", "v"]).unwrap();
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), pid, "a new process");
    assert!(gone_within(pid, DEADLINE), "the old process is reaped");
    assert_eq!(server.query::<String>(&["PING"]).unwrap(), "PONG");
    assert_eq!(
        server.cmd(&["GET", "k"]).unwrap(),
        redis::Value::Nil,
        "no persistence by default"
    );
}

#[test]
fn appendonly_data_survives_a_graceful_restart() {
    let Some(server) = RedisServer::builder()
        .config_line("appendonly yes")
        .start_or_skip()
    else {
        return;
    };
    server.cmd(&["SET", "durable", "yes"]).unwrap();
    server.stop().unwrap();
    server.restart().unwrap();
    // Same config and same data directory: the AOF is replayed.
    assert_eq!(server.query::<String>(&["GET", "durable"]).unwrap(), "yes");
}

#[test]
fn stop_refuses_connections_and_restart_recovers() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let pid = server.pid();
    server.stop().unwrap();
    assert!(!server.is_running());
    assert!(
        !proc_exists(pid),
        "stop() returns after the process is reaped"
    );
    let Err(err) = server
        .client()
        .get_connection_with_timeout(Duration::from_secs(1))
    else {
        panic!("connected to a stopped server");
    };
    assert!(err.is_connection_refusal(), "{err}");
    assert!(matches!(
        server.pause(),
        Err(HarnessError::NotRunning { .. })
    ));
    server.stop().unwrap(); // idempotent

    server.restart().unwrap();
    assert!(server.is_running());
    assert_eq!(server.query::<String>(&["PING"]).unwrap(), "PONG");
}

#[test]
fn kill_is_a_crash_and_restart_recovers() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let pid = server.pid();
    server.cmd(&["SET", "k", "v"]).unwrap();
    server.kill().unwrap();
    assert!(!server.is_running());
    assert!(!proc_exists(pid));
    assert!(server.connection().is_err());
    // A crash leaves no shutdown message in the log (a stop does).
    assert!(!server.log_tail().contains("ready to exit, bye bye"));

    server.restart().unwrap();
    assert_ne!(server.pid(), pid);
    assert_eq!(server.cmd(&["GET", "k"]).unwrap(), redis::Value::Nil);
    server.stop().unwrap();
    assert!(server.log_tail().contains("ready to exit, bye bye"));
}

#[test]
fn a_server_that_exits_by_itself_is_seen_as_stopped() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let pid = server.pid();
    // SHUTDOWN closes the connection without a reply: the error is expected.
    let _ = server.cmd(&["SHUTDOWN", "NOSAVE"]);
    assert!(wait_until(DEADLINE, || !server.is_running()));
    server.restart().unwrap();
    assert!(
        !proc_exists(pid),
        "the exited process was reaped by restart"
    );
    assert_eq!(server.query::<String>(&["PING"]).unwrap(), "PONG");
}

#[test]
fn restart_on_a_taken_port_fails_with_the_log_tail() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    server.stop().unwrap();
    // Someone else takes the port while the server is down.
    let squatter = std::net::TcpListener::bind(server.addr()).unwrap();
    match server.restart().unwrap_err() {
        HarnessError::Start { port, log_tail, .. } => {
            assert_eq!(port, server.port());
            assert!(log_tail.contains("Address already in use"), "{log_tail}");
        }
        other => panic!("expected Start, got {other:?}"),
    }
    assert!(!server.is_running());
    drop(squatter);
    server.restart().unwrap();
    assert_eq!(server.query::<String>(&["PING"]).unwrap(), "PONG");
}

#[test]
fn pause_times_out_commands_until_resume() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut con = server.connection().unwrap();
    con.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut con).unwrap(),
        "PONG"
    );

    server.pause().unwrap();
    assert!(server.is_paused());
    assert!(server.is_running(), "paused is still alive");
    assert_eq!(proc_state(server.pid()), Some('T'), "a real SIGSTOP");
    let err = redis::cmd("PING").query::<String>(&mut con).unwrap_err();
    assert!(err.is_timeout(), "{err}");

    server.resume().unwrap();
    assert!(!server.is_paused());
    assert_ne!(proc_state(server.pid()), Some('T'));
    let mut con = server.connection().unwrap();
    con.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut con).unwrap(),
        "PONG"
    );
}

#[test]
fn stop_and_drop_work_on_a_paused_server() {
    let Some(servers) = RedisServers::start_or_skip(2) else {
        return;
    };
    let (a, b) = (servers[0].pid(), servers[1].pid());
    servers[0].pause().unwrap();
    servers[1].pause().unwrap();
    // Graceful stop: SIGCONT then SIGTERM, so redis can run its shutdown.
    servers[0].stop().unwrap();
    assert!(!proc_exists(a));
    assert!(servers[0].log_tail().contains("ready to exit, bye bye"));
    // Drop: the wrapper's SIGKILL works on a stopped process.
    drop(servers);
    assert!(!proc_exists(b));
}

#[test]
fn client_pause_holds_commands_for_its_duration() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut con = server.connection().unwrap();
    con.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    let start = Instant::now();
    server.client_pause(Duration::from_millis(500)).unwrap();
    // The process runs (no SIGSTOP) but commands are held.
    assert!(!server.is_paused());
    let err = redis::cmd("PING").query::<String>(&mut con).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // A command issued during the pause is answered once it ends.
    assert_eq!(server.query::<String>(&["PING"]).unwrap(), "PONG");
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn drop_reaps_the_process() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let pid = server.pid();
    let dir = server.dir().to_owned();
    assert!(proc_exists(pid));
    drop(server);
    // Drop waits for the wrapper, which reaps redis-server: no polling needed.
    assert!(!proc_exists(pid));
    assert!(!dir.exists(), "the data directory is removed");
}

#[test]
fn a_panicking_test_leaves_no_process() {
    if !redis_available() {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let result = std::thread::spawn(move || {
        let server = RedisServer::start().unwrap();
        tx.send(server.pid()).unwrap();
        panic!("deliberate panic while holding a redis-server");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let pid = rx.recv().unwrap();
    assert!(
        gone_within(pid, DEADLINE),
        "redis-server {pid} outlived the panic"
    );
}

/// Helper for [`a_sigkilled_test_process_leaves_no_process`]: a no-op unless
/// re-executed by it.
#[test]
fn child_helper_holds_server_until_stdin_eof() {
    if std::env::var_os(CHILD_ENV).as_deref() != Some(OsStr::new("hold")) {
        return;
    }
    let server = RedisServer::start().unwrap();
    println!("REDIS_PID={}", server.pid());
    // Blocks until the parent kills us (or dies, closing our stdin).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn a_sigkilled_test_process_leaves_no_process() {
    if !redis_available() {
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_helper_holds_server_until_stdin_eof",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may print "test <name> ... " on the same line.
            if let Some((_, pid)) = line.split_once("REDIS_PID=") {
                let _ = tx.send(pid.trim().parse::<u32>().unwrap());
            }
        }
    });
    let pid = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the child test reports its redis-server pid");
    assert_eq!(comm(pid), "redis-server");

    child.kill().unwrap(); // SIGKILL: no unwinding, no destructors
    child.wait().unwrap();
    assert!(
        gone_within(pid, DEADLINE),
        "redis-server {pid} outlived its SIGKILLed test process"
    );
}

/// Helper for [`start_or_skip_follows_the_policy_end_to_end`].
#[test]
fn child_helper_start_or_skip() {
    if std::env::var_os(CHILD_ENV).as_deref() != Some(OsStr::new("skip")) {
        return;
    }
    let server = RedisServer::start_or_skip();
    println!("STARTED={}", server.is_some());
}

#[test]
fn start_or_skip_follows_the_policy_end_to_end() {
    let empty = tempfile::tempdir().unwrap();
    let run = |require: Option<&str>| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child_helper_start_or_skip", "--exact", "--nocapture"])
            .env(CHILD_ENV, "skip")
            .env("PATH", empty.path())
            .env_remove("RACEGUARD_REQUIRE_REDIS");
        if let Some(value) = require {
            cmd.env("RACEGUARD_REQUIRE_REDIS", value);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, stdout, stderr) = run(None);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("STARTED=false"), "{stdout}");
    assert!(stderr.contains("skipping Redis test"), "{stderr}");
    assert!(
        stderr.contains("Debian/Ubuntu package: redis-server"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = run(Some("1"));
    assert!(
        !ok,
        "a required but missing redis-server must fail the test"
    );
    assert!(!stdout.contains("STARTED="), "{stdout}");
    assert!(
        stderr.contains("RACEGUARD_REQUIRE_REDIS is set but `redis-server`"),
        "{stderr}"
    );
}

#[test]
fn config_lines_are_applied() {
    let Some(server) = RedisServer::builder()
        .config_line("maxclients 16")
        .config_line("requirepass \"s3 cret\"")
        .start_or_skip()
    else {
        return;
    };
    let maxclients: Vec<String> = server.query(&["CONFIG", "GET", "maxclients"]).unwrap();
    assert_eq!(maxclients, ["maxclients", "16"]);
    assert!(server.url().starts_with("redis://:s3%20cret@127.0.0.1:"));

    // Without the password the server refuses commands.
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{}/", server.port())).unwrap();
    let mut con = anonymous.get_connection().unwrap();
    let err = redis::cmd("GET")
        .arg("k")
        .query::<Option<String>>(&mut con)
        .unwrap_err();
    assert!(err.to_string().contains("NOAUTH"), "{err}");
}

#[test]
fn a_broken_config_fails_with_the_log_tail() {
    if !redis_available() {
        return;
    }
    let err = RedisServer::builder()
        .config_line("no-such-directive 1")
        .start()
        .unwrap_err();
    match &err {
        HarnessError::Start { log_tail, .. } => {
            assert!(log_tail.contains("Bad directive"), "{log_tail}")
        }
        other => panic!("expected Start, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-directive"), "{err}");

    let err = RedisServer::builder()
        .config_line("maxclients 16\nport 6379")
        .start()
        .unwrap_err();
    assert!(matches!(err, HarnessError::InvalidArgument { .. }), "{err}");
}

#[test]
fn a_missing_binary_is_reported_with_its_package() {
    let err = RedisServer::builder()
        .redis_server_binary("/nonexistent/redis-server")
        .start()
        .unwrap_err();
    assert!(matches!(err, HarnessError::NotInstalled { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("(Debian/Ubuntu package: redis-server)")
    );
}

fn fake_bin_dir(names: &[(&str, u32)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (name, mode) in names {
        let path = dir.path().join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    dir
}

#[test]
fn find_binary_in_finds_only_executable_files() {
    let dir = fake_bin_dir(&[("redis-server", 0o755), ("redis-cli", 0o644)]);
    std::fs::create_dir(dir.path().join("redis-benchmark")).unwrap();
    let path = std::env::join_paths(["/nonexistent", "", dir.path().to_str().unwrap()]).unwrap();
    assert_eq!(
        find_binary_in(&path, "redis-server"),
        Some(dir.path().join("redis-server"))
    );
    assert_eq!(find_binary_in(&path, "redis-cli"), None, "not executable");
    assert_eq!(
        find_binary_in(&path, "redis-benchmark"),
        None,
        "a directory"
    );
    assert_eq!(find_binary_in(OsStr::new(""), "redis-server"), None);
}

#[test]
fn skip_policy_skips_when_redis_is_missing_and_not_required() {
    let empty = tempfile::tempdir().unwrap();
    for require in [None, Some("0"), Some(""), Some("no")] {
        let policy = SkipPolicy::from_vars(Some(empty.path().as_os_str()), require.map(OsStr::new));
        assert!(!policy.require_redis(), "{require:?}");
        assert_eq!(
            policy.missing(&["redis-server", "redis-cli"]),
            ["redis-server", "redis-cli"]
        );
        assert!(!policy.should_run(&["redis-server"]));
    }
}

#[test]
fn skip_policy_panics_when_redis_is_required() {
    let only_server = fake_bin_dir(&[("redis-server", 0o755)]);
    for value in ["1", "true", "YES"] {
        let policy = SkipPolicy::from_vars(
            Some(only_server.path().as_os_str()),
            Some(OsStr::new(value)),
        );
        assert!(policy.require_redis());
        // redis-server is there: a single server runs ...
        assert!(policy.should_run(&["redis-server"]));
        // ... but a cluster also needs redis-cli: that is a failure, not a skip.
        let panic = std::panic::catch_unwind(|| policy.should_run(&["redis-server", "redis-cli"]))
            .expect_err("must panic");
        let message = panic.downcast_ref::<String>().expect("a formatted message");
        assert!(message.contains("RACEGUARD_REQUIRE_REDIS"), "{message}");
        assert!(
            message.contains("`redis-cli` (Debian/Ubuntu package: redis-tools)"),
            "{message}"
        );
        assert!(!message.contains("`redis-server`"), "{message}");
    }
}

/// A key per node, each in a slot that node owns.
fn key_per_node(cluster: &RedisCluster) -> BTreeMap<u16, String> {
    let mut keys = BTreeMap::new();
    for i in 0.. {
        let key = format!("key:{i}");
        let owner = cluster.node_for_key(&key).unwrap().port();
        keys.entry(owner).or_insert(key);
        if keys.len() == cluster.nodes().len() {
            return keys;
        }
        assert!(i < 1000, "no key found for some node");
    }
    unreachable!()
}

#[test]
fn cluster_reaches_ok_and_serves_every_slot_range() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    assert_eq!(cluster.nodes().len(), 3);
    let mut ports: Vec<u16> = cluster.nodes().iter().map(RedisServer::port).collect();
    ports.extend(cluster.nodes().iter().map(|n| n.cluster_port().unwrap()));
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 6, "client and bus ports are all distinct");

    for node in cluster.nodes() {
        let info: String = node.query(&["CLUSTER", "INFO"]).unwrap();
        for expected in [
            "cluster_state:ok\r\n",
            "cluster_slots_assigned:16384\r\n",
            "cluster_slots_ok:16384\r\n",
            "cluster_known_nodes:3\r\n",
            "cluster_size:3\r\n",
        ] {
            assert!(info.contains(expected), "{expected} missing in\n{info}");
        }
    }

    // CLUSTER KEYSLOT answers, with the well-known CRC16 slots and hash tags.
    assert_eq!(cluster.key_slot("foo").unwrap(), 12182);
    assert_eq!(cluster.key_slot("bar").unwrap(), 5061);
    assert_eq!(
        cluster.key_slot("user:{alice}:a").unwrap(),
        cluster.key_slot("{alice}").unwrap()
    );

    // A cluster-aware client reaches all three slot ranges.
    let keys = key_per_node(&cluster);
    assert_eq!(keys.len(), 3);
    let mut con = cluster.client().get_connection().unwrap();
    for (port, key) in &keys {
        redis::cmd("SET").arg(key).arg(port).exec(&mut con).unwrap();
        let value: u16 = redis::cmd("GET").arg(key).query(&mut con).unwrap();
        assert_eq!(value, *port);
    }
    // The async cluster client (crate feature `cluster`) sees the same data.
    #[cfg(feature = "cluster")]
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut con = cluster.client().get_async_connection().await.unwrap();
            for (port, key) in &keys {
                let value: u16 = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                assert_eq!(value, *port);
            }
        });
    // Each key really lives on its owner; the other nodes redirect.
    for node in cluster.nodes() {
        for (port, key) in &keys {
            let reply = node.query::<u16>(&["GET", key]);
            if *port == node.port() {
                assert_eq!(reply.unwrap(), *port);
            } else {
                let err = reply.unwrap_err().to_string();
                assert!(err.to_ascii_uppercase().contains("MOVED"), "{err}");
            }
        }
    }
}

#[test]
fn cluster_node_restart_rejoins_and_heals() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let keys = key_per_node(&cluster);
    let victim = cluster.node(0);
    let victim_key = &keys[&victim.port()];
    victim.kill().unwrap();

    // The survivors detect the failure (cluster-node-timeout 2 s).
    let survivor = cluster.node(1);
    assert!(
        wait_until(DEADLINE, || survivor
            .query::<String>(&["CLUSTER", "INFO"])
            .is_ok_and(|info| info.contains("cluster_state:fail"))),
        "the cluster never noticed the dead node"
    );

    // Same ports, same nodes.conf: the node rejoins with its identity and
    // slots (otherwise the cluster would see 4 nodes and never heal).
    victim.restart().unwrap();
    cluster.wait_until_ok(Duration::from_secs(20)).unwrap();
    let mut con = cluster.client().get_connection().unwrap();
    redis::cmd("SET")
        .arg(victim_key)
        .arg("back")
        .exec(&mut con)
        .unwrap();
    assert_eq!(
        victim.query::<String>(&["GET", victim_key]).unwrap(),
        "back"
    );
}

#[test]
fn cluster_rejects_fewer_than_three_masters() {
    let err = RedisCluster::start_with(2).unwrap_err();
    assert!(matches!(err, HarnessError::InvalidArgument { .. }), "{err}");
}
