//! libFuzzer entry point; the harness is [`xvtpm_fuzz::tis_response`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_fuzz::tis_response::run(data));
