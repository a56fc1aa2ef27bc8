//! Register offsets and bits, per locality page (TCG PC Client Platform TPM Profile (PTP) and
//! the older TIS 1.2/1.3 specification).

/// FIFO (TIS 1.2 and PTP FIFO) registers.
pub mod fifo {
    /// TPM_ACCESS_x (8 bit).
    pub const ACCESS: u32 = 0x00;
    /// TPM_INT_ENABLE_x.
    pub const INT_ENABLE: u32 = 0x08;
    /// TPM_INTF_CAPABILITY_x.
    pub const INTF_CAPABILITY: u32 = 0x14;
    /// TPM_STS_x (32 bit; burstCount in bytes 1-2).
    pub const STS: u32 = 0x18;
    /// TPM_DATA_FIFO_x.
    pub const DATA_FIFO: u32 = 0x24;
    /// TPM_INTERFACE_ID_x (PTP; reads all ones on a TIS 1.2 device).
    pub const INTERFACE_ID: u32 = 0x30;
    /// TPM_DID_VID_x.
    pub const DID_VID: u32 = 0xF00;
    /// TPM_RID_x.
    pub const RID: u32 = 0xF04;

    /// ACCESS: the establishment bit (0: established).
    pub const ACCESS_ESTABLISHMENT: u8 = 1 << 0;
    /// ACCESS: request use of the locality.
    pub const ACCESS_REQUEST_USE: u8 = 1 << 1;
    /// ACCESS: another locality requests use.
    pub const ACCESS_PENDING_REQUEST: u8 = 1 << 2;
    /// ACCESS: seize the TPM from a lower locality.
    pub const ACCESS_SEIZE: u8 = 1 << 3;
    /// ACCESS: the locality was seized.
    pub const ACCESS_BEEN_SEIZED: u8 = 1 << 4;
    /// ACCESS: this locality is active (write 1 to relinquish).
    pub const ACCESS_ACTIVE_LOCALITY: u8 = 1 << 5;
    /// ACCESS: the other bits are valid.
    pub const ACCESS_VALID: u8 = 1 << 7;

    /// STS: the TPM may answer again (responseRetry).
    pub const STS_RESPONSE_RETRY: u32 = 1 << 1;
    /// STS: self test done.
    pub const STS_SELFTEST_DONE: u32 = 1 << 2;
    /// STS: the TPM expects more command bytes.
    pub const STS_EXPECT: u32 = 1 << 3;
    /// STS: response bytes are available.
    pub const STS_DATA_AVAIL: u32 = 1 << 4;
    /// STS: execute the command (write).
    pub const STS_GO: u32 = 1 << 5;
    /// STS: ready for a command / abort (write).
    pub const STS_COMMAND_READY: u32 = 1 << 6;
    /// STS: Expect and dataAvail are valid.
    pub const STS_VALID: u32 = 1 << 7;
    /// STS: burstCount field.
    pub const STS_BURST_SHIFT: u32 = 8;
    /// STS: burstCount mask after shifting.
    pub const STS_BURST_MASK: u32 = 0xFFFF;
    /// STS (PTP): cancel the executing command (write).
    pub const STS_COMMAND_CANCEL: u32 = 1 << 24;
    /// STS (PTP): reset the establishment bit (write, locality 3 or 4).
    pub const STS_RESET_ESTABLISHMENT: u32 = 1 << 25;
    /// STS (PTP): TPM family field (0: 1.2, 1: 2.0).
    pub const STS_FAMILY_SHIFT: u32 = 26;

    /// INTF_CAPABILITY: interface version field.
    pub const CAP_VERSION_SHIFT: u32 = 28;
    /// INTF_CAPABILITY interface version: TIS 1.2.
    pub const CAP_VERSION_TIS12: u32 = 0;
    /// INTF_CAPABILITY interface version: TIS 1.3.
    pub const CAP_VERSION_TIS13: u32 = 2;
    /// INTF_CAPABILITY interface version: PTP FIFO for TPM 2.0.
    pub const CAP_VERSION_PTP: u32 = 3;
}

