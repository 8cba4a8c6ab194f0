//! Secrets at rest: token secrets are sealed with XChaCha20-Poly1305 under a 256-bit key kept in
//! a 0600 key file apart from the database, so a stolen database alone yields no secret. Each
//! sealed value is bound to its row (the token id is the associated data), so sealed secrets
//! cannot be swapped between tokens.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {path} must hold exactly {KEY_LEN} bytes; it holds {len}")]
    Length { path: PathBuf, len: usize },
    #[error("the key file {path} is readable by others (mode {mode:o}); run chmod 600 {path}")]
    Mode { path: PathBuf, mode: u32 },
    #[error("the system random source failed")]
    Random,
    #[error("a sealed secret does not open with this key (wrong key file, or a damaged row)")]
    Open,
}

/// The sealing key, zeroized on drop.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// Loads the key from `path`. When the file is absent and `may_create` is true (a database
    /// without sealed secrets), a fresh random key is written there with mode 0600.
    pub fn load(path: &Path, may_create: bool) -> Result<Sealer, SealError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let mode = std::fs::metadata(path)
                    .map_err(|source| SealError::Read {
                        path: path.into(),
                        source,
                    })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SealError::Mode {
                        path: path.into(),
                        mode: mode & 0o777,
                    });
                }
                if bytes.len() != KEY_LEN {
                    return Err(SealError::Length {
                        path: path.into(),
                        len: bytes.len(),
                    });
                }
                Ok(Sealer::from_key(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                let mut key = Zeroizing::new([0u8; KEY_LEN]);
                getrandom::fill(key.as_mut()).map_err(|_| SealError::Random)?;
                let create = |source| SealError::Create {
                    path: path.into(),
                    source,
                };
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(create)?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(create)?;
                file.write_all(key.as_ref()).map_err(create)?;
                file.sync_all().map_err(create)?;
                tracing::info!(key_file = %path.display(), "created a new sealing key");
                Ok(Sealer::from_key(key.as_ref()))
            }
            Err(source) => Err(SealError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    fn from_key(key: &[u8]) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// Encrypts `plain` bound to `aad`; the result is nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts what `seal` produced for the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_key_once_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let a = Sealer::load(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = a.seal(b"id1", b"secret").unwrap();
        let b = Sealer::load(&path, false).unwrap();
        assert_eq!(&*b.open(b"id1", &sealed).unwrap(), b"secret");
    }

    #[test]
    fn sealed_values_are_bound_to_their_row_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = Sealer::load(&dir.path().join("a"), true).unwrap();
        let b = Sealer::load(&dir.path().join("b"), true).unwrap();
        let sealed = a.seal(b"id1", b"secret").unwrap();
        assert!(a.open(b"id2", &sealed).is_err(), "swapped between rows");
        assert!(b.open(b"id1", &sealed).is_err(), "opened with another key");
        assert!(a.open(b"id1", &sealed[..10]).is_err());
    }

    #[test]
    fn missing_short_or_exposed_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        assert!(matches!(
            Sealer::load(&path, false),
            Err(SealError::Read { .. })
        ));
        std::fs::write(&path, [1u8; 16]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Sealer::load(&path, false),
            Err(SealError::Length { .. })
        ));
        std::fs::write(&path, [1u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Sealer::load(&path, false),
            Err(SealError::Mode { .. })
        ));
    }
}
