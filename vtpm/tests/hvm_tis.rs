//! The HVM guest's TPM registers (`hvm::tis`) driven by our own TIS driver (the one the manager
//! uses for the hardware TPM) and by hostile access sequences; and the serving loop behind an
//! ioreq server, with commands on their own thread.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xvtpm_tis::mmio::{loc_reg, Mmio, TPM_BASE, WINDOW_LEN};
use xvtpm_tis::model::{simple_backend, Backend};
use xvtpm_tis::regs::fifo;
use xvtpm_tis::tis::{Interface, Tis};
use xvtpm_tis::{Family, HwTpm, SystemClock};
use xvtpm_vtpm::hvm::serve::TisServer;
use xvtpm_vtpm::hvm::tis::{Action, TisDevice, DID_VID, MAX_BUFFER};
use xvtpm_vtpm::TpmVersion;
use xvtpm_xen::ioreq::{IoRequest, IoreqServer, TYPE_COPY};

/// The device with each command executed at once by `backend`.
struct Wired {
    dev: TisDevice,
    backend: Backend,
    executed: Vec<(u8, Vec<u8>)>,
}

impl Wired {
    fn new(version: TpmVersion) -> Self {
        let family = if version == TpmVersion::V2_0 { Family::Tpm20 } else { Family::Tpm12 };
        Wired { dev: TisDevice::new(version), backend: simple_backend(family), executed: Vec::new() }
    }

    fn act(&mut self, a: Action) {
        if let Action::Execute { seq, locality, command } = a {
            let r = (self.backend)(locality, &command);
            self.executed.push((locality, command));
            assert!(self.dev.complete(seq, r));
        }
    }
}

impl Mmio for Wired {
    fn read8(&mut self, offset: u32) -> u8 {
        self.dev.read(offset.into(), 1) as u8
    }
    fn read32(&mut self, offset: u32) -> u32 {
        self.dev.read(offset.into(), 4) as u32
    }
    fn write8(&mut self, offset: u32, value: u8) {
        let a = self.dev.write(offset.into(), 1, value.into());
        self.act(a);
    }
    fn write32(&mut self, offset: u32, value: u32) {
        let a = self.dev.write(offset.into(), 4, value.into());
        self.act(a);
    }
}

fn get_random(n: u16) -> Vec<u8> {
    let mut c = vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B];
    c.extend_from_slice(&n.to_be_bytes());
    c
}

#[test]
fn our_driver_finds_a_ptp_fifo_tpm2_and_runs_commands_at_each_locality() {
    let mut tis = Tis::probe(Wired::new(TpmVersion::V2_0), SystemClock::default()).expect("probe");
    let info = tis.info();
    assert_eq!(info.interface, Interface::PtpFifo);
    assert_eq!(info.family, Family::Tpm20);
    assert_eq!((u32::from(info.device_id) << 16) | u32::from(info.vendor_id), DID_VID);
    for loc in [0u8, 3, 1] {
        let rsp = tis.transmit(loc, &get_random(32)).expect("GetRandom");
        assert_eq!(rsp.len(), 12 + 32);
        assert_eq!(&rsp[12..], (0..32).collect::<Vec<u8>>().as_slice());
        assert_eq!(tis.mmio_mut().executed.last().map(|e| e.0), Some(loc));
    }
    // A command as large as the buffer goes through whole (the model echoes the body).
    let mut big = vec![0x80, 0x01, 0, 0, 0x10, 0x00, 0, 0, 0x01, 0x99];
    big.extend((0..MAX_BUFFER - 10).map(|i| (i * 7) as u8));
    let rsp = tis.transmit(0, &big).expect("a full buffer");
    assert_eq!(&rsp[10..], &big[10..]);
    assert_eq!(tis.mmio_mut().dev.active_locality(), None, "the driver relinquished");
}

#[test]
fn our_driver_finds_a_tis_tpm12() {
    let mut tis = Tis::probe(Wired::new(TpmVersion::V1_2), SystemClock::default()).expect("probe");
    assert_eq!(tis.info().interface, Interface::Tis);
    assert_eq!(tis.info().family, Family::Tpm12);
    let rsp = tis.transmit(0, &[0x00, 0xC1, 0, 0, 0, 10, 0, 0, 0, 0x46]).expect("a 1.2 command");
    assert_eq!(&rsp[..2], &[0x00, 0xC4]);
}

