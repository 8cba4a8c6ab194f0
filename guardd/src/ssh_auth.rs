//! Which ssh keys authenticated a login. sshd puts the methods that succeeded so far in the PAM
//! environment as `SSH_AUTH_INFO_0`, one per line (`publickey ssh-ed25519 AAAA…`, with
//! `CA <type> <fingerprint>` after a certificate; `keyboard-interactive/pam`; …). The module
//! relays the text as it is; guardd parses it here, so the module stays small and the parser
//! runs where it can be tested and bounded.

use ssh_key::{HashAlg, PublicKey};

/// The longest SSH_AUTH_INFO_0 guardd reads; a longer text names no key.
pub const MAX_AUTH_INFO: usize = proto::MAX_SSH_AUTH_INFO;

/// The fingerprints (`SHA256:…`, as `ssh-keygen -l` prints them) of the public keys that
/// authenticated, in the order sshd accepted them, without repeats.
///
/// A certificate counts as the key it certifies, as sshd logs it: a re-issued certificate for
/// the same key is the same key, and a rule lists the key's fingerprint. Lines of other methods
/// are skipped. A `publickey` line that does not parse, or a text over `MAX_AUTH_INFO`, gives
/// no keys at all: an attribute that is absent never matches, so a login whose keys cannot be
/// read never shares a grant and never matches a key rule.
pub fn fingerprints(auth_info: &str) -> Vec<String> {
    if auth_info.len() > MAX_AUTH_INFO {
        return Vec::new();
    }
    let mut keys = Vec::new();
    for line in auth_info.lines() {
        let mut words = line.split(' ');
        if words.next() != Some("publickey") {
            continue;
        }
        let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
            return Vec::new();
        };
        let Some(fingerprint) = fingerprint(kind, blob) else {
            return Vec::new();
        };
        if !keys.contains(&fingerprint) {
            keys.push(fingerprint);
        }
    }
    keys
}

/// The SHA256 fingerprint of one key or certificate in OpenSSH's text form.
fn fingerprint(kind: &str, blob: &str) -> Option<String> {
    let key = match kind.strip_suffix(CERT_SUFFIX) {
        Some(plain) => {
            let blob = data_encoding::BASE64.decode(blob.as_bytes()).ok()?;
            PublicKey::from_bytes(&certified_key(plain, &blob)?).ok()?
        }
        None => PublicKey::from_openssh(&format!("{kind} {blob}")).ok()?,
    };
    // A key whose declared type differs from the one inside the blob is not what it says.
    let declared = kind.strip_suffix(CERT_SUFFIX).unwrap_or(kind);
    (key.algorithm().as_str() == declared).then(|| key.fingerprint(HashAlg::Sha256).to_string())
}

const CERT_SUFFIX: &str = "-cert-v01@openssh.com";

