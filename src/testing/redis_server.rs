//! A private `redis-server` process, and N independent ones.

use super::{HarnessError, SkipPolicy, find_binary, is_executable, wait_until};
use std::fmt::{self, Write as _};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Default overall deadline for a server to answer `PING` after a start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a graceful or forced stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the wrapper to exit after its stdin closed (drop).
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for `SIGSTOP`/`SIGCONT` to take effect.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect timeout of the harness's own connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout of the harness's own connections.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many fresh ports a start tries when the port turns out to be taken.
const START_ATTEMPTS: usize = 5;
/// How long `restart` keeps retrying when its port is briefly taken.
const RESTART_PORT_RETRY: Duration = Duration::from_secs(3);
/// Lines of each log file in an error's log tail.
const LOG_TAIL_LINES: usize = 30;

/// The wrapper between the test process and `redis-server`.
///
/// `$1` is the redis-server binary, `$2` the config file, `$3` the file that
/// receives redis-server's own stdout/stderr. It starts redis-server in the
/// background (stdin from /dev/null, so redis never holds our pipe), prints
/// its pid, then blocks reading its stdin, a pipe whose only writer is the
/// `RedisServer`:
///
/// - on EOF (the `RedisServer` was dropped, or the test process died, even by
///   `SIGKILL`) it `kill -9`s redis-server and reaps it;
/// - on a line `TERM`, `INT`, `QUIT` or `KILL` it sends that signal (then
///   `SIGCONT`, in case redis was paused), reaps redis, prints
///   `exited <status>` and exits.
///
/// redis-server stays a child of the wrapper until reaped, so its pid can not
/// be reused while the wrapper lives.
const WRAPPER: &str = r#"
"$1" "$2" </dev/null >>"$3" 2>&1 &
pid=$!
trap '' PIPE
trap 'kill -9 "$pid" 2>/dev/null; wait "$pid"; exit 129' HUP INT TERM
echo "$pid"
while IFS= read -r sig; do
  case "$sig" in
    TERM|INT|QUIT|KILL)
      kill -s "$sig" "$pid" 2>/dev/null
      kill -s CONT "$pid" 2>/dev/null
      wait "$pid"
      echo "exited $?"
      exit 0
      ;;
  esac
done
kill -9 "$pid" 2>/dev/null
wait "$pid"
"#;

/// Configures and starts a [`RedisServer`].
///
/// The generated config file contains, in this order:
///
/// ```text
/// bind 127.0.0.1
/// port <free port>
/// save ""
/// appendonly no
/// dir <private temporary directory>
/// logfile <that directory>/redis.log
/// daemonize no
/// enable-debug-command local
/// <your config lines>
/// ```
///
/// so your lines override the defaults (e.g. `appendonly yes`).
///
/// ```
/// use raceguard::testing::RedisServer;
///
/// let Some(server) = RedisServer::builder()
///     .config_line("maxclients 16")
///     .password("s3cret")
///     .start_or_skip()
/// else {
///     return Ok(());
/// };
/// let maxclients: Vec<String> = server.query(&["CONFIG", "GET", "maxclients"])?;
/// assert_eq!(maxclients, ["maxclients", "16"]);
/// # Ok::<(), raceguard::testing::HarnessError>(())
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `.start()`"]
pub struct RedisServerBuilder {
    config: Vec<String>,
    binary: Option<PathBuf>,
    start_timeout: Option<Duration>,
    cluster: bool,
}

impl RedisServerBuilder {
    /// A builder with the default configuration.
    ///
    /// ```
    /// let builder = raceguard::testing::RedisServerBuilder::new();
    /// # let _ = builder;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one line to the config file, e.g. `"maxclients 16"` or
    /// `"appendonly yes"`. A `requirepass` line also makes the harness (and
    /// [`RedisServer::url`]) use that password. A line containing a newline
    /// makes [`start`](Self::start) fail with
    /// [`HarnessError::InvalidArgument`].
    ///
    /// ```
    /// use raceguard::testing::RedisServer;
    ///
    /// let Some(server) = RedisServer::builder()
    ///     .config_line("requirepass x")
    ///     .start_or_skip()
    /// else {
    ///     return Ok(());
    /// };
    /// assert!(server.url().starts_with("redis://:x@127.0.0.1:"));
    /// assert_eq!(server.query::<String>(&["PING"])?, "PONG");
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn config_line(mut self, line: impl Into<String>) -> Self {
        self.config.push(line.into());
        self
    }