fn sts(m: &mut Wired, loc: u8) -> u32 {
    m.read32(loc_reg(loc, fifo::STS))
}

fn request(m: &mut Wired, loc: u8) {
    m.write8(loc_reg(loc, fifo::ACCESS), fifo::ACCESS_REQUEST_USE);
}

#[test]
fn localities_wait_their_turn_and_a_higher_one_may_seize() {
    let mut m = Wired::new(TpmVersion::V2_0);
    request(&mut m, 0);
    assert_eq!(m.dev.active_locality(), Some(0));
    request(&mut m, 2);
    assert_eq!(m.dev.active_locality(), Some(0), "granted only once 0 lets go");
    let a0 = m.read8(loc_reg(0, fifo::ACCESS));
    assert_ne!(a0 & fifo::ACCESS_PENDING_REQUEST, 0, "0 sees 2 waiting");
    // Another locality reads STS and the FIFO as all ones, and cannot write them.
    assert_eq!(sts(&mut m, 2), u32::MAX);
    m.write8(loc_reg(2, fifo::STS), fifo::STS_COMMAND_READY as u8);
    assert_eq!(sts(&mut m, 0) & fifo::STS_COMMAND_READY, 0);
    m.write8(loc_reg(0, fifo::ACCESS), fifo::ACCESS_ACTIVE_LOCALITY);
    assert_eq!(m.dev.active_locality(), Some(2));
    // 4 seizes from 2; 2 is told.
    m.write8(loc_reg(4, fifo::ACCESS), fifo::ACCESS_SEIZE);
    assert_eq!(m.dev.active_locality(), Some(4));
    assert_ne!(m.read8(loc_reg(2, fifo::ACCESS)) & fifo::ACCESS_BEEN_SEIZED, 0);
    // A lower locality cannot seize.
    m.write8(loc_reg(1, fifo::ACCESS), fifo::ACCESS_SEIZE);
    assert_eq!(m.dev.active_locality(), Some(4));
}

/// Writes `bytes` into locality 0's FIFO, one byte per access, as Linux's driver does.
fn send(m: &mut TisDevice, bytes: &[u8]) -> Vec<Action> {
    let mut actions = Vec::new();
    for b in bytes {
        actions.push(m.write(u64::from(loc_reg(0, fifo::DATA_FIFO)), 1, u64::from(*b)));
    }
    actions.retain(|a| *a != Action::None);
    actions
}

#[test]
fn expect_guards_tpm_go_and_extra_bytes_are_dropped() {
    let mut d = TisDevice::new(TpmVersion::V2_0);
    d.write(u64::from(loc_reg(0, fifo::ACCESS)), 1, fifo::ACCESS_REQUEST_USE.into());
    d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_COMMAND_READY.into());
    let cmd = get_random(8);
    send(&mut d, &cmd[..7]);
    let s = d.read(u64::from(loc_reg(0, fifo::STS)), 4) as u32;
    assert_ne!(s & fifo::STS_EXPECT, 0, "mid-command");
    assert_eq!(d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_GO.into()), Action::None, "go ignored");
    send(&mut d, &cmd[7..]);
    send(&mut d, &[0xAA, 0xBB]);
    let s = d.read(u64::from(loc_reg(0, fifo::STS)), 4) as u32;
    assert_eq!(s & fifo::STS_EXPECT, 0);
    match d.write(u64::from(loc_reg(0, fifo::STS)), 4, fifo::STS_GO.into()) {
        Action::Execute { command, locality: 0, .. } => assert_eq!(command, cmd, "the extra bytes dropped"),
        a => panic!("{a:?}"),
    }
}

#[test]
fn an_aborted_command_cancels_and_its_late_response_is_dropped() {
    let mut d = TisDevice::new(TpmVersion::V2_0);
    d.write(u64::from(loc_reg(0, fifo::ACCESS)), 1, fifo::ACCESS_REQUEST_USE.into());
    d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_COMMAND_READY.into());
    send(&mut d, &get_random(8));
    let Action::Execute { seq, .. } = d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_GO.into()) else {
        panic!("not executed")
    };
    assert!(d.executing());
    // PTP's commandCancel (byte 3 of TPM_STS) asks to cancel without aborting.
    assert_eq!(d.write(u64::from(loc_reg(0, fifo::STS) + 3), 1, 1), Action::Cancel);
    assert!(d.executing());
    // commandReady aborts: the response that comes later is not the guest's to read.
    assert_eq!(d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_COMMAND_READY.into()), Action::Cancel);
    assert!(!d.complete(seq, vec![0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0]));
    let s = d.read(u64::from(loc_reg(0, fifo::STS)), 4) as u32;
    assert_eq!(s & fifo::STS_DATA_AVAIL, 0);
    assert_ne!(s & fifo::STS_COMMAND_READY, 0);
}

