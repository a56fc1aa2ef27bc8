//! The TPM engine seam: what the transports (swtpm socket, tpmback) need from a TPM.

use std::sync::Arc;

use xvtpm_proto::tpm::Family;

use crate::Result;

/// Which TPM the engine emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpmVersion {
    /// TPM 1.2.
    V1_2,
    /// TPM 2.0 (the default).
    V2_0,
}

/// The state blobs of a TPM (`TPMLIB_StateType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// Permanent state (NV).
    Permanent,
    /// Volatile state (saved by `store_volatile`).
    Volatile,
    /// State saved by TPM_SaveState / TPM2_Shutdown(STATE).
    SaveState,
}

impl StateKind {
    /// The name libtpms gives the blob in its NVRAM callbacks, and our store uses.
    pub fn blob_name(self) -> &'static str {
        match self {
            StateKind::Permanent => "permall",
            StateKind::Volatile => "volatilestate",
            StateKind::SaveState => "savestate",
        }
    }
}

/// Cancels the command in progress; callable from any thread.
pub type Canceller = Arc<dyn Fn() + Send + Sync>;

/// A TPM. Power and state follow swtpm's control protocol, which follows libtpms.
pub trait TpmEngine: Send {
    /// The emulated TPM version.
    fn version(&self) -> TpmVersion;
    /// Powers on (loads state). With `delete_volatile`, the volatile state is discarded first.
    fn init(&mut self, delete_volatile: bool) -> Result<()>;
    /// Powers on resumed from `volatile`, a volatile state taken earlier with
    /// [`TpmEngine::get_state`] from this TPM: PCRs, sessions and loaded objects as they were
    /// then, already started (no Startup).
    fn resume(&mut self, volatile: &[u8]) -> Result<()>;
    /// A key for data bound to this TPM's state (such as its volatile snapshots), derived
    /// from the state key for `purpose`; `None` where the state has no secret key.
    fn derive_key(&self, _purpose: &str) -> Option<[u8; 32]> {
        None
    }
    /// Powers off; state already stored stays stored.
    fn shutdown(&mut self);
    /// True between `init` and `shutdown`.
    fn is_running(&self) -> bool;
    /// Executes one command at `locality`; the response bytes (a TPM error response is a
    /// response, not an `Err`).
    fn process(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>>;
    /// A handle that cancels the command in progress from another thread.
    fn canceller(&self) -> Canceller;
    /// Stores the volatile state (swtpm's STORE_VOLATILE).
    fn store_volatile(&mut self) -> Result<()>;
    /// Reads a state blob.
    fn get_state(&mut self, kind: StateKind) -> Result<Vec<u8>>;
    /// Replaces a state blob (only while powered off).
    fn set_state(&mut self, kind: StateKind, data: &[u8]) -> Result<()>;
    /// Sets the I/O buffer size (0 only queries); returns (size now, min, max).
    fn set_buffer_size(&mut self, wanted: u32) -> Result<(u32, u32, u32)>;
    /// The TPM Established flag.
    fn established(&mut self) -> Result<bool>;
    /// Resets the TPM Established flag (needs locality 3 or 4).
    fn reset_established(&mut self, locality: u8) -> Result<()>;
    /// TPM_HASH_START of the TIS interface.
    fn hash_start(&mut self) -> Result<()>;
    /// TPM_HASH_DATA.
    fn hash_data(&mut self, data: &[u8]) -> Result<()>;
    /// TPM_HASH_END.
    fn hash_end(&mut self) -> Result<()>;
}

impl From<TpmVersion> for Family {
    fn from(v: TpmVersion) -> Self {
        match v {
            TpmVersion::V1_2 => Family::Tpm12,
            TpmVersion::V2_0 => Family::Tpm20,
        }
    }
}

/// A TPM error response of `version` carrying `rc`: what a client gets when the engine cannot
/// run its command at all (powered off, state not stored).
pub fn error_response(version: TpmVersion, rc: u32) -> Vec<u8> {
    xvtpm_proto::tpm::error_response(version.into(), rc)
}

/// Sends TPM_Startup(CLEAR), as a platform reset does (a Xen guest's kernel never sends it).
pub fn startup_clear(engine: &mut dyn TpmEngine) -> Result<()> {
    let version = engine.version();
    let cmd = xvtpm_proto::tpm::startup(version.into(), xvtpm_proto::tpm::StartupType::Clear)
        .ok_or_else(|| crate::Error::Config("no startup command for this TPM version".into()))?;
    let rsp = engine.process(0, &cmd)?;
    match xvtpm_proto::tpm::code(&rsp) {
        Some(0) => Ok(()),
        code => Err(crate::Error::Config(format!("TPM startup answered {code:x?}"))),
    }
}

/// The generic failure code of `version`.
pub fn failure_rc(version: TpmVersion) -> u32 {
    Family::from(version).failure_rc()
}
