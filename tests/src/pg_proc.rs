//! PostgreSQL regions as sets of real processes: a primary with strict
//! synchronous replication (`remote_apply`, `FIRST 1`, no fallback to async)
//! and a standby made with pg_basebackup, each in its own temp dir with its
//! own port and unix socket dir. A region can be killed whole (SIGKILL to the
//! postmaster and every process it spawned) and started again.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the
//! servers and tools run as the `postgres` user (Debian's package creates
//! it), else `nobody` (`CONTINUUM_PG_USER` overrides); otherwise as the
//! current user. `CONTINUUM_PG_BIN_DIR` overrides where the binaries are.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use continuum_shared::pg::decide::{rewrite_auto_conf, synchronous_standby_names};
use continuum_shared::pg::rejoin::{self, Tools};

/// Superuser created by initdb.
pub const SUPERUSER: &str = "postgres";
/// Harness settings live in their own file so a standby can override the
/// ones basebackup copied from its primary.
const REGION_CONF: &str = "continuum_region.conf";
const READY_BOUND: Duration = Duration::from_secs(30);
const TOOL_BOUND: Duration = Duration::from_secs(60);

/// Where PostgreSQL's binaries are: `CONTINUUM_PG_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/<major>/bin` (Debian layout).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CONTINUUM_PG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok();
            let bin = e.path().join("bin");
            if let Some(major) = major {
                if bin.join("postgres").exists() && best.as_ref().is_none_or(|(m, _)| major > *m) {
                    best = Some((major, bin));
                }
            }
        }
    }
    best.map_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"), |(_, p)| p)
}

/// The unprivileged account servers run as when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(RunAs {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        } else {
            None
        }
    })
}

/// The account to run PostgreSQL as: None when not root (run as ourselves).
pub fn run_as() -> Result<Option<RunAs>> {
    // /proc/self is owned by the effective uid.
    let euid = fs::metadata("/proc/self").context("stat /proc/self")?.uid();
    if euid != 0 {
        return Ok(None);
    }
    if let Ok(user) = std::env::var("CONTINUUM_PG_USER") {
        return lookup_user(&user)
            .map(Some)
            .ok_or_else(|| anyhow!("CONTINUUM_PG_USER={user}: no such user"));
    }
    lookup_user("postgres")
        .or_else(|| lookup_user("nobody"))
        .map(Some)
        .ok_or_else(|| anyhow!("running as root and neither user postgres nor nobody exists"))
}

fn chown_tree(path: &Path, who: RunAs) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(who.uid), Some(who.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            chown_tree(&e?.path(), who)?;
        }
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind for a free port")?;
    Ok(l.local_addr()?.port())
}

/// Whether `pid` still runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `pid` and all its descendants, from /proc.
fn process_tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut seen: HashSet<u32> = HashSet::from([root]);
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            for k in kids {
                if seen.insert(*k) {
                    out.push(*k);
                }
            }
        }
        i += 1;
    }
    out
}

/// Send `sig` to `pids` through the shell's builtin kill (procps' kill may
/// be missing on minimal systems; no unsafe code needed).
fn signal(sig: &str, pids: &[u32]) -> Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    // Exit status ignored: some pids may have exited meanwhile.
    Command::new("/bin/sh")
        .args(["-c", "kill -s \"$0\" \"$@\" 2>/dev/null; true", sig])
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    Ok(())
}

/// One region's PostgreSQL server.
pub struct PgRegion {
    name: String,
    /// Name of the peer this server requires as synchronous standby while primary.
    peer: String,
    _dir: tempfile::TempDir,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    port: u16,
    bin: PathBuf,
    run_as: Option<RunAs>,
    postmaster: Option<Child>,
}

