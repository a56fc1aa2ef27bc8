//! The simulated xenstored: an in-process server speaking the xenstored wire protocol over a
//! unix socket, with the semantics of C xenstored (Xen 4.17) for paths, permissions, watches
//! and transactions, so that the real [`Xenstore`] client is what tests exercise.
//!
//! A connection first sends a hello, [`HELLO_MAGIC`] and a domid (`u32`, native-endian), and
//! then acts as that domain (domid 0 is privileged, like dom0); everything after is plain
//! `xsd_sockmsg` traffic. [`connect`] does both.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::xenstore::wire::{self, Header, Message, MsgType, ABS_PATH_MAX, PAYLOAD_MAX};
use crate::{DomId, Error, Perm, PermAccess, Result, Xenstore, XsErrno};

/// Magic the client sends first: b"XSIM" followed by the domid as u32 native-endian (8 bytes total).
pub const HELLO_MAGIC: &[u8; 4] = b"XSIM";

/// Length of the hello: magic and domid.
const HELLO_LEN: usize = 8;
/// Watches one connection may hold (C xenstored's default watch quota).
const MAX_WATCHES: usize = 128;
/// Transactions one connection may have open.
const MAX_TRANSACTIONS: usize = 16;
/// `XENSTORE_REL_PATH_MAX`, the length limit of special ("@...") watch paths.
const REL_PATH_MAX: usize = 2048;

/// Access bits, as C xenstored's `XS_PERM_*`.
const PERM_READ: u8 = 1;
const PERM_WRITE: u8 = 2;
const PERM_OWNER: u8 = 4;

/// The special watch paths C xenstored knows.
const SPECIAL_PATHS: [&str; 2] = ["@introduceDomain", "@releaseDomain"];

type ConnId = u64;
type XsResult<T> = std::result::Result<T, XsErrno>;

/// A simulated xenstored serving a unix socket from background threads: one accepting
/// connections and, per connection, one reading requests and one writing replies and events.
/// Dropping it stops accepting, closes every connection and removes the socket file.
pub struct SimXenstored {
    path: PathBuf,
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State { tree: Tree::new(), conns: BTreeMap::new(), next_conn: 1 }),
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

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Handlers never panic on client input; should one panic anyway, keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct State {
    tree: Tree,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
}

/// One node of the store.
#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    /// Never empty: the first entry is the owner and the access of unlisted domains.
    perms: Vec<Perm>,
    /// Child names in creation order, as C xenstored lists them.
    children: Vec<String>,
    /// Bumped on every committed change of the node (value, perms or children).
    gen: u64,
}

/// The committed store, keyed by absolute path.
#[derive(Debug)]
struct Tree {
    nodes: HashMap<String, Node>,
    next_gen: u64,
}

impl Tree {
    fn new() -> Self {
        let mut tree = Tree { nodes: HashMap::new(), next_gen: 1 };
        let perms = vec![Perm { domid: 0, access: PermAccess::None }];
        for (path, child) in [("/", Some("local")), ("/local", Some("domain")), ("/local/domain", None)] {
            let children = child.map(str::to_owned).into_iter().collect();
            tree.store(path, Node { value: Vec::new(), perms: perms.clone(), children, gen: 0 });
        }
        tree
    }

    fn store(&mut self, path: &str, mut node: Node) {
        node.gen = self.next_gen;
        self.next_gen += 1;
        self.nodes.insert(path.to_owned(), node);
    }

    fn gen(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).map(|n| n.gen)
    }
}

/// An open transaction: its own changes over the committed tree, plus what it has seen.
#[derive(Debug, Default)]
struct Tx {
    /// Nodes it wrote (`None`: removed), applied to the tree on commit.
    overlay: HashMap<String, Option<Node>>,
    /// Generation of every node it touched when it first did (`None`: missing); any
    /// difference at commit time is a conflict.
    accessed: HashMap<String, Option<u64>>,
    /// Watch firings held back until commit.
    fires: Vec<Fire>,
}

/// The store as one request sees it: the committed tree, or a transaction's view of it.
struct View<'a> {
    tree: &'a mut Tree,
    tx: Option<&'a mut Tx>,
}

impl View<'_> {
    fn get(&mut self, path: &str) -> Option<&Node> {
        match self.tx.as_deref_mut() {
            None => self.tree.nodes.get(path),
            Some(tx) => {
                let tree = &*self.tree;
                tx.accessed.entry(path.to_owned()).or_insert_with(|| tree.gen(path));
                match tx.overlay.get(path) {
                    Some(node) => node.as_ref(),
                    None => tree.nodes.get(path),
                }
            }
        }
    }

    fn put(&mut self, path: &str, node: Option<Node>) {
        match self.tx.as_deref_mut() {
            None => match node {
                Some(n) => self.tree.store(path, n),
                None => {
                    self.tree.nodes.remove(path);
                }
            },
            Some(tx) => {
                let tree = &*self.tree;
                tx.accessed.entry(path.to_owned()).or_insert_with(|| tree.gen(path));
                tx.overlay.insert(path.to_owned(), node);
            }
        }
    }
}

/// A change that fires watches: on `path` and its ancestors, or (`exact`) on `path` only.
/// The permissions are taken when the change happens so that a removed node, or one changed
/// inside a transaction, is judged as it was.
#[derive(Debug, Clone)]
struct Fire {
    path: String,
    exact: bool,
    perms: Vec<Perm>,
    parent_perms: Option<Vec<Perm>>,
    old_perms: Option<Vec<Perm>>,
}

