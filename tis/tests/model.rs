//! The driver against register-level models of FIFO and CRB TPMs: the happy paths and every
//! way the issue lists for a TPM to misbehave, each ending in its typed error within its
//! timeout (virtual time).

use std::time::Duration;

use xvtpm_tis::model::{simple_backend, CrbModel, FifoModel, WINDOW_END};
use xvtpm_tis::{Clock, Error, FakeClock, Family, HwTpm, Interface, Tis};

const GET_RANDOM_16: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16];

/// A TPM 2.0 command of `size` bytes with a counting body (the model's backend echoes it).
fn big_command(size: usize) -> Vec<u8> {
    let mut c = vec![0x80, 0x01];
    c.extend_from_slice(&(size as u32).to_be_bytes());
    c.extend_from_slice(&0x0000_0199u32.to_be_bytes());
    c.extend((0..size - 10).map(|i| (i * 7) as u8));
    c
}

fn fifo(family: Family, ptp: bool) -> (Tis<FifoModel, FakeClock>, FakeClock) {
    let clock = FakeClock::new();
    let model = FifoModel::new(clock.clone(), family, ptp, simple_backend(family));
    (Tis::probe(model, clock.clone()).expect("probe"), clock)
}

fn crb() -> (Tis<CrbModel, FakeClock>, FakeClock) {
    let clock = FakeClock::new();
    let model = CrbModel::new(clock.clone(), simple_backend(Family::Tpm20));
    (Tis::probe(model, clock.clone()).expect("probe"), clock)
}

/// Runs `f` and checks it took at least `min` and at most `max` of virtual time.
fn timed<T>(clock: &FakeClock, min: Duration, max: Duration, f: impl FnOnce() -> T) -> T {
    let start = clock.now();
    let r = f();
    let took = clock.now() - start;
    assert!(took >= min && took <= max, "took {took:?}, expected {min:?}..={max:?}");
    r
}

const SLACK: Duration = Duration::from_millis(5);

#[test]
fn probes_and_transmits_on_every_interface() {
    for (family, ptp, iface) in [
        (Family::Tpm20, true, Interface::PtpFifo),
        (Family::Tpm12, false, Interface::Tis),
        (Family::Tpm20, false, Interface::Tis),
    ] {
        let (mut tis, _) = fifo(family, ptp);
        assert_eq!((tis.info().family, tis.info().interface), (family, iface));
        assert_eq!((tis.info().vendor_id, tis.info().device_id, tis.info().revision), (0x1014, 0x0001, 1));
        let rsp = tis.transmit(0, &GET_RANDOM_16).expect("GetRandom");
        if family == Family::Tpm20 {
            assert_eq!(rsp.len(), 28);
            assert_eq!(&rsp[12..], (0..16).collect::<Vec<u8>>());
        }
        assert_eq!(tis.mmio_mut().active_locality(), None, "locality given back");
    }
    let (mut tis, _) = crb();
    assert_eq!((tis.info().family, tis.info().interface), (Family::Tpm20, Interface::Crb));
    assert_eq!(tis.transmit(0, &GET_RANDOM_16).expect("GetRandom").len(), 28);
    assert_eq!(tis.mmio_mut().active_locality(), None);
}

#[test]
fn large_commands_and_localities() {
    let cmd = big_command(3500);
    let (mut tis, _) = fifo(Family::Tpm20, true);
    assert_eq!(tis.max_buffer(), Some(4096), "from TPM_PT_MAX_COMMAND_SIZE");
    let rsp = tis.transmit(2, &cmd).expect("3500-byte command");
    assert_eq!(&rsp[10..], &cmd[10..], "every byte crossed the FIFO in bursts of 32");
    assert_eq!(tis.mmio_mut().executed.last().map(|(l, c)| (*l, c.len())), Some((2, 3500)));
    let (mut tis, _) = crb();
    let rsp = tis.transmit(3, &cmd).expect("3500-byte command");
    assert_eq!(&rsp[10..], &cmd[10..]);
    assert_eq!(tis.mmio_mut().executed.last().map(|(l, _)| *l), Some(3));
    assert!(matches!(tis.transmit(5, &GET_RANDOM_16), Err(Error::Locality { locality: 5, .. })));
    // A CRB without CapLocality (QEMU's) refuses other localities at once.
    let clock = FakeClock::new();
    let mut model = CrbModel::new(clock.clone(), simple_backend(Family::Tpm20));
    model.faults.crb_locality0_only = true;
    let mut only0 = Tis::probe(model, clock.clone()).expect("probe");
    let e = timed(&clock, Duration::ZERO, SLACK, || only0.transmit(2, &GET_RANDOM_16)).expect_err("locality 2");
    assert!(matches!(e, Error::Locality { locality: 2, .. }), "{e}");
    only0.transmit(0, &GET_RANDOM_16).expect("locality 0");
    assert!(matches!(tis.transmit(0, &big_command(4000)), Err(Error::BadCommand { .. })), "CRB buffer is 3968");
}

