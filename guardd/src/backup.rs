//! Backup codes: ten one-time codes for when the phone is lost. They are shown once, stored only
//! as Argon2id hashes, and each works once.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use zeroize::Zeroizing;

/// Codes issued per set.
pub const COUNT: usize = 10;
/// Characters per code, without the separator: 10 of 31 letters, about 49 bits.
const LEN: usize = 10;
/// No 0/o, 1/l/i: easy to read off paper.
const ALPHABET: &[u8; 31] = b"abcdefghjkmnpqrstuvwxyz23456789";

/// Why codes could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the system random source failed")]
    Random,
    #[error("cannot hash a backup code: {0}")]
    Hash(String),
}

/// A new set: the codes to show (formatted `xxxxx-xxxxx`) and the hashes to store.
pub fn generate() -> Result<(Vec<Zeroizing<String>>, Vec<String>), BackupError> {
    let mut codes = Vec::with_capacity(COUNT);
    let mut hashes = Vec::with_capacity(COUNT);
    for _ in 0..COUNT {
        let mut code = Zeroizing::new(String::with_capacity(LEN));
        while code.len() < LEN {
            let mut b = [0u8; 1];
            getrandom::fill(&mut b).map_err(|_| BackupError::Random)?;
            // Rejection sampling keeps every letter equally likely (248 = 8 × 31).
            if b[0] < 248 {
                code.push(ALPHABET[usize::from(b[0] % 31)] as char);
            }
        }
        hashes.push(hash(&code)?);
        codes.push(Zeroizing::new(format!("{}-{}", &code[..5], &code[5..])));
    }
    Ok((codes, hashes))
}

fn hash(code: &str) -> Result<String, BackupError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|_| BackupError::Random)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| BackupError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(code.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| BackupError::Hash(e.to_string()))
}

/// What the user typed, reduced to the stored form, if it can be a backup code at all
/// (so ordinary OTP codes never pay for a slow hash).
pub fn normalize(input: &[u8]) -> Option<Zeroizing<String>> {
    if input.len() > 3 * LEN {
        return None;
    }
    let code: Zeroizing<String> = Zeroizing::new(
        input
            .iter()
            .filter(|b| !b.is_ascii_whitespace() && **b != b'-')
            .map(|b| b.to_ascii_lowercase() as char)
            .collect(),
    );
    (code.len() == LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// Whether `code` (normalised) matches the stored `hash`.
pub fn matches(code: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(code.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_verify_against_their_own_hash_only() {
        let (codes, hashes) = generate().unwrap();
        assert_eq!((codes.len(), hashes.len()), (COUNT, COUNT));
        let first = normalize(codes[0].as_bytes()).unwrap();
        assert!(matches(&first, &hashes[0]));
        assert!(!matches(&first, &hashes[1]));
        assert!(!hashes[0].contains(first.as_str()));
    }

    #[test]
    fn normalize_accepts_typing_variants_and_rejects_otp_codes() {
        assert_eq!(
            normalize(b" ABCDE-fghjk\n").as_deref().map(|s| s.as_str()),
            Some("abcdefghjk")
        );
        assert!(normalize(b"123456").is_none());
        assert!(
            normalize(b"abcde-fghj0").is_none(),
            "0 is not in the alphabet"
        );
        assert!(normalize(&[b'a'; 10_000]).is_none());
    }
}
