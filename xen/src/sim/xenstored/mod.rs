//! The simulated xenstored: an in-process server speaking the xenstored wire protocol over a
//! unix socket, with the semantics of C xenstored (Xen 4.17) for paths, permissions, watches
//! and transactions, so that the real [`Xenstore`] client is what tests exercise.
//!
//! A connection first sends a hello, [`HELLO_MAGIC`] and a domid (`u32`, native-endian), and
//! then acts as that domain (domid 0 is privileged, like dom0); everything after is plain
//! `xsd_sockmsg` traffic. [`connect`] does both.
//!
//! The pieces: the node tree and the requests on it (`tree`), the permission rules (`perms`),
//! watches (`watch`), transactions (`transaction`), path syntax (`paths`), request arguments
//! (`args`), and the socket server that ties them together (`server`).

mod args;
mod paths;
mod perms;
mod server;
#[cfg(test)]
mod test_support;
mod transaction;
mod tree;
mod watch;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::{DomId, Error, Result, Xenstore, XsErrno};

pub use server::SimXenstored;

/// Magic the client sends first: b"XSIM" followed by the domid as u32 native-endian (8 bytes total).
pub const HELLO_MAGIC: &[u8; 4] = b"XSIM";

/// Length of the hello: magic and domid.
const HELLO_LEN: usize = 8;

/// A request's result: its errors are the errno names xenstored replies with.
type XsResult<T> = std::result::Result<T, XsErrno>;

/// Connects to a simulated xenstored as domain `domid`: sends the hello, returns the real client.
pub fn connect(socket: &Path, domid: DomId) -> Result<Xenstore> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| Error::io(format!("connect to simulated xenstored {}", socket.display()), e))?;
    stream.write_all(&hello(domid)).map_err(|e| Error::io("send hello to simulated xenstored", e))?;
    Xenstore::from_unix(stream)
}

fn hello(domid: DomId) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(HELLO_MAGIC);
    h[4..].copy_from_slice(&u32::from(domid).to_ne_bytes());
    h
}
