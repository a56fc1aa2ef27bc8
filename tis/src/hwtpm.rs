//! The seam the manager uses: a hardware TPM that transmits a command at a locality.

use crate::Result;

/// TPM family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// TPM 1.2.
    Tpm12,
    /// TPM 2.0.
    Tpm20,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Tpm12 => "1.2",
            Family::Tpm20 => "2.0",
        })
    }
}

/// A hardware TPM: the MMIO driver, the kernel's `/dev/tpmrm0`, or swtpm in tests.
pub trait HwTpm {
    /// Sends one command at `locality` and returns the TPM's response. A transport that
    /// cannot select localities refuses any but 0.
    fn transmit(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>>;
    /// The TPM's family.
    fn family(&self) -> Family;
    /// One line for logs: what the TPM is and how it is reached.
    fn describe(&self) -> String;
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
}
