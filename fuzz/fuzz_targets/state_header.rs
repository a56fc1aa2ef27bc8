//! libFuzzer entry point; the harness is [`xvtpm_fuzz::state_header`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_fuzz::state_header::run(data));
