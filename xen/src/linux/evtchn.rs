//! Event channels through `/dev/xen/evtchn`.
//!
//! The driver queues each port that fires in a per-handle ring and masks the port until its
//! number is written back to the device; `read()` hands out the queued port numbers.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::ioctl::{
    self, IoctlEvtchnBindInterdomain, IoctlEvtchnBindUnboundPort, IoctlEvtchnNotify, IoctlEvtchnUnbind,
    IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_BIND_UNBOUND_PORT, IOCTL_EVTCHN_NOTIFY, IOCTL_EVTCHN_RESET,
    IOCTL_EVTCHN_UNBIND,
};
use crate::wake::{poll_with, PollOutcome, WakeFd};
use crate::{DomId, Error, EventChannel, Port, Result};

/// The event channel device.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// Ports taken from the device per read; more stay in the driver's ring for the next one.
const READ_BATCH: usize = 64;

/// An open `/dev/xen/evtchn`: the ports bound through it fire on it, and are unbound when it is
/// dropped.
#[derive(Debug)]
pub struct LinuxEvtchn {
    file: File,
    /// Ports read from the device but not yet returned by [`EventChannel::wait`]. Reads happen
    /// with this held so that ports come out in the order they fired.
    pending: Mutex<VecDeque<Port>>,
    /// Set by [`EventChannel::interrupt`].
    wake: WakeFd,
}

impl LinuxEvtchn {
    /// Opens [`EVTCHN_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(EVTCHN_PATH))
    }

    /// Opens an event channel device at another path.
    pub fn open_path(path: &Path) -> Result<Self> {
        // Non-blocking reads: another thread waiting on this handle may drain the ring between
        // our poll() and read(), and a blocking read would then outlast our timeout.
        let fd = super::open_device(path, libc::O_NONBLOCK)?;
        Ok(LinuxEvtchn { file: File::from(fd), pending: Mutex::new(VecDeque::new()), wake: WakeFd::new()? })
    }

    fn err(op: &'static str, port: Port, source: io::Error) -> Error {
        Error::Evtchn { op, port, source }
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<Port>> {
        // The queue is consistent at every step, so a panic elsewhere leaves it usable.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next fired port: queued, or read from the device without blocking.
    fn take_fired(&self) -> Result<Option<Port>> {
        let mut pending = self.pending();
        if let Some(port) = pending.pop_front() {
            return Ok(Some(port));
        }
        let mut buf = [0u8; READ_BATCH * 4];
        let n = match (&self.file).read(&mut buf) {
            Ok(0) => {
                return Err(Self::err(
                    "read",
                    0,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "device returned no ports"),
                ))
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                // More ports fired than the ring holds: some events are lost, and every read fails
                // until the ring is reset.
                log::error!("event channel ring overflowed; events were lost, resetting it");
                // SAFETY: RESET takes no argument, so a null one is what it expects.
                let reset = unsafe { ioctl::ioctl::<u8>(self.file.as_fd(), IOCTL_EVTCHN_RESET, std::ptr::null_mut()) };
                if let Err(r) = reset {
                    log::error!("event channel ring reset failed: {r}");
                }
                return Err(Self::err("read", 0, e));
            }
            Err(e) => return Err(Self::err("read", 0, e)),
        };
        // The driver only returns whole ports.
        pending.extend(buf[..n].chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])));
        Ok(pending.pop_front())
    }

    /// Polls the device until readable (or in error), `deadline` or an interrupt.
    fn poll_until(&self, deadline: Option<Instant>) -> Result<PollOutcome> {
        let timeout_ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so a sub-millisecond remainder does not spin with zero timeouts.
                let ms = left.as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        };
        poll_with(self.file.as_fd(), &self.wake, timeout_ms).map_err(|e| Self::err("poll", 0, e))
    }
}

impl LinuxEvtchn {
    /// From now on this handle binds only to channels of domain `domid`: no other domain's,
    /// no VIRQs, no unbound ports. For good: a process handed the handle cannot undo it.
    pub fn restrict_to(&self, domid: DomId) -> Result<()> {
        let mut arg = ioctl::IoctlEvtchnRestrictDomid { domid };
        // SAFETY: `arg` is the struct RESTRICT_DOMID reads.
        unsafe { ioctl::ioctl(self.file.as_fd(), ioctl::IOCTL_EVTCHN_RESTRICT_DOMID, &mut arg) }
            .map(drop)
            .map_err(|e| Self::err("restrict_domid", 0, e))
    }
}

