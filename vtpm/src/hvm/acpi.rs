//! The ACPI TPM2 table an HVM guest needs for measured boot with TPM 2.0: Xen 4.17's hvmloader
//! writes only the TPM 1.2 one (TCPA), and Linux finds a TPM 2.0's event log only through a
//! TPM2 table. The domain file passes it with `acpi_firmware=`; the SeaBIOS that
//! `scripts/build-seabios.sh` builds writes the log's address into it (the address is 0 here:
//! where the firmware's reserved memory lies is known only while it runs).
//! Layout: TCG ACPI Specification, table "TPM2", revision 4, with the log fields (76 bytes).

/// Start method 6: the FIFO (TIS) interface at 0xFED40000, no CRB control area.
const START_METHOD_FIFO: u32 = 6;
/// The table's length with the log's length and address.
pub const TPM2_TABLE_LEN: usize = 76;
/// The event log's room: as QEMU's firmware gives it.
pub const DEFAULT_LOG_LEN: u32 = 64 * 1024;

/// The TPM2 table for the FIFO interface with `log_len` bytes of log and no address yet.
pub fn tpm2_table(log_len: u32) -> Vec<u8> {
    let mut t = Vec::with_capacity(TPM2_TABLE_LEN);
    t.extend_from_slice(b"TPM2");
    t.extend_from_slice(&(TPM2_TABLE_LEN as u32).to_le_bytes());
    t.push(4); // revision
    t.push(0); // checksum, below
    t.extend_from_slice(b"XVTPM "); // OEM id
    t.extend_from_slice(b"XVTPMTIS"); // OEM table id
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"XVTP"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(&0u16.to_le_bytes()); // platform class: client
    t.extend_from_slice(&0u16.to_le_bytes()); // reserved
    t.extend_from_slice(&0u64.to_le_bytes()); // CRB control area: none
    t.extend_from_slice(&START_METHOD_FIFO.to_le_bytes());
    t.extend_from_slice(&[0; 12]); // start method parameters
    t.extend_from_slice(&log_len.to_le_bytes()); // LAML
    t.extend_from_slice(&0u64.to_le_bytes()); // LASA: the firmware's
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm2_table_fields_and_checksum() {
        let t = tpm2_table(DEFAULT_LOG_LEN);
        assert_eq!(t.len(), TPM2_TABLE_LEN);
        assert_eq!(&t[0..4], b"TPM2");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().expect("4 or 8 bytes")), 76);
        assert_eq!(t[8], 4);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "an ACPI table sums to 0");
        // Where Linux (struct acpi_table_tpm2 + acpi_tpm2_phy) and SeaBIOS read them.
        assert_eq!(u32::from_le_bytes(t[48..52].try_into().expect("4 or 8 bytes")), 6, "start method");
        assert_eq!(u32::from_le_bytes(t[64..68].try_into().expect("4 or 8 bytes")), 65536, "LAML");
        assert_eq!(u64::from_le_bytes(t[68..76].try_into().expect("4 or 8 bytes")), 0, "LASA");
        assert_ne!(tpm2_table(4096)[9], t[9], "the checksum follows the contents");
    }
}
