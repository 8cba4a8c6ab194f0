//! A throw-away PostgreSQL cluster for tests: Debian's `postgresql` binaries, `initdb` in a
//! temporary directory, a Unix socket in that directory (no network port), removed afterwards.
//!
//! As root the cluster runs as the `postgres` user (initdb refuses root); as anyone else, as
//! that user. A watcher process stops the cluster and removes its directory when the test
//! process that started it dies, so a panic or a `kill -9` of the test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// One running cluster. Stopped and removed on drop (and by the watcher if the process dies).
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Server options beyond the Unix socket (a TCP port with TLS).
    extra: String,
    /// The port, which also names the Unix socket.
    port: u16,
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
        Cluster::start_with(None)
    }

    /// A cluster that also listens on 127.0.0.1 (its port returned) with TLS only, using this
    /// certificate and key; there, the role `guardd` logs in with `password`.
    pub fn start_tls(cert: &Path, key: &Path, password: &str) -> (Cluster, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let cluster = Cluster::start_with(Some(TlsPort {
            port,
            cert: cert.to_owned(),
            key: key.to_owned(),
        }));
        cluster.psql(
            "postgres",
            &format!(
                "ALTER ROLE guardd PASSWORD '{}'",
                password.replace('\'', "''")
            ),
        );
        (cluster, port)
    }

    fn start_with(tls: Option<TlsPort>) -> Cluster {
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
        let mut cluster = Cluster {
            dir,
            bin,
            extra: String::new(),
            port: tls.as_ref().map_or(5432, |t| t.port),
            runner,
            databases: AtomicUsize::new(0),
        };
        for sub in ["data", "sock"] {
            std::fs::create_dir(cluster.dir.path().join(sub)).unwrap();
        }
        if let Some(tls) = &tls {
            // The server reads its key as its own user, mode 0600.
            for (from, to) in [
                (&tls.cert, "sock/server.crt"),
                (&tls.key, "sock/server.key"),
            ] {
                let to = cluster.dir.path().join(to);
                std::fs::copy(from, &to).unwrap();
                run(Command::new("chmod").arg("600").arg(&to));
            }
            cluster.extra = format!(
                " -c listen_addresses='127.0.0.1' -c port={} -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'",
                tls.port,
                cluster.dir.path().join("sock/server.crt").display(),
                cluster.dir.path().join("sock/server.key").display()
            );
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
                "--auth-local=trust",
                // Over TCP a password is needed (and TLS, below).
                "--auth-host=scram-sha-256",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ]));
        if tls.is_some() {
            let hba = cluster.data().join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba)
                .unwrap()
                .replace("\nhost ", "\nhostssl ");
            std::fs::write(&hba, text).unwrap();
        }
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
            "postgresql://guardd@/{name}?host={}&port={}",
            self.socket_dir().display(),
            self.port
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
            .args(["-p", &self.port.to_string()])
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
        let mut options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c max_connections=300 \
             -c fsync=on -c synchronous_commit=on",
            self.socket_dir().display()
        );
        options.push_str(&self.extra);
        run(self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("sock/server.log"))
            .args(["-w", "-o", &options, "start"]));
    }

    /// Freezes every server process (SIGSTOP), as a database that stops answering would.
    pub fn pause(&self) {
        self.signal_all("-STOP");
    }

    /// Lets the server run again after [`Cluster::pause`].
    pub fn resume(&self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, signal: &str) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let postmaster = pid_file.lines().next().unwrap().trim().to_owned();
        // The postmaster and its children (backends, checkpointer, walwriter).
        let _ = Command::new("pkill")
            .args([signal, "-P", &postmaster])
            .status();
        run(Command::new("kill").args([signal, &postmaster]));
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

/// A TCP port with TLS.
struct TlsPort {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
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
