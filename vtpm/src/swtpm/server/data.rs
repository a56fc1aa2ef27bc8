//! The data thread: one data connection at a time, each command run on the engine.

use super::*;

impl Shared {
    /// swtpm's in-band set-locality command.
    pub(super) fn inband_set_locality(&self, command: &[u8]) -> Vec<u8> {
        if command.len() < TPM_HEADER_SIZE + 1 {
            let code = match self.version {
                TpmVersion::V2_0 => rc::TPM_RC_INSUFFICIENT,
                TpmVersion::V1_2 => rc::TPM_BAD_PARAM_SIZE,
            };
            return error_response(self.version, code);
        }
        if !self.cfg.locality.allow_set_locality {
            log::warn!("in-band TPM_CC_SET_LOCALITY refused (needs --locality allow-set-locality)");
            return fatal_error_response(self.version);
        }
        let loc = command[TPM_HEADER_SIZE];
        if !self.locality_allowed(loc) {
            log::warn!("in-band TPM_CC_SET_LOCALITY to {loc} refused");
            return error_response(self.version, locality_error_code(self.version));
        }
        self.locality.store(loc, Ordering::SeqCst);
        error_response(self.version, rc::TPM_SUCCESS)
    }

    /// Runs one data-channel command; `None` when the server is ending.
    pub(super) fn execute(&self, frame: &Frame, peer: &str) -> Option<Vec<u8>> {
        let mut eng = self.engine();
        if self.ctl.terminating() {
            return None;
        }
        if !eng.is_running() {
            log::debug!("{peer}: command while the TPM is off");
            return Some(fatal_error_response(self.version));
        }
        if let Some(loc) = frame.prefix_locality {
            // swtpm takes the prefix's locality unchecked; we apply the --locality rules.
            if !self.locality_allowed(loc) {
                log::warn!("{peer}: TCG prefix asks for locality {loc}; refused");
                return Some(error_response(self.version, locality_error_code(self.version)));
            }
            self.locality.store(loc, Ordering::SeqCst);
        }
        let ordinal = be32(&frame.command, 6);
        if ordinal == TPM_CC_SET_LOCALITY {
            return Some(self.inband_set_locality(&frame.command));
        }
        let locality = self.locality.load(Ordering::SeqCst);
        match eng.process(locality, &frame.command) {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("{peer}: TPM command {ordinal:#x} failed: {e}");
                Some(fatal_error_response(self.version))
            }
        }
    }

    pub(super) fn serve_data(&self, conn: DataConn) {
        let DataConn { mut stream, peer, keep } = conn;
        log::info!("data client {peer} connected");
        loop {
            let frame = match self.read_frame(&mut stream) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    log::info!("data client {peer} disconnected");
                    return;
                }
                Err(FrameError::Disconnected) => {
                    log::warn!("data client {peer} disconnected in the middle of a command");
                    return;
                }
                Err(FrameError::Timeout) => {
                    log::warn!("data client {peer} sent an incomplete command header; dropping the connection");
                    stream.close_gracefully();
                    return;
                }
                Err(FrameError::Io(e)) => {
                    if !self.ctl.terminating() {
                        log::warn!("data client {peer}: {e}; dropping the connection");
                    }
                    return;
                }
                Err(FrameError::BadSize { prefixed, why }) => {
                    log::warn!("data client {peer}: {why}; answering with a size error and dropping the connection");
                    let resp = error_response(self.version, size_error_code(self.version));
                    let _ = stream.write_all(&frame_response(&resp, prefixed));
                    stream.close_gracefully();
                    return;
                }
            };
            let Some(resp) = self.execute(&frame, &peer) else { return };
            if let Err(e) = stream.write_all(&frame_response(&resp, frame.prefix_locality.is_some())) {
                log::warn!("data client {peer}: cannot send the response: {e}; dropping the connection");
                return;
            }
            if !keep {
                log::debug!("data client {peer}: closing after the response (disconnect mode)");
                return;
            }
        }
    }

    pub(super) fn data_loop(&self) {
        loop {
            let conn = {
                let mut h = lock(&self.ctl.handoff);
                loop {
                    if self.ctl.terminating() {
                        return;
                    }
                    if let Some(c) = h.datafd.take().or_else(|| h.accepted.take()) {
                        h.active = true;
                        break c;
                    }
                    h = self.ctl.handoff_cv.wait(h).unwrap_or_else(PoisonError::into_inner);
                }
            };
            // The main loop accepts the next data client only while none waits.
            self.ctl.wake();
            if self.ctl.track(&self.ctl.active_data, &conn.stream) {
                self.serve_data(conn);
            }
            *lock(&self.ctl.active_data) = None;
            lock(&self.ctl.handoff).active = false;
            if self.cfg.terminate_on_data_disconnect && !self.ctl.terminating() {
                log::info!("data connection lost; terminating (--terminate)");
                self.terminate_tpm();
                return;
            }
        }
    }
}
