//! The store's medium: numbered 4 KiB blocks on a file or block device (the manager domain's
//! disk), or in memory for tests.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Size of a block.
pub const BLOCK: usize = 4096;

/// Numbered blocks. Writes become durable at `sync`.
pub trait BlockDev {
    /// Reads block `n`; a block past the end reads as zeros.
    fn read(&mut self, n: u64, buf: &mut [u8; BLOCK]) -> Result<()>;
    /// Writes block `n`.
    fn write(&mut self, n: u64, buf: &[u8; BLOCK]) -> Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> Result<()>;
    /// Name for messages.
    fn name(&self) -> String;
}

/// A file or block device.
#[derive(Debug)]
pub struct FileDev {
    file: File,
    path: PathBuf,
}

impl FileDev {
    /// Opens `path`, creating a file if `create`.
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("open store {}", path.display()), e))?;
        if file.try_lock().is_err() {
            return Err(Error::Store(format!("{} is in use by another manager", path.display())));
        }
        Ok(Self { file, path: path.to_path_buf() })
    }
}

impl BlockDev for FileDev {
    fn read(&mut self, n: u64, buf: &mut [u8; BLOCK]) -> Result<()> {
        buf.fill(0);
        let mut got = 0;
        while got < BLOCK {
            match self.file.read_at(&mut buf[got..], n * BLOCK as u64 + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("read block {n} of {}", self.path.display()), e)),
            }
        }
        Ok(())
    }

    fn write(&mut self, n: u64, buf: &[u8; BLOCK]) -> Result<()> {
        self.file
            .write_all_at(buf, n * BLOCK as u64)
            .map_err(|e| Error::io(format!("write block {n} of {}", self.path.display()), e))
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(format!("sync {}", self.path.display()), e))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Blocks in memory, counting writes.
#[derive(Debug, Default, Clone)]
pub struct MemDev {
    /// The blocks.
    pub blocks: Vec<[u8; BLOCK]>,
    /// Blocks written so far.
    pub writes: u64,
}

impl BlockDev for MemDev {
    fn read(&mut self, n: u64, buf: &mut [u8; BLOCK]) -> Result<()> {
        *buf = self.blocks.get(n as usize).copied().unwrap_or([0; BLOCK]);
        Ok(())
    }

    fn write(&mut self, n: u64, buf: &[u8; BLOCK]) -> Result<()> {
        let n = n as usize;
        if self.blocks.len() <= n {
            self.blocks.resize(n + 1, [0; BLOCK]);
        }
        self.blocks[n] = *buf;
        self.writes += 1;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn name(&self) -> String {
        "memory".into()
    }
}

impl<D: BlockDev + ?Sized> BlockDev for &mut D {
    fn read(&mut self, n: u64, buf: &mut [u8; BLOCK]) -> Result<()> {
        (**self).read(n, buf)
    }
    fn write(&mut self, n: u64, buf: &[u8; BLOCK]) -> Result<()> {
        (**self).write(n, buf)
    }
    fn sync(&mut self) -> Result<()> {
        (**self).sync()
    }
    fn name(&self) -> String {
        (**self).name()
    }
}
