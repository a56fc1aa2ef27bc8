//! The per-device thread: waits on the device's event channel and serves its shared page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use xvtpm_xen::tpmif::{Tpmif, TpmifState};
use xvtpm_xen::{EventChannel, Port, SharedPage};

use crate::handler::{CancelProbe, CommandHandler, DeviceInfo, Request};

/// How often a waiting worker checks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(50);

/// A protocol violation that ends the device's connection, reported to the main loop.
#[derive(Debug)]
pub(crate) struct Fatal {
    pub key: (u16, u32),
    pub generation: u64,
    pub reason: String,
}

/// A connected device: shared page, event channel, serving thread.
#[derive(Debug)]
pub(crate) struct Connection {
    pub ring_ref: u32,
    pub remote_port: u32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub(crate) struct Worker {
    pub info: DeviceInfo,
    pub generation: u64,
    pub page: Arc<SharedPage>,
    pub evtchn: Box<dyn EventChannel>,
    pub port: Port,
    pub handler: Arc<dyn CommandHandler>,
    pub fatal: Sender<Fatal>,
}

impl Connection {
    pub fn start(worker: Worker, ring_ref: u32, remote_port: u32) -> std::io::Result<Connection> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let name = format!("vtpm-{}-{}", worker.info.frontend, worker.info.handle);
        let thread = std::thread::Builder::new().name(name).spawn(move || worker.run(&s))?;
        Ok(Connection { ring_ref, remote_port, stop, thread: Some(thread) })
    }

    /// Stops the thread (after the command in progress, if any) and releases page and port.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a vtpm device thread panicked");
            }
        }
    }
}

impl Worker {
    fn run(self, stop: &AtomicBool) {
        self.handler.connected(&self.info);
        let cancel = CancelProbe::new(self.page.clone());
        let mut buf = Vec::with_capacity(xvtpm_xen::tpmif::MAX_PACKET);
        let mut last_bad_state = None;
        // The stock Linux frontend submits its first command before we are Connected: look at
        // the page at once instead of waiting for a notification that may predate our bind.
        let mut ok = self.serve(&cancel, &mut buf, &mut last_bad_state);
        while ok && !stop.load(Ordering::SeqCst) {
            match self.evtchn.wait(Some(STOP_POLL)) {
                Ok(None) => continue,
                Ok(Some(p)) => {
                    if let Err(e) = self.evtchn.unmask(p) {
                        self.fail(format!("cannot unmask event channel port {p}: {e}"));
                        break;
                    }
                    ok = self.serve(&cancel, &mut buf, &mut last_bad_state);
                }
                Err(e) => {
                    self.fail(format!("event channel wait failed: {e}"));
                    break;
                }
            }
        }
        if let Err(e) = self.evtchn.unbind(self.port) {
            log::debug!("{}: unbind port {}: {e}", self.info, self.port);
        }
        self.handler.disconnected(&self.info);
    }

    fn fail(&self, reason: String) {
        let _ =
            self.fatal.send(Fatal { key: (self.info.frontend, self.info.handle), generation: self.generation, reason });
    }

    fn notify(&self) -> bool {
        match self.evtchn.notify(self.port) {
            Ok(()) => true,
            Err(e) => {
                self.fail(format!("cannot notify event channel port {}: {e}", self.port));
                false
            }
        }
    }

    /// Serves what the page holds; false once the connection must end.
    fn serve(&self, cancel: &CancelProbe, buf: &mut Vec<u8>, last_bad_state: &mut Option<u8>) -> bool {
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
        match state {
            TpmifState::Idle | TpmifState::Finish => true,
            TpmifState::Cancel => {
                // Nothing is running: acknowledge the cancel at once.
                t.set_state(TpmifState::Idle).is_ok() && self.notify()
            }
            TpmifState::Submit => {
                let locality = match t.read_packet(buf).and_then(|_| t.locality()) {
                    Ok(l) => l,
                    Err(e) => {
                        self.fail(format!("bad request in shared page: {e}"));
                        return false;
                    }
                };
                let max_response = t.packet_window().map(|(_, room)| room).unwrap_or(0);
                let req = Request { device: &self.info, locality, command: buf, max_response, cancel };
                let response = self.handler.handle(&req);
                let outcome = if cancel.is_cancelled() {
                    log::debug!("{}: command cancelled by the frontend", self.info);
                    t.set_state(TpmifState::Idle)
                } else {
                    match t.write_packet(&response) {
                        Ok(()) => t.set_state(TpmifState::Finish),
                        Err(e) => {
                            log::error!("{}: response not delivered: {e}", self.info);
                            t.set_state(TpmifState::Idle)
                        }
                    }
                };
                if let Err(e) = outcome {
                    self.fail(format!("cannot write the shared page: {e}"));
                    return false;
                }
                self.notify()
            }
        }
    }
}