/// The plain public key inside an OpenSSH certificate blob (PROTOCOL.certkeys: the type, a
/// nonce, then the key's own fields), as the blob of a plain key of type `plain`. Read by hand:
/// ssh-key refuses certificates valid "forever" (valid_before 2^64-1), which are common.
fn certified_key(plain: &str, cert: &[u8]) -> Option<Vec<u8>> {
    let fields = match plain {
        "ssh-ed25519" => 1,
        "ssh-rsa" | "sk-ssh-ed25519@openssh.com" => 2,
        "sk-ecdsa-sha2-nistp256@openssh.com" => 3,
        "ssh-dss" => 4,
        p if p.starts_with("ecdsa-sha2-") => 2,
        _ => return None,
    };
    let mut rest = cert;
    let mut next = || -> Option<&[u8]> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let field = rest.get(..4 + len)?;
        rest = &rest[4 + len..];
        Some(field)
    };
    let declared = next()?;
    if &declared[4..] != format!("{plain}{CERT_SUFFIX}").as_bytes() {
        return None;
    }
    next()?; // the nonce
    let mut key = Vec::with_capacity(cert.len());
    key.extend_from_slice(&(plain.len() as u32).to_be_bytes());
    key.extend_from_slice(plain.as_bytes());
    for _ in 0..fields {
        key.extend_from_slice(next()?);
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with ssh-keygen; the fingerprints are what `ssh-keygen -lf` printed for them.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIId5t5dms+ihM9xkajJd6PiJTXRZtG5+R4FyhUUVOyxI";
    const ED25519_FP: &str = "SHA256:m03Gu4hX3L7b9dcRBVWzhP2yxdit9hsiPMVWQ48wSS0";
    /// A certificate for ED25519 (`ssh-keygen -s ca -I ann -n ann`).
    const CERT: &str = "ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQtdjAxQG9wZW5zc2guY29tAAAAIAkQl6qLwIoq4ySmpNqgCzOAsyZvvjCVZIeQ9MObxTFKAAAAIId5t5dms+ihM9xkajJd6PiJTXRZtG5+R4FyhUUVOyxIAAAAAAAAAAAAAAABAAAAA2FubgAAAAcAAAADYW5uAAAAAAAAAAD//////////wAAAAAAAACCAAAAFXBlcm1pdC1YMTEtZm9yd2FyZGluZwAAAAAAAAAXcGVybWl0LWFnZW50LWZvcndhcmRpbmcAAAAAAAAAFnBlcm1pdC1wb3J0LWZvcndhcmRpbmcAAAAAAAAACnBlcm1pdC1wdHkAAAAAAAAADnBlcm1pdC11c2VyLXJjAAAAAAAAAAAAAAAzAAAAC3NzaC1lZDI1NTE5AAAAID6CGNHI8ZokfLrkyOc/uaJfGSY7ka7J4818qDir+XH/AAAAUwAAAAtzc2gtZWQyNTUxOQAAAEBAVtfXi7i00oSGFwBIpXrEhe5l1K5NggapniqicVgs7KNvrZpQCy8m3tAmy/ARDeLltBHMjUpsfBg1EJ6Qb+gC";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDZ6HKJc+hqWAwhSH0F3KeDnQDvcN3PaxW+ms8QszSjwnif8SYx8uMnTEg0JY6JeW2Lww7nivWIGq/QBRu3nIi7Qkn62LWBrDIAs/AFqA29aStf+1l8bH8QUc9AcRyRNIehsMAqiB/limzdfVMTKzCGVQDQkD8dxBtMnI4KMeekTQ==";
    const RSA_FP: &str = "SHA256:zD1XQY5G3tSjp4rmSKyBlZW/tVagAfj5TY2q8KyUbJA";

    #[test]
    fn a_key_is_named_by_its_sha256_fingerprint() {
        assert_eq!(
            fingerprints(&format!("publickey {ED25519}\n")),
            [ED25519_FP]
        );
        assert_eq!(fingerprints(&format!("publickey {RSA}\n")), [RSA_FP]);
    }

    #[test]
    fn a_certificate_counts_as_the_key_it_certifies() {
        let info = format!(
            "publickey {CERT} CA ssh-ed25519 SHA256:sgHFBuabaVzZRA6NBbZ/EkKzWA0O/4Tmn6AztZsOel0\n"
        );
        assert_eq!(fingerprints(&info), [ED25519_FP]);
    }

    #[test]
    fn every_key_of_several_counts_once_and_other_methods_are_skipped() {
        let info = format!(
            "publickey {RSA}\npublickey {ED25519}\nkeyboard-interactive/pam\npublickey {RSA}\n"
        );
        assert_eq!(fingerprints(&info), [RSA_FP, ED25519_FP]);
        assert!(fingerprints("keyboard-interactive/pam\npassword\n").is_empty());
        assert!(fingerprints("").is_empty());
    }

    #[test]
    fn a_line_that_does_not_parse_or_lies_about_its_type_names_no_key() {
        assert!(fingerprints(&format!("publickey {ED25519}\npublickey ssh-rsa AAAA\n")).is_empty());
        assert!(fingerprints("publickey\n").is_empty());
        let blob = ED25519.split(' ').nth(1).unwrap();
        assert!(fingerprints(&format!("publickey ssh-rsa {blob}\n")).is_empty());
        let cert = CERT.split(' ').nth(1).unwrap();
        assert!(
            fingerprints(&format!("publickey ssh-rsa-cert-v01@openssh.com {cert}\n")).is_empty()
        );
        assert!(fingerprints(&format!("publickey {}\n", &CERT[..200])).is_empty());
        let huge = format!("publickey {ED25519}\n{}", "x".repeat(MAX_AUTH_INFO));
        assert!(fingerprints(&huge).is_empty());
    }
}
