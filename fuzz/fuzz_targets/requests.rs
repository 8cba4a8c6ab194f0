//! What a hostile client can send: any bytes as each request message, through the same input
//! validation the handlers run before anything else.
#![no_main]

use guardd::otp::{self, Counter, Kind, OtpParams, Windows};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::v1::{AnswerRequest, BeginRequest, EnrollRequest, ExplainRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = BeginRequest::decode(data) {
        if let Some(ctx) = req.context {
            let _ = guardd::service::validate_context(&ctx);
        }
    }
    if let Ok(req) = ExplainRequest::decode(data) {
        if let Some(ctx) = req.context {
            let _ = guardd::service::validate_context(&ctx);
        }
    }
    if let Ok(req) = AnswerRequest::decode(data) {
        let _ = guardd::backup::normalize(&req.response);
        let _ = guardd::accounts::new_password(&req.response);
        for kind in [Kind::Totp, Kind::Hotp] {
            let counter = Counter {
                kind,
                params: OtpParams::default(),
                last: Some(55_000_000),
                drift: -1,
            };
            let windows = Windows {
                skew: 10,
                look_ahead: 1000,
            };
            let _ = otp::verify(&[7u8; 20], counter, &req.response, 1_700_000_000, windows);
        }
    }
    if let Ok(req) = EnrollRequest::decode(data) {
        let _ = guardd::service::validate_name("user", &req.user);
        let _ = guardd::backup::normalize(&req.invitation);
    }
});
