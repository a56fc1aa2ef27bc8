//! The TPM's FIFO interface as an HVM guest sees it at 0xFED40000: TIS 1.3 for a TPM 1.2, the
//! PC Client PTP's FIFO for a TPM 2.0. Registers only; commands leave as [`Action::Execute`]
//! and their responses come back through [`TisDevice::complete`], so a slow command never
//! holds the vCPU that started it (the guest polls `TPM_STS` meanwhile).
//!
//! Every register access from the guest is untrusted: any offset, width and order is
//! answered, none panics, and the buffers never grow past [`MAX_BUFFER`].

use xvtpm_tis::mmio::{LOCALITIES, LOCALITY_STRIDE, WINDOW_LEN};
use xvtpm_tis::regs::{fifo, intf};

use crate::TpmVersion;

/// The largest command or response: libtpms's buffer.
pub const MAX_BUFFER: usize = 4096;
/// `TPM_DID_VID`: vendor 0x5856 ("XV", not a TCG-registered vendor), device 1.
pub const DID_VID: u32 = 0x0001_5856;
/// `TPM_RID`.
pub const RID: u8 = 1;
/// `TPM_XDATA_FIFO` (PTP): the FIFO again, for wider accesses.
const XDATA_FIFO: u32 = 0x80;
/// `TPM_INT_VECTOR`.
const INT_VECTOR: u32 = 0x0C;
/// `TPM_INT_STATUS`.
const INT_STATUS: u32 = 0x10;
/// INTF_CAPABILITY: DataTransferSizeSupport = 64 bytes.
const CAP_TRANSFER_64: u32 = 3 << 9;
/// INTERFACE_ID: five localities.
const ID_CAP_LOCALITY: u32 = 1 << 8;
/// INTERFACE_ID: the FIFO interface is supported.
const ID_CAP_FIFO: u32 = 1 << 13;

/// What the guest's access asks of the TPM behind the registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Execute `command` at `locality`; hand the response to [`TisDevice::complete`] with `seq`.
    Execute {
        /// The command's sequence number.
        seq: u64,
        /// The locality it was sent from.
        locality: u8,
        /// The command bytes (untrusted).
        command: Vec<u8>,
    },
    /// Cancel the command executing.
    Cancel,
    /// Reset the TPM Established flag (a write from locality 3 or 4).
    ResetEstablishment {
        /// The locality that asked.
        locality: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No command in progress; commandReady not set.
    Idle,
    /// Ready for a command's first byte.
    Ready,
    /// Receiving a command.
    Reception,
    /// The TPM is executing command `seq`.
    Execution,
    /// The response is being read.
    Completion,
}

/// The registers of one TPM's five localities.
#[derive(Debug)]
pub struct TisDevice {
    version: TpmVersion,
    active: Option<u8>,
    pending: [bool; LOCALITIES as usize],
    seized: [bool; LOCALITIES as usize],
    int_enable: [u32; LOCALITIES as usize],
    int_vector: [u8; LOCALITIES as usize],
    state: State,
    /// The command received, or the response being read.
    buf: Vec<u8>,
    /// Response bytes read so far.
    pos: usize,
    /// The last command's sequence number.
    seq: u64,
}

impl TisDevice {
    /// A device in its power-on state: no locality active, idle.
    pub fn new(version: TpmVersion) -> Self {
        TisDevice {
            version,
            active: None,
            pending: [false; LOCALITIES as usize],
            seized: [false; LOCALITIES as usize],
            int_enable: [0; LOCALITIES as usize],
            int_vector: [0; LOCALITIES as usize],
            state: State::Idle,
            buf: Vec::new(),
            pos: 0,
            seq: 0,
        }
    }

    /// The TPM's family.
    pub fn version(&self) -> TpmVersion {
        self.version
    }

    /// The locality that owns the TPM.
    pub fn active_locality(&self) -> Option<u8> {
        self.active
    }

    /// True while a command executes.
    pub fn executing(&self) -> bool {
        self.state == State::Execution
    }

    /// Reads `size` bytes (1 to 8) at `offset` into the window; all ones outside it.
    pub fn read(&mut self, offset: u64, size: u32) -> u64 {
        let size = size.clamp(1, 8);
        let Some((loc, reg)) = split(offset) else { return u64::MAX };
        if is_fifo(reg) {
            if self.active != Some(loc) {
                return u64::MAX;
            }
            let mut v = 0u64;
            for i in 0..size {
                v |= u64::from(self.fifo_read()) << (8 * i);
            }
            return v;
        }
        // Registers: each byte from the 32-bit register holding it.
        let mut v = 0u64;
        for i in 0..size {
            let r = reg + i;
            let word = self.register(loc, r & !3);
            v |= u64::from((word >> (8 * (r & 3))) as u8) << (8 * i);
        }
        v
    }

