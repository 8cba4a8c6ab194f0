//! Moving a site: a real guardd on SQLite, copied offline with `guardd --copy-to` to PostgreSQL
//! and back to a fresh SQLite file. After each move the token logs in through the PAM module, and
//! the codes used before the move stay used.

use std::path::Path;
use std::process::Command;

use guardd::store::copy::{Dump, Target};
use guardd::store::PgSettings;
use harness::{artefact, Daemon, PamServices, Secret, SharedStore, User, STRICT_RULES};

const CONFIG: &str = "max_tries = 1\n";

/// One login of `user` through the built module under pam_wrapper, answering `code`.
fn pam_login(d: &Daemon, user: &str, code: &str) -> bool {
    d.remember(code);
    let line = PamServices::module_line(&format!("socket={} timeout=5", d.socket.display()));
    let pam = PamServices::new("otp-move", &line);
    pam.pamtester("otp-move", user, &format!("{code}\n"))
        .status
        .success()
}

/// `guardd --copy-to DEST` with `d`'s configuration file, from `database` sealed with `key`;
/// its report.
fn copy(d: &Daemon, database: &str, key: &Path, dest: &str) -> String {
    let out = harness::run(
        Command::new(artefact("guardd"))
            .arg("--config")
            .arg(d.dir.path().join("guardd.toml"))
            .args(["--database", database, "--key-file"])
            .arg(key)
            .args(["--copy-to", dest]),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn postgres(url: &str) -> Target {
    Target::Postgres(PgSettings {
        url: url.into(),
        password_file: None,
        ca_file: None,
        host: "test".into(),
    })
}

/// A daemon on an existing store (`database`: a SQLite path or a URL) sealed with `key`.
fn daemon_on(database: &str, key: &Path, secret: &Secret, codes: &[String]) -> Daemon {
    let shared = SharedStore {
        url: database.into(),
        key_file: key.into(),
    };
    let d = Daemon::on_store(STRICT_RULES, CONFIG, Some(&shared));
    d.remember(&secret.base32());
    for c in codes {
        d.remember(c);
    }
    d
}

/// Needs root: a local user, guardctl as an admin. Run by the test command as root.
mod as_root {
    use super::*;

    #[test]
    #[ignore = "needs root"]
    fn a_site_moves_to_postgresql_and_back_and_its_used_codes_stay_used() {
        let user = User::create_named("otpmove");
        let u = user.name.as_str();

        // On SQLite: an HOTP token enrolled and confirmed with guardctl, backup codes, one login.
        let mut sqlite = Daemon::with_config(STRICT_RULES, CONFIG);
        let (ok, out) =
            sqlite.guardctl_as(None, &["enroll", u, "--hotp", "--label", "moving"], &[]);
        assert!(ok, "{out}");
        let uri = out
            .split_whitespace()
            .find(|w| w.starts_with("otpauth://"))
            .unwrap();
        let secret = Secret::from_uri(uri);
        sqlite.remember(uri);
        sqlite.remember(&secret.base32());
        let (ok, out) = sqlite.guardctl_as(None, &["confirm", u, &secret.hotp(0)], &[]);
        assert!(ok, "{out}");
        let (ok, out) = sqlite.guardctl_as(None, &["backup-codes", u], &[]);
        assert!(ok, "{out}");
        let codes: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("  "))
            .map(str::to_owned)
            .collect();
        assert_eq!(codes.len(), 10, "{out}");
        for c in &codes {
            sqlite.remember(c);
        }
        assert!(pam_login(&sqlite, u, &secret.hotp(1)), "{}", sqlite.log());
        assert!(sqlite.stop());

        // SQLite → PostgreSQL.
        let db = sqlite.dir.path().join("lib/guardd.db");
        let key = sqlite.dir.path().join("etc/guardd.key");
        let original = Dump::read(&Target::Sqlite(db.clone()), &key).unwrap();
        let counts = original.counts();
        assert_eq!(
            (counts.tokens, counts.backup_codes, counts.bindings),
            (1, 10, 1)
        );
        let url = pgtemp::Cluster::shared().database();
        let report = copy(&sqlite, db.to_str().unwrap(), &key, &url);
        assert!(report.contains(&format!("copied: {counts}\n")), "{report}");
        assert!(report.ends_with("verified\n"), "{report}");
        assert_eq!(Dump::read(&postgres(&url), &key).unwrap(), original);

        // On PostgreSQL: the next code works, the one used on SQLite does not.
        let mut shared = daemon_on(&url, &key, &secret, &codes);
        assert!(pam_login(&shared, u, &secret.hotp(2)), "{}", shared.log());
        assert!(
            !pam_login(&shared, u, &secret.hotp(1)),
            "replay after the move"
        );
        assert!(!pam_login(&shared, u, &secret.hotp(2)), "replay");
        assert!(shared.stop());

        // PostgreSQL → a fresh SQLite file: equal to what PostgreSQL holds, the counter moved on.
        let moved = tempfile::tempdir().unwrap();
        let back = moved.path().join("guardd.db");
        let moved_pg = Dump::read(&postgres(&url), &key).unwrap();
        let report = copy(&shared, &url, &key, back.to_str().unwrap());
        assert!(
            report.contains(&format!("copied: {}\n", moved_pg.counts())),
            "{report}"
        );
        assert!(report.ends_with("verified\n"), "{report}");
        let returned = Dump::read(&Target::Sqlite(back.clone()), &key).unwrap();
        assert_eq!(returned, moved_pg);
        assert_eq!(returned.backup_codes, original.backup_codes);
        assert_eq!(returned.bindings, original.bindings);
        let id = original.tokens.keys().next().unwrap();
        let (before, after) = (&original.tokens[id], &returned.tokens[id]);
        assert_eq!((before.last, after.last), (Some(1), Some(2)));
        assert_eq!(
            after.secret, before.secret,
            "sealed bytes copied as they are"
        );
        // Copying again changes nothing.
        let again = copy(&shared, &url, &key, back.to_str().unwrap());
        assert!(
            again.contains(
                "written: tokens 0, lockouts 0, backup_codes 0, invitations 0, bindings 0"
            ),
            "{again}"
        );

        // On the SQLite copy: the next code works, the one used on PostgreSQL does not.
        let home = daemon_on(back.to_str().unwrap(), &key, &secret, &codes);
        assert!(pam_login(&home, u, &secret.hotp(3)), "{}", home.log());
        assert!(
            !pam_login(&home, u, &secret.hotp(2)),
            "replay after the move back"
        );
    }
}