#[test]
fn the_response_reads_once_and_retry_rewinds() {
    let mut d = TisDevice::new(TpmVersion::V2_0);
    d.write(u64::from(loc_reg(0, fifo::ACCESS)), 1, fifo::ACCESS_REQUEST_USE.into());
    d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_COMMAND_READY.into());
    send(&mut d, &get_random(8));
    let Action::Execute { seq, .. } = d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_GO.into()) else {
        panic!()
    };
    let rsp: Vec<u8> = vec![0x80, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0xAB, 0xCD];
    assert!(d.complete(seq, rsp.clone()));
    let fifo_at = u64::from(loc_reg(0, fifo::DATA_FIFO));
    // Four bytes at a time through the FIFO, the rest by the wider XDATA_FIFO.
    let first = d.read(fifo_at, 4) as u32;
    assert_eq!(first.to_le_bytes(), [0x80, 1, 0, 0]);
    let burst = (d.read(u64::from(loc_reg(0, fifo::STS)), 4) as u32 >> 8) & 0xFFFF;
    assert_eq!(burst, 8);
    let rest: Vec<u8> = (0..8).map(|_| d.read(u64::from(loc_reg(0, 0x80)), 1) as u8).collect();
    assert_eq!(rest, rsp[4..]);
    assert_eq!(d.read(u64::from(loc_reg(0, fifo::STS)), 4) as u32 & fifo::STS_DATA_AVAIL, 0);
    assert_eq!(d.read(fifo_at, 1), 0xFF, "past the end");
    d.write(u64::from(loc_reg(0, fifo::STS)), 1, fifo::STS_RESPONSE_RETRY.into());
    assert_eq!(d.read(fifo_at, 1), 0x80);
}

#[test]
fn sts_never_shows_the_bits_that_read_zero() {
    // Linux dumps a stack for TPM_STS with reserved/write-only bits set (TPM_STS_READ_ZERO).
    let mut m = Wired::new(TpmVersion::V2_0);
    request(&mut m, 0);
    for _ in 0..3 {
        let s = sts(&mut m, 0) as u8;
        assert_eq!(s & 0x23, 0, "{s:#x}");
        m.write8(loc_reg(0, fifo::STS), fifo::STS_COMMAND_READY as u8);
        assert_eq!(sts(&mut m, 0) as u8 & 0x23, 0);
        for b in get_random(4) {
            m.write8(loc_reg(0, fifo::DATA_FIFO), b);
            assert_eq!(sts(&mut m, 0) as u8 & 0x23, 0);
        }
        m.write8(loc_reg(0, fifo::STS), fifo::STS_GO as u8);
        assert_eq!(sts(&mut m, 0) as u8 & 0x23, 0);
    }
}

#[test]
fn hostile_accesses_never_panic_nor_grow_the_buffers() {
    let mut d = TisDevice::new(TpmVersion::V2_0);
    // xorshift: reproducible.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut seq_seen = 0;
    for _ in 0..200_000 {
        let r = next();
        // Mostly inside the window and near registers, sometimes anywhere.
        let offset = if r % 16 == 0 { next() } else { (r >> 8) % u64::from(WINDOW_LEN + 0x100) };
        let offset = if r % 3 == 0 { offset & !0xFFF | [0, 0x18, 0x24, 0x80][(r as usize >> 4) % 4] } else { offset };
        let size = [1, 2, 4, 8, 3, 0, 16][(r as usize >> 12) % 7];
        if r % 5 == 0 {
            let _ = d.read(offset, size);
        } else {
            match d.write(offset, size, next()) {
                Action::Execute { seq, command, .. } => {
                    assert!(command.len() <= MAX_BUFFER);
                    seq_seen = seq;
                    let _ = d.complete(seq, vec![0x80; (next() % 5000) as usize]);
                }
                _ => {
                    let _ = d.complete(seq_seen, vec![0; 3]);
                }
            }
        }
    }
}

