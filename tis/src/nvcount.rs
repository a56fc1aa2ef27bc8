//! A [`HwTpm`] that passes every command through and counts those that wrote the TPM's
//! non-volatile memory: how tests measure the hardware NV wear a workload causes, from outside
//! the code that causes it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{Family, HwTpm, Result};

/// TPM 2.0 commands that write NV when they succeed (TPM 2.0 Part 3): NV_UndefineSpaceSpecial,
/// EvictControl, HierarchyControl, NV_UndefineSpace, ChangeEPS, ChangePPS, Clear,
/// ClearControl, HierarchyChangeAuth, NV_DefineSpace, PCR_Allocate, SetPrimaryPolicy,
/// NV_Increment, NV_SetBits, NV_Extend, NV_Write, NV_WriteLock,
/// DictionaryAttackLockReset, DictionaryAttackParameters, NV_ChangeAuth, Shutdown.
const TPM2: [u32; 21] = [
    0x11F, 0x120, 0x121, 0x122, 0x124, 0x125, 0x126, 0x127, 0x129, 0x12A, 0x12B, 0x12E, 0x134, 0x135, 0x136, 0x137,
    0x138, 0x139, 0x13A, 0x13B, 0x145,
];
/// TPM 1.2 ordinals that write NV when they succeed: TakeOwnership, ChangeAuthOwner,
/// OwnerClear, NV_DefineSpace, NV_WriteValue, NV_WriteValueAuth, CreateCounter,
/// IncrementCounter, ReleaseCounter, ReleaseCounterOwner.
const TPM12: [u32; 10] = [0x0D, 0x10, 0x5B, 0xCC, 0xCD, 0xCE, 0xDC, 0xDD, 0xDF, 0xE0];

/// Counts the NV-writing commands that succeeded through it.
pub struct NvWriteCounter<T> {
    inner: T,
    count: Arc<AtomicU64>,
}

impl<T: HwTpm> NvWriteCounter<T> {
    /// Wraps `inner`; the count is shared with every clone of [`NvWriteCounter::counter`].
    pub fn new(inner: T) -> Self {
        Self { inner, count: Arc::default() }
    }

    /// The count, readable while the wrapper is owned elsewhere.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.count.clone()
    }

    /// Whether `command` (a whole command, header included) writes NV on `family`.
    pub fn writes_nv(family: Family, command: &[u8]) -> bool {
        let Some(code) = command.get(6..10).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])) else {
            return false;
        };
        match family {
            Family::Tpm20 => TPM2.contains(&code),
            Family::Tpm12 => TPM12.contains(&code),
        }
    }
}

impl<T> std::fmt::Debug for NvWriteCounter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvWriteCounter").field("count", &self.count.load(Ordering::SeqCst)).finish_non_exhaustive()
    }
}

impl<T: HwTpm> HwTpm for NvWriteCounter<T> {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>> {
        let rsp = self.inner.transmit(locality, command)?;
        if rsp.get(6..10) == Some(&[0, 0, 0, 0][..]) && Self::writes_nv(self.inner.family(), command) {
            log::debug!("NV write: command {:02x?}", command.get(6..10));
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        Ok(rsp)
    }
    fn family(&self) -> Family {
        self.inner.family()
    }
    fn describe(&self) -> String {
        format!("{} (NV writes counted)", self.inner.describe())
    }
    fn owns_tpm(&self) -> bool {
        self.inner.owns_tpm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nv_increment_counts_nv_read_does_not() {
        let cmd = |cc: u32| [&[0x80, 0x02, 0, 0, 0, 10][..], &cc.to_be_bytes()].concat();
        assert!(NvWriteCounter::<Box<dyn HwTpm>>::writes_nv(Family::Tpm20, &cmd(0x134)));
        assert!(!NvWriteCounter::<Box<dyn HwTpm>>::writes_nv(Family::Tpm20, &cmd(0x14E)), "NV_Read");
        assert!(NvWriteCounter::<Box<dyn HwTpm>>::writes_nv(Family::Tpm12, &cmd(0xDD)));
        assert!(!NvWriteCounter::<Box<dyn HwTpm>>::writes_nv(Family::Tpm12, &cmd(0xDE)), "ReadCounter");
        assert!(!NvWriteCounter::<Box<dyn HwTpm>>::writes_nv(Family::Tpm20, &[0x80]), "too short");
    }
}
