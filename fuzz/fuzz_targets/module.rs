//! The module's inputs from its host and from guardd: any module arguments, any user name and
//! PAM items, any sequence of steps guardd could send, any answers the user types. The module
//! must end with a PAM code, never a panic, and must never return success without a Permit.
#![no_main]

use std::cell::RefCell;
use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use pam::constants::PamResultCode;
use pam_soffid_otp::core::{self, Daemon, DaemonError, Item, PamHandle, Style};
use pam_soffid_otp::options::Options;
use prost::Message;
use proto::v1::{step, LoginContext, Step};
use zeroize::Zeroizing;

struct Pam {
    user: String,
    items: Vec<String>,
    answers: RefCell<VecDeque<Vec<u8>>>,
}

impl PamHandle for Pam {
    fn user(&mut self) -> Result<String, PamResultCode> {
        Ok(self.user.clone())
    }
    fn item(&self, item: Item) -> Option<String> {
        let i = match item {
            Item::Service => 0,
            Item::RHost => 1,
            Item::RUser => 2,
            Item::Tty => 3,
        };
        self.items.get(i).cloned()
    }
    fn authtok(&self) -> Option<Zeroizing<Vec<u8>>> {
        self.items
            .get(4)
            .map(|s| Zeroizing::new(s.as_bytes().to_vec()))
    }
    fn env(&self, name: &str) -> Option<String> {
        (name == "SSH_CONNECTION")
            .then(|| self.items.get(5).cloned())
            .flatten()
    }
    fn converse(
        &self,
        style: Style,
        _text: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, PamResultCode> {
        match style {
            Style::EchoOff | Style::EchoOn => {
                Ok(self.answers.borrow_mut().pop_front().map(Zeroizing::new))
            }
            _ => Ok(None),
        }
    }
}

/// guardd's side, replaying steps decoded from the input; an undecodable one is an error.
struct Replay {
    steps: VecDeque<Vec<u8>>,
    permitted: bool,
}

impl Replay {
    fn next(&mut self) -> Result<Step, DaemonError> {
        let raw = self
            .steps
            .pop_front()
            .ok_or_else(|| DaemonError::Failed("no more steps".into()))?;
        let step = Step::decode(raw.as_slice()).map_err(|e| DaemonError::Failed(e.to_string()))?;
        self.permitted = matches!(step.kind, Some(step::Kind::Permit(_)));
        Ok(step)
    }
}

impl Daemon for &mut Replay {
    fn begin(&mut self, _context: LoginContext) -> Result<Step, DaemonError> {
        self.next()
    }
    fn answer(
        &mut self,
        _challenge: String,
        _response: Zeroizing<Vec<u8>>,
    ) -> Result<Step, DaemonError> {
        self.next()
    }
    fn check(&mut self, _context: LoginContext) -> Result<Step, DaemonError> {
        self.next()
    }
    fn open_session(&mut self, _context: LoginContext) -> Result<u32, DaemonError> {
        self.next().map(|_| 0)
    }
}

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xFF: module arguments (NUL-separated), user, six items, then
    // alternating steps and answers.
    let mut fields = data.split(|b| *b == 0xFF);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let args: Vec<String> = fields
        .next()
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(text)
        .collect();
    let (options, _unknown) = Options::parse(&args);
    let user = text(fields.next().unwrap_or_default());
    let items: Vec<String> = fields.by_ref().take(6).map(text).collect();
    let mut steps = VecDeque::new();
    let mut answers = VecDeque::new();
    for (i, f) in fields.enumerate() {
        if i % 2 == 0 {
            steps.push_back(f.to_vec());
        } else {
            answers.push_back(f.to_vec());
        }
    }
    let mut pam = Pam {
        user,
        items,
        answers: RefCell::new(answers),
    };
    let mut daemon = Replay {
        steps: steps.clone(),
        permitted: false,
    };
    let code = core::authenticate(&mut pam, "fuzzhost", false, &options, || Ok(&mut daemon));
    // Success only ever follows a Permit from guardd.
    assert!(code != PamResultCode::PAM_SUCCESS || daemon.permitted);
    let mut daemon = Replay {
        steps,
        permitted: false,
    };
    let _ = core::account(&mut pam, "fuzzhost", false, &options, || Ok(&mut daemon));
});