#[test]
fn a_locality_left_active_is_taken_over() {
    let (mut tis, _) = fifo(Family::Tpm20, true);
    // Firmware left locality 0 active.
    xvtpm_tis::Mmio::write8(tis.mmio_mut(), 0, 0x02);
    assert_eq!(tis.mmio_mut().active_locality(), Some(0));
    tis.transmit(2, &GET_RANDOM_16).expect("locality 2 after 0 is relinquished");
    assert_eq!(tis.mmio_mut().executed.last().map(|(l, _)| *l), Some(2));
}

#[test]
fn fifo_locality_never_granted() {
    for (family, ptp) in [(Family::Tpm20, true), (Family::Tpm12, false)] {
        let (mut tis, clock) = fifo(family, ptp);
        tis.mmio_mut().faults.never_grant = true;
        let a = tis.timeouts().a;
        let e = timed(&clock, a, a + SLACK, || tis.transmit(1, &GET_RANDOM_16)).expect_err("no locality");
        assert!(matches!(e, Error::LocalityNotGranted { locality: 1, .. }), "{e}");
    }
}

#[test]
fn fifo_never_ready() {
    let (mut tis, clock) = fifo(Family::Tpm20, true);
    tis.mmio_mut().faults.never_ready = true;
    // Leave the model idle (not ready) as after a previous command's commandReady was ignored.
    let b = tis.timeouts().b;
    let e = timed(&clock, b, b + SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("never ready");
    assert!(matches!(e, Error::NotReady(_)), "{e}");
}

#[test]
fn fifo_burst_count_stuck_at_zero() {
    let (mut tis, clock) = fifo(Family::Tpm20, true);
    tis.mmio_mut().faults.burst_zero = true;
    let d = tis.timeouts().d;
    let e = timed(&clock, d, d + SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("burst 0");
    assert!(matches!(e, Error::BurstCountZero(_)), "{e}");
}

#[test]
fn fifo_expect_misreported() {
    let (mut tis, _) = fifo(Family::Tpm20, true);
    tis.mmio_mut().faults.expect_early = true;
    let e = tis.transmit(0, &big_command(200)).expect_err("expect dropped early");
    assert!(matches!(e, Error::ExpectMismatch { what: "stopped expecting data", .. }), "{e}");
    tis.mmio_mut().faults.expect_early = false;
    tis.mmio_mut().faults.expect_stuck = true;
    let e = tis.transmit(0, &big_command(200)).expect_err("expect stuck");
    assert!(matches!(e, Error::ExpectMismatch { what: "still expects data", sent: 200, total: 200 }), "{e}");
    tis.mmio_mut().faults.expect_stuck = false;
    tis.transmit(0, &GET_RANDOM_16).expect("the next command works");
}

#[test]
fn fifo_response_lengths_that_lie() {
    let (mut tis, clock) = fifo(Family::Tpm20, true);
    // Fewer bytes than the header claims: the wait for more ends after timeout C.
    tis.mmio_mut().faults.truncate = 5;
    let c = tis.timeouts().c;
    let e = timed(&clock, c, c + tis.timeouts().b, || tis.transmit(0, &GET_RANDOM_16)).expect_err("short");
    assert!(matches!(e, Error::ResponseShort { got: 23, claimed: 28 }), "{e}");
    tis.mmio_mut().faults.truncate = 0;
    tis.mmio_mut().faults.extra = 7;
    let e = tis.transmit(0, &GET_RANDOM_16).expect_err("long");
    assert!(matches!(e, Error::ResponseLong { claimed: 28 }), "{e}");
    tis.mmio_mut().faults.extra = 0;
    for (claim, short) in [(20u32, false), (40, true)] {
        tis.mmio_mut().faults.claim_size = Some(claim);
        let e = tis.transmit(0, &GET_RANDOM_16).expect_err("size lies");
        match short {
            true => assert!(matches!(e, Error::ResponseShort { got: 28, claimed: 40 }), "{e}"),
            false => assert!(matches!(e, Error::ResponseLong { claimed: 20 }), "{e}"),
        }
    }
    tis.mmio_mut().faults.claim_size = Some(u32::MAX);
    let e = timed(&clock, Duration::ZERO, SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("4 GiB");
    assert!(matches!(e, Error::ResponseSize { claimed: 0xFFFF_FFFF, .. }), "{e}");
    tis.mmio_mut().faults.claim_size = None;
    tis.transmit(0, &GET_RANDOM_16).expect("the next command works");
}

#[test]
fn fifo_command_that_never_completes_is_cancelled() {
    for (family, ptp) in [(Family::Tpm20, true), (Family::Tpm12, false)] {
        let (mut tis, clock) = fifo(family, ptp);
        tis.mmio_mut().faults.never_completes = true;
        let limit = tis.durations().for_ordinal(family, 0x17B);
        let e = timed(&clock, limit, limit + SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("hangs");
        assert!(matches!(e, Error::CommandTimeout { ordinal: 0x17B, .. }), "{e}");
        assert_eq!(tis.mmio_mut().cancels, usize::from(ptp), "commandCancel only on the PTP FIFO");
        tis.mmio_mut().faults.never_completes = false;
        tis.transmit(0, &GET_RANDOM_16).expect("the next command works");
    }
}

#[test]
fn crb_failures() {
    let (mut tis, clock) = crb();
    let t = tis.timeouts();
    tis.mmio_mut().faults.never_grant = true;
    let e = timed(&clock, t.a, t.a + SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("no locality");
    assert!(matches!(e, Error::LocalityNotGranted { .. }), "{e}");
    tis.mmio_mut().faults.never_grant = false;

    tis.mmio_mut().faults.never_ready = true;
    let e = timed(&clock, t.b, t.b + SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("not ready");
    assert!(matches!(e, Error::NotReady(_)), "{e}");
    tis.mmio_mut().faults.never_ready = false;

    tis.mmio_mut().faults.never_completes = true;
    let limit = tis.durations().for_ordinal(Family::Tpm20, 0x17B);
    let e = timed(&clock, limit, limit + t.b + SLACK, || tis.transmit(0, &GET_RANDOM_16)).expect_err("hangs");
    assert!(matches!(e, Error::CommandTimeout { .. }), "{e}");
    assert_eq!(tis.mmio_mut().cancels, 1);
    tis.mmio_mut().faults.never_completes = false;

    tis.mmio_mut().faults.claim_size = Some(u32::MAX);
    let e = tis.transmit(0, &GET_RANDOM_16).expect_err("4 GiB");
    assert!(matches!(e, Error::ResponseSize { claimed: 0xFFFF_FFFF, max: 0xF80, .. }), "{e}");
    tis.mmio_mut().faults.claim_size = None;

    tis.mmio_mut().faults.crb_cmd_addr = Some(WINDOW_END);
    let e = tis.transmit(0, &GET_RANDOM_16).expect_err("buffer outside");
    assert!(matches!(e, Error::CrbBuffer(_)), "{e}");
    tis.mmio_mut().faults.crb_cmd_addr = None;

    tis.mmio_mut().faults.fatal = true;
    let e = tis.transmit(0, &GET_RANDOM_16).expect_err("fatal");
    assert!(matches!(e, Error::CrbFatal(_)), "{e}");
}

#[test]
fn nothing_at_the_window() {
    let clock = FakeClock::new();
    let e = Tis::probe(xvtpm_tis::fuzz::HostileMmio::new(&[], clock.clone()), clock).expect_err("no device");
    assert!(matches!(e, Error::NoDevice(_)), "{e}");
}
