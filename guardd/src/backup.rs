//! Backup codes: ten one-time codes for when the phone is lost. They are shown once, stored only
//! as Argon2id hashes, and each works once.
//!
//! Argon2 is slow and big on purpose (19 MiB per hash), so every hash runs on one [`Hasher`]
//! thread that keeps a single working buffer: memory stays at one buffer however many callers
//! ask, instead of one per blocking thread kept by the allocator afterwards, and a full queue
//! refuses at once.

use std::sync::mpsc;
use std::thread::JoinHandle;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;
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
    #[error("guardd is busy checking other backup codes; try again shortly")]
    Busy,
    #[error("the backup-code hasher stopped; restart guardd")]
    Stopped,
}

/// Hashes queued at most behind the one running; beyond, callers are refused at once.
const QUEUE: usize = 4;
/// The largest Argon2 memory cost (KiB) a stored hash may ask for: the working buffer is never
/// grown past this by a damaged database row.
const MAX_M_COST: u32 = 64 * 1024;

/// A set of codes: what to show (formatted `xxxxx-xxxxx`) and the hashes to store.
pub type CodeSet = (Vec<Zeroizing<String>>, Vec<String>);

enum Job {
    Generate(oneshot::Sender<Result<CodeSet, BackupError>>),
    Find {
        code: Zeroizing<String>,
        hashes: Vec<(i64, String)>,
        reply: oneshot::Sender<Option<i64>>,
        /// What the job holds while it waits and runs (the caller's place in a budget):
        /// given back when the job is done, not when the caller stops waiting.
        held: Box<dyn Send>,
    },
}

/// The one thread that computes Argon2 hashes, with its one working buffer.
pub struct Hasher {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Hasher {
    pub fn start() -> std::io::Result<Hasher> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("guardd-argon2".into())
            .spawn(move || {
                let mut memory = Memory::default();
                for job in queue {
                    match job {
                        Job::Generate(reply) => {
                            let _ = reply.send(generate_with(&mut memory));
                        }
                        Job::Find {
                            code,
                            hashes,
                            reply,
                            held: _held,
                        } => {
                            let found = hashes
                                .iter()
                                .find(|(_, hash)| memory.matches(&code, hash))
                                .map(|(id, _)| *id);
                            let _ = reply.send(found);
                        }
                    }
                }
            })?;
        Ok(Hasher {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// A new set of codes.
    pub async fn generate(&self) -> Result<CodeSet, BackupError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Job::Generate(reply))?;
        answer.await.map_err(|_| BackupError::Stopped)?
    }

    /// The id of the hash among `hashes` that `code` (normalised) matches, if any. `held` is
    /// kept by the job until it is done (see `Job::Find`).
    pub async fn find(
        &self,
        code: Zeroizing<String>,
        hashes: Vec<(i64, String)>,
        held: Box<dyn Send>,
    ) -> Result<Option<i64>, BackupError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Job::Find {
            code,
            hashes,
            reply,
            held,
        })?;
        answer.await.map_err(|_| BackupError::Stopped)
    }

    fn queue(&self, job: Job) -> Result<(), BackupError> {
        let jobs = self.jobs.as_ref().ok_or(BackupError::Stopped)?;
        jobs.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => BackupError::Busy,
            mpsc::TrySendError::Disconnected(_) => BackupError::Stopped,
        })
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Argon2's working memory, kept between hashes.
#[derive(Default)]
struct Memory(Vec<Block>);

impl Memory {
    /// Hashes `code` with `salt` under `params` into `out`, in the kept buffer.
    fn hash(
        &mut self,
        params: Params,
        code: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> Result<(), BackupError> {
        if params.m_cost() > MAX_M_COST {
            return Err(BackupError::Hash(format!(
                "memory cost {} KiB is above {MAX_M_COST}",
                params.m_cost()
            )));
        }
        let blocks = params.block_count();
        if self.0.len() < blocks {
            self.0.resize(blocks, Block::new());
        }
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into_with_memory(code, salt, out, &mut self.0[..blocks])
            .map_err(|e| BackupError::Hash(e.to_string()))
    }

    /// Whether `code` matches the PHC string `hash` (Argon2id only).
    fn matches(&mut self, code: &str, hash: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return false;
        };
        if parsed.algorithm != Algorithm::Argon2id.ident()
            || parsed.version.is_some_and(|v| v != Version::V0x13 as u32)
        {
            return false;
        }
        let Ok(params) = Params::try_from(&parsed) else {
            return false;
        };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let mut out = Zeroizing::new(vec![0u8; expected.len()]);
        if let Err(e) = self.hash(params, code.as_bytes(), salt, &mut out) {
            tracing::error!("skipping an unusable backup-code hash: {e}");
            return false;
        }
        bool::from(out.as_slice().ct_eq(expected.as_bytes()))
    }

