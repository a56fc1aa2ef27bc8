//! The safe wrapper around libtpms: the engine of every vTPM.
//!
//! libtpms keeps its TPM in global state and reaches storage through C callbacks without a
//! context pointer, so the wrapper keeps its own globals: the state store the callbacks use,
//! the locality of the command in progress, and the last storage error (so `init` can say which
//! file failed and why instead of returning a bare error code). A second [`Libtpms`] in the same
//! process is refused.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use libtpms_sys as ffi;

use crate::engine::{Canceller, StateKind, TpmEngine, TpmVersion};
use crate::state::StateStore;
use crate::{Error, Result};

static IN_USE: AtomicBool = AtomicBool::new(false);

struct Globals {
    store: Option<Box<dyn StateStore>>,
    /// Prepended to libtpms' blob names, so a state directory says which TPM it holds.
    prefix: &'static str,
    locality: u8,
    /// A storage error met inside a callback, reported by the call that triggered it.
    last_error: Option<Error>,
    /// The volatile state the next power-on loads instead of the store's (a resume).
    resume_from: Option<Vec<u8>>,
}

static GLOBALS: Mutex<Globals> =
    Mutex::new(Globals { store: None, prefix: "", locality: 0, last_error: None, resume_from: None });

/// The store name of libtpms' blob `name` for a TPM of `version`.
pub fn blob_name_for(version: TpmVersion, name: &str) -> String {
    format!("{}{name}", prefix(version))
}

fn prefix(version: TpmVersion) -> &'static str {
    match version {
        TpmVersion::V2_0 => "tpm2-",
        TpmVersion::V1_2 => "tpm12-",
    }
}

fn globals() -> MutexGuard<'static, Globals> {
    // A panic while holding the lock cannot leave the plain fields inconsistent.
    GLOBALS.lock().unwrap_or_else(|p| p.into_inner())
}

/// How to build the engine.
#[derive(Debug)]
pub struct LibtpmsConfig {
    /// TPM 2.0 or 1.2.
    pub version: TpmVersion,
    /// Where the state lives.
    pub store: Box<dyn StateStore>,
    /// Create a new TPM if the store holds no permanent state. Without it, missing state is
    /// an error: a vTPM never silently starts over.
    pub create: bool,
    /// Names the store in error messages (e.g. the state directory).
    pub label: std::path::PathBuf,
}

/// The libtpms engine (one per process).
#[derive(Debug)]
pub struct Libtpms {
    version: TpmVersion,
    running: bool,
    create: bool,
    label: std::path::PathBuf,
}

