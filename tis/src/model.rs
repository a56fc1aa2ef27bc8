//! Register-level models of a TPM behind the FIFO and CRB interfaces, with faults to switch
//! on: the in-memory double for the driver's tests, and the fuzz targets.
//! Time is virtual ([`FakeClock`]): a command completes once the driver has waited long
//! enough.

use std::time::Duration;

use crate::clock::{Clock, FakeClock};
use crate::command::be32;
use crate::mmio::{Mmio, LOCALITIES, LOCALITY_STRIDE, TPM_BASE, WINDOW_LEN};
use crate::regs::{crb, fifo, intf};
use crate::Family;

/// `Mmio` for a model with `read(offset, width)` and `write(offset, value, width)`.
macro_rules! mmio_from_read_write {
    ($t:ty) => {
        impl Mmio for $t {
            fn read8(&mut self, offset: u32) -> u8 {
                self.read(offset, 1) as u8
            }
            fn read32(&mut self, offset: u32) -> u32 {
                self.read(offset, 4)
            }
            fn write8(&mut self, offset: u32, value: u8) {
                self.write(offset, u32::from(value), 1)
            }
            fn write32(&mut self, offset: u32, value: u32) {
                self.write(offset, value, 4)
            }
        }
    };
}

/// What executes a command: locality and command in, response out.
pub type Backend = Box<dyn FnMut(u8, &[u8]) -> Vec<u8>>;

/// Ways the modelled TPM misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Never grants a locality.
    pub never_grant: bool,
    /// Never becomes ready for a command.
    pub never_ready: bool,
    /// Keeps burstCount at 0.
    pub burst_zero: bool,
    /// Clears Expect after half of the command.
    pub expect_early: bool,
    /// Keeps Expect set after the last byte.
    pub expect_stuck: bool,
    /// Never finishes executing.
    pub never_completes: bool,
    /// Overwrites the response header's size field.
    pub claim_size: Option<u32>,
    /// Delivers this many bytes fewer than the response has.
    pub truncate: usize,
    /// Delivers this many extra bytes after the response.
    pub extra: usize,
    /// CRB: reports a fatal error after a command.
    pub fatal: bool,
    /// CRB: reports CapLocality 0 (locality 0 only), as QEMU's tpm-crb.
    pub crb_locality0_only: bool,
    /// CRB: puts the command buffer at this physical address.
    pub crb_cmd_addr: Option<u64>,
}

#[derive(Debug)]
enum State {
    Idle,
    Ready,
    Reception(Vec<u8>),
    Execution { until: Duration, response: Vec<u8> },
    Completion { data: Vec<u8>, pos: usize },
}

/// A FIFO TPM (TIS 1.2 or PTP) with a backend that executes commands.
pub struct FifoModel {
    clock: FakeClock,
    family: Family,
    ptp: bool,
    /// Faults to apply.
    pub faults: Faults,
    backend: Backend,
    active: Option<u8>,
    requested: [bool; LOCALITIES as usize],
    state: State,
    /// Time a command takes.
    pub exec_time: Duration,
    /// burstCount reported.
    pub burst: u16,
    /// Commands executed: (locality, command).
    pub executed: Vec<(u8, Vec<u8>)>,
    /// How many times commandCancel was written during execution.
    pub cancels: usize,
}

impl std::fmt::Debug for FifoModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FifoModel")
            .field("family", &self.family)
            .field("ptp", &self.ptp)
            .field("faults", &self.faults)
            .field("active", &self.active)
            .field("state", &self.state)
            .field("executed", &self.executed)
            .finish_non_exhaustive()
    }
}

impl FifoModel {
    /// A TPM of `family`; `ptp` selects the PTP FIFO registers (TPM 2.0), otherwise TIS 1.2.
    pub fn new(clock: FakeClock, family: Family, ptp: bool, backend: Backend) -> Self {
        Self {
            clock,
            family,
            ptp,
            faults: Faults::default(),
            backend,
            active: None,
            requested: [false; LOCALITIES as usize],
            state: State::Idle,
            exec_time: Duration::from_micros(200),
            burst: 32,
            executed: Vec::new(),
            cancels: 0,
        }
    }

