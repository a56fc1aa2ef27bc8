//! Serving an HVM guest's TPM window: guest accesses from Xen's ioreq server go to the
//! [`TisDevice`]; commands run on a thread of their own, so the vCPU that sent one resumes at
//! once and polls `TPM_STS` until the response is there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use xvtpm_tis::mmio::TPM_BASE;
use xvtpm_xen::ioreq::{IoRequest, IoreqServer, TYPE_COPY};

use super::tis::{Action, TisDevice};
use crate::engine::Canceller;

/// Runs one command: locality and command in, response out.
pub type Execute = Box<dyn FnMut(u8, &[u8]) -> Vec<u8> + Send>;

/// One command for the executing thread.
struct Job {
    seq: u64,
    locality: u8,
    command: Vec<u8>,
}

/// What the serving loop needs besides the guest's accesses.
pub struct TisServer {
    device: Arc<Mutex<TisDevice>>,
    jobs: mpsc::Sender<Job>,
    cancel: Canceller,
    reset_established: Box<dyn FnMut(u8) + Send>,
    worker: Option<std::thread::JoinHandle<()>>,
    warned_ptr: bool,
}

impl std::fmt::Debug for TisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TisServer").field("device", &self.device).finish_non_exhaustive()
    }
}

impl TisServer {
    /// A device whose commands `execute` runs on a thread of its own; `cancel` stops the one
    /// running; `reset_established` handles TPM_STS.resetEstablishmentBit.
    pub fn new(
        device: TisDevice,
        mut execute: Execute,
        cancel: Canceller,
        reset_established: Box<dyn FnMut(u8) + Send>,
    ) -> std::io::Result<Self> {
        let device = Arc::new(Mutex::new(device));
        let (jobs, rx) = mpsc::channel::<Job>();
        let d = device.clone();
        let worker = std::thread::Builder::new().name("tpm".into()).spawn(move || {
            for job in rx {
                let response = execute(job.locality, &job.command);
                let mut dev = d.lock().unwrap_or_else(PoisonError::into_inner);
                if !dev.complete(job.seq, response) {
                    log::debug!("command {} was aborted by the guest; its response is dropped", job.seq);
                }
            }
        })?;
        Ok(TisServer { device, jobs, cancel, reset_established, worker: Some(worker), warned_ptr: false })
    }

    /// The device (for tests and for state saves).
    pub fn device(&self) -> &Arc<Mutex<TisDevice>> {
        &self.device
    }

    /// Answers one guest access; the value read (all ones for what is not ours).
    pub fn access(&mut self, req: &IoRequest) -> u64 {
        if req.kind != TYPE_COPY {
            // Broadcasts every server gets (such as a map cache invalidation): nothing to do.
            return 0;
        }
        if req.data_is_ptr {
            // String instructions with guest memory as the other operand: no TPM driver uses
            // them on these registers, and serving them would mean mapping guest memory.
            if !self.warned_ptr {
                log::warn!(
                    "domain's vCPU {} used a string instruction on the TPM's registers ({:#x}); ignored",
                    req.vcpu,
                    req.addr
                );
                self.warned_ptr = true;
            }
            return u64::MAX;
        }
        let Some(offset) = req.addr.checked_sub(TPM_BASE) else { return u64::MAX };
        let mut dev = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        if req.read {
            return dev.read(offset, req.size) & req.mask();
        }
        // `rep stos`: the same value at each step.
        let step = u64::from(req.size.clamp(1, 8));
        for i in 0..u64::from(req.count.clamp(1, 4096)) {
            let at = if req.df { offset.wrapping_sub(i * step) } else { offset.wrapping_add(i * step) };
            match dev.write(at, req.size, req.data & req.mask()) {
                Action::None => {}
                Action::Execute { seq, locality, command } => {
                    if self.jobs.send(Job { seq, locality, command }).is_err() {
                        log::error!("the TPM's thread is gone; command {seq} is not executed");
                    }
                }
                Action::Cancel => (self.cancel)(),
                Action::ResetEstablishment { locality } => (self.reset_established)(locality),
            }
        }
        0
    }

    /// Serves `server`'s requests until `stop` is set (and the server interrupted) or the
    /// server fails.
    pub fn run(&mut self, server: &dyn IoreqServer, stop: &AtomicBool) -> xvtpm_xen::Result<()> {
        let mut first = true;
        while !stop.load(Ordering::SeqCst) {
            let Some(req) = server.next(None)? else { continue };
            if first {
                log::info!("domain {}: first access to the TPM's registers: {req:x?}", server.domid());
                first = false;
            }
            let data = self.access(&req);
            server.complete(&req, data)?;
        }
        Ok(())
    }
}

impl Drop for TisServer {
    fn drop(&mut self) {
        (self.cancel)();
        // Closing the channel ends the thread after the command it runs.
        let (dead, _) = mpsc::channel();
        self.jobs = dead;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
