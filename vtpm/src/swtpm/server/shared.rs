//! What the server's threads share: the engine and its settings ([`Shared`]), the hand-over
//! of data connections, and the termination and wake-up signals ([`Control`], [`Stopper`]).

use super::*;

/// A data connection waiting to be served.
#[derive(Debug)]
pub(super) struct DataConn {
    pub(super) stream: Stream,
    pub(super) peer: String,
    /// Keep the connection across responses (always for SET_DATAFD connections).
    pub(super) keep: bool,
}

/// Hands data connections to the data thread, one at a time.
#[derive(Debug, Default)]
pub(super) struct Handoff {
    /// From CMD_SET_DATAFD; served first.
    pub(super) datafd: Option<DataConn>,
    /// From the data listener.
    pub(super) accepted: Option<DataConn>,
    /// A data connection is being served.
    pub(super) active: bool,
}

/// What the threads and a [`Stopper`] share, apart from the engine.
#[derive(Debug)]
pub(super) struct Control {
    pub(super) terminating: AtomicBool,
    pub(super) handoff: Mutex<Handoff>,
    pub(super) handoff_cv: Condvar,
    /// Clones of the connections being served, to unblock their threads on termination.
    pub(super) active_data: Mutex<Option<Stream>>,
    pub(super) active_ctrl: Mutex<Option<Stream>>,
    /// A byte on `wake_tx` ends the main loop's `poll` so that it looks at the handoff and the
    /// termination flag again; `wake_rx` is the end it polls (non-blocking).
    pub(super) wake_tx: UnixStream,
    pub(super) wake_rx: UnixStream,
}

impl Control {
    pub(super) fn new() -> Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| Error::io("make the server's wake-up socket", e))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true).map_err(|e| Error::io("make the server's wake-up socket", e))?;
        }
        Ok(Self {
            terminating: AtomicBool::new(false),
            handoff: Mutex::new(Handoff::default()),
            handoff_cv: Condvar::new(),
            active_data: Mutex::new(None),
            active_ctrl: Mutex::new(None),
            wake_tx,
            wake_rx,
        })
    }

    pub(super) fn terminating(&self) -> bool {
        self.terminating.load(Ordering::SeqCst)
    }

    pub(super) fn terminate(&self) {
        self.terminating.store(true, Ordering::SeqCst);
        drop(lock(&self.handoff));
        self.handoff_cv.notify_all();
        for s in [&self.active_data, &self.active_ctrl] {
            if let Some(s) = lock(s).as_ref() {
                s.shutdown(Shutdown::Both);
            }
        }
        self.wake();
    }

    /// Makes the main loop look again. A full socket already holds a wake-up, so a failed
    /// write loses nothing.
    pub(super) fn wake(&self) {
        let _ = (&self.wake_tx).write(&[1]);
    }

    /// Empties the wake-up socket after the main loop woke.
    pub(super) fn drain_wakes(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Remembers a connection being served; false (and nothing remembered) if the server is
    /// already ending.
    pub(super) fn track(&self, slot: &Mutex<Option<Stream>>, s: &Stream) -> bool {
        *lock(slot) = s.try_clone().ok();
        if self.terminating() {
            *lock(slot) = None;
            return false;
        }
        true
    }
}

/// Ends a running [`SwtpmServer`] from another thread, as CMD_SHUTDOWN does.
#[derive(Debug, Clone)]
pub struct Stopper(pub(super) Arc<Control>);

impl Stopper {
    /// Makes `run` power the TPM off and return.
    pub fn stop(&self) {
        self.0.terminate();
    }
}

pub(super) struct Shared {
    pub(super) engine: Mutex<Box<dyn TpmEngine>>,
    pub(super) canceller: Canceller,
    pub(super) version: TpmVersion,
    pub(super) locality: AtomicU8,
    pub(super) buffer_size: AtomicU32,
    pub(super) ctl: Arc<Control>,
    pub(super) cfg: ServerConfig,
}

impl Shared {
    pub(super) fn engine(&self) -> MutexGuard<'_, Box<dyn TpmEngine>> {
        lock(&self.engine)
    }

    pub(super) fn refresh_buffer_size(&self, eng: &mut dyn TpmEngine) {
        match eng.set_buffer_size(0) {
            Ok((now, _, _)) if now >= TPM_HEADER_SIZE as u32 => self.buffer_size.store(now, Ordering::SeqCst),
            Ok((now, _, _)) => log::warn!("engine reports an unusable buffer size {now}; keeping the old one"),
            Err(e) => log::warn!("cannot query the TPM buffer size: {e}"),
        }
    }

    pub(super) fn locality_allowed(&self, loc: u8) -> bool {
        loc <= 4 && !(loc == 4 && self.cfg.locality.reject_locality_4)
    }

    pub(super) fn capabilities(&self) -> u64 {
        let mut caps = ctrl::PTM_CAP_INIT
            | ctrl::PTM_CAP_SHUTDOWN
            | ctrl::PTM_CAP_GET_TPMESTABLISHED
            | ctrl::PTM_CAP_SET_LOCALITY
            | ctrl::PTM_CAP_HASHING
            | ctrl::PTM_CAP_CANCEL_TPM_CMD
            | ctrl::PTM_CAP_STORE_VOLATILE
            | ctrl::PTM_CAP_RESET_TPMESTABLISHED
            | ctrl::PTM_CAP_GET_STATEBLOB
            | ctrl::PTM_CAP_SET_STATEBLOB
            | ctrl::PTM_CAP_STOP
            | ctrl::PTM_CAP_GET_CONFIG
            | ctrl::PTM_CAP_SET_BUFFERSIZE;
        if self.cfg.fd_receiver.is_some() {
            caps |= ctrl::PTM_CAP_SET_DATAFD;
        }
        if self.version == TpmVersion::V2_0 {
            caps |= ctrl::PTM_CAP_SEND_COMMAND_HEADER;
        }
        caps
    }

    // ----- data channel -----
}
