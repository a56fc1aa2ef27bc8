//! The per-guest vTPM: a TPM 2.0 (or 1.2) engine on libtpms, its encrypted, authenticated,
//! crash-safe state, and the ways clients reach it: swtpm's socket protocol (QEMU, Cloud
//! Hypervisor, libtss2's swtpm TCTI), Xen's tpmif through tpmback, and Linux's vTPM proxy
//! (`/dev/vtpmx`) for containers.
//!
//! libtpms holds one TPM per process; [`libtpms::Libtpms`] enforces that. Everything above the
//! engine works on the [`engine::TpmEngine`] trait so it can be tested with a fake.

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod hvm;
// FFI to libtpms.
#[allow(unsafe_code)]
pub mod libtpms;
pub mod linux_probe;
pub mod proxy;
pub mod proxy_info;
pub mod snapshot;
pub mod state;
pub mod swtpm;
// libc calls std does not wrap (ioctl, poll, recvmsg, mallopt, sigaction): the one place
// besides the libtpms binding where `unsafe` is allowed.
#[allow(unsafe_code)]
pub mod sys;
pub mod tpmif;

pub use engine::{StateKind, TpmEngine, TpmVersion};
pub use error::{Error, Result};
