//! Harnesses for the coverage-guided fuzz targets in `fuzz_targets/`, one module per target.
//!
//! Each harness takes the fuzzer's bytes, runs them through the parsers a guest, a client or
//! the disk can reach, and asserts what must hold for every input: no panic, the decoded
//! value re-encodes to bytes that decode to the same value, lengths stay within their bounds,
//! and a rejected input changes nothing. A failed assertion aborts the process, which is what
//! libFuzzer reports as a crash.
//!
//! The harnesses are ordinary functions, so `cargo test` (in this directory) replays the
//! committed seed corpus and the regression inputs through them without libFuzzer.

pub mod mgr_request;
pub mod seeds;
pub mod state_header;
pub mod swtpm_ctrl;
pub mod tis_response;
pub mod tpmif_page;
pub mod xenstore_wire;

/// A harness: one input in, a panic if something that must hold does not.
pub type Harness = fn(&[u8]);

/// Every target: its name (the binary, and the folder under `corpus/` and `regressions/`)
/// and its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("tpmif_page", tpmif_page::run),
    ("xenstore_wire", xenstore_wire::run),
    ("mgr_request", mgr_request::run),
    ("swtpm_ctrl", swtpm_ctrl::run),
    ("state_header", state_header::run),
    ("tis_response", tis_response::run),
];

/// Splits off the first byte, which harnesses with several sub-targets use as the selector.
pub(crate) fn selector(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(&s, rest)| (s, rest))
}
