//! libFuzzer entry point; the harness is [`xvtpm_fuzz::swtpm_ctrl`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_fuzz::swtpm_ctrl::run(data));
