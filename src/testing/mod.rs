//! Test utilities: real `redis-server` processes for your own tests.
//!
//! Enabled by the `test-util` feature. Everything here is meant for tests
//! (yours and raceguard's), not for production code.
//!
//! - [`RedisServer`]: a private `redis-server` on a free loopback port, with
//!   its own temporary data directory, and fault injection: [`stop`],
//!   [`kill`], [`restart`] (same port, same config, same data directory),
//!   [`pause`]/[`resume`] (a true process pause with `SIGSTOP`/`SIGCONT`)
//!   and [`client_pause`].
//! - [`RedisServers`]: N independent servers, e.g. for Redlock.
//! - [`RedisCluster`]: a Redis Cluster of N masters (3 by default), formed
//!   with `redis-cli --cluster create`.
//!
//! # No stray processes
//!
//! Each `redis-server` is started by a tiny `sh` wrapper whose stdin is a
//! pipe held by the [`RedisServer`]. When that pipe closes, because the
//! server was dropped, because the test panicked, or because the whole test
//! process was killed with `SIGKILL`, the wrapper kills `redis-server` and
//! reaps it. Dropping a [`RedisServer`] waits for that to happen.
//!
//! # Skipping when Redis is not installed
//!
//! The `start_or_skip` constructors ([`RedisServer::start_or_skip`],
//! [`RedisServers::start_or_skip`], [`RedisCluster::start_or_skip`]) return
//! `None` and print a one-line notice to stderr when `redis-server` (or
//! `redis-cli`, for the cluster) is not on `PATH`, so a test can skip itself.
//! Set the environment variable `RACEGUARD_REQUIRE_REDIS=1` (in CI) to turn
//! that skip into a panic. Any other start failure always panics: a broken
//! environment must fail, not skip. See [`SkipPolicy`].
//!
//! Only `127.0.0.1` is ever bound or contacted.
//!
//! ```
//! use raceguard::testing::RedisServer;
//!
//! let Some(server) = RedisServer::start_or_skip() else { return Ok(()) };
//! server.cmd(&["SET", "greeting", "hello"])?;
//! let value: String = server.query(&["GET", "greeting"])?;
//! assert_eq!(value, "hello");
//!
//! // Simulate a crash and a recovery on the same port.
//! let port = server.port();
//! server.kill()?;
//! assert!(!server.is_running());
//! server.restart()?;
//! assert_eq!(server.port(), port);
//! assert_eq!(server.query::<Option<String>>(&["GET", "greeting"])?, None);
//! # Ok::<(), raceguard::testing::HarnessError>(())
//! ```
//!
//! [`stop`]: RedisServer::stop
//! [`kill`]: RedisServer::kill
//! [`restart`]: RedisServer::restart
//! [`pause`]: RedisServer::pause
//! [`resume`]: RedisServer::resume
//! [`client_pause`]: RedisServer::client_pause

mod cluster;
mod redis_server;
// The forced-interleaving helper (`mod sequencer;`) is added separately.

pub use cluster::RedisCluster;
pub use redis_server::{RedisServer, RedisServerBuilder, RedisServers};

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable that turns "Redis is not installed, skip" into a
/// panic. Set it to `1` (or `true`/`yes`) in CI, where a skipped Redis test
/// would hide a broken setup.
///
/// ```
/// assert_eq!(raceguard::testing::REQUIRE_REDIS_ENV, "RACEGUARD_REQUIRE_REDIS");
/// ```
pub const REQUIRE_REDIS_ENV: &str = "RACEGUARD_REQUIRE_REDIS";