impl Fire {
    /// C xenstored's `watch_permitted`: the watcher may read the node (before or after a
    /// permission change) or its parent.
    fn permitted(&self, domid: DomId) -> bool {
        let readable = |p: &[Perm]| perm_for(domid, p) & PERM_READ != 0;
        self.old_perms.as_deref().is_some_and(readable)
            || readable(&self.perms)
            || self.parent_perms.as_deref().is_some_and(readable)
    }

    fn matches(&self, watch: &str) -> bool {
        if self.exact {
            self.path == watch
        } else {
            is_child(&self.path, watch)
        }
    }
}

#[derive(Debug)]
struct Watch {
    /// Absolute path, or a special "@..." name.
    node: String,
    token: Vec<u8>,
    /// Registered with a relative path: events name paths relative to the domain's home.
    relative: bool,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    watches: Vec<Watch>,
    txs: BTreeMap<u32, Tx>,
    next_tx: u32,
    /// Encoded messages for the connection's writer thread.
    out: Sender<Vec<u8>>,
    /// To close the connection when the server stops.
    stream: UnixStream,
}

impl Conn {
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

    fn watch(&mut self, payload: &[u8]) -> XsResult<Outcome> {
        let args = strings(payload);
        let [path, token] = args[..] else { return Err(XsErrno::EINVAL) };
        let path = std::str::from_utf8(path).map_err(|_| XsErrno::EINVAL)?;
        let (node, relative) = if path.starts_with('@') {
            if path.len() > REL_PATH_MAX {
                return Err(XsErrno::EINVAL);
            }
            (path.to_owned(), false)
        } else {
            (node_path(self.domid, path.as_bytes())?, !path.starts_with('/'))
        };
        if self.watches.iter().any(|w| w.node == node && w.token == token) {
            return Err(XsErrno::EEXIST);
        }
        if self.watches.len() >= MAX_WATCHES {
            return Err(XsErrno::E2BIG);
        }
        // The first event names the path as the client gave it.
        let initial = (path.to_owned(), token.to_vec());
        self.watches.push(Watch { node, token: token.to_vec(), relative });
        Ok(Outcome { reply: wire::OK.to_vec(), fires: Vec::new(), initial: Some(initial) })
    }

    fn unwatch(&mut self, payload: &[u8]) -> XsResult<Outcome> {
        let args = strings(payload);
        let [path, token] = args[..] else { return Err(XsErrno::EINVAL) };
        let path = std::str::from_utf8(path).map_err(|_| XsErrno::ENOENT)?;
        let node = canonical(self.domid, path);
        let i = self.watches.iter().position(|w| w.node == node && w.token == token).ok_or(XsErrno::ENOENT)?;
        self.watches.remove(i);
        Ok(Outcome::ok())
    }

    fn transaction_start(&mut self, tx_id: u32) -> XsResult<Outcome> {
        if tx_id != 0 || self.txs.len() >= MAX_TRANSACTIONS {
            return Err(XsErrno::EBUSY);
        }
        let mut id = self.next_tx;
        while id == 0 || self.txs.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_tx = id.wrapping_add(1);
        self.txs.insert(id, Tx::default());
        Ok(Outcome::reply(wire::nul_terminated(&[id.to_string().as_bytes()])))
    }
}

/// What a successful request produces.
struct Outcome {
    reply: Vec<u8>,
    /// Watch firings to deliver after the reply.
    fires: Vec<Fire>,
    /// The first event of a new watch, for the requesting connection: (path, token).
    initial: Option<(String, Vec<u8>)>,
}

impl Outcome {
    fn reply(reply: Vec<u8>) -> Self {
        Outcome { reply, fires: Vec::new(), initial: None }
    }

