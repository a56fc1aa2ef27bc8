//! The per-guest vTPM: a TPM 2.0 (or 1.2) engine on libtpms, its encrypted, authenticated,
//! crash-safe state, and the ways clients reach it: swtpm's socket protocol (QEMU, Cloud
//! Hypervisor, libtss2's swtpm TCTI), Xen's tpmif through tpmback, and Linux's vTPM proxy
//! (`/dev/vtpmx`) for containers.
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
pub mod malloc;
#[allow(unsafe_code)]
pub mod nowait;
#[allow(unsafe_code)]
pub mod poll;
pub mod proxy;
pub mod proxy_info;
#[allow(unsafe_code)]
pub mod signals;
pub mod state;
pub mod swtpm;
pub mod tpmif;
#[allow(unsafe_code)]
pub mod vtpmx;

pub use engine::{StateKind, TpmEngine, TpmVersion};
pub use error::{Error, Result};
