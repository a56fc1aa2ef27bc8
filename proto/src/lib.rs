//! The wire formats every xvtpm crate shares, in one place and without I/O:
//!
//! - [`tpm`]: TPM command and response basics (big-endian readers, the 10-byte header,
//!   response codes, the Startup/Shutdown/GetRandom builders, error responses);
//! - [`ctrl`]: swtpm's control-channel codec (`tpm_ioctl.h`), used by the vtpm's socket
//!   server and by the swtpm client of the hardware-TPM driver;
//! - [`mgr`]: the vTPM manager protocol (Xen's framing) as typed requests and replies;
//! - [`uuid`]: the [`Uuid`] that names a vTPM; [`Secret`]: bytes whose `Debug` hides them.
//!
//! Every decoder here takes bytes from a peer that may be hostile (a guest, a socket client):
//! it never panics and never reads past what it was given (fuzzed in `fuzz/`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ctrl;
mod error;
pub mod mgr;
mod secret;
pub mod tpm;
pub mod uuid;

pub use error::Error;
pub use secret::Secret;
pub use uuid::Uuid;
