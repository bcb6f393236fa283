//! Load generator and outside-in invariant checker for the `webhook_server`
//! example (issue 8).
//!
//! Drives N simulated users (default 200) x M requests (default 50)
//! concurrently: signed webhooks (fresh, redelivered, and one badly signed
//! per user), chat session creation, posts and history reads, and attempts
//! to read or write another user's session. Then, if the server runs its
//! rate-limit layer, a dedicated phase pushes one user past its limit.
//!
//! Invariants checked (exit code 1 and a clear message on any violation):
//!
//! - no 5xx; no 429 below the configured limits (the normal phase is
//!   checked to stay below them before it starts), and 429 (with
//!   `Retry-After`, `RateLimit-Policy`, `RateLimit`) exactly when one user
//!   exceeds its limit, while other users are unaffected;
//! - no user ever sees another user's data: a history holds exactly the
//!   user's own messages, in order; another user's session answers 403;
//! - the external API stub never returned 429 and never saw a foreign
//!   identity;
//! - every accepted webhook is processed exactly once (`/stats` polled,
//!   bounded, until processed == accepted); redeliveries are not re-queued.
//!
//! Prints requests/s and p50/p99 latency of the normal phase, and one
//! machine-readable `RESULT` line.
//!
//! `--survive-restart` (Redis mode, used by `scripts/e2e.sh` while it kills
//! the server with SIGKILL and restarts it on the same Redis): webhooks only,
//! each retried after a transport error (bounded) as a real sender does, and
//! checked against the server's durable counters: every webhook id sent is
//! accepted exactly once (a fresh id may answer `duplicate` only after an
//! attempt whose reply was lost), and processed exactly once.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --users 200 --requests 50
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

const USAGE: &str = "\
usage: loadgen --url http://127.0.0.1:PORT [flags]

  --url URL               the webhook_server's base URL (required)
  --users N               concurrent simulated users (default 200)
  --requests N            requests per user in the normal phase (default 50, >= 10)
  --secret TEXT           the server's webhook secret (default: $WEBHOOK_SECRET,
                          else \"raceguard-demo-secret\")
  --drain-timeout SECS    how long to wait for processed == accepted (default 120)
  --skip-limit-phase      do not run the phase that exceeds one user's limit
  --survive-restart       webhooks only, retried across a server crash/restart;
                          checked against the durable counters (--redis servers)
  --help                  this text
";

#[derive(Debug, Clone)]
struct Args {
    url: String,
    users: usize,
    requests: usize,
    secret: String,
    drain_timeout: Duration,
    limit_phase: bool,
    survive_restart: bool,
}

#[derive(Debug)]
enum ArgError {
    Help,
    Unknown(String),
    MissingValue(&'static str),
    Invalid(&'static str, String, &'static str),
    MissingUrl,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Help => f.write_str("help requested"),
            ArgError::Unknown(a) => write!(f, "unknown argument {a:?}"),
            ArgError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgError::Invalid(flag, v, why) => write!(f, "invalid value {v:?} for {flag}: {why}"),
            ArgError::MissingUrl => f.write_str("--url is required"),
        }
    }
}

fn parse_args(raw: impl IntoIterator<Item = String>) -> Result<Args, ArgError> {
    let mut url = None;
    let mut args = Args {
        url: String::new(),
        users: 200,
        requests: 50,
        secret: std::env::var("WEBHOOK_SECRET")
            .unwrap_or_else(|_| "raceguard-demo-secret".to_string()),
        drain_timeout: Duration::from_secs(120),
        limit_phase: true,
        survive_restart: false,
    };
    let mut it = raw.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &'static str| match inline.clone() {
            Some(v) => Ok(v),
            None => it.next().ok_or(ArgError::MissingValue(name)),
        };
        let count = |name: &'static str, v: String, min: usize, max: usize| match v.parse::<usize>()
        {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Ok(_) => Err(ArgError::Invalid(name, v, "out of range")),
            Err(_) => Err(ArgError::Invalid(name, v, "not a whole number")),
        };
        match flag.as_str() {
            "--help" | "-h" => return Err(ArgError::Help),
            "--url" => {
                let v = value("--url")?;
                if !v.starts_with("http://") {
                    return Err(ArgError::Invalid("--url", v, "expected http://host:port"));
                }
                url = Some(v.trim_end_matches('/').to_string());
            }
            "--users" => args.users = count("--users", value("--users")?, 1, 100_000)?,
            "--requests" => {
                args.requests = count("--requests", value("--requests")?, 10, 1_000_000)?;
            }
            "--secret" => args.secret = value("--secret")?,
            "--drain-timeout" => {
                let secs = count("--drain-timeout", value("--drain-timeout")?, 1, 3600)?;
                args.drain_timeout = Duration::from_secs(secs as u64);
            }
            "--skip-limit-phase" => args.limit_phase = false,
            "--survive-restart" => args.survive_restart = true,
            _ => return Err(ArgError::Unknown(arg)),
        }
    }
    args.url = url.ok_or(ArgError::MissingUrl)?;
    Ok(args)
}

