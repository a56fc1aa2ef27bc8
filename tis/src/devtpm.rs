//! The kernel's TPM device (`/dev/tpmrm0`, or `/dev/tpm0`) as a [`HwTpm`], for dom0
//! deployments where the kernel owns the hardware TPM. Write a command, read its response.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use crate::command::{self, probe, HEADER_SIZE};
use crate::fifo::MAX_BUFFER;
use crate::{Error, Family, HwTpm, Result};

/// A TPM character device (or anything that answers a written command with one read).
#[derive(Debug)]
pub struct DevTpm<F> {
    dev: F,
    family: Family,
    label: String,
}

impl DevTpm<std::fs::File> {
    /// Opens `path` and learns the family from sysfs (`/sys/class/tpm/tpmN/tpm_version_major`),
    /// or by a TPM2_GetCapability probe.
    pub fn open(path: &Path) -> Result<Self> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let n = name.trim_start_matches("tpmrm").trim_start_matches("tpm");
        let sys = format!("/sys/class/tpm/tpm{n}/tpm_version_major");
        let family = match std::fs::read_to_string(&sys).map(|s| s.trim().to_string()).as_deref() {
            Ok("2") => Some(Family::Tpm20),
            Ok("1") => Some(Family::Tpm12),
            _ => None,
        };
        let mut t = DevTpm { dev, family: family.unwrap_or(Family::Tpm20), label: path.display().to_string() };
        if family.is_none() {
            let rsp = t.transmit(0, &probe::tpm2_get_properties(probe::TPM2_PT_MAX_COMMAND_SIZE, 2))?;
            t.family = if probe::is_tpm2_response(&rsp) { Family::Tpm20 } else { Family::Tpm12 };
        }
        Ok(t)
    }
}

impl<F: Read + Write> DevTpm<F> {
    /// Wraps an open device of a known family; `label` names it in logs.
    pub fn new(dev: F, family: Family, label: impl Into<String>) -> Self {
        Self { dev, family, label: label.into() }
    }
}

impl<F: Read + Write> HwTpm for DevTpm<F> {
    fn transmit(&mut self, locality: u8, cmd: &[u8]) -> Result<Vec<u8>> {
        if locality != 0 {
            return Err(Error::Locality { locality, why: "the kernel's TPM device sends at locality 0 only" });
        }
        command::check_command(cmd, MAX_BUFFER)?;
        self.dev.write_all(cmd).map_err(|e| Error::io(format!("write to {}", self.label), e))?;
        // The kernel hands over the whole response in one read.
        let mut buf = vec![0u8; MAX_BUFFER];
        let n = self.dev.read(&mut buf).map_err(|e| Error::io(format!("read from {}", self.label), e))?;
        buf.truncate(n);
        if n < HEADER_SIZE {
            return Err(Error::ResponseShort { got: n, claimed: HEADER_SIZE });
        }
        let size = command::response_size(&buf, MAX_BUFFER)?;
        match size.cmp(&n) {
            std::cmp::Ordering::Greater => Err(Error::ResponseShort { got: n, claimed: size }),
            std::cmp::Ordering::Less => Err(Error::ResponseLong { claimed: size }),
            std::cmp::Ordering::Equal => Ok(buf),
        }
    }

    fn family(&self) -> Family {
        self.family
    }

    fn owns_tpm(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("TPM {} through {}", self.family, self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A device double: a thread that answers each command with `answer(command)`.
    fn device(answer: fn(&[u8]) -> Vec<u8>) -> UnixStream {
        let (a, mut b) = UnixStream::pair().expect("pair");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = b.read(&mut buf) {
                if n == 0 || b.write_all(&answer(&buf[..n])).is_err() {
                    break;
                }
            }
        });
        a
    }

    #[test]
    fn transmits_at_locality_zero_and_checks_lengths() {
        let mut t =
            DevTpm::new(device(|c| [&[0x80, 1, 0, 0, 0, 12, 0, 0, 0, 0], &c[10..12]].concat()), Family::Tpm20, "d");
        let rsp = t.transmit(0, &[0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8]).expect("ok");
        assert_eq!(rsp, [0x80, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0, 8]);
        assert!(matches!(t.transmit(2, &rsp), Err(Error::Locality { locality: 2, .. })));
        let mut short = DevTpm::new(device(|_| vec![0x80, 1, 0, 0, 0, 20, 0, 0, 0, 0]), Family::Tpm20, "d");
        assert!(matches!(short.transmit(0, &rsp), Err(Error::ResponseShort { got: 10, claimed: 20 })));
        let mut long = DevTpm::new(device(|_| vec![0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0, 9]), Family::Tpm20, "d");
        assert!(matches!(long.transmit(0, &rsp), Err(Error::ResponseLong { claimed: 10 })));
        let mut huge = DevTpm::new(device(|_| vec![0x80, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]), Family::Tpm20, "d");
        assert!(matches!(huge.transmit(0, &rsp), Err(Error::ResponseSize { .. })));
    }
}
