//! The control channel: the commands of `tpm_ioctl.h` (power, locality, hashing, cancel,
//! state blobs, the data socket handed over), one message at a time.

use super::*;

impl Shared {
    /// Reads one control message the way swtpm does: what the first read brings, then more
    /// until the command's fixed part is there, all within `ctrl_timeout`.
    #[allow(clippy::type_complexity)]
    pub(super) fn recv_ctrl(&self, s: &mut Stream) -> Result<Option<(u32, Vec<u8>, Option<OwnedFd>)>, String> {
        let mut buf = vec![0u8; ctrl::CTRL_INPUT_SIZE];
        let (mut got, fd) = match (&self.cfg.fd_receiver, s.as_unix()) {
            (Some(recv), Some(u)) => {
                u.set_read_timeout(None).map_err(|e| e.to_string())?;
                loop {
                    match (**recv)(u, &mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e.to_string()),
                        Ok(r) => break r,
                    }
                }
            }
            _ => (read_until(s, &mut buf, None).map_err(|e| e.to_string())?, None),
        };
        if got == 0 {
            return Ok(None);
        }
        let deadline = Instant::now() + self.cfg.ctrl_timeout;
        while got < ctrl::message_len_needed(&buf[..got]) {
            match read_until(s, &mut buf[got..], Some(deadline)) {
                Ok(0) => return Err(format!("closed in the middle of a control message ({got} bytes)")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(format!("incomplete control message ({got} bytes) after {:?}", self.cfg.ctrl_timeout))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let code = be32(&buf, 0);
        buf.truncate(got);
        Ok(Some((code, buf.split_off(4), fd)))
    }

    pub(super) fn running(&self) -> bool {
        self.engine().is_running()
    }

    pub(super) fn reply_rc(code: u32) -> CtrlAnswer {
        CtrlAnswer::reply(ctrl::encode_result(code).to_vec())
    }

    pub(super) fn engine_rc(&self, what: &str, r: Result<()>) -> u32 {
        match r {
            Ok(()) => rc::TPM_SUCCESS,
            Err(e) => {
                log::warn!("{what} failed: {e}");
                result_code(&e)
            }
        }
    }

    /// Reads and discards `n` bytes of a transfer we refuse, so the stream stays in sync.
    /// False if that was not possible.
    pub(super) fn drain(&self, s: &mut Stream, n: usize, peer: &str) -> bool {
        if n > self.cfg.max_state_blob {
            log::warn!("control client {peer}: refusing to read {n} bytes of a refused transfer");
            return false;
        }
        match read_chunks(s, n, self.cfg.data_timeout, |_| {}) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("control client {peer}: reading the rest of a refused transfer: {e}");
                false
            }
        }
    }