/// Violations found, with a cap on how many are kept verbatim.
#[derive(Debug, Default)]
struct Violations {
    total: u64,
    first: Vec<String>,
}

impl Violations {
    fn add(&mut self, msg: String) {
        self.total += 1;
        if self.first.len() < 25 {
            self.first.push(msg);
        }
    }
    fn merge(&mut self, other: Violations) {
        self.total += other.total;
        for m in other.first {
            if self.first.len() < 25 {
                self.first.push(m);
            }
        }
    }
}

/// What one user saw.
#[derive(Debug, Default)]
struct UserReport {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    accepted: u64,
    redeliveries: u64,
    bad_signatures: u64,
    cross_403: u64,
    history_reads: u64,
    violations: Violations,
}

struct Ctx {
    http: reqwest::Client,
    url: String,
    run: String,
    secret: Vec<u8>,
    requests: usize,
    /// Sessions created so far, for cross-user attempts: (user, session id).
    sessions: Mutex<Vec<(String, String)>>,
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let mut s = String::from("sha256=");
    for b in mac.finalize().into_bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // Not security relevant: only makes run ids unique.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return format!("{t:x}");
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

enum Step {
    Webhook {
        id: String,
        valid_sig: bool,
    },
    Post(String),
    Get,
    Cross {
        owner: String,
        sid: String,
        post: bool,
    },
    CreateSession,
}

impl UserReport {
    /// Sends one request, records latency and status; returns status and
    /// parsed JSON body (Null if none).
    async fn send(
        &mut self,
        ctx: &Ctx,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> Option<(StatusCode, Value, reqwest::header::HeaderMap)> {
        let start = Instant::now();
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                self.violations.add(format!("{what}: transport error: {e}"));
                return None;
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        let elapsed = start.elapsed();
        self.latencies_us
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        *self.statuses.entry(status.as_u16()).or_default() += 1;
        let _ = ctx;
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_server_error() {
            self.violations
                .add(format!("{what}: server error {status}: {json}"));
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            self.violations.add(format!(
                "{what}: 429 below the configured limits (ratelimit: {:?})",
                headers.get("ratelimit")
            ));
        }
        Some((status, json, headers))
    }
}

async fn user_task(ctx: Arc<Ctx>, index: usize) -> UserReport {
    let me = format!("{}-u{index}", ctx.run);
    let mut r = UserReport::default();
    let mut my_texts: Vec<String> = Vec::new();
    let mut session: Option<String> = None;
    let mut last_accepted: Option<String> = None;
    for k in 0..ctx.requests {
        let step = match (k, k % 10) {
            (0, _) => Step::CreateSession,
            (1, _) => Step::Webhook {
                id: format!("{me}-bad"),
                valid_sig: false,
            },
            (_, 0..=3) => Step::Webhook {
                id: format!("{me}-w{k}"),
                valid_sig: true,
            },
            (_, 4) => match &last_accepted {
                Some(id) => Step::Webhook {
                    id: id.clone(),
                    valid_sig: true,
                },
                None => Step::Get,
            },
            (_, 5 | 6) => Step::Post(format!("{me} says #{k}")),
            (_, 7 | 8) => Step::Get,
            _ => {
                let other = {
                    let all = ctx.sessions.lock().unwrap_or_else(|e| e.into_inner());
                    let n = all.len();
                    (0..n)
                        .map(|j| &all[(index * 7 + k + j) % n])
                        .find(|(owner, _)| *owner != me)
                        .cloned()
                };
                match other {
                    Some((owner, sid)) => Step::Cross {
                        owner,
                        sid,
                        post: k % 20 == 9,
                    },
                    None => Step::Get,
                }
            }
        };
        match step {
            Step::CreateSession => {
                let rb = ctx
                    .http
                    .post(format!("{}/chat/sessions", ctx.url))
                    .header("x-user-id", &me);
                let Some((status, json, _)) = r.send(&ctx, rb, "create session").await else {
                    continue;
                };
                match (status, json["session_id"].as_str()) {
                    (StatusCode::CREATED, Some(sid)) => {
                        session = Some(sid.to_string());
                        ctx.sessions
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((me.clone(), sid.to_string()));
                    }
                    _ => r
                        .violations
                        .add(format!("{me}: create session: {status} {json}")),
                }
            }
            Step::Webhook { id, valid_sig } => {
                let body = serde_json::to_vec(&json!({
                    "id": id,
                    "event": "message.created",
                    "data": { "user": me, "n": k },
                }))
                .unwrap_or_default();
                let signature = if valid_sig {
                    sign(&ctx.secret, &body)
                } else {
                    sign(b"not-the-shared-secret", &body)
                };
                let rb = ctx
                    .http
                    .post(format!("{}/webhooks/bluebubbles", ctx.url))
                    .header("x-user-id", &me)
                    .header("x-signature", signature)
                    .header("content-type", "application/json")
                    .body(body);
                let redelivery = last_accepted.as_deref() == Some(id.as_str());
                let Some((status, json, _)) = r.send(&ctx, rb, "webhook").await else {
                    continue;
                };
                match (valid_sig, redelivery, status) {
                    (false, _, StatusCode::UNAUTHORIZED) => r.bad_signatures += 1,
                    (true, false, StatusCode::ACCEPTED) => {
                        r.accepted += 1;
                        last_accepted = Some(id);
                    }
                    (true, true, StatusCode::OK) if json["duplicate"] == true => {
                        r.redeliveries += 1;
                        last_accepted = None;
                    }
                    _ => r.violations.add(format!(
                        "{me}: webhook {id} (signed: {valid_sig}, redelivery: {redelivery}) answered {status} {json}"
                    )),
                }
            }
            Step::Post(text) => {
                let Some(sid) = &session else { continue };
                let rb = ctx
                    .http
                    .post(format!("{}/chat/{sid}/messages", ctx.url))
                    .header("x-user-id", &me)
                    .json(&json!({ "text": text }));
                let Some((status, json, _)) = r.send(&ctx, rb, "post message").await else {
                    continue;
                };
                if status == StatusCode::CREATED {
                    my_texts.push(text);
                    if json["seq"].as_u64() != Some(my_texts.len() as u64) {
                        r.violations.add(format!(
                            "{me}: post got seq {} but it is message {} of the session",
                            json["seq"],
                            my_texts.len()
                        ));
                    }
                } else {
                    r.violations
                        .add(format!("{me}: post message answered {status} {json}"));
                }
            }
            Step::Get => {
                let Some(sid) = &session else { continue };
                let rb = ctx
                    .http
                    .get(format!("{}/chat/{sid}/messages", ctx.url))
                    .header("x-user-id", &me);
                let Some((status, json, _)) = r.send(&ctx, rb, "get messages").await else {
                    continue;
                };
                if status != StatusCode::OK {
                    r.violations
                        .add(format!("{me}: get messages answered {status} {json}"));
                    continue;
                }
                r.history_reads += 1;
                let messages = json["messages"].as_array().cloned().unwrap_or_default();
                for m in &messages {
                    if m["author"].as_str() != Some(me.as_str()) {
                        r.violations.add(format!(
                            "{me}: FOREIGN DATA: history of my session holds a message of {}",
                            m["author"]
                        ));
                    }
                }
                let texts: Vec<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
                if texts != my_texts.iter().map(String::as_str).collect::<Vec<_>>() {
                    r.violations.add(format!(
                        "{me}: history is {texts:?}, expected exactly my {} messages {my_texts:?}",
                        my_texts.len()
                    ));
                }
            }
            Step::Cross { owner, sid, post } => {
                let url = format!("{}/chat/{sid}/messages", ctx.url);
                let rb = if post {
                    ctx.http
                        .post(url)
                        .json(&json!({ "text": format!("{me} intrudes") }))
                } else {
                    ctx.http.get(url)
                }
                .header("x-user-id", &me);
                let Some((status, json, _)) = r.send(&ctx, rb, "cross-user access").await else {
                    continue;
                };
                if status == StatusCode::FORBIDDEN {
                    r.cross_403 += 1;
                } else {
                    r.violations.add(format!(
                        "{me}: {} of {owner}'s session answered {status} {json} (expected 403)",
                        if post { "POST" } else { "GET" }
                    ));
                }
            }
        }
    }
    r
}

async fn get_stats(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let resp = http
        .get(format!("{url}/stats"))
        .send()
        .await
        .map_err(|e| format!("GET /stats: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET /stats answered {}", resp.status()));
    }
    resp.json().await.map_err(|e| format!("GET /stats: {e}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Pushes one fresh user past its limit: exactly `burst` (plus what
/// replenished meanwhile) admitted, then 429 with the headers; another user
/// is unaffected.
async fn limit_phase(ctx: &Ctx, stats: &Value, v: &mut Violations) -> String {
    let burst = n(&stats["limits"], "user_burst");
    let period = n(&stats["limits"], "user_period_secs").max(1);
    let probe = format!("{}-probe", ctx.run);
    let start = Instant::now();
    let (mut admitted, mut limited, mut first_429) = (0u64, 0u64, None);
    for i in 0..burst + 10 {
        let resp = ctx
            .http
            .post(format!("{}/chat/sessions", ctx.url))
            .header("x-user-id", &probe)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                v.add(format!("limit phase: transport error: {e}"));
                return String::new();
            }
        };
        match resp.status() {
            StatusCode::CREATED => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                first_429.get_or_insert(i);
                let h = resp.headers();
                for name in ["retry-after", "ratelimit-policy", "ratelimit"] {
                    if !h.contains_key(name) {
                        v.add(format!("limit phase: 429 without a {name} header"));
                    }
                }
            }
            s => v.add(format!("limit phase: request {i} answered {s}")),
        }
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let replenished = (start.elapsed().as_secs_f64() * burst as f64 / period as f64).ceil() as u64;
    if admitted < burst || admitted > burst + replenished + 1 {
        v.add(format!(
            "limit phase: {admitted} admitted for a burst of {burst} (+{replenished} replenished)"
        ));
    }
    if limited == 0 {
        v.add(format!(
            "limit phase: {} requests of one user, none got 429",
            burst + 10
        ));
    }
    if first_429.is_some_and(|i| i < burst) {
        v.add(format!(
            "limit phase: first 429 at request {} of a burst of {burst}",
            first_429.unwrap_or_default()
        ));
    }
    let other = ctx
        .http
        .post(format!("{}/chat/sessions", ctx.url))
        .header("x-user-id", format!("{}-bystander", ctx.run))
        .send()
        .await;
    match other {
        Ok(r) if r.status() == StatusCode::CREATED => {}
        Ok(r) => v.add(format!(
            "limit phase: another user was answered {} while one user was limited",
            r.status()
        )),
        Err(e) => v.add(format!("limit phase: transport error: {e}")),
    }
    format!(
        "limit phase: one user sent {}: {admitted} admitted (burst {burst}), {limited} got 429 from request {}; another user unaffected",
        burst + 10,
        first_429.map_or("-".to_string(), |i| (i + 1).to_string())
    )
}

async fn run(args: Args) -> Result<Violations, String> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.users.min(1024))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    if args.survive_restart {
        return survive_restart(args, http).await;
    }
    let before = get_stats(&http, &args.url).await?;
    let layers = before["layers"].as_bool().unwrap_or(false);
    let limits = &before["limits"];
    let total = (args.users * args.requests) as u64;
    if layers {
        // The normal phase must stay below every configured limit, so that
        // any 429 in it is a violation.
        if args.requests as u64 > n(limits, "user_burst") {
            return Err(format!(
                "--requests {} exceeds the server's per-user burst {}: start the server with --user-limit >= {}",
                args.requests,
                n(limits, "user_burst"),
                args.requests
            ));
        }
        if total + 32 > n(limits, "global_burst") {
            return Err(format!(
                "{total} requests exceed the server's global burst {}: start it with --global-limit >= {}",
                n(limits, "global_burst"),
                total + 32
            ));
        }
    }
    let ctx = Arc::new(Ctx {
        http: http.clone(),
        url: args.url.clone(),
        run: format!("lg{}", random_hex(6)),
        secret: args.secret.clone().into_bytes(),
        requests: args.requests,
        sessions: Mutex::new(Vec::new()),
    });
    println!(
        "loadgen: {} users x {} requests against {} (backend {}, layers {})",
        args.users,
        args.requests,
        args.url,
        before["backend"].as_str().unwrap_or("?"),
        if layers { "on" } else { "off" }
    );