    /// Requires this password (`requirepass`); the harness's connections and
    /// [`RedisServer::url`] include it.
    ///
    /// ```
    /// use raceguard::testing::RedisServer;
    ///
    /// let Some(server) = RedisServer::builder().password("p@ss word").start_or_skip() else {
    ///     return Ok(());
    /// };
    /// assert!(server.url().starts_with("redis://:p%40ss%20word@127.0.0.1:"));
    /// assert_eq!(server.query::<String>(&["PING"])?, "PONG");
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn password(self, password: impl AsRef<str>) -> Self {
        let line = format!("requirepass {}", quote(password.as_ref()));
        self.config_line(line)
    }

    /// Uses this `redis-server` binary instead of the one on `PATH`.
    ///
    /// ```
    /// use raceguard::testing::{HarnessError, RedisServer};
    ///
    /// let err = RedisServer::builder()
    ///     .redis_server_binary("/nonexistent/redis-server")
    ///     .start()
    ///     .unwrap_err();
    /// assert!(matches!(err, HarnessError::NotInstalled { .. }));
    /// ```
    pub fn redis_server_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The overall deadline for the server to answer `PING` after a start or
    /// restart (default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = raceguard::testing::RedisServer::builder()
    ///     .start_timeout(Duration::from_secs(30));
    /// # let _ = builder;
    /// ```
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = Some(timeout);
        self
    }

    /// Cluster mode, for [`super::RedisCluster`]: `cluster-enabled yes`, a
    /// `cluster-config-file` in the data directory, a short node timeout and
    /// an explicit, free `cluster-port`.
    pub(crate) fn cluster(mut self) -> Self {
        self.cluster = true;
        self
    }

    /// Starts the server and waits until it answers `PING`.
    ///
    /// ```
    /// use raceguard::testing::{redis_server_available, RedisServer};
    ///
    /// if redis_server_available() {
    ///     let server = RedisServer::builder().start()?;
    ///     assert!(server.is_running());
    /// }
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn start(self) -> Result<RedisServer, HarnessError> {
        RedisServer::start_from(self)
    }

    /// Like [`start`](Self::start), but returns `None` (after a notice on
    /// stderr) when `redis-server` is not on `PATH`, unless
    /// `RACEGUARD_REQUIRE_REDIS=1`. Panics on any other failure.
    ///
    /// ```
    /// use raceguard::testing::RedisServer;
    ///
    /// let Some(server) = RedisServer::builder().start_or_skip() else { return };
    /// assert!(server.is_running());
    /// ```
    pub fn start_or_skip(self) -> Option<RedisServer> {
        if self.binary.is_none() && !SkipPolicy::from_env().should_run(&["redis-server"]) {
            return None;
        }
        Some(
            self.start()
                .unwrap_or_else(|e| panic!("could not start redis-server: {e}")),
        )
    }
}

/// What a started server needs to be (re)started; fixed at the first start.
#[derive(Debug)]
struct Spec {
    binary: PathBuf,
    port: u16,
    cluster_port: Option<u16>,
    url: String,
    start_timeout: Duration,
    conf_path: PathBuf,
    log_path: PathBuf,
    out_path: PathBuf,
}

#[derive(Debug)]
struct State {
    /// The live wrapper and redis-server, `None` after stop/kill.
    proc: Option<Proc>,
    /// The pid of the most recently started redis-server.
    pid: u32,
}

