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

use crate::{DomId, Error, EventChannel, GrantAllocator, GrantMapper, Result, Xen, Xenstore};

/// The xenstored socket of a simulation directory.
pub fn xenstored_socket(dir: &Path) -> PathBuf {
    dir.join("xenstored.sock")
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
}

impl Drop for SimHost {
    fn drop(&mut self) {
        drop(self.xenstored.take());
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