    fn ok() -> Self {
        Outcome::reply(wire::OK.to_vec())
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
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
fn serve(mut stream: UnixStream, shared: Arc<Shared>) {
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
        let conn = Conn { domid, watches: Vec::new(), txs: BTreeMap::new(), next_tx: 1, out, stream: closer };
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
fn process(st: &mut State, id: ConnId, msg: &Message) {
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
            deliver(&st.conns, &outcome.fires);
        }
        Err(errno) => conn.send(MsgType::Error as u32, h.req_id, h.tx_id, &wire::error_payload(errno)),
    }
}

/// Sends every event the firings cause, to every connection with a matching watch.
fn deliver(conns: &BTreeMap<ConnId, Conn>, fires: &[Fire]) {
    for fire in fires {
        for conn in conns.values().filter(|c| fire.permitted(c.domid)) {
            for w in conn.watches.iter().filter(|w| fire.matches(&w.node)) {
                let home = home(conn.domid);
                let path = match fire.path.strip_prefix(home.as_str()) {
                    Some(rest) if w.relative => rest.strip_prefix('/').unwrap_or(rest),
                    _ => fire.path.as_str(),
                };
                conn.send_event(path, &w.token);
            }
        }
    }
}

fn dispatch(st: &mut State, id: ConnId, h: &Header, payload: &[u8]) -> XsResult<Outcome> {
    use MsgType::*;
    let ty = MsgType::from_u32(h.ty).ok_or(XsErrno::ENOSYS)?;
    let State { tree, conns, .. } = st;
    let conn = conns.get_mut(&id).ok_or(XsErrno::EIO)?;
    match ty {
        // These ignore the transaction id, as in C xenstored.
        Watch => return conn.watch(payload),
        Unwatch => return conn.unwatch(payload),
        Read | Write | Mkdir | Rm | Directory | GetPerms | SetPerms | TransactionStart | TransactionEnd
        | GetDomainPath | ResetWatches => {}
        _ => return Err(XsErrno::ENOSYS),
    }
    if h.tx_id != 0 && !conn.txs.contains_key(&h.tx_id) {
        return Err(XsErrno::ENOENT);
    }
    match ty {
        TransactionStart => conn.transaction_start(h.tx_id),
        TransactionEnd => {
            let commit = match onearg(payload)? {
                b"T" => true,
                b"F" => false,
                _ => return Err(XsErrno::EINVAL),
            };
            let tx = conn.txs.remove(&h.tx_id).ok_or(XsErrno::ENOENT)?;
            if !commit {
                return Ok(Outcome::ok());
            }
            let fires = commit_tx(tree, tx)?;
            Ok(Outcome { reply: wire::OK.to_vec(), fires, initial: None })
        }
        ResetWatches => {
            conn.watches.clear();
            conn.txs.clear();
            Ok(Outcome::ok())
        }
        GetDomainPath => {
            let domid: DomId =
                std::str::from_utf8(onearg(payload)?).ok().and_then(|s| s.parse().ok()).ok_or(XsErrno::EINVAL)?;
            Ok(Outcome::reply(wire::nul_terminated(&[home(domid).as_bytes()])))
        }
        _ => {
            let domid = conn.domid;
            let mut view = View { tree, tx: conn.txs.get_mut(&h.tx_id) };
            let (reply, fires) = node_op(&mut view, domid, ty, payload)?;
            match view.tx {
                Some(tx) => {
                    tx.fires.extend(fires);
                    Ok(Outcome::reply(reply))
                }
                None => Ok(Outcome { reply, fires, initial: None }),
            }
        }
    }
}

/// Applies a transaction if nothing it touched changed since it first did.
fn commit_tx(tree: &mut Tree, tx: Tx) -> XsResult<Vec<Fire>> {
    if tx.accessed.iter().any(|(path, gen)| tree.gen(path) != *gen) {
        return Err(XsErrno::EAGAIN);
    }
    for (path, node) in tx.overlay {
        match node {
            Some(n) => tree.store(&path, n),
            None => {
                tree.nodes.remove(&path);
            }
        }
    }
    Ok(tx.fires)
}

/// The requests on nodes: read, write, mkdir, rm, directory, get_perms, set_perms.
fn node_op(view: &mut View<'_>, domid: DomId, ty: MsgType, payload: &[u8]) -> XsResult<(Vec<u8>, Vec<Fire>)> {
    let ok = || wire::OK.to_vec();
    match ty {
        MsgType::Read => {
            let path = node_path(domid, onearg(payload)?)?;
            Ok((get_node(view, domid, &path, PERM_READ)?.value, Vec::new()))
        }
        MsgType::Directory => {
            let path = node_path(domid, onearg(payload)?)?;
            let node = get_node(view, domid, &path, PERM_READ)?;
            let names: Vec<&[u8]> = node.children.iter().map(|c| c.as_bytes()).collect();
            Ok((wire::nul_terminated(&names), Vec::new()))
        }
        MsgType::GetPerms => {
            let path = node_path(domid, onearg(payload)?)?;
            let node = get_node(view, domid, &path, PERM_READ)?;
            let perms: Vec<String> = node.perms.iter().map(Perm::encode).collect();
            let parts: Vec<&[u8]> = perms.iter().map(|p| p.as_bytes()).collect();
            Ok((wire::nul_terminated(&parts), Vec::new()))
        }
        MsgType::Write => {
            let nul = payload.iter().position(|b| *b == 0).ok_or(XsErrno::EINVAL)?;
            let path = node_path(domid, &payload[..nul])?;
            let value = payload[nul + 1..].to_vec();
            let node = match get_node(view, domid, &path, PERM_WRITE) {
                Ok(mut node) => {
                    node.value = value;
                    view.put(&path, Some(node.clone()));
                    node
                }
                Err(XsErrno::ENOENT) => create(view, domid, &path, value)?,
                Err(e) => return Err(e),
            };
            let fire = fire(view, &path, false, node.perms, None);
            Ok((ok(), vec![fire]))
        }
        MsgType::Mkdir => {
            let path = node_path(domid, onearg(payload)?)?;
            match get_node(view, domid, &path, PERM_WRITE) {
                // C xenstored neither changes nor fires anything for an existing node.
                Ok(_) => Ok((ok(), Vec::new())),
                Err(XsErrno::ENOENT) => {
                    let node = create(view, domid, &path, Vec::new())?;
                    let fire = fire(view, &path, false, node.perms, None);
                    Ok((ok(), vec![fire]))
                }
                Err(e) => Err(e),
            }
        }
        MsgType::Rm => {
            let path = node_path(domid, onearg(payload)?)?;
            match get_node(view, domid, &path, PERM_WRITE) {
                Ok(_) if path == "/" => Err(XsErrno::EINVAL),
                Ok(_) => {
                    let mut fires = Vec::new();
                    remove_subtree(view, &path, true, &mut fires);
                    let parent_path = parent_of(&path);
                    if let Some(mut parent) = view.get(parent_path).cloned() {
                        parent.children.retain(|c| c != basename(&path));
                        view.put(parent_path, Some(parent));
                    }
                    Ok((ok(), fires))
                }
                // As C xenstored: removing a missing node is fine if its parent exists.
                Err(XsErrno::ENOENT) if view.get(parent_of(&path)).is_some() => Ok((ok(), Vec::new())),
                Err(e) => Err(e),
            }
        }
        MsgType::SetPerms => {
            let args = strings(payload);
            let (&raw, perm_args) = args.split_first().ok_or(XsErrno::EINVAL)?;
            if perm_args.is_empty() {
                return Err(XsErrno::EINVAL);
            }
            let perms = perm_args.iter().map(|p| Perm::parse(p)).collect::<Result<Vec<_>>>();
            let perms = perms.map_err(|_| XsErrno::EINVAL)?;
            if raw.starts_with(b"@") {
                // Special paths have no node; only dom0 may set their (unused here) permissions.
                return match SPECIAL_PATHS.iter().any(|s| s.as_bytes() == raw) {
                    false => Err(XsErrno::EINVAL),
                    true if domid != 0 => Err(XsErrno::EACCES),
                    true => Ok((ok(), Vec::new())),
                };
            }
            let path = node_path(domid, raw)?;
            let mut node = get_node(view, domid, &path, PERM_WRITE | PERM_OWNER)?;
            if domid != 0 && perms[0].domid != node.perms[0].domid {
                return Err(XsErrno::EPERM);
            }
            let old = std::mem::replace(&mut node.perms, perms);
            view.put(&path, Some(node.clone()));
            let fire = fire(view, &path, false, node.perms, Some(old));
            Ok((ok(), vec![fire]))
        }
        _ => Err(XsErrno::ENOSYS),
    }
}

/// C xenstored's `get_node`: the node if `domid` has the `need`ed access. A missing or
/// forbidden node is ENOENT only if the nearest existing ancestor grants that access, else
/// EACCES, so the error does not reveal what the domain may not see.
fn get_node(view: &mut View<'_>, domid: DomId, path: &str, need: u8) -> XsResult<Node> {
    let errno = match view.get(path) {
        Some(node) if perm_for(domid, &node.perms) & need == need => return Ok(node.clone()),
        Some(_) => XsErrno::EACCES,
        None => XsErrno::ENOENT,
    };
    let mut ancestor = path;
    let parent_perm = loop {
        if ancestor == "/" {
            break 0;
        }
        ancestor = parent_of(ancestor);
        if let Some(node) = view.get(ancestor) {
            break perm_for(domid, &node.perms);
        }
    };
    Err(if parent_perm & need != 0 { errno } else { XsErrno::EACCES })
}

/// Creates `path` and its missing ancestors; each new node inherits its parent's
/// permissions, owned by the creator unless that is dom0.
fn create(view: &mut View<'_>, domid: DomId, path: &str, value: Vec<u8>) -> XsResult<Node> {
    let mut missing = vec![path.to_owned()];
    let mut parent_path = parent_of(path).to_owned();
    let mut parent = loop {
        if let Some(node) = view.get(&parent_path) {
            break node.clone();
        }
        if parent_path == "/" {
            return Err(XsErrno::EIO);
        }
        missing.push(parent_path.clone());
        parent_path = parent_of(&parent_path).to_owned();
    };
    for p in missing.iter().rev() {
        parent.children.push(basename(p).to_owned());
        let mut perms = parent.perms.clone();
        if domid != 0 {
            if let Some(owner) = perms.first_mut() {
                owner.domid = domid;
            }
        }
        view.put(&parent_path, Some(parent));
        parent = Node { value: Vec::new(), perms, children: Vec::new(), gen: 0 };
        parent_path.clone_from(p);
    }
    parent.value = value;
    view.put(path, Some(parent.clone()));
    Ok(parent)
}

/// Removes `path` and everything below, children first. As C xenstored, each removed
/// descendant fires the watches on exactly it, and the top node fires its own and its
/// ancestors' watches, each judged by the permissions the node had.
fn remove_subtree(view: &mut View<'_>, path: &str, top: bool, fires: &mut Vec<Fire>) {
    let Some(node) = view.get(path).cloned() else { return };
    for child in &node.children {
        remove_subtree(view, &child_path(path, child), false, fires);
    }
    let f = fire(view, path, !top, node.perms, None);
    fires.push(f);
    view.put(path, None);
}

fn fire(view: &mut View<'_>, path: &str, exact: bool, perms: Vec<Perm>, old_perms: Option<Vec<Perm>>) -> Fire {
    let parent_perms = if path == "/" { None } else { view.get(parent_of(path)).map(|p| p.perms.clone()) };
    Fire { path: path.to_owned(), exact, perms, parent_perms, old_perms }
}

/// C xenstored's `perm_for_conn` as access bits.
fn perm_for(domid: DomId, perms: &[Perm]) -> u8 {
    let Some((owner, others)) = perms.split_first() else { return 0 };
    if domid == 0 || owner.domid == domid {
        return PERM_READ | PERM_WRITE | PERM_OWNER;
    }
    let entry = others.iter().find(|p| p.domid == domid).unwrap_or(owner);
    match entry.access {
        PermAccess::None => 0,
        PermAccess::Read => PERM_READ,
        PermAccess::Write => PERM_WRITE,
        PermAccess::Both => PERM_READ | PERM_WRITE,
    }
}

/// A domain's home, where its relative paths point.
fn home(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// Makes a relative path absolute; absolute and special ("@...") paths stay as they are.
fn canonical(domid: DomId, path: &str) -> String {
    if path.starts_with('/') || path.starts_with('@') {
        path.to_owned()
    } else {
        format!("{}/{path}", home(domid))
    }
}

/// The absolute path of a request's node argument, if valid (C xenstored's
/// `is_valid_nodename` after canonicalization).
fn node_path(domid: DomId, raw: &[u8]) -> XsResult<String> {
    let path = canonical(domid, std::str::from_utf8(raw).map_err(|_| XsErrno::EINVAL)?);
    let valid = path.starts_with('/')
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//")
        && path.len() <= ABS_PATH_MAX
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b));
    if valid {
        Ok(path)
    } else {
        Err(XsErrno::EINVAL)
    }
}