impl Libtpms {
    /// Claims libtpms for this process and selects the TPM version. The TPM stays off until
    /// [`TpmEngine::init`].
    pub fn new(config: LibtpmsConfig) -> Result<Self> {
        if IN_USE.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(Error::AlreadyInUse);
        }
        let ver = match config.version {
            TpmVersion::V1_2 => ffi::TPMLIB_TPM_VERSION_1_2,
            TpmVersion::V2_0 => ffi::TPMLIB_TPM_VERSION_2,
        };
        let mut cbs = ffi::libtpms_callbacks {
            sizeOfStruct: std::mem::size_of::<ffi::libtpms_callbacks>() as libc::c_int,
            tpm_nvram_init: Some(cb_nvram_init),
            tpm_nvram_loaddata: Some(cb_load),
            tpm_nvram_storedata: Some(cb_store),
            tpm_nvram_deletename: Some(cb_delete),
            tpm_io_init: Some(cb_io_init),
            tpm_io_getlocality: Some(cb_locality),
            tpm_io_getphysicalpresence: Some(cb_physical_presence),
        };
        // SAFETY: plain calls into libtpms with a valid, fully initialised callbacks struct
        // (libtpms copies it); no TPM is running in this process (IN_USE was false).
        let rc = unsafe {
            let rc = ffi::TPMLIB_ChooseTPMVersion(ver);
            if rc != ffi::TPM_SUCCESS {
                rc
            } else {
                ffi::TPMLIB_RegisterCallbacks(&mut cbs)
            }
        };
        if rc != ffi::TPM_SUCCESS {
            IN_USE.store(false, Ordering::SeqCst);
            return Err(Error::Tpm { op: "select TPM version and callbacks", rc });
        }
        let mut g = globals();
        g.store = Some(config.store);
        g.prefix = prefix(config.version);
        g.locality = 0;
        g.last_error = None;
        drop(g);
        Ok(Libtpms { version: config.version, running: false, create: config.create, label: config.label })
    }

    /// The libtpms version (major << 16 | minor << 8 | micro).
    pub fn library_version() -> u32 {
        // SAFETY: a pure query without arguments.
        unsafe { ffi::TPMLIB_GetVersion() }
    }

    fn with_store<T>(&self, f: impl FnOnce(&mut dyn StateStore) -> Result<T>) -> Result<T> {
        let mut g = globals();
        let store = g.store.as_deref_mut().ok_or_else(|| Error::Config("no state store".into()))?;
        f(store)
    }

    fn check(&self, op: &'static str, rc: u32) -> Result<()> {
        if let Some(e) = globals().last_error.take() {
            return Err(e);
        }
        if rc == ffi::TPM_SUCCESS {
            Ok(())
        } else {
            Err(Error::Tpm { op, rc })
        }
    }

    /// Powers on: loads the state, with the store's volatile state deleted first
    /// (`delete_volatile`) or replaced by `resume_from`.
    fn power_on(&mut self, delete_volatile: bool, resume_from: Option<Vec<u8>>) -> Result<()> {
        self.require_running(false)?;
        let version = self.version;
        let (exists, other_exists) = self.with_store(|s| {
            if delete_volatile {
                s.delete(&blob_name_for(version, StateKind::Volatile.blob_name()))?;
            }
            // A blob that exists but cannot be read is an error here, before libtpms sees it.
            let exists = s.load(&blob_name_for(version, StateKind::Permanent.blob_name()))?.is_some();
            let other = match version {
                TpmVersion::V2_0 => TpmVersion::V1_2,
                TpmVersion::V1_2 => TpmVersion::V2_0,
            };
            Ok((exists, s.load(&blob_name_for(other, StateKind::Permanent.blob_name())).ok().flatten().is_some()))
        })?;
        if !exists && other_exists {
            return Err(Error::Config(format!(
                "{} holds a {} state, not a {version:?} one: choose the TPM version it was created with",
                self.label.display(),
                if version == TpmVersion::V2_0 { "TPM 1.2" } else { "TPM 2.0" }
            )));
        }
        if !exists && !self.create {
            return Err(Error::NoState(self.label.clone()));
        }
        if !exists {
            log::info!("creating a new {:?} TPM in {}", self.version, self.label.display());
        }
        let resuming = resume_from.is_some();
        {
            let mut g = globals();
            g.last_error = None;
            g.resume_from = resume_from;
        }
        // SAFETY: the version and callbacks were set in `new`; the TPM is off.
        let rc = unsafe { ffi::TPMLIB_MainInit() };
        let taken = globals().resume_from.take().is_none();
        self.check("power on (TPMLIB_MainInit)", rc)?;
        if resuming && !taken {
            // libtpms did not ask for the volatile state: it did not resume.
            // SAFETY: MainInit succeeded, so the TPM runs; Terminate powers it off.
            unsafe { ffi::TPMLIB_Terminate() };
            return Err(Error::Config("libtpms did not load the volatile state it was given".into()));
        }
        self.running = true;
        // Whatever was created is stored now: from here on the state is never created anew.
        self.create = false;
        Ok(())
    }

    fn require_running(&self, running: bool) -> Result<()> {
        match (self.running, running) {
            (true, false) => Err(Error::PowerState("running (power it off first)")),
            (false, true) => Err(Error::PowerState("not running (no INIT yet)")),
            _ => Ok(()),
        }
    }
}

/// What cancels the command in progress of this process's TPM, whenever it exists (libtpms
/// keeps one TPM per process).
pub fn canceller() -> Canceller {
    // SAFETY: TPMLIB_CancelCommand only sets a flag libtpms checks in long operations; it is
    // meant to be called from another thread while a command runs, and does nothing when no
    // command runs.
    Arc::new(|| unsafe {
        ffi::TPMLIB_CancelCommand();
    })
}