/// A private `redis-server` on a free `127.0.0.1` port, stopped and removed
/// (with its data directory) on drop.
///
/// All methods take `&self`, so a server can be shared (`Arc<RedisServer>`)
/// and the nodes of [`RedisServers`] and [`super::RedisCluster`] can be
/// faulted through shared references.
///
/// ```
/// use raceguard::testing::RedisServer;
///
/// let Some(server) = RedisServer::start_or_skip() else { return Ok(()) };
/// let client = server.client();
/// let mut con = client.get_connection()?;
/// redis::cmd("SET").arg("k").arg("v").exec(&mut con)?;
/// assert_eq!(server.query::<String>(&["GET", "k"])?, "v");
/// # Ok::<(), raceguard::testing::HarnessError>(())
/// ```
pub struct RedisServer {
    spec: Spec,
    state: Mutex<State>,
    // Declared last: removed only after the process is gone.
    dir: tempfile::TempDir,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.spec.port)
            .field("cluster_port", &self.spec.cluster_port)
            .field("pid", &self.pid())
            .field("running", &self.lock().proc.is_some())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A start failure, and whether it was because the port was taken (then a
/// fresh start retries with another port).
struct StartFailure {
    port_in_use: bool,
    error: HarnessError,
}

impl From<HarnessError> for StartFailure {
    fn from(error: HarnessError) -> Self {
        StartFailure {
            port_in_use: false,
            error,
        }
    }
}

impl RedisServer {
    /// A builder for a server with extra configuration.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::builder()
    ///     .config_line("appendonly yes")
    ///     .start_or_skip()
    /// else {
    ///     return Ok(());
    /// };
    /// let aof: Vec<String> = server.query(&["CONFIG", "GET", "appendonly"])?;
    /// assert_eq!(aof[1], "yes");
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::new()
    }

    /// Starts a server with the default configuration and waits until it
    /// answers `PING`.
    ///
    /// ```
    /// use raceguard::testing::{redis_server_available, RedisServer};
    ///
    /// if redis_server_available() {
    ///     let server = RedisServer::start()?;
    ///     assert_eq!(server.query::<String>(&["PING"])?, "PONG");
    /// }
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn start() -> Result<RedisServer, HarnessError> {
        Self::builder().start()
    }

    /// Starts a server, or returns `None` when `redis-server` is not
    /// installed (see [`super::SkipPolicy`]). Panics on any other failure.
    ///
    /// ```
    /// use raceguard::testing::RedisServer;
    ///
    /// let Some(server) = RedisServer::start_or_skip() else { return };
    /// assert!(server.is_running());
    /// ```
    pub fn start_or_skip() -> Option<RedisServer> {
        Self::builder().start_or_skip()
    }

    fn start_from(builder: RedisServerBuilder) -> Result<RedisServer, HarnessError> {
        let binary = match builder.binary {
            Some(path) if is_executable(&path) => path,
            Some(path) => {
                return Err(HarnessError::NotInstalled {
                    binary: path.display().to_string(),
                });
            }
            None => find_binary("redis-server").ok_or_else(|| HarnessError::NotInstalled {
                binary: "redis-server".into(),
            })?,
        };
        if let Some(bad) = builder.config.iter().find(|l| l.contains(['\n', '\r'])) {
            return Err(HarnessError::InvalidArgument {
                what: format!("config line {bad:?} contains a line break"),
            });
        }
        let password = password_of(&builder.config);
        let dir = tempfile::Builder::new()
            .prefix("raceguard-redis-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the temporary data directory", e))?;

        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let ports = free_ports(if builder.cluster { 2 } else { 1 })?;
            let port = ports[0];
            let url = match &password {
                Some(pw) => format!("redis://:{}@127.0.0.1:{port}/", percent_encode(pw)),
                None => format!("redis://127.0.0.1:{port}/"),
            };
            let spec = Spec {
                binary: binary.clone(),
                port,
                cluster_port: ports.get(1).copied(),
                url,
                start_timeout: builder.start_timeout.unwrap_or(START_TIMEOUT),
                conf_path: dir.path().join("redis.conf"),
                log_path: dir.path().join("redis.log"),
                out_path: dir.path().join("stdout.log"),
            };
            write_config(&spec, dir.path(), &builder.config)?;
            match launch(&spec) {
                Ok(proc) => {
                    return Ok(RedisServer {
                        spec,
                        state: Mutex::new(State {
                            pid: proc.pid,
                            proc: Some(proc),
                        }),
                        dir,
                    });
                }
                Err(failure) if failure.port_in_use => last_error = Some(failure.error),
                Err(failure) => return Err(failure.error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The TCP port (on `127.0.0.1`). It stays the same across
    /// [`restart`](Self::restart)s.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// assert_ne!(server.port(), 0);
    /// ```
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The cluster bus port, for cluster nodes (see
    /// [`super::RedisCluster`]); `None` for a standalone server.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// assert_eq!(server.cluster_port(), None);
    /// ```
    pub fn cluster_port(&self) -> Option<u16> {
        self.spec.cluster_port
    }

    /// The socket address, `127.0.0.1:PORT`.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// assert!(server.addr().ip().is_loopback());
    /// assert_eq!(server.addr().port(), server.port());
    /// ```
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.spec.port))
    }

    /// The connection URL, `redis://127.0.0.1:PORT/`, or
    /// `redis://:PASSWORD@127.0.0.1:PORT/` (percent-encoded) when a password
    /// is configured.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// assert_eq!(server.url(), format!("redis://127.0.0.1:{}/", server.port()));
    /// ```
    pub fn url(&self) -> &str {
        &self.spec.url
    }

    /// The pid of the most recently started `redis-server` process (it
    /// changes on [`restart`](Self::restart); after
    /// [`stop`](Self::stop)/[`kill`](Self::kill) it is the pid of the process
    /// that is gone).
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// # #[cfg(target_os = "linux")]
    /// assert!(std::path::Path::new(&format!("/proc/{}", server.pid())).exists());
    /// ```
    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    /// The private data directory (config file, logs, RDB/AOF files,
    /// `nodes.conf`). Removed on drop.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// assert!(server.dir().join("redis.conf").exists());
    /// ```
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server's log file and of its stdout/stderr, for
    /// debugging a failing test.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return };
    /// assert!(server.log_tail().contains("Ready to accept connections"));
    /// ```
    pub fn log_tail(&self) -> String {
        log_tail(&self.spec, (0, 0))
    }

    /// A [`redis::Client`] for this server (nothing is connected yet).
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// let mut con = server.client().get_connection()?;
    /// let pong: String = redis::cmd("PING").query(&mut con)?;
    /// assert_eq!(pong, "PONG");
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.spec.url.as_str()).expect("the harness builds valid URLs")
    }

    /// A new synchronous connection with a 2 s connect timeout and 5 s
    /// read/write timeouts.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// let mut con = server.connection()?;
    /// redis::cmd("SET").arg("k").arg(1).exec(&mut con)?;
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn connection(&self) -> Result<redis::Connection, HarnessError> {
        let con = self.client().get_connection_with_timeout(CONNECT_TIMEOUT)?;
        con.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        con.set_write_timeout(Some(RESPONSE_TIMEOUT))?;
        Ok(con)
    }

    /// Runs one command on a new connection and returns the raw reply.
    /// `args[0]` is the command name.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// assert_eq!(server.cmd(&["SET", "k", "v"])?, redis::Value::Okay);
    /// assert_eq!(server.cmd(&["GET", "missing"])?, redis::Value::Nil);
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn cmd(&self, args: &[&str]) -> Result<redis::Value, HarnessError> {
        self.query(args)
    }

    /// Runs one command on a new connection and converts the reply.
    /// `args[0]` is the command name.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// let n: i64 = server.query(&["INCRBY", "counter", "5"])?;
    /// assert_eq!(n, 5);
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T, HarnessError> {
        let (name, rest) = args
            .split_first()
            .ok_or_else(|| HarnessError::InvalidArgument {
                what: "a command needs at least its name".into(),
            })?;
        let mut cmd = redis::cmd(name);
        for arg in rest {
            cmd.arg(*arg);
        }
        let mut con = self.connection()?;
        Ok(cmd.query(&mut con)?)
    }

    /// Whether the `redis-server` process is alive (a
    /// [`pause`](Self::pause)d server is alive).
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// assert!(server.is_running());
    /// server.stop()?;
    /// assert!(!server.is_running());
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn is_running(&self) -> bool {
        let state = self.lock();
        state.proc.is_some() && process_state(state.pid) != ProcState::Exited
    }

    /// Whether the process is stopped by [`pause`](Self::pause).
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// server.pause()?;
    /// assert!(server.is_paused());
    /// server.resume()?;
    /// assert!(!server.is_paused());
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn is_paused(&self) -> bool {
        let state = self.lock();
        state.proc.is_some() && process_state(state.pid) == ProcState::Stopped
    }

    /// Stops the server gracefully: `SIGCONT` (in case it is paused) and
    /// `SIGTERM`, then waits for it to exit. A no-op when it is not running.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// server.stop()?;
    /// assert!(server.connection().is_err());
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn stop(&self) -> Result<(), HarnessError> {
        self.terminate("TERM")
    }

    /// Kills the server with `SIGKILL` (a crash: no shutdown, no final
    /// save) and waits for it to exit. A no-op when it is not running.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// server.kill()?;
    /// assert!(!server.is_running());
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn kill(&self) -> Result<(), HarnessError> {
        self.terminate("KILL")
    }

    fn terminate(&self, signal: &str) -> Result<(), HarnessError> {
        let proc = self.lock().proc.take();
        match proc {
            Some(proc) => proc.terminate(signal, STOP_TIMEOUT),
            None => Ok(()),
        }
    }

    /// Starts the server again on the same port (and cluster bus port), with
    /// the same config file and data directory, and waits until it answers
    /// `PING`. A running server is first stopped gracefully.
    ///
    /// Without persistence (the default) the data is gone; with
    /// `appendonly yes` it is reloaded.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// let (port, pid) = (server.port(), server.pid());
    /// server.restart()?;
    /// assert_eq!(server.port(), port);
    /// assert_ne!(server.pid(), pid);
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn restart(&self) -> Result<(), HarnessError> {
        let mut state = self.lock();
        if let Some(proc) = state.proc.take() {
            proc.terminate("TERM", STOP_TIMEOUT)?;
        }
        let deadline = Instant::now() + RESTART_PORT_RETRY;
        loop {
            match launch(&self.spec) {
                Ok(proc) => {
                    state.pid = proc.pid;
                    state.proc = Some(proc);
                    return Ok(());
                }
                Err(failure) if failure.port_in_use && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    /// Pauses the process with `SIGSTOP`: it keeps its sockets but answers
    /// nothing (connections are still accepted by the kernel), like a server
    /// stuck in a long GC pause or a VM freeze. Returns once the process is
    /// stopped.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// let mut con = server.connection()?;
    /// con.set_read_timeout(Some(Duration::from_millis(100)))?;
    /// server.pause()?;
    /// let err = redis::cmd("PING").query::<String>(&mut con).unwrap_err();
    /// assert!(err.is_timeout());
    /// server.resume()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal_live("STOP", ProcState::Stopped)
    }

    /// Resumes a [`pause`](Self::pause)d process with `SIGCONT`. Returns
    /// once it runs again.
    ///
    /// ```
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// server.pause()?;
    /// server.resume()?;
    /// assert_eq!(server.query::<String>(&["PING"])?, "PONG");
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal_live("CONT", ProcState::Running)
    }

    fn signal_live(&self, signal: &str, expect: ProcState) -> Result<(), HarnessError> {
        let state = self.lock();
        let not_running = HarnessError::NotRunning {
            port: self.spec.port,
        };
        if state.proc.is_none() || process_state(state.pid) == ProcState::Exited {
            return Err(not_running);
        }
        // Safe against pid reuse: redis-server is a child of the wrapper,
        // which only reaps it on stop/kill/drop (all of which take the
        // process out of `state` first).
        send_signal(state.pid, signal)?;
        if wait_until(SIGNAL_TIMEOUT, || process_state(state.pid) == expect) {
            Ok(())
        } else if process_state(state.pid) == ProcState::Exited {
            Err(not_running)
        } else {
            Err(HarnessError::Timeout {
                what: format!("redis-server (pid {}) to take SIG{signal}", state.pid),
            })
        }
    }

    /// Sends `CLIENT PAUSE <ms>`: the server keeps running but holds every
    /// client's commands (including `CLIENT UNPAUSE`) until the time is up.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    ///
    /// let Some(server) = raceguard::testing::RedisServer::start_or_skip() else { return Ok(()) };
    /// let start = Instant::now();
    /// server.client_pause(Duration::from_millis(200))?;
    /// assert_eq!(server.query::<String>(&["PING"])?, "PONG");
    /// assert!(start.elapsed() >= Duration::from_millis(150));
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn client_pause(&self, duration: Duration) -> Result<(), HarnessError> {
        let ms = duration.as_millis().max(1).to_string();
        self.query::<()>(&["CLIENT", "PAUSE", &ms])
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Proc's own Drop closes the wrapper's stdin and waits for it; the
        // data directory is removed afterwards (field order).
        let proc = self.lock().proc.take();
        drop(proc);
    }
}

