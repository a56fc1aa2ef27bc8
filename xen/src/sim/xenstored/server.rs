//! The socket server: accepting connections, reading each one's hello and requests,
//! dispatching every request to the part of the store it concerns, and queueing replies and
//! watch events to a writer thread per connection, so that no client blocks another.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::args::onearg;
use super::paths::home;
use super::transaction::{OpenTransactions, StoreView};
use super::tree::{node_op, Tree};
use super::watch::{WatchList, WatchTrigger};
use super::{XsResult, HELLO_LEN, HELLO_MAGIC};
use crate::xenstore::wire::{self, Header, Message, MsgType, PAYLOAD_MAX};
use crate::{DomId, Error, Result, XsErrno};

type ConnId = u64;

/// A simulated xenstored serving a unix socket from background threads: one accepting
/// connections and, per connection, one reading requests and one writing replies and events.
/// Dropping it stops accepting, closes every connection and removes the socket file.
pub struct SimXenstored {
    path: PathBuf,
    shared: Arc<Server>,
}

impl std::fmt::Debug for SimXenstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimXenstored")
            .field("path", &self.path)
            .field("connections", &self.shared.lock().conns.len())
            .finish()
    }
}

impl SimXenstored {
    /// Binds a UnixListener at `socket` (removing a stale file first) and serves it from background threads.
    pub fn start(socket: &Path) -> Result<Self> {
        match std::fs::remove_file(socket) {
            Ok(()) => log::debug!("xenstored: removed stale {}", socket.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove stale socket {}", socket.display()), e)),
        }
        let listener = UnixListener::bind(socket).map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
        let shared = Arc::new(Server {
            state: Mutex::new(ServerState { tree: Tree::new(), conns: BTreeMap::new(), next_conn: 1 }),
            stop: AtomicBool::new(false),
        });
        let acceptor = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("xenstored-accept".into())
            .spawn(move || accept_loop(listener, acceptor))
            .map_err(|e| Error::io("spawn the xenstored accept thread", e))?;
        log::debug!("xenstored: serving {}", socket.display());
        Ok(SimXenstored { path: socket.to_path_buf(), shared })
    }

    /// The socket it serves.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SimXenstored {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The acceptor sits in accept(): a connection wakes it to see the stop flag. It is not
        // joined, so a socket file taken over by another server cannot make this hang.
        let _ = UnixStream::connect(&self.path);
        for conn in self.shared.lock().conns.values() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
        log::debug!("xenstored: stopped serving {}", self.path.display());
    }
}

/// What the server's threads share: the store and the connections behind one lock, and
/// the flag that stops it.
#[derive(Debug)]
struct Server {
    state: Mutex<ServerState>,
    stop: AtomicBool,
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        // Handlers never panic on client input; should one panic anyway, keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The committed store and the open connections.
#[derive(Debug)]
struct ServerState {
    tree: Tree,
    conns: BTreeMap<ConnId, Connection>,
    next_conn: ConnId,
}

/// One client connection, acting as domain `domid`.
#[derive(Debug)]
struct Connection {
    domid: DomId,
    watches: WatchList,
    txs: OpenTransactions,
    /// Encoded messages for the connection's writer thread.
    out: Sender<Vec<u8>>,
    /// To close the connection when the server stops.
    stream: UnixStream,
}

impl Connection {
    fn send(&self, ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) {
        let mut buf = Header { ty, req_id, tx_id, len: payload.len() as u32 }.encode().to_vec();
        buf.extend_from_slice(payload);
        // A closed channel means the writer is gone with the connection; nothing to tell.
        let _ = self.out.send(buf);
    }

    fn send_event(&self, path: &str, token: &[u8]) {
        let payload = wire::nul_terminated(&[path.as_bytes(), token]);
        // Like C xenstored, drop events that do not fit a message.
        if payload.len() <= PAYLOAD_MAX {
            self.send(MsgType::WatchEvent as u32, 0, 0, &payload);
        }
    }
}

/// What a successful request produces.
struct RequestOutcome {
    reply: Vec<u8>,
    /// Watch triggers to deliver after the reply.
    triggers: Vec<WatchTrigger>,
    /// The first event of a new watch, for the requesting connection: (path, token).
    initial: Option<(String, Vec<u8>)>,
}

impl RequestOutcome {
    fn reply(reply: Vec<u8>) -> Self {
        RequestOutcome { reply, triggers: Vec::new(), initial: None }
    }

