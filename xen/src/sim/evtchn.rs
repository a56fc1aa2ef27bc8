//! Simulated event channels across processes.
//!
//! Like Xen, the state lives in one shared table (a file mapped by every process of the
//! simulation): per (domain, port) the binding, a pending bit and a mask bit. `notify` sets the
//! peer's pending bit and, only on a 0 -> 1 transition of an unmasked port, kicks the peer's
//! handle with a datagram naming the port. Delivery masks the port until `unmask`, so a
//! notification storm costs the receiver one wake-up per unmask, and there is never more than
//! one kick in flight per port. Allocation and binding take a file lock on the table.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::wake::{poll_with, PollOutcome, WakeFd};
use crate::{DomId, Error, EventChannel, Port, Result, PAGE_SIZE};

/// Domains the simulation supports (domids below this).
pub const MAX_DOMAINS: usize = 256;
/// Ports per domain (port 0 is never used, as in Xen). Xen's FIFO ABI allows 131072; a
/// manager serving thousands of vTPM domains needs that many more than the 2-level ABI's 4096.
pub const MAX_PORTS: usize = 16384;
/// Connected sockets to peer handles kept per handle.
const PEERS_KEPT: usize = 64;
const ENTRY_WORDS: usize = 8;
const TABLE_OFFSET: usize = PAGE_SIZE;
const TABLE_LEN: usize = TABLE_OFFSET + MAX_DOMAINS * MAX_PORTS * ENTRY_WORDS * 4;

const FREE: u32 = 0;
const UNBOUND: u32 = 1;
const INTERDOMAIN: u32 = 2;

// Word indices in an entry.
const W_STATE: usize = 0;
const W_RDOM: usize = 1;
const W_RPORT: usize = 2;
const W_HANDLE: usize = 3;
const W_PENDING: usize = 4;
const W_MASKED: usize = 5;

/// The table file of a simulation directory.
pub fn table_path(root: &Path) -> PathBuf {
    root.join("evtchn.table")
}

/// Creates (or resets) the table of a new simulation.
pub fn create_table(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("evtchn")).map_err(|e| Error::io("create evtchn dir", e))?;
    let f = File::create(table_path(root)).map_err(|e| Error::io("create evtchn table", e))?;
    f.set_len(TABLE_LEN as u64).map_err(|e| Error::io("size evtchn table", e))
}

fn evt_err(op: &'static str, port: u32, errno: i32) -> Error {
    Error::Evtchn { op, port, source: std::io::Error::from_raw_os_error(errno) }
}

/// The shared table, mapped.
struct Table {
    file: File,
    base: NonNull<u8>,
}

// SAFETY: the mapping is only accessed through atomics; it lives as long as the Table.
unsafe impl Send for Table {}
// SAFETY: as above.
unsafe impl Sync for Table {}

impl Table {
    fn open(root: &Path) -> Result<Table> {
        let path = table_path(root);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        // SAFETY: a new shared mapping of the whole table file (sized by `create_table`).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                TABLE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io("mmap evtchn table", std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Sim("mmap returned null".into()))?;
        Ok(Table { file, base })
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        debug_assert!(index * 4 + 4 <= TABLE_LEN);
        // SAFETY: callers pass indices inside the mapping (checked by `entry`); the mapping is
        // page aligned so every word is 4-byte aligned, and it outlives `&self`.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(index * 4).cast()) }
    }

    fn next_handle_id(&self) -> u32 {
        self.word(0).fetch_add(1, SeqCst) + 1
    }

    fn entry(&self, dom: u32, port: u32) -> Option<Entry<'_>> {
        if dom as usize >= MAX_DOMAINS || port == 0 || port as usize >= MAX_PORTS {
            return None;
        }
        let first = TABLE_OFFSET / 4 + (dom as usize * MAX_PORTS + port as usize) * ENTRY_WORDS;
        Some(Entry { table: self, first })
    }

    fn lock(&self) -> Result<TableLock<'_>> {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io("lock evtchn table", std::io::Error::last_os_error()));
        }
        Ok(TableLock { table: self })
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `open`; no Entry outlives the table.
        unsafe { libc::munmap(self.base.as_ptr().cast(), TABLE_LEN) };
    }
}

struct TableLock<'a> {
    table: &'a Table,
}

