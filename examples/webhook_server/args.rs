//! Command-line flags, parsed by hand: typed errors, never a panic.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

pub(crate) const USAGE: &str = "\
usage: webhook_server [flags]

  --addr ADDR             listen address (default 127.0.0.1:8080; port 0 = any free port)
  --addr-file PATH        write the bound address (host:port) to PATH once listening
  --secret TEXT           shared webhook secret, >= 16 bytes (default: $WEBHOOK_SECRET,
                          else \"raceguard-demo-secret\")
  --redis URL             Redis backends (limiters, sessions, cache, webhook ids)
                          instead of memory (needs feature `redis`); the webhook
                          queue is then durable (a Redis stream: accepted webhooks
                          survive a crash and are finished by the next server) but
                          does NOT keep one user's webhooks in order (in memory it
                          does)
  --reclaim-idle SECS     with --redis: jobs idle this long are taken over from a
                          stopped server (at start-up and while running); a job
                          may run at most half of it (default 30)
  --user-limit N          per-user requests per minute, burst N (default 120)
  --global-limit N        requests per second for the whole server, burst N (default 50000)
  --queue-capacity N      bounded webhook queue capacity (default 10000)
  --workers N             queue workers (default 8)
  --external-limit N      the external API stub's own limit, calls per second (default 1000)
  --external-burst N      the stub's burst (default 50)
  --worker-limit N        the workers' limit towards the stub, calls per second,
                          at most --external-limit (default 90% of it)
  --worker-burst N        the workers' burst, at most --external-burst (default 10)
  --no-layers             serve without raceguard's tower layers (no rate limiting or
                          load-shedding layer; sessions and clients built in handlers):
                          for measuring the layers' overhead
  --help                  this text
";

/// The server's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) addr: SocketAddr,
    pub(crate) addr_file: Option<PathBuf>,
    pub(crate) secret: String,
    pub(crate) redis: Option<String>,
    pub(crate) user_limit: u32,
    pub(crate) global_limit: u32,
    pub(crate) queue_capacity: usize,
    pub(crate) workers: usize,
    pub(crate) external_limit: u32,
    pub(crate) external_burst: u32,
    pub(crate) worker_limit: u32,
    pub(crate) worker_burst: u32,
    pub(crate) layers: bool,
    pub(crate) reclaim_idle_secs: u64,
}

/// Why the command line was rejected.
#[derive(Debug)]
pub(crate) enum ArgError {
    Help,
    Unknown(String),
    MissingValue(&'static str),
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Help => f.write_str("help requested"),
            ArgError::Unknown(a) => write!(f, "unknown argument {a:?}"),
            ArgError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgError::Invalid { flag, value, why } => {
                write!(f, "invalid value {value:?} for {flag}: {why}")
            }
        }
    }
}

impl std::error::Error for ArgError {}

fn invalid(flag: &'static str, value: &str, why: impl Into<String>) -> ArgError {
    ArgError::Invalid {
        flag,
        value: value.to_string(),
        why: why.into(),
    }
}

fn number<T>(flag: &'static str, value: &str, min: T, max: T) -> Result<T, ArgError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let n: T = value
        .parse()
        .map_err(|_| invalid(flag, value, "not a whole number"))?;
    if n < min || n > max {
        return Err(invalid(flag, value, format!("must be in {min}..={max}")));
    }
    Ok(n)
}

impl Config {
    /// Parses `args` (without the program name).
    pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Config, ArgError> {
        let mut cfg = Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            addr_file: None,
            secret: std::env::var("WEBHOOK_SECRET")
                .unwrap_or_else(|_| "raceguard-demo-secret".to_string()),
            redis: None,
            user_limit: 120,
            global_limit: 50_000,
            queue_capacity: 10_000,
            workers: 8,
            external_limit: 1_000,
            external_burst: 50,
            worker_limit: 0,
            worker_burst: 10,
            layers: true,
            reclaim_idle_secs: 30,
        };
        let mut worker_limit = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &'static str| -> Result<String, ArgError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args.next().ok_or(ArgError::MissingValue(name)),
                }
            };
            match flag.as_str() {
                "--help" | "-h" => return Err(ArgError::Help),
                "--no-layers" => cfg.layers = false,
                "--addr" => {
                    let v = value("--addr")?;
                    cfg.addr = v
                        .parse()
                        .map_err(|e| invalid("--addr", &v, format!("{e}")))?;
                }
                "--addr-file" => cfg.addr_file = Some(PathBuf::from(value("--addr-file")?)),
                "--secret" => cfg.secret = value("--secret")?,
                "--redis" => {
                    let v = value("--redis")?;
                    if !v.starts_with("redis://") {
                        return Err(invalid("--redis", &v, "expected redis://host:port/"));
                    }
                    cfg.redis = Some(v);
                }
                "--user-limit" => {
                    cfg.user_limit = number("--user-limit", &value("--user-limit")?, 1, 1_000_000)?;
                }
                "--global-limit" => {
                    cfg.global_limit =
                        number("--global-limit", &value("--global-limit")?, 1, 100_000_000)?;
                }
                "--queue-capacity" => {
                    cfg.queue_capacity = number(
                        "--queue-capacity",
                        &value("--queue-capacity")?,
                        1,
                        10_000_000,
                    )?;
                }
                "--workers" => cfg.workers = number("--workers", &value("--workers")?, 1, 1024)?,
                "--external-limit" => {
                    cfg.external_limit = number(
                        "--external-limit",
                        &value("--external-limit")?,
                        1,
                        1_000_000,
                    )?;
                }
                "--external-burst" => {
                    cfg.external_burst = number(
                        "--external-burst",
                        &value("--external-burst")?,
                        1,
                        1_000_000,
                    )?;
                }
                "--worker-limit" => {
                    worker_limit = Some(number(
                        "--worker-limit",
                        &value("--worker-limit")?,
                        1,
                        1_000_000,
                    )?);
                }
                "--worker-burst" => {
                    cfg.worker_burst =
                        number("--worker-burst", &value("--worker-burst")?, 1, 1_000_000)?;
                }
                "--reclaim-idle" => {
                    cfg.reclaim_idle_secs =
                        number("--reclaim-idle", &value("--reclaim-idle")?, 1, 3600)?;
                }
                _ => return Err(ArgError::Unknown(arg)),
            }
        }
        if cfg.secret.len() < 16 {
            return Err(invalid("--secret", "<hidden>", "must be at least 16 bytes"));
        }
        cfg.worker_limit = worker_limit.unwrap_or_else(|| (cfg.external_limit / 10 * 9).max(1));
        if cfg.worker_limit > cfg.external_limit {
            return Err(invalid(
                "--worker-limit",
                &cfg.worker_limit.to_string(),
                format!(
                    "must not exceed the external API's limit ({} per second)",
                    cfg.external_limit
                ),
            ));
        }
        if cfg.worker_burst > cfg.external_burst {
            return Err(invalid(
                "--worker-burst",
                &cfg.worker_burst.to_string(),
                format!("must not exceed --external-burst ({})", cfg.external_burst),
            ));
        }
        #[cfg(not(feature = "redis"))]
        if cfg.redis.is_some() {
            return Err(invalid(
                "--redis",
                cfg.redis.as_deref().unwrap_or_default(),
                "this binary was built without feature `redis`",
            ));
        }
        Ok(cfg)
    }
}
