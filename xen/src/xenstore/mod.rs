//! A xenstore client speaking the xenstored wire protocol over any byte stream:
//! `/run/xenstored/socket`, `/dev/xen/xenbus`, or the simulated xenstored's socket. One reader
//! thread demultiplexes replies (by request id) from watch events, so any number of threads
//! can share one connection while events keep flowing.

pub mod guard;
pub mod wire;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{DomId, Error, Result, XsErrno};
use wire::{Message, MsgType};

/// A transaction id; [`TxId::NONE`] outside a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TxId(pub u32);

impl TxId {
    /// No transaction.
    pub const NONE: TxId = TxId(0);
}

/// Access granted by one permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermAccess {
    /// `n`: none.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

/// One entry of a node's permission list. The first entry names the owner (who may do
/// anything) and the access of every domain not listed; the others grant to one domain each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Domain the entry is about.
    pub domid: DomId,
    /// What it grants.
    pub access: PermAccess,
}

impl Perm {
    /// The wire form: `r5`, `n0`, ...
    pub fn encode(&self) -> String {
        let c = match self.access {
            PermAccess::None => 'n',
            PermAccess::Read => 'r',
            PermAccess::Write => 'w',
            PermAccess::Both => 'b',
        };
        format!("{c}{}", self.domid)
    }

    /// Parses the wire form.
    pub fn parse(s: &[u8]) -> Result<Perm> {
        let bad = || Error::XsProtocol(format!("bad permission {:?}", String::from_utf8_lossy(s)));
        let (&c, rest) = s.split_first().ok_or_else(bad)?;
        let access = match c {
            b'n' => PermAccess::None,
            b'r' => PermAccess::Read,
            b'w' => PermAccess::Write,
            b'b' => PermAccess::Both,
            _ => return Err(bad()),
        };
        let domid = std::str::from_utf8(rest).ok().and_then(|d| d.parse().ok()).ok_or_else(bad)?;
        Ok(Perm { domid, access })
    }
}

/// A fired watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The node that changed (or the watched path, for the initial event).
    pub path: String,
    /// The token given to [`Xenstore::watch`].
    pub token: String,
}

type Reply = Result<Message>;

/// What the event queue carries: watch events, wake-ups from a [`Waker`], and the reader's
/// end (a waker's sender keeps the queue open, so its end is said, not inferred).
enum Queued {
    Watch(WatchEvent),
    Wake,
    Closed,
}

/// Makes a [`Xenstore::next_event`] in progress (or the next one) return `Ok(None)`, so a loop
/// can wait for events without a timeout and still be told to look at something else.
#[derive(Debug, Clone)]
pub struct Waker {
    tx: Sender<Queued>,
}

impl Waker {
    /// Wakes the event waiter.
    pub fn wake(&self) {
        let _ = self.tx.send(Queued::Wake);
    }
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Queued::Watch(e) => e.fmt(f),
            Queued::Wake => f.write_str("Wake"),
            Queued::Closed => f.write_str("Closed"),
        }
    }
}

struct Inner {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<HashMap<u32, SyncSender<Reply>>>,
    next_req: AtomicU32,
    closed: AtomicBool,
    events: Mutex<Receiver<Queued>>,
    /// For [`Xenstore::waker`].
    wake_tx: Mutex<Sender<Queued>>,
    shutdown: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(f) = self.shutdown.get_mut().ok().and_then(|s| s.take()) {
            f();
        }
    }
}

/// A connection to xenstored. Cheap to clone; clones share the connection and its watch
/// events.
#[derive(Clone)]
pub struct Xenstore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Xenstore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xenstore").field("closed", &self.inner.closed.load(Ordering::Relaxed)).finish()
    }
}

