//! The whole driver (probe, then one command) over a register window the fuzzer controls.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xvtpm_tis::fuzz::driver(data));
