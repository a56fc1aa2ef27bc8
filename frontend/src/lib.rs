//! tpmfront.
#![forbid(unsafe_code)]
