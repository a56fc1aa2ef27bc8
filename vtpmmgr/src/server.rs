//! Serving the manager: Unix sockets (vTPM clients that BIND with a token; the admin socket
//! for management), and Xen's tpmback, where a vTPM domain's identity is its device's uuid.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use xvtpm_backend::{CommandHandler, Request};

use crate::manager::Manager;
use xvtpm_proto::mgr::{status, Reply, HEADER, MAX_MESSAGE, TAG_RSP};
use xvtpm_proto::{tpm, Uuid};

use crate::dispatch::{self, Caller};
use crate::store::dev::BlockDev;
use crate::{BootHash, Error, Result};

/// The manager shared by all connections; commands run one at a time.
pub type Shared<D> = Arc<Mutex<Manager<D>>>;

fn run<D: BlockDev>(mgr: &Shared<D>, caller: &mut Caller, boot: Option<&BootHash>, msg: &[u8]) -> Vec<u8> {
    let mut m = mgr.lock().unwrap_or_else(PoisonError::into_inner);
    dispatch::handle(&mut *m, caller, boot, msg)
}

/// Starts the thread that makes the manager's deferred counter increments when they fall due
/// ([`Manager::flush_counter`]). It sleeps while none is owed: an idle manager never wakes.
pub fn spawn_counter_flusher<D: BlockDev + Send + 'static>(mgr: Shared<D>) -> Result<std::thread::JoinHandle<()>> {
    let m2 = mgr.clone();
    let t = std::thread::Builder::new()
        .name("counter".into())
        .spawn(move || loop {
            let wait = {
                let mut m = m2.lock().unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = m.flush_counter(false) {
                    log::error!("the deferred anti-rollback counter increment failed: {e}; retrying");
                }
                m.counter_wait()
            };
            // A commit that makes an increment owed unparks this thread (an unpark before the
            // park is kept, so none is missed).
            match wait {
                Some(d) => std::thread::park_timeout(d),
                None => std::thread::park(),
            }
        })
        .map_err(|e| Error::io("start the counter thread", e))?;
    mgr.lock().unwrap_or_else(PoisonError::into_inner).wake_on_owed_increment(t.thread().clone());
    Ok(t)
}

/// How many clients a socket serves, and how long a client may stay unbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Clients connected at once.
    pub max_clients: usize,
    /// Unbound clients (connected, no successful BIND yet) of one uid at once: one user
    /// cannot take the slots every vTPM needs.
    pub unbound_per_uid: usize,
    /// How long an unbound client may wait before its next message: an idle one is closed.
    pub unbound_timeout: Duration,
    /// The group a vTPM socket belongs to (mode 0660): the one the sandboxed vtpms are in.
    /// `None`: the manager's own group.
    pub group: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_clients: 1024, unbound_per_uid: 8, unbound_timeout: Duration::from_secs(10), group: None }
    }
}

/// Unbound clients per uid, shared by a socket's connections.
type Unbound = Arc<Mutex<std::collections::HashMap<u32, usize>>>;

/// One unbound client counted while it lives (or until it binds).
struct UnboundSlot(Unbound, u32);

impl Drop for UnboundSlot {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Reads one message: `Ok(None)` at a clean end of stream. Waits at most `wait` for it to
/// start (`None`: for ever).
fn read_message(s: &mut UnixStream, wait: Option<Duration>) -> std::io::Result<Option<Vec<u8>>> {
    s.set_read_timeout(wait)?;
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match s.read(&mut head[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let size = tpm::be32(&head, 2).unwrap_or_default() as usize;
    if !(HEADER..=MAX_MESSAGE).contains(&size) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message size {size}")));
    }
    let mut msg = head.to_vec();
    msg.resize(size, 0);
    // The rest of a message must follow promptly.
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.read_exact(&mut msg[HEADER..])?;
    s.set_read_timeout(None)?;
    Ok(Some(msg))
}

fn serve_conn<D: BlockDev>(
    mgr: Shared<D>,
    mut s: UnixStream,
    mut caller: Caller,
    mut unbound: Option<UnboundSlot>,
    limits: Limits,
) {
    // Measured once, as it connects: the executable that opened the connection.
    let boot = match caller {
        Caller::Admin => None,
        _ => crate::peer::measure_peer(&s),
    };
    loop {
        let bound = matches!(caller, Caller::Socket { bound: Some(_), .. });
        if bound {
            // A bound client (a vTPM keeps its connection, mostly idle) no longer counts.
            unbound = None;
        }
        let wait = (!bound && unbound.is_some()).then_some(limits.unbound_timeout);
        match read_message(&mut s, wait) {
            Ok(Some(msg)) => {
                let rsp = run(&mgr, &mut caller, boot.as_ref(), &msg);
                if s.write_all(&rsp).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                log::warn!("{caller:?}: idle for {:?} without binding to a vTPM; closing it", limits.unbound_timeout);
                return;
            }
            Err(e) => {
                log::warn!("{caller:?}: dropping the connection: {e}");
                let _ = s.write_all(&Reply::refuse(TAG_RSP, status::SIZE).encode());
                return;
            }
        }
    }
}

/// Counts a connection while its thread lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Listens on `path` (mode 0600 for the admin socket, 0660 otherwise) and serves each
/// connection on its own thread, at most `max_clients` at once: a client beyond that is
/// closed at once with a log line (a vTPM that reconnects in a loop costs no more than one
/// connection).
pub fn serve_unix<D: BlockDev + Send + 'static>(
    mgr: Shared<D>,
    path: &Path,
    admin: bool,
    max_clients: usize,
) -> Result<std::thread::JoinHandle<()>> {
    serve_unix_with(mgr, path, admin, Limits { max_clients, ..Limits::default() })
}

/// [`serve_unix`] for the vTPM socket, with its group (mode 0660).
pub fn serve_unix_group<D: BlockDev + Send + 'static>(
    mgr: Shared<D>,
    path: &Path,
    max_clients: usize,
    group: Option<u32>,
) -> Result<std::thread::JoinHandle<()>> {
    serve_unix_with(mgr, path, false, Limits { max_clients, group, ..Limits::default() })
}

