//! A throw-away PostgreSQL cluster for tests: Debian's `postgresql` binaries, `initdb` in a
//! temporary directory, a Unix socket in that directory (no network port), removed afterwards.
//!
//! As root the cluster runs as the `postgres` user (initdb refuses root); as anyone else, as
//! that user. A watcher process stops the cluster and removes its directory when the test
//! process that started it dies, so a panic or a `kill -9` of the test leaves nothing running.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// One running cluster. Stopped and removed on drop (and by the watcher if the process dies).
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Run the server's own commands as this user (root may not run them).
    runner: Option<&'static str>,
    databases: AtomicUsize,
}

impl Cluster {
    /// The cluster shared by all tests of this process, started on first use.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    /// Starts a new cluster of its own (for tests that stop or restart the server).
    pub fn start() -> Cluster {
        let bin = bin_dir();
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false);
        let runner = is_root.then_some("postgres");
        let dir = tempfile::Builder::new()
            .prefix("soffid-otp-pg")
            .tempdir()
            .expect("temporary directory for the PostgreSQL cluster");
        let cluster = Cluster {
            dir,
            bin,
            runner,
            databases: AtomicUsize::new(0),
        };
        for sub in ["data", "sock"] {
            std::fs::create_dir(cluster.dir.path().join(sub)).unwrap();
        }
        if runner.is_some() {
            // The temporary directory is 0700 root: let the postgres user into it.
            run(Command::new("chmod").arg("755").arg(cluster.dir.path()));
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path().join("data"))
                .arg(cluster.dir.path().join("sock")));
        }
        run(cluster
            .server_command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ]));
        cluster.start_server();
        cluster.watch();
        cluster.psql("postgres", "CREATE ROLE guardd LOGIN");
        cluster
    }

    /// A new, empty database owned by the role `guardd`; its URL for guardd.
    pub fn database(&self) -> String {
        let name = format!(
            "guardd_{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER guardd"));
        self.url(&name)
    }

    /// The URL of database `name` for role `guardd` over the cluster's Unix socket.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgresql://guardd@/{name}?host={}",
            self.socket_dir().display()
        )
    }

    /// Runs `sql` as the superuser in database `db`; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run(Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(self.socket_dir())
            .args(["-d", db, "-c", sql]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Stops the server at once (as a crash would: no checkpoint, clients cut off).
    pub fn stop(&self) {
        run(self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]));
    }

    /// Starts the server again after [`Cluster::stop`].
    pub fn start_server(&self) {
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c max_connections=300 \
             -c fsync=on -c synchronous_commit=on",
            self.socket_dir().display()
        );
        run(self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("sock/server.log"))
            .args(["-w", "-o", &options, "start"]));
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sock/server.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn server_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = match self.runner {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        // The postgres user must be able to read its working directory.
        cmd.current_dir("/");
        cmd
    }

    /// A detached shell that stops the cluster and removes its directory once this process is
    /// gone, whatever way it ends.
    fn watch(&self) {
        let stop = format!(
            "{} {} -D '{}' -m immediate -w stop",
            self.runner
                .map(|u| format!("runuser -u {u} --"))
                .unwrap_or_default(),
            self.bin.join("pg_ctl").display(),
            self.data().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; cd /; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.path().display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The newest installed PostgreSQL's binaries.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("PostgreSQL is not installed: run `bash scripts/deps.sh test` (Debian's postgresql)")
    })
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cluster_starts_serves_and_restarts() {
        let c = super::Cluster::start();
        let url = c.database();
        assert!(url.starts_with("postgresql://guardd@/guardd_"), "{url}");
        assert_eq!(c.psql("postgres", "SELECT 1 + 1"), "2");
        c.stop();
        c.start_server();
        assert_eq!(c.psql("postgres", "SELECT 2 + 2"), "4");
    }
}