/// Copies a libtpms-allocated buffer out and frees it.
///
/// # Safety
/// `buf` must be null or a `malloc`ed buffer of at least `len` bytes that nothing else uses.
unsafe fn take_buffer(buf: *mut u8, len: u32) -> Vec<u8> {
    if buf.is_null() {
        return Vec::new();
    }
    // SAFETY: per this function's contract, `buf` holds `len` initialised bytes.
    let v = unsafe { std::slice::from_raw_parts(buf, len as usize) }.to_vec();
    // SAFETY: libtpms allocates with malloc; we own the buffer now and free it once.
    unsafe { libc::free(buf.cast()) };
    v
}

fn kind_code(kind: StateKind) -> libc::c_int {
    match kind {
        StateKind::Permanent => ffi::TPMLIB_STATE_PERMANENT,
        StateKind::Volatile => ffi::TPMLIB_STATE_VOLATILE,
        StateKind::SaveState => ffi::TPMLIB_STATE_SAVE_STATE,
    }
}

impl TpmEngine for Libtpms {
    fn version(&self) -> TpmVersion {
        self.version
    }

    fn init(&mut self, delete_volatile: bool) -> Result<()> {
        self.power_on(delete_volatile, None)
    }

    fn resume(&mut self, volatile: &[u8]) -> Result<()> {
        if volatile.is_empty() {
            return Err(Error::Config("an empty volatile state cannot be resumed".into()));
        }
        self.power_on(false, Some(volatile.to_vec()))
    }

    fn derive_key(&self, purpose: &str) -> Option<[u8; 32]> {
        globals().store.as_deref().and_then(|s| s.derive_key(purpose))
    }

    fn shutdown(&mut self) {
        if self.running {
            // SAFETY: the TPM is running; Terminate powers it off.
            unsafe { ffi::TPMLIB_Terminate() };
            self.running = false;
        }
    }

    fn is_running(&self) -> bool {
        self.running
    }

    fn canceller(&self) -> Canceller {
        canceller()
    }

