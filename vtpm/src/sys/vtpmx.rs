//! Linux's vTPM proxy driver (`/dev/vtpmx`, module `tpm_vtpm_proxy`): one ioctl makes a TPM
//! device pair. The kernel's side is an ordinary `/dev/tpmN` and `/dev/tpmrmN`; the emulator's
//! side is a descriptor from which each `read` takes one whole command and to which each
//! `write` gives one whole response.
//!
//! Facts from the driver (`drivers/char/tpm/tpm_vtpm_proxy.c`, `uapi/linux/vtpm_proxy.h`):
//! the ioctl needs CAP_SYS_ADMIN; the kernel registers the chip asynchronously, sending its
//! own start-up commands through the new descriptor, so the emulator must serve it at once;
//! `read` fails with EPIPE once the device is gone (registration failed, or it is being
//! deleted) and with EIO when the buffer is shorter than the command; `write` fails with EIO
//! when no response is awaited (the kernel gave up on the command); closing the descriptor
//! deletes the device.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::path::Path;

use xvtpm_xen::wake::{poll_with, PollOutcome, WakeFd};

use crate::proxy::ProxyChannel;
use crate::{Error, Result, TpmVersion};

/// `struct vtpm_proxy_new_dev` of `linux/vtpm_proxy.h`.
#[repr(C)]
#[derive(Debug, Default)]
struct NewDev {
    flags: u32,
    tpm_num: u32,
    fd: u32,
    major: u32,
    minor: u32,
}

/// `VTPM_PROXY_FLAG_TPM2`.
const FLAG_TPM2: u32 = 1;
/// `_IOWR(0xa1, 0x00, struct vtpm_proxy_new_dev)`.
const IOC_NEW_DEV: libc::c_ulong = (3 << 30) | ((std::mem::size_of::<NewDev>() as libc::c_ulong) << 16) | (0xa1 << 8);

/// The emulator's side of a proxy TPM device the kernel made.
#[derive(Debug)]
pub struct ProxyDevice {
    /// The descriptor commands come from; closing it deletes the device.
    pub file: File,
    /// N of `/dev/tpmN` and `/dev/tpmrmN`.
    pub tpm_num: u32,
    /// Major number of `/dev/tpmN`.
    pub major: u32,
    /// Minor number of `/dev/tpmN`.
    pub minor: u32,
}

/// Asks the kernel behind `vtpmx` (normally `/dev/vtpmx`) for a new TPM device of `version`.
pub fn create(vtpmx: &Path, version: TpmVersion) -> Result<ProxyDevice> {
    let ctl = OpenOptions::new().read(true).write(true).open(vtpmx).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound => " (load the kernel module tpm_vtpm_proxy)",
            io::ErrorKind::PermissionDenied => " (needs root)",
            _ => "",
        };
        Error::io(format!("open {}{hint}", vtpmx.display()), e)
    })?;
    let mut dev = NewDev { flags: if version == TpmVersion::V2_0 { FLAG_TPM2 } else { 0 }, ..NewDev::default() };
    // SAFETY: the request's argument is a pointer to a `struct vtpm_proxy_new_dev`, which `dev`
    // is (repr(C), five u32), valid for reads and writes for the duration of the call.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), IOC_NEW_DEV, &mut dev as *mut NewDev) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) { " (needs CAP_SYS_ADMIN)" } else { "" };
        return Err(Error::io(format!("VTPM_PROXY_IOC_NEW_DEV on {}{hint}", vtpmx.display()), e));
    }
    // SAFETY: on success the kernel installed a new descriptor `dev.fd` in this process, which
    // nothing else owns; the File takes ownership and closes it.
    let file = unsafe { File::from_raw_fd(dev.fd as i32) };
    Ok(ProxyDevice { file, tpm_num: dev.tpm_num, major: dev.major, minor: dev.minor })
}

impl ProxyChannel for File {
    fn recv_command(&mut self, buf: &mut [u8], wake: &WakeFd) -> io::Result<Option<usize>> {
        if poll_with(self.as_fd(), wake, -1)? != PollOutcome::Ready {
            return Ok(None);
        }
        match self.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send_response(&mut self, rsp: &[u8]) -> io::Result<()> {
        let n = self.write(rsp)?;
        if n != rsp.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the kernel took {n} of {} bytes", rsp.len()),
            ));
        }
        Ok(())
    }
}

impl ProxyChannel for std::os::unix::net::UnixDatagram {
    fn recv_command(&mut self, buf: &mut [u8], wake: &WakeFd) -> io::Result<Option<usize>> {
        if poll_with(self.as_fd(), wake, -1)? != PollOutcome::Ready {
            return Ok(None);
        }
        match self.recv(buf) {
            // A datagram pair has no end of stream: the test double says "gone" with an
            // empty datagram, as the driver does with EPIPE.
            Ok(0) => Err(io::Error::from_raw_os_error(libc::EPIPE)),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send_response(&mut self, rsp: &[u8]) -> io::Result<()> {
        self.send(rsp).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_is_the_kernels() {
        // _IOWR(0xa1, 0x00, 20 bytes), as in linux/vtpm_proxy.h.
        assert_eq!(IOC_NEW_DEV, 0xc014_a100);
    }

    #[test]
    fn a_missing_control_device_names_the_module() {
        let e = create(Path::new("/nonexistent/vtpmx"), TpmVersion::V2_0).expect_err("no device");
        assert!(e.to_string().contains("tpm_vtpm_proxy"), "{e}");
    }
}