impl Drop for TableLock<'_> {
    fn drop(&mut self) {
        // SAFETY: releases the lock taken in `Table::lock` on our own descriptor.
        unsafe { libc::flock(self.table.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[derive(Clone, Copy)]
struct Entry<'a> {
    table: &'a Table,
    first: usize,
}

impl Entry<'_> {
    fn w(&self, i: usize) -> &AtomicU32 {
        self.table.word(self.first + i)
    }
}

/// One simulated `/dev/xen/evtchn` handle of domain `domid`.
pub struct SimEvtchn {
    root: PathBuf,
    domid: DomId,
    table: Table,
    id: u32,
    sock: UnixDatagram,
    sock_path: PathBuf,
    ready: Mutex<VecDeque<Port>>,
    /// Connected sockets to the handles we kick, so a kick costs no path lookup (at most
    /// [`PEERS_KEPT`]: a backend of thousands of devices must not hold a descriptor for each).
    peers: Mutex<std::collections::HashMap<u32, UnixDatagram>>,
    /// Set by [`EventChannel::interrupt`].
    wake: WakeFd,
}

impl std::fmt::Debug for SimEvtchn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEvtchn").field("domid", &self.domid).field("handle", &self.id).finish()
    }
}

fn handle_sock(root: &Path, id: u32) -> PathBuf {
    root.join("evtchn").join(format!("h{id}"))
}

impl SimEvtchn {
    /// Opens a handle as `domid` in the simulation at `root`.
    pub fn open(root: &Path, domid: DomId) -> Result<Self> {
        if domid as usize >= MAX_DOMAINS {
            return Err(Error::Sim(format!("domain {domid} is beyond the simulation's {MAX_DOMAINS}")));
        }
        let table = Table::open(root)?;
        let id = table.next_handle_id();
        let sock_path = handle_sock(root, id);
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).map_err(|e| Error::io(format!("bind {}", sock_path.display()), e))?;
        sock.set_nonblocking(true).map_err(|e| Error::io("nonblocking evtchn socket", e))?;
        Ok(SimEvtchn {
            root: root.to_path_buf(),
            domid,
            table,
            id,
            sock,
            sock_path,
            ready: Mutex::new(VecDeque::new()),
            peers: Mutex::default(),
            wake: WakeFd::new()?,
        })
    }

    fn my(&self, port: Port, op: &'static str) -> Result<Entry<'_>> {
        let e = self.table.entry(self.domid.into(), port).ok_or_else(|| evt_err(op, port, libc::EINVAL))?;
        if e.w(W_STATE).load(SeqCst) == FREE || e.w(W_HANDLE).load(SeqCst) != self.id {
            return Err(evt_err(op, port, libc::EINVAL));
        }
        Ok(e)
    }

    fn free_port(&self, op: &'static str) -> Result<(Port, Entry<'_>)> {
        (1..MAX_PORTS as u32)
            .filter_map(|p| self.table.entry(self.domid.into(), p).map(|e| (p, e)))
            .find(|(_, e)| e.w(W_STATE).load(SeqCst) == FREE)
            .ok_or_else(|| evt_err(op, 0, libc::ENOSPC))
    }

    fn kick(&self, handle: u32, port: Port) {
        // Exactly one kick is in flight per pending unmasked port, so the receiver's queue
        // cannot fill up; a dead receiver (refused, missing) just means nobody listens.
        let Ok(mut peers) = self.peers.lock() else { return };
        if peers.len() >= PEERS_KEPT && !peers.contains_key(&handle) {
            peers.clear();
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = peers.entry(handle) {
            match UnixDatagram::unbound().and_then(|s| s.connect(handle_sock(&self.root, handle)).map(|_| s)) {
                Ok(s) => {
                    slot.insert(s);
                }
                Err(e) => return log::debug!("sim evtchn: kick of handle {handle} port {port}: {e}"),
            }
        }
        let sent = peers.get(&handle).map(|s| s.send(&port.to_ne_bytes()));
        if let Some(Err(e)) = sent {
            log::debug!("sim evtchn: kick of handle {handle} port {port}: {e}");
            peers.remove(&handle);
        }
    }

    /// The kernel closes a dead process's ports; a killed simulated process cannot, so a bind
    /// to a port still bound to one of our ports whose handle is gone frees that binding
    /// first (table lock held).
    fn reap_dead_peer(&self, r: Entry<'_>, remote_port: Port) {
        let mine = r.w(W_RPORT).load(SeqCst);
        let Some(old) = self.table.entry(self.domid.into(), mine) else { return };
        let handle = old.w(W_HANDLE).load(SeqCst);
        let probe = UnixDatagram::unbound().and_then(|s| s.send_to(&[], handle_sock(&self.root, handle)));
        if let Err(e) = probe {
            if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) {
                log::debug!("sim evtchn: freeing port {mine} of dead handle {handle} (peer port {remote_port})");
                old.w(W_STATE).store(FREE, SeqCst);
                r.w(W_RPORT).store(0, SeqCst);
                r.w(W_STATE).store(UNBOUND, SeqCst);
            }
        }
    }

    fn close_port(&self, port: Port, e: Entry<'_>) {
        if e.w(W_STATE).load(SeqCst) == INTERDOMAIN {
            let (rd, rp) = (e.w(W_RDOM).load(SeqCst), e.w(W_RPORT).load(SeqCst));
            if let Some(r) = self.table.entry(rd, rp) {
                // As in Xen, the peer's end reverts to unbound (bindable again by us).
                if r.w(W_STATE).load(SeqCst) == INTERDOMAIN
                    && r.w(W_RDOM).load(SeqCst) == u32::from(self.domid)
                    && r.w(W_RPORT).load(SeqCst) == port
                {
                    r.w(W_RPORT).store(0, SeqCst);
                    r.w(W_STATE).store(UNBOUND, SeqCst);
                }
            }
        }
        e.w(W_STATE).store(FREE, SeqCst);
    }
}

