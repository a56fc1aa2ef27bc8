//! One vTPM's record: its uuid and group, the hash and key of its last saved state, and the
//! digest of the token that lets a vTPM reach it over a Unix socket.

/// Encoded length.
pub const RECORD_LEN: usize = 120;

/// `flags`: a state hash and key have been saved.
pub const HAS_KEY: u32 = 1;
/// `flags`: the record is a group (its uuid is the group's, `group` its number), not a vTPM.
pub const IS_GROUP: u32 = 2;
/// `flags`: the record approves a boot hash (in `hash`) for the vTPMs of group `group`; its
/// uuid is derived from both ([`Record::approval`]).
pub const IS_APPROVAL: u32 = 4;
/// `flags`: the vTPM was exported to another manager and is frozen here: its key is refused
/// until it is deleted or imported back.
pub const EXPORTED: u32 = 8;
/// `flags`: the record binds a vTPM to the uid of the Unix-socket clients that may act for it
/// (in `group`); its uuid is derived from the vTPM's ([`Record::uid_binding`]).
pub const IS_UID_BINDING: u32 = 16;
/// `flags`: the record pins a source manager's migration identity (its SHA-256 in `hash`):
/// bundles signed by it are imported ([`Record::trusted_source`]).
pub const IS_TRUSTED_SOURCE: u32 = 32;
/// `flags`: the record remembers an imported bundle's export id, so it imports once
/// ([`Record::seen_export`]).
pub const IS_SEEN_EXPORT: u32 = 64;
/// `flags`: the record remembers where an exported vTPM went (the SHA-256 of the destination's
/// migration identity in `hash`), so it is not exported to a second manager by mistake
/// ([`Record::export_destination`]).
pub const IS_EXPORT_DEST: u32 = 128;
/// The flags of records that are not vTPMs.
const NOT_A_VTPM: u32 = IS_GROUP | IS_APPROVAL | IS_UID_BINDING | IS_TRUSTED_SOURCE | IS_SEEN_EXPORT | IS_EXPORT_DEST;

/// A vTPM's record.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// The vTPM's uuid (the xenstore `uuid` of its device).
    pub uuid: [u8; 16],
    /// Its group.
    pub group: u32,
    /// [`HAS_KEY`].
    pub flags: u32,
    /// Hash of the vTPM's last saved state (up to 32 bytes; shorter hashes are zero-padded).
    pub hash: [u8; 32],
    /// Key of the vTPM's last saved state.
    pub key: [u8; 32],
    /// SHA-256 of the vTPM's access token for Unix-socket clients (all zeros: none).
    pub token: [u8; 32],
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("Record")
            .field("uuid", &crate::uuid_str(&self.uuid))
            .field("group", &self.group)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl Record {
    /// A provisioned vTPM with no saved state yet.
    pub fn new(uuid: [u8; 16], group: u32) -> Self {
        Self { uuid, group, flags: 0, hash: [0; 32], key: [0; 32], token: [0; 32] }
    }

    /// Whether a state hash and key have been saved.
    pub fn has_key(&self) -> bool {
        self.flags & HAS_KEY != 0
    }

    /// Whether the vTPM was exported (and is frozen here).
    pub fn is_exported(&self) -> bool {
        self.flags & EXPORTED != 0
    }

    /// Whether the record is a group.
    pub fn is_group(&self) -> bool {
        self.flags & IS_GROUP != 0
    }

    /// Whether the record approves a boot hash.
    pub fn is_approval(&self) -> bool {
        self.flags & IS_APPROVAL != 0
    }

    /// Whether the record is a vTPM (not a group, an approval, a uid binding or a migration
    /// record).
    pub fn is_vtpm(&self) -> bool {
        self.flags & NOT_A_VTPM == 0
    }

    /// A record of kind `flags` keyed by a hash of `label` and `what`, holding `hash`.
    fn keyed(label: &[u8], what: &[u8], flags: u32, hash: [u8; 32]) -> Self {
        use sha2::{Digest, Sha256};
        let d = Sha256::new().chain_update(label).chain_update(what).finalize();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&d[..16]);
        Record { flags, hash, ..Record::new(uuid, 0) }
    }

    /// The record pinning the source manager whose migration identity is `identity`.
    pub fn trusted_source(identity: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        Self::keyed(b"xvtpm-trusted-source", identity, IS_TRUSTED_SOURCE, Sha256::digest(identity).into())
    }

    /// The record of an imported bundle's export id.
    pub fn seen_export(id: &[u8]) -> Self {
        Self::keyed(b"xvtpm-seen-export", id, IS_SEEN_EXPORT, [0; 32])
    }

    /// The record of where vTPM `vtpm` was exported to (`destination`: that manager's
    /// migration identity).
    pub fn export_destination(vtpm: &[u8; 16], destination: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        Self::keyed(b"xvtpm-exported-to", vtpm, IS_EXPORT_DEST, Sha256::digest(destination).into())
    }

    /// The record binding vTPM `vtpm` to socket clients running as `uid`.
    pub fn uid_binding(vtpm: &[u8; 16], uid: u32) -> Self {
        use sha2::{Digest, Sha256};
        let d = Sha256::new().chain_update(b"xvtpm-bound-uid").chain_update(vtpm).finalize();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&d[..16]);
        let mut r = Record::new(uuid, uid);
        r.flags = IS_UID_BINDING;
        r
    }

    /// The record approving `boot_hash` in `group`. Its key is a hash of both, so it can
    /// never be a vTPM's or a group's uuid by accident, and a lookup finds it directly.
    pub fn approval(group: u32, boot_hash: &[u8; 32]) -> Self {
        use sha2::{Digest, Sha256};
        let d = Sha256::new()
            .chain_update(b"xvtpm-approved-boot-hash")
            .chain_update(group.to_be_bytes())
            .chain_update(boot_hash)
            .finalize();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&d[..16]);
        let mut r = Record::new(uuid, group);
        r.flags = IS_APPROVAL;
        r.hash = *boot_hash;
        r
    }

    pub(crate) fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..16].copy_from_slice(&self.uuid);
        b[16..20].copy_from_slice(&self.group.to_le_bytes());
        b[20..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..56].copy_from_slice(&self.hash);
        b[56..88].copy_from_slice(&self.key);
        b[88..120].copy_from_slice(&self.token);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Self {
        let mut r = Record::new([0; 16], 0);
        r.uuid.copy_from_slice(&b[..16]);
        r.group = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        r.flags = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        r.hash.copy_from_slice(&b[24..56]);
        r.key.copy_from_slice(&b[56..88]);
        r.token.copy_from_slice(&b[88..120]);
        r
    }
}
