//! A throwaway Postgres for tests (feature `testing`): a real server, so the
//! Postgres code path is tested as it runs in production.
//!
//! One cluster per test process ([`PgCluster::shared`]) serves every test,
//! each in its own database ([`PgCluster::fresh_database`]). It listens only
//! on a Unix socket in its own temporary directory and runs with fsync off,
//! so it starts in about a second and leaves nothing behind.
//!
//! Tear-down cannot rely on destructors: Rust never drops statics, and a test
//! process may also panic, abort or be killed. So Postgres runs as the child
//! of a supervisor shell whose stdin is a pipe from this process. When the
//! process ends for any reason the kernel closes the pipe; the supervisor then
//! shuts Postgres down, reaps it (no zombie waits for init) and deletes the
//! directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// Where Debian's `postgresql-15` package puts the server binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Waits for a line on stdin before starting the server (so that a failed
/// `initdb` still gets its directory removed), then for end-of-file, then
/// stops the server with SIGQUIT (immediate shutdown: nothing is worth
/// keeping). It ignores SIGINT and SIGHUP so that a Ctrl-C to the test still
/// gets cleaned up after. `$1` is the directory, the rest the server command.
const SUPERVISOR: &str = r#"
trap '' INT HUP
dir=$1; shift
if read -r _; then
    "$@" >"$dir/postgres.log" 2>&1 &
    server=$!
    cat >/dev/null
    kill -QUIT "$server" 2>/dev/null
    wait "$server"
fi
rm -rf "$dir"
"#;

/// A running Postgres cluster, stopped when dropped or when the process exits.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    /// Closing the pipe (drop or process exit) makes the supervisor tear down.
    supervisor: Mutex<Option<(Child, ChildStdin)>>,
    databases: AtomicU32,
}

impl PgCluster {
    /// The process-wide cluster, started on first use.
    ///
    /// # Panics
    /// If the Postgres 15 binaries are missing or the cluster fails to start:
    /// a test that needs Postgres must fail, never silently skip.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// Starts a new cluster in a fresh temporary directory.
    ///
    /// # Panics
    /// As [`PgCluster::shared`].
    pub fn start() -> PgCluster {
        let started = Instant::now();
        let bin = Path::new(PG_BIN);
        assert!(
            ["initdb", "postgres", "pg_isready"]
                .iter()
                .all(|b| bin.join(b).exists()),
            "Postgres 15 server binaries not found in {PG_BIN}: install the Debian package \
             postgresql-15 (apt-get install postgresql-15); garret-meta's tests need a real \
             Postgres"
        );
        let dir = tempfile::Builder::new()
            .prefix("garret-pg-")
            .tempdir()
            .expect("create a temporary directory for Postgres")
            .keep();
        // Postgres refuses to run as root.
        let as_postgres = is_root(&dir);
        let port = pseudo_random_port();
        let data = dir.join("data");
        let mut server = PgCluster::as_user(as_postgres, "postgres");
        server
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .arg("-p")
            .arg(port.to_string());
        for setting in [
            "listen_addresses=",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=200",
            // Tests provoke deadlocks on purpose; find them quickly.
            "deadlock_timeout=50ms",
        ] {
            server.args(["-c", setting]);
        }
        let mut supervisor = Command::new("sh")
            .args(["-c", SUPERVISOR, "sh"])
            .arg(&dir)
            .arg(server.get_program())
            .args(server.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the Postgres supervisor");
        let stdin = supervisor.stdin.take().expect("piped stdin");
        // From here on, dropping `cluster` (a panic below included) cleans up.
        let cluster = PgCluster {
            dir,
            port,
            supervisor: Mutex::new(Some((supervisor, stdin))),
            databases: AtomicU32::new(0),
        };
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&cluster.dir));
        }
        run(PgCluster::as_user(as_postgres, "initdb")
            .arg("--pgdata")
            .arg(&data)
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--no-locale", "--no-sync", "--no-instructions"]));
        {
            let mut supervisor = cluster.supervisor.lock().expect("not poisoned");
            let (_, stdin) = supervisor.as_mut().expect("armed above");
            stdin
                .write_all(b"start\n")
                .expect("tell the supervisor to start Postgres");
        }
        cluster.wait_until_ready();
        eprintln!(
            "garret-meta: Postgres started in {:?} at {}",
            started.elapsed(),
            cluster.dir.display()
        );
        cluster
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .arg("--quiet")
                .arg("--host")
                .arg(&self.dir)
                .arg("--port")
                .arg(self.port.to_string())
                .status()
                .expect("run pg_isready")
                .success();
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Postgres did not start within 60 s; its log:\n{}",
                std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// URL of the `postgres` maintenance database.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// URL of database `name` on this cluster, over its Unix socket.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{name}?host={}",
            self.port,
            self.dir.display()
        )
    }

    /// Creates an empty database no one else uses and returns its URL.
    ///
    /// # Panics
    /// If the cluster does not accept the connection or the `CREATE DATABASE`.
    pub async fn fresh_database(&self) -> String {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let mut admin = PgConnection::connect(&self.admin_url())
            .await
            .expect("connect to the test cluster");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        admin.close().await.expect("close the admin connection");
        self.url(&name)
    }

    /// Freezes every process of the cluster (SIGSTOP): to its clients the
    /// database is unreachable, connections open but nothing answering,
    /// as across a network partition. [`PgCluster::resume`] thaws it.
    ///
    /// # Panics
    /// If the server's pid file cannot be read or `kill` fails.
    pub fn pause(&self) {
        self.signal_all("-STOP");
    }

    /// Undoes [`PgCluster::pause`].
    ///
    /// # Panics
    /// As [`PgCluster::pause`].
    pub fn resume(&self) {
        self.signal_all("-CONT");
    }

    /// Sends `signal` to the postmaster and every process it started.
    fn signal_all(&self, signal: &str) {
        let pid_file = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .expect("the postmaster's pid file");
        let postmaster = pid_file.lines().next().expect("a pid").trim().to_owned();
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // After the command name in parentheses: state, then the ppid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        run(Command::new("kill").arg(signal).args(&pids));
    }

    /// A Postgres program, run as the `postgres` user if `as_postgres`.
    /// `setpriv` execs rather than forks, so the program stays the direct
    /// child of whoever spawns it.
    fn as_user(as_postgres: bool, program: &str) -> Command {
        let program = Path::new(PG_BIN).join(program);
        let mut command = if as_postgres {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .arg(program);
            c
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }
}

impl Drop for PgCluster {
    /// Stops the cluster now rather than at process exit.
    fn drop(&mut self) {
        let supervisor = self.supervisor.get_mut().map(Option::take);
        if let Ok(Some((mut child, stdin))) = supervisor {
            drop(stdin);
            // An error means the supervisor is already gone, which is all we want.
            let _ = child.wait();
        }
    }
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether this process is root, judged by the owner of a directory it just
/// created (std exposes no `geteuid`, and this crate forbids `unsafe`).
fn is_root(fresh_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(fresh_dir)
        .expect("stat the temporary directory")
        .uid()
        == 0
}

/// The socket lives in a private directory, so the port only has to differ
/// from other clusters' for Postgres' shared memory keys; any collision there
/// is detected and skipped by Postgres itself.
fn pseudo_random_port() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 40_000;
    20_000 + u16::try_from(spread).expect("below 40000")
}
