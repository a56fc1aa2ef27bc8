//! libFuzzer entry point; the harness is [`xvtpm_fuzz::mgr_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_fuzz::mgr_request::run(data));
