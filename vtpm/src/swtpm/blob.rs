//! The container swtpm puts around state blobs it hands out with GET_STATEBLOB and accepts
//! with SET_STATEBLOB, so state migrates between swtpm and us in both directions.
//!
//! A 10-byte header (version 2, minimum version 1, header size, flags, total length, all
//! big-endian) followed by tag-length-value records: the migration data record holds the
//! plain data record, which holds libtpms' blob. Encrypted variants (swtpm's own state or
//! migration keys) cannot be opened here and are refused with the code swtpm uses when it
//! lacks the key.

use super::ctrl::rc;

/// `BLOB_HEADER_VERSION`.
pub const BLOB_HEADER_VERSION: u8 = 2;
/// `sizeof(blobheader)`.
pub const BLOB_HEADER_SIZE: usize = 10;
/// `BLOB_FLAG_ENCRYPTED`: encrypted with swtpm's state key.
pub const BLOB_FLAG_ENCRYPTED: u16 = 0x01;
/// `BLOB_FLAG_MIGRATION_ENCRYPTED`: encrypted with swtpm's migration key.
pub const BLOB_FLAG_MIGRATION_ENCRYPTED: u16 = 0x02;
/// `BLOB_FLAG_MIGRATION_DATA`: the payload is a migration data record.
pub const BLOB_FLAG_MIGRATION_DATA: u16 = 0x04;
/// `TAG_DATA`: plain state.
pub const TAG_DATA: u16 = 1;
/// `TAG_MIGRATION_DATA`: the records of a blob for migration.
pub const TAG_MIGRATION_DATA: u16 = 4;
const TLV_HEADER_SIZE: usize = 6;

fn tlv(tag: u16, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&tag.to_be_bytes());
    // State blobs are far below 4 GiB (the control protocol's lengths are u32 anyway).
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// The first record with `tag`, if the records are well formed up to it.
fn find_tag(mut records: &[u8], tag: u16) -> Option<&[u8]> {
    while records.len() >= TLV_HEADER_SIZE {
        let t = u16::from_be_bytes([records[0], records[1]]);
        let len = u32::from_be_bytes([records[2], records[3], records[4], records[5]]) as usize;
        let value = records.get(TLV_HEADER_SIZE..TLV_HEADER_SIZE.checked_add(len)?)?;
        if t == tag {
            return Some(value);
        }
        records = &records[TLV_HEADER_SIZE + len..];
    }
    None
}

/// Wraps an unencrypted libtpms blob as swtpm's GET_STATEBLOB does.
pub fn wrap(plain: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(TLV_HEADER_SIZE + plain.len());
    tlv(TAG_DATA, plain, &mut data);
    let mut records = Vec::with_capacity(TLV_HEADER_SIZE + data.len());
    tlv(TAG_MIGRATION_DATA, &data, &mut records);
    let total = BLOB_HEADER_SIZE + records.len();
    let mut out = Vec::with_capacity(total);
    out.push(BLOB_HEADER_VERSION);
    out.push(1);
    out.extend_from_slice(&(BLOB_HEADER_SIZE as u16).to_be_bytes());
    out.extend_from_slice(&BLOB_FLAG_MIGRATION_DATA.to_be_bytes());
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&records);
    out
}

/// The data record of one level of a blob: the payload itself in version 1, the record with
/// `tag` in version 2.
fn plain_data(payload: &[u8], tag: u16, version: u8) -> Result<&[u8], u32> {
    match version {
        1 => Ok(payload),
        2 => find_tag(payload, tag).ok_or_else(|| {
            log::warn!("state blob lacks its data record (tag {tag})");
            rc::TPM_FAIL
        }),
        _ => Err(rc::TPM_FAIL),
    }
}

