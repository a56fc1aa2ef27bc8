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
        let mut spin = SpinPolicy::new(self.cfg.poll);
        loop {
            let budget = spin.next_budget();
            let mut hit = false;
            let frame = match self.read_frame(&mut stream, budget, &mut hit) {
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
            spin.record(!budget.is_zero(), hit);
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

/// When to poll for a client's next command instead of sleeping in `read`: always while
/// polling finds it (a client sending back to back then skips our wake-up), and after a miss
/// only every 2nd, 4th, ... up to every 64th command, so a client that pauses between commands
/// pays for a wasted poll about once in 64 commands instead of after every answer (which had
/// cost ~4x swtpm's CPU per command).
#[derive(Debug)]
pub(super) struct SpinPolicy {
    budget: Duration,
    /// Commands left to wait for without polling.
    skip: u32,
    /// How many to skip after the next miss.
    backoff: u32,
}

impl SpinPolicy {
    const MAX_BACKOFF: u32 = 64;

    pub(super) fn new(budget: Duration) -> Self {
        SpinPolicy { budget, skip: 0, backoff: 0 }
    }

    /// How long to poll for the next command.
    pub(super) fn next_budget(&mut self) -> Duration {
        if self.skip > 0 {
            self.skip -= 1;
            return Duration::ZERO;
        }
        self.budget
    }

    /// Whether the command just read was polled for, and whether it came while polling.
    pub(super) fn record(&mut self, polled: bool, hit: bool) {
        if !polled {
            return;
        }
        if hit {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, Self::MAX_BACKOFF);
            self.skip = self.backoff;
        }
    }
}

#[cfg(test)]
mod spin_tests {
    use super::*;

    fn polls(p: &mut SpinPolicy, commands: usize, hit: bool) -> usize {
        (0..commands)
            .filter(|_| {
                let b = p.next_budget();
                p.record(!b.is_zero(), hit);
                !b.is_zero()
            })
            .count()
    }

    #[test]
    fn back_to_back_clients_are_always_polled_for_paced_ones_rarely() {
        let mut p = SpinPolicy::new(Duration::from_micros(50));
        assert_eq!(polls(&mut p, 1000, true), 1000);
        // A client that pauses: 1, 2, 4, ... 64 commands skipped after each miss.
        let n = polls(&mut p, 6400, false);
        assert!(n <= 6400 / 64 + 7, "{n} polls for 6400 paced commands");
        // Back to back again: polled from the next poll on, every time.
        let mut q = SpinPolicy::new(Duration::from_micros(50));
        polls(&mut q, 100, false);
        let skipped = (0..=SpinPolicy::MAX_BACKOFF).take_while(|_| q.next_budget().is_zero()).count();
        assert!(skipped as u32 <= SpinPolicy::MAX_BACKOFF);
        q.record(true, true);
        assert_eq!(polls(&mut q, 100, true), 100);
        // Polling off: never.
        let mut z = SpinPolicy::new(Duration::ZERO);
        assert_eq!(polls(&mut z, 100, true), 0);
    }
}