    fn process(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>> {
        self.require_running(true)?;
        let len = u32::try_from(command.len()).map_err(|_| Error::Protocol("command too large".into()))?;
        globals().locality = locality;
        // libtpms takes a mutable pointer but only reads the command; give it its own copy.
        let mut cmd = command.to_vec();
        let mut resp: *mut u8 = std::ptr::null_mut();
        let (mut resp_size, mut resp_bufsize) = (0u32, 0u32);
        // SAFETY: `cmd` is a live buffer of `len` bytes; libtpms allocates the response into
        // `resp` (malloc), which `take_buffer` frees.
        let rc = unsafe { ffi::TPMLIB_Process(&mut resp, &mut resp_size, &mut resp_bufsize, cmd.as_mut_ptr(), len) };
        // SAFETY: `resp` is null or libtpms' malloc'ed response of `resp_size` bytes.
        let out = unsafe { take_buffer(resp, resp_size) };
        if let Some(e) = globals().last_error.take() {
            // The command ran but its state could not be stored: never hide that.
            log::error!("TPM state was not saved: {e}");
            return Err(e);
        }
        if rc != ffi::TPM_SUCCESS {
            return Err(Error::Tpm { op: "process", rc });
        }
        Ok(out)
    }

    fn store_volatile(&mut self) -> Result<()> {
        self.require_running(true)?;
        let mut buf: *mut u8 = std::ptr::null_mut();
        let mut len = 0u32;
        // SAFETY: libtpms allocates the blob into `buf`; `take_buffer` frees it.
        let rc = unsafe { ffi::TPMLIB_VolatileAll_Store(&mut buf, &mut len) };
        // SAFETY: null or libtpms' malloc'ed blob of `len` bytes.
        let blob = unsafe { take_buffer(buf, len) };
        self.check("store volatile state", rc)?;
        let name = blob_name_for(self.version, StateKind::Volatile.blob_name());
        self.with_store(|s| s.store(&name, &blob))
    }

    fn get_state(&mut self, kind: StateKind) -> Result<Vec<u8>> {
        let mut buf: *mut u8 = std::ptr::null_mut();
        let mut len = 0u32;
        // SAFETY: libtpms allocates the blob into `buf`; `take_buffer` frees it.
        let rc = unsafe { ffi::TPMLIB_GetState(kind_code(kind), &mut buf, &mut len) };
        // SAFETY: null or libtpms' malloc'ed blob of `len` bytes.
        let blob = unsafe { take_buffer(buf, len) };
        self.check("get state blob", rc)?;
        Ok(blob)
    }

    fn set_state(&mut self, kind: StateKind, data: &[u8]) -> Result<()> {
        self.require_running(false)?;
        // The next power-on loads it through the store, like any other state. An empty blob
        // is how swtpm's SET_STATEBLOB clears one.
        let name = blob_name_for(self.version, kind.blob_name());
        if data.is_empty() {
            return self.with_store(|s| s.delete(&name));
        }
        self.with_store(|s| s.store(&name, data))
    }

    fn set_buffer_size(&mut self, wanted: u32) -> Result<(u32, u32, u32)> {
        if wanted != 0 {
            self.require_running(false)?;
        }
        let (mut min, mut max) = (0u32, 0u32);
        // SAFETY: a query (or setting, while off) with two out-parameters.
        let now = unsafe { ffi::TPMLIB_SetBufferSize(wanted, &mut min, &mut max) };
        Ok((now, min, max))
    }

    fn established(&mut self) -> Result<bool> {
        self.require_running(true)?;
        let mut flag: ffi::TPM_BOOL = 0;
        // SAFETY: one out-parameter; the TPM is running.
        let rc = unsafe { ffi::TPM_IO_TpmEstablished_Get(&mut flag) };
        self.check("get TPM established", rc)?;
        Ok(flag != 0)
    }

    fn reset_established(&mut self, locality: u8) -> Result<()> {
        self.require_running(true)?;
        globals().locality = locality;
        // SAFETY: no arguments; libtpms checks the locality through our callback.
        let rc = unsafe { ffi::TPM_IO_TpmEstablished_Reset() };
        self.check("reset TPM established", rc)
    }

    fn hash_start(&mut self) -> Result<()> {
        self.require_running(true)?;
        // SAFETY: no arguments; the TPM is running.
        let rc = unsafe { ffi::TPM_IO_Hash_Start() };
        self.check("hash start", rc)
    }

    fn hash_data(&mut self, data: &[u8]) -> Result<()> {
        self.require_running(true)?;
        let len = u32::try_from(data.len()).map_err(|_| Error::Protocol("hash data too large".into()))?;
        // SAFETY: `data` is a live buffer of `len` bytes that libtpms only reads.
        let rc = unsafe { ffi::TPM_IO_Hash_Data(data.as_ptr(), len) };
        self.check("hash data", rc)
    }

    fn hash_end(&mut self) -> Result<()> {
        self.require_running(true)?;
        // SAFETY: no arguments; the TPM is running.
        let rc = unsafe { ffi::TPM_IO_Hash_End() };
        self.check("hash end", rc)
    }
}

impl Drop for Libtpms {
    fn drop(&mut self) {
        self.shutdown();
        globals().store = None;
        IN_USE.store(false, Ordering::SeqCst);
    }
}

/// Runs a callback body without letting a panic unwind into C.
fn guarded(f: impl FnOnce() -> u32) -> u32 {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        log::error!("panic inside a libtpms callback");
        ffi::TPM_FAIL
    })
}

/// # Safety
/// `name` must be a NUL-terminated string (libtpms passes its blob names).
unsafe fn blob_name<'a>(name: *const libc::c_char) -> Option<&'a str> {
    if name.is_null() {
        return None;
    }
    // SAFETY: per the contract, a valid C string that outlives the callback.
    unsafe { CStr::from_ptr(name) }.to_str().ok()
}

unsafe extern "C" fn cb_nvram_init() -> u32 {
    ffi::TPM_SUCCESS
}

unsafe extern "C" fn cb_io_init() -> u32 {
    ffi::TPM_SUCCESS
}