impl Xenstore {
    /// Speaks the protocol over `reader`/`writer` (two handles of one stream). `shutdown` is run
    /// when the last clone is dropped, to wake the reader thread (e.g. `UnixStream::shutdown`).
    pub fn new(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        shutdown: Option<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        let (ev_tx, ev_rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            writer: Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            events: Mutex::new(ev_rx),
            wake_tx: Mutex::new(ev_tx.clone()),
            shutdown: Mutex::new(shutdown),
        });
        let weak = Arc::downgrade(&inner);
        let spawned =
            std::thread::Builder::new().name("xenstore-reader".into()).spawn(move || reader_loop(reader, weak, ev_tx));
        if let Err(e) = spawned {
            // Without a reader no reply would ever arrive: fail every request instead.
            log::error!("cannot start the xenstore reader thread: {e}");
            inner.closed.store(true, Ordering::Release);
        }
        Xenstore { inner }
    }

    /// Connects to a unix socket speaking the protocol (`/run/xenstored/socket`, or the
    /// simulated xenstored after its hello).
    pub fn from_unix(stream: std::os::unix::net::UnixStream) -> Result<Self> {
        let reader = stream.try_clone().map_err(|e| Error::io("clone xenstore socket", e))?;
        let closer = stream.try_clone().map_err(|e| Error::io("clone xenstore socket", e))?;
        Ok(Xenstore::new(
            Box::new(reader),
            Box::new(stream),
            Some(Box::new(move || {
                let _ = closer.shutdown(std::net::Shutdown::Both);
            })),
        ))
    }

    fn request(&self, ty: MsgType, tx: TxId, payload: Vec<u8>, op: &'static str, path: &str) -> Result<Vec<u8>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::XsClosed);
        }
        let req_id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let msg = Message::new(ty, req_id, tx.0, payload)?;
        let (tx_reply, rx_reply) = mpsc::sync_channel(1);
        self.lock_pending()?.insert(req_id, tx_reply);
        // The reader may have ended (clearing `pending`) since the check above; the sender
        // would then never be dropped and the wait below would hang.
        if self.inner.closed.load(Ordering::Acquire) {
            self.lock_pending()?.remove(&req_id);
            return Err(Error::XsClosed);
        }
        let written = {
            let mut w = self.inner.writer.lock().map_err(|_| Error::XsClosed)?;
            msg.write_to(&mut *w)
        };
        if let Err(e) = written {
            self.lock_pending()?.remove(&req_id);
            return Err(e);
        }
        // The reader thread drops every pending sender when the connection ends.
        let reply = rx_reply.recv().map_err(|_| Error::XsClosed)??;
        match reply.msg_type() {
            Some(MsgType::Error) => {
                Err(Error::Xenstore { op, path: path.to_string(), errno: wire::parse_error(&reply.payload) })
            }
            Some(t) if t == ty => Ok(reply.payload),
            _ => Err(Error::XsProtocol(format!(
                "{op}: reply of type {} to a request of type {}",
                reply.header.ty, ty as u32
            ))),
        }
    }

    fn lock_pending(&self) -> Result<std::sync::MutexGuard<'_, HashMap<u32, SyncSender<Reply>>>> {
        self.inner.pending.lock().map_err(|_| Error::XsClosed)
    }

    /// Reads a node's value.
    pub fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>> {
        self.request(MsgType::Read, tx, wire::nul_terminated(&[path.as_bytes()]), "read", path)
    }

    /// Reads a node's value as (lossy) UTF-8.
    pub fn read_string(&self, tx: TxId, path: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.read(tx, path)?).into_owned())
    }

    /// Reads a node, `None` if it does not exist.
    pub fn try_read(&self, tx: TxId, path: &str) -> Result<Option<Vec<u8>>> {
        match self.read(tx, path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a node's value, creating it (and missing parents).
    pub fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<()> {
        let mut p = Vec::with_capacity(path.len() + 1 + value.len());
        p.extend_from_slice(path.as_bytes());
        p.push(0);
        p.extend_from_slice(value);
        self.request(MsgType::Write, tx, p, "write", path).map(drop)
    }

    /// Creates a node with an empty value (no error if it exists).
    pub fn mkdir(&self, tx: TxId, path: &str) -> Result<()> {
        self.request(MsgType::Mkdir, tx, wire::nul_terminated(&[path.as_bytes()]), "mkdir", path).map(drop)
    }

    /// Removes a node and everything below it.
    pub fn rm(&self, tx: TxId, path: &str) -> Result<()> {
        self.request(MsgType::Rm, tx, wire::nul_terminated(&[path.as_bytes()]), "rm", path).map(drop)
    }

    /// Removes a node and everything below it; no error if it does not exist.
    pub fn try_rm(&self, tx: TxId, path: &str) -> Result<()> {
        match self.rm(tx, path) {
            Err(e) if !e.is_enoent() => Err(e),
            _ => Ok(()),
        }
    }

    /// Lists a node's children.
    pub fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>> {
        let p = self.request(MsgType::Directory, tx, wire::nul_terminated(&[path.as_bytes()]), "directory", path)?;
        Ok(wire::split_nul(&p)
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }

    /// Reads a node's permissions.
    pub fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>> {
        let p = self.request(MsgType::GetPerms, tx, wire::nul_terminated(&[path.as_bytes()]), "get_perms", path)?;
        wire::split_nul(&p).into_iter().filter(|s| !s.is_empty()).map(Perm::parse).collect()
    }

    /// Sets a node's permissions (the first entry is the owner and the default).
    pub fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<()> {
        let enc: Vec<String> = perms.iter().map(Perm::encode).collect();
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend(enc.iter().map(|s| s.as_bytes()));
        self.request(MsgType::SetPerms, tx, wire::nul_terminated(&parts), "set_perms", path).map(drop)
    }

    /// Watches `path` and everything below it; events carry `token`. xenstored fires the watch
    /// once right away.
    pub fn watch(&self, path: &str, token: &str) -> Result<()> {
        self.request(
            MsgType::Watch,
            TxId::NONE,
            wire::nul_terminated(&[path.as_bytes(), token.as_bytes()]),
            "watch",
            path,
        )
        .map(drop)
    }

    /// Removes a watch.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        self.request(
            MsgType::Unwatch,
            TxId::NONE,
            wire::nul_terminated(&[path.as_bytes(), token.as_bytes()]),
            "unwatch",
            path,
        )
        .map(drop)
    }

    /// The next watch event, waiting up to `timeout` (forever if `None`); `Ok(None)` on timeout.
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>> {
        let rx = self.inner.events.lock().map_err(|_| Error::XsClosed)?;
        let queued = match rx.try_recv() {
            Ok(q) => q,
            Err(TryRecvError::Disconnected) => return Err(Error::XsClosed),
            // The reader said Closed to an earlier call.
            Err(TryRecvError::Empty) if self.inner.closed.load(Ordering::Acquire) => return Err(Error::XsClosed),
            Err(TryRecvError::Empty) => match timeout {
                None => rx.recv().map_err(|_| Error::XsClosed)?,
                Some(t) => match rx.recv_timeout(t) {
                    Ok(q) => q,
                    Err(RecvTimeoutError::Timeout) => return Ok(None),
                    Err(RecvTimeoutError::Disconnected) => return Err(Error::XsClosed),
                },
            },
        };
        match queued {
            Queued::Watch(ev) => Ok(Some(ev)),
            Queued::Wake => Ok(None),
            Queued::Closed => Err(Error::XsClosed),
        }
    }

    /// A handle that interrupts [`Xenstore::next_event`] from another thread.
    pub fn waker(&self) -> Waker {
        let tx = self.inner.wake_tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Waker { tx: tx.clone() }
    }

    /// Starts a transaction.
    pub fn transaction_start(&self) -> Result<TxId> {
        let p = self.request(MsgType::TransactionStart, TxId::NONE, b"\0".to_vec(), "transaction_start", "")?;
        let s = String::from_utf8_lossy(p.strip_suffix(&[0]).unwrap_or(&p)).into_owned();
        s.parse::<u32>().map(TxId).map_err(|_| Error::XsProtocol(format!("bad transaction id {s:?}")))
    }

    /// Ends a transaction, committing it if `commit`. A conflicting commit fails with
    /// `EAGAIN` (see [`Error::xs_errno`]); [`Xenstore::transaction`] retries those.
    pub fn transaction_end(&self, tx: TxId, commit: bool) -> Result<()> {
        let flag: &[u8] = if commit { b"T" } else { b"F" };
        self.request(MsgType::TransactionEnd, tx, wire::nul_terminated(&[flag]), "transaction_end", "").map(drop)
    }

    /// Runs `f` in a transaction and commits it, retrying the whole closure when the commit
    /// conflicts (`EAGAIN`), up to 100 times. An error from `f` aborts the transaction.
    pub fn transaction<T>(&self, mut f: impl FnMut(TxId) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let tx = self.transaction_start()?;
            let value = match f(tx) {
                Ok(v) => v,
                Err(e) => {
                    let _ = self.transaction_end(tx, false);
                    return Err(e);
                }
            };
            match self.transaction_end(tx, true) {
                Ok(()) => return Ok(value),
                Err(e) if e.xs_errno() == Some(XsErrno::EAGAIN) && attempt < 100 => {
                    attempt += 1;
                    log::debug!("xenstore transaction conflicted, retry {attempt}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Tells xenstored that domain `domid` is gone (`XS_RELEASE`, a toolstack's call; dom0
    /// only): it fires `@releaseDomain`.
    pub fn release_domain(&self, domid: DomId) -> Result<()> {
        let d = domid.to_string();
        self.request(MsgType::Release, TxId::NONE, wire::nul_terminated(&[d.as_bytes()]), "release", "")?;
        Ok(())
    }

    /// The home path of a domain, as xenstored reports it.
    pub fn get_domain_path(&self, domid: DomId) -> Result<String> {
        let d = domid.to_string();
        let p = self.request(
            MsgType::GetDomainPath,
            TxId::NONE,
            wire::nul_terminated(&[d.as_bytes()]),
            "get_domain_path",
            "",
        )?;
        Ok(String::from_utf8_lossy(p.strip_suffix(&[0]).unwrap_or(&p)).into_owned())
    }
}

fn reader_loop(mut reader: Box<dyn Read + Send>, inner: std::sync::Weak<Inner>, events: Sender<Queued>) {
    let end = |inner: &std::sync::Weak<Inner>, why: Option<Error>| {
        if let Some(i) = inner.upgrade() {
            i.closed.store(true, Ordering::Release);
            if let Ok(mut p) = i.pending.lock() {
                if let Some(e) = why {
                    log::warn!("xenstore connection failed: {e}");
                }
                // Dropping the senders wakes every waiting request with XsClosed.
                p.clear();
            }
        }
        // After `closed` is set: a waiter that finds the queue empty then sees it.
        let _ = events.send(Queued::Closed);
    };
    loop {
        let msg = match Message::read_from(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) => return end(&inner, None),
            Err(e) => return end(&inner, Some(e)),
        };
        if msg.msg_type() == Some(MsgType::WatchEvent) {
            let parts = wire::split_nul(&msg.payload);
            if parts.len() < 2 {
                log::warn!("xenstore: malformed watch event {:?}", String::from_utf8_lossy(&msg.payload));
                continue;
            }
            let ev = WatchEvent {
                path: String::from_utf8_lossy(parts[0]).into_owned(),
                token: String::from_utf8_lossy(parts[1]).into_owned(),
            };
            // No receiver left only means nobody listens for events any more.
            let _ = events.send(Queued::Watch(ev));
            continue;
        }
        let Some(inner) = inner.upgrade() else { return };
        let waiter = inner.pending.lock().ok().and_then(|mut p| p.remove(&msg.header.req_id));
        match waiter {
            Some(w) => {
                let _ = w.send(Ok(msg));
            }
            None => log::warn!("xenstore: reply to unknown request id {}", msg.header.req_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_wire_form() {
        for (s, p) in [
            ("n0", Perm { domid: 0, access: PermAccess::None }),
            ("r5", Perm { domid: 5, access: PermAccess::Read }),
            ("w12", Perm { domid: 12, access: PermAccess::Write }),
            ("b32752", Perm { domid: 32752, access: PermAccess::Both }),
        ] {
            assert_eq!(p.encode(), s);
            assert_eq!(Perm::parse(s.as_bytes()).expect("parse"), p);
        }
        for bad in ["", "x1", "r", "r-1", "r70000"] {
            assert!(Perm::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    /// The client's requests, byte for byte, against a scripted peer over a socket pair.
    #[test]
    fn requests_on_the_wire() {
        use std::os::unix::net::UnixStream;
        let (a, mut b) = UnixStream::pair().expect("pair");
        let xs = Xenstore::from_unix(a).expect("client");
        let peer = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in [&b"7"[..], b"OK\0", b"OK\0"] {
                let m = Message::read_from(&mut b).expect("read").expect("msg");
                seen.push(m.clone());
                let ty = MsgType::from_u32(m.header.ty).expect("type");
                Message::new(ty, m.header.req_id, m.header.tx_id, reply.to_vec())
                    .expect("m")
                    .write_to(&mut b)
                    .expect("w");
            }
            // An event between replies, then an error reply.
            Message::new(MsgType::WatchEvent, 0, 0, b"/x\0tok\0".to_vec()).expect("m").write_to(&mut b).expect("w");
            let m = Message::read_from(&mut b).expect("read").expect("msg");
            seen.push(m.clone());
            Message::new(MsgType::Error, m.header.req_id, 0, b"ENOENT\0".to_vec())
                .expect("m")
                .write_to(&mut b)
                .expect("w");
            seen
        });
        assert_eq!(xs.read(TxId::NONE, "/a").expect("read"), b"7");
        xs.write(TxId(9), "/a/b", b"v").expect("write");
        xs.watch("/x", "tok").expect("watch");
        let err = xs.read(TxId::NONE, "/missing").expect_err("enoent");
        assert!(err.is_enoent(), "{err}");
        let ev = xs.next_event(Some(Duration::from_secs(5))).expect("ev").expect("some");
        assert_eq!(ev, WatchEvent { path: "/x".into(), token: "tok".into() });
        let seen = peer.join().expect("peer");
        assert_eq!((seen[0].header.ty, seen[0].header.tx_id, &seen[0].payload[..]), (2, 0, &b"/a\0"[..]));
        assert_eq!((seen[1].header.ty, seen[1].header.tx_id, &seen[1].payload[..]), (11, 9, &b"/a/b\0v"[..]));
        assert_eq!((seen[2].header.ty, &seen[2].payload[..]), (4, &b"/x\0tok\0"[..]));
        assert_eq!(seen[3].payload, b"/missing\0");
        let ids: Vec<u32> = seen.iter().map(|m| m.header.req_id).collect();
        let mut uniq = ids.clone();
        uniq.dedup();
        assert_eq!(ids, uniq, "request ids are distinct");
    }

    #[test]
    fn closed_connection_fails_pending_and_later_requests() {
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().expect("pair");
        let xs = Xenstore::from_unix(a).expect("client");
        drop(b);
        let err = xs.read(TxId::NONE, "/a").expect_err("closed");
        assert!(matches!(err, Error::XsClosed | Error::Io { .. }), "{err}");
    }

    #[test]
    fn a_waker_interrupts_a_wait_without_timeout_and_the_end_is_still_seen() {
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().expect("pair");
        let xs = Xenstore::from_unix(a).expect("client");
        let waker = xs.waker();
        let xs2 = xs.clone();
        let waiting = std::thread::spawn(move || xs2.next_event(None));
        std::thread::sleep(Duration::from_millis(50));
        waker.wake();
        assert!(matches!(waiting.join().expect("thread"), Ok(None)), "a wake returns no event");
        // The peer goes away while a waker (a sender of the queue) is alive: still an error,
        // now and on every later call, not a wait forever.
        let xs2 = xs.clone();
        let waiting = std::thread::spawn(move || xs2.next_event(None));
        drop(b);
        assert!(matches!(waiting.join().expect("thread"), Err(Error::XsClosed)));
        assert!(matches!(xs.next_event(None), Err(Error::XsClosed)));
        drop(waker);
    }
}