/// Opens a blob received with SET_STATEBLOB (`encrypted` is the request's
/// `PTM_STATE_FLAG_ENCRYPTED`) and returns libtpms' blob, or the `ptm_res` swtpm answers.
/// An empty blob, or a header without data, stays empty: it clears that state.
pub fn unwrap(blob: &[u8], encrypted: bool) -> Result<Vec<u8>, u32> {
    if blob.is_empty() {
        return Ok(Vec::new());
    }
    if blob.len() < BLOB_HEADER_SIZE {
        log::warn!("state blob of {} bytes is shorter than its header", blob.len());
        return Err(rc::TPM_BAD_PARAMETER);
    }
    let (version, min_version) = (blob[0], blob[1]);
    let hdrsize = u16::from_be_bytes([blob[2], blob[3]]) as usize;
    let flags = u16::from_be_bytes([blob[4], blob[5]]);
    let totlen = u32::from_be_bytes([blob[6], blob[7], blob[8], blob[9]]) as usize;
    if totlen != blob.len() {
        log::warn!("state blob header says {totlen} bytes, {} arrived", blob.len());
        return Err(rc::TPM_BAD_PARAMETER);
    }
    if min_version > BLOB_HEADER_VERSION {
        log::warn!("state blob needs container version {min_version}; we know {BLOB_HEADER_VERSION}");
        return Err(rc::TPM_BAD_VERSION);
    }
    if hdrsize != BLOB_HEADER_SIZE {
        log::warn!("state blob header size {hdrsize} is not {BLOB_HEADER_SIZE}");
        return Err(rc::TPM_BAD_DATASIZE);
    }
    let payload = &blob[BLOB_HEADER_SIZE..];
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    if flags & BLOB_FLAG_MIGRATION_ENCRYPTED != 0 {
        log::warn!("state blob is encrypted with a migration key; we have none");
        return Err(rc::TPM_KEYNOTFOUND);
    }
    let migration = plain_data(payload, TAG_MIGRATION_DATA, version)?;
    if encrypted || flags & BLOB_FLAG_ENCRYPTED != 0 {
        log::warn!("state blob is encrypted with swtpm's state key; send it unencrypted");
        return Err(rc::TPM_KEYNOTFOUND);
    }
    Ok(plain_data(migration, TAG_DATA, version)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_is_swtpms_container() {
        // Layout observed from swtpm 0.7.1's GET_STATEBLOB: header, migration record of the
        // data record.
        let w = wrap(b"abc");
        assert_eq!(w, [2, 1, 0, 10, 0, 4, 0, 0, 0, 25, 0, 4, 0, 0, 0, 9, 0, 1, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(unwrap(&w, false), Ok(b"abc".to_vec()));
    }

    #[test]
    fn unwrap_accepts_swtpm_blobs_and_refuses_what_it_cannot_open() {
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(unwrap(&wrap(&big), false), Ok(big.clone()));
        assert_eq!(unwrap(&[], false), Ok(vec![]));
        assert_eq!(unwrap(&[2, 1, 0, 10, 0, 4, 0, 0, 0, 10], true), Ok(vec![]));
        // A raw libtpms blob has no container.
        assert_eq!(unwrap(b"raw libtpms blob", false), Err(rc::TPM_BAD_PARAMETER));
        assert_eq!(unwrap(&[2, 1, 0], false), Err(rc::TPM_BAD_PARAMETER));
        let mut w = wrap(b"abc");
        w.push(0);
        assert_eq!(unwrap(&w, false), Err(rc::TPM_BAD_PARAMETER), "total length mismatch");
        let mut w = wrap(b"abc");
        w[1] = 3;
        assert_eq!(unwrap(&w, false), Err(rc::TPM_BAD_VERSION));
        let mut w = wrap(b"abc");
        w[3] = 12;
        assert_eq!(unwrap(&w, false), Err(rc::TPM_BAD_DATASIZE));
        let w = wrap(b"abc");
        assert_eq!(unwrap(&w, true), Err(rc::TPM_KEYNOTFOUND), "request says encrypted");
        let mut e = wrap(b"abc");
        e[5] |= BLOB_FLAG_ENCRYPTED as u8;
        assert_eq!(unwrap(&e, false), Err(rc::TPM_KEYNOTFOUND));
        let mut m = wrap(b"abc");
        m[5] |= BLOB_FLAG_MIGRATION_ENCRYPTED as u8;
        assert_eq!(unwrap(&m, false), Err(rc::TPM_KEYNOTFOUND));
        // Version 1 containers hold the data directly.
        let mut v1 = vec![1, 1, 0, 10, 0, 0, 0, 0, 0, 13];
        v1.extend_from_slice(b"xyz");
        assert_eq!(unwrap(&v1, false), Ok(b"xyz".to_vec()));
        // A record whose length runs past the end is not found.
        let mut t = vec![2, 1, 0, 10, 0, 4, 0, 0, 0, 0, 0, 4, 0, 0, 1, 0, 9];
        let len = t.len() as u32;
        t[6..10].copy_from_slice(&len.to_be_bytes());
        assert_eq!(unwrap(&t, false), Err(rc::TPM_FAIL));
    }
}
