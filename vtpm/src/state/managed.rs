//! State whose key the vTPM manager keeps. Every save encrypts all blobs under a fresh key into
//! the slot the manager does not currently point at, makes it durable, and only then sends
//! SAVEHASHKEY (the slot's SHA-256 and the key): after a crash the manager names either the
//! old slot or the new one, and both are intact. At start, LOADHASHKEY names the slot by its
//! hash; a slot that does not match, or a manager that knows no key, stops the vTPM.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

use xvtpm_proto::mgr::{Reply, Request};
use xvtpm_proto::Secret;

use super::StateStore;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"XVTPMMS1";
const SLOTS: [&str; 2] = ["managed-a.xvtpm", "managed-b.xvtpm"];

/// The manager protocol's status codes this store acts on.
mod wire {
    pub use xvtpm_proto::mgr::status::{AUTHFAIL, BAD_PARAMETER, RETRY, SUCCESS};
}

/// How long a save waits for the manager to accept it while the vTPM is over its save rate
/// (the manager answers RETRY without committing); the guest's command waits with it, as it
/// would for a hardware TPM's slow NV write.
const SAVE_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection to the manager: one request, one reply (status and body).
pub trait ManagerLink: Send + std::fmt::Debug {
    /// Sends `request` and returns the reply's status and body.
    fn call(&mut self, request: &Request) -> Result<(u32, Vec<u8>)>;
}

/// Splits a whole reply into status and body.
pub fn parse_reply(r: &[u8]) -> Result<(u32, Vec<u8>)> {
    match Reply::decode(r) {
        Ok(r) => Ok((r.status, r.body)),
        Err(e) => Err(Error::Protocol(format!("malformed manager reply of {} bytes: {e}", r.len()))),
    }
}

/// Blobs stored through the manager.
#[derive(Debug)]
pub struct ManagedStore {
    dir: PathBuf,
    link: Box<dyn ManagerLink>,
    blobs: BTreeMap<String, Vec<u8>>,
    /// The slot the manager points at (None before the first save).
    active: Option<usize>,
    /// A SAVEHASHKEY whose reply was lost: the manager may point at either slot.
    uncertain: bool,
    /// The key of the slot the manager points at.
    key: Option<[u8; 32]>,
    _lock: File,
}

