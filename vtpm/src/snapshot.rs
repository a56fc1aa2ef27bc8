//! Volatile snapshots: the TPM's volatile state (PCRs, sessions, loaded objects, DA state) as it
//! was after a command, kept so that a vtpm process that stops under a running guest resumes
//! that guest's TPM instead of handing it reset PCRs.
//!
//! A snapshot belongs to one guest instance: the device's uuid, the frontend domain's id and
//! that domain's life (its `vm` path and `start_time`, which differ for each domain libxl
//! makes). It is encrypted and authenticated with a key derived from the state key (or, for a
//! state without a key, only digested, as the state files are), and carries a sequence number
//! that grows with every snapshot.
//!
//! File layout:
//!
//! ```text
//! "XVTPMVS1" | version u8 (1) | family u8 (1: TPM 1.2, 2: TPM 2.0) | mode u8 (1 AES-256-GCM,
//! 2 SHA-256) | flags u8 (1: suspended) | seq u64 LE | nonce [12] | uuid, life (each u16 LE
//! length, bytes) | frontend u16 LE | body length u32 LE | body
//! ```
//!
//! A suspended snapshot was taken when the toolstack suspended the guest (`xl save`, `xl
//! migrate`): the guest's next domain, which keeps the domain's `vm` path, continues from it.
//!
//! ```text
//! ```
//!
//! Everything before the body is the associated data (mode 1) or digested with the state (mode
//! 2). Two slot files take the snapshots in turn ([`SnapshotFile`]), so a process killed at any
//! moment leaves the previous snapshot or the new one.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::{Error, Result, TpmVersion};

const MAGIC: &[u8; 8] = b"XVTPMVS1";
const VERSION: u8 = 1;
const MODE_AES256GCM: u8 = 1;
const MODE_SHA256: u8 = 2;
const TAG_LEN: usize = 16;
const DIGEST_LEN: usize = 32;
/// Flag: taken when the guest was suspended.
const SUSPENDED: u8 = 1;
/// The purpose the snapshot key is derived for.
pub const KEY_PURPOSE: &str = "xvtpm volatile snapshot v1";
/// Where snapshots live unless told otherwise: memory-backed in dom0 (`/run` is a tmpfs), since
/// a snapshot only has to outlive the vtpm process, not the host (the guest dies with it).
pub const DEFAULT_DIR: &str = "/run/xvtpm/snapshots";

/// One life of one guest's use of a vTPM device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The vtpm device's uuid (the vTPM).
    pub uuid: String,
    /// The frontend (guest) domain id.
    pub frontend: u16,
    /// The frontend domain's `vm` path and `start_time`, where readable.
    pub life: Option<String>,
}

impl Instance {
    /// The domain's `vm` path (`/vm/<domain uuid>` under libxl), which a saved and restored
    /// or migrated guest keeps while its domain id and `start_time` change.
    pub fn vm(&self) -> Option<&str> {
        self.life.as_deref().and_then(|l| l.split('@').next()).filter(|v| !v.is_empty())
    }

    /// Whether `next`, a later domain, continues this instance's guest after it was suspended:
    /// the same vTPM device uuid and the same `vm` path.
    pub fn continued_by(&self, next: &Instance) -> bool {
        self.uuid == next.uuid && self.vm().is_some() && self.vm() == next.vm()
    }

    /// Whether `other` may be this same domain's use of the device with its life learnt on
    /// one side only (told late by dom0): the same vTPM and domain id, and one life unknown.
    /// Within one process a domain id is not given to another domain.
    pub fn same_domain_life_unknown(&self, other: &Instance) -> bool {
        self.uuid == other.uuid && self.frontend == other.frontend && (self.life.is_none() || other.life.is_none())
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "domain {} ({})", self.frontend, self.life.as_deref().unwrap_or("life unknown"))
    }
}

/// A snapshot's contents.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Grows by one with every snapshot of a vTPM.
    pub seq: u64,
    /// Which TPM it is the state of.
    pub version: TpmVersion,
    /// The guest instance it belongs to.
    pub instance: Instance,
    /// Taken when the guest was suspended (saved or migrating).
    pub suspended: bool,
    /// libtpms' volatile state blob.
    pub volatile: Vec<u8>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("seq", &self.seq)
            .field("version", &self.version)
            .field("instance", &self.instance)
            .field("suspended", &self.suspended)
            .field("volatile", &format_args!("{} bytes", self.volatile.len()))
            .finish()
    }
}

