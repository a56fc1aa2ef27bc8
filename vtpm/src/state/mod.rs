//! Where a TPM's state blobs live. libtpms' NVRAM callbacks read and write named blobs
//! (`permall`, `volatilestate`, `savestate`) through a [`StateStore`].

pub mod file;
pub mod inspect;
pub mod link;
pub mod managed;

use std::collections::HashMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::{Error, Result};

/// State files' permission bits when their owner asked for nothing: only the owner reads
/// them (swtpm's `--tpmstate` default, 0640, applies to the swtpm command line).
pub const PRIVATE: u32 = 0o600;

/// Creates the state directory `dir` if needed (mode 0700: the state is the vTPM's secrets)
/// and locks it for this process: two vtpm processes on one state would overwrite each other.
pub fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("create state directory {}", dir.display()), e))?;
    let lock_path = dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("open {}", lock_path.display()), e))?;
    if lock.try_lock().is_err() {
        return Err(Error::Config(format!("state directory {} is in use by another vtpm process", dir.display())));
    }
    Ok(lock)
}

/// Writes `bytes` to `path` (a temporary file, replaced if it exists) with permission bits
/// `mode` from its creation on, whatever the umask, and syncs it.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io("create", e))?;
    // A file left by an earlier run keeps its old bits, and the umask may have cleared some.
    f.set_permissions(Permissions::from_mode(mode)).map_err(|e| io("chmod", e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io("write", e))
}

/// Gives the existing files `names` of `dir` permission bits `mode` (state written before the
/// mode was asked for, or under another one).
pub fn chmod_existing(dir: &Path, names: impl Iterator<Item = String>, mode: u32) -> Result<()> {
    for name in names {
        let path = dir.join(&name);
        match std::fs::metadata(&path) {
            Ok(m) if m.permissions().mode() & 0o7777 != mode => {
                std::fs::set_permissions(&path, Permissions::from_mode(mode))
                    .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
                log::info!("{}: permissions set to {mode:04o}", path.display());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
        }
    }
    Ok(())
}

/// Named state blobs. Every `store` is atomic: after a crash at any moment, `load` returns
/// either the previous value or the new one, never a mix and never nothing.
pub trait StateStore: Send + std::fmt::Debug {
    /// The blob, or `None` if it was never stored. A blob that exists but cannot be read
    /// (corrupt, wrong key) is an error, never `None`.
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Stores a blob atomically and durably.
    fn store(&mut self, name: &str, data: &[u8]) -> Result<()>;
    /// Deletes a blob (no error if absent).
    fn delete(&mut self, name: &str) -> Result<()>;
    /// A key derived from this state's secret key for `purpose` (and, where there is one,
    /// the state's own id), or `None` when the state has no secret key.
    fn derive_key(&self, _purpose: &str) -> Option<[u8; 32]> {
        None
    }
}

/// HKDF-SHA256 of `secret` for `purpose`, salted with `salt`.
pub(crate) fn hkdf(secret: &[u8], salt: &[u8], purpose: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes are always within HKDF-SHA256's limit of 255 * 32.
    let _ = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), secret).expand(purpose.as_bytes(), &mut out);
    out
}

/// An in-memory store, for tests.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    blobs: HashMap<String, Vec<u8>>,
}

impl StateStore for MemStore {
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.blobs.get(name).cloned())
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.blobs.insert(name.to_string(), data.to_vec());
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<()> {
        self.blobs.remove(name);
        Ok(())
    }
}
