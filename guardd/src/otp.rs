use totp_rs::{Algorithm, Builder};
use zeroize::Zeroizing;

/// Secret length for new tokens: 160 bits, as RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;

/// Longest input considered a code at all; anything longer is refused before any work.
const MAX_CODE_LEN: usize = 16;

/// How a TOTP token computes its codes (RFC 6238 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotpParams {
    pub algorithm: HashAlg,
    pub digits: u8,
    pub period: u64,
}

impl Default for TotpParams {
    /// What every authenticator app understands: SHA1, 6 digits, 30 seconds.
    fn default() -> Self {
        TotpParams {
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
pub struct ParamsError(String);

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

/// Checks `code` against the TOTP `secret` at Unix time `now`, allowing `skew` steps either way.
/// Returns the matching time step, which the caller must record so it is never accepted again.
/// The comparison of codes is constant-time (totp-rs compares tokens with constant_time_eq).
pub fn verify_totp(
    secret: &[u8],
    params: TotpParams,
    code: &[u8],
    now: u64,
    skew: u8,
) -> Result<Option<u64>, ParamsError> {
    let Some(code) = normalize_code(code, params.digits) else {
        return Ok(None);
    };
    let totp = Builder::new()
        .with_algorithm(params.algorithm.to_totp())
        .with_digits(params.digits)
        .with_step_duration(params.period)
        .with_skew(u16::from(skew))
        .with_secret(secret)
        .build()
        .map_err(|e| ParamsError(e.to_string()))?;
    Ok(totp.check(&code, now))
}

/// The otpauth:// URI an authenticator app scans. It carries the secret: show it once, never log it.
pub fn otpauth_uri(
    issuer: &str,
    user: &str,
    secret: &[u8],
    params: TotpParams,
) -> Zeroizing<String> {
    let secret = Zeroizing::new(data_encoding::BASE32_NOPAD.encode(secret));
    let issuer = percent_encode(issuer);
    Zeroizing::new(format!(
        "otpauth://totp/{issuer}:{user}?secret={secret}&issuer={issuer}&algorithm={alg}&digits={digits}&period={period}",
        user = percent_encode(user),
        secret = secret.as_str(),
        alg = params.algorithm.as_str(),
        digits = params.digits,
        period = params.period,
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

/// The code a token shows at time `now`; used by tests and by the RFC vector checks.
pub fn totp_code(secret: &[u8], params: TotpParams, now: u64) -> Result<String, ParamsError> {
    let totp = Builder::new()
        .with_algorithm(params.algorithm.to_totp())
        .with_digits(params.digits)
        .with_step_duration(params.period)
        .with_secret(secret)
        .build()
        .map_err(|e| ParamsError(e.to_string()))?;
    Ok(totp.generate(now).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
                let params = TotpParams {
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
        let p = TotpParams {
            digits: 8,
            ..TotpParams::default()
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
        let p = TotpParams::default();
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
        let p = TotpParams::default();
        let code = totp_code(&s, p, 5000).unwrap();
        let spaced = format!(" {} {} \n", &code[..3], &code[3..]);
        assert!(verify_totp(&s, p, spaced.as_bytes(), 5000, 0)
            .unwrap()
            .is_some());
    }

    #[test]
    fn uri_carries_parameters_and_encodes_names() {
        let uri = otpauth_uri("my host", "ann", &[0u8; 20], TotpParams::default());
        assert_eq!(
            uri.as_str(),
            "otpauth://totp/my%20host:ann?secret=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA&issuer=my%20host&algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn new_secrets_are_160_bits_and_differ() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_eq!(a.len(), 20);
        assert_ne!(*a, *b);
    }
}