fn family_byte(v: TpmVersion) -> u8 {
    match v {
        TpmVersion::V1_2 => 1,
        TpmVersion::V2_0 => 2,
    }
}

fn push_field(out: &mut Vec<u8>, s: &str) -> Result<()> {
    let len = u16::try_from(s.len()).map_err(|_| Error::Config(format!("snapshot field of {} bytes", s.len())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// The file bytes of `snap`, sealed with `key` (or digested without one).
pub fn seal(key: Option<&[u8; 32]>, snap: &Snapshot) -> Result<Vec<u8>> {
    let mut head = MAGIC.to_vec();
    let mode = if key.is_some() { MODE_AES256GCM } else { MODE_SHA256 };
    head.extend_from_slice(&[VERSION, family_byte(snap.version), mode, if snap.suspended { SUSPENDED } else { 0 }]);
    head.extend_from_slice(&snap.seq.to_le_bytes());
    let mut nonce = [0u8; 12];
    if key.is_some() {
        rand::rngs::OsRng.fill_bytes(&mut nonce);
    }
    head.extend_from_slice(&nonce);
    push_field(&mut head, &snap.instance.uuid)?;
    push_field(&mut head, snap.instance.life.as_deref().unwrap_or(""))?;
    head.extend_from_slice(&snap.instance.frontend.to_le_bytes());
    let body = match key {
        Some(k) => Aes256Gcm::new(k.into())
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &snap.volatile, aad: &with_len(&head, snap, TAG_LEN) })
            .map_err(|_| Error::Config("snapshot encryption failed".into()))?,
        None => {
            let full = with_len(&head, snap, DIGEST_LEN);
            let digest = Sha256::new().chain_update(&full).chain_update(&snap.volatile).finalize();
            [&snap.volatile[..], &digest[..]].concat()
        }
    };
    let mut out = with_len(&head, snap, body.len() - snap.volatile.len());
    out.extend_from_slice(&body);
    Ok(out)
}

fn with_len(head: &[u8], snap: &Snapshot, extra: usize) -> Vec<u8> {
    let mut h = head.to_vec();
    h.extend_from_slice(&((snap.volatile.len() + extra) as u32).to_le_bytes());
    h
}

/// A snapshot file's sequence number and suspended flag, read from its header without the key
/// (they are in the clear, and authenticated only when the snapshot is opened): what a
/// migration checks before it moves a guest's TPM. `None` if it is not a snapshot.
pub fn peek(bytes: &[u8]) -> Option<(u64, bool)> {
    if bytes.get(..8)? != MAGIC || *bytes.get(8)? != VERSION {
        return None;
    }
    let flags = *bytes.get(11)?;
    let seq = u64::from_le_bytes(bytes.get(12..20)?.try_into().ok()?);
    Some((seq, flags & SUSPENDED != 0))
}

/// Parses and authenticates a snapshot file's bytes. `path` names the file in errors.
pub fn open(key: Option<&[u8; 32]>, path: &Path, bytes: &[u8]) -> Result<Snapshot> {
    let bad = |reason: &str| Error::StateCorrupt { path: path.to_path_buf(), reason: reason.to_string() };
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = bytes.get(at..at + n).ok_or_else(|| bad("truncated"))?;
        at += n;
        Ok(s)
    };
    if take(8)? != MAGIC {
        return Err(bad("not an xvtpm snapshot (bad magic)"));
    }
    let fixed = take(4)?;
    let (version, family, mode, flags) = (fixed[0], fixed[1], fixed[2], fixed[3]);
    if version != VERSION {
        return Err(bad(&format!("snapshot format {version}, this vtpm reads format {VERSION}")));
    }
    if flags & !SUSPENDED != 0 {
        return Err(bad(&format!("unknown flags {flags:#x}")));
    }
    let version = match family {
        1 => TpmVersion::V1_2,
        2 => TpmVersion::V2_0,
        f => return Err(bad(&format!("unknown TPM family {f}"))),
    };
    let seq = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad("truncated"))?);
    let nonce: [u8; 12] = take(12)?.try_into().map_err(|_| bad("truncated"))?;
    let mut field = |what: &str| -> Result<String> {
        let len = u16::from_le_bytes(take(2)?.try_into().map_err(|_| bad("truncated"))?) as usize;
        String::from_utf8(take(len)?.to_vec()).map_err(|_| bad(&format!("{what} is not text")))
    };
    let uuid = field("the uuid")?;
    let life = field("the domain's life")?;
    let frontend = u16::from_le_bytes(take(2)?.try_into().map_err(|_| bad("truncated"))?);
    let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("truncated"))?) as usize;
    let head_len = at;
    let (head, body) = bytes.split_at(head_len);
    if body.len() != len {
        return Err(bad(&format!("length field says {len} bytes, the file holds {}", body.len())));
    }
    let volatile = match (mode, key) {
        (MODE_AES256GCM, Some(k)) => Aes256Gcm::new(k.into())
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: body, aad: head })
            .map_err(|_| bad("does not authenticate: tampered, damaged, or sealed under another state key"))?,
        (MODE_AES256GCM, None) => return Err(bad("is encrypted, but this vTPM's state has no key")),
        (MODE_SHA256, Some(_)) => return Err(bad("is not encrypted, but this vTPM's state has a key")),
        (MODE_SHA256, None) => {
            let split = body.len().checked_sub(DIGEST_LEN).ok_or_else(|| bad("truncated (no digest)"))?;
            let (plain, digest) = body.split_at(split);
            if Sha256::new().chain_update(head).chain_update(plain).finalize()[..] != *digest {
                return Err(bad("digest mismatch: the snapshot is damaged"));
            }
            plain.to_vec()
        }
        (m, _) => return Err(bad(&format!("unknown protection mode {m}"))),
    };
    let life = (!life.is_empty()).then_some(life);
    Ok(Snapshot {
        seq,
        version,
        instance: Instance { uuid, frontend, life },
        suspended: flags & SUSPENDED != 0,
        volatile,
    })
}

