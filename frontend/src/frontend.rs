//! The frontend's handshake and command exchange.

use std::time::{Duration, Instant};

use xvtpm_xen::tpmif::{Tpmif, TpmifState, MAX_PACKET};
use xvtpm_xen::xenbus::{parse_num, vtpm_frontend_path};
use xvtpm_xen::{DomId, EventChannel, Port, SharedPage, TxId, Xen, XenbusState, Xenstore};

use crate::{Error, Result};

/// How a frontend connects.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// Device handle: `device/vtpm/<handle>` of our domain.
    pub handle: u32,
    /// The device's frontend directory, when it is not `device/vtpm/<handle>` (a device the
    /// operator's tool made for itself, out of the kernel's xen-tpmfront's way).
    pub dir: Option<String>,
    /// How long to wait for the backend to reach Connected.
    pub connect_timeout: Duration,
    /// How long a command may take before it is cancelled.
    pub command_timeout: Duration,
    /// How long to poll the shared page for the response before sleeping on the event
    /// channel. Most responses of a user-space backend arrive within tens of microseconds;
    /// polling that long saves a wake-up (~5-10 µs) per command. Zero never polls.
    pub spin: Duration,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            handle: 0,
            dir: None,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(120),
            spin: Duration::from_micros(50),
        }
    }
}

/// A connected vtpm frontend.
#[derive(Debug)]
pub struct Frontend {
    xs: Xenstore,
    evtchn: Box<dyn EventChannel>,
    port: Port,
    page: SharedPage,
    fe_path: String,
    be_path: String,
    backend_id: DomId,
    locality: u8,
    config: FrontendConfig,
    closed: bool,
}

const WATCH_TOKEN: &str = "vtpmfront-backend-state";

impl Frontend {
    /// Connects device `config.handle` of our domain to its backend.
    pub fn connect(xen: &dyn Xen, config: FrontendConfig) -> Result<Self> {
        let xs = xen.xenstore()?;
        let fe_path = config.dir.clone().unwrap_or_else(|| vtpm_frontend_path(xen.domid(), config.handle));
        let be_path = xs.read_string(TxId::NONE, &format!("{fe_path}/backend"))?;
        let id_path = format!("{fe_path}/backend-id");
        let backend_id: DomId = parse_num(&id_path, &xs.read(TxId::NONE, &id_path)?)?;
        let page = xen.grant_allocator()?.grant(backend_id, true)?;
        let evtchn = xen.evtchn()?;
        let port = evtchn.alloc_unbound(backend_id)?;
        let mut fe =
            Frontend { xs, evtchn, port, page, fe_path, be_path, backend_id, locality: 0, config, closed: false };
        fe.handshake()?;
        Ok(fe)
    }

    fn handshake(&mut self) -> Result<()> {
        let (xs, fe) = (&self.xs, &self.fe_path);
        let gref = self.page.gref().to_string();
        let port = self.port.to_string();
        // All keys appear at once with the state change, as the Linux frontend does.
        xs.transaction(|tx| {
            xs.write(tx, &format!("{fe}/ring-ref"), gref.as_bytes())?;
            xs.write(tx, &format!("{fe}/event-channel"), port.as_bytes())?;
            xs.write(tx, &format!("{fe}/feature-protocol-v2"), b"1")?;
            xs.write(tx, &format!("{fe}/state"), XenbusState::Initialised.as_str().as_bytes())
        })?;
        let state_path = format!("{}/state", self.be_path);
        self.xs.watch(&state_path, WATCH_TOKEN)?;
        let result = self.wait_backend_connected(&state_path);
        let _ = self.xs.unwatch(&state_path, WATCH_TOKEN);
        result?;
        let v2 = self.xs.try_read(TxId::NONE, &format!("{}/feature-protocol-v2", self.be_path))?;
        if v2.as_deref() != Some(b"1") {
            return Err(Error::Protocol("vTPM protocol 2 required, the backend does not offer it".into()));
        }
        self.xs.write(TxId::NONE, &format!("{}/state", self.fe_path), XenbusState::Connected.as_str().as_bytes())?;
        log::info!("tpmfront: {} connected to backend domain {}", self.fe_path, self.backend_id);
        Ok(())
    }

    fn wait_backend_connected(&self, state_path: &str) -> Result<()> {
        let deadline = Instant::now() + self.config.connect_timeout;
        loop {
            let raw = self.xs.try_read(TxId::NONE, state_path)?;
            let state = raw.as_deref().map(|r| XenbusState::parse(state_path, r)).transpose()?;
            match state {
                Some(XenbusState::Connected) => return Ok(()),
                Some(s @ (XenbusState::Closing | XenbusState::Closed)) => {
                    let why = self.xs.try_read(TxId::NONE, &format!("{}/error", self.be_path))?;
                    let why = why.map(|w| format!(": {}", String::from_utf8_lossy(&w))).unwrap_or_default();
                    return Err(Error::NotConnected {
                        path: self.be_path.clone(),
                        reason: format!("backend is {s:?}{why}"),
                    });
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NotConnected {
                    path: self.be_path.clone(),
                    reason: format!("still {state:?} after {:?}", self.config.connect_timeout),
                });
            }
            self.xs.next_event(Some(left.min(Duration::from_millis(200))))?;
        }
    }