    pub(super) fn handle_ctrl(
        &self,
        s: &mut Stream,
        peer: &str,
        code: u32,
        body: &[u8],
        fd: Option<OwnedFd>,
    ) -> CtrlAnswer {
        let Some(cmd) = CtrlCmd::from_code(code) else {
            log::warn!("control client {peer}: unknown command {code:#010x}");
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        };
        log::debug!("control client {peer}: {} ({} bytes)", cmd.name(), body.len());
        if fd.is_some() && cmd != CtrlCmd::SetDatafd {
            log::warn!("control client {peer}: ignoring a file descriptor sent with {}", cmd.name());
        }
        let bad_parameter = || {
            log::warn!("control client {peer}: malformed {} ({} bytes of body)", cmd.name(), body.len());
            Self::reply_rc(rc::TPM_BAD_PARAMETER)
        };
        let not_running = || {
            log::debug!("control client {peer}: {} while the TPM is off", cmd.name());
            Self::reply_rc(rc::TPM_BAD_ORDINAL)
        };
        match cmd {
            CtrlCmd::GetCapability => CtrlAnswer::reply(ctrl::encode_caps(self.capabilities()).to_vec()),
            CtrlCmd::Init => {
                let Some(req) = ctrl::InitRequest::decode(body) else { return bad_parameter() };
                let mut eng = self.engine();
                eng.shutdown();
                let delete_volatile = req.init_flags & ctrl::PTM_INIT_FLAG_DELETE_VOLATILE != 0;
                let code = match eng.init(delete_volatile) {
                    Ok(()) => {
                        self.refresh_buffer_size(eng.as_mut());
                        log::info!("TPM powered on (delete volatile state: {delete_volatile})");
                        rc::TPM_SUCCESS
                    }
                    Err(e) => {
                        log::error!("could not initialize the TPM: {e}");
                        result_code(&e)
                    }
                };
                Self::reply_rc(code)
            }
            CtrlCmd::Stop | CtrlCmd::Shutdown => {
                if !body.is_empty() {
                    return bad_parameter();
                }
                self.engine().shutdown();
                if cmd == CtrlCmd::Stop {
                    log::info!("TPM powered off (CMD_STOP)");
                    Self::reply_rc(rc::TPM_SUCCESS)
                } else {
                    log::info!("CMD_SHUTDOWN: powering off and terminating");
                    CtrlAnswer::reply_and_end(ctrl::encode_result(rc::TPM_SUCCESS).to_vec())
                }
            }
            CtrlCmd::GetTpmEstablished => {
                let mut eng = self.engine();
                if !eng.is_running() {
                    return not_running();
                }
                if !body.is_empty() {
                    return bad_parameter();
                }
                let resp = match eng.established() {
                    Ok(bit) => ctrl::EstResponse { tpm_result: rc::TPM_SUCCESS, bit: bit.into() },
                    Err(e) => {
                        log::warn!("get TPM established failed: {e}");
                        ctrl::EstResponse { tpm_result: result_code(&e), bit: 0 }
                    }
                };
                CtrlAnswer::reply(resp.encode().to_vec())
            }
            CtrlCmd::ResetTpmEstablished => {
                let mut eng = self.engine();
                if !eng.is_running() {
                    return not_running();
                }
                let Some(&loc) = body.first() else { return bad_parameter() };
                if loc > 4 {
                    return Self::reply_rc(rc::TPM_BAD_LOCALITY);
                }
                Self::reply_rc(self.engine_rc("reset TPM established", eng.reset_established(loc)))
            }
            CtrlCmd::SetLocality => {
                let Some(&loc) = body.first() else { return bad_parameter() };
                if !self.locality_allowed(loc) {
                    log::warn!("control client {peer}: locality {loc} refused");
                    return Self::reply_rc(rc::TPM_BAD_LOCALITY);
                }
                self.locality.store(loc, Ordering::SeqCst);
                Self::reply_rc(rc::TPM_SUCCESS)
            }
            CtrlCmd::HashStart | CtrlCmd::HashEnd | CtrlCmd::StoreVolatile => {
                let mut eng = self.engine();
                if !eng.is_running() {
                    return not_running();
                }
                if !body.is_empty() {
                    return bad_parameter();
                }
                let r = match cmd {
                    CtrlCmd::HashStart => eng.hash_start(),
                    CtrlCmd::HashEnd => eng.hash_end(),
                    _ => eng.store_volatile(),
                };
                Self::reply_rc(self.engine_rc(cmd.name(), r))
            }
            CtrlCmd::HashData => self.hash_data(s, peer, body),
            CtrlCmd::CancelTpmCmd => {
                // A command in progress holds the engine; then the TPM is running.
                let running = match self.engine.try_lock() {
                    Ok(eng) => eng.is_running(),
                    Err(TryLockError::WouldBlock) => true,
                    Err(TryLockError::Poisoned(p)) => p.into_inner().is_running(),
                };
                if !running {
                    return not_running();
                }
                if !body.is_empty() {
                    return bad_parameter();
                }
                (*self.canceller)();
                log::info!("control client {peer}: cancelled the command in progress");
                Self::reply_rc(rc::TPM_SUCCESS)
            }
            CtrlCmd::GetStateBlob => self.get_state_blob(peer, body),
            CtrlCmd::SetStateBlob => self.set_state_blob(s, peer, body),
            CtrlCmd::GetConfig => {
                if !body.is_empty() {
                    return bad_parameter();
                }
                let flags = if self.cfg.file_key { ctrl::PTM_CONFIG_FLAG_FILE_KEY } else { 0 };
                CtrlAnswer::reply(ctrl::GetConfigResponse { tpm_result: rc::TPM_SUCCESS, flags }.encode().to_vec())
            }
            CtrlCmd::SetDatafd => self.set_datafd(s, peer, fd),
            CtrlCmd::SetBufferSize => {
                let Some(req) = ctrl::SetBufferSizeRequest::decode(body) else { return bad_parameter() };
                let mut eng = self.engine();
                if req.buffersize > 0 && eng.is_running() {
                    log::warn!("control client {peer}: the buffer size can only be set while the TPM is off");
                    return Self::reply_rc(rc::TPM_BAD_ORDINAL);
                }
                match eng.set_buffer_size(req.buffersize) {
                    Ok((now, min, max)) => {
                        if now >= TPM_HEADER_SIZE as u32 {
                            self.buffer_size.store(now, Ordering::SeqCst);
                        }
                        let r = ctrl::SetBufferSizeResponse {
                            tpm_result: rc::TPM_SUCCESS,
                            buffersize: now,
                            minsize: min,
                            maxsize: max,
                        };
                        CtrlAnswer::reply(r.encode().to_vec())
                    }
                    Err(e) => {
                        log::warn!("set buffer size failed: {e}");
                        Self::reply_rc(result_code(&e))
                    }
                }
            }
            CtrlCmd::GetInfo => {
                // The engine exposes no TPMLIB_GetInfo; we do not advertise PTM_CAP_GET_INFO.
                log::warn!("control client {peer}: CMD_GET_INFO is not implemented");
                Self::reply_rc(rc::TPM_BAD_ORDINAL)
            }
        }
    }

