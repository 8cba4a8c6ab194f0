//! The calling process as a pidfd: who it really is, asked of the kernel without /proc.
//!
//! `SO_PEERPIDFD` (Linux 6.5) hands guardd a pidfd of the process that connected, and
//! `PIDFD_GET_INFO` (Linux 6.13) reads that process's credentials through it: its real uid
//! (the user behind a setuid-root sudo or su) for a few microseconds, where parsing
//! `/proc/PID/status` costs 50-60 µs of every root login's connect on the development machine
//! (README.md, Benchmarks). The pidfd names the process itself, never a pid that was reused
//! since: once that process has exited the kernel says so (`Described::Gone`, and `runs`), and
//! nothing is read by its pid. On older kernels either call fails and `caller` reads /proc.
//!
//! guardd's one foreign call that no crate wraps safely (the ioctl) lives here; the workspace
//! denies `unsafe` everywhere else in the daemon.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// `struct pidfd_info` as Linux 6.13 first published it (`PIDFD_INFO_SIZE_VER0`, 64 bytes):
/// the kernel fills what it knows of the size we pass and nothing beyond.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    /// Spare in 6.13; the exit code (PIDFD_INFO_EXIT) since 6.15. Never asked for here.
    spare0: u32,
}

const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);

/// `PIDFD_INFO_CREDS`: the uids and gids (always returned; asked for to be explicit).
const PIDFD_INFO_CREDS: u64 = 1 << 1;

// PIDFD_GET_INFO = _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info).
nix::ioctl_readwrite!(pidfd_get_info, 0xFF, 11, PidfdInfo);

/// The pidfd of the process at the other end of `stream`, the one that connected; None on
/// kernels before 6.5 (ENOPROTOOPT). Since 6.16 a peer already reaped still gets one, which
/// `describe` reports as gone.
pub fn of_peer(stream: &impl AsFd) -> Option<OwnedFd> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok()
}

/// What the kernel says of the process behind a pidfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Described {
    /// Its pid (in guardd's pid namespace) and real uid (in guardd's user namespace).
    As { pid: u32, real_uid: u32 },
    /// It has exited (ESRCH): whatever holds its pid now is another process.
    Gone,
    /// The kernel cannot say: before 6.13 (ENOTTY), or a process outside guardd's pid
    /// namespace.
    Unknown,
}

/// What the kernel says of the process behind `pidfd` now.
pub fn describe(pidfd: &OwnedFd) -> Described {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_CREDS,
        ..PidfdInfo::default()
    };
    // SAFETY: `pidfd` is an open descriptor we own for the whole call, and `info` is a live,
    // writable, properly aligned `struct pidfd_info` of exactly the size the request number
    // encodes (64 bytes, checked at compile time), which is all the kernel reads or writes.
    match unsafe { pidfd_get_info(pidfd.as_raw_fd(), &mut info) } {
        Err(nix::errno::Errno::ESRCH) => Described::Gone,
        Ok(_) if info.mask & PIDFD_INFO_CREDS != 0 && info.pid != 0 => Described::As {
            pid: info.pid,
            real_uid: info.ruid,
        },
        _ => Described::Unknown,
    }
}

/// Whether the process behind `pidfd` still runs: a pidfd turns readable when its process
/// exits (Linux 5.3), so a poll that does not wait tells.
pub fn runs(pidfd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}
