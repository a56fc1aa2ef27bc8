//! The file state store: one file per blob in the vTPM's state directory, encrypted and
//! authenticated with AES-256-GCM (or, without a key, authenticated by a SHA-256 digest only,
//! which catches corruption but not tampering), written crash-safely.
//!
//! File layout (`<dir>/<blob>.xvtpm`):
//!
//! ```text
//! "XVTPMST1" | mode u8 (1 AES-256-GCM, 2 SHA-256) | flags u8 | 2 zero bytes | nonce [12] | len u32 LE | body
//! ```
//!
//! The body is ciphertext and tag (mode 1, the header, the blob name and the directory's id as
//! associated data, so a file copied to another blob's name, to another vTPM's directory or
//! with header edits fails) or the plain blob followed by SHA-256(header | name | id | blob)
//! (mode 2). The directory's id is 16 random bytes in `.xvtpm-id`, made when the directory
//! first holds state; flag 1 says a file is bound to it (files written before ids existed have
//! flag 0, and are rewritten bound when the id is made). A store writes a temporary file with
//! the state's permission bits, fsyncs it, renames it over the old one and fsyncs the
//! directory: at every moment one complete, valid copy exists. An exclusive lock on the
//! directory keeps a second vtpm process off the same state.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::StateStore;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"XVTPMST1";
const MODE_AES256GCM: u8 = 1;
const MODE_SHA256: u8 = 2;
const HEADER_LEN: usize = 8 + 1 + 3 + 12 + 4;
/// Header flag: the file is bound to its directory's id.
const BOUND: u8 = 1;
/// The directory's id.
const ID_FILE: &str = ".xvtpm-id";
const ID_LEN: usize = 16;
const TAG_LEN: usize = 16;
const DIGEST_LEN: usize = 32;

/// A 256-bit state encryption key.
#[derive(Clone)]
pub struct StateKey([u8; 32]);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

/// How a key file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// Raw bytes.
    Binary,
    /// Hex digits (whitespace around them ignored).
    Hex,
}

impl StateKey {
    /// A key from raw bytes: 32 bytes, or 16 (swtpm's AES-128 keys), which are stretched
    /// with SHA-256.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        match bytes.len() {
            32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(bytes);
                Ok(StateKey(k))
            }
            16 => Ok(StateKey(Sha256::digest(bytes).into())),
            n => Err(format!("a key has 32 bytes (or 16), this one has {n}")),
        }
    }

    /// Reads a key file.
    pub fn from_file(path: &Path, format: KeyFormat) -> Result<Self> {
        let err = |reason: String| Error::Key { path: path.to_path_buf(), reason };
        let raw = fs::read(path).map_err(|e| err(e.to_string()))?;
        let bytes = match format {
            KeyFormat::Binary => raw,
            KeyFormat::Hex => {
                let text = String::from_utf8(raw).map_err(|_| err("not hex text".into()))?;
                decode_hex(text.trim()).ok_or_else(|| err("not hex text".into()))?
            }
        };
        StateKey::from_bytes(&bytes).map_err(err)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The state directory of one vTPM.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    key: Option<StateKey>,
    /// Permission bits of the state files.
    mode: u32,
    /// The directory's id, bound into every file.
    id: [u8; ID_LEN],
    _lock: File,
}

impl FileStore {
    /// Opens (creating, mode 0700) `dir` and locks it for this process; state files get mode
    /// 0600.
    pub fn open(dir: &Path, key: Option<StateKey>) -> Result<Self> {
        Self::open_with_mode(dir, key, super::PRIVATE)
    }