/// An ioreq server double: requests pushed by the test, answers collected.
#[derive(Debug)]
struct Queue {
    rx: Mutex<mpsc::Receiver<IoRequest>>,
    answers: mpsc::Sender<u64>,
    /// Accesses answered so far.
    answered: std::sync::atomic::AtomicUsize,
}

impl IoreqServer for Queue {
    fn next(&self, timeout: Option<Duration>) -> xvtpm_xen::Result<Option<IoRequest>> {
        let rx = self.rx.lock().expect("queue");
        Ok(rx.recv_timeout(timeout.unwrap_or(Duration::from_millis(50))).ok())
    }
    fn complete(&self, _req: &IoRequest, data: u64) -> xvtpm_xen::Result<()> {
        self.answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.answers.send(data);
        Ok(())
    }
    fn interrupt(&self) {}
    fn domid(&self) -> u16 {
        7
    }
}

/// A vCPU of the guest: each access waits for its answer, as a real one does.
struct Vcpu {
    tx: mpsc::Sender<IoRequest>,
    answers: mpsc::Receiver<u64>,
}

impl Vcpu {
    fn access(&mut self, offset: u32, size: u32, read: bool, data: u64) -> u64 {
        let req = IoRequest {
            vcpu: 0,
            kind: TYPE_COPY,
            addr: TPM_BASE + u64::from(offset),
            data,
            count: 1,
            size,
            read,
            data_is_ptr: false,
            df: false,
        };
        self.tx.send(req).expect("server alive");
        self.answers.recv_timeout(Duration::from_secs(10)).expect("answered")
    }
}

impl Mmio for Vcpu {
    fn read8(&mut self, offset: u32) -> u8 {
        self.access(offset, 1, true, 0) as u8
    }
    fn read32(&mut self, offset: u32) -> u32 {
        self.access(offset, 4, true, 0) as u32
    }
    fn write8(&mut self, offset: u32, value: u8) {
        self.access(offset, 1, false, value.into());
    }
    fn write32(&mut self, offset: u32, value: u32) {
        self.access(offset, 4, false, value.into());
    }
}

#[test]
fn a_slow_command_runs_on_its_own_thread_while_the_vcpu_polls() {
    let (tx, rx) = mpsc::channel();
    let (atx, arx) = mpsc::channel();
    let queue = Arc::new(Queue { rx: Mutex::new(rx), answers: atx, answered: 0.into() });
    let (started_tx, started) = mpsc::channel::<()>();
    let (release_tx, release) = mpsc::channel::<()>();
    let release = Mutex::new(release);
    let execute = Box::new(move |loc: u8, cmd: &[u8]| {
        if cmd.get(6..10) == Some(&[0, 0, 0x01, 0x7B]) && cmd.get(10..12) == Some(&[0, 5]) {
            let _ = started_tx.send(());
            let _ = release.lock().expect("release").recv_timeout(Duration::from_secs(10));
        }
        // The model's backend is not Send: one per command.
        simple_backend(Family::Tpm20)(loc, cmd)
    });
    let mut server =
        TisServer::new(TisDevice::new(TpmVersion::V2_0), execute, Arc::new(|| {}), Box::new(|_| {})).expect("server");
    let stop = Arc::new(AtomicBool::new(false));
    let (q, s) = (queue.clone(), stop.clone());
    let serving = std::thread::spawn(move || server.run(q.as_ref(), &s));
    let vcpu = Vcpu { tx, answers: arx };
    let mut tis = Tis::probe(vcpu, SystemClock::default()).expect("probe through the ioreq loop");
    assert_eq!(tis.info().family, Family::Tpm20);
    let guest = std::thread::spawn(move || tis.transmit(0, &get_random(5)));
    // The command is executing and the vCPU keeps getting answers (it polls TPM_STS).
    started.recv_timeout(Duration::from_secs(10)).expect("the command started");
    let before = queue.answered.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    let during = queue.answered.load(std::sync::atomic::Ordering::SeqCst);
    assert!(!guest.is_finished());
    // Not on the serving thread: its register reads are answered while the command runs.
    assert!(during > before, "no access answered while the command ran ({before} then {during})");
    release_tx.send(()).expect("command waiting");
    let rsp = guest.join().expect("guest thread").expect("GetRandom");
    assert_eq!(&rsp[12..], &[0, 1, 2, 3, 4]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    serving.join().expect("serving thread").expect("served");
}