    fn ok() -> Self {
        RequestOutcome::reply(wire::OK.to_vec())
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Server>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        match stream {
            Ok(stream) => {
                let conn_shared = Arc::clone(&shared);
                if let Err(e) =
                    std::thread::Builder::new().name("xenstored-conn".into()).spawn(move || serve(stream, conn_shared))
                {
                    log::warn!("xenstored: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                log::warn!("xenstored: accept failed: {e}");
                // Errors like EMFILE repeat at once; do not spin on them.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    log::debug!("xenstored: no longer accepting");
}

/// Reads one connection's hello and requests until it ends.
fn serve(mut stream: UnixStream, shared: Arc<Server>) {
    let close = |s: &UnixStream| {
        let _ = s.shutdown(std::net::Shutdown::Both);
    };
    let mut h = [0u8; HELLO_LEN];
    if let Err(e) = stream.read_exact(&mut h) {
        log::debug!("xenstored: connection ended before its hello: {e}");
        return;
    }
    if &h[..4] != HELLO_MAGIC {
        log::warn!("xenstored: bad hello {h:?}, closing the connection");
        return close(&stream);
    }
    let Ok(domid) = DomId::try_from(u32::from_ne_bytes([h[4], h[5], h[6], h[7]])) else {
        log::warn!("xenstored: hello with an impossible domid {h:?}, closing the connection");
        return close(&stream);
    };
    let (writer, closer) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(c)) => (w, c),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("xenstored: cannot clone a connection socket: {e}");
            return close(&stream);
        }
    };
    let (out, queue) = mpsc::channel();
    if let Err(e) = std::thread::Builder::new().name("xenstored-write".into()).spawn(move || write_loop(writer, queue))
    {
        log::warn!("xenstored: cannot start a writer thread: {e}");
        return close(&stream);
    }
    let id = {
        let mut st = shared.lock();
        // Checked under the lock that Drop takes after setting it, so no connection outlives it.
        if shared.stop.load(Ordering::SeqCst) {
            return close(&stream);
        }
        let id = st.next_conn;
        st.next_conn += 1;
        let conn =
            Connection { domid, watches: WatchList::default(), txs: OpenTransactions::new(), out, stream: closer };
        st.conns.insert(id, conn);
        id
    };
    log::debug!("xenstored: connection {id} is domain {domid}");
    loop {
        match Message::read_from(&mut stream) {
            Ok(Some(msg)) => process(&mut shared.lock(), id, &msg),
            Ok(None) => {
                log::debug!("xenstored: connection {id} (domain {domid}) closed");
                break;
            }
            // A peer that died (reset) is an ordinary end; anything else broke the protocol.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionReset => {
                log::debug!("xenstored: connection {id} (domain {domid}) reset");
                break;
            }
            Err(e) => {
                log::warn!("xenstored: closing connection {id} (domain {domid}): {e}");
                close(&stream);
                break;
            }
        }
    }
    // Drops its watches, transactions and queue; the writer ends once the queue is drained.
    shared.lock().conns.remove(&id);
}

fn write_loop(mut stream: UnixStream, queue: Receiver<Vec<u8>>) {
    for buf in queue {
        if let Err(e) = stream.write_all(&buf) {
            log::debug!("xenstored: write to a connection failed: {e}");
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Handles one request: queues its reply, then the events it caused (in that order, so a
/// connection sees the reply to a request before events of its own making).
fn process(st: &mut ServerState, id: ConnId, msg: &Message) {
    let h = msg.header;
    let result = dispatch(st, id, &h, &msg.payload);
    let Some(conn) = st.conns.get(&id) else { return };
    log::debug!(
        "xenstored: domain {} type {} tx {} {:?} -> {}",
        conn.domid,
        h.ty,
        h.tx_id,
        String::from_utf8_lossy(&msg.payload),
        match &result {
            Ok(o) => format!("{:?}", String::from_utf8_lossy(&o.reply)),
            Err(e) => e.to_string(),
        }
    );
    match result {
        Ok(outcome) if outcome.reply.len() > PAYLOAD_MAX => {
            conn.send(MsgType::Error as u32, h.req_id, h.tx_id, &wire::error_payload(XsErrno::E2BIG));
        }
        Ok(outcome) => {
            conn.send(h.ty, h.req_id, h.tx_id, &outcome.reply);
            if let Some((path, token)) = &outcome.initial {
                conn.send_event(path, token);
            }
            deliver(&st.conns, &outcome.triggers);
        }
        Err(errno) => conn.send(MsgType::Error as u32, h.req_id, h.tx_id, &wire::error_payload(errno)),
    }
}

/// Sends every event the triggers cause, to every connection with a matching watch.
fn deliver(conns: &BTreeMap<ConnId, Connection>, triggers: &[WatchTrigger]) {
    for trigger in triggers {
        for conn in conns.values() {
            for (path, token) in conn.watches.events(conn.domid, trigger) {
                conn.send_event(path, token);
            }
        }
    }
}

fn dispatch(st: &mut ServerState, id: ConnId, h: &Header, payload: &[u8]) -> XsResult<RequestOutcome> {
    use MsgType::*;
    let ty = MsgType::from_u32(h.ty).ok_or(XsErrno::ENOSYS)?;
    let ServerState { tree, conns, .. } = st;
    let conn = conns.get_mut(&id).ok_or(XsErrno::EIO)?;
    match ty {
        // These ignore the transaction id, as in C xenstored.
        Watch => {
            let initial = conn.watches.add(conn.domid, payload)?;
            return Ok(RequestOutcome { reply: wire::OK.to_vec(), triggers: Vec::new(), initial: Some(initial) });
        }
        Unwatch => {
            conn.watches.remove(conn.domid, payload)?;
            return Ok(RequestOutcome::ok());
        }
        // The toolstack says a domain is gone (the simulated hypervisor says it shut down).
        Release => {
            if conn.domid != 0 {
                return Err(XsErrno::EACCES);
            }
            std::str::from_utf8(onearg(payload)?).ok().and_then(|s| s.parse::<DomId>().ok()).ok_or(XsErrno::EINVAL)?;
            return Ok(RequestOutcome {
                reply: wire::OK.to_vec(),
                triggers: vec![WatchTrigger::special("@releaseDomain")],
                initial: None,
            });
        }
        Read | Write | Mkdir | Rm | Directory | GetPerms | SetPerms | TransactionStart | TransactionEnd
        | GetDomainPath | ResetWatches => {}
        _ => return Err(XsErrno::ENOSYS),
    }
    if h.tx_id != 0 && !conn.txs.contains(h.tx_id) {
        return Err(XsErrno::ENOENT);
    }
    match ty {
        TransactionStart => {
            let tx_id = conn.txs.start(h.tx_id)?;
            Ok(RequestOutcome::reply(wire::nul_terminated(&[tx_id.to_string().as_bytes()])))
        }
        TransactionEnd => {
            let commit = match onearg(payload)? {
                b"T" => true,
                b"F" => false,
                _ => return Err(XsErrno::EINVAL),
            };
            let tx = conn.txs.remove(h.tx_id).ok_or(XsErrno::ENOENT)?;
            if !commit {
                return Ok(RequestOutcome::ok());
            }
            let triggers = tx.commit(tree)?;
            Ok(RequestOutcome { reply: wire::OK.to_vec(), triggers, initial: None })
        }
        ResetWatches => {
            conn.watches.clear();
            conn.txs.clear();
            Ok(RequestOutcome::ok())
        }
        GetDomainPath => {
            let domid: DomId =
                std::str::from_utf8(onearg(payload)?).ok().and_then(|s| s.parse().ok()).ok_or(XsErrno::EINVAL)?;
            Ok(RequestOutcome::reply(wire::nul_terminated(&[home(domid).as_bytes()])))
        }
        _ => {
            let domid = conn.domid;
            let mut view = StoreView { tree, tx: conn.txs.get_mut(h.tx_id) };
            let (reply, triggers) = node_op(&mut view, domid, ty, payload)?;
            match view.tx {
                Some(tx) => {
                    tx.hold_back(triggers);
                    Ok(RequestOutcome::reply(reply))
                }
                None => Ok(RequestOutcome { reply, triggers, initial: None }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{client, errno, server, NONE, WAIT};
    use super::super::{connect, hello, HELLO_MAGIC};
    use super::SimXenstored;
    use crate::xenstore::wire::{self, Header, Message, MsgType, PAYLOAD_MAX};
    use crate::{DomId, Error, XsErrno};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn raw_conn(sim: &SimXenstored, domid: DomId) -> UnixStream {
        let mut s = UnixStream::connect(sim.socket_path()).expect("raw connect");
        s.write_all(&hello(domid)).expect("hello");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s
    }

    /// Sends one request and returns its reply, skipping watch events.
    fn raw_request(s: &mut UnixStream, ty: u32, tx_id: u32, payload: &[u8]) -> Message {
        let mut buf = Header { ty, req_id: 77, tx_id, len: payload.len() as u32 }.encode().to_vec();
        buf.extend_from_slice(payload);
        s.write_all(&buf).expect("send request");
        loop {
            let m = Message::read_from(s).expect("read reply").expect("a reply");
            if m.msg_type() != Some(MsgType::WatchEvent) {
                assert_eq!(m.header.req_id, 77);
                return m;
            }
        }
    }

    fn assert_closed(s: &mut UnixStream) {
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("connection not closed: {e}"),
            }
        }
    }

    #[test]
    fn two_clients_concurrently() {
        let sim = server("concurrent");
        let setup = client(&sim, 0);
        setup.write(NONE, "/counter", b"0").expect("write");
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let xs = client(&sim, 0);
                std::thread::spawn(move || {
                    for n in 0..50 {
                        xs.transaction(|tx| {
                            let v: u32 = xs.read_string(tx, "/counter")?.parse().expect("number");
                            xs.write(tx, "/counter", (v + 1).to_string().as_bytes())
                        })
                        .expect("increment");
                        xs.write(NONE, &format!("/w{i}/{n}"), b"x").expect("write");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        assert_eq!(setup.read(NONE, "/counter").expect("read"), b"100");
        assert_eq!(setup.directory(NONE, "/w0").expect("dir").len(), 50);
        assert_eq!(setup.directory(NONE, "/w1").expect("dir").len(), 50);
    }

    #[test]
    fn a_client_not_reading_events_blocks_nobody() {
        let sim = server("slow");
        let mut lazy = raw_conn(&sim, 0);
        let token = "t".repeat(1000);
        let reply = raw_request(&mut lazy, MsgType::Watch as u32, 0, &wire::nul_terminated(&[b"/", token.as_bytes()]));
        assert_eq!(reply.payload, wire::OK);
        let xs = client(&sim, 0);
        // About 2 MB of events for `lazy`, far more than a socket buffer holds.
        for i in 0..2000 {
            xs.write(NONE, &format!("/flood/{i}"), b"v").expect("write");
        }
        assert_eq!(xs.read(NONE, "/flood/1999").expect("read"), b"v");
        // As C xenstored, a reply that does not fit a message is E2BIG.
        assert_eq!(errno(xs.directory(NONE, "/flood")), XsErrno::E2BIG);
        // The lazy client gets all its events, then its reply.
        let reply = raw_request(&mut lazy, MsgType::Read as u32, 0, b"/flood/0\0");
        assert_eq!(reply.payload, b"v");
    }

    #[test]
    fn bad_input_closes_only_that_connection() {
        let sim = server("garbage");
        let good = client(&sim, 0);
        good.write(NONE, "/g", b"1").expect("write");

        let mut raw = raw_conn(&sim, 0);
        let m = raw_request(&mut raw, MsgType::Read as u32, 0, b"/g");
        assert_eq!((m.msg_type(), &m.payload[..]), (Some(MsgType::Error), &b"EINVAL\0"[..]), "no NUL");
        let m = raw_request(&mut raw, MsgType::Read as u32, 0, b"/g\0/h\0");
        assert_eq!(m.payload, b"EINVAL\0", "two arguments");
        let m = raw_request(&mut raw, 99, 0, b"");
        assert_eq!(m.payload, b"ENOSYS\0");
        let m = raw_request(&mut raw, MsgType::Introduce as u32, 0, b"1\0");
        assert_eq!(m.payload, b"ENOSYS\0");
        let m = raw_request(&mut raw, MsgType::Read as u32, 0, b"/g\0");
        assert_eq!((m.msg_type(), m.header.ty, &m.payload[..]), (Some(MsgType::Read), 2, &b"1"[..]));
        let oversized = Header { ty: 2, req_id: 1, tx_id: 0, len: PAYLOAD_MAX as u32 + 1 };
        raw.write_all(&oversized.encode()).expect("send");
        assert_closed(&mut raw);

        let mut bad_hello = UnixStream::connect(sim.socket_path()).expect("connect");
        bad_hello.set_read_timeout(Some(WAIT)).expect("timeout");
        bad_hello.write_all(b"NOPE\0\0\0\0").expect("send");
        let _ = bad_hello.write_all(&Header { ty: 2, req_id: 1, tx_id: 0, len: 3 }.encode());
        let _ = bad_hello.write_all(b"/g\0");
        assert_closed(&mut bad_hello);

        let mut big_domid = UnixStream::connect(sim.socket_path()).expect("connect");
        big_domid.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut hello = HELLO_MAGIC.to_vec();
        hello.extend_from_slice(&70000u32.to_ne_bytes());
        big_domid.write_all(&hello).expect("send");
        assert_closed(&mut big_domid);

        assert_eq!(good.read(NONE, "/g").expect("still served"), b"1");
        good.write(NONE, "/g", b"2").expect("still served");
    }

    #[test]
    fn drop_stops_the_server() {
        let sim = server("drop");
        let path = sim.socket_path().to_path_buf();
        let xs = client(&sim, 0);
        xs.write(NONE, "/a", b"1").expect("write");
        assert!(format!("{sim:?}").contains("connections: 1"));
        drop(sim);
        assert!(!path.exists(), "socket removed");
        let err = xs.read(NONE, "/a").expect_err("server gone");
        assert!(matches!(err, Error::XsClosed | Error::Io { .. }), "{err}");
        assert!(connect(&path, 0).is_err());
        // A new server may take the same path.
        let again = SimXenstored::start(&path).expect("restart");
        let xs = connect(again.socket_path(), 0).expect("connect");
        assert_eq!(xs.try_read(NONE, "/a").expect("read"), None, "a fresh store");
    }
}
