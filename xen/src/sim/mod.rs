//! A simulated Xen for tests: xenstored, grant table and event channels that work across
//! processes sharing one directory (on tmpfs where available).
//!
//! [`SimHost`] creates a simulation and runs its xenstored; any process (the host itself or a
//! child) then acts as a domain with [`SimXen::new`]`(dir, domid)`, which implements
//! [`crate::Xen`] like the real interfaces do.

pub mod evtchn;
pub mod grant;
/// Kept here too: the simulation's tests and demo set devices up through it.
pub use crate::toolstack;
pub mod xenstored;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{
    xenbus, DomId, DomainInfo, Error, EventChannel, GrantAllocator, GrantMapper, Result, ShutdownReason, TxId, Xen,
    Xenstore,
};

/// The xenstored socket of a simulation directory.
pub fn xenstored_socket(dir: &Path) -> PathBuf {
    dir.join("xenstored.sock")
}

/// Where the simulated hypervisor keeps what it says of domain `domid` when it is not simply
/// running: `XEN_DOMINF_*` flags, in decimal.
fn domain_file(dir: &Path, domid: DomId) -> PathBuf {
    dir.join("domains").join(domid.to_string())
}

/// One domain's view of a simulated Xen.
#[derive(Debug, Clone)]
pub struct SimXen {
    dir: PathBuf,
    domid: DomId,
}

impl SimXen {
    /// Acts as domain `domid` in the simulation at `dir` (made by a [`SimHost`]).
    pub fn new(dir: impl Into<PathBuf>, domid: DomId) -> Self {
        SimXen { dir: dir.into(), domid }
    }

    /// The simulation directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Xen for SimXen {
    fn domid(&self) -> DomId {
        self.domid
    }

    fn xenstore(&self) -> Result<Xenstore> {
        xenstored::connect(&xenstored_socket(&self.dir), self.domid)
    }

    fn evtchn(&self) -> Result<Box<dyn EventChannel>> {
        Ok(Box::new(evtchn::SimEvtchn::open(&self.dir, self.domid)?))
    }

    fn grant_mapper(&self) -> Result<Box<dyn GrantMapper>> {
        Ok(Box::new(grant::SimGntdev::new(&self.dir, self.domid)))
    }

    fn grant_allocator(&self) -> Result<Box<dyn GrantAllocator>> {
        Ok(Box::new(grant::SimGntalloc::new(&self.dir, self.domid)))
    }

    /// As the real one, only dom0 may ask. A domain the simulated hypervisor has no record of
    /// runs if xenstore has its home, and is gone otherwise.
    fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>> {
        if self.domid != 0 {
            return Err(Error::Sim(format!("domain {} may not ask about domain {domid} (EPERM)", self.domid)));
        }
        let path = domain_file(&self.dir, domid);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let flags = s.trim().parse().map_err(|_| Error::Sim(format!("{}: bad flags {s:?}", path.display())))?;
                Ok(Some(DomainInfo::from_flags(flags)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let home = self.xenstore()?.try_read(TxId::NONE, &format!("{}/domid", xenbus::domain_path(domid)))?;
                Ok(home.map(|_| DomainInfo::RUNNING))
            }
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }
}

/// A running simulation: its directory, event channel table and xenstored. Dropping it stops
/// xenstored and, if it made the directory itself, removes it.
#[derive(Debug)]
pub struct SimHost {
    dir: PathBuf,
    xenstored: Option<xenstored::SimXenstored>,
    owns_dir: bool,
}

impl SimHost {
    /// Starts a simulation in `dir` (created if missing).
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        evtchn::create_table(&dir)?;
        let xenstored = xenstored::SimXenstored::start(&xenstored_socket(&dir))?;
        let host = SimHost { dir, xenstored: Some(xenstored), owns_dir: false };
        toolstack::init_dom0(&host.xen(0).xenstore()?)?;
        Ok(host)
    }

    /// Starts a simulation in a fresh directory under `/dev/shm` (or the temp dir), removed
    /// on drop.
    pub fn temp() -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("xvtpm-sim-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        let mut host = SimHost::create(dir)?;
        host.owns_dir = true;
        Ok(host)
    }

    /// The simulation directory, to hand to other processes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Domain `domid`'s view of this simulation.
    pub fn xen(&self, domid: DomId) -> SimXen {
        SimXen::new(&self.dir, domid)
    }

    /// Domain `domid` shuts down for `reason`, as its kernel's `SCHEDOP_shutdown` does (for
    /// an `xl save`, `reason` is a suspend): the hypervisor records it, and xenstored fires
    /// `@releaseDomain`.
    pub fn shut_down(&self, domid: DomId, reason: ShutdownReason) -> Result<()> {
        self.set_domain(domid, Some(DomainInfo { shutdown: Some(reason), dying: false }))
    }

    /// Domain `domid` runs again after a suspend (a checkpoint, `xl save -c`, or a cancelled
    /// suspend); or a new domain takes a released domain's id.
    pub fn resume_domain(&self, domid: DomId) -> Result<()> {
        self.set_domain(domid, None)
    }

    fn set_domain(&self, domid: DomId, info: Option<DomainInfo>) -> Result<()> {
        let path = domain_file(&self.dir, domid);
        let done = match info {
            Some(info) => std::fs::create_dir_all(self.dir.join("domains"))
                .and_then(|()| std::fs::write(&path, info.to_flags().to_string())),
            None => std::fs::remove_file(&path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
        };
        done.map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        // A shutdown is news to xenstored's watchers (it hears of it from the hypervisor's
        // VIRQ_DOM_EXC); a resume is not.
        if info.is_some() {
            self.xen(0).xenstore()?.release_domain(domid)?;
        }
        Ok(())
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        drop(self.xenstored.take());
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