    let start = Instant::now();
    let tasks: Vec<_> = (0..args.users)
        .map(|i| tokio::spawn(user_task(ctx.clone(), i)))
        .collect();
    let mut all = UserReport::default();
    let mut violations = Violations::default();
    for t in tasks {
        match t.await {
            Ok(r) => {
                all.latencies_us.extend(r.latencies_us);
                for (s, c) in r.statuses {
                    *all.statuses.entry(s).or_default() += c;
                }
                all.accepted += r.accepted;
                all.redeliveries += r.redeliveries;
                all.bad_signatures += r.bad_signatures;
                all.cross_403 += r.cross_403;
                all.history_reads += r.history_reads;
                violations.merge(r.violations);
            }
            Err(e) => violations.add(format!("a user task failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    all.latencies_us.sort_unstable();
    let sent = all.latencies_us.len();
    #[allow(clippy::cast_precision_loss)]
    let rps = sent as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (
        percentile(&all.latencies_us, 0.50),
        percentile(&all.latencies_us, 0.99),
    );
    println!(
        "normal phase: {sent} requests in {:.2} s: {rps:.0} requests/s, latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64(),
        percentile(&all.latencies_us, 1.0)
    );
    println!(
        "  statuses {:?}; webhooks accepted {}, redeliveries answered {}, bad signatures refused {}; cross-user attempts refused {}; history reads checked {}",
        all.statuses,
        all.accepted,
        all.redeliveries,
        all.bad_signatures,
        all.cross_403,
        all.history_reads
    );

    if layers && args.limit_phase {
        let line = limit_phase(&ctx, &before, &mut violations).await;
        println!("{line}");
    } else {
        println!(
            "limit phase: skipped (server layers {})",
            if layers { "on" } else { "off" }
        );
    }

    // Every accepted webhook processed exactly once: wait (bounded) for the
    // queue to drain.
    let drain_start = Instant::now();
    let after = loop {
        let s = get_stats(&http, &args.url).await?;
        let settled =
            n(&s, "processed") + n(&s, "failed") >= n(&s, "accepted") && n(&s, "queue_depth") == 0;
        if settled || drain_start.elapsed() > args.drain_timeout {
            if !settled {
                violations.add(format!(
                    "queue did not drain within {:?}: accepted {}, processed {}, depth {}",
                    args.drain_timeout,
                    n(&s, "accepted"),
                    n(&s, "processed"),
                    n(&s, "queue_depth")
                ));
            }
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "drain: processed == accepted after {:.2} s; server stats {after}",
        drain_start.elapsed().as_secs_f64()
    );
    let delta = |k: &str| n(&after, k).saturating_sub(n(&before, k));
    let mut check = |ok: bool, msg: String| {
        if !ok {
            violations.add(msg);
        }
    };
    check(
        delta("accepted") == all.accepted,
        format!(
            "server accepted {} webhooks, loadgen saw {} accepted",
            delta("accepted"),
            all.accepted
        ),
    );
    check(
        n(&after, "processed") == n(&after, "accepted"),
        format!(
            "processed {} != accepted {}",
            n(&after, "processed"),
            n(&after, "accepted")
        ),
    );
    check(
        n(&after, "duplicates") == 0,
        format!("{} webhooks were processed twice", n(&after, "duplicates")),
    );
    check(
        n(&after, "failed") == 0,
        format!("{} webhooks failed", n(&after, "failed")),
    );
    check(
        delta("redeliveries") == all.redeliveries,
        format!(
            "server counted {} redeliveries, loadgen sent {}",
            delta("redeliveries"),
            all.redeliveries
        ),
    );
    check(
        n(&after, "external_429s") == 0,
        format!(
            "the external API stub answered 429 {} times: the workers exceeded its limit",
            n(&after, "external_429s")
        ),
    );
    check(
        n(&after, "external_identity_mismatches") == 0,
        format!(
            "the external API saw {} calls with another user's credentials",
            n(&after, "external_identity_mismatches")
        ),
    );
    check(
        delta("external_calls") >= all.accepted,
        format!(
            "{} external calls for {} accepted webhooks",
            delta("external_calls"),
            all.accepted
        ),
    );
    println!(
        "RESULT requests={sent} seconds={:.3} rps={rps:.0} p50_ms={p50:.3} p99_ms={p99:.3} accepted={} violations={}",
        elapsed.as_secs_f64(),
        all.accepted,
        violations.total
    );
    Ok(violations)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(ArgError::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(v) if v.total == 0 => {
            println!("loadgen: all invariants held");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            eprintln!("loadgen: {} INVARIANT VIOLATIONS; first ones:", v.total);
            for m in &v.first {
                eprintln!("  - {m}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

/// How long `--survive-restart` retries one webhook (or polls `/stats`)
/// while the server is down.
const OUTAGE_BOUND: Duration = Duration::from_secs(60);
/// The pause between those retries (a backoff, bounded by `OUTAGE_BOUND`).
const OUTAGE_BACKOFF: Duration = Duration::from_millis(100);

/// What one user saw in `--survive-restart`.
#[derive(Debug, Default)]
struct SurviveReport {
    fresh: u64,
    accepted: u64,
    accepted_before_lost_reply: u64,
    redeliveries: u64,
    transport_errors: u64,
    violations: Violations,
}

/// One user's webhooks: ids `w0, w1, ...`; every fifth request redelivers
/// the previous id. A transport error (the server died, or is restarting)
/// is retried with the same id until a definite answer.
async fn survive_user(ctx: Arc<Ctx>, index: usize) -> SurviveReport {
    let me = format!("{}-u{index}", ctx.run);
    let mut r = SurviveReport::default();
    for k in 0..ctx.requests {
        let redelivery = k % 5 == 4;
        let id = format!("{me}-w{}", if redelivery { k - 1 } else { k });
        if !redelivery {
            r.fresh += 1;
        }
        let body = serde_json::to_vec(&json!({
            "id": id,
            "event": "message.created",
            "data": { "user": me, "n": k },
        }))
        .unwrap_or_default();
        let signature = sign(&ctx.secret, &body);
        let give_up = Instant::now() + OUTAGE_BOUND;
        let mut reply_lost = false;
        loop {
            let sent = ctx
                .http
                .post(format!("{}/webhooks/bluebubbles", ctx.url))
                .header("x-user-id", &me)
                .header("x-signature", &signature)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    r.transport_errors += 1;
                    reply_lost = true;
                    if Instant::now() > give_up {
                        r.violations.add(format!(
                            "{me}: webhook {id}: no answer within {OUTAGE_BOUND:?}: {e}"
                        ));
                        break;
                    }
                    tokio::time::sleep(OUTAGE_BACKOFF).await;
                    continue;
                }
            };
            let status = resp.status();
            let json: Value = resp.json().await.unwrap_or(Value::Null);
            match status {
                StatusCode::ACCEPTED if !redelivery => r.accepted += 1,
                StatusCode::OK if json["duplicate"] == true && redelivery => r.redeliveries += 1,
                // The earlier attempt was accepted; its reply died with the server.
                StatusCode::OK if json["duplicate"] == true && reply_lost => {
                    r.accepted_before_lost_reply += 1;
                }
                _ => r.violations.add(format!(
                    "{me}: webhook {id} (redelivery: {redelivery}, an earlier reply lost: {reply_lost}) answered {status} {json}"
                )),
            }
            break;
        }
    }
    r
}

/// `--survive-restart`: see the module docs.
async fn survive_restart(args: Args, http: reqwest::Client) -> Result<Violations, String> {
    let before = get_stats(&http, &args.url).await?;
    if before["durable"].is_null() {
        return Err("--survive-restart needs a server with --redis (no durable counters)".into());
    }
    let ctx = Arc::new(Ctx {
        http: http.clone(),
        url: args.url.clone(),
        run: format!("lg{}", random_hex(6)),
        secret: args.secret.clone().into_bytes(),
        requests: args.requests,
        sessions: Mutex::new(Vec::new()),
    });
    println!(
        "loadgen: survive-restart: {} users x {} webhooks against {}",
        args.users, args.requests, args.url
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.users)
        .map(|i| tokio::spawn(survive_user(ctx.clone(), i)))
        .collect();
    let mut all = SurviveReport::default();
    let mut violations = Violations::default();
    for t in tasks {
        match t.await {
            Ok(r) => {
                all.fresh += r.fresh;
                all.accepted += r.accepted;
                all.accepted_before_lost_reply += r.accepted_before_lost_reply;
                all.redeliveries += r.redeliveries;
                all.transport_errors += r.transport_errors;
                violations.merge(r.violations);
            }
            Err(e) => violations.add(format!("a user task failed: {e}")),
        }
    }
    println!(
        "survive-restart: sent in {:.2} s: {} fresh webhook ids: {} answered 202, {} answered duplicate after a lost reply (accepted by the killed server); {} redeliveries answered duplicate; {} transport errors retried",
        start.elapsed().as_secs_f64(),
        all.fresh,
        all.accepted,
        all.accepted_before_lost_reply,
        all.redeliveries,
        all.transport_errors
    );
    // Every id was accepted exactly once, so the durable processed counter
    // must grow by exactly the number of ids: poll (bounded) until it has
    // and the queue is empty, through a possible restart.
    let durable = |s: &Value, k: &str| n(&s["durable"], k);
    let drain_start = Instant::now();
    let after = loop {
        let settled = match get_stats(&http, &args.url).await {
            Ok(s) => {
                let done = durable(&s, "processed").saturating_sub(durable(&before, "processed"))
                    >= all.fresh
                    && n(&s, "queue_depth") == 0;
                (done || drain_start.elapsed() > args.drain_timeout).then_some(s)
            }
            Err(e) if drain_start.elapsed() > args.drain_timeout => return Err(e),
            Err(_) => None,
        };
        if let Some(s) = settled {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "drain: after {:.2} s; server stats {after}",
        drain_start.elapsed().as_secs_f64()
    );
    let processed = durable(&after, "processed").saturating_sub(durable(&before, "processed"));
    let duplicates = durable(&after, "duplicates").saturating_sub(durable(&before, "duplicates"));
    let mut check = |ok: bool, msg: String| {
        if !ok {
            violations.add(msg);
        }
    };
    check(
        all.accepted + all.accepted_before_lost_reply == all.fresh,
        format!(
            "{} of {} webhook ids were never accepted",
            all.fresh
                .saturating_sub(all.accepted + all.accepted_before_lost_reply),
            all.fresh
        ),
    );
    check(
        processed == all.fresh,
        format!(
            "durable processed grew by {processed} for {} accepted webhook ids",
            all.fresh
        ),
    );
    check(
        duplicates == 0,
        format!("{duplicates} webhooks were processed twice"),
    );
    check(
        n(&after, "queue_depth") == 0,
        format!("{} jobs still queued", n(&after, "queue_depth")),
    );
    check(
        n(&after, "failed") == 0,
        format!("{} webhooks failed", n(&after, "failed")),
    );
    check(
        n(&after, "external_429s") == 0,
        format!(
            "the external API stub answered 429 {} times",
            n(&after, "external_429s")
        ),
    );
    check(
        n(&after, "external_identity_mismatches") == 0,
        format!(
            "the external API saw {} calls with another user's credentials",
            n(&after, "external_identity_mismatches")
        ),
    );
    println!(
        "SURVIVE fresh={} accepted={} accepted_before_lost_reply={} transport_errors={} durable_processed={processed} durable_duplicates={duplicates} violations={}",
        all.fresh,
        all.accepted,
        all.accepted_before_lost_reply,
        all.transport_errors,
        violations.total
    );
    Ok(violations)
}
