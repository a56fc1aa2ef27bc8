//! A socket read that never sleeps, whatever the socket's blocking mode: the data channel polls
//! with it for a client's next command so that a client sending back to back does not wait for
//! our thread to be woken.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// One `recv(MSG_DONTWAIT)`: `Ok(None)` when nothing is there yet, `Ok(Some(0))` at end of
/// stream.
pub fn recv_nowait(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call, and
    // the descriptor is borrowed from a live socket.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(e),
    }
}

/// Whether `sock` has something to read (data, end of stream or an error), without waiting.
/// `poll` checks readiness without taking the socket's lock, which a spinning `recv` would hold
/// against the sender's delivery of the very bytes it waits for.
fn readable_now(sock: &impl AsRawFd) -> bool {
    matches!(crate::sys::poll::readable(sock, Duration::ZERO), Ok(true))
}

/// Spins for up to `budget` until `sock` is readable; `false` when nothing came in time.
pub fn spin_until_readable(sock: &impl AsRawFd, budget: Duration) -> bool {
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        // Reading the clock costs about as much as the readiness check: look at it every 16th.
        for _ in 0..16 {
            if readable_now(sock) {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= budget {
            return false;
        }
    }
}

/// Polls `sock` for up to `budget`: the bytes read, or `None` when nothing arrived in time (or
/// the socket failed: the caller's blocking read will report it).
pub fn poll_recv(sock: &impl AsRawFd, buf: &mut [u8], budget: Duration) -> Option<usize> {
    match spin_until_readable(sock, budget) {
        true => recv_nowait(sock, buf).ok().flatten(),
        false => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn returns_at_once_when_data_waits_and_gives_up_when_none_comes() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut buf = [0u8; 8];
        let t = Instant::now();
        assert_eq!(poll_recv(&b, &mut buf, Duration::from_millis(5)), None);
        assert!(t.elapsed() >= Duration::from_millis(5));
        a.write_all(b"abc").expect("write");
        assert_eq!(poll_recv(&b, &mut buf, Duration::from_secs(10)), Some(3));
        assert_eq!(&buf[..3], b"abc");
        // The socket stays blocking for everyone else: a plain read still waits.
        b.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        let t = Instant::now();
        assert!((&b).read(&mut buf).is_err());
        assert!(t.elapsed() >= Duration::from_millis(15));
        drop(a);
        assert_eq!(recv_nowait(&b, &mut buf).expect("recv"), Some(0));
        assert_eq!(poll_recv(&b, &mut buf, Duration::ZERO), None);
    }
}
