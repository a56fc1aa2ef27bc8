//! The server loop: one `poll` over both listeners, the control connections and the wake-up
//! socket; data clients are handed to the data thread, control clients served here.

use super::*;

impl Shared {
    /// A connection from a listener that `poll` found readable. `None` when the client went
    /// away first (the listener does not block) or accepting failed; a failure (say, out of
    /// descriptors) is logged and followed by a pause, since the listener stays readable.
    pub(super) fn accept_one(&self, listener: &Listener, what: &str) -> Option<(Stream, String)> {
        match listener.accept() {
            Ok(a) => Some(a),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => None,
            Err(e) => {
                log::warn!("accepting a {what} connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        }
    }

    /// Gives an accepted data connection to the data thread (the main loop accepts only while
    /// no connection waits for it).
    pub(super) fn hand_over(&self, stream: Stream, peer: String) {
        let mut h = lock(&self.ctl.handoff);
        if h.active || h.datafd.is_some() {
            log::info!("data client {peer} waits until the current client disconnects");
        }
        h.accepted = Some(DataConn { stream, peer, keep: !self.cfg.disconnect });
        drop(h);
        self.ctl.handoff_cv.notify_all();
    }

    /// `not-need-init` and `startup-*`: power on (and start up) before serving.
    pub(super) fn power_on_at_start(&self) -> Result<()> {
        let mut eng = self.engine();
        if self.cfg.not_need_init || self.cfg.startup.is_some() {
            eng.init(false)?;
            log::info!("TPM powered on at start");
            if let Some(st) = self.cfg.startup {
                let resp = eng.process(0, &startup_command(self.version, st)?)?;
                match tpm::code(&resp) {
                    Some(0) => log::info!("sent startup {st:?}"),
                    code => log::warn!("startup {st:?} answered {code:x?}"),
                }
            }
        }
        self.refresh_buffer_size(eng.as_mut());
        Ok(())
    }

    /// Powers off and ends the server.
    pub(super) fn terminate_tpm(&self) {
        self.ctl.terminate();
    }

    // ----- control channel -----

    /// The main loop: accepts data connections for the data thread and control connections,
    /// and serves every control connection, until the server is to end. Control clients are
    /// served side by side (up to [`MAX_CTRL_CLIENTS`]): one that idles, or never speaks,
    /// keeps no other out (swtpm serves one at a time, so one idle client blocks the channel),
    /// and one that holds it for good (QEMU) is never dropped for a newcomer. The first client
    /// to act on the TPM holds the channel until it leaves; meanwhile the others may only ask.
    pub(super) fn main_loop(&self, data: Option<&Listener>, ctrl: Option<&Listener>) {
        // (stream, peer, id)
        let mut conns: Vec<(Stream, String, u64)> = Vec::new();
        let mut next_id = 0u64;
        let mut holder: Option<u64> = None;
        while !self.ctl.terminating() {
            // Accept a data client only while none waits for the data thread.
            let data = data.filter(|_| lock(&self.ctl.handoff).accepted.is_none());
            let mut fds: Vec<_> =
                [Some(self.ctl.wake_rx.as_fd()), data.map(Listener::as_fd), ctrl.map(Listener::as_fd)]
                    .into_iter()
                    .flatten()
                    .collect();
            fds.extend(conns.iter().map(|(s, ..)| s.as_fd()));
            let ready = match crate::sys::poll::wait_any(&fds) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("waiting for clients failed: {e}; terminating");
                    break;
                }
            };
            drop(fds);
            let mut ready = ready.into_iter();
            if ready.next() == Some(true) {
                self.ctl.drain_wakes();
            }
            if let Some(l) = data {
                if ready.next() == Some(true) && !self.ctl.terminating() {
                    if let Some((stream, peer)) = self.accept_one(l, "data") {
                        self.hand_over(stream, peer);
                    }
                }
            }
            let accept = ctrl.is_some() && ready.next() == Some(true);
            let speaking: Vec<bool> = ready.collect();
            let mut end = false;
            let mut lost = false;
            let mut kept = Vec::with_capacity(conns.len());
            for ((mut stream, peer, id), ready) in conns.drain(..).zip(speaking) {
                if !ready || end || self.ctl.terminating() {
                    kept.push((stream, peer, id));
                    continue;
                }
                if !self.ctl.track(&self.ctl.active_ctrl, &stream) {
                    break;
                }
                let (step, acted) = self.ctrl_message(&mut stream, &peer, holder.is_none_or(|h| h == id));
                *lock(&self.ctl.active_ctrl) = None;
                if acted {
                    holder = Some(id);
                }
                match step {
                    CtrlStep::Open => kept.push((stream, peer, id)),
                    CtrlStep::End => end = true,
                    CtrlStep::Drop => {
                        log::warn!("control client {peer}: dropping the connection");
                        stream.close_gracefully();
                        lost = true;
                    }
                    CtrlStep::Closed => lost = true,
                }
            }
            if holder.is_some_and(|h| !kept.iter().any(|(.., id)| *id == h)) {
                holder = None;
            }
            conns = kept;
            if end {
                break;
            }
            if lost && conns.is_empty() && self.cfg.terminate_on_ctrl_disconnect && !self.ctl.terminating() {
                log::info!("control connection lost; terminating (--ctrl ...,terminate)");
                break;
            }
            if let (true, Some(l)) = (accept, ctrl) {
                if self.ctl.terminating() {
                    continue;
                }
                if let Some((stream, peer)) = self.accept_one(l, "control") {
                    if conns.len() >= MAX_CTRL_CLIENTS {
                        log::warn!(
                            "control client {peer}: {MAX_CTRL_CLIENTS} control clients connected already; closing it"
                        );
                        continue;
                    }
                    log::debug!("control client {peer} connected");
                    // A client that does not read its answers must not hold the loop.
                    if let Err(e) = stream.set_write_timeout(Some(self.cfg.data_timeout)) {
                        log::warn!("control client {peer}: {e}");
                    }
                    conns.push((stream, peer, next_id));
                    next_id += 1;
                }
            }
        }
        *lock(&self.ctl.active_ctrl) = None;
        self.terminate_tpm();
        // Clients that waited for the data thread, which is ending: close them now, not when
        // the last Stopper goes.
        let mut h = lock(&self.ctl.handoff);
        drop((h.accepted.take(), h.datafd.take()));
    }
}

/// Control clients served at once.
pub(super) const MAX_CTRL_CLIENTS: usize = 8;