/// CRB registers.
pub mod crb {
    /// TPM_LOC_STATE_x.
    pub const LOC_STATE: u32 = 0x00;
    /// TPM_LOC_CTRL_x.
    pub const LOC_CTRL: u32 = 0x08;
    /// TPM_LOC_STS_x.
    pub const LOC_STS: u32 = 0x0C;
    /// TPM_CRB_INTF_ID_x, low half (type, version, capabilities, RID).
    pub const INTF_ID_LO: u32 = 0x30;
    /// TPM_CRB_INTF_ID_x, high half (VID, DID).
    pub const INTF_ID_HI: u32 = 0x34;
    /// TPM_CRB_CTRL_REQ_x.
    pub const CTRL_REQ: u32 = 0x40;
    /// TPM_CRB_CTRL_STS_x.
    pub const CTRL_STS: u32 = 0x44;
    /// TPM_CRB_CTRL_CANCEL_x.
    pub const CTRL_CANCEL: u32 = 0x48;
    /// TPM_CRB_CTRL_START_x.
    pub const CTRL_START: u32 = 0x4C;
    /// TPM_CRB_CTRL_CMD_SIZE_x.
    pub const CMD_SIZE: u32 = 0x58;
    /// TPM_CRB_CTRL_CMD_LADDR_x.
    pub const CMD_LADDR: u32 = 0x5C;
    /// TPM_CRB_CTRL_CMD_HADDR_x.
    pub const CMD_HADDR: u32 = 0x60;
    /// TPM_CRB_CTRL_RSP_SIZE_x.
    pub const RSP_SIZE: u32 = 0x64;
    /// TPM_CRB_CTRL_RSP_ADDR_x (64 bit, two 32-bit halves).
    pub const RSP_ADDR_LO: u32 = 0x68;
    /// High half of RSP_ADDR.
    pub const RSP_ADDR_HI: u32 = 0x6C;
    /// INTF_ID: CapLocality (localities 1-4 exist).
    pub const INTF_CAP_LOCALITY: u32 = 1 << 8;
    /// The data buffer's usual place in the locality page.
    pub const DATA_BUFFER: u32 = 0x80;

    /// LOC_STATE: establishment (1: established... inverted like ACCESS on some TPMs).
    pub const LOC_STATE_ESTABLISHED: u32 = 1 << 0;
    /// LOC_STATE: some locality is assigned.
    pub const LOC_STATE_ASSIGNED: u32 = 1 << 1;
    /// LOC_STATE: active locality field.
    pub const LOC_STATE_ACTIVE_SHIFT: u32 = 2;
    /// LOC_STATE: the register is valid.
    pub const LOC_STATE_VALID: u32 = 1 << 7;
    /// LOC_CTRL: request access.
    pub const LOC_CTRL_REQUEST: u32 = 1 << 0;
    /// LOC_CTRL: relinquish.
    pub const LOC_CTRL_RELINQUISH: u32 = 1 << 1;
    /// LOC_STS: granted.
    pub const LOC_STS_GRANTED: u32 = 1 << 0;
    /// CTRL_REQ: go to the ready state.
    pub const CTRL_REQ_CMD_READY: u32 = 1 << 0;
    /// CTRL_REQ: go idle.
    pub const CTRL_REQ_GO_IDLE: u32 = 1 << 1;
    /// CTRL_STS: fatal error.
    pub const CTRL_STS_FATAL: u32 = 1 << 0;
    /// CTRL_STS: the TPM is idle.
    pub const CTRL_STS_IDLE: u32 = 1 << 1;
    /// CTRL_START / CTRL_CANCEL: the one meaningful bit.
    pub const START: u32 = 1;
}

/// TPM_INTERFACE_ID / CRB_INTF_ID interface type field (bits 0-3).
pub mod intf {
    /// FIFO interface for TPM 2.0 (PTP).
    pub const TYPE_FIFO: u32 = 0x0;
    /// Command Response Buffer.
    pub const TYPE_CRB: u32 = 0x1;
    /// TIS 1.3 (legacy: the register reads all ones).
    pub const TYPE_TIS: u32 = 0xF;
}
