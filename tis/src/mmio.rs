//! Register access to the TPM's MMIO window: the five locality pages at 0xFED40000.

/// Physical address of locality 0's page (PC Client platform).
pub const TPM_BASE: u64 = 0xFED4_0000;
/// Size of one locality's page.
pub const LOCALITY_STRIDE: u32 = 0x1000;
/// Localities 0..=4.
pub const LOCALITIES: u8 = 5;
/// The window covering all five localities.
pub const WINDOW_LEN: u32 = LOCALITY_STRIDE * LOCALITIES as u32;

/// 8- and 32-bit accesses at byte offsets into the window (offset 0 is locality 0's first
/// register). Reads of offsets outside the window return all ones, as unbacked MMIO does;
/// writes there are ignored.
pub trait Mmio {
    /// Reads one byte.
    fn read8(&mut self, offset: u32) -> u8;
    /// Reads a naturally aligned 32-bit register.
    fn read32(&mut self, offset: u32) -> u32;
    /// Writes one byte.
    fn write8(&mut self, offset: u32, value: u8);
    /// Writes a naturally aligned 32-bit register.
    fn write32(&mut self, offset: u32, value: u32);
    /// Physical address of offset 0 (CRB buffers are given as physical addresses).
    fn base(&self) -> u64 {
        TPM_BASE
    }
    /// Length of the window in bytes.
    fn len(&self) -> u32 {
        WINDOW_LEN
    }
    /// Whether the window is empty (never, for a real mapping).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<M: Mmio + ?Sized> Mmio for &mut M {
    fn read8(&mut self, offset: u32) -> u8 {
        (**self).read8(offset)
    }
    fn read32(&mut self, offset: u32) -> u32 {
        (**self).read32(offset)
    }
    fn write8(&mut self, offset: u32, value: u8) {
        (**self).write8(offset, value)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        (**self).write32(offset, value)
    }
    fn base(&self) -> u64 {
        (**self).base()
    }
    fn len(&self) -> u32 {
        (**self).len()
    }
}

/// The offset of `reg` in `locality`'s page.
pub fn loc_reg(locality: u8, reg: u32) -> u32 {
    u32::from(locality) * LOCALITY_STRIDE + reg
}
