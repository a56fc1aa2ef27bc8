//! What the xvtpm binaries share as programs rather than as parts of the TPM stack: their man
//! pages and shell completions ([`docs`]), telling systemd they are ready ([`notify`]) and groups by name ([`users`]).

#![forbid(unsafe_code)]

pub mod docs;
pub mod notify;
pub mod users;