    pub(super) fn hash_data(&self, s: &mut Stream, peer: &str, body: &[u8]) -> CtrlAnswer {
        let declared = (body.len() >= ctrl::PTM_HDATA_DATA_OFFSET).then(|| be32(body, 0) as usize);
        let first = body.get(ctrl::PTM_HDATA_DATA_OFFSET..).unwrap_or_default();
        let rest = declared.map_or(0, |d| d.saturating_sub(first.len()));
        if !self.running() {
            log::debug!("control client {peer}: CMD_HASH_DATA while the TPM is off");
            if !self.drain(s, rest, peer) {
                return CtrlAnswer::reply_and_drop(ctrl::encode_result(rc::TPM_BAD_ORDINAL).to_vec());
            }
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        }
        let Some(declared) = declared else {
            log::warn!("control client {peer}: CMD_HASH_DATA without a length");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        if first.len() > declared {
            log::warn!("control client {peer}: CMD_HASH_DATA carries more than its length {declared}");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        }
        let mut result = self.engine().hash_data(first);
        let read = read_chunks(s, rest, self.cfg.data_timeout, |chunk| {
            if result.is_ok() {
                result = self.engine().hash_data(chunk);
            }
        });
        match read {
            Ok(()) => Self::reply_rc(self.engine_rc("hash data", result)),
            Err(e) => {
                log::warn!("control client {peer}: reading hash data: {e}");
                match e {
                    ReadError::Eof => CtrlAnswer::reply_and_drop(ctrl::encode_result(rc::TPM_IOERROR).to_vec()),
                    _ => CtrlAnswer::drop_silently(),
                }
            }
        }
    }

    pub(super) fn get_state_blob(&self, peer: &str, body: &[u8]) -> CtrlAnswer {
        let mut eng = self.engine();
        if !eng.is_running() {
            log::debug!("control client {peer}: CMD_GET_STATEBLOB while the TPM is off");
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        }
        let Some(req) = ctrl::GetStateRequest::decode(body) else {
            log::warn!("control client {peer}: malformed CMD_GET_STATEBLOB");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let header_only = |code| {
            let h = ctrl::GetStateResponse { tpm_result: code, state_flags: 0, totlength: 0, length: 0 };
            CtrlAnswer::reply(h.encode().to_vec())
        };
        let Some(kind) = blob_kind(req.blob_type) else {
            log::warn!("control client {peer}: unknown state blob type {}", req.blob_type);
            return header_only(rc::TPM_BAD_PARAMETER);
        };
        let plain = match eng.get_state(kind) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("get state blob {kind:?} failed: {e}");
                return header_only(result_code(&e));
            }
        };
        drop(eng);
        if plain.is_empty() {
            // swtpm's answer when the blob does not exist.
            log::debug!("control client {peer}: no state blob {kind:?}");
            return header_only(rc::TPM_RETRY);
        }
        // Our blobs are never encrypted (PTM_STATE_FLAG_DECRYPTED changes nothing).
        let wrapped = blob::wrap(&plain);
        let part = wrapped.get(req.offset as usize..).unwrap_or_default();
        let h = ctrl::GetStateResponse {
            tpm_result: rc::TPM_SUCCESS,
            state_flags: 0,
            totlength: part.len() as u32,
            length: part.len() as u32,
        };
        let mut out = Vec::with_capacity(ctrl::PTM_GETSTATE_RESP_HDR_SIZE + part.len());
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(part);
        log::info!("control client {peer}: sent state blob {kind:?} ({} bytes from offset {})", part.len(), req.offset);
        CtrlAnswer::reply(out)
    }