/// Where one vTPM's snapshots are kept: two slot files written in turn, in place (no file is
/// created, renamed or removed per command), so the slot holding the latest snapshot is never
/// the one being written. A process killed in the middle of a write leaves that slot damaged
/// and the other one, the snapshot before, intact: the command being kept had not been
/// answered yet.
#[derive(Debug)]
pub struct SnapshotFile {
    paths: [PathBuf; 2],
    /// Open slots, with the length of what each holds.
    open: [Option<(fs::File, u64)>; 2],
    /// The slot holding the latest snapshot.
    latest: Option<usize>,
    /// The highest sequence number written or read by this process.
    seq: u64,
}

impl SnapshotFile {
    /// The snapshots of the vTPM whose state is in `state_dir`, kept in `dir` (created, mode
    /// 0700, if missing). The files are named after the state directory's canonical path, so
    /// each vTPM has its own.
    pub fn for_state_dir(dir: &Path, state_dir: &Path) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("create snapshot directory {}", dir.display()), e))?;
        let canon = fs::canonicalize(state_dir)
            .map_err(|e| Error::io(format!("resolve state directory {}", state_dir.display()), e))?;
        let digest = Sha256::digest(canon.as_os_str().as_encoded_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let slot = |s: &str| dir.join(format!("vtpm-{name}-{s}.snapshot"));
        Ok(SnapshotFile { paths: [slot("a"), slot("b")], open: [None, None], latest: None, seq: 0 })
    }

    /// The slot files, for messages.
    pub fn describe(&self) -> String {
        format!("{} and {}", self.paths[0].display(), self.paths[1].display())
    }

    /// The slot files.
    pub fn paths(&self) -> &[PathBuf; 2] {
        &self.paths
    }

    /// The latest snapshot, if there is one. Slots that exist but do not open are an error
    /// unless the other slot holds a good snapshot; so is a snapshot older than one this process
    /// has seen.
    pub fn read(&mut self, key: Option<&[u8; 32]>) -> Result<Option<Snapshot>> {
        let mut best: Option<(usize, Snapshot)> = None;
        let mut damaged = None;
        for (i, path) in self.paths.iter().enumerate() {
            let bytes = match fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
            };
            match open(key, path, &bytes) {
                Ok(s) if best.as_ref().is_none_or(|(_, b)| s.seq > b.seq) => best = Some((i, s)),
                Ok(_) => {}
                Err(e) => damaged = Some(e),
            }
        }
        let Some((slot, snap)) = best else {
            return match damaged {
                Some(e) => Err(e),
                None => Ok(None),
            };
        };
        if let Some(e) = damaged {
            // Normal after a process was killed while writing; the other slot is the one.
            log::warn!("{e}; the other slot holds snapshot {}", snap.seq);
        }
        if snap.seq < self.seq {
            return Err(Error::StateCorrupt {
                path: self.paths[slot].clone(),
                reason: format!("is snapshot {}, older than snapshot {} this vtpm has seen", snap.seq, self.seq),
            });
        }
        self.seq = snap.seq;
        self.latest = Some(slot);
        Ok(Some(snap))
    }

    /// Writes the next snapshot of `instance`'s TPM (`suspended`: the guest is being
    /// suspended) into the slot not holding the latest; returns its sequence number.
    pub fn write(
        &mut self,
        key: Option<&[u8; 32]>,
        version: TpmVersion,
        instance: &Instance,
        suspended: bool,
        volatile: Vec<u8>,
    ) -> Result<u64> {
        let seq = self.seq + 1;
        let snap = Snapshot { seq, version, instance: instance.clone(), suspended, volatile };
        let bytes = seal(key, &snap)?;
        let slot = match self.latest {
            Some(i) => 1 - i,
            None => 0,
        };
        let path = &self.paths[slot];
        let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
        if self.open[slot].is_none() {
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(crate::state::PRIVATE)
                .open(path)
                .map_err(|e| io("open", e))?;
            let len = f.metadata().map_err(|e| io("stat", e))?.len();
            self.open[slot] = Some((f, len));
        }
        let Some((f, len)) = self.open[slot].as_mut() else { unreachable!("opened above") };
        let new_len = bytes.len() as u64;
        f.write_all_at(&bytes, 0).map_err(|e| io("write", e))?;
        if *len != new_len {
            f.set_len(new_len).map_err(|e| io("truncate", e))?;
            *len = new_len;
        }
        // Nearly free on tmpfs; on a disk (a vTPM domain's), what makes the snapshot outlive
        // the domain.
        f.sync_data().map_err(|e| io("sync", e))?;
        self.latest = Some(slot);
        self.seq = seq;
        Ok(seq)
    }

    /// Removes the snapshots (no error if there are none).
    pub fn remove(&mut self) -> Result<()> {
        self.open = [None, None];
        self.latest = None;
        for path in &self.paths {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("remove {}", path.display()), e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(frontend: u16, life: &str) -> Instance {
        Instance { uuid: "c0ffee00-0000-4000-8000-000000000001".into(), frontend, life: Some(life.into()) }
    }

    fn snap(seq: u64) -> Snapshot {
        Snapshot {
            seq,
            version: TpmVersion::V2_0,
            instance: inst(5, "/vm/x@1.00"),
            suspended: false,
            volatile: vec![7; 300],
        }
    }

    #[test]
    fn sealed_snapshots_round_trip_with_and_without_a_key() {
        let key = [3u8; 32];
        for k in [Some(&key), None] {
            let s = snap(9);
            let bytes = seal(k, &s).expect("seal");
            assert_eq!(open(k, Path::new("s"), &bytes).expect("open"), s);
        }
        let mut s = snap(1);
        s.instance.life = None;
        s.version = TpmVersion::V1_2;
        s.suspended = true;
        assert_eq!(open(Some(&key), Path::new("s"), &seal(Some(&key), &s).expect("seal")).expect("open"), s);
    }

    #[test]
    fn every_flipped_byte_a_wrong_key_and_a_mode_change_are_refused() {
        let key = [3u8; 32];
        for k in [Some(&key), None] {
            let bytes = seal(k, &snap(4)).expect("seal");
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x20;
                assert!(open(k, Path::new("s"), &b).is_err(), "byte {i} flipped (key {})", k.is_some());
            }
            for n in 0..bytes.len() {
                assert!(open(k, Path::new("s"), &bytes[..n]).is_err(), "truncated to {n}");
            }
        }
        let sealed = seal(Some(&key), &snap(4)).expect("seal");
        assert_eq!(peek(&sealed), Some((4, false)));
        let mut s = snap(5);
        s.suspended = true;
        assert_eq!(peek(&seal(None, &s).expect("seal")), Some((5, true)));
        assert_eq!(peek(b"XVTPMST1 a state file"), None);
        let e = open(Some(&[4u8; 32]), Path::new("s"), &sealed).expect_err("another key");
        assert!(e.to_string().contains("does not authenticate"), "{e}");
        assert!(open(None, Path::new("s"), &sealed).is_err(), "no key");
        assert!(open(Some(&key), Path::new("s"), &seal(None, &snap(4)).expect("seal")).is_err(), "downgrade");
    }

    #[test]
    fn slots_take_turns_a_torn_one_falls_back_and_an_older_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("xvtpm-snap-{}", std::process::id()));
        let state = dir.join("state");
        fs::create_dir_all(&state).expect("mkdir");
        let key = [1u8; 32];
        let mut f = SnapshotFile::for_state_dir(&dir.join("snaps"), &state).expect("file");
        assert!(f.read(Some(&key)).expect("read").is_none());
        let i = inst(5, "/vm/x@1.00");
        assert_eq!(f.write(Some(&key), TpmVersion::V2_0, &i, false, vec![1; 40]).expect("write"), 1);
        assert_eq!(f.write(Some(&key), TpmVersion::V2_0, &i, false, vec![2; 10]).expect("write"), 2);
        let [a, b] = f.paths().clone();
        let first = fs::read(&a).expect("slot a");
        let read = |f: &mut SnapshotFile| f.read(Some(&key)).map(|s| s.map(|s| (s.seq, s.volatile)));
        let mut fresh = SnapshotFile::for_state_dir(&dir.join("snaps"), &state).expect("file");
        assert_eq!(read(&mut fresh).expect("read"), Some((2, vec![2; 10])), "the latest slot wins");
        // A third write goes to slot a, shorter than what it held.
        assert_eq!(f.write(Some(&key), TpmVersion::V2_0, &i, false, vec![3; 10]).expect("write"), 3);
        let mut fresh = SnapshotFile::for_state_dir(&dir.join("snaps"), &state).expect("file");
        assert_eq!(read(&mut fresh).expect("read"), Some((3, vec![3; 10])));
        // Killed in the middle of writing slot a: slot b's snapshot is the one.
        let mut torn = fs::read(&a).expect("slot a");
        torn.truncate(torn.len() / 2);
        fs::write(&a, &torn).expect("tear");
        let mut fresh = SnapshotFile::for_state_dir(&dir.join("snaps"), &state).expect("file");
        assert_eq!(read(&mut fresh).expect("read"), Some((2, vec![2; 10])));
        // Both damaged: an error naming the file, never "no snapshot".
        fs::write(&b, b"XVTPMVS1 garbage").expect("damage");
        let mut fresh = SnapshotFile::for_state_dir(&dir.join("snaps"), &state).expect("file");
        assert!(read(&mut fresh).is_err());
        // An older snapshot put back under a process that has seen a newer one.
        fs::write(&a, &first).expect("put back snapshot 1");
        let _ = fs::remove_file(&b);
        let e = read(&mut f).expect_err("older");
        assert!(e.to_string().contains("older than snapshot 3"), "{e}");
        f.remove().expect("remove");
        f.remove().expect("remove twice");
        assert!(!a.exists() && !b.exists());
        let again = SnapshotFile::for_state_dir(&dir.join("snaps"), &dir.join("state/../state")).expect("file");
        assert_eq!(again.paths(), f.paths(), "named after the canonical state directory");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_later_domain_of_the_same_vm_and_device_continues_a_guest() {
        let saved = inst(5, "/vm/aa@100.00");
        assert!(saved.continued_by(&inst(9, "/vm/aa@200.00")), "restored: new id and start time");
        assert!(!saved.continued_by(&inst(9, "/vm/bb@200.00")), "another domain");
        let mut other_device = inst(9, "/vm/aa@200.00");
        other_device.uuid = "c0ffee00-0000-4000-8000-000000000002".into();
        assert!(!saved.continued_by(&other_device), "another vTPM");
        let unknown = Instance { life: None, ..inst(5, "") };
        assert!(!unknown.continued_by(&unknown.clone()), "no vm path: never continued");
    }
}
