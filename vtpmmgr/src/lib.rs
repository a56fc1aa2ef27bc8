//! The vTPM manager: every vTPM's state key in an encrypted, authenticated, crash-safe store
//! whose root key only this machine's hardware TPM, in an approved state, releases.

#![warn(missing_docs)]

pub mod admin;
pub mod dispatch;
pub mod error;
pub mod hw;
pub mod manager;
pub mod migrate;
pub mod pace;
pub mod peer;
pub mod server;
pub mod store;

pub use error::{Error, Result};

/// A uuid in its usual text form.
pub fn uuid_str(u: &[u8; 16]) -> String {
    xvtpm_proto::Uuid(*u).to_string()
}

/// What a vTPM runs with, as its transport measured it: SHA-256 of its executable (Unix
/// socket) or of its domain's kernel, ramdisk and command line (Xen).
pub type BootHash = [u8; 32];

/// Lower-case hex (the TIS crate's, already a dependency).
pub use xvtpm_tis::selftest::hex;
