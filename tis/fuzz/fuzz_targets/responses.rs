//! The parsers of TPM responses.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_tis::fuzz::response_parsers(data));