impl EventChannel for LinuxEvtchn {
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        let mut arg = IoctlEvtchnBindInterdomain { remote_domain: remote.into(), remote_port };
        // SAFETY: `arg` is the struct BIND_INTERDOMAIN reads.
        let port = unsafe { ioctl::ioctl(self.file.as_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) }
            .map_err(|e| Self::err("bind_interdomain", remote_port, e))?;
        log::debug!("evtchn: bound remote port {remote_port} of domain {remote} to local port {port}");
        Ok(port)
    }

    fn alloc_unbound(&self, remote: DomId) -> Result<Port> {
        let mut arg = IoctlEvtchnBindUnboundPort { remote_domain: remote.into() };
        // SAFETY: `arg` is the struct BIND_UNBOUND_PORT reads.
        let port = unsafe { ioctl::ioctl(self.file.as_fd(), IOCTL_EVTCHN_BIND_UNBOUND_PORT, &mut arg) }
            .map_err(|e| Self::err("alloc_unbound", 0, e))?;
        log::debug!("evtchn: allocated local port {port} for domain {remote}");
        Ok(port)
    }

    fn unbind(&self, port: Port) -> Result<()> {
        let mut arg = IoctlEvtchnUnbind { port };
        // SAFETY: `arg` is the struct UNBIND reads.
        unsafe { ioctl::ioctl(self.file.as_fd(), IOCTL_EVTCHN_UNBIND, &mut arg) }
            .map_err(|e| Self::err("unbind", port, e))?;
        // A queued firing of a closed port would be meaningless (and the number may be reused).
        self.pending().retain(|&p| p != port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<()> {
        let mut arg = IoctlEvtchnNotify { port };
        // SAFETY: `arg` is the struct NOTIFY reads.
        unsafe { ioctl::ioctl(self.file.as_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg) }
            .map_err(|e| Self::err("notify", port, e))?;
        Ok(())
    }

    fn unmask(&self, port: Port) -> Result<()> {
        // Writing a port number re-enables it; the driver ignores ports not bound here.
        match (&self.file).write(&port.to_ne_bytes()) {
            Ok(4) => Ok(()),
            Ok(n) => Err(Self::err(
                "unmask",
                port,
                io::Error::new(io::ErrorKind::WriteZero, format!("wrote {n} of 4 bytes")),
            )),
            Err(e) => Err(Self::err("unmask", port, e)),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>> {
        // A timeout too large to represent is as good as none.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut first = true;
        loop {
            if let Some(port) = self.take_fired()? {
                return Ok(Some(port));
            }
            // Always poll at least once, so a zero timeout still sees ports that just fired.
            if !first && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            first = false;
            match self.poll_until(deadline)? {
                PollOutcome::Ready | PollOutcome::Again => {}
                PollOutcome::TimedOut | PollOutcome::Woken => return Ok(None),
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn interrupt(&self) {
        self.wake.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// `/dev/null` accepts the open and rejects every ioctl: errors carry the operation and
    /// port.
    #[test]
    fn ioctl_errors_name_operation_and_port() {
        let ev = LinuxEvtchn::open_path(Path::new("/dev/null")).expect("open /dev/null");
        let check = |r: Result<()>, want_op: &str, want_port: u32| match r {
            Err(Error::Evtchn { op, port, source }) => {
                assert_eq!((op, port), (want_op, want_port));
                assert_eq!(source.raw_os_error(), Some(libc::ENOTTY), "{source}");
            }
            other => panic!("{want_op}: {other:?}"),
        };
        check(ev.bind_interdomain(3, 17).map(drop), "bind_interdomain", 17);
        check(ev.alloc_unbound(3).map(drop), "alloc_unbound", 0);
        check(ev.unbind(5), "unbind", 5);
        check(ev.notify(6), "notify", 6);
        // /dev/null swallows writes, as the driver does for ports it does not know.
        ev.unmask(8).expect("unmask");
        assert_eq!(ev.fd().as_raw_fd(), ev.file.as_raw_fd());
    }

    #[test]
    fn queued_ports_come_first_in_order() {
        let ev = LinuxEvtchn::open_path(Path::new("/dev/null")).expect("open /dev/null");
        ev.pending().extend([4, 9]);
        assert_eq!(ev.wait(Some(Duration::ZERO)).expect("wait"), Some(4));
        assert_eq!(ev.wait(None).expect("wait"), Some(9));
        // Then /dev/null's end of file, which the driver never returns, is an error.
        assert!(matches!(ev.wait(Some(Duration::ZERO)), Err(Error::Evtchn { op: "read", .. })));
    }

    #[test]
    fn missing_device_is_named() {
        let err = LinuxEvtchn::open_path(Path::new("/nonexistent/evtchn")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/evtchn"), "{err}");
    }
}