/// Spawns a wrapper with redis-server and waits until it answers PING.
fn launch(spec: &Spec) -> Result<Proc, StartFailure> {
    let offsets = (file_len(&spec.log_path), file_len(&spec.out_path));
    let proc = Proc::spawn(spec)?;
    wait_ready(spec, &proc, offsets)?;
    Ok(proc)
}

fn wait_ready(spec: &Spec, proc: &Proc, offsets: (u64, u64)) -> Result<(), StartFailure> {
    let deadline = Instant::now() + spec.start_timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        if process_state(proc.pid) == ProcState::Exited {
            let log_tail = log_tail(spec, offsets);
            return Err(StartFailure {
                port_in_use: log_tail.contains("Address already in use"),
                error: HarnessError::Start {
                    port: spec.port,
                    reason: format!("redis-server (pid {}) exited during startup", proc.pid),
                    log_tail,
                },
            });
        }
        let last_error = match probe(spec, proc.pid) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(HarnessError::Start {
                port: spec.port,
                reason: format!(
                    "no PING answer within {:?} (last error: {last_error})",
                    spec.start_timeout
                ),
                log_tail: log_tail(spec, offsets),
            }
            .into());
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}

/// One readiness probe: PING answers, and the server on the port is ours
/// (`INFO server`'s process_id), not some other process that got the port.
fn probe(spec: &Spec, pid: u32) -> Result<(), String> {
    let client = redis::Client::open(spec.url.as_str()).map_err(|e| e.to_string())?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(|e| e.to_string())?;
    con.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let pong: String = redis::cmd("PING")
        .query(&mut con)
        .map_err(|e| e.to_string())?;
    if pong != "PONG" {
        return Err(format!("PING answered {pong:?}"));
    }
    let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut con) else {
        // INFO renamed or disabled by the user's config: PING is enough.
        return Ok(());
    };
    match info_field(&info, "process_id").and_then(|v| v.parse::<u32>().ok()) {
        Some(id) if id != pid => Err(format!(
            "port {} is answered by another process (pid {id}), not ours (pid {pid})",
            spec.port
        )),
        _ => Ok(()),
    }
}

