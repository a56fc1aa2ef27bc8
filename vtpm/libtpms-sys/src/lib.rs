//! Raw declarations of the libtpms 0.9 functions this project uses, from
//! `/usr/include/libtpms/tpm_library.h` and `tpm_tis.h`. No crate on crates.io binds libtpms;
//! the safe wrapper is `xvtpm_vtpm::libtpms`.
//!
//! libtpms keeps one TPM per process in global state; nothing here enforces that.

// The C names, kept as libtpms spells them so they can be checked against its headers.
#![allow(non_camel_case_types, non_snake_case)]

use libc::{c_char, c_int, c_uchar, c_uint};

/// `TPM_RESULT`.
pub type TPM_RESULT = u32;
/// `TPM_BOOL`.
pub type TPM_BOOL = u8;
/// `TPM_MODIFIER_INDICATOR` (the locality).
pub type TPM_MODIFIER_INDICATOR = u32;

/// `TPM_SUCCESS`.
pub const TPM_SUCCESS: TPM_RESULT = 0;
/// `TPM_BAD_PARAMETER`.
pub const TPM_BAD_PARAMETER: TPM_RESULT = 3;
/// `TPM_FAIL`.
pub const TPM_FAIL: TPM_RESULT = 9;
/// `TPM_RETRY`: what an NVRAM load callback returns when there is no such state yet.
pub const TPM_RETRY: TPM_RESULT = 0x800;

/// `TPMLIB_TPMVersion`.
pub const TPMLIB_TPM_VERSION_1_2: c_int = 0;
/// `TPMLIB_TPMVersion`.
pub const TPMLIB_TPM_VERSION_2: c_int = 1;

/// `enum TPMLIB_StateType`.
pub const TPMLIB_STATE_PERMANENT: c_int = 1;
/// `enum TPMLIB_StateType`.
pub const TPMLIB_STATE_VOLATILE: c_int = 2;
/// `enum TPMLIB_StateType`.
pub const TPMLIB_STATE_SAVE_STATE: c_int = 4;

/// `enum TPMLIB_InfoFlags`.
pub const TPMLIB_INFO_TPMSPECIFICATION: c_int = 1;
/// `enum TPMLIB_InfoFlags`.
pub const TPMLIB_INFO_TPMATTRIBUTES: c_int = 2;
/// `enum TPMLIB_InfoFlags`.
pub const TPMLIB_INFO_TPMFEATURES: c_int = 4;

/// NVRAM load callback.
pub type NvramLoad =
    unsafe extern "C" fn(data: *mut *mut c_uchar, length: *mut u32, tpm_number: u32, name: *const c_char) -> TPM_RESULT;
/// NVRAM store callback.
pub type NvramStore =
    unsafe extern "C" fn(data: *const c_uchar, length: u32, tpm_number: u32, name: *const c_char) -> TPM_RESULT;
/// NVRAM delete callback.
pub type NvramDelete = unsafe extern "C" fn(tpm_number: u32, name: *const c_char, must_exist: TPM_BOOL) -> TPM_RESULT;
/// Init callbacks.
pub type InitFn = unsafe extern "C" fn() -> TPM_RESULT;
/// Locality callback.
pub type GetLocality = unsafe extern "C" fn(locality: *mut TPM_MODIFIER_INDICATOR, tpm_number: u32) -> TPM_RESULT;
/// Physical presence callback.
pub type GetPhysicalPresence = unsafe extern "C" fn(pp: *mut TPM_BOOL, tpm_number: u32) -> TPM_RESULT;

/// `struct libtpms_callbacks`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct libtpms_callbacks {
    /// `sizeof(struct libtpms_callbacks)`.
    pub sizeOfStruct: c_int,
    /// Called at init.
    pub tpm_nvram_init: Option<InitFn>,
    /// Loads a named state blob (allocated with `malloc`; libtpms frees it).
    pub tpm_nvram_loaddata: Option<NvramLoad>,
    /// Stores a named state blob.
    pub tpm_nvram_storedata: Option<NvramStore>,
    /// Deletes a named state blob.
    pub tpm_nvram_deletename: Option<NvramDelete>,
    /// Called at init.
    pub tpm_io_init: Option<InitFn>,
    /// Reports the locality of the command being processed.
    pub tpm_io_getlocality: Option<GetLocality>,
    /// Reports physical presence (TPM 1.2).
    pub tpm_io_getphysicalpresence: Option<GetPhysicalPresence>,
}

extern "C" {
    pub fn TPMLIB_GetVersion() -> u32;
    pub fn TPMLIB_ChooseTPMVersion(ver: c_int) -> TPM_RESULT;
    pub fn TPMLIB_MainInit() -> TPM_RESULT;
    pub fn TPMLIB_Terminate();
    pub fn TPMLIB_Process(
        respbuffer: *mut *mut c_uchar,
        resp_size: *mut u32,
        respbufsize: *mut u32,
        command: *mut c_uchar,
        command_size: u32,
    ) -> TPM_RESULT;
    pub fn TPMLIB_VolatileAll_Store(buffer: *mut *mut c_uchar, buflen: *mut u32) -> TPM_RESULT;
    pub fn TPMLIB_CancelCommand() -> TPM_RESULT;
    pub fn TPMLIB_GetInfo(flags: c_int) -> *mut c_char;
    pub fn TPMLIB_RegisterCallbacks(cbs: *mut libtpms_callbacks) -> TPM_RESULT;
    pub fn TPMLIB_SetBufferSize(wanted_size: u32, min_size: *mut u32, max_size: *mut u32) -> u32;
    pub fn TPMLIB_ValidateState(st: c_int, flags: c_uint) -> TPM_RESULT;
    pub fn TPMLIB_SetState(st: c_int, buffer: *const c_uchar, buflen: u32) -> TPM_RESULT;
    pub fn TPMLIB_GetState(st: c_int, buffer: *mut *mut c_uchar, buflen: *mut u32) -> TPM_RESULT;
    pub fn TPMLIB_SetDebugLevel(level: c_uint);
    pub fn TPM_IO_Hash_Start() -> TPM_RESULT;
    pub fn TPM_IO_Hash_Data(data: *const c_uchar, data_length: u32) -> TPM_RESULT;
    pub fn TPM_IO_Hash_End() -> TPM_RESULT;
    pub fn TPM_IO_TpmEstablished_Get(established: *mut TPM_BOOL) -> TPM_RESULT;
    pub fn TPM_IO_TpmEstablished_Reset() -> TPM_RESULT;
}