    /// The PHC string of `code` under a fresh salt and the default parameters.
    fn phc(&mut self, code: &str) -> Result<String, BackupError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|_| BackupError::Random)?;
        let params = Params::default();
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        self.hash(params.clone(), code.as_bytes(), &salt, &mut out)?;
        let hash_err = |e: argon2::password_hash::Error| BackupError::Hash(e.to_string());
        let salt = SaltString::encode_b64(&salt).map_err(hash_err)?;
        Ok(PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(hash_err)?,
            salt: Some(salt.as_salt()),
            hash: Some(Output::new(&out).map_err(hash_err)?),
        }
        .to_string())
    }
}

/// A new set: the codes to show and the hashes to store.
fn generate_with(memory: &mut Memory) -> Result<CodeSet, BackupError> {
    let mut codes = Vec::with_capacity(COUNT);
    let mut hashes = Vec::with_capacity(COUNT);
    for _ in 0..COUNT {
        let code = random_code()?;
        let normal = normalize(code.as_bytes()).ok_or(BackupError::Random)?;
        hashes.push(memory.phc(&normal)?);
        codes.push(code);
    }
    Ok((codes, hashes))
}

/// A fresh random code, formatted `xxxxx-xxxxx` (also used for invitations).
pub fn random_code() -> Result<Zeroizing<String>, BackupError> {
    let mut code = Zeroizing::new(String::with_capacity(LEN));
    while code.len() < LEN {
        let mut b = [0u8; 1];
        getrandom::fill(&mut b).map_err(|_| BackupError::Random)?;
        // Rejection sampling keeps every letter equally likely (248 = 8 × 31).
        if b[0] < 248 {
            code.push(ALPHABET[usize::from(b[0] % 31)] as char);
        }
    }
    Ok(Zeroizing::new(format!("{}-{}", &code[..5], &code[5..])))
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

#[cfg(test)]
mod tests {
    use super::*;

    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    #[test]
    fn codes_verify_against_their_own_hash_only() {
        let mut memory = Memory::default();
        let (codes, hashes) = generate_with(&mut memory).unwrap();
        assert_eq!((codes.len(), hashes.len()), (COUNT, COUNT));
        let first = normalize(codes[0].as_bytes()).unwrap();
        assert!(memory.matches(&first, &hashes[0]));
        assert!(!memory.matches(&first, &hashes[1]));
        assert!(!hashes[0].contains(first.as_str()));
        // The stored form is the standard PHC string: the argon2 crate's own verifier agrees.
        let parsed = PasswordHash::new(&hashes[0]).unwrap();
        assert!(Argon2::default()
            .verify_password(first.as_bytes(), &parsed)
            .is_ok());
    }

    #[test]
    fn hashes_made_by_the_argon2_crate_still_match() {
        // Codes issued before the hasher thread existed were hashed with hash_password.
        let salt = SaltString::encode_b64(&[5u8; 16]).unwrap();
        let old = Argon2::default()
            .hash_password(b"abcdefghjk", &salt)
            .unwrap()
            .to_string();
        let mut memory = Memory::default();
        assert!(memory.matches("abcdefghjk", &old));
        assert!(!memory.matches("abcdefghjm", &old));
        assert!(!memory.matches("abcdefghjk", "not a hash"));
        let greedy = old.replace("m=19456", "m=4000000");
        assert!(
            !memory.matches("abcdefghjk", &greedy),
            "a huge memory cost is refused"
        );
    }

    #[tokio::test]
    async fn a_job_keeps_what_it_holds_until_done_and_a_full_queue_refuses_at_once() {
        let hasher = Hasher::start().unwrap();
        let (codes, hashes) = hasher.generate().await.unwrap();
        let code = normalize(codes[3].as_bytes()).unwrap();
        let ids: Vec<(i64, String)> = hashes
            .into_iter()
            .enumerate()
            .map(|(i, h)| (i as i64, h))
            .collect();
        assert_eq!(
            hasher.find(code, ids.clone(), Box::new(())).await.unwrap(),
            Some(3)
        );
        // A caller that stops waiting does not end the job: what it holds stays held until the
        // job is done.
        let held = std::sync::Arc::new(());
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(1),
            hasher.find(
                Zeroizing::new("zzzzzzzzzz".into()),
                ids.clone(),
                Box::new(held.clone()),
            ),
        )
        .await;
        assert!(cut.is_err(), "ten Argon2 hashes took under 1 ms");
        assert_eq!(
            std::sync::Arc::strong_count(&held),
            2,
            "given back at the cut"
        );
        let done = std::time::Instant::now();
        while std::sync::Arc::strong_count(&held) > 1 {
            assert!(done.elapsed() < std::time::Duration::from_secs(30));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Many at once: some wait in the queue, the rest are refused at once, none is lost.
        let (mut waiting, mut busy) = (Vec::new(), 0);
        for _ in 0..20 {
            let (reply, answer) = oneshot::channel();
            let job = Job::Find {
                code: Zeroizing::new("zzzzzzzzzz".into()),
                hashes: ids[..1].to_vec(),
                reply,
                held: Box::new(()),
            };
            match hasher.queue(job) {
                Ok(()) => waiting.push(answer),
                Err(BackupError::Busy) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(busy > 0 && waiting.len() >= QUEUE, "{busy} refused");
        for answer in waiting {
            assert_eq!(answer.await.unwrap(), None);
        }
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
