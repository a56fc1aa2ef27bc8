//! tpmfront: the client end of a Xen vtpm device, in user space.
//!
//! The vTPM uses it to reach the manager, and tests and tools use it to reach a vTPM, exactly
//! as a guest kernel's `xen-tpmfront` does: grant a page, allocate an event channel, publish
//! them in one xenstore transaction, wait for the backend, then exchange commands through the
//! shared page.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod error;
mod frontend;

pub use error::{Error, Result};
pub use frontend::{Frontend, FrontendConfig};