/// Errors of the test harness.
///
/// This is deliberately not [`crate::Error`]: harness failures are test
/// infrastructure failures and carry what is needed to debug them (the
/// server's log tail, the command output ...).
///
/// ```
/// use raceguard::testing::{HarnessError, RedisServer};
///
/// let err = RedisServer::builder()
///     .redis_server_binary("/nonexistent/redis-server")
///     .start()
///     .unwrap_err();
/// assert!(matches!(err, HarnessError::NotInstalled { .. }));
/// assert!(err.to_string().contains("Debian/Ubuntu package: redis-server"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A required program is not installed (not on `PATH`, or the explicit
    /// path does not exist).
    #[error(
        "`{binary}` is not installed or not on PATH (Debian/Ubuntu package: {})",
        package_for(binary)
    )]
    NotInstalled {
        /// The program, e.g. `"redis-server"` or `"redis-cli"`.
        binary: String,
    },

    /// `redis-server` exited early or never answered `PING`.
    #[error(
        "redis-server on 127.0.0.1:{port} failed to start: {reason}\n--- log tail ---\n{log_tail}"
    )]
    Start {
        /// The port it was started on.
        port: u16,
        /// What went wrong.
        reason: String,
        /// The last lines of its log and of its stdout/stderr.
        log_tail: String,
    },

    /// Something did not happen before its deadline.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
    },

    /// An operation needs a running server, but it is stopped.
    #[error("redis-server on 127.0.0.1:{port} is not running")]
    NotRunning {
        /// The server's port.
        port: u16,
    },

    /// An argument given to the harness was invalid (a config line with a
    /// newline, an empty command, too few cluster masters ...).
    #[error("invalid harness argument: {what}")]
    InvalidArgument {
        /// What was wrong.
        what: String,
    },

    /// `redis-cli --cluster create` failed.
    #[error("redis-cli --cluster create failed ({status}):\n{output}")]
    ClusterCreate {
        /// How it ended (exit status, or "timed out").
        status: String,
        /// Its combined output.
        output: String,
    },

    /// An I/O error (spawning a process, writing the config file ...).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A Redis command failed.
    #[error("redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The Debian/Ubuntu package that provides `binary`.
fn package_for(binary: &str) -> &'static str {
    let name = Path::new(binary)
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or(binary);
    match name {
        "redis-cli" | "redis-benchmark" => "redis-tools",
        _ => "redis-server",
    }
}

/// Looks `name` up in a `PATH`-style list of directories and returns the
/// first match that is an executable file.
///
/// Taking the list as an argument makes the lookup testable without changing
/// the process environment; [`find_binary`] uses the real `PATH`.
///
/// ```
/// use raceguard::testing::find_binary_in;
/// use std::ffi::OsStr;
///
/// assert_eq!(find_binary_in(OsStr::new(""), "redis-server"), None);
/// # #[cfg(unix)]
/// assert!(find_binary_in(OsStr::new("/nonexistent:/bin"), "sh").is_some());
/// ```
pub fn find_binary_in(path_var: &OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        // An empty entry means "the current directory": never look there.
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Looks `name` up in the process's `PATH`.
///
/// ```
/// use raceguard::testing::find_binary;
/// # #[cfg(unix)]
/// assert!(find_binary("sh").is_some());
/// assert!(find_binary("surely-not-a-real-program-xyz").is_none());
/// ```
pub fn find_binary(name: &str) -> Option<PathBuf> {
    find_binary_in(&std::env::var_os("PATH").unwrap_or_default(), name)
}

pub(crate) fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Whether `redis-server` is on `PATH`.
///
/// ```
/// if !raceguard::testing::redis_server_available() {
///     eprintln!("no redis-server here");
/// }
/// ```
pub fn redis_server_available() -> bool {
    find_binary("redis-server").is_some()
}

/// Decides whether a Redis test runs, skips, or fails when the Redis
/// programs are missing.
///
/// [`SkipPolicy::from_env`] reads `PATH` and [`REQUIRE_REDIS_ENV`]; the
/// `start_or_skip` constructors use it. [`SkipPolicy::from_vars`] builds the
/// same policy from explicit values, for tests of the policy itself.
///
/// ```
/// use raceguard::testing::SkipPolicy;
/// use std::ffi::OsStr;
///
/// // An empty PATH has no redis-server: skip (prints a notice) ...
/// let lenient = SkipPolicy::from_vars(Some(OsStr::new("")), None);
/// assert!(!lenient.should_run(&["redis-server"]));
///
/// // ... unless Redis is required, then it panics.
/// let strict = SkipPolicy::from_vars(Some(OsStr::new("")), Some(OsStr::new("1")));
/// assert!(std::panic::catch_unwind(|| strict.should_run(&["redis-server"])).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipPolicy {
    path: OsString,
    require_redis: bool,
}

