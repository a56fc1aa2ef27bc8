//! Waiting for descriptors to have something to read (`poll(2)`): the socket server's loop over
//! its listeners and control connection, the data channel's spin, the vTPM proxy's device.
//! A hang-up or an error counts as readable: the read that follows reports it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// `poll` over `p` for up to `timeout_ms` (-1: no limit); the number of ready entries, 0 also
/// when a signal interrupted the wait.
fn poll(p: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `p` is a valid, writable array of `p.len()` pollfd structures for the duration of
    // the call; the descriptors in it are borrowed from open files by the callers.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

fn pollfd(fd: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }
}

/// Whether `fd` has something to read within `timeout` (zero: look without waiting).
/// `Ok(false)` when nothing came in time or a signal interrupted the wait.
pub fn readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    Ok(poll(&mut [pollfd(fd)], ms)? > 0)
}

/// Waits without a time limit until at least one of `fds` is readable; one flag per
/// descriptor. After a signal, all flags may be false.
pub fn wait_any(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds.iter().map(pollfd).collect();
    poll(&mut p, -1)?;
    Ok(p.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_which_descriptors_are_readable() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let (c, d) = UnixStream::pair().expect("socketpair");
        assert!(!readable(&b, Duration::ZERO).expect("poll"));
        assert!(!readable(&b, Duration::from_millis(10)).expect("poll"));
        a.write_all(b"x").expect("write");
        assert!(readable(&b, Duration::ZERO).expect("poll"));
        assert_eq!(wait_any(&[b.as_fd(), d.as_fd()]).expect("poll"), [true, false]);
        drop(c);
        assert_eq!(wait_any(&[d.as_fd()]).expect("poll"), [true], "a hang-up counts as readable");
    }
}