    pub(super) fn set_state_blob(&self, s: &mut Stream, peer: &str, body: &[u8]) -> CtrlAnswer {
        let req = ctrl::SetStateRequest::decode(body);
        let first = body.get(ctrl::PTM_SETSTATE_REQ_HDR_SIZE..).unwrap_or_default();
        let rest = req.map_or(0, |r| (r.length as usize).saturating_sub(first.len()));
        if self.running() {
            log::warn!("control client {peer}: CMD_SET_STATEBLOB while the TPM is running");
            if !self.drain(s, rest, peer) {
                return CtrlAnswer::reply_and_drop(ctrl::encode_result(rc::TPM_BAD_ORDINAL).to_vec());
            }
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        }
        let Some(req) = req else {
            log::warn!("control client {peer}: malformed CMD_SET_STATEBLOB");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let length = req.length as usize;
        if first.len() > length {
            log::warn!("control client {peer}: CMD_SET_STATEBLOB carries more than its length {length}");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        }
        if length > self.cfg.max_state_blob {
            log::warn!("control client {peer}: state blob of {length} bytes exceeds {}", self.cfg.max_state_blob);
            return CtrlAnswer::reply_and_drop(ctrl::encode_result(rc::TPM_FAIL).to_vec());
        }
        let mut data = Vec::with_capacity(length);
        data.extend_from_slice(first);
        if let Err(e) = read_chunks(s, rest, self.cfg.data_timeout, |chunk| data.extend_from_slice(chunk)) {
            log::warn!("control client {peer}: reading a state blob ({} of {length} bytes): {e}", data.len());
            return match e {
                ReadError::Eof => CtrlAnswer::reply_and_drop(ctrl::encode_result(rc::TPM_BAD_PARAMETER).to_vec()),
                _ => CtrlAnswer::drop_silently(),
            };
        }
        let Some(kind) = blob_kind(req.blob_type) else {
            log::warn!("control client {peer}: unknown state blob type {}", req.blob_type);
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let plain = match blob::unwrap(&data, req.state_flags & ctrl::PTM_STATE_FLAG_ENCRYPTED != 0) {
            Ok(p) => p,
            Err(code) => {
                log::warn!("control client {peer}: state blob {kind:?} refused ({code:#x})");
                return Self::reply_rc(code);
            }
        };
        let code = self.engine_rc("set state blob", self.engine().set_state(kind, &plain));
        if code == rc::TPM_SUCCESS {
            log::info!("control client {peer}: received state blob {kind:?} ({} bytes)", plain.len());
        }
        Self::reply_rc(code)
    }

    pub(super) fn set_datafd(&self, s: &Stream, peer: &str, fd: Option<OwnedFd>) -> CtrlAnswer {
        if self.cfg.fd_receiver.is_none() {
            log::error!(
                "control client {peer}: CMD_SET_DATAFD needs file descriptor passing, which this build \
                 does not support; use --server for the data channel"
            );
            return Self::reply_rc(rc::TPM_FAIL);
        }
        let mut h = lock(&self.ctl.handoff);
        if h.active || h.datafd.is_some() {
            log::warn!("control client {peer}: CMD_SET_DATAFD while a data connection is active");
            return Self::reply_rc(rc::TPM_IOERROR);
        }
        let Some(fd) = fd.filter(|_| s.as_unix().is_some()) else {
            log::warn!("control client {peer}: CMD_SET_DATAFD without a file descriptor");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let stream = Stream::Unix(UnixStream::from(fd));
        h.datafd = Some(DataConn { stream, peer: format!("{peer} (datafd)"), keep: true });
        drop(h);
        self.ctl.handoff_cv.notify_all();
        Self::reply_rc(rc::TPM_SUCCESS)
    }

    /// Reads and answers one message of the control connection `s`.
    /// Serves one message of control client `peer`. Unless `may_act`, it may only ask
    /// ([`acts`] is false for its command): another client holds the channel. The step, and
    /// whether the message acted on the TPM (its sender then holds the channel).
    pub(super) fn ctrl_message(&self, s: &mut Stream, peer: &str, may_act: bool) -> (CtrlStep, bool) {
        let (code, body, fd) = match self.recv_ctrl(s) {
            Ok(Some(m)) => m,
            Ok(None) => {
                log::debug!("control client {peer} disconnected");
                return (CtrlStep::Closed, false);
            }
            Err(why) => {
                if !self.ctl.terminating() {
                    log::warn!("control client {peer}: {why}; closing the connection");
                }
                return (CtrlStep::Closed, false);
            }
        };
        let acting = acts(code);
        if acting && !may_act {
            log::warn!(
                "control client {peer}: command {code:#x} refused: another control client holds the channel \
                 (it changed the TPM's state and is still connected)"
            );
            return (self.send_answer(s, peer, Self::reply_rc(rc::TPM_FAIL)), false);
        }
        let answer = self.handle_ctrl(s, peer, code, &body, fd);
        (self.send_answer(s, peer, answer), acting)
    }

    /// Sends `answer`'s reply, if any; what becomes of the connection.
    fn send_answer(&self, s: &mut Stream, peer: &str, answer: CtrlAnswer) -> CtrlStep {
        let CtrlAnswer { reply, then } = answer;
        if let Some(r) = reply {
            if let Err(e) = s.write_all(&r) {
                log::warn!("control client {peer}: cannot send the response: {e}");
                return match then {
                    CtrlStep::End => CtrlStep::End,
                    _ => CtrlStep::Closed,
                };
            }
        }
        then
    }
}

/// Whether control command `code` acts on the TPM (power, locality, cancel, state, the data
/// channel) rather than only asking about it. The first client to act holds the channel
/// until it leaves: others may ask, not act, so a second client cannot reset or stop the TPM
/// under QEMU.
fn acts(code: u32) -> bool {
    !matches!(
        CtrlCmd::from_code(code),
        Some(CtrlCmd::GetCapability | CtrlCmd::GetTpmEstablished | CtrlCmd::GetConfig | CtrlCmd::GetInfo) | None
    )
}

/// The answer to a control message, and what becomes of the connection after it.
pub(super) struct CtrlAnswer {
    pub(super) reply: Option<Vec<u8>>,
    pub(super) then: CtrlStep,
}

impl CtrlAnswer {
    /// Answer and keep serving the connection.
    pub(super) fn reply(r: Vec<u8>) -> Self {
        Self { reply: Some(r), then: CtrlStep::Open }
    }

    /// Answer, then drop the connection (the stream is out of sync).
    pub(super) fn reply_and_drop(r: Vec<u8>) -> Self {
        Self { reply: Some(r), then: CtrlStep::Drop }
    }

    /// Drop the connection without an answer (it broke).
    pub(super) fn drop_silently() -> Self {
        Self { reply: None, then: CtrlStep::Drop }
    }

    /// Answer, then end the server (CMD_SHUTDOWN).
    pub(super) fn reply_and_end(r: Vec<u8>) -> Self {
        Self { reply: Some(r), then: CtrlStep::End }
    }
}

/// What became of the control connection after a message.
pub(super) enum CtrlStep {
    /// Keep serving it.
    Open,
    /// The client closed it, or it broke.
    Closed,
    /// Close it gracefully (the stream is out of sync).
    Drop,
    /// The server is to end (CMD_SHUTDOWN).
    End,
}
