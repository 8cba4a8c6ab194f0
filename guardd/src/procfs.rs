//! What /proc says about a process: the real uid of a caller (see `caller`), and the peak
//! memory and CPU time that the load tool and the hostile-user tests measure guardd by.

/// The first number of the `key` line (e.g. `Uid:`, `VmHWM:`) of `/proc/PID/status`.
pub fn status_number(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
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

/// User plus system CPU time of `pid`, in microseconds; 0 when it is gone.
pub fn cpu_us(pid: u32) -> u64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) close with ')'; utime and
            // stime are the 12th and 13th after it.
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let field = |n: usize| rest.get(n)?.parse::<u64>().ok();
            Some(field(11)? + field(12)?)
        })
        .unwrap_or(0);
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
    }
}