    /// [`FileStore::open`] with state files of permission bits `mode` (existing ones are
    /// changed to it).
    pub fn open_with_mode(dir: &Path, key: Option<StateKey>, mode: u32) -> Result<Self> {
        let lock = super::lock_dir(dir)?;
        if key.is_none() {
            log::warn!("no state key given: state in {} is checked for integrity but not encrypted", dir.display());
        }
        let mut store = FileStore { dir: dir.to_path_buf(), key, mode, id: [0; ID_LEN], _lock: lock };
        let blobs = store.blob_files()?;
        super::chmod_existing(dir, blobs.iter().cloned().chain([ID_FILE.to_string()]), mode)?;
        let id_path = dir.join(ID_FILE);
        match fs::read(&id_path) {
            Ok(id) => {
                store.id = id.as_slice().try_into().map_err(|_| Error::StateCorrupt {
                    path: id_path.clone(),
                    reason: format!("holds {} bytes, a directory id has {ID_LEN}", id.len()),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => store.make_id(&blobs)?,
            Err(e) => return Err(Error::io(format!("read {}", id_path.display()), e)),
        }
        Ok(store)
    }

    /// The names of the blob files in the directory.
    fn blob_files(&self) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io(format!("list {}", self.dir.display()), e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".xvtpm") && !n.starts_with('.'))
            .collect())
    }

