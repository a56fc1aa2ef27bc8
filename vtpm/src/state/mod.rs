//! Where a TPM's state blobs live. libtpms' NVRAM callbacks read and write named blobs
//! (`permall`, `volatilestate`, `savestate`) through a [`StateStore`].

pub mod file;
pub mod inspect;
pub mod link;
pub mod managed;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::{Error, Result};

/// Creates the state directory `dir` if needed and locks it for this process: two vtpm
/// processes on one state would overwrite each other.
pub fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create state directory {}", dir.display()), e))?;
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
