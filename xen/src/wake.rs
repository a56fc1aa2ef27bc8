//! An eventfd that interrupts a blocking wait from another thread, so waiters can block
//! without a timeout (an idle daemon then never wakes).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{Error, Result};

/// A level-triggered wake-up: [`WakeFd::wake`] makes it poll readable until [`WakeFd::take`].
#[derive(Debug)]
pub struct WakeFd {
    fd: OwnedFd,
}

impl WakeFd {
    /// A new, unset wake-up.
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this descriptor; nothing else owns it.
        Ok(WakeFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sets it (idempotent until taken).
    pub fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 readable bytes to our own eventfd. A full counter (EAGAIN) means
        // it is set already, which is all a wake needs.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears it; whether it was set.
    pub fn take(&self) -> bool {
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into `v`; non-blocking, so an unset fd fails at once.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8
    }

    /// The descriptor (readable while set), borrowed.
    pub fn borrow(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }
}

/// Polls `fd` and `wake` for input up to `timeout_ms` (-1: forever): what it saw. A wake is
/// taken (cleared) here.
pub fn poll_with(fd: BorrowedFd<'_>, wake: &WakeFd, timeout_ms: i32) -> std::io::Result<PollOutcome> {
    let mut pfd = [
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: two valid pollfds for the duration of the call; both descriptors stay open:
    // `fd` is borrowed and `wake` owns the other.
    let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, timeout_ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(PollOutcome::Again) } else { Err(e) };
    }
    if pfd[1].revents != 0 && wake.take() {
        return Ok(PollOutcome::Woken);
    }
    Ok(match rc {
        0 => PollOutcome::TimedOut,
        _ if pfd[0].revents != 0 => PollOutcome::Ready,
        // Only the wake fired, and another waiter took it: look again.
        _ => PollOutcome::Again,
    })
}

/// What [`poll_with`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    /// The descriptor is readable.
    Ready,
    /// The timeout passed.
    TimedOut,
    /// The wake-up was set (and is now clear).
    Woken,
    /// Interrupted by a signal: look again.
    Again,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_interrupts_a_blocking_poll_once() {
        let w = std::sync::Arc::new(WakeFd::new().expect("eventfd"));
        let never = WakeFd::new().expect("eventfd");
        let w2 = w.clone();
        let t = std::thread::spawn(move || poll_with(never.borrow(), &w2, -1).expect("poll"));
        std::thread::sleep(std::time::Duration::from_millis(50));
        w.wake();
        assert_eq!(t.join().expect("thread"), PollOutcome::Woken);
        // Two wakes while nobody waits are taken at once: one Woken, then nothing.
        w.wake();
        w.wake();
        let never = WakeFd::new().expect("eventfd");
        assert_eq!(poll_with(never.borrow(), &w, 10).expect("poll"), PollOutcome::Woken);
        assert_eq!(poll_with(never.borrow(), &w, 10).expect("poll"), PollOutcome::TimedOut);
    }
}