/// The plaintext of a slot: the blob count, then each blob's name and contents.
pub fn encode(blobs: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut b = (blobs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in blobs {
        b.extend_from_slice(&(k.len() as u16).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
        b.extend_from_slice(v);
    }
    b
}

/// Parses a slot's plaintext; `None` if it is malformed.
pub fn decode(b: &[u8]) -> Option<BTreeMap<String, Vec<u8>>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut out = BTreeMap::new();
    for _ in 0..count {
        let kl = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let k = String::from_utf8(take(kl)?.to_vec()).ok()?;
        let vl = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        out.insert(k, take(vl)?.to_vec());
    }
    Some(out)
}

impl ManagedStore {
    /// Opens the state in `dir` with the key the manager holds for this vTPM. With no key at
    /// the manager and no slot on disk, the store starts empty (a new vTPM is then created
    /// only if the engine is told to); slots on disk that the manager has no key for, or that
    /// do not match its hash, are an error.
    pub fn open(dir: &Path, mut link: Box<dyn ManagerLink>) -> Result<Self> {
        let lock = super::lock_dir(dir)?;
        let slots: Vec<Option<Vec<u8>>> = SLOTS.iter().map(|s| fs::read(dir.join(s)).ok()).collect();
        let (st, body) = link.call(&Request::LoadHashKey)?;
        let mut store = Self {
            dir: dir.to_path_buf(),
            link,
            blobs: BTreeMap::new(),
            active: None,
            uncertain: false,
            key: None,
            _lock: lock,
        };
        match st {
            wire::SUCCESS => {}
            wire::BAD_PARAMETER if slots.iter().all(Option::is_none) => {
                log::info!("the manager holds no key for this vTPM and {} has no state", dir.display());
                return Ok(store);
            }
            wire::BAD_PARAMETER => {
                return Err(Error::StateCorrupt {
                    path: dir.to_path_buf(),
                    reason: "holds state, but the manager has no key for this vTPM (not provisioned, or deleted); refusing to start".into(),
                })
            }
            wire::AUTHFAIL => {
                return Err(Error::Config(
                    "the manager refused this vTPM: a wrong uuid or token, or a boot hash (this executable, or this domain's image) its group has not approved; the manager's log says which".into(),
                ))
            }
            st => return Err(Error::Protocol(format!("LOADHASHKEY failed at the manager with status {st}"))),
        }
        if body.len() != 64 {
            return Err(Error::Protocol(format!("LOADHASHKEY returned {} bytes, expected 64", body.len())));
        }
        let (hash, key) = body.split_at(32);
        for (i, slot) in slots.iter().enumerate() {
            let Some(file) = slot else { continue };
            if Sha256::digest(file)[..] != *hash {
                continue;
            }
            let path = dir.join(SLOTS[i]);
            let corrupt = |r: &str| Error::StateCorrupt { path: path.clone(), reason: r.to_string() };
            if file.len() < 20 + 16 || &file[..8] != MAGIC {
                return Err(corrupt("matches the manager's hash but is not a managed state file"));
            }
            let cipher = Aes256Gcm::new(key.into());
            let plain = cipher
                .decrypt(Nonce::from_slice(&file[8..20]), Payload { msg: &file[20..], aad: MAGIC })
                .map_err(|_| corrupt("does not decrypt with the manager's key"))?;
            store.blobs = decode(&plain).ok_or_else(|| corrupt("malformed contents"))?;
            store.active = Some(i);
            store.key = key.try_into().ok();
            log::info!("state loaded from {} (the slot the manager names)", path.display());
            return Ok(store);
        }
        Err(Error::StateCorrupt {
            path: dir.to_path_buf(),
            reason: "no state slot matches the hash the manager holds (lost or replaced files); refusing to start"
                .into(),
        })
    }

    /// After an uncertain reply: asks the manager which slot it points at. Only a definite
    /// answer clears the doubt: a hash matching one of the slots, or "no saved key".
    fn resync(&mut self) -> Result<()> {
        let (st, body) = self.link.call(&Request::LoadHashKey)?;
        let active = match (st, body.len()) {
            (wire::SUCCESS, 64) => {
                let hit = SLOTS
                    .iter()
                    .position(|s| fs::read(self.dir.join(s)).is_ok_and(|f| Sha256::digest(&f)[..] == body[..32]));
                match hit {
                    Some(i) => Some(i),
                    None => {
                        return Err(Error::StateCorrupt {
                            path: self.dir.clone(),
                            reason: "no state slot matches the hash the manager holds".into(),
                        })
                    }
                }
            }
            (wire::BAD_PARAMETER, _) => None,
            (st, n) => return Err(Error::Protocol(format!("LOADHASHKEY answered status {st} with {n} bytes"))),
        };
        self.active = active;
        self.uncertain = false;
        Ok(())
    }

    fn save(&mut self) -> Result<()> {
        if self.uncertain {
            self.resync()?;
        }
        let slot = match self.active {
            Some(i) => 1 - i,
            None => 0,
        };
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let mut file = MAGIC.to_vec();
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        file.extend_from_slice(&nonce);
        let ct = Aes256Gcm::new((&key).into())
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &encode(&self.blobs), aad: MAGIC })
            .map_err(|_| Error::Config("state encryption failed".into()))?;
        file.extend_from_slice(&ct);
        let path = self.dir.join(SLOTS[slot]);
        let tmp = path.with_extension("tmp");
        let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
        super::write_file(&tmp, &file, super::PRIVATE)?;
        fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("sync the directory of", e))?;
        // The slot is durable: now the manager may point at it.
        let blob = [&Sha256::digest(&file)[..], &key[..]].concat();
        let reply = self.call_until_accepted(&Request::SaveHashKey(Secret(blob.to_vec())));
        // Unless the manager answered success or refused the request outright, it may have
        // committed: never overwrite the slot it might point at without asking first.
        self.uncertain = !matches!(reply, Ok((wire::SUCCESS | wire::BAD_PARAMETER | wire::AUTHFAIL | wire::RETRY, _)));
        match reply? {
            (wire::SUCCESS, _) => {
                self.active = Some(slot);
                self.key = Some(key);
                Ok(())
            }
            (st, _) => Err(Error::Protocol(format!(
                "the manager refused SAVEHASHKEY with status {st}: the new state in {} is not committed",
                path.display()
            ))),
        }
    }
}

