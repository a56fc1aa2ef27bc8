//! Fuzz targets: the response parsers, and the whole driver (probe, then a command) over a
//! hostile register window whose every read comes from the fuzzer's bytes. Whatever the
//! input, the driver must return (no hang: virtual time is bounded), never panic, and hand
//! out only responses whose header matches their length.
//!
//! `cargo test` runs them over seeded random inputs; the `tis_response` target of `fuzz/` runs them under libFuzzer.

use std::time::Duration;

use crate::clock::{Clock, FakeClock};
use crate::command::{self, probe, HEADER_SIZE};
use crate::fifo::MAX_BUFFER;
use crate::mmio::Mmio;
use crate::{HwTpm, Tis};

/// A register window that answers every read with the next bytes of `data` (then all ones)
/// and ignores writes. Each access costs virtual time.
#[derive(Debug)]
pub struct HostileMmio<'a> {
    data: &'a [u8],
    clock: FakeClock,
}

impl<'a> HostileMmio<'a> {
    /// A window reading from `data`.
    pub fn new(data: &'a [u8], clock: FakeClock) -> Self {
        Self { data, clock }
    }

    fn take(&mut self, n: usize) -> u32 {
        self.clock.advance(Duration::from_micros(1));
        let mut v = 0u32;
        for i in 0..n {
            let b = match self.data.split_first() {
                Some((&b, rest)) => {
                    self.data = rest;
                    b
                }
                None => 0xFF,
            };
            v |= u32::from(b) << (8 * i);
        }
        v
    }
}

impl Mmio for HostileMmio<'_> {
    fn read8(&mut self, _offset: u32) -> u8 {
        self.take(1) as u8
    }
    fn read32(&mut self, _offset: u32) -> u32 {
        self.take(4)
    }
    fn write8(&mut self, _offset: u32, _value: u8) {
        self.clock.advance(Duration::from_micros(1));
    }
    fn write32(&mut self, _offset: u32, _value: u32) {
        self.clock.advance(Duration::from_micros(1));
    }
}

/// Longest virtual time one probe plus one command may take against any register values:
/// the probe's commands and the command each wait at most timeouts A-D and one duration.
pub const VIRTUAL_TIME_BOUND: Duration = Duration::from_secs(3600);

/// Target: the parsers of TPM responses.
pub fn response_parsers(data: &[u8]) {
    if let Ok(n) = command::response_size(data, MAX_BUFFER) {
        assert!((HEADER_SIZE..=MAX_BUFFER).contains(&n));
    }
    let _ = command::check_command(data, MAX_BUFFER);
    if let Some(props) = probe::parse_tpm2_properties(data) {
        assert!(props.len() * 8 <= data.len());
    }
    let _ = probe::parse_tpm12_u32s::<4>(data);
    let _ = probe::parse_tpm12_u32s::<3>(data);
    let _ = probe::is_tpm2_response(data);
}

/// Target: probe the hostile window, then send a GetRandom at the locality the first byte
/// picks.
pub fn driver(data: &[u8]) {
    let (loc, regs) = match data.split_first() {
        Some((&l, rest)) => (l % 6, rest),
        None => (0, data),
    };
    let clock = FakeClock::new();
    let mmio = HostileMmio::new(regs, clock.clone());
    if let Ok(mut tis) = Tis::probe(mmio, clock.clone()) {
        let cmd = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16];
        if let Ok(rsp) = tis.transmit(loc, &cmd) {
            assert!(rsp.len() >= HEADER_SIZE);
            assert_eq!(command::response_size(&rsp, usize::MAX).ok(), Some(rsp.len()));
        }
    }
    assert!(clock.now() <= VIRTUAL_TIME_BOUND, "took {:?} of virtual time", clock.now());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic inputs without a dependency.
    fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut s = seed;
        let mut next = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        (0..count).map(move |_| {
            let len = (next() as usize) % max_len;
            // Bias towards the values registers use (0, all ones, single bits) so the state
            // machine gets past its first checks.
            (0..len)
                .map(|_| match next() % 8 {
                    0 => 0x00,
                    1 => 0xFF,
                    2 => 0xA0 | (next() as u8 & 0x1F),
                    3 => 1 << (next() % 8),
                    _ => next() as u8,
                })
                .collect()
        })
    }

    #[test]
    fn parsers_survive_random_responses() {
        for input in inputs(1, 20_000, 64) {
            response_parsers(&input);
        }
    }

    #[test]
    fn driver_survives_a_hostile_register_window() {
        for input in inputs(2, 3_000, 512) {
            driver(&input);
        }
    }
}