impl EventChannel for SimEvtchn {
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        let _lock = self.table.lock()?;
        let r = self
            .table
            .entry(remote.into(), remote_port)
            .ok_or_else(|| evt_err("bind_interdomain", remote_port, libc::EINVAL))?;
        if r.w(W_STATE).load(SeqCst) == INTERDOMAIN && r.w(W_RDOM).load(SeqCst) == u32::from(self.domid) {
            self.reap_dead_peer(r, remote_port);
        }
        if r.w(W_STATE).load(SeqCst) != UNBOUND || r.w(W_RDOM).load(SeqCst) != u32::from(self.domid) {
            return Err(evt_err("bind_interdomain", remote_port, libc::EINVAL));
        }
        let (port, e) = self.free_port("bind_interdomain")?;
        e.w(W_RDOM).store(remote.into(), SeqCst);
        e.w(W_RPORT).store(remote_port, SeqCst);
        e.w(W_HANDLE).store(self.id, SeqCst);
        e.w(W_MASKED).store(0, SeqCst);
        // Xen marks a freshly bound port pending, so the binder looks once at whatever the
        // peer prepared before the bind.
        e.w(W_PENDING).store(1, SeqCst);
        e.w(W_STATE).store(INTERDOMAIN, SeqCst);
        r.w(W_RPORT).store(port, SeqCst);
        r.w(W_STATE).store(INTERDOMAIN, SeqCst);
        self.kick(self.id, port);
        Ok(port)
    }

    fn alloc_unbound(&self, remote: DomId) -> Result<Port> {
        let _lock = self.table.lock()?;
        let (port, e) = self.free_port("alloc_unbound")?;
        e.w(W_RDOM).store(remote.into(), SeqCst);
        e.w(W_RPORT).store(0, SeqCst);
        e.w(W_HANDLE).store(self.id, SeqCst);
        e.w(W_PENDING).store(0, SeqCst);
        e.w(W_MASKED).store(0, SeqCst);
        e.w(W_STATE).store(UNBOUND, SeqCst);
        Ok(port)
    }

    fn unbind(&self, port: Port) -> Result<()> {
        let _lock = self.table.lock()?;
        let e = self.my(port, "unbind")?;
        self.close_port(port, e);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<()> {
        let e = self.my(port, "notify")?;
        if e.w(W_STATE).load(SeqCst) != INTERDOMAIN {
            // Xen accepts a notify on an unbound port and drops it.
            return Ok(());
        }
        let (rd, rp) = (e.w(W_RDOM).load(SeqCst), e.w(W_RPORT).load(SeqCst));
        let Some(r) = self.table.entry(rd, rp) else { return Ok(()) };
        if r.w(W_STATE).load(SeqCst) == INTERDOMAIN
            && r.w(W_RDOM).load(SeqCst) == u32::from(self.domid)
            && r.w(W_RPORT).load(SeqCst) == port
            && r.w(W_PENDING).swap(1, SeqCst) == 0
            && r.w(W_MASKED).load(SeqCst) == 0
        {
            self.kick(r.w(W_HANDLE).load(SeqCst), rp);
        }
        Ok(())
    }

    fn unmask(&self, port: Port) -> Result<()> {
        let e = self.my(port, "unmask")?;
        e.w(W_MASKED).store(0, SeqCst);
        if e.w(W_PENDING).load(SeqCst) == 1 {
            self.kick(self.id, port);
        }
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut ready = self.ready.lock().map_err(|_| Error::Sim("evtchn queue poisoned".into()))?;
        loop {
            let mut buf = [0u8; 4];
            while let Ok(n) = self.sock.recv(&mut buf) {
                if n != 4 {
                    continue;
                }
                let port = u32::from_ne_bytes(buf);
                if let Ok(e) = self.my(port, "deliver") {
                    // Mask first, then clear pending: a notify racing with us either sees the
                    // mask (and unmask re-kicks) or is merged into this delivery.
                    e.w(W_MASKED).store(1, SeqCst);
                    e.w(W_PENDING).store(0, SeqCst);
                    ready.push_back(port);
                }
            }
            if let Some(p) = ready.pop_front() {
                return Ok(Some(p));
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            match poll_with(self.sock.as_fd(), &self.wake, ms) {
                Ok(PollOutcome::Woken) => return Ok(None),
                Ok(_) => {}
                Err(source) => return Err(Error::Evtchn { op: "wait", port: 0, source }),
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn interrupt(&self) {
        self.wake.wake();
    }
}

impl Drop for SimEvtchn {
    fn drop(&mut self) {
        if let Ok(_lock) = self.table.lock() {
            for port in 1..MAX_PORTS as u32 {
                if let Ok(e) = self.my(port, "close") {
                    self.close_port(port, e);
                }
            }
        }
        let _ = std::fs::remove_file(&self.sock_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xvtpm-evt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        create_table(&d).expect("table");
        d
    }

    const T: Option<Duration> = Some(Duration::from_secs(5));
    const SHORT: Option<Duration> = Some(Duration::from_millis(50));

    #[test]
    fn bind_notify_mask_unmask() {
        let r = root("basic");
        let fe = SimEvtchn::open(&r, 3).expect("fe");
        let be = SimEvtchn::open(&r, 0).expect("be");
        let fp = fe.alloc_unbound(0).expect("alloc");
        // Only the named domain may bind.
        let other = SimEvtchn::open(&r, 4).expect("other");
        assert!(other.bind_interdomain(3, fp).is_err());
        assert!(be.bind_interdomain(3, 999).is_err());
        let bp = be.bind_interdomain(3, fp).expect("bind");
        // The fresh bind is pending once.
        assert_eq!(be.wait(T).expect("wait"), Some(bp));
        be.unmask(bp).expect("unmask");
        assert_eq!(be.wait(SHORT).expect("wait"), None);
        // A storm while masked is one delivery.
        fe.notify(fp).expect("notify");
        assert_eq!(be.wait(T).expect("wait"), Some(bp));
        for _ in 0..1000 {
            fe.notify(fp).expect("notify");
        }
        assert_eq!(be.wait(SHORT).expect("wait"), None, "masked");
        be.unmask(bp).expect("unmask");
        assert_eq!(be.wait(T).expect("wait"), Some(bp), "pending delivered at unmask");
        be.unmask(bp).expect("unmask");
        assert_eq!(be.wait(SHORT).expect("wait"), None, "storm coalesced");
        be.notify(bp).expect("notify");
        assert_eq!(fe.wait(T).expect("wait"), Some(fp));
        // Someone else's port cannot be used.
        assert!(other.notify(fp).is_err());
        let _ = std::fs::remove_dir_all(&r);
    }

    #[test]
    fn an_interrupt_ends_a_wait_without_timeout_and_events_still_arrive() {
        let r = root("interrupt");
        let fe = SimEvtchn::open(&r, 3).expect("fe");
        let be = std::sync::Arc::new(SimEvtchn::open(&r, 0).expect("be"));
        let fp = fe.alloc_unbound(0).expect("alloc");
        let bp = be.bind_interdomain(3, fp).expect("bind");
        assert_eq!(be.wait(T).expect("wait"), Some(bp), "the fresh bind's delivery");
        be.unmask(bp).expect("unmask");
        let b = be.clone();
        let waiting = std::thread::spawn(move || b.wait(None));
        std::thread::sleep(SHORT.unwrap_or_default());
        be.interrupt();
        assert_eq!(waiting.join().expect("thread").expect("wait"), None);
        // Taken: the next wait sees the port that fires, not the old interrupt.
        fe.notify(fp).expect("notify");
        assert_eq!(be.wait(T).expect("wait"), Some(bp));
        let _ = std::fs::remove_dir_all(&r);
    }

    #[test]
    fn unbind_reverts_peer_and_rebind_works() {
        let r = root("rebind");
        let fe = SimEvtchn::open(&r, 3).expect("fe");
        let fp = fe.alloc_unbound(0).expect("alloc");
        {
            let be = SimEvtchn::open(&r, 0).expect("be");
            be.bind_interdomain(3, fp).expect("bind");
        }
        // The backend handle is gone: the frontend's port is bindable again.
        let be = SimEvtchn::open(&r, 0).expect("be2");
        let bp = be.bind_interdomain(3, fp).expect("rebind");
        assert_eq!(be.wait(T).expect("wait"), Some(bp));
        be.unmask(bp).expect("unmask");
        fe.notify(fp).expect("notify");
        assert_eq!(be.wait(T).expect("wait"), Some(bp));
        fe.unbind(fp).expect("unbind");
        assert!(fe.notify(fp).is_err());
        let _ = std::fs::remove_dir_all(&r);
    }
}
