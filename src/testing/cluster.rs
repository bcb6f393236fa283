//! A Redis Cluster of private `redis-server`s.

use super::redis_server::{info_field, start_many};
use super::{HarnessError, RedisServer, SkipPolicy, find_binary, wait_until};
use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Deadline for the whole cluster to agree and report `cluster_state:ok`.
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for `redis-cli --cluster create`.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Number of hash slots of a Redis Cluster.
const SLOTS: u32 = 16384;

/// A Redis Cluster of N masters (3 by default) and no replicas, each a
/// [`RedisServer`] in cluster mode with its own port, cluster bus port and
/// data directory.
///
/// The cluster is formed with `redis-cli --cluster create` (Debian package
/// `redis-tools`), and [`start`](Self::start) returns only once every node
/// reports `cluster_state:ok` with all 16384 slots served and all nodes agree
/// on who owns which slots.
///
/// ```no_run
/// use raceguard::testing::RedisCluster;
/// use redis::Commands;
///
/// let Some(cluster) = RedisCluster::start_or_skip() else { return Ok(()) };
/// let mut con = cluster.client().get_connection()?;
/// let () = con.set("user:{alice}:name", "Alice")?;
/// let name: String = con.get("user:{alice}:name")?;
/// assert_eq!(name, "Alice");
///
/// // Crash the node that owns alice's slot, bring it back, wait for healing.
/// let owner = cluster.node_for_key("user:{alice}:name")?;
/// owner.kill()?;
/// owner.restart()?;
/// cluster.wait_until_ok(std::time::Duration::from_secs(20))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// The number of masters of [`start`](Self::start).
    ///
    /// ```
    /// assert_eq!(raceguard::testing::RedisCluster::DEFAULT_MASTERS, 3);
    /// ```
    pub const DEFAULT_MASTERS: usize = 3;

    /// Starts a cluster of 3 masters and waits until it is healthy.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// assert_eq!(cluster.nodes().len(), 3);
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn start() -> Result<RedisCluster, HarnessError> {
        Self::start_with(Self::DEFAULT_MASTERS)
    }

    /// Starts a cluster of `masters` (at least 3) masters and waits until it
    /// is healthy.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start_with(5)?;
    /// assert_eq!(cluster.urls().len(), 5);
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn start_with(masters: usize) -> Result<RedisCluster, HarnessError> {
        if masters < 3 {
            return Err(HarnessError::InvalidArgument {
                what: format!("a Redis Cluster needs at least 3 masters, not {masters}"),
            });
        }
        let redis_cli = find_binary("redis-cli").ok_or_else(|| HarnessError::NotInstalled {
            binary: "redis-cli".into(),
        })?;
        let cluster = RedisCluster {
            nodes: start_many(masters, &RedisServer::builder().cluster())?,
        };
        cluster.create(&redis_cli)?;
        cluster.wait_until_ok(CLUSTER_OK_TIMEOUT)?;
        Ok(cluster)
    }

    /// Starts a 3-master cluster, or returns `None` when `redis-server` or
    /// `redis-cli` is not installed (see [`super::SkipPolicy`]). Panics on
    /// any other failure.
    ///
    /// ```no_run
    /// let Some(cluster) = raceguard::testing::RedisCluster::start_or_skip() else { return };
    /// assert_eq!(cluster.nodes().len(), 3);
    /// ```
    pub fn start_or_skip() -> Option<RedisCluster> {
        Self::start_with_or_skip(Self::DEFAULT_MASTERS)
    }

    /// Like [`start_or_skip`](Self::start_or_skip) with `masters` masters.
    ///
    /// ```no_run
    /// let Some(cluster) = raceguard::testing::RedisCluster::start_with_or_skip(4) else { return };
    /// assert_eq!(cluster.nodes().len(), 4);
    /// ```
    pub fn start_with_or_skip(masters: usize) -> Option<RedisCluster> {
        if !SkipPolicy::from_env().should_run(&["redis-server", "redis-cli"]) {
            return None;
        }
        Some(
            Self::start_with(masters)
                .unwrap_or_else(|e| panic!("could not start a Redis Cluster: {e}")),
        )
    }

    /// The nodes, in creation order.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// for node in cluster.nodes() {
    ///     assert!(node.cluster_port().is_some());
    /// }
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`, e.g. to [`kill`](RedisServer::kill) or
    /// [`pause`](RedisServer::pause) it. Panics when `i` is out of range.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// cluster.node(1).pause()?;
    /// cluster.node(1).resume()?;
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// The nodes' URLs, in order: seed nodes for a cluster client.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// let client = redis::cluster::ClusterClient::new(cluster.urls())?;
    /// # let _ = client;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url().to_owned()).collect()
    }

    /// A cluster-aware client seeded with every node (it follows `MOVED`
    /// and `ASK` redirections). Use `get_connection()` for a synchronous
    /// connection, or `get_async_connection()` with the crate's `cluster`
    /// feature.
    ///
    /// ```no_run
    /// use redis::Commands;
    ///
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// let mut con = cluster.client().get_connection()?;
    /// let () = con.set("a", 1)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn client(&self) -> redis::cluster::ClusterClient {
        redis::cluster::ClusterClient::new(self.urls()).expect("the harness builds valid URLs")
    }

    /// The hash slot of `key`, as computed by the cluster (`CLUSTER
    /// KEYSLOT`).
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// assert_eq!(cluster.key_slot("foo")?, 12182);
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn key_slot(&self, key: &str) -> Result<u16, HarnessError> {
        let mut last = None;
        for node in self.answering_nodes() {
            match node.query::<u16>(&["CLUSTER", "KEYSLOT", key]) {
                Ok(slot) => return Ok(slot),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::NotRunning {
            port: self.nodes[0].port(),
        }))
    }

    /// The master that owns `slot`, according to the first node that
    /// answers `CLUSTER NODES`.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// let owner = cluster.slot_owner(0)?;
    /// assert!(cluster.nodes().iter().any(|n| n.port() == owner.port()));
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn slot_owner(&self, slot: u16) -> Result<&RedisServer, HarnessError> {
        if u32::from(slot) >= SLOTS {
            return Err(HarnessError::InvalidArgument {
                what: format!("slot {slot} is out of range (0..16384)"),
            });
        }
        let mut last = None;
        for node in self.answering_nodes() {
            let text = match node.query::<String>(&["CLUSTER", "NODES"]) {
                Ok(text) => text,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let owner = parse_cluster_nodes(&text).into_iter().find(|entry| {
                entry.is_master()
                    && entry
                        .slots
                        .iter()
                        .any(|&(lo, hi)| (lo..=hi).contains(&slot))
            });
            return owner
                .and_then(|entry| self.nodes.iter().find(|n| n.port() == entry.port))
                .ok_or_else(|| HarnessError::InvalidArgument {
                    what: format!("no node of this cluster owns slot {slot}"),
                });
        }
        Err(last.unwrap_or(HarnessError::NotRunning {
            port: self.nodes[0].port(),
        }))
    }

    /// The master that owns `key`'s slot.
    ///
    /// ```no_run
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// let owner = cluster.node_for_key("user:{alice}:cart")?;
    /// owner.kill()?; // alice's slot is now down
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn node_for_key(&self, key: &str) -> Result<&RedisServer, HarnessError> {
        self.slot_owner(self.key_slot(key)?)
    }

    /// Waits until every node reports `cluster_state:ok`, 16384 slots ok and
    /// knows all the other nodes, and all nodes agree on the slot owners;
    /// e.g. after [`restart`](RedisServer::restart)ing a node.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// let cluster = raceguard::testing::RedisCluster::start()?;
    /// cluster.node(0).kill()?;
    /// cluster.node(0).restart()?;
    /// cluster.wait_until_ok(Duration::from_secs(20))?;
    /// # Ok::<(), raceguard::testing::HarnessError>(())
    /// ```
    pub fn wait_until_ok(&self, timeout: Duration) -> Result<(), HarnessError> {
        let mut last = String::from("not checked yet");
        let healthy = wait_until(timeout, || match self.check_ok() {
            Ok(()) => true,
            Err(why) => {
                last = why;
                false
            }
        });
        if healthy {
            Ok(())
        } else {
            Err(HarnessError::Timeout {
                what: format!(
                    "the {}-node cluster to be healthy within {timeout:?} (last: {last})",
                    self.nodes.len()
                ),
            })
        }
    }

    fn answering_nodes(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && !n.is_paused())
    }

    fn create(&self, redis_cli: &std::path::Path) -> Result<(), HarnessError> {
        let log_path = self.nodes[0].dir().join("cluster-create.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| HarnessError::io(format!("creating {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating a file handle", e))?;
        let mut cmd = Command::new(redis_cli);
        cmd.args(["--cluster", "create"]);
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port()));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError::io("spawning redis-cli --cluster create", e))?;
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let mut status = None;
        wait_until(CREATE_TIMEOUT, || {
            status = child.try_wait().ok().flatten();
            status.is_some() || Instant::now() >= deadline
        });
        let output = || fs::read_to_string(&log_path).unwrap_or_default();
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(HarnessError::ClusterCreate {
                status: status.to_string(),
                output: output(),
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(HarnessError::ClusterCreate {
                    status: format!("timed out after {CREATE_TIMEOUT:?}"),
                    output: output(),
                })
            }
        }
    }

    /// `Ok` when the cluster is healthy, else why not.
    fn check_ok(&self) -> Result<(), String> {
        let n = self.nodes.len();
        let mut views = Vec::with_capacity(n);
        for node in &self.nodes {
            let port = node.port();
            let info: String = node
                .query(&["CLUSTER", "INFO"])
                .map_err(|e| format!("node {port}: {e}"))?;
            let field = |name| info_field(&info, name).unwrap_or("?");
            if field("cluster_state") != "ok"
                || field("cluster_slots_ok") != SLOTS.to_string()
                || field("cluster_known_nodes") != n.to_string()
            {
                return Err(format!(
                    "node {port}: cluster_state:{} cluster_slots_ok:{} cluster_known_nodes:{}",
                    field("cluster_state"),
                    field("cluster_slots_ok"),
                    field("cluster_known_nodes"),
                ));
            }
            let text: String = node
                .query(&["CLUSTER", "NODES"])
                .map_err(|e| format!("node {port}: {e}"))?;
            let view: BTreeMap<u16, Vec<(u16, u16)>> = parse_cluster_nodes(&text)
                .into_iter()
                .filter(NodeEntry::is_master)
                .map(|e| (e.port, e.slots))
                .collect();
            if view.len() != n {
                return Err(format!(
                    "node {port} sees {} healthy masters, not {n}",
                    view.len()
                ));
            }
            views.push(view);
        }
        if views.windows(2).all(|w| w[0] == w[1]) {
            Ok(())
        } else {
            Err("the nodes disagree on slot ownership".into())
        }
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeEntry {
    port: u16,
    flags: Vec<String>,
    /// Inclusive slot ranges, sorted.
    slots: Vec<(u16, u16)>,
}

impl NodeEntry {
    /// A master that nobody considers failing.
    fn is_master(&self) -> bool {
        let flag = |f: &str| self.flags.iter().any(|x| x == f);
        flag("master")
            && !["fail", "fail?", "handshake", "noaddr"]
                .iter()
                .any(|f| flag(f))
    }
}

/// Parses `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_cluster_nodes(text: &str) -> Vec<NodeEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let addr = fields[1].split(['@', ',']).next()?;
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let flags = fields[2].split(',').map(str::to_owned).collect();
            let mut slots: Vec<(u16, u16)> = fields[8..]
                .iter()
                // Skip "[slot->-id]" migrating/importing markers.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => {
                        let slot = s.parse().ok()?;
                        Some((slot, slot))
                    }
                })
                .collect();
            slots.sort_unstable();
            Some(NodeEntry { port, flags, slots })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
07c37dfeb2 127.0.0.1:30004@31004,host slave e7d1eecce1 0 1426238317239 4 connected
67ed2db8d6 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365b 127.0.0.1:30003@31003 master,fail? - 0 1426238318243 3 connected 10923-16383
e7d1eecce1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 5460 0-5459 [93->-292f8b365b]
";
        let entries = parse_cluster_nodes(text);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].port, 30004);
        assert!(!entries[0].is_master());
        assert_eq!(entries[1].slots, [(5461, 10922)]);
        assert!(entries[1].is_master());
        assert!(!entries[2].is_master(), "fail? masters are not healthy");
        assert_eq!(entries[3].slots, [(0, 5459), (5460, 5460)]);
        assert!(entries[3].is_master());
    }
}
