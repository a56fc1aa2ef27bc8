//! The seam the manager uses: a hardware TPM that transmits a command at a locality.

use crate::Result;

pub use xvtpm_proto::tpm::Family;

/// A hardware TPM: the MMIO driver, the kernel's `/dev/tpmrm0`, or swtpm in tests.
pub trait HwTpm {
    /// Sends one command at `locality` and returns the TPM's response. A transport that
    /// cannot select localities refuses any but 0.
    fn transmit(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>>;
    /// The TPM's family.
    fn family(&self) -> Family;
    /// One line for logs: what the TPM is and how it is reached.
    fn describe(&self) -> String;
    /// Whether this connection is the TPM's only user, so that sessions and objects it did not
    /// make are left over from an earlier run and may be flushed (the MMIO driver, swtpm). The
    /// kernel's devices are shared: /dev/tpmrm0 flushes behind each client itself, and other
    /// processes use /dev/tpm0.
    fn owns_tpm(&self) -> bool {
        true
    }
}

impl<T: HwTpm + ?Sized> HwTpm for Box<T> {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>> {
        (**self).transmit(locality, command)
    }
    fn family(&self) -> Family {
        (**self).family()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn owns_tpm(&self) -> bool {
        (**self).owns_tpm()
    }
}
