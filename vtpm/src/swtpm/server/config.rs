//! How the server is configured (swtpm's options), and the TPM commands and codes it
//! answers with itself.

use super::*;

/// The vendor ordinal of swtpm's in-band set-locality command (TPM 2 and TPM 1.2 alike).
pub const TPM_CC_SET_LOCALITY: u32 = 0x2000_1000;
/// `TPM2_SEND_COMMAND`: the first word of the TCG command prefix (locality, length) that
/// TPM 2 data-channel commands may carry.
pub const TPM2_SEND_COMMAND: u32 = 8;
/// Size of a TPM command/response header (tag, size, ordinal/code).
pub const TPM_HEADER_SIZE: usize = tpm::HEADER_SIZE;
pub(super) const TCG_PREFIX_SIZE: usize = 9;
pub(super) const DEFAULT_BUFFER_SIZE: u32 = 4096;

/// Receives the first read of a control message on a Unix socket together with a file
/// descriptor passed with SCM_RIGHTS (needed for CMD_SET_DATAFD): returns the byte count and
/// the descriptor, if one came. Receiving descriptors needs `recvmsg`, which this module
/// cannot call without `unsafe`; the binary may supply it.
pub type FdReceiver = Arc<dyn Fn(&UnixStream, &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> + Send + Sync>;

/// swtpm's `--locality` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalityOptions {
    /// Accept the in-band TPM_CC_SET_LOCALITY command on the data channel.
    pub allow_set_locality: bool,
    /// Refuse to switch to locality 4.
    pub reject_locality_4: bool,
}

/// How the server listens and behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// The data channel (`--server`); `None` when data arrives only through CMD_SET_DATAFD.
    pub data: Option<Endpoint>,
    /// The control channel (`--ctrl`).
    pub ctrl: Option<Endpoint>,
    /// Power the TPM on at start instead of waiting for CMD_INIT (`--flags not-need-init`).
    pub not_need_init: bool,
    /// Power on at start and send this startup command (`--flags startup-*`).
    pub startup: Option<StartupType>,
    /// `--locality` options.
    pub locality: LocalityOptions,
    /// Close a data connection after each response (`--server ...,disconnect`, `-p`).
    pub disconnect: bool,
    /// End when a data connection is lost (`--terminate`).
    pub terminate_on_data_disconnect: bool,
    /// End when a control connection is lost (`--ctrl ...,terminate`).
    pub terminate_on_ctrl_disconnect: bool,
    /// Report `PTM_CONFIG_FLAG_FILE_KEY` in GET_CONFIG (the state is encrypted at rest).
    pub file_key: bool,
    /// How long the rest of a data-channel command (or of a long control transfer) may take
    /// once its first byte arrived.
    pub data_timeout: Duration,
    /// How long a control message may take to arrive completely (swtpm: 500 ms).
    pub ctrl_timeout: Duration,
    /// The largest state blob SET_STATEBLOB accepts.
    pub max_state_blob: usize,
    /// After answering, how long to keep polling the data socket for the client's next
    /// command before sleeping in `read` (zero: never poll). A client sending commands back to
    /// back then skips our wake-up; an idle one costs this much CPU once.
    pub poll: Duration,
    /// Enables CMD_SET_DATAFD on Unix control sockets; see [`FdReceiver`].
    pub fd_receiver: Option<FdReceiver>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data: None,
            ctrl: None,
            not_need_init: false,
            startup: None,
            locality: LocalityOptions::default(),
            disconnect: false,
            terminate_on_data_disconnect: false,
            terminate_on_ctrl_disconnect: false,
            file_key: false,
            data_timeout: Duration::from_secs(2),
            ctrl_timeout: Duration::from_millis(500),
            max_state_blob: 16 << 20,
            poll: Duration::from_micros(50),
            fd_receiver: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("data", &self.data)
            .field("ctrl", &self.ctrl)
            .field("not_need_init", &self.not_need_init)
            .field("startup", &self.startup)
            .field("locality", &self.locality)
            .field("disconnect", &self.disconnect)
            .field("terminate_on_data_disconnect", &self.terminate_on_data_disconnect)
            .field("terminate_on_ctrl_disconnect", &self.terminate_on_ctrl_disconnect)
            .field("file_key", &self.file_key)
            .field("data_timeout", &self.data_timeout)
            .field("poll", &self.poll)
            .field("ctrl_timeout", &self.ctrl_timeout)
            .field("max_state_blob", &self.max_state_blob)
            .field("fd_receiver", &self.fd_receiver.as_ref().map(|_| "set"))
            .finish()
    }
}

/// The TPM command swtpm sends for `startup` on a TPM of `version`.
pub fn startup_command(version: TpmVersion, startup: StartupType) -> Result<Vec<u8>> {
    tpm::startup(version.into(), startup)
        .ok_or_else(|| Error::Config("TPM 2 does not support startup-deactivated".into()))
}

pub use crate::engine::error_response;

/// The response swtpm sends to data-channel commands while the TPM is off.
pub fn fatal_error_response(version: TpmVersion) -> Vec<u8> {
    error_response(version, crate::engine::failure_rc(version))
}

pub(super) fn size_error_code(version: TpmVersion) -> u32 {
    match version {
        TpmVersion::V2_0 => rc::TPM_RC_COMMAND_SIZE,
        TpmVersion::V1_2 => rc::TPM_BAD_PARAM_SIZE,
    }
}

pub(super) fn locality_error_code(version: TpmVersion) -> u32 {
    match version {
        TpmVersion::V2_0 => rc::TPM_RC_LOCALITY,
        TpmVersion::V1_2 => rc::TPM_BAD_LOCALITY,
    }
}

/// The `ptm_res` for an engine error.
pub(super) fn result_code(e: &Error) -> u32 {
    match e {
        Error::Tpm { rc, .. } => *rc,
        Error::PowerState(_) => rc::TPM_BAD_ORDINAL,
        _ => rc::TPM_FAIL,
    }
}

pub(super) fn blob_kind(blob_type: u32) -> Option<StateKind> {
    match blob_type {
        ctrl::PTM_BLOB_TYPE_PERMANENT => Some(StateKind::Permanent),
        ctrl::PTM_BLOB_TYPE_VOLATILE => Some(StateKind::Volatile),
        ctrl::PTM_BLOB_TYPE_SAVESTATE => Some(StateKind::SaveState),
        _ => None,
    }
}
