//! Target `tis_response`: the hardware-TPM driver (`xvtpm_tis`) reading responses a broken or
//! hostile TPM gives.
//!
//! Three layers on every input:
//! - the response parsers and the driver over a register window whose every read is the
//!   fuzzer's (the crate's own `fuzz::response_parsers` and `fuzz::driver`, which assert the
//!   size and virtual-time bounds);
//! - `command::response_size` and `check_command` against what the header says;
//! - the driver against the register models (`tis::model`: PTP FIFO, TIS 1.2 FIFO with a
//!   TPM 1.2 or 2.0, CRB) whose TPM answers one command with the fuzzer's bytes. Input:
//!   byte 0 picks the model, byte 1 the locality and the burst count, the rest is the
//!   response.
//!
//! Checked against the models, exactly: a FIFO driver returns a response if and only if it is
//! 10 to 4096 bytes long and its header's size field is its length, and then it is those
//! bytes; a CRB driver (whose buffer has no length of its own) returns one if and only if the
//! size field is within the buffer, and then the bytes the buffer holds; every outcome comes
//! within the virtual-time bound, and the locality is given back.

use std::time::Duration;

use xvtpm_tis::command::{self, check_command, response_size, HEADER_SIZE};
use xvtpm_tis::fifo::MAX_BUFFER;
use xvtpm_tis::model::{simple_backend, CrbModel, FifoModel, CRB_BUFFER_SIZE};
use xvtpm_tis::{Clock, FakeClock, Family, HwTpm, Tis};

/// The command whose response is the fuzzer's: GetCapability's ordinal (a medium duration, so
/// a TPM that never answers costs little virtual time) with a body no probe sends.
pub fn command(family: Family) -> Vec<u8> {
    let tag: [u8; 2] = match family {
        Family::Tpm20 => [0x80, 0x01],
        Family::Tpm12 => [0x00, 0xC1],
    };
    let mut c = tag.to_vec();
    c.extend_from_slice(&16u32.to_be_bytes());
    c.extend_from_slice(&0x0000_017Au32.to_be_bytes());
    c.extend_from_slice(b"fuzz");
    c.extend_from_slice(&[0xF0, 0x0D]);
    c
}

/// Runs one input.
pub fn run(data: &[u8]) {
    xvtpm_tis::fuzz::response_parsers(data);
    xvtpm_tis::fuzz::driver(data);
    header_checks(data);
    if data.len() >= 2 {
        model(data[0], data[1], &data[2..]);
    }
}

fn header_checks(data: &[u8]) {
    let claimed = command::be32(data, 2);
    for max in [HEADER_SIZE, 4096, MAX_BUFFER] {
        match response_size(data, max) {
            Ok(n) => assert_eq!(Some(n as u32), claimed, "size other than the header's"),
            Err(_) => assert!(claimed.is_none_or(|c| !(HEADER_SIZE..=max).contains(&(c as usize)))),
        }
        match check_command(data, max) {
            Ok(ordinal) => {
                assert!((HEADER_SIZE..=max).contains(&data.len()));
                assert_eq!(claimed, Some(data.len() as u32));
                assert_eq!(Some(ordinal), command::be32(data, 6));
            }
            Err(_) => assert!(
                data.len() < HEADER_SIZE || data.len() > max || claimed != Some(data.len() as u32),
                "a well-formed command refused"
            ),
        }
    }
    let _ = command::response_code(data);
}

/// The models' backend: the simple TPM for the probe, the fuzzer's bytes for our command.
fn backend(family: Family, rsp: Vec<u8>) -> xvtpm_tis::model::Backend {
    let mut simple = simple_backend(family);
    let ours = command(family);
    Box::new(move |loc, cmd| if cmd == ours { rsp.clone() } else { simple(loc, cmd) })
}

const BOUND: Duration = xvtpm_tis::fuzz::VIRTUAL_TIME_BOUND;

fn model(which: u8, knobs: u8, rsp: &[u8]) {
    let loc = knobs % 5;
    let burst = 1 + u16::from(knobs / 5) % 64;
    let clock = FakeClock::new();
    let fifo_ok = rsp.len() >= HEADER_SIZE && rsp.len() <= 4096 && command::be32(rsp, 2) == Some(rsp.len() as u32);
    match which % 4 {
        m @ 0..=2 => {
            let (family, ptp) = [(Family::Tpm20, true), (Family::Tpm12, false), (Family::Tpm20, false)][usize::from(m)];
            let mut model = FifoModel::new(clock.clone(), family, ptp, backend(family, rsp.to_vec()));
            model.burst = burst;
            let mut tis = Tis::probe(model, clock.clone()).expect("the model probes");
            assert_eq!(tis.info().family, family);
            let got = tis.transmit(loc, &command(family));
            match got {
                Ok(r) => {
                    assert!(fifo_ok, "a response of {} bytes claiming {:?} accepted", rsp.len(), command::be32(rsp, 2));
                    assert_eq!(r, rsp, "the response changed on its way");
                }
                Err(e) => assert!(!fifo_ok, "a well-formed response refused: {e}"),
            }
            assert_eq!(tis.mmio_mut().active_locality(), None, "locality kept");
        }
        _ => {
            let mut model = CrbModel::new(clock.clone(), backend(Family::Tpm20, rsp.to_vec()));
            model.exec_time = Duration::from_micros(u64::from(knobs) * 10);
            let mut tis = Tis::probe(model, clock.clone()).expect("the model probes");
            let cmd = command(Family::Tpm20);
            let got = tis.transmit(loc, &cmd);
            // What the buffer holds after the command: the response over the command.
            let mut buffer = cmd.clone();
            let n = rsp.len().min(CRB_BUFFER_SIZE as usize);
            if buffer.len() < n {
                buffer.resize(n, 0);
            }
            buffer[..n].copy_from_slice(&rsp[..n]);
            let claimed = command::be32(&buffer, 2).map(|c| c as usize);
            let crb_ok = claimed.is_some_and(|c| (HEADER_SIZE..=CRB_BUFFER_SIZE as usize).contains(&c));
            match got {
                Ok(r) => {
                    assert!(crb_ok, "a CRB response claiming {claimed:?} bytes accepted");
                    let known = r.len().min(buffer.len());
                    assert_eq!(r[..known], buffer[..known], "the response is not what the buffer holds");
                }
                Err(e) => assert!(!crb_ok, "a well-formed CRB response refused: {e}"),
            }
            assert_eq!(tis.mmio_mut().active_locality(), None, "locality kept");
        }
    }
    assert!(clock.now() <= BOUND, "took {:?} of virtual time", clock.now());
}
