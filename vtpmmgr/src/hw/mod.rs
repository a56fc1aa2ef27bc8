//! What the manager keeps about its hardware TPM binding (the sealed-key block's content),
//! and the TPM 2.0 operations behind it.

mod busy;
pub mod session;
pub mod tpm12;
pub mod tpm2;

use xvtpm_tis::Family;

use crate::{Error, Result};

/// How the root key is sealed: the content of the store's sealed-key block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The hardware TPM's family.
    pub family: Family,
    /// Locality the manager uses.
    pub locality: u8,
    /// PCRs the root key is sealed to.
    pub pcrs: Vec<u8>,
    /// The counter bound into every root: a TPM 2.0 NV index, or a TPM 1.2 counter id.
    pub nv_index: u32,
    /// TPM 2.0: the sealed object's private part (TPM2B_PRIVATE's contents). TPM 1.2: the
    /// TPM_STORED_DATA12 from TPM_Seal.
    pub private: Vec<u8>,
    /// TPM 2.0: the sealed object's public part. TPM 1.2: empty.
    pub public: Vec<u8>,
    /// TPM 2.0: the creation data, creation hash and creation ticket of the sealed object, so
    /// the TPM can vouch that this manager created it. TPM 1.2: empty (the seal info serves).
    pub creation: Vec<u8>,
    /// TPM 2.0: the storage primary key's Name at init. TPM 1.2: the SRK's TPM_PUBKEY at
    /// init, which the transport sessions of the seal and unseal are encrypted to. Empty for
    /// stores made before it was recorded (then not checked, and a TPM 1.2 unseals in the
    /// clear).
    pub primary_name: Vec<u8>,
    /// TPM 2.0: the counter's authValue is derived from the root key (false for stores made
    /// before counters had one: their counter's authValue is empty).
    pub counter_auth: bool,
    /// The deep quotes' signing key, with an auth derived from the root key. TPM 2.0: its
    /// private and public parts ([`Sealed::ak_parts`]); TPM 1.2: the TPM_KEY12 wrapped by the
    /// SRK. Empty for stores made before it was kept (TPM 1.2: each run then makes one).
    pub ak: Vec<u8>,
    /// TPM 2.0: the persistent handle of the storage primary key (0: it is made from its
    /// template at each start, under the owner's empty auth).
    pub srk_handle: u32,
}

impl Sealed {
    /// The TPM 2.0 side of the manager for this store: at its locality, with its storage
    /// primary key pinned (its recorded Name) and used from its persistent handle if it has
    /// one.
    pub fn tpm2<'a>(&self, tpm: &'a mut dyn xvtpm_tis::HwTpm) -> tpm2::Tpm2<'a> {
        let mut t = tpm2::Tpm2::new(tpm, self.locality);
        if !self.primary_name.is_empty() {
            t.pin_primary(self.primary_name.clone());
        }
        if self.srk_handle != 0 {
            t.use_persistent_primary(self.srk_handle);
        }
        t
    }

    /// The TPM 2.0 attestation key's (private, public) parts, as `ak` keeps them.
    pub fn ak_parts(&self) -> Option<(&[u8], &[u8])> {
        let n = u16::from_le_bytes([*self.ak.first()?, *self.ak.get(1)?]) as usize;
        let private = self.ak.get(2..2 + n)?;
        Some((private, self.ak.get(2 + n..)?))
    }

    /// `ak` for a TPM 2.0 attestation key's parts.
    pub fn ak_from_parts(private: &[u8], public: &[u8]) -> Vec<u8> {
        [&(private.len() as u16).to_le_bytes()[..], private, public].concat()
    }
}

/// A PCR selection as the 3-byte bitmap both TPM families use (PCRs 0-23).
pub(crate) fn pcr_bitmap(pcrs: &[u8]) -> [u8; 3] {
    let mut s = [0u8; 3];
    for &p in pcrs.iter().filter(|&&p| p < 24) {
        s[(p / 8) as usize] |= 1 << (p % 8);
    }
    s
}

/// The PCRs of `pcrs` in ascending order, each once (the order TPMs hash them in).
pub(crate) fn pcrs_in_order(pcrs: &[u8]) -> Vec<u8> {
    let bits = pcr_bitmap(pcrs);
    (0..24u8).filter(|p| bits[(p / 8) as usize] & (1 << (p % 8)) != 0).collect()
}

/// Format 1 had no primary Name and no counter authValue.
const FORMAT_1: u8 = 1;
const FORMAT: u8 = 2;
const FAMILY_TPM2: u8 = 2;
const FAMILY_TPM12: u8 = 1;

impl Sealed {
    /// Serialises it.
    pub fn encode(&self) -> Vec<u8> {
        let family = match self.family {
            Family::Tpm20 => FAMILY_TPM2,
            Family::Tpm12 => FAMILY_TPM12,
        };
        let mut b = vec![FORMAT, family, self.locality, self.pcrs.len() as u8];
        b.extend_from_slice(&self.pcrs);
        b.extend_from_slice(&self.nv_index.to_le_bytes());
        for part in [&self.private, &self.public, &self.creation, &self.primary_name, &self.ak] {
            b.extend_from_slice(&(part.len() as u16).to_le_bytes());
            b.extend_from_slice(part);
        }
        b.push(self.counter_auth as u8);
        b.extend_from_slice(&self.srk_handle.to_le_bytes());
        b
    }

    /// Parses it.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::Corrupt { store: "sealed-key block".into(), why: why.to_string() };
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = b.get(at..at + n).ok_or_else(|| bad("truncated"))?;
            at += n;
            Ok(s)
        };
        let head = take(4)?;
        let format = head[0];
        let family = match (format, head[1]) {
            (FORMAT | FORMAT_1, FAMILY_TPM2) => Family::Tpm20,
            (FORMAT | FORMAT_1, FAMILY_TPM12) => Family::Tpm12,
            (f, t) => return Err(bad(&format!("format {f} family {t} unknown"))),
        };
        let (locality, n) = (head[2], head[3] as usize);
        let pcrs = take(n)?.to_vec();
        let nv_index = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("nv index"))?);
        let mut part = || -> Result<Vec<u8>> {
            let l = take(2)?;
            let l = u16::from_le_bytes([l[0], l[1]]) as usize;
            Ok(take(l)?.to_vec())
        };
        let private = part()?;
        let public = part()?;
        let creation = part()?;
        let primary_name = if format == FORMAT { part()? } else { Vec::new() };
        let ak = if format == FORMAT { part()? } else { Vec::new() };
        let counter_auth = format == FORMAT && take(1)?[0] == 1;
        let srk_handle = match format {
            FORMAT => u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("srk handle"))?),
            _ => 0,
        };
        Ok(Sealed {
            family,
            locality,
            pcrs,
            nv_index,
            private,
            public,
            creation,
            primary_name,
            counter_auth,
            ak,
            srk_handle,
        })
    }
}
