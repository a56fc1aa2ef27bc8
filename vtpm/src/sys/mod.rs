//! The vTPM's calls into the C library that std does not wrap: descriptor passing
//! (`fdpass`), `poll(2)` (`poll`), a non-blocking `recv` (`nowait`), malloc's arena count
//! (`malloc`), signal handlers (`signals`), waiting for a child without reaping it (`child`),
//! the vTPM proxy's ioctl (`vtpmx`), a vtpm's sandbox (`sandbox`, its system-call filter
//! `seccomp`) and a daemon's capabilities (`caps`). Each module
//! keeps its `unsafe` to the FFI call itself, with a `// SAFETY:` argument per block, and
//! offers a safe function; nothing outside `sys` (and the libtpms binding) needs `unsafe`.

pub mod caps;
pub mod child;
pub mod fdpass;
pub mod malloc;
pub mod nowait;
pub mod poll;
pub mod sandbox;
pub mod seccomp;
pub mod signals;
pub mod vtpmx;
