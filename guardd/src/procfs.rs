//! What /proc says about a process: the real uid, login session and start time of a caller
//! (see `caller`), and the peak memory and CPU time that the load tool and the hostile-user
//! tests measure guardd by.

/// The first number of the `key` line (e.g. `Uid:`, `VmHWM:`) of `/proc/PID/status`.
pub fn status_number(pid: u32, key: &str) -> Option<u64> {
    let status = read(&format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The peak resident set (VmHWM) of `pid`, in KiB; 0 when it is gone.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_number(pid, "VmHWM:").unwrap_or(0)
}

/// The audit login session of `pid` (`/proc/PID/sessionid`, set by pam_loginuid); None when
/// unset (4294967295) or unreadable.
pub fn session_id(pid: u32) -> Option<u32> {
    audit_id(pid, "sessionid")
}

/// The audit login uid of `pid` (`/proc/PID/loginuid`: whom pam_loginuid recorded as logged
/// in); None when unset or unreadable.
pub fn loginuid(pid: u32) -> Option<u32> {
    audit_id(pid, "loginuid")
}

/// An audit id of `pid` (`sessionid`, `loginuid`); None when unset (4294967295) or unreadable.
fn audit_id(pid: u32, file: &str) -> Option<u32> {
    read(&format!("/proc/{pid}/{file}"))?
        .trim()
        .parse()
        .ok()
        .filter(|&id| id != u32::MAX)
}

/// When `pid` started (clock ticks after boot): with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_field(&read(&format!("/proc/{pid}/stat"))?, 19)
}

/// This boot's id: session ids start again after a reboot.
pub fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// A /proc file's text, read into a page reserved up front: `fs::read_to_string` starts from
/// the size the file reports (0 for /proc) and asks for 32 bytes, then doubles, about eight
/// reads for a `status` file, on every connection guardd accepts.
fn read(path: &str) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(4096);
    std::fs::File::open(path).ok()?.read_to_end(&mut buf).ok()?;
    // A command name is whatever bytes the executable's file name had (`Name:` in status, the
    // field in parentheses in stat): never a reason to lose the numbers around it.
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Field `n` (counted from 0 after the command name) of a `/proc/PID/stat` text.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    // The command name (which may hold spaces and parentheses) closes with the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n)?
        .parse()
        .ok()
}

/// User plus system CPU time of `pid`, in microseconds; 0 when it is gone.
pub fn cpu_us(pid: u32) -> u64 {
    // utime and stime, of one reading.
    let stat = read(&format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks = stat_field(&stat, 11).unwrap_or(0) + stat_field(&stat, 12).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    ticks * 1_000_000 / hz.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert_eq!(
            status_number(me, "Uid:"),
            Some(u64::from(nix::unistd::getuid().as_raw()))
        );
        assert!(peak_rss_kib(me) > 0);
        assert_eq!(peak_rss_kib(u32::MAX), 0);
        assert!(start_time(me).is_some_and(|t| t > 0));
        assert_eq!(start_time(u32::MAX), None);
        assert!(boot_id().is_some_and(|b| b.len() == 36));
        // Unset in a test run without a login session, else a number; never 4294967295.
        assert_ne!(session_id(me), Some(u32::MAX));
    }

    #[test]
    fn a_command_name_that_is_not_utf8_still_reads() {
        // Any user can run a program (setuid su included) through a link named so; its real
        // uid and start time must still be read, or the caller's budget would lose its uid.
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let link = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"sl\xff\xfeep"));
        std::os::unix::fs::symlink("/bin/sleep", &link).unwrap();
        let mut child = std::process::Command::new(&link).arg("5").spawn().unwrap();
        let pid = child.id();
        // The name is set at exec: wait until /proc shows it.
        for _ in 0..100 {
            if std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(&0xff)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let uid = status_number(pid, "Uid:");
        let started = start_time(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(uid, Some(u64::from(nix::unistd::getuid().as_raw())));
        assert!(started.is_some_and(|t| t > 0));
    }
}
