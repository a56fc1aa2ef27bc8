//! tpmback: the backend of Xen's vtpm device (tpmif v2).
//!
//! A [`Backend`] watches `backend/vtpm` of its own domain in xenstore and serves any number of
//! `(frontend domid, handle)` devices, each identified by the `uuid` libxl wrote. It performs
//! the xenbus handshake the stock Linux `xen-tpmfront` expects, maps the shared page, binds the
//! event channel, and hands every command to a [`CommandHandler`]. A backend of every device of
//! its domain serves them on a few threads, in turn (a device that never stops firing waits
//! behind the others); one of a single device serves it on the thread that waits for it.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
mod error;
mod handler;
mod machine;
mod pool;
mod stop;
mod worker;

pub use backend::{Backend, BackendConfig, BackendHandle, DeviceFilter, StopSignal};
pub use error::{Error, Result};
pub use handler::{CancelProbe, CommandHandler, DeviceInfo, EchoHandler, Request};
