//! The per-device thread: waits on the device's event channel and serves its shared page.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use xvtpm_xen::tpmif::{Tpmif, TpmifState};
use xvtpm_xen::xenstore::Waker;
use xvtpm_xen::{EventChannel, Port, SharedPage};

use crate::handler::{CancelProbe, CommandHandler, DeviceInfo, Request};
use crate::stop::Stop;

/// A protocol violation that ends the device's connection, reported to the main loop.
#[derive(Debug)]
pub(crate) struct Fatal {
    pub key: (u16, u32),
    pub generation: u64,
    pub reason: String,
}

/// Where device threads report a [`Fatal`]: the main loop's queue, and a wake-up for it.
#[derive(Debug, Clone)]
pub(crate) struct FatalTx {
    tx: Sender<Fatal>,
    wake: Waker,
}

impl FatalTx {
    pub fn new(tx: Sender<Fatal>, wake: Waker) -> Self {
        FatalTx { tx, wake }
    }

    fn send(&self, f: Fatal) {
        if self.tx.send(f).is_ok() {
            self.wake.wake();
        }
    }
}

/// A connected device: shared page, event channel, serving thread.
#[derive(Debug)]
pub(crate) struct Connection {
    pub ring_ref: u32,
    pub remote_port: u32,
    stop: Arc<Stop>,
    evtchn: Arc<dyn EventChannel>,
    port: Port,
}

pub(crate) struct Worker {
    pub info: DeviceInfo,
    pub generation: u64,
    pub page: Arc<SharedPage>,
    pub evtchn: Arc<dyn EventChannel>,
    pub port: Port,
    pub handler: Arc<dyn CommandHandler>,
    pub fatal: FatalTx,
}

impl Connection {
    pub fn start(worker: Worker, ring_ref: u32, remote_port: u32) -> std::io::Result<Connection> {
        let stop = Arc::new(Stop::default());
        let s = stop.clone();
        let (evtchn, port) = (worker.evtchn.clone(), worker.port);
        let name = format!("vtpm-{}-{}", worker.info.frontend, worker.info.handle);
        // Detached: stopping a device never waits for a command in progress.
        std::thread::Builder::new().name(name).spawn(move || worker.run(s))?;
        Ok(Connection { ring_ref, remote_port, stop, evtchn, port })
    }

    /// Stops serving at once: the port is closed now (so a new connection can bind the
    /// frontend's port again), the thread ends when its current command returns and unmaps
    /// the page then. It never waits for the handler.
    pub fn stop(self) {
        self.stop.set();
        // The worker waits without a timeout.
        self.evtchn.interrupt();
        if let Err(e) = self.evtchn.unbind(self.port) {
            log::debug!("unbind port {}: {e}", self.port);
        }
    }
}

impl Worker {
    fn run(self, stop: Arc<Stop>) {
        self.handler.connected(&self.info);
        let cancel = CancelProbe::new(self.page.clone(), stop.clone());
        let mut buf = Vec::with_capacity(xvtpm_xen::tpmif::MAX_PACKET);
        let mut last_bad_state = None;
        // The stock Linux frontend submits its first command before we are Connected: look at
        // the page at once instead of waiting for a notification that may predate our bind.
        let mut ok = self.serve(&stop, &cancel, &mut buf, &mut last_bad_state);
        while ok && !stop.is_set() {
            match self.evtchn.wait(None) {
                Ok(None) => continue,
                Ok(Some(p)) => {
                    if let Err(e) = self.evtchn.unmask(p) {
                        self.fail(&stop, format!("cannot unmask event channel port {p}: {e}"));
                        break;
                    }
                    ok = self.serve(&stop, &cancel, &mut buf, &mut last_bad_state);
                }
                Err(e) => {
                    self.fail(&stop, format!("event channel wait failed: {e}"));
                    break;
                }
            }
        }
        self.handler.disconnected(&self.info);
    }

    fn fail(&self, stop: &Stop, reason: String) {
        // After a stop, errors (e.g. of the port the main loop closed) are expected.
        if stop.is_set() {
            return;
        }
        self.fatal.send(Fatal { key: (self.info.frontend, self.info.handle), generation: self.generation, reason });
    }

    fn notify(&self, stop: &Stop) -> bool {
        match self.evtchn.notify(self.port) {
            Ok(()) => true,
            Err(e) => {
                self.fail(stop, format!("cannot notify event channel port {}: {e}", self.port));
                false
            }
        }
    }

    /// Serves what the page holds; false once the connection must end.
    fn serve(&self, stop: &Stop, cancel: &CancelProbe, buf: &mut Vec<u8>, last_bad_state: &mut Option<u8>) -> bool {
        let t = Tpmif::new(&self.page);
        let state = match t.state() {
            Ok(s) => s,
            Err(_) => {
                // A hostile frontend can write anything; say so once per distinct value, not
                // once per notification.
                let raw = t.raw_state().unwrap_or(0xff);
                if *last_bad_state != Some(raw) {
                    log::warn!("{}: ignoring invalid shared-page state value {raw}", self.info);
                    *last_bad_state = Some(raw);
                }
                return true;
            }
        };
        *last_bad_state = None;
        let response = match state {
            TpmifState::Idle | TpmifState::Finish => return true,
            // Nothing is running: acknowledge the cancel at once.
            TpmifState::Cancel => None,
            TpmifState::Submit => {
                let locality = match t.read_packet(buf).and_then(|_| t.locality()) {
                    Ok(l) => l,
                    Err(e) => {
                        self.fail(stop, format!("bad request in shared page: {e}"));
                        return false;
                    }
                };
                let max_response = t.packet_window().map(|(_, room)| room).unwrap_or(0);
                let req = Request { device: &self.info, locality, command: buf, max_response, cancel };
                Some(self.handler.handle(&req))
            }
        };
        // Hold the write lock while touching the page, so a stop cannot interleave.
        let Some(_guard) = stop.write_guard() else { return false };
        if stop.is_set() {
            return false;
        }
        let outcome = match response {
            Some(_) if cancel.is_cancelled() => {
                log::debug!("{}: command cancelled by the frontend", self.info);
                t.set_state(TpmifState::Idle)
            }
            Some(rsp) => match t.write_packet(&rsp) {
                Ok(()) => t.set_state(TpmifState::Finish),
                Err(e) => {
                    log::error!("{}: response not delivered: {e}", self.info);
                    t.set_state(TpmifState::Idle)
                }
            },
            None => t.set_state(TpmifState::Idle),
        };
        if let Err(e) = outcome {
            self.fail(stop, format!("cannot write the shared page: {e}"));
            return false;
        }
        self.notify(stop)
    }
}
