//! swtpm's socket server over any [`TpmEngine`]: a data channel carrying TPM commands and a
//! control channel carrying the commands of `tpm_ioctl.h`, with swtpm 0.7.1's semantics.
//!
//! Two threads. The data thread serves data connections, one at a time like swtpm: the next
//! client waits until the current one disconnects. The thread that calls [`SwtpmServer::run`]
//! waits in one `poll` on both listeners and the control connection: it accepts data
//! connections for the data thread (one waits at a time, the rest stay in the listen queue)
//! and serves control connections (also one at a time). The engine sits behind a mutex;
//! CANCEL_TPM_CMD uses the engine's canceller so it works while a data command holds it.

mod config;
mod control;
mod data;
mod framing;
mod run;
mod shared;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use super::blob;
pub use super::conn::Endpoint;
use super::conn::{read_until, Listener, Stream};
use super::ctrl::{self, rc, CtrlCmd};
use crate::engine::{Canceller, StateKind, TpmEngine, TpmVersion};
use crate::{Error, Result};
use xvtpm_proto::tpm;
pub use xvtpm_proto::tpm::StartupType;

pub use config::*;
use control::*;
use framing::*;
pub use shared::Stopper;
use shared::*;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the server down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// swtpm's socket server over a [`TpmEngine`]. Build with [`SwtpmServer::new`] (which binds
/// the sockets), then [`SwtpmServer::run`] until CMD_SHUTDOWN.
pub struct SwtpmServer {
    shared: Arc<Shared>,
    data: Option<(Listener, Endpoint)>,
    ctrl: Option<(Listener, Endpoint)>,
}

impl std::fmt::Debug for SwtpmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwtpmServer")
            .field("version", &self.shared.version)
            .field("data", &self.data.as_ref().map(|d| &d.1))
            .field("ctrl", &self.ctrl.as_ref().map(|c| &c.1))
            .field("config", &self.shared.cfg)
            .finish()
    }
}

impl SwtpmServer {
    /// Binds the configured sockets. The TPM stays off until [`run`](Self::run) (with
    /// `not_need_init`/`startup`) or CMD_INIT powers it on.
    pub fn new(config: ServerConfig, engine: Box<dyn TpmEngine>) -> Result<Self> {
        if config.data.is_none() && config.ctrl.is_none() {
            return Err(Error::Config("neither a data channel (--server) nor a control channel (--ctrl) given".into()));
        }
        let version = engine.version();
        if let Some(st) = config.startup {
            startup_command(version, st)?;
        }
        let bind = |ep: &Option<Endpoint>| -> Result<Option<(Listener, Endpoint)>> {
            let Some(ep) = ep else { return Ok(None) };
            let l = Listener::bind(ep)?;
            let bound = l.endpoint(ep);
            Ok(Some((l, bound)))
        };
        let data = bind(&config.data)?;
        let ctrl = bind(&config.ctrl)?;
        if data.is_none() && config.fd_receiver.is_none() {
            log::warn!("no data channel: TPM commands can only arrive via CMD_SET_DATAFD, which is unavailable");
        }
        let canceller = engine.canceller();
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            canceller,
            version,
            locality: AtomicU8::new(0),
            buffer_size: AtomicU32::new(DEFAULT_BUFFER_SIZE),
            ctl: Arc::new(Control::new()?),
            cfg: config,
        });
        Ok(Self { shared, data, ctrl })
    }

    /// The data channel's endpoint as bound (the real port when 0 was asked for).
    pub fn data_endpoint(&self) -> Option<&Endpoint> {
        self.data.as_ref().map(|d| &d.1)
    }

    /// The control channel's endpoint as bound.
    pub fn ctrl_endpoint(&self) -> Option<&Endpoint> {
        self.ctrl.as_ref().map(|c| &c.1)
    }

    /// A handle that ends [`run`](Self::run) from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.ctl.clone())
    }

    /// Serves until CMD_SHUTDOWN (or [`Stopper::stop`], or a lost connection with the
    /// terminate options), then powers the TPM off and removes Unix socket files.
    pub fn run(self) -> Result<()> {
        let shared = self.shared.clone();
        if let Err(e) = shared.power_on_at_start() {
            for (l, _) in self.data.iter().chain(self.ctrl.iter()) {
                l.remove_socket_file();
            }
            return Err(e);
        }
        let s = shared.clone();
        let data_thread = std::thread::Builder::new()
            .name("swtpm-data".into())
            .spawn(move || s.data_loop())
            .map_err(|e| Error::io("spawn the data thread", e))?;
        for (what, ch) in [("data", &self.data), ("control", &self.ctrl)] {
            if let Some((_, ep)) = ch {
                log::info!("{what} channel listening on {ep}");
            }
        }
        shared.main_loop(self.data.as_ref().map(|d| &d.0), self.ctrl.as_ref().map(|c| &c.0));
        if data_thread.join().is_err() {
            log::error!("the data thread panicked");
        }
        shared.engine().shutdown();
        for (l, _) in self.data.iter().chain(self.ctrl.iter()) {
            l.remove_socket_file();
        }
        log::info!("swtpm server terminated");
        Ok(())
    }
}
