//! Sockets for the swtpm protocol: TCP or Unix stream sockets behind one type, listeners, and
//! reads bounded by a deadline.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Where a channel listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP port (port 0 picks a free one).
    Tcp(SocketAddr),
    /// A Unix socket file.
    Unix {
        /// The socket's path; a stale socket there is replaced.
        path: PathBuf,
        /// Permission bits for the socket file (swtpm's default is 0770).
        mode: Option<u32>,
        /// Owner to give the socket file.
        uid: Option<u32>,
        /// Group to give the socket file.
        gid: Option<u32>,
    },
}

impl Endpoint {
    /// A TCP endpoint.
    pub fn tcp(addr: SocketAddr) -> Self {
        Endpoint::Tcp(addr)
    }

    /// A Unix socket endpoint with default permissions.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Endpoint::Unix { path: path.into(), mode: None, uid: None, gid: None }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix { path, .. } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        // Fails only when the peer is already gone, which is what we want anyway.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }

    /// Polls for up to `budget` without sleeping; see [`crate::sys::nowait::poll_recv`].
    pub(crate) fn poll_read(&self, buf: &mut [u8], budget: Duration) -> Option<usize> {
        match self {
            Stream::Tcp(s) => crate::sys::nowait::poll_recv(s, buf, budget),
            Stream::Unix(s) => crate::sys::nowait::poll_recv(s, buf, budget),
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    pub(crate) fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) => None,
        }
    }

    /// Closes after a protocol error: stop sending, then read away what the client already
    /// sent (briefly) so the close does not turn into a reset that destroys our last answer.
    pub(crate) fn close_gracefully(mut self) {
        self.shutdown(Shutdown::Write);
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut buf = [0u8; 4096];
        let mut drained = 0usize;
        while drained < 1 << 20 {
            match read_until(&mut self, &mut buf, Some(deadline)) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// One read that gives up at `deadline` (`None`: waits forever) with `ErrorKind::TimedOut`.
pub(crate) fn read_until(s: &mut Stream, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout = match deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(left)
            }
        };
        s.set_read_timeout(timeout)?;
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(io::ErrorKind::TimedOut.into()),
            r => return r,
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

fn prepare_unix_path(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        // swtpm replaces whatever is there; we replace only a (stale) socket.
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| Error::io(format!("remove stale socket {}", path.display()), e))
        }
        Ok(_) => Err(Error::Config(format!("{} exists and is not a socket", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("inspect {}", path.display()), e)),
    }
}

impl Listener {
    pub(crate) fn bind(ep: &Endpoint) -> Result<Self> {
        match ep {
            Endpoint::Tcp(addr) => {
                // std sets SO_REUSEADDR, as swtpm does.
                let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("listen on tcp {addr}"), e))?;
                // The server accepts only after poll; a client gone by then must not block it.
                l.set_nonblocking(true).map_err(|e| Error::io(format!("listen on tcp {addr}"), e))?;
                Ok(Listener::Tcp(l))
            }
            Endpoint::Unix { path, mode, uid, gid } => {
                prepare_unix_path(path)?;
                let l = UnixListener::bind(path).map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
                l.set_nonblocking(true).map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
                if let Some(mode) = mode {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                        .map_err(|e| Error::io(format!("chmod {:o} {}", mode, path.display()), e))?;
                }
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::chown(path, *uid, *gid)
                        .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
                }
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }

    /// The endpoint as bound (with the port the kernel picked).
    pub(crate) fn endpoint(&self, configured: &Endpoint) -> Endpoint {
        match (self, configured) {
            (Listener::Tcp(l), _) => Endpoint::Tcp(l.local_addr().unwrap_or_else(|_| match configured {
                Endpoint::Tcp(a) => *a,
                Endpoint::Unix { .. } => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            })),
            (Listener::Unix(..), ep) => ep.clone(),
        }
    }

    /// Accepts a client without waiting (`WouldBlock` when none is there); the stream blocks.
    /// TCP clients get TCP_NODELAY (requests and answers are small and
    /// strictly alternate). Returns the stream and a name for the peer in logs.
    pub(crate) fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                if let Err(e) = s.set_nodelay(true) {
                    log::debug!("TCP_NODELAY on {peer}: {e}");
                }
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
        }
    }

    /// Removes the socket file of a Unix listener, as swtpm does on exit.
    pub(crate) fn remove_socket_file(&self) {
        if let Listener::Unix(_, path) = self {
            if let Err(e) = std::fs::remove_file(path) {
                log::debug!("remove {}: {e}", path.display());
            }
        }
    }
}