impl SkipPolicy {
    /// The policy of this process: `PATH` and [`REQUIRE_REDIS_ENV`].
    ///
    /// ```
    /// let policy = raceguard::testing::SkipPolicy::from_env();
    /// let _ = policy.require_redis();
    /// ```
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::var_os("PATH").as_deref(),
            std::env::var_os(REQUIRE_REDIS_ENV).as_deref(),
        )
    }

    /// A policy from explicit values of `PATH` and of
    /// [`REQUIRE_REDIS_ENV`] (`None` meaning unset). The requirement is on
    /// when the value is `1`, `true` or `yes` (any case).
    ///
    /// ```
    /// use raceguard::testing::SkipPolicy;
    /// use std::ffi::OsStr;
    ///
    /// assert!(SkipPolicy::from_vars(None, Some(OsStr::new("1"))).require_redis());
    /// assert!(SkipPolicy::from_vars(None, Some(OsStr::new("TRUE"))).require_redis());
    /// assert!(!SkipPolicy::from_vars(None, Some(OsStr::new("0"))).require_redis());
    /// assert!(!SkipPolicy::from_vars(None, None).require_redis());
    /// ```
    pub fn from_vars(path_var: Option<&OsStr>, require_redis: Option<&OsStr>) -> Self {
        let require_redis = require_redis
            .and_then(OsStr::to_str)
            .map(|v| {
                let v = v.trim();
                v == "1" || v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("yes")
            })
            .unwrap_or(false);
        SkipPolicy {
            path: path_var.map(OsStr::to_os_string).unwrap_or_default(),
            require_redis,
        }
    }

    /// Whether missing programs are a failure rather than a skip.
    ///
    /// ```
    /// use raceguard::testing::SkipPolicy;
    /// assert!(!SkipPolicy::from_vars(None, None).require_redis());
    /// ```
    pub fn require_redis(&self) -> bool {
        self.require_redis
    }

    /// The programs of `binaries` that this policy's `PATH` lacks.
    ///
    /// ```
    /// use raceguard::testing::SkipPolicy;
    /// use std::ffi::OsStr;
    ///
    /// let policy = SkipPolicy::from_vars(Some(OsStr::new("")), None);
    /// assert_eq!(policy.missing(&["redis-server", "redis-cli"]), ["redis-server", "redis-cli"]);
    /// ```
    pub fn missing<'a>(&self, binaries: &[&'a str]) -> Vec<&'a str> {
        binaries
            .iter()
            .copied()
            .filter(|b| find_binary_in(&self.path, b).is_none())
            .collect()
    }

    /// Returns `true` when every program of `binaries` is on `PATH`.
    /// Otherwise prints a one-line notice to stderr and returns `false`, or,
    /// when Redis is required, panics with the same message.
    ///
    /// ```
    /// use raceguard::testing::SkipPolicy;
    ///
    /// if !SkipPolicy::from_env().should_run(&["redis-server"]) {
    ///     return; // skipped, the notice says why
    /// }
    /// ```
    pub fn should_run(&self, binaries: &[&str]) -> bool {
        let missing = self.missing(binaries);
        if missing.is_empty() {
            return true;
        }
        let what = missing
            .iter()
            .map(|b| format!("`{b}` (Debian/Ubuntu package: {})", package_for(b)))
            .collect::<Vec<_>>()
            .join(", ");
        let test = std::thread::current()
            .name()
            .filter(|n| *n != "main")
            .map(|n| format!("{n}: "))
            .unwrap_or_default();
        if self.require_redis {
            panic!("{test}{REQUIRE_REDIS_ENV} is set but {what} is not on PATH");
        }
        eprintln!(
            "{test}skipping Redis test: {what} not on PATH; set {REQUIRE_REDIS_ENV}=1 to fail instead"
        );
        false
    }
}

/// Polls `cond` every few milliseconds until it returns `true` or `timeout`
/// passes. Returns whether it became true.
///
/// Handy for asserting eventual conditions in tests without fixed sleeps.
///
/// ```
/// use std::time::{Duration, Instant};
/// let start = Instant::now();
/// assert!(raceguard::testing::wait_until(Duration::from_secs(1), || {
///     start.elapsed() > Duration::from_millis(20)
/// }));
/// assert!(!raceguard::testing::wait_until(Duration::from_millis(20), || false));
/// ```
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut interval = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(25));
    }
}
