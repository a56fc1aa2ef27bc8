//! The domain helper: a small process forked from a vtpm before it enters its sandbox, holding
//! `/dev/xen/privcmd` so that the sandboxed vtpm never does (a privcmd handle in dom0 can make
//! any hypercall dom0 can, e.g. map any domain's memory). It answers one question, what the
//! hypervisor says of a domain, and only about the domains it was given; it runs as the
//! vtpm's uid under its own, narrower system-call filter.
//!
//! The exchange on their socket pair: a request is a domain id (2 bytes, little-endian); a
//! reply is 5 bytes, a tag (0: no such domain, 1: the domain's flags follow, 2: not a domain
//! this helper answers about, 3: the hypervisor refused) and `XEN_DOMINF_*` flags (LE).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::privcmd::Privcmd;
use crate::{DomId, DomainInfo, Error, Result};

const NONE: u8 = 0;
const FOUND: u8 = 1;
const NOT_ALLOWED: u8 = 2;
const FAILED: u8 = 3;

/// The vtpm's end of the helper.
#[derive(Debug)]
pub struct DomainHelper {
    sock: Mutex<UnixStream>,
    pid: i32,
}

impl DomainHelper {
    /// Forks the helper, which opens privcmd, runs `confine` (to drop its privileges; an error
    /// ends it) and answers about `allowed` domains only (`None`: any). Call it while the
    /// process has one thread: the child runs on after fork().
    pub fn spawn(allowed: Option<Vec<DomId>>, confine: &dyn Fn() -> io::Result<()>) -> Result<Self> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io("a socket pair for the domain helper", e))?;
        // SAFETY: fork() in a single-threaded process (the caller's promise): the child owns a
        // copy of everything and runs only this module's code until it exits.
        match unsafe { libc::fork() } {
            -1 => Err(Error::io("fork the domain helper", io::Error::last_os_error())),
            0 => {
                drop(ours);
                let code = match serve(theirs, allowed.as_deref(), confine) {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("domain helper: {e}");
                        1
                    }
                };
                // SAFETY: _exit ends the child without running the parent's atexit handlers or
                // flushing buffers it shares with the parent.
                unsafe { libc::_exit(code) }
            }
            pid => {
                drop(theirs);
                Ok(DomainHelper { sock: Mutex::new(ours), pid })
            }
        }
    }

    /// The helper's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// What the hypervisor says of domain `domid`, through the helper.
    pub fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>> {
        let mut sock = self.sock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut reply = [0u8; 5];
        sock.write_all(&domid.to_le_bytes())
            .and_then(|()| sock.read_exact(&mut reply))
            .map_err(|e| Error::io("ask the domain helper", e))?;
        let flags = u32::from_le_bytes([reply[1], reply[2], reply[3], reply[4]]);
        match reply[0] {
            NONE => Ok(None),
            FOUND => Ok(Some(DomainInfo::from_flags(flags))),
            NOT_ALLOWED => Err(Error::io(
                format!("domain {domid}"),
                io::Error::new(io::ErrorKind::PermissionDenied, "not a domain this vtpm may ask about"),
            )),
            _ => Err(Error::io(
                format!("XEN_DOMCTL_getdomaininfo of domain {domid}"),
                io::Error::other("the hypervisor refused (the domain helper logged why)"),
            )),
        }
    }
}

/// The child: answers until the vtpm closes its end.
fn serve(mut sock: UnixStream, allowed: Option<&[DomId]>, confine: &dyn Fn() -> io::Result<()>) -> io::Result<()> {
    let privcmd = Privcmd::open().map_err(io::Error::other)?;
    confine()?;
    let mut req = [0u8; 2];
    loop {
        match sock.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let domid = u16::from_le_bytes(req);
        let (tag, flags) = if allowed.is_some_and(|a| !a.contains(&domid)) {
            log::warn!("domain helper: asked about domain {domid}, which this vtpm does not serve; refused");
            (NOT_ALLOWED, 0)
        } else {
            match privcmd.domain_info(domid) {
                Ok(None) => (NONE, 0),
                Ok(Some(info)) => (FOUND, info.to_flags()),
                Err(e) => {
                    log::warn!("domain helper: {e}");
                    (FAILED, 0)
                }
            }
        };
        let mut reply = [tag, 0, 0, 0, 0];
        reply[1..].copy_from_slice(&flags.to_le_bytes());
        sock.write_all(&reply)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outside Xen the helper starts, finds no privcmd and ends; the vtpm's question then
    /// fails instead of hanging.
    #[test]
    fn without_xen_the_helper_ends_and_questions_fail() {
        if std::path::Path::new(super::super::privcmd::PRIVCMD).exists() {
            return; // a real Xen domain: covered by the Xen scenarios
        }
        // The test harness has threads, but the child only opens a device and exits.
        let h = DomainHelper::spawn(Some(vec![3]), &|| Ok(())).expect("spawn");
        assert!(h.pid() > 0);
        let err = h.domain_info(3).expect_err("no hypervisor");
        assert!(err.to_string().contains("domain helper"), "{err}");
    }
}