/// A field of an `INFO`-style reply (`name:value` lines).
pub(crate) fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == name).then(|| v.trim())
    })
}

/// The wrapper process (and, through it, redis-server).
#[derive(Debug)]
struct Proc {
    /// redis-server's pid (0 until the wrapper printed it).
    pid: u32,
    wrapper: Child,
    /// The pipe whose closing kills redis-server.
    stdin: Option<ChildStdin>,
    /// Lines the wrapper printed after the pid.
    lines: Receiver<String>,
}

impl Proc {
    fn spawn(spec: &Spec) -> Result<Proc, HarnessError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.out_path)
            .map_err(|e| HarnessError::io(format!("opening {}", spec.out_path.display()), e))?;
        let mut wrapper = Command::new("/bin/sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("raceguard-redis-wrapper")
            .arg(&spec.binary)
            .arg(&spec.conf_path)
            .arg(&spec.out_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(out))
            .spawn()
            .map_err(|e| HarnessError::io("spawning /bin/sh for redis-server", e))?;
        let stdout = wrapper.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        let mut proc = Proc {
            pid: 0,
            stdin: wrapper.stdin.take(),
            wrapper,
            lines,
        };
        // From here on, any early return drops `proc`, which cleans up.
        std::thread::Builder::new()
            .name("raceguard-redis-wrapper".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| HarnessError::io("spawning the wrapper reader thread", e))?;
        let first =
            proc.lines
                .recv_timeout(spec.start_timeout)
                .map_err(|_| HarnessError::Start {
                    port: spec.port,
                    reason: "the sh wrapper did not report redis-server's pid".into(),
                    log_tail: log_tail(spec, (0, 0)),
                })?;
        proc.pid = first.trim().parse().map_err(|_| HarnessError::Start {
            port: spec.port,
            reason: format!("the sh wrapper printed {first:?} instead of a pid"),
            log_tail: log_tail(spec, (0, 0)),
        })?;
        Ok(proc)
    }

    /// Sends `signal` through the wrapper, waits for redis-server to exit
    /// and for the wrapper to exit. On failure, `Drop` forces the cleanup.
    fn terminate(mut self, signal: &str, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let stdin = self.stdin.as_mut().expect("stdin is held until drop");
        stdin
            .write_all(format!("{signal}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| HarnessError::io("writing to the redis-server wrapper", e))?;
        let waited_for = || HarnessError::Timeout {
            what: format!("redis-server (pid {}) to exit after SIG{signal}", self.pid),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("exited") => break,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(waited_for()),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(HarnessError::io(
                        "waiting for redis-server to exit",
                        io::Error::other("the sh wrapper exited without reporting"),
                    ));
                }
            }
        }
        if wait_child(
            &mut self.wrapper,
            deadline.saturating_duration_since(Instant::now()),
        ) {
            Ok(())
        } else {
            Err(waited_for())
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // EOF on the wrapper's stdin: it kill -9s redis-server and reaps it.
        drop(self.stdin.take());
        if wait_child(&mut self.wrapper, DROP_TIMEOUT) {
            return;
        }
        // The wrapper is stuck: it has not reaped redis-server, so the pid is
        // still redis-server's. Kill both directly.
        if self.pid != 0 && looks_like_redis(self.pid) {
            let _ = send_signal(self.pid, "KILL");
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

/// Waits up to `timeout` for `child` to exit; `true` when it has.
fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    wait_until(timeout, || !matches!(child.try_wait(), Ok(None)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcState {
    Running,
    Stopped,
    /// Gone, or a zombie.
    Exited,
}

/// The state of process `pid`, from `/proc` (Linux) or `ps`.
pub(crate) fn process_state(pid: u32) -> ProcState {
    if Path::new("/proc/self/stat").exists() {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return ProcState::Exited;
        };
        // "pid (comm) S ...": comm may contain spaces and parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        return state_from_char(state);
    }
    let Ok(out) = Command::new("ps")
        .args(["-o", "stat=", "-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return ProcState::Exited;
    };
    state_from_char(String::from_utf8_lossy(&out.stdout).trim().chars().next())
}

fn state_from_char(c: Option<char>) -> ProcState {
    match c {
        None | Some('Z' | 'X' | 'x') => ProcState::Exited,
        Some('T' | 't') => ProcState::Stopped,
        Some(_) => ProcState::Running,
    }
}

fn looks_like_redis(pid: u32) -> bool {
    if Path::new("/proc/self/cmdline").exists() {
        fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("redis"))
            .unwrap_or(false)
    } else {
        true
    }
}

/// Sends `signal` (a name without `SIG`) to `pid` with the `kill` command.
fn send_signal(pid: u32, signal: &str) -> Result<(), HarnessError> {
    let pid = pid.to_string();
    let mut cmd = if Path::new("/bin/kill").exists() {
        let mut c = Command::new("/bin/kill");
        c.args(["-s", signal, &pid]);
        c
    } else {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal, &pid]);
        c
    };
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| HarnessError::io(format!("running kill -s {signal} {pid}"), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::io(
            format!("kill -s {signal} {pid}"),
            io::Error::other(format!("kill exited with {status}")),
        ))
    }
}

/// `n` distinct free loopback ports (all bound at once, then released).
fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| HarnessError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| HarnessError::io("reading a free port", e))
}

