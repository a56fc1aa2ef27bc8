//! An HVM guest's TPM: the FIFO registers at 0xFED40000, served from dom0 through an ioreq
//! server of Xen's (Debian's device model, QEMU 7.2 built for Xen, has no TPM device).

pub mod acpi;
pub mod serve;
pub mod tis;
