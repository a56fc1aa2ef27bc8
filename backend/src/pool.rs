//! Serving connected devices on a bounded set of threads: one thread waits on the event channel
//! handle every device's port is bound to, and hands a device that fired to one of a few
//! workers (or serves it itself, for a backend of one device). A device is queued at most once
//! and served by one thread at a time; the queue is first come, first served, so a device that
//! fires all the time still waits its turn behind the others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use xvtpm_xen::{EventChannel, Port};

use crate::worker::Slot;

/// How many workers a backend serving every device of its domain runs.
pub(crate) const WORKERS: usize = 4;

/// The event channel handle, the devices bound to it, and the queue of devices to serve.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    evtchn: Arc<dyn EventChannel>,
    ports: Mutex<HashMap<Port, Arc<Slot>>>,
    queue: Mutex<VecDeque<Arc<Slot>>>,
    ready: Condvar,
    /// No workers: the waiting thread serves (one device, one thread, as before). Other
    /// threads queue the device and interrupt the wait, so the caller (the xenstore loop)
    /// never runs a handler.
    inline: bool,
    stopping: AtomicBool,
}

impl Dispatcher {
    /// Starts the waiting thread and `workers` workers (0: serve on the waiting thread).
    pub fn start(evtchn: Arc<dyn EventChannel>, workers: usize) -> std::io::Result<Arc<Dispatcher>> {
        let d = Arc::new(Dispatcher {
            evtchn,
            ports: Mutex::default(),
            queue: Mutex::default(),
            ready: Condvar::new(),
            inline: workers == 0,
            stopping: AtomicBool::new(false),
        });
        let w = d.clone();
        std::thread::Builder::new().name("vtpm-events".into()).spawn(move || w.wait_loop())?;
        for i in 0..workers {
            let w = d.clone();
            std::thread::Builder::new().name(format!("vtpm-worker-{i}")).spawn(move || w.work_loop())?;
        }
        Ok(d)
    }

    /// The handle every device's port is bound to.
    pub fn evtchn(&self) -> &Arc<dyn EventChannel> {
        &self.evtchn
    }

    /// Serves `slot` from now on (at once, too: the frontend may have submitted already).
    pub fn add(&self, slot: Arc<Slot>) {
        self.ports.lock().unwrap_or_else(PoisonError::into_inner).insert(slot.port(), slot.clone());
        self.schedule(&slot);
    }

    /// Stops serving `slot`: its port is closed now; the thread that serves it next tells the
    /// handler it is gone.
    pub fn remove(&self, slot: &Arc<Slot>) {
        let port = slot.port();
        {
            let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
            if ports.get(&port).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                ports.remove(&port);
            }
        }
        if let Err(e) = self.evtchn.unbind(port) {
            log::debug!("unbind port {port}: {e}");
        }
        self.schedule(slot);
    }

    /// Ends the threads once the devices queued (those just stopped among them) have had their
    /// turn; a device being served finishes its command first.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.evtchn.interrupt();
        let _q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.ready.notify_all();
    }

    /// Queues `slot` for its turn, from any thread.
    fn schedule(&self, slot: &Arc<Slot>) {
        if !slot.mark_runnable() {
            return;
        }
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).push_back(slot.clone());
        if self.inline {
            self.evtchn.interrupt();
        } else {
            self.ready.notify_one();
        }
    }

    fn pop(&self) -> Option<Arc<Slot>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).pop_front()
    }

    fn wait_loop(&self) {
        loop {
            if self.inline {
                while let Some(s) = self.pop() {
                    s.run();
                }
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            match self.evtchn.wait(None) {
                Ok(None) => {}
                Ok(Some(port)) => {
                    let slot = self.ports.lock().unwrap_or_else(PoisonError::into_inner).get(&port).cloned();
                    match (self.evtchn.unmask(port), slot) {
                        (Ok(()), Some(s)) if self.inline => {
                            if s.mark_runnable() {
                                s.run();
                            }
                        }
                        (Ok(()), Some(s)) => self.schedule(&s),
                        (Err(e), Some(s)) => s.fail(format!("cannot unmask event channel port {port}: {e}")),
                        // A port closed a moment ago.
                        (_, None) => {}
                    }
                }
                Err(e) => {
                    // Every device shares this handle. Firings may have been dropped with the
                    // error (Linux resets an overflowing queue): re-enable every port and look
                    // at every page once (harmless when nothing is there), then wait a moment
                    // so a lasting error does not spin.
                    log::error!("event channel wait failed: {e}; looking at every device again");
                    let slots: Vec<_> =
                        self.ports.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
                    for s in slots {
                        let _ = self.evtchn.unmask(s.port());
                        self.schedule(&s);
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    fn work_loop(&self) {
        loop {
            let slot = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    // What was queued before the stop still gets its turn (a stopped device's
                    // handler hears it is gone).
                    if let Some(s) = q.pop_front() {
                        break s;
                    }
                    if self.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            slot.run();
        }
    }
}
