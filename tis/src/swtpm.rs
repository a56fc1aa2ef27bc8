//! swtpm as a [`HwTpm`] (tests, and machines without a TPM): commands on its data channel,
//! localities set with CMD_SET_LOCALITY on its control channel.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::command::{self, HEADER_SIZE};
use crate::fifo::MAX_BUFFER;
use xvtpm_proto::ctrl::CtrlCmd;

use crate::{Error, Family, HwTpm, Result};

/// A stream socket, TCP or Unix.
pub trait Channel: Read + Write {}
impl<T: Read + Write> Channel for T {}

const CMD_INIT: u32 = CtrlCmd::Init as u32;
const CMD_SET_LOCALITY: u32 = CtrlCmd::SetLocality as u32;

/// Where swtpm's channels are.
#[derive(Debug, Clone)]
pub enum Address {
    /// `--server type=tcp,port=P` / `--ctrl type=tcp,port=P` on localhost.
    Tcp(u16),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

fn connect(a: &Address) -> Result<Box<dyn Channel + Send>> {
    let timeout = Some(Duration::from_secs(60));
    Ok(match a {
        Address::Tcp(port) => {
            let s = TcpStream::connect(("127.0.0.1", *port))
                .map_err(|e| Error::io(format!("connect to swtpm on port {port}"), e))?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(timeout).map_err(|e| Error::io("socket timeout", e))?;
            Box::new(s)
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p).map_err(|e| Error::io(format!("connect to {}", p.display()), e))?;
            s.set_read_timeout(timeout).map_err(|e| Error::io("socket timeout", e))?;
            Box::new(s)
        }
    })
}

/// A TPM reached through swtpm's socket interface.
pub struct Swtpm {
    data: Box<dyn Channel + Send>,
    ctrl: Box<dyn Channel + Send>,
    family: Family,
    locality: u8,
    label: String,
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("family", &self.family)
            .field("locality", &self.locality)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Swtpm {
    /// Connects to swtpm's data and control channels. The TPM must be running (`--flags
    /// not-need-init`, or call [`Swtpm::init`]).
    pub fn connect(data: &Address, ctrl: &Address, family: Family) -> Result<Self> {
        Ok(Self {
            data: connect(data)?,
            ctrl: connect(ctrl)?,
            family,
            locality: 0,
            label: format!("swtpm data {data:?}, control {ctrl:?}"),
        })
    }

    /// Connects to a swtpm whose control socket is `ctrl` and data socket `data` (Unix).
    pub fn connect_unix(data: &Path, ctrl: &Path, family: Family) -> Result<Self> {
        Self::connect(&Address::Unix(data.into()), &Address::Unix(ctrl.into()), family)
    }

    fn control(&mut self, code: u32, payload: &[u8]) -> Result<u32> {
        let mut msg = code.to_be_bytes().to_vec();
        msg.extend_from_slice(payload);
        self.ctrl.write_all(&msg).map_err(|e| Error::io("swtpm control channel", e))?;
        let mut rc = [0u8; 4];
        self.ctrl.read_exact(&mut rc).map_err(|e| Error::io("swtpm control channel", e))?;
        Ok(u32::from_be_bytes(rc))
    }

    /// Learns the family by a TPM2_GetCapability probe: a TPM 1.2 answers with a 1.2 tag.
    pub fn detect_family(&mut self) -> Result<Family> {
        let probe = crate::command::probe::tpm2_get_properties(crate::command::probe::TPM2_PT_MAX_COMMAND_SIZE, 2);
        let r = self.transmit(self.locality, &probe)?;
        self.family = if crate::command::probe::is_tpm2_response(&r) { Family::Tpm20 } else { Family::Tpm12 };
        Ok(self.family)
    }

    /// CMD_INIT: powers the TPM on.
    pub fn init(&mut self) -> Result<()> {
        match self.control(CMD_INIT, &0u32.to_be_bytes())? {
            0 => Ok(()),
            rc => Err(Error::Protocol(format!("swtpm CMD_INIT failed with {rc:#x}"))),
        }
    }
}

impl HwTpm for Swtpm {
    fn transmit(&mut self, locality: u8, cmd: &[u8]) -> Result<Vec<u8>> {
        if locality > 4 {
            return Err(Error::Locality { locality, why: "localities are 0 to 4" });
        }
        command::check_command(cmd, MAX_BUFFER)?;
        if locality != self.locality {
            match self.control(CMD_SET_LOCALITY, &[locality])? {
                0 => self.locality = locality,
                rc => return Err(Error::Protocol(format!("swtpm refused locality {locality}: {rc:#x}"))),
            }
        }
        self.data.write_all(cmd).map_err(|e| Error::io("swtpm data channel", e))?;
        let mut rsp = vec![0u8; HEADER_SIZE];
        self.data.read_exact(&mut rsp).map_err(|e| Error::io("swtpm data channel", e))?;
        let size = command::response_size(&rsp, MAX_BUFFER)?;
        rsp.resize(size, 0);
        self.data.read_exact(&mut rsp[HEADER_SIZE..]).map_err(|e| Error::io("swtpm data channel", e))?;
        Ok(rsp)
    }

    fn family(&self) -> Family {
        self.family
    }

    fn describe(&self) -> String {
        format!("TPM {} through {}", self.family, self.label)
    }
}