    /// Gives the directory its id, and binds the files written before ids existed to it. The
    /// new id is kept as `.xvtpm-id.new` until every file is bound, then renamed into place,
    /// so a crash in the middle leaves a directory the next open finishes: never unbound files
    /// next to an id (refused), nor bound files without one. A directory whose files are bound
    /// to an id it no longer has is refused: a new id would make them unreadable for good.
    fn make_id(&mut self, blobs: &[String]) -> Result<()> {
        let pending = self.dir.join(format!("{ID_FILE}.new"));
        let resumed = match fs::read(&pending) {
            Ok(id) => Some(<[u8; ID_LEN]>::try_from(id.as_slice()).map_err(|_| Error::StateCorrupt {
                path: pending.clone(),
                reason: format!("holds {} bytes, a directory id has {ID_LEN}", id.len()),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("read {}", pending.display()), e)),
        };
        let mut legacy = Vec::new();
        for file in blobs {
            let path = self.dir.join(file);
            let bytes = fs::read(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
            let bound = bytes.get(9).is_some_and(|f| f & BOUND != 0);
            match (bound, resumed) {
                // Bound by the interrupted run that made `pending`: checked when loaded.
                (true, Some(_)) => continue,
                (true, None) => {
                    return Err(Error::StateCorrupt {
                        path: self.dir.join(ID_FILE),
                        reason: format!(
                            "is missing, but {file} is bound to it: restore it from where this state came from \
                             (copy the whole directory, dot files included)"
                        ),
                    })
                }
                (false, _) => {}
            }
            let name = file.trim_end_matches(".xvtpm").to_string();
            let data = self.decode_as(&path, &name, &bytes, None)?;
            legacy.push((name, data));
        }
        match resumed {
            Some(id) => self.id = id,
            None => {
                rand::rngs::OsRng.fill_bytes(&mut self.id);
                super::write_file(&pending, &self.id, self.mode)?;
                self.sync_dir()?;
            }
        }
        for (name, data) in legacy {
            log::info!("{}: binding {name} to the directory's new id", self.dir.display());
            self.store(&name, &data)?;
        }
        let id_path = self.dir.join(ID_FILE);
        fs::rename(&pending, &id_path)
            .map_err(|e| Error::io(format!("rename {} to {}", pending.display(), id_path.display()), e))?;
        self.sync_dir()
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding blob `name`.
    pub fn blob_path(&self, name: &str) -> Result<PathBuf> {
        let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::Config(format!("invalid state blob name {name:?}")));
        }
        Ok(self.dir.join(format!("{name}.xvtpm")))
    }

    /// The bytes of blob `name`'s file holding `data`, as `store` writes them.
    pub fn encode(&self, name: &str, data: &[u8]) -> Result<Vec<u8>> {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[9] = BOUND;
        let id = &self.id[..];
        let body = match &self.key {
            Some(key) => {
                header[8] = MODE_AES256GCM;
                rand::rngs::OsRng.fill_bytes(&mut header[12..24]);
                let len = (data.len() + TAG_LEN) as u32;
                header[24..28].copy_from_slice(&len.to_le_bytes());
                let aad = [&header[..], name.as_bytes(), id].concat();
                let cipher = Aes256Gcm::new((&key.0).into());
                cipher
                    .encrypt(Nonce::from_slice(&header[12..24]), Payload { msg: data, aad: &aad })
                    .map_err(|_| Error::Config("state encryption failed".into()))?
            }
            None => {
                header[8] = MODE_SHA256;
                let len = (data.len() + DIGEST_LEN) as u32;
                header[24..28].copy_from_slice(&len.to_le_bytes());
                let digest = Sha256::new()
                    .chain_update(header)
                    .chain_update(name.as_bytes())
                    .chain_update(id)
                    .chain_update(data)
                    .finalize();
                [data, &digest[..]].concat()
            }
        };
        Ok([&header[..], &body].concat())
    }

    fn decode(&self, path: &Path, name: &str, file: &[u8]) -> Result<Vec<u8>> {
        self.decode_as(path, name, file, Some(&self.id))
    }

    /// Decodes a file bound to directory id `id`, or (`None`) one written before ids existed.
    fn decode_as(&self, path: &Path, name: &str, file: &[u8], id: Option<&[u8; ID_LEN]>) -> Result<Vec<u8>> {
        let corrupt = |reason: &str| Error::StateCorrupt { path: path.to_path_buf(), reason: reason.to_string() };
        if file.len() < HEADER_LEN {
            return Err(corrupt("truncated (shorter than its header)"));
        }
        let (header, body) = file.split_at(HEADER_LEN);
        if &header[..8] != MAGIC {
            return Err(corrupt("not an xvtpm state file (bad magic)"));
        }
        let len = u32::from_le_bytes([header[24], header[25], header[26], header[27]]) as usize;
        if len != body.len() {
            return Err(corrupt(&format!("length field says {len} bytes, the file holds {}", body.len())));
        }
        let id: &[u8] = match (header[9], id) {
            (BOUND, Some(id)) => id,
            (0, None) => &[],
            (0, Some(_)) => {
                return Err(corrupt("is not bound to this directory (written elsewhere, or an old file put back)"))
            }
            (BOUND, None) => return Err(corrupt("is bound to a directory id this directory does not have")),
            (f, _) => return Err(corrupt(&format!("unknown flags {f:#x}"))),
        };
        match (header[8], &self.key) {
            (MODE_AES256GCM, Some(key)) => {
                let aad = [header, name.as_bytes(), id].concat();
                let cipher = Aes256Gcm::new((&key.0).into());
                cipher.decrypt(Nonce::from_slice(&header[12..24]), Payload { msg: body, aad: &aad }).map_err(|_| {
                    corrupt("does not authenticate: corrupted, encrypted with another key, or another vTPM's state")
                })
            }
            (MODE_AES256GCM, None) => Err(corrupt("is encrypted, but no state key was given")),
            (MODE_SHA256, Some(_)) => {
                Err(corrupt("is not encrypted, but a state key was given (refusing to load unencrypted state)"))
            }
            (MODE_SHA256, None) => {
                if body.len() < DIGEST_LEN {
                    return Err(corrupt("truncated (no digest)"));
                }
                let (data, digest) = body.split_at(body.len() - DIGEST_LEN);
                let want = Sha256::new()
                    .chain_update(header)
                    .chain_update(name.as_bytes())
                    .chain_update(id)
                    .chain_update(data)
                    .finalize();
                if want[..] != *digest {
                    return Err(corrupt("digest mismatch: the file is corrupted"));
                }
                Ok(data.to_vec())
            }
            (m, _) => Err(corrupt(&format!("unknown protection mode {m}"))),
        }
    }

    /// Parses the bytes of blob `name`'s file as `load` does (the fuzz targets' entry point).
    pub fn decode_file(&self, name: &str, file: &[u8]) -> Result<Vec<u8>> {
        let path = self.blob_path(name)?;
        self.decode(&path, name, file)
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("fsync {}", self.dir.display()), e))
    }
}