fn write_config(spec: &Spec, dir: &Path, extra: &[String]) -> Result<(), HarnessError> {
    let mut conf = String::new();
    let path = |p: &Path| quote(&p.to_string_lossy());
    let _ = writeln!(
        conf,
        "# Written by raceguard::testing. Extra lines come last and override the defaults."
    );
    let _ = writeln!(conf, "bind 127.0.0.1");
    let _ = writeln!(conf, "port {}", spec.port);
    let _ = writeln!(conf, "save \"\"");
    let _ = writeln!(conf, "appendonly no");
    let _ = writeln!(conf, "dir {}", path(dir));
    let _ = writeln!(conf, "logfile {}", path(&spec.log_path));
    let _ = writeln!(conf, "daemonize no");
    let _ = writeln!(conf, "enable-debug-command local");
    if let Some(cluster_port) = spec.cluster_port {
        let nodes_conf = dir.join("nodes.conf");
        // A failed attempt on other ports may have left one behind.
        let _ = fs::remove_file(&nodes_conf);
        let _ = writeln!(conf, "cluster-enabled yes");
        let _ = writeln!(conf, "cluster-config-file {}", path(&nodes_conf));
        let _ = writeln!(conf, "cluster-node-timeout 2000");
        let _ = writeln!(conf, "cluster-port {cluster_port}");
    }
    for line in extra {
        let _ = writeln!(conf, "{line}");
    }
    fs::write(&spec.conf_path, conf)
        .map_err(|e| HarnessError::io(format!("writing {}", spec.conf_path.display()), e))
}

