//! The six `pam_sm_*` entry points. pam-bindings' `pam_hooks!` generates the `extern "C"`
//! functions and wraps each in `catch_unwind`; this file adapts the handle, and holds the
//! module's only `unsafe` (a `pam_getenv` call pam-bindings does not wrap).

// The one file where `unsafe` is allowed (the workspace denies it); each block says why it is
// sound (`clippy::undocumented_unsafe_blocks` is denied).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::Once;

use pam::constants::{PamFlag, PamResultCode, PAM_SILENT};
use pam::constants::{PAM_ERROR_MSG, PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_TEXT_INFO};
use pam::conv::Conv;
use pam::module::{PamHandle as RawHandle, PamHooks};
use zeroize::Zeroizing;

use crate::client::GrpcDaemon;
use crate::core::{self, Item, PamHandle, Style};
use crate::options::Options;

struct PamSoffidOtp;
pam::pam_hooks!(PamSoffidOtp);

extern "C" {
    /// Linux-PAM: the value of `name` in the PAM environment, or NULL.
    fn pam_getenv(pamh: *mut RawHandle, name: *const c_char) -> *const c_char;
    /// POSIX: sets the calling thread's cancelability state, returning the old one.
    fn pthread_setcancelstate(state: c_int, oldstate: *mut c_int) -> c_int;
}

/// glibc's `PTHREAD_CANCEL_DISABLE` (pthread.h: ENABLE is 0, DISABLE 1).
const PTHREAD_CANCEL_DISABLE: c_int = 1;

/// Holds the host thread's cancellation off while the module runs, and gives the old state back
/// when dropped. A host that cancels a thread blocked in the module's socket calls would
/// otherwise unwind glibc's forced unwind through Rust frames, which aborts the whole host; held
/// off, the cancel takes effect at the host's next cancellation point, after the module
/// returned (each of its calls ends by `timeout=`).
struct NoCancel(c_int);

impl NoCancel {
    fn hold() -> NoCancel {
        let mut old: c_int = 0;
        // SAFETY: pthread_setcancelstate only reads its first argument and writes the calling
        // thread's previous state through a pointer to a live local c_int.
        unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old) };
        NoCancel(old)
    }
}

impl Drop for NoCancel {
    fn drop(&mut self) {
        let mut ignored: c_int = 0;
        // SAFETY: as in `hold`; the state given back is the one glibc handed us.
        unsafe { pthread_setcancelstate(self.0, &mut ignored) };
    }
}

/// What every entry point needs: options (warnings logged), this host's name, PAM_SILENT.
fn setup(args: &[&CStr], flags: PamFlag) -> (Options, String, bool) {
    install_panic_hook();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // A fault point for the test that a panic is caught at the FFI edge by the module's own
    // unwinder (see build.rs); debug builds only, so a packaged module has no such argument.
    #[cfg(debug_assertions)]
    if args.iter().any(|a| a == "debug_panic") {
        panic!("debug_panic: a test asked the module to panic");
    }
    let (options, warnings) = Options::parse(&args);
    for w in warnings {
        crate::log::error(&w);
    }
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    (options, host, flags & PAM_SILENT != 0)
}

/// A panic inside the module is caught at the FFI edge (pam-bindings returns PAM_ABORT);
/// its message goes to syslog, not to the host's stderr (the user's terminal under sudo).
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            crate::log::error(&format!("panic: {info}"));
        }));
    });
}

impl PamHooks for PamSoffidOtp {
    fn sm_authenticate(pamh: &mut RawHandle, args: Vec<&CStr>, flags: PamFlag) -> PamResultCode {
        let _no_cancel = NoCancel::hold();
        let (options, host, silent) = setup(&args, flags);
        core::authenticate(&mut Handle(pamh), &host, silent, &options, || {
            GrpcDaemon::connect(&options.socket, options.timeout)
        })
    }

    fn acct_mgmt(pamh: &mut RawHandle, args: Vec<&CStr>, flags: PamFlag) -> PamResultCode {
        let _no_cancel = NoCancel::hold();
        let (options, host, silent) = setup(&args, flags);
        core::account(&mut Handle(pamh), &host, silent, &options, || {
            GrpcDaemon::connect(&options.socket, options.timeout)
        })
    }

    /// sshd's session stack: binds the login's reuse grants to its session (never fails it).
    fn sm_open_session(pamh: &mut RawHandle, args: Vec<&CStr>, flags: PamFlag) -> PamResultCode {
        let _no_cancel = NoCancel::hold();
        let (options, host, _) = setup(&args, flags);
        core::open_session(&mut Handle(pamh), &host, &options, || {
            GrpcDaemon::connect(&options.socket, options.timeout)
        })
    }

    /// Nothing to undo: grants end by time, `guardctl forget`, or the user's tokens.
    fn sm_close_session(_: &mut RawHandle, _: Vec<&CStr>, _: PamFlag) -> PamResultCode {
        PamResultCode::PAM_SUCCESS
    }

    /// Nothing to set: the module establishes no credentials, and must not fail the stack here.
    fn sm_setcred(_: &mut RawHandle, _: Vec<&CStr>, _: PamFlag) -> PamResultCode {
        PamResultCode::PAM_SUCCESS
    }
}

/// The real libpam handle behind the `PamHandle` trait.
struct Handle<'a>(&'a mut RawHandle);

fn text(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

impl PamHandle for Handle<'_> {
    fn user(&mut self) -> Result<String, PamResultCode> {
        self.0.get_user(None)
    }

    fn item(&self, item: Item) -> Option<String> {
        let h = &*self.0;
        match item {
            Item::Service => h.get_item::<pam::items::Service>().ok()?.map(|v| text(&v)),
            Item::RHost => h.get_item::<pam::items::RHost>().ok()?.map(|v| text(&v)),
            Item::RUser => h.get_item::<pam::items::RUser>().ok()?.map(|v| text(&v)),
            Item::Tty => h.get_item::<pam::items::Tty>().ok()?.map(|v| text(&v)),
        }
    }

    fn authtok(&self) -> Option<Zeroizing<Vec<u8>>> {
        let token = self.0.get_item::<pam::items::AuthTok>().ok()??;
        Some(Zeroizing::new(token.as_bytes().to_vec())).filter(|t| !t.is_empty())
    }

    fn env(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        let pamh: *const RawHandle = &*self.0;
        // SAFETY: `pamh` is the live handle libpam passed to this entry point (borrowed for the
        // call through `self.0`), and `name` is a NUL-terminated string that outlives the call.
        // pam_getenv returns NULL or a pointer into the handle's environment, valid until the
        // environment changes; we copy it out before returning and before any other PAM call.
        let value = unsafe { pam_getenv(pamh.cast_mut(), name.as_ptr()) };
        if value.is_null() {
            return None;
        }
        // SAFETY: non-NULL, NUL-terminated, owned by libpam and unchanged during this copy.
        Some(text(unsafe { CStr::from_ptr(value) }))
    }

    fn converse(
        &self,
        style: Style,
        text: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, PamResultCode> {
        let conv = self
            .0
            .get_item::<Conv>()?
            .ok_or(PamResultCode::PAM_CONV_ERR)?;
        let style = match style {
            Style::EchoOff => PAM_PROMPT_ECHO_OFF,
            Style::EchoOn => PAM_PROMPT_ECHO_ON,
            Style::Info => PAM_TEXT_INFO,
            Style::Error => PAM_ERROR_MSG,
        };
        Ok(conv
            .send(style, text)?
            .map(|reply| Zeroizing::new(reply.as_bytes().to_vec())))
    }
}
