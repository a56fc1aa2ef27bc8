//! Serving one device's shared page: a turn reads what the frontend submitted, hands it to the
//! handler and writes the response. [`crate::pool::Dispatcher`] decides which thread runs it.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use xvtpm_xen::tpmif::{Tpmif, TpmifState};
use xvtpm_xen::xenstore::Waker;
use xvtpm_xen::{EventChannel, Port, SharedPage};

use crate::handler::{CancelProbe, CommandHandler, DeviceInfo, Request};
use crate::pool::Dispatcher;
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

/// A connected device as the main loop holds it: its ring and port, and its slot in the
/// dispatcher.
#[derive(Debug)]
pub(crate) struct Connection {
    pub ring_ref: u32,
    pub remote_port: u32,
    slot: Arc<Slot>,
    dispatcher: Arc<Dispatcher>,
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

/// A device the dispatcher serves: its worker, stop signal, and what its serving keeps from
/// one turn to the next.
pub(crate) struct Slot {
    worker: Worker,
    stop: Arc<Stop>,
    cancel: CancelProbe,
    /// Queued or being served, and whether it fired again meanwhile.
    sched: Mutex<Sched>,
    /// Held by the one thread serving it.
    turn: Mutex<Turn>,
}

#[derive(Debug, Default)]
struct Sched {
    pending: bool,
    again: bool,
}

#[derive(Debug, Default)]
struct Turn {
    buf: Vec<u8>,
    last_bad_state: Option<u8>,
    connected: bool,
    /// The connection ended (a protocol error, or stopped): nothing more is served.
    over: bool,
    disconnected: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("device", &self.worker.info).field("port", &self.worker.port).finish()
    }
}

impl Connection {
    /// Serves the device through `dispatcher` from now on; its port must be bound to the
    /// dispatcher's handle.
    pub fn start(dispatcher: &Arc<Dispatcher>, worker: Worker, ring_ref: u32, remote_port: u32) -> Connection {
        let stop = Arc::new(Stop::default());
        let cancel = CancelProbe::new(worker.page.clone(), stop.clone());
        let slot = Arc::new(Slot { worker, stop, cancel, sched: Mutex::default(), turn: Mutex::default() });
        dispatcher.add(slot.clone());
        Connection { ring_ref, remote_port, slot, dispatcher: dispatcher.clone() }
    }

    /// Stops serving at once: the port is closed now (so a new connection can bind the
    /// frontend's port again); a command in progress finishes but its response is never
    /// written, and the page is unmapped once nothing holds it. It never waits for the
    /// handler.
    pub fn stop(self) {
        self.slot.stop.set();
        self.dispatcher.remove(&self.slot);
    }
}

impl Slot {
    pub fn port(&self) -> Port {
        self.worker.port
    }

    /// Marks it to be served; `false` if it is queued or being served already (it is served
    /// once more after that).
    pub fn mark_runnable(&self) -> bool {
        let mut s = self.sched.lock().unwrap_or_else(PoisonError::into_inner);
        if s.pending {
            s.again = true;
            return false;
        }
        s.pending = true;
        true
    }

    /// One turn: serves what the page holds, again while it fired meanwhile. The first turn
    /// tells the handler of the connection, the first after the end that it is gone.
    pub fn run(&self) {
        loop {
            {
                let mut turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
                let t = &mut *turn;
                if !t.connected {
                    t.connected = true;
                    self.worker.handler.connected(&self.worker.info);
                }
                if self.stop.is_set() {
                    t.over = true;
                    if !t.disconnected {
                        t.disconnected = true;
                        self.worker.handler.disconnected(&self.worker.info);
                    }
                } else if !t.over {
                    t.over = !self.worker.serve(&self.stop, &self.cancel, &mut t.buf, &mut t.last_bad_state);
                }
            }
            let mut s = self.sched.lock().unwrap_or_else(PoisonError::into_inner);
            if s.again {
                s.again = false;
            } else {
                s.pending = false;
                return;
            }
        }
    }

    /// The device broke the protocol, or its port did: the main loop closes it.
    pub fn fail(&self, reason: String) {
        self.worker.fail(&self.stop, reason);
    }
}

impl Worker {
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
