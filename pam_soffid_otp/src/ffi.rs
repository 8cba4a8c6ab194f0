//! The six `pam_sm_*` entry points. pam-bindings' `pam_hooks!` generates the `extern "C"`
//! functions and wraps each in `catch_unwind`; this file only adapts the handle, so it needs no
//! `unsafe` of its own.

use std::ffi::CStr;

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

impl PamHooks for PamSoffidOtp {
    fn sm_authenticate(pamh: &mut RawHandle, args: Vec<&CStr>, flags: PamFlag) -> PamResultCode {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let (options, warnings) = Options::parse(&args);
        for w in warnings {
            crate::log::error(&w);
        }
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        core::authenticate(&mut Handle(pamh), &host, flags & PAM_SILENT != 0, || {
            GrpcDaemon::connect(&options.socket, options.timeout)
        })
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