/// [`serve_unix`] with all of its [`Limits`]: beyond `max_clients`, and beyond
/// `unbound_per_uid` unbound clients of one uid, a new client is closed at once; an unbound
/// client idle for `unbound_timeout` is closed.
pub fn serve_unix_with<D: BlockDev + Send + 'static>(
    mgr: Shared<D>,
    path: &Path,
    admin: bool,
    limits: Limits,
) -> Result<std::thread::JoinHandle<()>> {
    let max_clients = limits.max_clients;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(Error::Store(format!("{} exists and is not a socket", path.display())));
        }
        let _ = std::fs::remove_file(path);
    }
    // Bound in a private directory, given its mode, then moved into place: no client can
    // connect while the socket still has the umask's permissions.
    let mode = if admin { 0o600 } else { 0o660 };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = parent.join(format!(".vtpmmgr-{}-{}", std::process::id(), u8::from(admin)));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| Error::io(format!("create {}", private.display()), e))?;
    let tmp = private.join("sock");
    let bound =
        UnixListener::bind(&tmp).map_err(|e| Error::io(format!("listen on {}", path.display()), e)).and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .and_then(|()| match limits.group.filter(|_| !admin) {
                    Some(g) => std::os::unix::fs::chown(&tmp, None, Some(g)),
                    None => Ok(()),
                })
                .and_then(|()| std::fs::rename(&tmp, path))
                .map(|()| l)
                .map_err(|e| Error::io(format!("put the socket at {}", path.display()), e))
        });
    let _ = std::fs::remove_dir_all(&private);
    let l = bound?;
    log::info!("{} socket on {}", if admin { "admin" } else { "vTPM" }, path.display());
    let path_name = path.display().to_string();
    let live = Arc::new(AtomicUsize::new(0));
    let unbound: Unbound = Arc::default();
    Ok(std::thread::spawn(move || {
        for conn in l.incoming() {
            match conn {
                Ok(s) => {
                    if live.load(Ordering::SeqCst) >= max_clients {
                        log::warn!("{}: {max_clients} clients connected already; closing a new one", path_name);
                        continue;
                    }
                    live.fetch_add(1, Ordering::SeqCst);
                    let slot = Slot(live.clone());
                    let mgr = mgr.clone();
                    let (caller, slot_u) = match (admin, crate::peer::peer_uid(&s)) {
                        (true, _) => (Caller::Admin, None),
                        (false, Ok(uid)) => {
                            let mut m = unbound.lock().unwrap_or_else(PoisonError::into_inner);
                            let n = m.entry(uid).or_insert(0);
                            if *n >= limits.unbound_per_uid {
                                log::warn!(
                                    "{path_name}: uid {uid} has {n} connections that have not bound to a vTPM; closing a new one"
                                );
                                continue;
                            }
                            *n += 1;
                            (Caller::Socket { uid, bound: None }, Some(UnboundSlot(unbound.clone(), uid)))
                        }
                        (false, Err(e)) => {
                            log::warn!("{path_name}: a client whose uid is unknown ({e}); closing it");
                            continue;
                        }
                    };
                    // Out of threads: this client is dropped, the listener and the others go on.
                    let serve = move || {
                        let _slot = slot;
                        serve_conn(mgr, s, caller, slot_u, limits)
                    };
                    if let Err(e) = std::thread::Builder::new().spawn(serve) {
                        log::error!("cannot serve a new connection: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }))
}

/// Measures a vTPM domain by its id: its boot hash, or why there is none.
pub type DomainMeasure = Box<dyn Fn(u16) -> std::result::Result<BootHash, String> + Send + Sync>;

/// A vTPM domain's id and its device's uuid.
type DomainVtpm = (u16, [u8; 16]);

/// tpmback's handler: each device's uuid (from xenstore) is the calling vTPM.
pub struct XenHandler<D> {
    mgr: Shared<D>,
    measure: Option<DomainMeasure>,
    /// Boot hashes by (domain, device uuid), measured at a device's first command: a domain's
    /// image does not change while it runs.
    measured: Mutex<std::collections::HashMap<DomainVtpm, Option<BootHash>>>,
    /// The domain whose devices carry management commands (the toolstack's, dom0).
    admin_domain: Option<u16>,
}

impl<D> XenHandler<D> {
    /// Serves `mgr`; vTPM domains are not measured.
    pub fn new(mgr: Shared<D>) -> Self {
        Self { mgr, measure: None, measured: Default::default(), admin_domain: None }
    }

    /// Takes management commands (and only those) on the devices whose frontend is `domid`:
    /// how the operator's tool in dom0 reaches a manager in its own domain. Only the toolstack
    /// can make a device whose frontend is another domain, so no guest can pose as it.
    pub fn admin_from(mut self, domid: u16) -> Self {
        self.admin_domain = Some(domid);
        self
    }

    /// Measures each vTPM domain with `measure` (see [`crate::peer::measure_domain`]).
    pub fn measuring(mut self, measure: DomainMeasure) -> Self {
        self.measure = Some(measure);
        self
    }

    fn boot_hash(&self, domid: u16, uuid: &[u8; 16]) -> Option<BootHash> {
        let measure = self.measure.as_ref()?;
        let mut cache = self.measured.lock().unwrap_or_else(PoisonError::into_inner);
        *cache.entry((domid, *uuid)).or_insert_with(|| match measure(domid) {
            Ok(h) => {
                log::info!("vTPM domain {domid} ({}): boot hash {}", crate::uuid_str(uuid), crate::hex(&h));
                Some(h)
            }
            Err(e) => {
                log::warn!("vTPM domain {domid} ({}) cannot be measured: {e}", crate::uuid_str(uuid));
                None
            }
        })
    }
}

impl<D> std::fmt::Debug for XenHandler<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XenHandler")
    }
}

impl<D: BlockDev + Send> CommandHandler for XenHandler<D> {
    fn handle(&self, req: &Request<'_>) -> Vec<u8> {
        let Ok(Uuid(uuid)) = Uuid::parse(&req.device.uuid) else {
            log::warn!("{}: no usable uuid; refusing", req.device);
            return Reply::refuse(TAG_RSP, status::AUTHFAIL).encode();
        };
        if self.admin_domain == Some(req.device.frontend) {
            return run(&self.mgr, &mut Caller::Admin, None, req.command);
        }
        // Management commands are refused: a vTPM domain is never the admin.
        let boot = self.boot_hash(req.device.frontend, &uuid);
        run(&self.mgr, &mut Caller::Vtpm(uuid), boot.as_ref(), req.command)
    }
}

/// A client of the manager protocol over a Unix socket (the vtpm in dom0 deployments, and
/// the admin commands).
#[derive(Debug)]
pub struct Client {
    s: UnixStream,
    /// How long a reply may take (none: forever).
    timeout: Option<Duration>,
}

impl Client {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        Self::connect_with_timeout(path, None)
    }

    /// Connects to `path`; each send and each reply then waits at most `timeout` (a manager
    /// that stops answering is an error, not a hang).
    pub fn connect_with_timeout(path: &Path, timeout: Option<Duration>) -> Result<Self> {
        let s = UnixStream::connect(path).map_err(|e| Error::io(format!("connect to {}", path.display()), e))?;
        s.set_write_timeout(timeout).map_err(|e| Error::io(format!("set a timeout on {}", path.display()), e))?;
        Ok(Self { s, timeout })
    }

    /// Sends a request; the reply's status and body.
    pub fn call(&mut self, tag: u16, ordinal: u32, body: &[u8]) -> Result<(u32, Vec<u8>)> {
        let msg = self.exchange(&tpm::frame(tag, ordinal, body))?;
        let r = Reply::decode(&msg).map_err(|e| Error::Protocol(format!("malformed reply from the manager: {e}")))?;
        Ok((r.status, r.body))
    }

    /// Sends a framed request; the whole reply (at least a header).
    pub fn exchange(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        self.s.write_all(request).map_err(|e| Error::io("send to the manager", e))?;
        read_message(&mut self.s, self.timeout)
            .map_err(|e| match (e.kind(), self.timeout) {
                (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(t)) => {
                    Error::io(format!("the manager did not answer within {t:?}"), e)
                }
                _ => Error::io("read from the manager", e),
            })?
            .ok_or_else(|| Error::Protocol("the manager closed the connection".into()))
    }
}
