//! A simulated Xen for tests: xenstored, grant table and event channels that work across
//! processes sharing one directory.

pub mod xenstored;
