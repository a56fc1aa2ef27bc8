//! libFuzzer entry point; the harness is [`xvtpm_fuzz::tpmif_page`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_fuzz::tpmif_page::run(data));