    /// The active locality.
    pub fn active_locality(&self) -> Option<u8> {
        self.active
    }

    fn tick(&mut self) {
        // Every access takes a little time, so no loop of the driver is free.
        self.clock.advance(Duration::from_nanos(100));
        if let State::Execution { until, response } = &mut self.state {
            if !self.faults.never_completes && self.clock.now() >= *until {
                let mut data = std::mem::take(response);
                if let Some(c) = self.faults.claim_size {
                    if data.len() >= 6 {
                        data[2..6].copy_from_slice(&c.to_be_bytes());
                    }
                }
                data.truncate(data.len().saturating_sub(self.faults.truncate));
                data.extend(std::iter::repeat_n(0xA5, self.faults.extra));
                self.state = State::Completion { data, pos: 0 };
            }
        }
    }

    fn split(off: u32) -> (u8, u32) {
        ((off / LOCALITY_STRIDE) as u8, off % LOCALITY_STRIDE)
    }

    fn grant_next(&mut self) {
        if self.active.is_none() && !self.faults.never_grant {
            // The highest requesting locality wins, as on real TPMs.
            if let Some(l) = (0..LOCALITIES).rev().find(|&l| self.requested[l as usize]) {
                self.requested[l as usize] = false;
                self.active = Some(l);
            }
        }
    }

    fn expect(&self) -> bool {
        match &self.state {
            State::Reception(buf) => {
                if self.faults.expect_stuck {
                    return true;
                }
                let total = if buf.len() >= 6 { be32(buf, 2).unwrap_or(0) as usize } else { usize::MAX };
                if self.faults.expect_early && buf.len() >= total / 2 {
                    return false;
                }
                buf.len() < total
            }
            _ => false,
        }
    }

    fn sts(&self) -> u32 {
        let mut s = fifo::STS_VALID;
        match &self.state {
            State::Ready if !self.faults.never_ready => s |= fifo::STS_COMMAND_READY,
            State::Reception(_) if self.expect() => s |= fifo::STS_EXPECT,
            State::Completion { data, pos } if *pos < data.len() => s |= fifo::STS_DATA_AVAIL,
            _ => {}
        }
        // burstCount: room for command bytes, or response bytes left to read.
        let burst = match &self.state {
            State::Ready => self.burst,
            State::Reception(buf) => self.burst.min(4096u16.saturating_sub(buf.len() as u16)),
            State::Completion { data, pos } => self.burst.min(data.len().saturating_sub(*pos) as u16),
            State::Execution { .. } | State::Idle => 0,
        };
        if !self.faults.burst_zero {
            s |= u32::from(burst) << fifo::STS_BURST_SHIFT;
        }
        if self.ptp {
            s |= u32::from(self.family == Family::Tpm20) << fifo::STS_FAMILY_SHIFT;
        }
        s
    }

    fn read(&mut self, off: u32, width: u32) -> u32 {
        self.tick();
        let (loc, reg) = Self::split(off);
        if loc >= LOCALITIES {
            return u32::MAX;
        }
        let is_active = self.active == Some(loc);
        let word = |reg_base: u32, v: u32| v >> ((reg - reg_base) * 8);
        let v = match reg {
            fifo::ACCESS => {
                let mut a = fifo::ACCESS_VALID | fifo::ACCESS_ESTABLISHMENT;
                if is_active {
                    a |= fifo::ACCESS_ACTIVE_LOCALITY;
                }
                if self.requested.iter().enumerate().any(|(l, &r)| r && l as u8 != loc) {
                    a |= fifo::ACCESS_PENDING_REQUEST;
                }
                u32::from(a)
            }
            r if (fifo::STS..fifo::STS + 4).contains(&r) => match is_active {
                true => word(fifo::STS, self.sts()),
                false => u32::MAX,
            },
            fifo::INTF_CAPABILITY => {
                let version = if self.ptp { fifo::CAP_VERSION_PTP } else { fifo::CAP_VERSION_TIS12 };
                version << fifo::CAP_VERSION_SHIFT
            }
            fifo::INTERFACE_ID => match self.ptp {
                true => intf::TYPE_FIFO | 1 << 13,
                false => u32::MAX,
            },
            r if (fifo::DATA_FIFO..fifo::DATA_FIFO + 4).contains(&r) && is_active => {
                let mut v = 0u32;
                for i in 0..width.min(4) {
                    let b = match &mut self.state {
                        State::Completion { data, pos } if *pos < data.len() => {
                            *pos += 1;
                            data[*pos - 1]
                        }
                        _ => 0xFF,
                    };
                    v |= u32::from(b) << (8 * i);
                }
                v
            }
            r if (fifo::DID_VID..fifo::DID_VID + 4).contains(&r) => word(fifo::DID_VID, 0x0001_1014),
            fifo::RID => 0x01,
            _ => u32::MAX,
        };
        if width == 1 {
            v & 0xFF
        } else {
            v
        }
    }