/// A double-quoted redis.conf string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The password of the last `requirepass` line, if any (and not empty).
fn password_of(config: &[String]) -> Option<String> {
    let mut password = None;
    for line in config {
        let line = line.trim();
        let Some((directive, value)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if directive.eq_ignore_ascii_case("requirepass") {
            let value = unquote(value.trim());
            password = (!value.is_empty()).then_some(value);
        }
    }
    password
}

fn unquote(s: &str) -> String {
    if let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            } else {
                out.push(c);
            }
        }
        out
    } else if let Some(inner) = s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        inner.to_owned()
    } else {
        s.to_owned()
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last lines written to the log and stdout files since `offsets`.
fn log_tail(spec: &Spec, offsets: (u64, u64)) -> String {
    let mut out = String::new();
    for (path, offset) in [(&spec.log_path, offsets.0), (&spec.out_path, offsets.1)] {
        let text = read_from(path, offset);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        if tail.is_empty() {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let _ = writeln!(out, "[{name}]");
        for line in tail {
            let _ = writeln!(out, "{line}");
        }
    }
    if out.is_empty() {
        out.push_str("(empty)");
    }
    out
}

fn read_from(path: &Path, offset: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Starts `n` servers from `builder`, concurrently.
pub(crate) fn start_many(
    n: usize,
    builder: &RedisServerBuilder,
) -> Result<Vec<RedisServer>, HarnessError> {
    let results: Vec<Result<RedisServer, HarnessError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| s.spawn(|| builder.clone().start()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    // On any error, the servers that did start are dropped (and stopped).
    results.into_iter().collect()
}

/// N independent `redis-server`s (separate processes, ports and data), e.g.
/// for Redlock. Dereferences to `[RedisServer]`, so it can be indexed and
/// iterated.
///
/// ```
/// use raceguard::testing::RedisServers;
///
/// let Some(servers) = RedisServers::start_or_skip(3) else { return Ok(()) };
/// assert_eq!(servers.len(), 3);
/// servers[0].cmd(&["SET", "k", "on zero"])?;
/// assert_eq!(servers[1].cmd(&["GET", "k"])?, redis::Value::Nil);
/// servers[2].kill()?; // one node down: a quorum of 2 of 3 remains
/// # Ok::<(), raceguard::testing::HarnessError>(())
/// ```
#[derive(Debug)]
pub struct RedisServers {
    servers: Vec<RedisServer>,
}

impl RedisServers {
    /// Starts `n` (at least 1) servers with the default configuration.
    ///
    /// ```
    /// use raceguard::testing::{redis_server_available, RedisServers};
    ///
    /// if redis_server_available() {
    ///     let servers = RedisServers::start(2)?;
    ///     assert_ne!(servers[0].port(), servers[1].port());
    /// }
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn start(n: usize) -> Result<RedisServers, HarnessError> {
        Self::start_with(n, RedisServer::builder())
    }

    /// Starts `n` (at least 1) servers, each configured by `builder`.
    ///
    /// ```
    /// use raceguard::testing::{redis_server_available, RedisServer, RedisServers};
    ///
    /// if redis_server_available() {
    ///     let servers = RedisServers::start_with(2, RedisServer::builder().password("pw"))?;
    ///     assert!(servers.urls().iter().all(|u| u.starts_with("redis://:pw@")));
    /// }
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn start_with(n: usize, builder: RedisServerBuilder) -> Result<RedisServers, HarnessError> {
        if n == 0 {
            return Err(HarnessError::InvalidArgument {
                what: "RedisServers needs at least one server".into(),
            });
        }
        Ok(RedisServers {
            servers: start_many(n, &builder)?,
        })
    }

    /// Starts `n` servers, or returns `None` when `redis-server` is not
    /// installed (see [`super::SkipPolicy`]). Panics on any other failure.
    ///
    /// ```
    /// let Some(servers) = raceguard::testing::RedisServers::start_or_skip(5) else { return };
    /// assert_eq!(servers.iter().filter(|s| s.is_running()).count(), 5);
    /// ```
    pub fn start_or_skip(n: usize) -> Option<RedisServers> {
        if !SkipPolicy::from_env().should_run(&["redis-server"]) {
            return None;
        }
        Some(Self::start(n).unwrap_or_else(|e| panic!("could not start {n} redis-servers: {e}")))
    }

    /// The servers' URLs, in order.
    ///
    /// ```
    /// let Some(servers) = raceguard::testing::RedisServers::start_or_skip(2) else { return };
    /// assert_eq!(servers.urls()[1], servers[1].url());
    /// ```
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url().to_owned()).collect()
    }

    /// A [`redis::Client`] per server, in order.
    ///
    /// ```
    /// let Some(servers) = raceguard::testing::RedisServers::start_or_skip(3) else { return };
    /// assert_eq!(servers.clients().len(), 3);
    /// ```
    pub fn clients(&self) -> Vec<redis::Client> {
        self.servers.iter().map(RedisServer::client).collect()
    }
}

impl Deref for RedisServers {
    type Target = [RedisServer];

    fn deref(&self) -> &[RedisServer] {
        &self.servers
    }
}

impl<'a> IntoIterator for &'a RedisServers {
    type Item = &'a RedisServer;
    type IntoIter = std::slice::Iter<'a, RedisServer>;

    fn into_iter(self) -> Self::IntoIter {
        self.servers.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_parsed_from_requirepass_lines() {
        let lines = |ls: &[&str]| ls.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        assert_eq!(password_of(&lines(&["maxclients 16"])), None);
        assert_eq!(password_of(&lines(&["requirepass x"])), Some("x".into()));
        assert_eq!(
            password_of(&lines(&["REQUIREPASS \"a \\\"b\\\"\""])),
            Some("a \"b\"".into())
        );
        assert_eq!(
            password_of(&lines(&["requirepass x", "requirepass \"\""])),
            None
        );
        assert_eq!(unquote(&quote("p\\q\"r")), "p\\q\"r");
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        assert_eq!(percent_encode("aZ9-._~"), "aZ9-._~");
        assert_eq!(percent_encode("p@ss:w/rd%"), "p%40ss%3Aw%2Frd%25");
    }

    #[test]
    fn info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nprocess_id:42\r\n";
        assert_eq!(info_field(info, "process_id"), Some("42"));
        assert_eq!(info_field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field(info, "nope"), None);
    }

    #[test]
    fn process_states() {
        assert_eq!(process_state(std::process::id()), ProcState::Running);
        assert_eq!(state_from_char(Some('Z')), ProcState::Exited);
        assert_eq!(state_from_char(Some('T')), ProcState::Stopped);
        assert_eq!(state_from_char(None), ProcState::Exited);
    }
}
