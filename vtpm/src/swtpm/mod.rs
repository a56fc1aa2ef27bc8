//! swtpm's socket protocol, byte-compatible with swtpm 0.7.1, served over any
//! [`TpmEngine`](crate::engine::TpmEngine): what QEMU, Cloud Hypervisor and libtss2's swtpm
//! TCTI speak.
//!
//! - [`ctrl`]: the control channel's codec (`tpm_ioctl.h`).
//! - [`blob`]: swtpm's container around migrated state blobs.
//! - [`server`]: the server ([`SwtpmServer`]).
//! - [`cli`]: swtpm's `socket` command line ([`parse_swtpm_args`]).
//! - [`launch`]: from that command line to a running server.

pub mod blob;
pub mod cli;
mod conn;
pub use xvtpm_proto::ctrl;
pub mod launch;
pub mod server;
#[cfg(test)]
mod tests;

pub use cli::{parse_swtpm_args, SwtpmInvocation};
pub use server::{Endpoint, LocalityOptions, ServerConfig, StartupType, Stopper, SwtpmServer};