    /// Writes `size` bytes (1 to 8) of `value` at `offset`; ignored outside the window.
    pub fn write(&mut self, offset: u64, size: u32, value: u64) -> Action {
        let size = size.clamp(1, 8);
        let Some((loc, reg)) = split(offset) else { return Action::None };
        if is_fifo(reg) {
            if self.active == Some(loc) {
                for i in 0..size {
                    self.fifo_write((value >> (8 * i)) as u8);
                }
            }
            return Action::None;
        }
        let mut action = Action::None;
        // Byte by byte into the register holding each; a 32-bit write to TPM_STS is one.
        let mut i = 0;
        while i < size {
            let r = reg + i;
            let base = r & !3;
            let shift = 8 * (r & 3);
            let n = (4 - (r & 3)).min(size - i);
            let mask = if n == 4 { u32::MAX } else { ((1u32 << (8 * n)) - 1) << shift };
            let bits = ((value >> (8 * i)) as u32) << shift & mask;
            let a = self.write_register(loc, base, bits, mask);
            if a != Action::None {
                action = a;
            }
            i += n;
        }
        action
    }

    /// The response to command `seq`; dropped unless that command still executes (it was
    /// aborted, or its locality lost the TPM).
    pub fn complete(&mut self, seq: u64, mut response: Vec<u8>) -> bool {
        if self.state != State::Execution || seq != self.seq {
            return false;
        }
        response.truncate(MAX_BUFFER);
        self.buf = response;
        self.pos = 0;
        self.state = State::Completion;
        true
    }

    fn register(&self, loc: u8, reg: u32) -> u32 {
        let l = usize::from(loc);
        match reg {
            r if r == fifo::ACCESS => u32::from(self.access(loc)),
            r if r == fifo::INT_ENABLE => self.int_enable[l],
            INT_VECTOR => u32::from(self.int_vector[l]),
            INT_STATUS => 0,
            r if r == fifo::INTF_CAPABILITY => self.capabilities(),
            r if r == fifo::STS => {
                if self.active == Some(loc) {
                    self.sts()
                } else {
                    u32::MAX
                }
            }
            r if r == fifo::INTERFACE_ID => match self.version {
                // TIS 1.2/1.3 TPMs have no such register.
                TpmVersion::V1_2 => u32::MAX,
                TpmVersion::V2_0 => intf::TYPE_FIFO | ID_CAP_LOCALITY | ID_CAP_FIFO | (u32::from(RID) << 24),
            },
            r if r == fifo::DID_VID => DID_VID,
            r if r == fifo::RID => u32::from(RID),
            _ => 0,
        }
    }

    fn capabilities(&self) -> u32 {
        let version = match self.version {
            TpmVersion::V1_2 => fifo::CAP_VERSION_TIS13,
            TpmVersion::V2_0 => fifo::CAP_VERSION_PTP,
        };
        // No interrupts: the guest polls TPM_STS (the platform gives the TPM no IRQ).
        (version << fifo::CAP_VERSION_SHIFT) | CAP_TRANSFER_64
    }

    fn access(&self, loc: u8) -> u8 {
        let l = usize::from(loc);
        let mut a = fifo::ACCESS_VALID | fifo::ACCESS_ESTABLISHMENT;
        if self.active == Some(loc) {
            a |= fifo::ACCESS_ACTIVE_LOCALITY;
            if self.pending.iter().enumerate().any(|(i, p)| *p && i != l) {
                a |= fifo::ACCESS_PENDING_REQUEST;
            }
        } else if self.pending[l] {
            a |= fifo::ACCESS_REQUEST_USE;
        }
        if self.seized[l] {
            a |= fifo::ACCESS_BEEN_SEIZED;
        }
        a
    }

    fn sts(&self) -> u32 {
        let family = match self.version {
            TpmVersion::V1_2 => 0,
            TpmVersion::V2_0 => 1 << fifo::STS_FAMILY_SHIFT,
        };
        let (bits, burst) = match self.state {
            State::Idle => (0, 0),
            State::Execution => (fifo::STS_VALID, 0),
            State::Ready => (fifo::STS_VALID | fifo::STS_COMMAND_READY, MAX_BUFFER),
            State::Reception => {
                let expect = if self.expecting() { fifo::STS_EXPECT } else { 0 };
                (fifo::STS_VALID | expect, MAX_BUFFER - self.buf.len())
            }
            State::Completion => {
                let left = self.buf.len() - self.pos;
                (fifo::STS_VALID | if left > 0 { fifo::STS_DATA_AVAIL } else { 0 }, left)
            }
        };
        let burst = burst.min(fifo::STS_BURST_MASK as usize) as u32;
        family | (burst << fifo::STS_BURST_SHIFT) | bits
    }