    fn write(&mut self, off: u32, value: u32, width: u32) {
        self.tick();
        let (loc, reg) = Self::split(off);
        if loc >= LOCALITIES {
            return;
        }
        match reg {
            fifo::ACCESS => {
                let v = value as u8;
                if v & fifo::ACCESS_REQUEST_USE != 0 && self.active != Some(loc) {
                    self.requested[loc as usize] = true;
                    self.grant_next();
                }
                if v & fifo::ACCESS_ACTIVE_LOCALITY != 0 && self.active == Some(loc) {
                    self.active = None;
                    self.grant_next();
                }
            }
            r if (fifo::STS..fifo::STS + 4).contains(&r) && self.active == Some(loc) => {
                let v = value << ((r - fifo::STS) * 8);
                if v & fifo::STS_COMMAND_CANCEL != 0 && self.ptp {
                    if let State::Execution { .. } = self.state {
                        self.cancels += 1;
                        // TPM_RC_CANCELED.
                        let rc = [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x09];
                        self.state = State::Completion { data: rc.to_vec(), pos: 0 };
                    }
                }
                if v & fifo::STS_COMMAND_READY != 0 && !self.faults.never_ready {
                    self.state = State::Ready;
                }
                if v & fifo::STS_GO != 0 {
                    if let State::Reception(buf) = &self.state {
                        if !self.expect() || self.faults.expect_stuck {
                            let cmd = buf.clone();
                            let response = (self.backend)(loc, &cmd);
                            self.executed.push((loc, cmd));
                            let until = self.clock.now() + self.exec_time;
                            self.state = State::Execution { until, response };
                        }
                    }
                }
            }
            r if (fifo::DATA_FIFO..fifo::DATA_FIFO + 4).contains(&r) && self.active == Some(loc) => {
                for i in 0..width.min(4) {
                    let b = (value >> (8 * i)) as u8;
                    match &mut self.state {
                        State::Ready => self.state = State::Reception(vec![b]),
                        State::Reception(buf) if buf.len() < 4096 => buf.push(b),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

mmio_from_read_write!(FifoModel);

/// A CRB TPM 2.0 with its buffer in locality 0's page at 0x80, as QEMU's tpm-crb.
pub struct CrbModel {
    clock: FakeClock,
    /// Faults to apply.
    pub faults: Faults,
    backend: Backend,
    active: Option<u8>,
    ready: bool,
    cmd_ready_pending: bool,
    running: Option<(u8, Duration, Vec<u8>)>,
    buffer: Vec<u8>,
    fatal: bool,
    /// Time a command takes.
    pub exec_time: Duration,
    /// Commands executed: (locality, command).
    pub executed: Vec<(u8, Vec<u8>)>,
    /// How many times CTRL_CANCEL was set during execution.
    pub cancels: usize,
}

/// Size of the model's CRB buffer (QEMU's).
pub const CRB_BUFFER_SIZE: u32 = 0xF80;

impl std::fmt::Debug for CrbModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrbModel")
            .field("faults", &self.faults)
            .field("active", &self.active)
            .field("ready", &self.ready)
            .field("executed", &self.executed)
            .finish_non_exhaustive()
    }
}

impl CrbModel {
    /// A CRB TPM with a backend that executes commands.
    pub fn new(clock: FakeClock, backend: Backend) -> Self {
        Self {
            clock,
            faults: Faults::default(),
            backend,
            active: None,
            ready: false,
            cmd_ready_pending: false,
            running: None,
            buffer: vec![0; CRB_BUFFER_SIZE as usize],
            fatal: false,
            exec_time: Duration::from_micros(200),
            executed: Vec::new(),
            cancels: 0,
        }
    }

    /// The active locality.
    pub fn active_locality(&self) -> Option<u8> {
        self.active
    }

    fn tick(&mut self) {
        self.clock.advance(Duration::from_nanos(100));
        if let Some((_, until, _)) = &self.running {
            if !self.faults.never_completes && self.clock.now() >= *until {
                let Some((_, _, mut rsp)) = self.running.take() else { return };
                if let Some(c) = self.faults.claim_size {
                    if rsp.len() >= 6 {
                        rsp[2..6].copy_from_slice(&c.to_be_bytes());
                    }
                }
                let n = rsp.len().min(self.buffer.len());
                self.buffer[..n].copy_from_slice(&rsp[..n]);
                self.fatal = self.faults.fatal;
            }
        }
        if self.cmd_ready_pending && !self.faults.never_ready {
            self.cmd_ready_pending = false;
            self.ready = true;
        }
    }

    fn cmd_addr(&self) -> u64 {
        self.faults.crb_cmd_addr.unwrap_or(TPM_BASE + u64::from(crb::DATA_BUFFER))
    }

    fn read(&mut self, off: u32, width: u32) -> u32 {
        self.tick();
        let (loc, reg) = ((off / LOCALITY_STRIDE) as u8, off % LOCALITY_STRIDE);
        if loc >= LOCALITIES {
            return u32::MAX;
        }
        if width == 4 && !off.is_multiple_of(4) {
            // Like /dev/mem through DevMem: unaligned words do not exist.
            return u32::MAX;
        }
        if reg >= crb::DATA_BUFFER && loc == 0 {
            let at = (reg - crb::DATA_BUFFER) as usize;
            let mut v = 0u32;
            for i in 0..width as usize {
                v |= u32::from(self.buffer.get(at + i).copied().unwrap_or(0xFF)) << (8 * i);
            }
            return v;
        }
        let addr = TPM_BASE + u64::from(crb::DATA_BUFFER);
        let v = match reg {
            crb::LOC_STATE => {
                let mut s = crb::LOC_STATE_VALID;
                if let Some(a) = self.active {
                    s |= crb::LOC_STATE_ASSIGNED | u32::from(a) << crb::LOC_STATE_ACTIVE_SHIFT;
                }
                s
            }
            crb::LOC_STS => u32::from(self.active == Some(loc)) * crb::LOC_STS_GRANTED,
            crb::INTF_ID_LO => {
                let cap_locality = if self.faults.crb_locality0_only { 0 } else { crb::INTF_CAP_LOCALITY };
                intf::TYPE_CRB | (1 << 14) | (0x01 << 24) | cap_locality
            }
            crb::INTF_ID_HI => 0x0001_1014,
            crb::CTRL_REQ => u32::from(self.cmd_ready_pending) * crb::CTRL_REQ_CMD_READY,
            crb::CTRL_STS => u32::from(self.fatal) * crb::CTRL_STS_FATAL + u32::from(!self.ready) * crb::CTRL_STS_IDLE,
            crb::CTRL_START => u32::from(self.running.is_some()),
            crb::CMD_SIZE | crb::RSP_SIZE => CRB_BUFFER_SIZE,
            crb::CMD_LADDR => self.cmd_addr() as u32,
            crb::CMD_HADDR => (self.cmd_addr() >> 32) as u32,
            crb::RSP_ADDR_LO => addr as u32,
            crb::RSP_ADDR_HI => (addr >> 32) as u32,
            _ => 0,
        };
        if width == 1 {
            v & 0xFF
        } else {
            v
        }
    }

    fn write(&mut self, off: u32, value: u32, width: u32) {
        self.tick();
        let (loc, reg) = ((off / LOCALITY_STRIDE) as u8, off % LOCALITY_STRIDE);
        if loc >= LOCALITIES {
            return;
        }
        if width == 4 && !off.is_multiple_of(4) {
            return;
        }
        if reg >= crb::DATA_BUFFER && loc == 0 {
            let at = (reg - crb::DATA_BUFFER) as usize;
            for i in 0..width as usize {
                if let Some(b) = self.buffer.get_mut(at + i) {
                    *b = (value >> (8 * i)) as u8;
                }
            }
            return;
        }
        let is_active = self.active == Some(loc);
        match reg {
            crb::LOC_CTRL => {
                if value & crb::LOC_CTRL_RELINQUISH != 0 && is_active {
                    self.active = None;
                }
                if value & crb::LOC_CTRL_REQUEST != 0 && self.active.is_none() && !self.faults.never_grant {
                    self.active = Some(loc);
                }
            }
            crb::CTRL_REQ if is_active => {
                if value & crb::CTRL_REQ_CMD_READY != 0 {
                    self.cmd_ready_pending = true;
                }
                if value & crb::CTRL_REQ_GO_IDLE != 0 {
                    self.ready = false;
                }
            }
            crb::CTRL_CANCEL if is_active && value & 1 != 0 && self.running.is_some() => {
                self.running = None;
                self.cancels += 1;
            }
            crb::CTRL_START if is_active && value & 1 != 0 && self.ready && self.running.is_none() => {
                let size = be32(&self.buffer, 2).unwrap_or(0) as usize;
                let cmd = self.buffer[..size.min(self.buffer.len())].to_vec();
                let rsp = (self.backend)(loc, &cmd);
                self.executed.push((loc, cmd));
                self.running = Some((loc, self.clock.now() + self.exec_time, rsp));
            }
            _ => {}
        }
    }
}

mmio_from_read_write!(CrbModel);

/// A backend answering like a small TPM 2.0 (GetCapability with buffer sizes, GetRandom with
/// counting bytes, an echo of anything else), or like a TPM 1.2 that rejects TPM 2.0 tags.
pub fn simple_backend(family: Family) -> Backend {
    Box::new(move |_loc, cmd| {
        let ordinal = be32(cmd, 6).unwrap_or(0);
        match family {
            Family::Tpm20 if cmd.starts_with(&[0x80]) => match ordinal {
                0x17A => {
                    let mut r = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    for v in [6u32, 2, 0x11E, 4096, 0x11F, 4096] {
                        r.extend_from_slice(&v.to_be_bytes());
                    }
                    let n = r.len() as u32;
                    r[2..6].copy_from_slice(&n.to_be_bytes());
                    r
                }
                0x17B => {
                    let want = cmd.get(10..12).map(|b| u16::from_be_bytes([b[0], b[1]])).unwrap_or(0).min(64);
                    let mut r = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
                    r.extend_from_slice(&want.to_be_bytes());
                    r.extend((0..want).map(|i| i as u8));
                    let n = r.len() as u32;
                    r[2..6].copy_from_slice(&n.to_be_bytes());
                    r
                }
                _ => {
                    // Echo the body under a success header: lets tests check large transfers.
                    let mut r = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
                    r.extend_from_slice(cmd.get(10..).unwrap_or_default());
                    let n = r.len() as u32;
                    r[2..6].copy_from_slice(&n.to_be_bytes());
                    r
                }
            },
            Family::Tpm20 => vec![0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x1E],
            // TPM 1.2: TPM_BADTAG for a 2.0 command, TPM_SUCCESS otherwise.
            Family::Tpm12 if cmd.starts_with(&[0x80]) => vec![0x00, 0xC4, 0, 0, 0, 10, 0, 0, 0, 0x1E],
            Family::Tpm12 => vec![0x00, 0xC4, 0, 0, 0, 10, 0, 0, 0, 0],
        }
    })
}

/// The end of the window, for tests placing CRB buffers outside it.
pub const WINDOW_END: u64 = TPM_BASE + WINDOW_LEN as u64;
