//! Emulation requests of an ioreq server (Xen's `public/hvm/ioreq.h`): how a device outside
//! the hypervisor and outside QEMU serves an HVM guest's accesses to an address range.
//!
//! Xen hands each access of a guest vCPU to the range as one `ioreq_t` in that vCPU's slot of
//! a shared page, and signals the slot's event channel; the server answers in the same slot and
//! signals back, and the vCPU resumes. The guest does not run on that vCPU meanwhile, so the
//! answer should come quickly; slow work (a TPM command) belongs on another thread.

use std::time::Duration;

use crate::Result;

/// Bytes of one `ioreq_t`.
pub const IOREQ_SIZE: usize = 32;
/// vCPU slots in the one shared page.
pub const SLOTS: usize = crate::PAGE_SIZE / IOREQ_SIZE;

/// `STATE_IOREQ_NONE`: the slot is free.
pub const STATE_NONE: u8 = 0;
/// `STATE_IOREQ_READY`: Xen wrote a request.
pub const STATE_READY: u8 = 1;
/// `STATE_IOREQ_INPROCESS`: the server took it.
pub const STATE_INPROCESS: u8 = 2;
/// `STATE_IORESP_READY`: the server answered.
pub const STATE_RESP_READY: u8 = 3;

/// `IOREQ_TYPE_PIO`.
pub const TYPE_PIO: u8 = 0;
/// `IOREQ_TYPE_COPY`: memory-mapped I/O.
pub const TYPE_COPY: u8 = 1;

/// Offset of `vp_eport`, the slot's event channel (a port of the guest's domain).
const OFF_PORT: usize = 24;
/// Offset of the byte holding `state:4, data_is_ptr:1, dir:1, df:1`.
pub const OFF_FLAGS: usize = 30;
/// Offset of `type`.
const OFF_TYPE: usize = 31;

/// One access of a guest vCPU, decoded from its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    /// The vCPU (the slot's index).
    pub vcpu: u32,
    /// `IOREQ_TYPE_*`.
    pub kind: u8,
    /// Guest physical address (MMIO) or port (PIO).
    pub addr: u64,
    /// The value written, or (with `data_is_ptr`) the guest physical address of the data.
    pub data: u64,
    /// Repetitions (string instructions).
    pub count: u32,
    /// Bytes per access: 1, 2, 4 or 8.
    pub size: u32,
    /// A read (else a write).
    pub read: bool,
    /// `data` is a guest address, not the value.
    pub data_is_ptr: bool,
    /// Direction flag of a string instruction.
    pub df: bool,
}

impl IoRequest {
    /// Decodes a slot (any state).
    pub fn decode(vcpu: u32, slot: &[u8; IOREQ_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(slot[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(slot[o..o + 4].try_into().unwrap_or([0; 4]));
        let flags = slot[OFF_FLAGS];
        IoRequest {
            vcpu,
            kind: slot[OFF_TYPE],
            addr: u64_at(0),
            data: u64_at(8),
            count: u32_at(16),
            size: u32_at(20),
            read: flags & (1 << 5) != 0,
            data_is_ptr: flags & (1 << 4) != 0,
            df: flags & (1 << 6) != 0,
        }
    }

    /// Encodes the request into a slot in `state`, with event channel `port` (what Xen does;
    /// the simulated Xen uses it).
    pub fn encode(&self, port: u32, state: u8) -> [u8; IOREQ_SIZE] {
        let mut slot = [0u8; IOREQ_SIZE];
        slot[0..8].copy_from_slice(&self.addr.to_le_bytes());
        slot[8..16].copy_from_slice(&self.data.to_le_bytes());
        slot[16..20].copy_from_slice(&self.count.to_le_bytes());
        slot[20..24].copy_from_slice(&self.size.to_le_bytes());
        slot[OFF_PORT..OFF_PORT + 4].copy_from_slice(&port.to_le_bytes());
        slot[OFF_FLAGS] =
            (state & 0xF) | (u8::from(self.data_is_ptr) << 4) | (u8::from(self.read) << 5) | (u8::from(self.df) << 6);
        slot[OFF_TYPE] = self.kind;
        slot
    }

    /// The bytes of a `size`-byte access that matter (`size` 8 keeps all).
    pub fn mask(&self) -> u64 {
        match self.size {
            1..=7 => (1u64 << (8 * self.size)) - 1,
            _ => u64::MAX,
        }
    }
}

/// The event channel port of a slot (0: no vCPU there).
pub fn slot_port(slot: &[u8; IOREQ_SIZE]) -> u32 {
    u32::from_le_bytes(slot[OFF_PORT..OFF_PORT + 4].try_into().unwrap_or([0; 4]))
}

/// The state nibble of a slot's flags byte.
pub fn slot_state(flags: u8) -> u8 {
    flags & 0xF
}

/// An ioreq server registered for one guest: the guest's accesses to its ranges, in the order
/// each vCPU makes them.
pub trait IoreqServer: Send + Sync + std::fmt::Debug {
    /// Waits up to `timeout` (forever when `None`) for the next access; `Ok(None)` on timeout
    /// or [`IoreqServer::interrupt`]. Every request returned must be answered with
    /// [`IoreqServer::complete`]: its vCPU waits until then.
    fn next(&self, timeout: Option<Duration>) -> Result<Option<IoRequest>>;
    /// Answers `req`; `data` is the value read (ignored for writes).
    fn complete(&self, req: &IoRequest, data: u64) -> Result<()>;
    /// Makes the [`IoreqServer::next`] in progress, or else the next one, return `Ok(None)`.
    fn interrupt(&self);
    /// The guest's domain.
    fn domid(&self) -> crate::DomId;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_round_trips() {
        let req = IoRequest {
            vcpu: 3,
            kind: TYPE_COPY,
            addr: 0xFED4_0018,
            data: 0x1234_5678_9abc_def0,
            count: 1,
            size: 4,
            read: true,
            data_is_ptr: false,
            df: true,
        };
        let slot = req.encode(77, STATE_READY);
        assert_eq!(IoRequest::decode(3, &slot), req);
        assert_eq!(slot_port(&slot), 77);
        assert_eq!(slot_state(slot[OFF_FLAGS]), STATE_READY);
        assert_eq!(slot[OFF_FLAGS], STATE_READY | 1 << 5 | 1 << 6);
    }

    #[test]
    fn masks_follow_the_size() {
        let mut req = IoRequest::decode(0, &[0; IOREQ_SIZE]);
        for (size, mask) in [(1, 0xff), (2, 0xffff), (4, 0xffff_ffff), (8, u64::MAX), (0, u64::MAX)] {
            req.size = size;
            assert_eq!(req.mask(), mask, "size {size}");
        }
    }
}
