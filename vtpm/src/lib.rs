//! The per-guest vTPM: a TPM 2.0 (or 1.2) engine on libtpms, its encrypted, authenticated,
//! crash-safe state, and the ways clients reach it: swtpm's socket protocol (QEMU, Cloud
//! Hypervisor, libtss2's swtpm TCTI) and Xen's tpmif through tpmback.
//!
//! libtpms holds one TPM per process; [`libtpms::Libtpms`] enforces that. Everything above the
//! engine works on the [`engine::TpmEngine`] trait so it can be tested with a fake.

pub mod engine;
pub mod error;
#[allow(unsafe_code)]
pub mod fdpass;
#[allow(unsafe_code)]
pub mod libtpms;
pub mod linux_probe;
#[allow(unsafe_code)]
pub mod nowait;
pub mod state;
pub mod swtpm;
pub mod tpmif;

pub use engine::{StateKind, TpmEngine, TpmVersion};
pub use error::{Error, Result};
