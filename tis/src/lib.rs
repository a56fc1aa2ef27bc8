//! The hardware TPM driver: TIS 1.2 FIFO, the TPM 2.0 PTP FIFO and CRB, over an [`Mmio`]
//! window (real through `/dev/mem`, or a register model in tests: `model` and `fuzz`, behind the
//! `test-utils` feature), and the [`HwTpm`] trait the
//! manager uses, implemented by this driver, by the kernel's `/dev/tpmrm0` and by a socket to
//! swtpm.
//!
//! A broken or hostile TPM never hangs the driver: every wait is bounded by the interface
//! timeouts (A-D) or the command's duration, and every response length is checked.

#![warn(missing_docs)]

pub mod clock;
pub mod command;
pub mod crb;
// mmap of /dev/mem: the TPM's registers.
#[allow(unsafe_code)]
pub mod devmem;
pub mod devtpm;
pub mod error;
pub mod fifo;
#[cfg(feature = "test-utils")]
pub mod fuzz;
pub mod hwtpm;
pub mod mmio;
#[cfg(feature = "test-utils")]
pub mod model;
#[cfg(feature = "test-utils")]
pub mod nvcount;
pub mod regs;
pub mod selftest;
pub mod swtpm;
pub mod timeouts;
// `tis::tis`: the crate is named for the interface, and so is its driver.
#[allow(clippy::module_inception)]
pub mod tis;

pub use clock::{Clock, FakeClock, SystemClock};
pub use error::{Error, Result};
pub use hwtpm::{Family, HwTpm};
pub use mmio::Mmio;
pub use tis::{DeviceInfo, Interface, Tis};
