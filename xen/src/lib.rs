//! Linux user-space interfaces to Xen, as used by a vTPM backend or frontend running in a
//! domain: the xenstore client, event channels, grant mapping and granting, the tpmif v2 shared
//! page, and xenbus states. Every hypervisor-facing piece is a trait with two implementations:
//! the real one on `/dev/xen/*` and xenstored ([`linux`]), and a simulated Xen (`sim`, behind the
//! feature of that name) that works across processes so tests of backend and frontend run
//! without Xen.
//!
//! The `unsafe` code here (ioctls, mmap, atomics on shared memory) lives in the modules that
//! opt in with `#[allow(unsafe_code)]`; the other crates with `unsafe` are `vtpm` (libtpms and
//! its `sys` module), `tis` (`devmem`) and `vtpmmgr` (`peer`).

#![warn(missing_docs)]

pub mod domain;
pub mod error;
pub mod evtchn;
pub mod grant;
pub mod ioreq;
// ioctls and mmap on /dev/xen/*.
#[allow(unsafe_code)]
pub mod linux;
// The mapping of a shared page and the atomics over it.
#[allow(unsafe_code)]
pub mod page;
pub mod platform;
// mmap of the simulated grants and atomics on the shared event channel table.
#[cfg(feature = "sim")]
#[allow(unsafe_code)]
pub mod sim;
pub mod toolstack;
pub mod tpmif;
// eventfd and poll(2).
#[allow(unsafe_code)]
pub mod wake;
pub mod xenbus;
pub mod xenstore;

pub use domain::{DomainInfo, ShutdownReason};
pub use error::{Error, Result, XsErrno};
pub use evtchn::{EventChannel, Port};
pub use grant::{GrantAllocator, GrantMapper, GrantRef};
pub use page::SharedPage;
pub use platform::{open, Xen};
pub use xenbus::XenbusState;
pub use xenstore::{Perm, PermAccess, TxId, WatchEvent, Xenstore};

/// A Xen domain id.
pub type DomId = u16;

/// Size of a Xen page (x86).
pub const PAGE_SIZE: usize = 4096;