    /// Sets the locality of the following commands.
    pub fn set_locality(&mut self, locality: u8) {
        self.locality = locality;
    }

    /// Largest command the shared page carries.
    pub fn max_command(&self) -> usize {
        MAX_PACKET
    }

    /// Sends a command and returns the response. On timeout the command is cancelled and
    /// [`Error::Timeout`] returned; the frontend stays usable.
    pub fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>> {
        if command.len() > MAX_PACKET {
            return Err(Error::CommandTooLarge { len: command.len(), max: MAX_PACKET });
        }
        let timeout = self.config.command_timeout;
        let deadline = Instant::now() + timeout;
        // A cancelled command may still be finishing: wait for the page to be ours again.
        if !self.wait_until(deadline, |s| matches!(s, TpmifState::Idle | TpmifState::Finish))? {
            return Err(Error::Timeout(timeout));
        }
        let t = Tpmif::new(&self.page);
        t.write_request(self.locality, command)?;
        t.set_state(TpmifState::Submit)?;
        self.evtchn.notify(self.port)?;
        if !self.wait_until(deadline, |s| matches!(s, TpmifState::Idle | TpmifState::Finish))? {
            self.cancel();
            return Err(Error::Timeout(timeout));
        }
        match Tpmif::new(&self.page).state()? {
            TpmifState::Finish => {
                let mut out = Vec::new();
                Tpmif::new(&self.page).read_packet(&mut out).map_err(|e| Error::Protocol(e.to_string()))?;
                Ok(out)
            }
            _ => Err(Error::Cancelled),
        }
    }

    /// Asks the backend to cancel the command in progress and waits briefly for it to do so.
    fn cancel(&mut self) {
        let t = Tpmif::new(&self.page);
        if t.set_state(TpmifState::Cancel).is_err() || self.evtchn.notify(self.port).is_err() {
            return;
        }
        let grace = Instant::now() + Duration::from_secs(1);
        match self.wait_until(grace, |s| matches!(s, TpmifState::Idle | TpmifState::Finish)) {
            Ok(true) => log::debug!("tpmfront: backend acknowledged the cancel"),
            _ => log::warn!("tpmfront: backend has not acknowledged the cancel yet"),
        }
    }

    /// Waits until the page state satisfies `done` or `deadline` passes.
    fn wait_until(&self, deadline: Instant, done: impl Fn(TpmifState) -> bool) -> Result<bool> {
        let t = Tpmif::new(&self.page);
        let spin_end = Instant::now() + self.config.spin;
        while Instant::now() < spin_end.min(deadline) {
            match t.state() {
                Ok(s) if done(s) => return Ok(true),
                Ok(_) => std::hint::spin_loop(),
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
        loop {
            match t.state() {
                Ok(s) if done(s) => return Ok(true),
                Ok(_) => {}
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            if let Some(p) = self.evtchn.wait(Some(left))? {
                self.evtchn.unmask(p)?;
            }
        }
    }

    /// Closes the device as a shutting-down guest does: state Closed, wait (up to the connect
    /// timeout) for the backend to let go, then revoke the page and close the port.
    pub fn close(mut self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let xs = &self.xs;
        xs.write(TxId::NONE, &format!("{}/state", self.fe_path), XenbusState::Closed.as_str().as_bytes())?;
        let state_path = format!("{}/state", self.be_path);
        let deadline = Instant::now() + self.config.connect_timeout;
        xs.watch(&state_path, WATCH_TOKEN)?;
        let mut released = false;
        while Instant::now() < deadline {
            let s = xs.try_read(TxId::NONE, &state_path)?.and_then(|r| XenbusState::parse(&state_path, &r).ok());
            if !matches!(s, Some(XenbusState::Connected | XenbusState::Initialised)) {
                released = true;
                break;
            }
            xs.next_event(Some(Duration::from_millis(100)))?;
        }
        let _ = xs.unwatch(&state_path, WATCH_TOKEN);
        if !released {
            log::warn!("tpmfront: backend {} still connected after close", self.be_path);
        }
        for k in ["ring-ref", "event-channel"] {
            let _ = xs.rm(TxId::NONE, &format!("{}/{k}", self.fe_path));
        }
        let _ = self.evtchn.unbind(self.port);
        Ok(())
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            log::warn!("tpmfront: closing {}: {e}", self.fe_path);
        }
    }
}

#[cfg(test)]
mod tests;
