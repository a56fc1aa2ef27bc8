//! Ways to reach the vTPM manager: its Unix socket (dom0 deployments; the vtpm names its uuid
//! and proves it with a token), or Xen's tpmfront towards the manager's domain, where the
//! manager learns the vTPM's identity from xenstore.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_xen::platform::Xen;

use xvtpm_proto::mgr::Request;
use xvtpm_proto::{tpm, Secret, Uuid};

use super::managed::{parse_reply, ManagerLink};
use crate::{Error, Result};

/// The manager's Unix socket. After any I/O error the connection is dropped and the next
/// call reconnects and binds again: a late reply must never be read as the answer to a later
/// request.
#[derive(Debug)]
pub struct UnixLink {
    s: Option<UnixStream>,
    path: PathBuf,
    uuid: [u8; 16],
    token: Vec<u8>,
}

impl UnixLink {
    /// Connects and binds to vTPM `uuid` with `token`.
    pub fn connect(path: &Path, uuid: &[u8; 16], token: &[u8]) -> Result<Self> {
        let mut l = Self { s: None, path: path.to_path_buf(), uuid: *uuid, token: token.to_vec() };
        l.reconnect()?;
        Ok(l)
    }

    fn reconnect(&mut self) -> Result<()> {
        let s = UnixStream::connect(&self.path)
            .map_err(|e| Error::io(format!("connect to the manager at {}", self.path.display()), e))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| Error::io("socket timeout", e))?;
        self.s = Some(s);
        let bind = Request::Bind { uuid: Uuid(self.uuid), token: Secret(self.token.clone()) };
        match self.exchange(&bind)? {
            (0, _) => Ok(()),
            (st, _) => {
                self.s = None;
                Err(Error::Config(format!("the manager refused this vTPM's uuid and token (status {st})")))
            }
        }
    }

    fn exchange(&mut self, request: &Request) -> Result<(u32, Vec<u8>)> {
        let Some(s) = self.s.as_mut() else {
            return Err(Error::Protocol("not connected to the manager".into()));
        };
        let r = (|| -> std::io::Result<Vec<u8>> {
            s.write_all(&request.encode())?;
            let mut head = [0u8; tpm::HEADER_SIZE];
            s.read_exact(&mut head)?;
            let size = tpm::be32(&head, 2).unwrap_or_default() as usize;
            if !(tpm::HEADER_SIZE..=xvtpm_proto::mgr::MAX_MESSAGE).contains(&size) {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("reply of size {size}")));
            }
            let mut msg = head.to_vec();
            msg.resize(size, 0);
            s.read_exact(&mut msg[tpm::HEADER_SIZE..])?;
            Ok(msg)
        })();
        match r {
            Ok(msg) => parse_reply(&msg),
            Err(e) => {
                // The stream may hold a late reply now: never read from it again.
                self.s = None;
                Err(Error::io("talking to the manager", e))
            }
        }
    }
}

impl ManagerLink for UnixLink {
    fn call(&mut self, request: &Request) -> Result<(u32, Vec<u8>)> {
        if self.s.is_none() {
            self.reconnect()?;
        }
        self.exchange(request)
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
    fn call(&mut self, request: &Request) -> Result<(u32, Vec<u8>)> {
        let r =
            self.fe.transmit(&request.encode()).map_err(|e| Error::Protocol(format!("manager over tpmfront: {e}")))?;
        parse_reply(&r)
    }
}