impl StateStore for FileStore {
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(name)?;
        match fs::read(&path) {
            Ok(file) => self.decode(&path, name, &file).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.blob_path(name)?;
        let tmp = self.dir.join(format!(".{name}.xvtpm.tmp"));
        let bytes = self.encode(name, data)?;
        super::write_file(&tmp, &bytes, self.mode)?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(format!("rename {} to {}", tmp.display(), path.display()), e))?;
        self.sync_dir()
    }

    fn delete(&mut self, name: &str) -> Result<()> {
        let path = self.blob_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }

    fn derive_key(&self, purpose: &str) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| super::hkdf(&k.0, &self.id, purpose))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xvtpm-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn key(b: u8) -> Option<StateKey> {
        Some(StateKey::from_bytes(&[b; 32]).expect("key"))
    }

    #[test]
    fn roundtrip_with_and_without_key() {
        for (tag, k) in [("enc", key(7)), ("plain", None)] {
            let d = tmpdir(tag);
            let mut s = FileStore::open(&d, k.clone()).expect("open");
            assert!(s.load("permall").expect("load").is_none());
            s.store("permall", b"first").expect("store");
            s.store("permall", b"second").expect("store");
            assert_eq!(s.load("permall").expect("load").as_deref(), Some(&b"second"[..]));
            let raw = fs::read(d.join("permall.xvtpm")).expect("raw");
            assert_eq!(raw.windows(6).any(|w| w == b"second"), k.is_none(), "encrypted iff keyed");
            s.delete("permall").expect("delete");
            assert!(s.load("permall").expect("load").is_none());
            s.delete("permall").expect("delete absent");
            assert!(fs::read_dir(&d).expect("dir").all(|e| !e
                .expect("e")
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")));
            drop(s);
            let _ = fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn every_flipped_byte_is_detected_and_named() {
        for (tag, k) in [("flip-enc", key(1)), ("flip-plain", None)] {
            let d = tmpdir(tag);
            let mut s = FileStore::open(&d, k).expect("open");
            s.store("permall", &[0x5a; 300]).expect("store");
            let path = d.join("permall.xvtpm");
            let good = fs::read(&path).expect("raw");
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x01;
                fs::write(&path, &bad).expect("write");
                match s.load("permall") {
                    Err(Error::StateCorrupt { path: p, .. }) => assert_eq!(p, path),
                    other => panic!("byte {i} flipped: {other:?}"),
                }
            }
            fs::write(&path, &good[..good.len() - 1]).expect("truncate");
            assert!(matches!(s.load("permall"), Err(Error::StateCorrupt { .. })));
            drop(s);
            let _ = fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn wrong_key_missing_key_downgrade_and_swapped_files_are_refused() {
        let d = tmpdir("keys");
        let mut s = FileStore::open(&d, key(1)).expect("open");
        s.store("permall", b"permanent").expect("store");
        s.store("volatilestate", b"volatile").expect("store");
        drop(s);
        let err = |k: Option<StateKey>, name: &str| {
            let mut s = FileStore::open(&d, k).expect("open");
            let e = s.load(name).expect_err("refused").to_string();
            drop(s);
            e
        };
        assert!(err(key(2), "permall").contains("does not authenticate"));
        assert!(err(None, "permall").contains("no state key"));
        fs::copy(d.join("permall.xvtpm"), d.join("volatilestate.xvtpm")).expect("swap");
        assert!(err(key(1), "volatilestate").contains("does not authenticate"), "a file under another blob's name");
        let mut plain = FileStore::open(&tmpdir("keys-plain"), None).expect("open");
        plain.store("permall", b"x").expect("store");
        let plain_dir = plain.dir().to_path_buf();
        drop(plain);
        let mut keyed = FileStore::open(&plain_dir, key(1)).expect("open");
        assert!(keyed.load("permall").expect_err("downgrade").to_string().contains("not encrypted"));
        drop(keyed);
        let _ = fs::remove_dir_all(&d);
        let _ = fs::remove_dir_all(&plain_dir);
    }

    #[test]
    fn directory_is_locked_and_names_are_checked() {
        let d = tmpdir("lock");
        let mut s = FileStore::open(&d, None).expect("open");
        assert!(FileStore::open(&d, None).expect_err("locked").to_string().contains("in use"));
        assert!(s.store("../escape", b"x").is_err());
        assert!(s.load("").is_err());
        drop(s);
        FileStore::open(&d, None).expect("lock released on drop");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn key_files() {
        let d = tmpdir("keyfile");
        fs::create_dir_all(&d).expect("dir");
        let hex = d.join("k.hex");
        fs::write(&hex, format!("{}\n", "ab".repeat(32))).expect("w");
        let bin = d.join("k.bin");
        fs::write(&bin, [0xab; 32]).expect("w");
        let a = StateKey::from_file(&hex, KeyFormat::Hex).expect("hex");
        let b = StateKey::from_file(&bin, KeyFormat::Binary).expect("bin");
        assert_eq!(a.0, b.0);
        fs::write(&hex, "abc").expect("w");
        assert!(StateKey::from_file(&hex, KeyFormat::Hex).is_err());
        fs::write(&bin, [1u8; 20]).expect("w");
        assert!(StateKey::from_file(&bin, KeyFormat::Binary).expect_err("20 bytes").to_string().contains("32 bytes"));
        assert!(StateKey::from_file(&d.join("missing"), KeyFormat::Binary).is_err());
        assert_eq!(StateKey::from_bytes(&[3u8; 16]).expect("aes-128 key").0.len(), 32);
        let _ = fs::remove_dir_all(&d);
    }

    /// A file as vtpm wrote them before directories had ids (flag 0, no id in the AAD).
    fn legacy_file(k: u8, name: &str, data: &[u8]) -> Vec<u8> {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8] = MODE_AES256GCM;
        header[24..28].copy_from_slice(&((data.len() + TAG_LEN) as u32).to_le_bytes());
        let aad = [&header[..], name.as_bytes()].concat();
        let ct = Aes256Gcm::new((&[k; 32]).into())
            .encrypt(Nonce::from_slice(&header[12..24]), Payload { msg: data, aad: &aad })
            .expect("encrypt");
        [&header[..], &ct].concat()
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn files_get_the_mode_asked_for_and_a_new_directory_is_private() {
        let d = tmpdir("modes");
        let mut s = FileStore::open_with_mode(&d, key(1), 0o640).expect("open");
        assert_eq!(mode_of(&d), 0o700, "a directory made for state");
        s.store("permall", b"x").expect("store");
        assert_eq!(mode_of(&d.join("permall.xvtpm")), 0o640);
        assert_eq!(mode_of(&d.join(ID_FILE)), 0o640);
        drop(s);
        // Reopened with another mode: existing files follow, new ones are born with it.
        let mut s = FileStore::open_with_mode(&d, key(1), 0o600).expect("reopen");
        assert_eq!(mode_of(&d.join("permall.xvtpm")), 0o600);
        s.store("volatilestate", b"y").expect("store");
        assert_eq!(mode_of(&d.join("volatilestate.xvtpm")), 0o600);
        // A temporary file left by a crash with loose bits does not keep them.
        fs::write(d.join(".savestate.xvtpm.tmp"), b"junk").expect("tmp");
        fs::set_permissions(d.join(".savestate.xvtpm.tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .expect("chmod");
        s.store("savestate", b"z").expect("store");
        assert_eq!(mode_of(&d.join("savestate.xvtpm")), 0o600);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn two_vtpms_sharing_a_key_cannot_swap_state() {
        let (a, b) = (tmpdir("swap-a"), tmpdir("swap-b"));
        let mut sa = FileStore::open(&a, key(3)).expect("a");
        let mut sb = FileStore::open(&b, key(3)).expect("b");
        sa.store("permall", b"a's seeds").expect("store");
        sb.store("permall", b"b's seeds").expect("store");
        fs::copy(b.join("permall.xvtpm"), a.join("permall.xvtpm")).expect("swap");
        let e = sa.load("permall").expect_err("b's state in a");
        assert!(e.to_string().contains("another vTPM's state"), "{e}");
        let _ = (fs::remove_dir_all(&a), fs::remove_dir_all(&b));
    }

    #[test]
    fn state_from_before_ids_is_bound_at_open_and_cannot_be_put_back() {
        let d = tmpdir("legacy");
        fs::create_dir_all(&d).expect("dir");
        let old = legacy_file(4, "permall", b"old seeds");
        fs::write(d.join("permall.xvtpm"), &old).expect("legacy");
        let mut s = FileStore::open(&d, key(4)).expect("open binds it");
        assert_eq!(s.load("permall").expect("load").as_deref(), Some(&b"old seeds"[..]));
        assert_eq!(fs::read(d.join("permall.xvtpm")).expect("raw")[9], BOUND);
        // The unbound copy put back: refused (else any unbound file with this key would do).
        fs::write(d.join("permall.xvtpm"), &old).expect("put back");
        let e = s.load("permall").expect_err("unbound");
        assert!(e.to_string().contains("not bound to this directory"), "{e}");
        drop(s);
        // The id lost while bound files exist: refused, never replaced.
        let mut s = FileStore::open(&d, key(4)).expect("open");
        s.store("permall", b"new").expect("store");
        drop(s);
        fs::remove_file(d.join(ID_FILE)).expect("lose the id");
        let e = FileStore::open(&d, key(4)).expect_err("missing id");
        assert!(e.to_string().contains("restore it"), "{e}");
        assert!(!d.join(ID_FILE).exists(), "no new id was made");
        let _ = fs::remove_dir_all(&d);
    }

    /// A crash while binding older files: the new id is still pending, one file is bound to
    /// it, one is not yet. The next open finishes the job, and both load.
    #[test]
    fn binding_interrupted_by_a_crash_is_finished_at_the_next_open() {
        let d = tmpdir("legacy-crash");
        fs::create_dir_all(&d).expect("dir");
        fs::write(d.join("permall.xvtpm"), legacy_file(5, "permall", b"seeds")).expect("legacy");
        fs::write(d.join("volatilestate.xvtpm"), legacy_file(5, "volatilestate", b"pcrs")).expect("legacy");
        // What the interrupted run left: the pending id, and permall already bound to it.
        let id = [0x77u8; ID_LEN];
        fs::write(d.join(format!("{ID_FILE}.new")), id).expect("pending id");
        let mut bound = FileStore::open(&tmpdir("legacy-crash-b"), key(5)).expect("open");
        bound.id = id;
        fs::write(d.join("permall.xvtpm"), bound.encode("permall", b"seeds").expect("encode")).expect("bound");
        let mut s = FileStore::open(&d, key(5)).expect("the next open finishes the binding");
        assert_eq!(s.load("permall").expect("load").as_deref(), Some(&b"seeds"[..]));
        assert_eq!(s.load("volatilestate").expect("load").as_deref(), Some(&b"pcrs"[..]));
        assert_eq!(fs::read(d.join(ID_FILE)).expect("id"), id, "the pending id is the directory's");
        assert!(!d.join(format!("{ID_FILE}.new")).exists());
        let _ = (fs::remove_dir_all(&d), fs::remove_dir_all(tmpdir("legacy-crash-b")));
    }
}
