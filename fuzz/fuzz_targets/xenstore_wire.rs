//! libFuzzer entry point; the harness is [`xvtpm_fuzz::xenstore_wire`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_fuzz::xenstore_wire::run(data));
