//! tpmback.
#![forbid(unsafe_code)]