/// The parent of a valid absolute path ("/" for "/").
fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn basename(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Whether `child` is `parent` or below it, by whole path components.
fn is_child(child: &str, parent: &str) -> bool {
    parent == "/" || child.strip_prefix(parent).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The NUL-terminated strings of a payload; bytes after the last NUL are ignored, as C
/// xenstored's `get_strings` does.
fn strings(payload: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = payload.split(|b| *b == 0).collect();
    parts.pop();
    parts
}

/// The single argument of a payload that must be exactly one NUL-terminated string.
fn onearg(payload: &[u8]) -> XsResult<&[u8]> {
    match payload.iter().position(|b| *b == 0) {
        Some(i) if i + 1 == payload.len() => Ok(&payload[..i]),
        _ => Err(XsErrno::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TxId, WatchEvent};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);
    const NONE: TxId = TxId::NONE;

    fn server(name: &str) -> SimXenstored {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xsim-{}-{n}-{name}.sock", std::process::id()));
        SimXenstored::start(&path).expect("start xenstored")
    }

    fn client(sim: &SimXenstored, domid: DomId) -> Xenstore {
        connect(sim.socket_path(), domid).expect("connect")
    }

    fn errno<T: std::fmt::Debug>(r: Result<T>) -> XsErrno {
        r.expect_err("request should fail").xs_errno().expect("a xenstore error reply")
    }

    fn event(xs: &Xenstore) -> WatchEvent {
        xs.next_event(Some(WAIT)).expect("events").expect("an event in time")
    }

    /// The next `n` events, in no particular order.
    fn events(xs: &Xenstore, n: usize) -> Vec<(String, String)> {
        let mut v: Vec<_> = (0..n).map(|_| event(xs)).map(|e| (e.path, e.token)).collect();
        v.sort();
        v
    }

    fn pairs(evs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = evs.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect();
        v.sort();
        v
    }

    fn ev(path: &str, token: &str) -> WatchEvent {
        WatchEvent { path: path.into(), token: token.into() }
    }

    fn perm(access: PermAccess, domid: DomId) -> Perm {
        Perm { domid, access }
    }

    /// Gives domain `domid` a home it owns, as the toolstack does.
    fn make_home(dom0: &Xenstore, domid: DomId) {
        let h = home(domid);
        dom0.mkdir(NONE, &h).expect("mkdir home");
        dom0.set_perms(NONE, &h, &[perm(PermAccess::None, domid)]).expect("home perms");
    }

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
    fn read_write_mkdir_rm_directory() {
        let sim = server("basic");
        let xs = client(&sim, 0);
        assert_eq!(xs.directory(NONE, "/").expect("dir /"), ["local"]);
        assert_eq!(xs.directory(NONE, "/local").expect("dir"), ["domain"]);
        assert!(xs.directory(NONE, "/local/domain").expect("dir").is_empty());
        assert_eq!(xs.get_perms(NONE, "/").expect("perms"), [perm(PermAccess::None, 0)]);

        xs.write(NONE, "/a/b", b"hello").expect("write");
        assert_eq!(xs.read(NONE, "/a/b").expect("read"), b"hello");
        assert_eq!(xs.read(NONE, "/a").expect("parent made"), b"");
        xs.write(NONE, "/a/c", b"x\0y").expect("binary value");
        assert_eq!(xs.read(NONE, "/a/c").expect("read"), b"x\0y");
        xs.write(NONE, "/a/b", b"").expect("overwrite");
        assert_eq!(xs.read(NONE, "/a/b").expect("read"), b"");
        xs.mkdir(NONE, "/a/d/e").expect("mkdir");
        xs.mkdir(NONE, "/a/d/e").expect("mkdir of an existing node");
        xs.write(NONE, "/a/d", b"keep").expect("write");
        xs.mkdir(NONE, "/a/d").expect("mkdir keeps the value");
        assert_eq!(xs.read(NONE, "/a/d").expect("read"), b"keep");
        assert_eq!(xs.directory(NONE, "/a").expect("dir"), ["b", "c", "d"]);
        assert!(xs.directory(NONE, "/a/b").expect("leaf").is_empty());
        assert_eq!(xs.directory(NONE, "/").expect("dir /"), ["local", "a"]);

        xs.rm(NONE, "/a/d").expect("rm subtree");
        assert_eq!(errno(xs.read(NONE, "/a/d/e")), XsErrno::ENOENT);
        assert_eq!(xs.directory(NONE, "/a").expect("dir"), ["b", "c"]);
        xs.rm(NONE, "/a").expect("rm");
        assert_eq!(xs.try_read(NONE, "/a/b").expect("try_read"), None);
        assert_eq!(xs.directory(NONE, "/").expect("dir /"), ["local"]);
        xs.rm(NONE, "/a").expect("rm of a missing node whose parent exists");
        assert_eq!(errno(xs.rm(NONE, "/a/b")), XsErrno::ENOENT);
        assert_eq!(errno(xs.rm(NONE, "/")), XsErrno::EINVAL);
        assert_eq!(errno(xs.directory(NONE, "/nope")), XsErrno::ENOENT);
        assert_eq!(xs.get_domain_path(7).expect("domain path"), "/local/domain/7");

        let long = format!("/{}", "x".repeat(ABS_PATH_MAX));
        for bad in ["/a//b", "/a/", "/a b", "", "/\u{e4}", "/a\nb", long.as_str()] {
            assert_eq!(errno(xs.write(NONE, bad, b"v")), XsErrno::EINVAL, "{bad:?}");
            assert_eq!(errno(xs.read(NONE, bad)), XsErrno::EINVAL, "{bad:?}");
        }
        xs.write(NONE, "/ok-_@9/Z", b"v").expect("all valid characters");
    }

    #[test]
    fn relative_paths() {
        let sim = server("relative");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);
        domu.write(NONE, "device/x", b"1").expect("relative write");
        assert_eq!(dom0.read(NONE, "/local/domain/5/device/x").expect("absolute read"), b"1");
        assert_eq!(domu.read(NONE, "device/x").expect("relative read"), b"1");
        assert_eq!(domu.directory(NONE, "device").expect("relative dir"), ["x"]);
        dom0.write(NONE, "name", b"Domain-0").expect("dom0 relative write");
        assert_eq!(dom0.read(NONE, "/local/domain/0/name").expect("read"), b"Domain-0");
        assert_eq!(errno(domu.read(NONE, "device/")), XsErrno::EINVAL);

        domu.watch("device", "rel").expect("relative watch");
        assert_eq!(event(&domu), ev("device", "rel"));
        domu.watch("/local/domain/5/device", "abs").expect("absolute watch");
        assert_eq!(event(&domu), ev("/local/domain/5/device", "abs"));
        dom0.write(NONE, "/local/domain/5/device/y", b"2").expect("write");
        assert_eq!(events(&domu, 2), pairs(&[("device/y", "rel"), ("/local/domain/5/device/y", "abs")]));
        domu.unwatch("device", "rel").expect("relative unwatch");
        assert_eq!(errno(domu.unwatch("/local/domain/5/device", "rel")), XsErrno::ENOENT);
    }

    #[test]
    fn permissions() {
        let sim = server("perms");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);

        dom0.write(NONE, "/secret", b"s").expect("write");
        assert_eq!(dom0.get_perms(NONE, "/secret").expect("perms"), [perm(PermAccess::None, 0)]);
        assert_eq!(errno(domu.read(NONE, "/secret")), XsErrno::EACCES);
        assert_eq!(errno(domu.write(NONE, "/secret", b"x")), XsErrno::EACCES);
        assert_eq!(errno(domu.directory(NONE, "/secret")), XsErrno::EACCES);
        assert_eq!(errno(domu.get_perms(NONE, "/secret")), XsErrno::EACCES);
        assert_eq!(errno(domu.rm(NONE, "/secret")), XsErrno::EACCES);
        // Missing nodes: ENOENT where the domain may look, EACCES where it may not.
        assert_eq!(errno(domu.read(NONE, "/local/domain/5/missing")), XsErrno::ENOENT);
        assert_eq!(errno(domu.read(NONE, "/secret/missing")), XsErrno::EACCES);
        assert_eq!(errno(dom0.read(NONE, "/secret/missing")), XsErrno::ENOENT);
        assert_eq!(errno(domu.write(NONE, "/local/domain/9/x", b"v")), XsErrno::EACCES);
        assert_eq!(dom0.try_read(NONE, "/local/domain/9").expect("read"), None);

        dom0.write(NONE, "/shared", b"v").expect("write");
        dom0.set_perms(NONE, "/shared", &[perm(PermAccess::None, 0), perm(PermAccess::Read, 5)]).expect("grant r5");
        assert_eq!(domu.read(NONE, "/shared").expect("granted read"), b"v");
        assert_eq!(errno(domu.write(NONE, "/shared", b"w")), XsErrno::EACCES);
        dom0.set_perms(NONE, "/shared", &[perm(PermAccess::None, 0), perm(PermAccess::Both, 5)]).expect("grant b5");
        domu.write(NONE, "/shared", b"w").expect("granted write");
        assert_eq!(dom0.read(NONE, "/shared").expect("read"), b"w");
        assert_eq!(
            domu.get_perms(NONE, "/shared").expect("perms"),
            [perm(PermAccess::None, 0), perm(PermAccess::Both, 5)]
        );
        assert_eq!(errno(domu.set_perms(NONE, "/shared", &[perm(PermAccess::Both, 5)])), XsErrno::EACCES);
        // Default access for unlisted domains.
        dom0.write(NONE, "/public", b"p").expect("write");
        dom0.set_perms(NONE, "/public", &[perm(PermAccess::Read, 0)]).expect("world readable");
        assert_eq!(domu.read(NONE, "/public").expect("default read"), b"p");
        assert_eq!(errno(domu.write(NONE, "/public", b"x")), XsErrno::EACCES);

        // The owner may change its node's permissions but not give it away.
        domu.write(NONE, "mine", b"m").expect("write home");
        domu.set_perms(NONE, "mine", &[perm(PermAccess::None, 5), perm(PermAccess::Read, 7)]).expect("owner");
        assert_eq!(errno(domu.set_perms(NONE, "mine", &[perm(PermAccess::None, 7)])), XsErrno::EPERM);
        assert_eq!(errno(dom0.set_perms(NONE, "/shared", &[])), XsErrno::EINVAL);
    }

    #[test]
    fn created_nodes_inherit_perms_and_ownership() {
        let sim = server("inherit");
        let dom0 = client(&sim, 0);
        let domu = client(&sim, 5);
        let h = home(5);
        dom0.mkdir(NONE, &h).expect("mkdir");
        let home_perms = [perm(PermAccess::None, 5), perm(PermAccess::Read, 7)];
        dom0.set_perms(NONE, &h, &home_perms).expect("perms");

        domu.write(NONE, "dev/a", b"1").expect("write with a missing parent");
        assert_eq!(domu.get_perms(NONE, "dev").expect("perms"), home_perms);
        assert_eq!(domu.get_perms(NONE, "dev/a").expect("perms"), home_perms);
        dom0.write(NONE, &format!("{h}/fe"), b"x").expect("dom0 write");
        assert_eq!(dom0.get_perms(NONE, &format!("{h}/fe")).expect("perms"), home_perms, "dom0 keeps the owner");

        // A domain granted write on someone else's node owns what it creates below it.
        dom0.set_perms(NONE, &h, &[perm(PermAccess::None, 0), perm(PermAccess::Both, 5)]).expect("perms");
        domu.mkdir(NONE, "new/sub").expect("mkdir");
        let created = [perm(PermAccess::None, 5), perm(PermAccess::Both, 5)];
        assert_eq!(dom0.get_perms(NONE, &format!("{h}/new")).expect("perms"), created);
        assert_eq!(dom0.get_perms(NONE, &format!("{h}/new/sub")).expect("perms"), created);
        domu.set_perms(NONE, "new", &[perm(PermAccess::None, 5)]).expect("creator owns it");
    }

    #[test]
    fn watches_fire_on_changes_below() {
        let sim = server("watch");
        let w = client(&sim, 0);
        let xs = client(&sim, 0);
        w.watch("/a", "tA").expect("watch");
        assert_eq!(event(&w), ev("/a", "tA"));
        w.watch("/mark", "m").expect("watch");
        assert_eq!(event(&w), ev("/mark", "m"));

        xs.write(NONE, "/a/b/c", b"1").expect("write");
        assert_eq!(event(&w), ev("/a/b/c", "tA"));
        xs.write(NONE, "/a", b"2").expect("write");
        assert_eq!(event(&w), ev("/a", "tA"));
        // Neither "/ab" nor a no-op mkdir fires; the marker write shows nothing came before.
        xs.write(NONE, "/ab", b"x").expect("write");
        xs.mkdir(NONE, "/a/b").expect("mkdir existing");
        xs.write(NONE, "/mark", b"1").expect("write");
        assert_eq!(event(&w), ev("/mark", "m"));
        xs.mkdir(NONE, "/a/new").expect("mkdir");
        assert_eq!(event(&w), ev("/a/new", "tA"));
        xs.set_perms(NONE, "/a/new", &[perm(PermAccess::Read, 0)]).expect("set_perms");
        assert_eq!(event(&w), ev("/a/new", "tA"));

        w.watch("/a/b/c", "deep").expect("watch");
        assert_eq!(event(&w), ev("/a/b/c", "deep"));
        w.watch("/a/b/none", "none").expect("watch");
        assert_eq!(event(&w), ev("/a/b/none", "none"));
        xs.rm(NONE, "/a").expect("rm");
        assert_eq!(events(&w, 2), pairs(&[("/a", "tA"), ("/a/b/c", "deep")]));
        xs.write(NONE, "/mark", b"2").expect("write");
        assert_eq!(event(&w), ev("/mark", "m"), "a watch on a node that did not exist stays quiet");

        w.unwatch("/a", "tA").expect("unwatch");
        xs.write(NONE, "/a/again", b"1").expect("write");
        xs.write(NONE, "/mark", b"3").expect("write");
        assert_eq!(event(&w), ev("/mark", "m"));

        assert_eq!(errno(w.watch("/mark", "m")), XsErrno::EEXIST);
        w.watch("/mark", "m2").expect("same path, other token");
        assert_eq!(event(&w), ev("/mark", "m2"));
        assert_eq!(errno(w.unwatch("/nope", "m")), XsErrno::ENOENT);
        assert_eq!(errno(w.watch("/bad//path", "t")), XsErrno::EINVAL);
        w.watch("@releaseDomain", "rel").expect("special watch");
        assert_eq!(event(&w), ev("@releaseDomain", "rel"));
        w.watch("/", "root").expect("root watch");
        assert_eq!(event(&w), ev("/", "root"));
        xs.write(NONE, "/z", b"1").expect("write");
        assert_eq!(event(&w), ev("/z", "root"));
    }

    #[test]
    fn no_event_without_read_access() {
        let sim = server("watchperm");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);
        dom0.write(NONE, "/priv/x", b"1").expect("write");
        dom0.write(NONE, "/pub", b"").expect("write");
        dom0.set_perms(NONE, "/pub", &[perm(PermAccess::None, 0), perm(PermAccess::Read, 5)]).expect("perms");
        dom0.write(NONE, "/pub/hidden", b"").expect("write");
        dom0.set_perms(NONE, "/pub/hidden", &[perm(PermAccess::None, 0)]).expect("perms");

        domu.watch("/priv", "p").expect("watching an unreadable node is allowed");
        assert_eq!(event(&domu), ev("/priv", "p"));
        domu.watch("/pub", "pub").expect("watch");
        assert_eq!(event(&domu), ev("/pub", "pub"));
        domu.watch("mark", "m").expect("watch");
        assert_eq!(event(&domu), ev("mark", "m"));

        dom0.write(NONE, "/priv/x", b"2").expect("write");
        dom0.rm(NONE, "/priv").expect("rm");
        dom0.write(NONE, &format!("{}/mark", home(5)), b"1").expect("write");
        assert_eq!(event(&domu), ev("mark", "m"), "no event for /priv");
        // As C xenstored, a readable parent is enough.
        dom0.write(NONE, "/pub/hidden", b"1").expect("write");
        assert_eq!(event(&domu), ev("/pub/hidden", "pub"));
        // Losing read access still tells the watcher.
        dom0.set_perms(NONE, "/pub", &[perm(PermAccess::None, 0)]).expect("perms");
        assert_eq!(event(&domu), ev("/pub", "pub"));
    }

    #[test]
    fn watch_limit() {
        let sim = server("watchlimit");
        let xs = client(&sim, 0);
        for i in 0..MAX_WATCHES {
            xs.watch("/w", &i.to_string()).expect("watch");
        }
        assert_eq!(errno(xs.watch("/w", "one too many")), XsErrno::E2BIG);
        xs.unwatch("/w", "0").expect("unwatch");
        xs.watch("/w", "fits again").expect("watch");
    }

    #[test]
    fn transaction_isolation_and_commit() {
        let sim = server("tx");
        let a = client(&sim, 0);
        let b = client(&sim, 0);
        a.write(NONE, "/t/x", b"0").expect("write");
        b.watch("/t", "t").expect("watch");
        assert_eq!(event(&b), ev("/t", "t"));
        b.watch("/mark", "m").expect("watch");
        assert_eq!(event(&b), ev("/mark", "m"));

        let tx = a.transaction_start().expect("start");
        assert_ne!(tx, NONE);
        a.write(tx, "/t/x", b"1").expect("tx write");
        a.write(tx, "/t/new", b"n").expect("tx create");
        assert_eq!(a.read(tx, "/t/x").expect("own view"), b"1");
        assert_eq!(a.directory(tx, "/t").expect("own view"), ["x", "new"]);
        assert_eq!(a.read(NONE, "/t/x").expect("outside"), b"0");
        assert_eq!(b.read(NONE, "/t/x").expect("outside"), b"0");
        assert_eq!(b.try_read(NONE, "/t/new").expect("outside"), None);
        assert_eq!(b.directory(NONE, "/t").expect("outside"), ["x"]);
        a.write(NONE, "/mark", b"1").expect("write");
        assert_eq!(event(&b), ev("/mark", "m"), "no events before the commit");

        a.transaction_end(tx, true).expect("commit");
        assert_eq!(b.read(NONE, "/t/x").expect("committed"), b"1");
        assert_eq!(b.read(NONE, "/t/new").expect("committed"), b"n");
        assert_eq!([event(&b), event(&b)], [ev("/t/x", "t"), ev("/t/new", "t")]);
        assert_eq!(errno(a.transaction_end(tx, true)), XsErrno::ENOENT, "the transaction is gone");

        // A transaction that removes, then is aborted.
        let tx = a.transaction_start().expect("start");
        a.rm(tx, "/t").expect("tx rm");
        assert_eq!(errno(a.read(tx, "/t/x")), XsErrno::ENOENT);
        a.write(tx, "/other", b"o").expect("tx write");
        a.transaction_end(tx, false).expect("abort");
        assert_eq!(a.read(NONE, "/t/x").expect("untouched"), b"1");
        assert_eq!(a.try_read(NONE, "/other").expect("read"), None);
        a.write(NONE, "/mark", b"2").expect("write");
        assert_eq!(event(&b), ev("/mark", "m"), "an aborted transaction fires nothing");

        assert_eq!(errno(a.read(TxId(999), "/t")), XsErrno::ENOENT);
        assert_eq!(errno(a.transaction_end(NONE, true)), XsErrno::ENOENT);
    }

    #[test]
    fn transaction_conflicts() {
        let sim = server("txconflict");
        let a = client(&sim, 0);
        let b = client(&sim, 0);
        a.write(NONE, "/t/x", b"0").expect("write");

        let tx = a.transaction_start().expect("start");
        assert_eq!(a.read(tx, "/t/x").expect("read"), b"0");
        b.write(NONE, "/t/x", b"2").expect("concurrent write");
        a.write(tx, "/t/y", b"3").expect("tx write");
        assert_eq!(errno(a.transaction_end(tx, true)), XsErrno::EAGAIN);
        assert_eq!(b.try_read(NONE, "/t/y").expect("read"), None, "a conflicting commit applies nothing");

        // A node found missing that appears meanwhile conflicts too.
        let tx = a.transaction_start().expect("start");
        assert_eq!(a.try_read(tx, "/t/later").expect("read"), None);
        b.write(NONE, "/t/later", b"1").expect("write");
        a.write(tx, "/elsewhere", b"1").expect("tx write");
        assert_eq!(errno(a.transaction_end(tx, true)), XsErrno::EAGAIN);

        // Changes to nodes the transaction never touched do not.
        let tx = a.transaction_start().expect("start");
        a.write(tx, "/t/x", b"3").expect("tx write");
        b.write(NONE, "/unrelated", b"1").expect("write");
        a.transaction_end(tx, true).expect("commit");
        assert_eq!(b.read(NONE, "/t/x").expect("read"), b"3");

        // Xenstore::transaction retries a conflicting commit.
        a.write(NONE, "/c", b"0").expect("write");
        let mut attempts = 0;
        a.transaction(|tx| {
            attempts += 1;
            let v: u32 = a.read_string(tx, "/c")?.parse().expect("number");
            if attempts == 1 {
                b.write(NONE, "/c", b"10")?;
            }
            a.write(tx, "/c", (v + 1).to_string().as_bytes())
        })
        .expect("transaction");
        assert_eq!(attempts, 2);
        assert_eq!(b.read(NONE, "/c").expect("read"), b"11");

        let open: Vec<TxId> = (0..MAX_TRANSACTIONS).map(|_| a.transaction_start().expect("start")).collect();
        assert_eq!(errno(a.transaction_start()), XsErrno::EBUSY);
        a.transaction_end(open[0], false).expect("abort");
        a.transaction_start().expect("start after an end");
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