impl ManagedStore {
    /// Sends `request` again while the manager answers RETRY (nothing committed: this vTPM is
    /// over its save rate), pausing longer each time, for at most [`SAVE_RETRY_BUDGET`].
    fn call_until_accepted(&mut self, request: &Request) -> Result<(u32, Vec<u8>)> {
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(5);
        loop {
            match self.link.call(request) {
                Ok((wire::RETRY, _)) if start.elapsed() + pause < SAVE_RETRY_BUDGET => {
                    log::debug!("the manager asks this vTPM to save later (its save rate); waiting {pause:?}");
                    std::thread::sleep(pause);
                    // No longer than the manager's default interval between two saves.
                    pause = (pause * 2).min(std::time::Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }
}

impl StateStore for ManagedStore {
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.blobs.get(name).cloned())
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let old = self.blobs.insert(name.to_string(), data.to_vec());
        let r = self.save();
        if r.is_err() {
            // Memory keeps what the manager has.
            match old {
                Some(v) => self.blobs.insert(name.to_string(), v),
                None => self.blobs.remove(name),
            };
        }
        r
    }

    fn derive_key(&self, purpose: &str) -> Option<[u8; 32]> {
        // Each save has a new key: what is derived now opens only with this save's key.
        self.key.as_ref().map(|k| super::hkdf(k, MAGIC, purpose))
    }

    fn delete(&mut self, name: &str) -> Result<()> {
        if let Some(old) = self.blobs.remove(name) {
            if let Err(e) = self.save() {
                // Memory keeps what the manager has.
                self.blobs.insert(name.to_string(), old);
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The manager's side, in memory: the (hash, key) it holds, and whether the next
    /// SAVEHASHKEY's reply is lost after the commit.
    #[derive(Debug, Default)]
    struct FakeManager {
        record: Option<Vec<u8>>,
        lose_next_reply: bool,
        /// SAVEHASHKEYs to refuse with RETRY (over the rate) before accepting one.
        busy: u32,
        /// Set when a save found the slot the manager pointed at overwritten.
        clobbered: bool,
    }

    #[derive(Debug)]
    struct FakeLink(Arc<Mutex<FakeManager>>, PathBuf);

    impl ManagerLink for FakeLink {
        fn call(&mut self, request: &Request) -> Result<(u32, Vec<u8>)> {
            let mut m = self.0.lock().expect("lock");
            match request {
                Request::LoadHashKey => Ok(match &m.record {
                    Some(r) => (wire::SUCCESS, r.clone()),
                    None => (wire::BAD_PARAMETER, Vec::new()),
                }),
                Request::SaveHashKey(_) if m.busy > 0 => {
                    m.busy -= 1;
                    Ok((wire::RETRY, Vec::new()))
                }
                Request::SaveHashKey(body) => {
                    // The slot the manager points at must still be there, intact.
                    if let Some(r) = &m.record {
                        let intact = SLOTS
                            .iter()
                            .any(|s| fs::read(self.1.join(s)).is_ok_and(|f| Sha256::digest(&f)[..] == r[..32]));
                        m.clobbered |= !intact;
                    }
                    m.record = Some(body.0.clone());
                    if std::mem::take(&mut m.lose_next_reply) {
                        return Err(Error::Protocol("reply lost".into()));
                    }
                    Ok((wire::SUCCESS, Vec::new()))
                }
                other => Err(Error::Protocol(format!("unexpected ordinal {:#x}", other.ordinal()))),
            }
        }
    }

    #[test]
    fn a_lost_reply_never_costs_the_slot_the_manager_points_at() {
        let dir = std::env::temp_dir().join(format!("xvtpm-managed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mgr = Arc::new(Mutex::new(FakeManager::default()));
        let mut s = ManagedStore::open(&dir, Box::new(FakeLink(mgr.clone(), dir.clone()))).expect("open");
        assert!(s.load("permall").expect("load").is_none(), "a new vTPM starts empty");
        s.store("permall", b"A").expect("A");
        mgr.lock().expect("lock").lose_next_reply = true;
        assert!(s.store("permall", b"B").is_err(), "the reply was lost");
        // The manager committed B; the next save must ask before choosing a slot.
        s.store("permall", b"C").expect("C");
        assert!(!mgr.lock().expect("lock").clobbered, "the slot the manager pointed at was overwritten");
        // Over the save rate: the save waits until the manager takes it.
        mgr.lock().expect("lock").busy = 3;
        s.store("permall", b"C2").expect("a save the manager asked to retry three times");
        assert_eq!(mgr.lock().expect("lock").busy, 0, "asked again after each RETRY");
        s.store("permall", b"C").expect("C again");
        assert!(!mgr.lock().expect("lock").clobbered);
        drop(s);
        let mut s = ManagedStore::open(&dir, Box::new(FakeLink(mgr.clone(), dir.clone()))).expect("reopen");
        assert_eq!(s.load("permall").expect("load"), Some(b"C".to_vec()));
        // Files the manager holds no key for: refused, not started over.
        mgr.lock().expect("lock").record = None;
        drop(s);
        let e = ManagedStore::open(&dir, Box::new(FakeLink(mgr, dir.clone()))).expect_err("no key");
        assert!(e.to_string().contains("no key"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
