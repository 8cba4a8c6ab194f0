use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Builder};
use zeroize::Zeroizing;

/// Secret length for new tokens: 160 bits, as RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;

/// Longest input considered a code at all; anything longer is refused before any work.
const MAX_CODE_LEN: usize = 16;

/// How a TOTP token computes its codes (RFC 6238 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtpParams {
    pub algorithm: HashAlg,
    pub digits: u8,
    pub period: u64,
}

impl Default for OtpParams {
    /// What every authenticator app understands: SHA1, 6 digits, 30 seconds.
    fn default() -> Self {
        OtpParams {
            algorithm: HashAlg::Sha1,
            digits: 6,
            period: 30,
        }
    }
}

/// The HMAC hash of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlg {
    /// The name used in otpauth:// URIs and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "SHA1",
            HashAlg::Sha256 => "SHA256",
            HashAlg::Sha512 => "SHA512",
        }
    }

    pub fn parse(name: &str) -> Option<HashAlg> {
        match name {
            "SHA1" => Some(HashAlg::Sha1),
            "SHA256" => Some(HashAlg::Sha256),
            "SHA512" => Some(HashAlg::Sha512),
            _ => None,
        }
    }

    fn to_totp(self) -> Algorithm {
        match self {
            HashAlg::Sha1 => Algorithm::SHA1,
            HashAlg::Sha256 => Algorithm::SHA256,
            HashAlg::Sha512 => Algorithm::SHA512,
        }
    }
}

/// Why a token's stored parameters cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("token parameters are invalid: {0}")]
pub struct ParamsError(#[from] totp_rs::TotpError);

/// A fresh random secret from the OS CSPRNG.
pub fn new_secret() -> Result<Zeroizing<Vec<u8>>, getrandom::Error> {
    let mut secret = Zeroizing::new(vec![0u8; SECRET_LEN]);
    getrandom::fill(&mut secret)?;
    Ok(secret)
}

/// `len` random bytes as lowercase hex: token ids and challenge ids.
pub fn random_hex(len: usize) -> Result<String, getrandom::Error> {
    let mut b = vec![0u8; len];
    getrandom::fill(&mut b)?;
    Ok(data_encoding::HEXLOWER.encode(&b))
}

/// Normalises what the user typed: surrounding whitespace and inner spaces (as in "123 456")
/// are dropped. Returns None when the result cannot be a code of `digits` digits.
pub fn normalize_code(input: &[u8], digits: u8) -> Option<Zeroizing<String>> {
    if input.len() > MAX_CODE_LEN * 2 {
        return None;
    }
    let code: Zeroizing<String> = Zeroizing::new(
        input
            .iter()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|&b| b as char)
            .collect(),
    );
    (code.len() == usize::from(digits) && code.bytes().all(|b| b.is_ascii_digit())).then_some(code)
}

/// TOTP (RFC 6238, time-based) or HOTP (RFC 4226, counter-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Totp,
    Hotp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Totp => "totp",
            Kind::Hotp => "hotp",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "totp" => Some(Kind::Totp),
            "hotp" => Some(Kind::Hotp),
            _ => None,
        }
    }
}

/// The verification state of one token: what it computes and what it accepted last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub kind: Kind,
    pub params: OtpParams,
    /// The last accepted TOTP time step or HOTP counter; None before the first code.
    pub last: Option<u64>,
    /// TOTP: the phone's clock offset seen at the last success, in steps (window centre).
    pub drift: i64,
}

/// A code that verified: the step or counter to record (never accept it again) and the drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub counter: u64,
    pub drift: i64,
}

/// Largest clock offset, in steps, that the TOTP window may follow (10 minutes at 30 s).
pub const MAX_DRIFT: i64 = 20;

/// Verification windows: TOTP steps either side of the centre, HOTP counters ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub skew: u8,
    pub look_ahead: u16,
}

