//! The simulated xenstored. (TEMPORARY placeholder so the crate builds while it is written.)

use std::path::{Path, PathBuf};

use crate::{DomId, Error, Result, Xenstore};

/// Magic of the hello.
pub const HELLO_MAGIC: &[u8; 4] = b"XSIM";

/// The server.
#[derive(Debug)]
pub struct SimXenstored {
    path: PathBuf,
}

impl SimXenstored {
    /// Starts it.
    pub fn start(socket: &Path) -> Result<Self> {
        Err(Error::Sim(format!("not yet: {}", socket.display())))
    }

    /// Its socket.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

/// Connects.
pub fn connect(socket: &Path, domid: DomId) -> Result<Xenstore> {
    Err(Error::Sim(format!("not yet: {} {domid}", socket.display())))
}