impl PgRegion {
    fn new_dirs(name: &str, peer: &str) -> Result<Self> {
        let run_as = run_as()?;
        // The server's account must traverse the base directory, and a unix
        // socket path is limited to ~107 bytes: fall back to /tmp.
        let mut base = std::env::temp_dir();
        if run_as.is_some() || base.as_os_str().len() > 48 {
            base = PathBuf::from("/tmp");
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("pg-{name}-"))
            .tempdir_in(&base)
            .context("temp dir")?;
        let root = dir.path().to_path_buf();
        let sock = root.join("s");
        fs::create_dir(&sock)?;
        // Created here so that `pg_ctl start --log` (an agent restarting the
        // server as its account) can append to the same file.
        fs::write(root.join("postgres.log"), b"")?;
        if let Some(who) = run_as {
            chown_tree(&root, who)?;
        }
        Ok(PgRegion {
            name: name.to_string(),
            peer: peer.to_string(),
            data: root.join("data"),
            log: root.join("postgres.log"),
            sock,
            _dir: dir,
            port: free_port()?,
            bin: bin_dir(),
            run_as,
            postmaster: None,
        })
    }

    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.current_dir(self._dir.path());
        if let Some(who) = self.run_as {
            cmd.uid(who.uid).gid(who.gid);
        }
        cmd
    }

    fn run_tool(&self, name: &str, args: &[String]) -> Result<()> {
        let out = self
            .tool(name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {name}"))?;
        if !out.status.success() {
            bail!(
                "{name} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A primary named `name` that requires `sync_standby` (the standby's
    /// application_name) to apply every commit before it is acknowledged.
    pub fn primary(name: &str, sync_standby: &str) -> Result<Self> {
        let mut r = Self::new_dirs(name, sync_standby)?;
        r.run_tool(
            "initdb",
            &[
                format!("--pgdata={}", r.data.display()),
                format!("--username={SUPERUSER}"),
                "--auth=trust".into(),
                "--encoding=UTF8".into(),
                "--locale=C".into(),
                "--no-sync".into(),
            ],
        )?;
        let conf = r.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new().append(true).open(&conf)?;
        writeln!(f, "\ninclude_if_exists = '{REGION_CONF}'")?;
        r.write_region_conf()?;
        r.start()?;
        Ok(r)
    }

    /// A standby of `primary` named `name` (its application_name), made by
    /// pg_basebackup -R. While primary itself it requires `primary`'s region
    /// name as synchronous standby.
    pub fn standby_of(primary: &PgRegion, name: &str) -> Result<Self> {
        let mut r = Self::new_dirs(name, &primary.name)?;
        r.run_tool(
            "pg_basebackup",
            &[
                format!("--pgdata={}", r.data.display()),
                format!("--dbname={}", primary.replication_conninfo(name)),
                "--wal-method=stream".into(),
                "--checkpoint=fast".into(),
                "--write-recovery-conf".into(),
                "--no-sync".into(),
            ],
        )?;
        r.set_primary_conninfo(&primary.replication_conninfo(name))?;
        r.write_region_conf()?;
        r.start()?;
        Ok(r)
    }

    fn set_primary_conninfo(&self, conninfo: &str) -> Result<()> {
        let path = self.data.join("postgresql.auto.conf");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let out = rewrite_auto_conf(&text, &[("primary_conninfo", conninfo.to_string())], &[]);
        fs::write(&path, out)?;
        self.fix_ownership()
    }

    /// This server's own settings (port, sockets, strict synchronous replication).
    fn write_region_conf(&self) -> Result<()> {
        let names = synchronous_standby_names(Some(&self.peer)).replace('\'', "''");
        let text = format!(
            "# Written by the Continuum test harness for region {name}.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             shared_buffers = '32MB'\n\
             max_connections = 60\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             wal_keep_size = '256MB'\n\
             hot_standby = on\n\
             wal_retrieve_retry_interval = '200ms'\n\
             wal_log_hints = on\n\
             synchronous_commit = remote_apply\n\
             synchronous_standby_names = '{names}'\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] {name} '\n",
            name = self.name,
            port = self.port,
            sock = self.sock.display(),
        );
        fs::write(self.data.join(REGION_CONF), text)?;
        self.fix_ownership()
    }

    /// Give the data directory back to the server's account (after files
    /// were written from this process).
    pub fn fix_ownership(&self) -> Result<()> {
        match self.run_as {
            Some(who) => chown_tree(&self.data, who),
            None => Ok(()),
        }
    }

    /// Start the server and wait until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.reap();
        // A killed server leaves postmaster.pid; PostgreSQL checks it itself.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .tool("postgres")
            .arg("-D")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn postgres")?;
        self.postmaster = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.postmaster.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.postmaster = None;
                    bail!(
                        "postgres {} exited during startup ({status}); log tail:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-t", "1", "-h"])
                .arg(&self.sock)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                    "-d",
                    "postgres",
                ])
                .status()
                .context("run pg_isready")?
                .success();
            if ok {
                return Ok(());
            }
            if start.elapsed() > READY_BOUND {
                bail!(
                    "postgres {} not ready after {READY_BOUND:?}; log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Last lines of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The live postmaster: the one this harness spawned, else the one in
    /// `postmaster.pid` (an agent may have restarted the server with
    /// `pg_ctl`, detached from this process).
    pub fn postmaster_pid(&self) -> Option<u32> {
        if let Some(c) = &self.postmaster {
            if alive(c.id()) {
                return Some(c.id());
            }
        }
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse::<u32>().ok()?;
        alive(pid).then_some(pid)
    }

    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Pids of every process of this region (postmaster first).
    pub fn pids(&self) -> Vec<u32> {
        match self.postmaster_pid() {
            Some(pm) => process_tree(pm).into_iter().filter(|p| alive(*p)).collect(),
            None => Vec::new(),
        }
    }

    /// Reap our own postmaster child if it has exited.
    fn reap(&mut self) {
        if let Some(mut c) = self.postmaster.take() {
            if !alive(c.id()) {
                let _ = c.wait();
            } else {
                self.postmaster = Some(c);
            }
        }
    }

    /// Kill the whole region at once: stop the postmaster so it forks no
    /// more, SIGKILL it and all its descendants, and wait until they are gone.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(pm) = self.postmaster_pid() {
            signal("STOP", &[pm])?;
            let pids = process_tree(pm);
            signal("KILL", &pids)?;
            let start = Instant::now();
            while pids.iter().any(|p| alive(*p)) {
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("processes of {} survive SIGKILL: {pids:?}", self.name);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(mut child) = self.postmaster.take() {
            let _ = child.kill();
            child.wait().context("wait postmaster")?;
        }
        Ok(())
    }

    /// Fast shutdown (SIGINT: abort sessions, checkpoint, exit), bounded;
    /// falls back to kill9.
    pub fn stop(&mut self) -> Result<()> {
        let Some(pm) = self.postmaster_pid() else {
            self.reap();
            return Ok(());
        };
        signal("INT", &[pm])?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if !alive(pm) {
                self.reap();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9()
    }

    /// Stop (fast) and start again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log (also where an agent's `pg_ctl start --log` appends).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Directory of PostgreSQL's binaries.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// libpq connection string over the unix socket, as superuser.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname=postgres",
            self.sock.display(),
            self.port
        )
    }

    /// Over TCP on 127.0.0.1.
    pub fn tcp_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
            self.port
        )
    }

    /// What a standby named `application_name` uses to stream from this server.
    pub fn replication_conninfo(&self, application_name: &str) -> String {
        format!("{} application_name={application_name}", self.conninfo())
    }

    /// Tools for the shared rejoin functions, run as the data owner.
    pub fn tools(&self) -> Tools {
        Tools {
            bin_dir: self.bin.clone(),
            run_as: self.run_as.map(|w| (w.uid, w.gid)),
            timeout: TOOL_BOUND,
        }
    }

    /// Open a client connection (driven on a background task).
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        Ok(continuum_shared::pg::backend::connect(&self.conninfo()).await?)
    }

    /// Stop this former primary (fast shutdown, which sends all its WAL to a
    /// connected standby) and start it as a fenced standby of `primary`
    /// (invariant 5, no rebuild).
    pub fn follow_fenced(&mut self, primary: &PgRegion) -> Result<()> {
        self.stop()?;
        rejoin::follow_offline(&self.data, &primary.replication_conninfo(&self.name))?;
        self.fix_ownership()?;
        self.start()
    }

    /// Rebuild this former primary (stopped first) as a standby of `primary` with
    /// pg_rewind, then start it. pg_rewind copies `primary`'s config files, so
    /// this region's own settings are written again.
    pub async fn rewind_onto(&mut self, primary: &PgRegion) -> Result<rejoin::RebuildReport> {
        tokio::task::block_in_place(|| self.stop())?;
        let report = rejoin::rewind_as_standby(
            &self.tools(),
            &self.data,
            &primary.conninfo(),
            &primary.replication_conninfo(&self.name),
        )
        .await?;
        self.peer = primary.name.clone();
        self.write_region_conf()?;
        tokio::task::block_in_place(|| self.start())
            .with_context(|| format!("start after pg_rewind, which said:\n{}", report.output))?;
        Ok(report)
    }

    /// Rebuild this former primary (stopped first) from a fresh base backup
    /// of `primary`: the fallback when pg_rewind cannot run.
    pub async fn basebackup_onto(&mut self, primary: &PgRegion) -> Result<rejoin::RebuildReport> {
        tokio::task::block_in_place(|| self.stop())?;
        let report = rejoin::basebackup_as_standby(
            &self.tools(),
            &self.data,
            &primary.conninfo(),
            &primary.replication_conninfo(&self.name),
        )
        .await?;
        self.peer = primary.name.clone();
        self.write_region_conf()?;
        tokio::task::block_in_place(|| self.start()).with_context(|| {
            format!("start after pg_basebackup, which said:\n{}", report.output)
        })?;
        Ok(report)
    }
}

impl Drop for PgRegion {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}