/// Checks `code` for a token at Unix time `now`. Only steps or counters after `last` qualify,
/// so a code that was accepted once never verifies again. Codes are compared in constant time.
pub fn verify(
    secret: &[u8],
    counter: Counter,
    code: &[u8],
    now: u64,
    windows: Windows,
) -> Result<Option<Accepted>, ParamsError> {
    let Some(code) = normalize_code(code, counter.params.digits) else {
        return Ok(None);
    };
    let generator = Generator::new(secret, counter.kind, counter.params)?;
    let next = counter.last.map_or(0, |l| l.saturating_add(1));
    let found = match counter.kind {
        Kind::Totp => {
            let current = now / counter.params.period;
            let centre = current as i64 + counter.drift.clamp(-MAX_DRIFT, MAX_DRIFT);
            let skew = i64::from(windows.skew);
            // The centre first, then outwards: the likeliest step is tried first.
            let mut candidates: Vec<i64> = vec![centre];
            for d in 1..=skew {
                candidates.extend([centre - d, centre + d]);
            }
            candidates
                .into_iter()
                .filter_map(|c| u64::try_from(c).ok())
                .filter(|&c| c >= next)
                .find(|&c| generator.matches(c, &code))
                .map(|c| Accepted {
                    counter: c,
                    drift: (c as i64 - current as i64).clamp(-MAX_DRIFT, MAX_DRIFT),
                })
        }
        Kind::Hotp => (next..next.saturating_add(u64::from(windows.look_ahead)))
            .find(|&c| generator.matches(c, &code))
            .map(|c| Accepted {
                counter: c,
                drift: 0,
            }),
    };
    Ok(found)
}

/// HOTP resynchronisation: finds two consecutive codes `first`, `second` within `window`
/// counters after `last`, and returns the counter of `second` to record.
pub fn resync(
    secret: &[u8],
    counter: Counter,
    first: &[u8],
    second: &[u8],
    window: u64,
) -> Result<Option<u64>, ParamsError> {
    let digits = counter.params.digits;
    let (Some(first), Some(second)) = (
        normalize_code(first, digits),
        normalize_code(second, digits),
    ) else {
        return Ok(None);
    };
    let generator = Generator::new(secret, counter.kind, counter.params)?;
    let next = counter.last.map_or(0, |l| l.saturating_add(1));
    Ok((next..next.saturating_add(window))
        .find(|&c| generator.matches(c, &first) && generator.matches(c + 1, &second))
        .map(|c| c + 1))
}

/// Computes the code for a counter (HOTP) or time step (TOTP).
struct Generator {
    totp: totp_rs::Totp,
    /// Seconds per counter unit: the period for TOTP, 1 for HOTP (a 1-second TOTP is HOTP).
    unit: u64,
}

impl Generator {
    fn new(secret: &[u8], kind: Kind, params: OtpParams) -> Result<Generator, ParamsError> {
        let unit = match kind {
            Kind::Totp => params.period,
            Kind::Hotp => 1,
        };
        let totp = Builder::new()
            .with_algorithm(params.algorithm.to_totp())
            .with_digits(params.digits)
            .with_step_duration(unit)
            .with_secret(secret)
            .build()?;
        Ok(Generator { totp, unit })
    }

    fn code(&self, counter: u64) -> Zeroizing<String> {
        Zeroizing::new(
            self.totp
                .generate(counter.saturating_mul(self.unit))
                .to_string(),
        )
    }

    fn matches(&self, counter: u64, code: &str) -> bool {
        self.code(counter).as_bytes().ct_eq(code.as_bytes()).into()
    }
}