    /// More command bytes are due: the header's size is not yet known or not yet reached.
    fn expecting(&self) -> bool {
        match self.buf.get(2..6) {
            Some(s) => {
                let size = u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
                self.buf.len() < size.min(MAX_BUFFER)
            }
            None => true,
        }
    }

    fn fifo_read(&mut self) -> u8 {
        if self.state != State::Completion {
            return 0xFF;
        }
        match self.buf.get(self.pos) {
            Some(b) => {
                self.pos += 1;
                *b
            }
            None => 0xFF,
        }
    }

    fn fifo_write(&mut self, b: u8) {
        match self.state {
            State::Ready => {
                self.buf.clear();
                self.buf.push(b);
                self.state = State::Reception;
            }
            // Bytes past the command's size (or the buffer) are dropped: Expect is clear.
            State::Reception if self.expecting() && self.buf.len() < MAX_BUFFER => self.buf.push(b),
            _ => {}
        }
    }

    fn write_register(&mut self, loc: u8, reg: u32, bits: u32, mask: u32) -> Action {
        let l = usize::from(loc);
        match reg {
            r if r == fifo::ACCESS => self.write_access(loc, bits as u8),
            r if r == fifo::INT_ENABLE => {
                self.int_enable[l] = (self.int_enable[l] & !mask) | bits;
                Action::None
            }
            INT_VECTOR => {
                if mask & 0xFF != 0 {
                    self.int_vector[l] = bits as u8;
                }
                Action::None
            }
            r if r == fifo::STS && self.active == Some(loc) => self.write_sts(loc, bits),
            _ => Action::None,
        }
    }

    fn write_access(&mut self, loc: u8, bits: u8) -> Action {
        let l = usize::from(loc);
        let mut action = Action::None;
        if bits & fifo::ACCESS_ACTIVE_LOCALITY != 0 {
            if self.active == Some(loc) {
                action = self.change_locality(None);
                // The highest locality waiting gets it.
                if let Some(next) = (0..LOCALITIES).rev().find(|i| self.pending[usize::from(*i)]) {
                    self.pending[usize::from(next)] = false;
                    self.active = Some(next);
                }
            } else {
                self.pending[l] = false;
            }
        }
        if bits & fifo::ACCESS_BEEN_SEIZED != 0 {
            self.seized[l] = false;
        }
        if bits & fifo::ACCESS_SEIZE != 0 && self.active.is_some_and(|a| a < loc) {
            if let Some(old) = self.active {
                self.seized[usize::from(old)] = true;
            }
            action = self.change_locality(Some(loc));
            self.pending[l] = false;
        }
        if bits & fifo::ACCESS_REQUEST_USE != 0 {
            match self.active {
                None => {
                    self.active = Some(loc);
                    self.pending[l] = false;
                }
                Some(a) if a != loc => self.pending[l] = true,
                Some(_) => {}
            }
        }
        action
    }

    /// The TPM changes hands: what the old owner had in progress is dropped.
    fn change_locality(&mut self, to: Option<u8>) -> Action {
        let cancel = self.state == State::Execution;
        self.active = to;
        self.state = State::Idle;
        self.buf.clear();
        self.pos = 0;
        if cancel {
            Action::Cancel
        } else {
            Action::None
        }
    }

    fn write_sts(&mut self, loc: u8, bits: u32) -> Action {
        if bits & fifo::STS_COMMAND_READY != 0 {
            let was = self.state;
            self.state = State::Ready;
            self.buf.clear();
            self.pos = 0;
            // An abort: the response of the command executing will be dropped.
            return if was == State::Execution { Action::Cancel } else { Action::None };
        }
        if bits & fifo::STS_GO != 0 && self.state == State::Reception && !self.expecting() {
            self.state = State::Execution;
            self.seq += 1;
            return Action::Execute { seq: self.seq, locality: loc, command: std::mem::take(&mut self.buf) };
        }
        if bits & fifo::STS_RESPONSE_RETRY != 0 && self.state == State::Completion {
            self.pos = 0;
        }
        if self.version == TpmVersion::V2_0 {
            if bits & fifo::STS_COMMAND_CANCEL != 0 && self.state == State::Execution {
                return Action::Cancel;
            }
            if bits & fifo::STS_RESET_ESTABLISHMENT != 0 && loc >= 3 {
                return Action::ResetEstablishment { locality: loc };
            }
        }
        Action::None
    }
}

/// The locality and register offset of a window offset.
fn split(offset: u64) -> Option<(u8, u32)> {
    let offset = u32::try_from(offset).ok().filter(|o| *o < WINDOW_LEN)?;
    Some(((offset / LOCALITY_STRIDE) as u8, offset % LOCALITY_STRIDE))
}

fn is_fifo(reg: u32) -> bool {
    (fifo::DATA_FIFO..fifo::DATA_FIFO + 4).contains(&reg) || (XDATA_FIFO..XDATA_FIFO + 4).contains(&reg)
}