unsafe extern "C" fn cb_load(data: *mut *mut u8, length: *mut u32, _tpm: u32, name: *const libc::c_char) -> u32 {
    guarded(|| {
        // SAFETY: libtpms passes a NUL-terminated blob name.
        let Some(name) = (unsafe { blob_name(name) }) else { return ffi::TPM_FAIL };
        let mut g = globals();
        let resumed = match g.resume_from.take() {
            Some(v) if name == StateKind::Volatile.blob_name() => Some(v),
            other => {
                g.resume_from = other;
                None
            }
        };
        let name = format!("{}{name}", g.prefix);
        let Some(store) = g.store.as_deref_mut() else { return ffi::TPM_FAIL };
        let loaded = match resumed {
            Some(v) => Ok(Some(v)),
            None => store.load(&name),
        };
        match loaded {
            Ok(None) => ffi::TPM_RETRY,
            Ok(Some(blob)) => {
                let Ok(len) = u32::try_from(blob.len()) else { return ffi::TPM_FAIL };
                // SAFETY: a fresh allocation (at least 1 byte) that libtpms takes ownership of
                // and frees with free().
                let p = unsafe { libc::malloc(blob.len().max(1)) }.cast::<u8>();
                if p.is_null() {
                    return ffi::TPM_FAIL;
                }
                // SAFETY: `p` has room for `blob.len()` bytes; `data` and `length` are
                // libtpms' out-parameters.
                unsafe {
                    std::ptr::copy_nonoverlapping(blob.as_ptr(), p, blob.len());
                    *data = p;
                    *length = len;
                }
                ffi::TPM_SUCCESS
            }
            Err(e) => {
                log::error!("cannot load TPM state {name}: {e}");
                g.last_error = Some(e);
                ffi::TPM_FAIL
            }
        }
    })
}

unsafe extern "C" fn cb_store(data: *const u8, length: u32, _tpm: u32, name: *const libc::c_char) -> u32 {
    guarded(|| {
        // SAFETY: libtpms passes a NUL-terminated blob name.
        let Some(name) = (unsafe { blob_name(name) }) else { return ffi::TPM_FAIL };
        let blob = if data.is_null() {
            &[][..]
        } else {
            // SAFETY: libtpms passes `length` readable bytes at `data` for the call's duration.
            unsafe { std::slice::from_raw_parts(data, length as usize) }
        };
        let mut g = globals();
        let name = format!("{}{name}", g.prefix);
        let Some(store) = g.store.as_deref_mut() else { return ffi::TPM_FAIL };
        match store.store(&name, blob) {
            Ok(()) => ffi::TPM_SUCCESS,
            Err(e) => {
                log::error!("cannot store TPM state {name}: {e}");
                g.last_error = Some(e);
                ffi::TPM_FAIL
            }
        }
    })
}

unsafe extern "C" fn cb_delete(_tpm: u32, name: *const libc::c_char, _must_exist: u8) -> u32 {
    guarded(|| {
        // SAFETY: libtpms passes a NUL-terminated blob name.
        let Some(name) = (unsafe { blob_name(name) }) else { return ffi::TPM_FAIL };
        let mut g = globals();
        let name = format!("{}{name}", g.prefix);
        let Some(store) = g.store.as_deref_mut() else { return ffi::TPM_FAIL };
        match store.delete(&name) {
            Ok(()) => ffi::TPM_SUCCESS,
            Err(e) => {
                log::error!("cannot delete TPM state {name}: {e}");
                ffi::TPM_FAIL
            }
        }
    })
}

unsafe extern "C" fn cb_locality(locality: *mut u32, _tpm: u32) -> u32 {
    guarded(|| {
        let l = globals().locality;
        // SAFETY: libtpms' out-parameter.
        unsafe { *locality = u32::from(l) };
        ffi::TPM_SUCCESS
    })
}

unsafe extern "C" fn cb_physical_presence(pp: *mut u8, _tpm: u32) -> u32 {
    // A virtual TPM has no physical presence switch; the owner proves presence by policy.
    // SAFETY: libtpms' out-parameter.
    unsafe { *pp = 0 };
    ffi::TPM_SUCCESS
}