/// The otpauth:// URI an authenticator app scans. It carries the secret: show it once, never log it.
pub fn otpauth_uri(
    issuer: &str,
    user: &str,
    secret: &[u8],
    kind: Kind,
    params: OtpParams,
) -> Zeroizing<String> {
    let secret = Zeroizing::new(data_encoding::BASE32_NOPAD.encode(secret));
    let issuer = percent_encode(issuer);
    let tail = match kind {
        Kind::Totp => format!("period={}", params.period),
        Kind::Hotp => "counter=0".to_owned(),
    };
    Zeroizing::new(format!(
        "otpauth://{kind}/{issuer}:{user}?secret={secret}&issuer={issuer}&algorithm={alg}&digits={digits}&{tail}",
        kind = kind.as_str(),
        user = percent_encode(user),
        secret = secret.as_str(),
        alg = params.algorithm.as_str(),
        digits = params.digits,
    ))
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The code a token shows for `counter` (HOTP) or at Unix time `counter` (TOTP); for tests,
/// benchmarks and the RFC vector checks.
pub fn code_for(
    secret: &[u8],
    kind: Kind,
    params: OtpParams,
    counter: u64,
) -> Result<String, ParamsError> {
    let generator = Generator::new(secret, kind, params)?;
    let counter = match kind {
        Kind::Totp => counter / params.period,
        Kind::Hotp => counter,
    };
    Ok(generator.code(counter).to_string())
}

/// The TOTP code at Unix time `now`.
pub fn totp_code(secret: &[u8], params: OtpParams, now: u64) -> Result<String, ParamsError> {
    code_for(secret, Kind::Totp, params, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Windows = Windows {
        skew: 1,
        look_ahead: 10,
    };

    fn verify_totp(
        secret: &[u8],
        params: OtpParams,
        code: &[u8],
        now: u64,
        skew: u8,
    ) -> Result<Option<u64>, ParamsError> {
        let counter = Counter {
            kind: Kind::Totp,
            params,
            last: None,
            drift: 0,
        };
        let windows = Windows { skew, ..W };
        Ok(verify(secret, counter, code, now, windows)?.map(|a| a.counter))
    }

    fn hotp(last: Option<u64>) -> Counter {
        Counter {
            kind: Kind::Hotp,
            params: OtpParams::default(),
            last,
            drift: 0,
        }
    }

    const RFC4226_SECRET: &[u8] = b"12345678901234567890";
    const RFC4226_CODES: [&str; 10] = [
        "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871",
        "520489",
    ];

    #[test]
    fn rfc4226_appendix_d_vectors() {
        for (i, code) in RFC4226_CODES.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                code_for(RFC4226_SECRET, Kind::Hotp, OtpParams::default(), i).unwrap(),
                *code
            );
            let last = i.checked_sub(1);
            let got = verify(RFC4226_SECRET, hotp(last), code.as_bytes(), 0, W).unwrap();
            assert_eq!(
                got,
                Some(Accepted {
                    counter: i,
                    drift: 0
                })
            );
        }
    }

    #[test]
    fn hotp_counter_only_moves_forward_within_the_look_ahead() {
        let code3 = RFC4226_CODES[3].as_bytes();
        assert!(verify(RFC4226_SECRET, hotp(Some(3)), code3, 0, W)
            .unwrap()
            .is_none());
        assert!(verify(RFC4226_SECRET, hotp(Some(5)), code3, 0, W)
            .unwrap()
            .is_none());
        let short = Windows { look_ahead: 2, ..W };
        assert!(verify(RFC4226_SECRET, hotp(None), code3, 0, short)
            .unwrap()
            .is_none());
        assert!(verify(RFC4226_SECRET, hotp(Some(1)), code3, 0, short)
            .unwrap()
            .is_some());
    }

    #[test]
    fn hotp_resync_needs_two_consecutive_codes() {
        let c = |i: usize| RFC4226_CODES[i].as_bytes();
        assert_eq!(
            resync(RFC4226_SECRET, hotp(None), c(7), c(8), 100).unwrap(),
            Some(8)
        );
        assert_eq!(
            resync(RFC4226_SECRET, hotp(None), c(7), c(9), 100).unwrap(),
            None
        );
        assert_eq!(
            resync(RFC4226_SECRET, hotp(Some(8)), c(7), c(8), 100).unwrap(),
            None
        );
    }

    #[test]
    fn totp_replay_and_drift() {
        let s = seed(HashAlg::Sha1);
        let p = OtpParams::default();
        let now = 3_000_000_000;
        let step = now / 30;
        let code = totp_code(&s, p, now).unwrap();
        let mut c = Counter {
            kind: Kind::Totp,
            params: p,
            last: Some(step),
            drift: 0,
        };
        assert!(
            verify(&s, c, code.as_bytes(), now, W).unwrap().is_none(),
            "replay"
        );
        // A phone 2 steps behind is outside ±1 until the window follows its drift.
        let behind = totp_code(&s, p, now - 60).unwrap();
        c.last = None;
        assert!(verify(&s, c, behind.as_bytes(), now, W).unwrap().is_none());
        c.drift = -2;
        let got = verify(&s, c, behind.as_bytes(), now, W).unwrap().unwrap();
        assert_eq!((got.counter, got.drift), (step - 2, -2));
    }

    /// RFC 6238 appendix B: the seeds are the ASCII digits repeated to the hash's length.
    fn seed(alg: HashAlg) -> Vec<u8> {
        let len = match alg {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        };
        b"1234567890".iter().cycle().take(len).copied().collect()
    }

    const VECTORS: &[(u64, &str, &str, &str)] = &[
        (59, "94287082", "46119246", "90693936"),
        (1111111109, "07081804", "68084774", "25091201"),
        (1111111111, "14050471", "67062674", "99943326"),
        (1234567890, "89005924", "91819424", "93441116"),
        (2000000000, "69279037", "90698825", "38618901"),
        (20000000000, "65353130", "77737706", "47863826"),
    ];

    #[test]
    fn rfc6238_appendix_b_vectors_verify() {
        for &(time, sha1, sha256, sha512) in VECTORS {
            for (alg, code) in [
                (HashAlg::Sha1, sha1),
                (HashAlg::Sha256, sha256),
                (HashAlg::Sha512, sha512),
            ] {
                let params = OtpParams {
                    algorithm: alg,
                    digits: 8,
                    period: 30,
                };
                let step = verify_totp(&seed(alg), params, code.as_bytes(), time, 0).unwrap();
                assert_eq!(step, Some(time / 30), "{alg:?} at {time}");
                assert_eq!(totp_code(&seed(alg), params, time).unwrap(), code);
            }
        }
    }

    #[test]
    fn wrong_and_malformed_codes_are_refused() {
        let s = seed(HashAlg::Sha1);
        let p = OtpParams {
            digits: 8,
            ..OtpParams::default()
        };
        for bad in [
            &b"94287083"[..],
            b"",
            b"9428708",
            b"942870822",
            b"+4287082",
            b"9428708a",
            &[0xff; 8],
            &[b'9'; 100_000],
        ] {
            assert_eq!(verify_totp(&s, p, bad, 59, 1).unwrap(), None);
        }
    }

    #[test]
    fn skew_accepts_neighbouring_steps_only() {
        let s = seed(HashAlg::Sha1);
        let p = OtpParams::default();
        let code = totp_code(&s, p, 1_000_020).unwrap();
        assert!(verify_totp(&s, p, code.as_bytes(), 1_000_050, 1)
            .unwrap()
            .is_some());
        assert!(verify_totp(&s, p, code.as_bytes(), 1_000_050, 0)
            .unwrap()
            .is_none());
        assert!(verify_totp(&s, p, code.as_bytes(), 1_000_080, 1)
            .unwrap()
            .is_none());
    }

    #[test]
    fn spaces_in_a_typed_code_are_ignored() {
        let s = seed(HashAlg::Sha1);
        let p = OtpParams::default();
        let code = totp_code(&s, p, 5000).unwrap();
        let spaced = format!(" {} {} \n", &code[..3], &code[3..]);
        assert!(verify_totp(&s, p, spaced.as_bytes(), 5000, 0)
            .unwrap()
            .is_some());
    }

    #[test]
    fn uri_carries_parameters_and_encodes_names() {
        let uri = otpauth_uri(
            "my host",
            "ann",
            &[0u8; 20],
            Kind::Totp,
            OtpParams::default(),
        );
        assert_eq!(
            uri.as_str(),
            "otpauth://totp/my%20host:ann?secret=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA&issuer=my%20host&algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn hotp_uri_carries_the_counter() {
        let uri = otpauth_uri("h", "bob", &[0u8; 20], Kind::Hotp, OtpParams::default());
        assert!(uri.starts_with("otpauth://hotp/h:bob?") && uri.ends_with("&counter=0"));
    }

    #[test]
    fn new_secrets_are_160_bits_and_differ() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_eq!(a.len(), 20);
        assert_ne!(*a, *b);
    }
}
