//! Ways to reach the vTPM manager: its Unix socket (dom0 deployments; the vtpm names its uuid
//! and proves it with a token), or Xen's tpmfront towards the manager's domain, where the
//! manager learns the vTPM's identity from xenstore.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_xen::platform::Xen;

use super::managed::{parse_reply, request, ManagerLink};
use crate::{Error, Result};

const TAG_REQ2: u16 = 0x01C2;
const BIND: u32 = 0x0200_0401;

/// The manager's Unix socket.
#[derive(Debug)]
pub struct UnixLink {
    s: UnixStream,
}

impl UnixLink {
    /// Connects and binds to vTPM `uuid` with `token`.
    pub fn connect(path: &Path, uuid: &[u8; 16], token: &[u8]) -> Result<Self> {
        let s = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connect to the manager at {}", path.display()), e))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| Error::io("socket timeout", e))?;
        let mut l = Self { s };
        match l.call(TAG_REQ2, BIND, &[&uuid[..], token].concat())? {
            (0, _) => Ok(l),
            (st, _) => Err(Error::Config(format!("the manager refused this vTPM's uuid and token (status {st})"))),
        }
    }
}

impl ManagerLink for UnixLink {
    fn call(&mut self, tag: u16, ordinal: u32, body: &[u8]) -> Result<(u32, Vec<u8>)> {
        let io = |e| Error::io("talking to the manager", e);
        self.s.write_all(&request(tag, ordinal, body)).map_err(io)?;
        let mut head = [0u8; 10];
        self.s.read_exact(&mut head).map_err(io)?;
        let size = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        if !(10..=4096).contains(&size) {
            return Err(Error::Protocol(format!("manager reply of size {size}")));
        }
        let mut msg = head.to_vec();
        msg.resize(size, 0);
        self.s.read_exact(&mut msg[10..]).map_err(io)?;
        parse_reply(&msg)
    }
}

/// tpmfront to the manager's domain.
pub struct XenLink {
    fe: Frontend,
}

impl std::fmt::Debug for XenLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XenLink")
    }
}

impl XenLink {
    /// Connects our vtpm device `handle` (whose backend is the manager's domain).
    pub fn connect(xen: &dyn Xen, handle: u32) -> Result<Self> {
        let cfg = FrontendConfig { handle, ..FrontendConfig::default() };
        let fe = Frontend::connect(xen, cfg)
            .map_err(|e| Error::Protocol(format!("connecting to the manager over tpmfront: {e}")))?;
        Ok(Self { fe })
    }
}

impl ManagerLink for XenLink {
    fn call(&mut self, tag: u16, ordinal: u32, body: &[u8]) -> Result<(u32, Vec<u8>)> {
        let r = self
            .fe
            .transmit(&request(tag, ordinal, body))
            .map_err(|e| Error::Protocol(format!("manager over tpmfront: {e}")))?;
        parse_reply(&r)
    }
}
