//! The stop signal of one connection, shared by its serving thread and the requests it hands
//! to the handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Setting it takes `write`, which the worker holds while it writes the page: once
/// [`Stop::set`] returns, a stopped worker never touches the page again, even if its handler is
/// still running.
#[derive(Debug, Default)]
pub(crate) struct Stop {
    flag: AtomicBool,
    write: Mutex<()>,
}

impl Stop {
    /// Whether the connection was stopped.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Stops the connection; returns once no page write is in progress.
    pub fn set(&self) {
        let _guard = self.write.lock();
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Held while writing the page (`None`: poisoned, write nothing).
    pub fn write_guard(&self) -> Option<MutexGuard<'_, ()>> {
        self.write.lock().ok()
    }
}
