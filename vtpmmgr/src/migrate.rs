//! Moving a vTPM to another manager. What moves through the manager is the vTPM's record: the
//! hash and key of its last saved state, and its token's digest (not its group: groups are
//! each manager's own). It travels encrypted to the destination manager's migration key (ECDH
//! on P-256 with a fresh ephemeral key, HKDF-SHA256, AES-256-GCM over the whole header as
//! associated data). The vTPM's state travels on its own (its disk or state directory), and
//! is already encrypted under the key the bundle carries.
//!
//! Bundle: `"XVTPMMIG" | version u32 (1) | destination public key (65) | ephemeral public key
//! (65) | nonce (12) | ciphertext of the record as the store encodes it (120 bytes, group 0) |
//! GCM tag (16)`, 290 bytes.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use p256::ecdh::diffie_hellman;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};

use crate::store::record::{Record, HAS_KEY, RECORD_LEN};
use crate::{Error, Result};

/// The bundle's first bytes.
pub const MAGIC: &[u8; 8] = b"XVTPMMIG";
const VERSION: u32 = 1;
/// A migration public key: an uncompressed SEC1 P-256 point.
pub const PUBLIC_LEN: usize = 65;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 8 + 4 + PUBLIC_LEN * 2 + NONCE_LEN;
/// A bundle's length.
pub const BUNDLE_LEN: usize = HEADER_LEN + RECORD_LEN + 16;
const KDF_SALT: &[u8] = b"xvtpm-vtpm-migration-v1";

/// What of `rec` moves: no group, and of its flags only [`HAS_KEY`] and the saved blob's
/// length (bits 8 and up).
fn moving(rec: &Record) -> Record {
    Record { group: 0, flags: rec.flags & (HAS_KEY | !0xFF), ..rec.clone() }
}

/// A manager's migration key: derived from its store's root key, so only the manager whose
/// store the hardware TPM unseals holds it.
pub struct MigrationKey {
    secret: SecretKey,
}

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationKey").field("public", &crate::hex(&self.public())).finish_non_exhaustive()
    }
}

/// The symmetric key of one bundle.
fn bundle_key(shared: &p256::ecdh::SharedSecret, header: &[u8]) -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    shared
        .extract::<Sha256>(Some(KDF_SALT))
        .expand(&header[12..12 + 2 * PUBLIC_LEN], &mut key)
        .map_err(|_| Error::Protocol("key derivation failed".into()))?;
    Ok(key)
}

fn public_key(b: &[u8]) -> Result<PublicKey> {
    PublicKey::from_sec1_bytes(b)
        .map_err(|_| Error::Protocol("not a migration key (an uncompressed P-256 point, 65 bytes)".into()))
}

/// Checks that `b` is a migration public key.
pub fn check_public(b: &[u8]) -> Result<()> {
    public_key(b).map(drop)
}

/// The migration public key a bundle was made for; checks its format and version only (its
/// contents open only with that key).
pub fn destination(bundle: &[u8]) -> Result<&[u8]> {
    if bundle.len() != BUNDLE_LEN || &bundle[..8] != MAGIC {
        return Err(Error::Protocol(format!(
            "not a vTPM migration bundle ({} bytes; {BUNDLE_LEN} starting with XVTPMMIG expected)",
            bundle.len()
        )));
    }
    let version = u32::from_be_bytes([bundle[8], bundle[9], bundle[10], bundle[11]]);
    if version != VERSION {
        return Err(Error::Protocol(format!("migration bundle version {version} (this manager reads {VERSION})")));
    }
    Ok(&bundle[12..12 + PUBLIC_LEN])
}

impl MigrationKey {
    /// The key for `seed` (32 bytes that only this manager can derive).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        // A seed outside the curve's order (odds about 2^-32) is hashed again.
        let mut s = seed;
        loop {
            if let Ok(secret) = SecretKey::from_slice(&s) {
                return Self { secret };
            }
            s = Sha256::digest(s).into();
        }
    }

    /// The public key, as `export` takes it.
    pub fn public(&self) -> [u8; PUBLIC_LEN] {
        let p = self.secret.public_key().to_encoded_point(false);
        let mut out = [0u8; PUBLIC_LEN];
        out.copy_from_slice(p.as_bytes());
        out
    }

    /// Decrypts a bundle made for this key.
    pub fn open(&self, bundle: &[u8]) -> Result<Record> {
        if destination(bundle)? != self.public() {
            return Err(Error::NotAuthorized("the bundle was made for another manager's migration key".into()));
        }
        let (header, sealed) = bundle.split_at(HEADER_LEN);
        let eph = public_key(&header[12 + PUBLIC_LEN..12 + 2 * PUBLIC_LEN])?;
        let shared = diffie_hellman(self.secret.to_nonzero_scalar(), eph.as_affine());
        let key = bundle_key(&shared, header)?;
        let nonce = Nonce::from_slice(&header[HEADER_LEN - NONCE_LEN..]);
        let plain = Aes256Gcm::new(&key.into())
            .decrypt(nonce, Payload { msg: sealed, aad: header })
            .map_err(|_| Error::NotAuthorized("the migration bundle does not authenticate (damaged?)".into()))?;
        match plain.len() {
            // Sealed as `moving` made it, so it is a vTPM's record and nothing else.
            RECORD_LEN => Ok(moving(&Record::decode(&plain))),
            n => Err(Error::Protocol(format!("a migration bundle holding {n} bytes, not a record"))),
        }
    }
}

/// Encrypts what of `rec` moves to the manager whose migration public key is `to`.
pub fn seal(to: &[u8], rec: &Record) -> Result<Vec<u8>> {
    let dest = public_key(to)?;
    let eph = p256::ecdh::EphemeralSecret::random(&mut rand::rngs::OsRng);
    let eph_pub = eph.public_key().to_encoded_point(false);
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_be_bytes());
    header.extend_from_slice(dest.to_encoded_point(false).as_bytes());
    header.extend_from_slice(eph_pub.as_bytes());
    header.extend_from_slice(&nonce);
    let key = bundle_key(&eph.diffie_hellman(&dest), &header)?;
    let sealed = Aes256Gcm::new(&key.into())
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: &moving(rec).encode(), aad: &header })
        .map_err(|_| Error::Protocol("encryption failed".into()))?;
    Ok([header, sealed].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved() -> Record {
        Record { uuid: [7; 16], group: 0, flags: HAS_KEY | 64 << 8, hash: [1; 32], key: [2; 32], token: [3; 32] }
    }

    #[test]
    fn a_bundle_opens_only_with_its_key_and_intact() {
        let (a, b) = (MigrationKey::from_seed([9; 32]), MigrationKey::from_seed([10; 32]));
        let bundle = seal(&a.public(), &moved()).expect("seal");
        assert_eq!(bundle.len(), BUNDLE_LEN);
        assert_eq!(a.open(&bundle).expect("open"), moved());
        assert!(matches!(b.open(&bundle), Err(Error::NotAuthorized(_))), "another manager's key");
        // No byte can change unnoticed, header included.
        for i in [0, 9, 20, 100, HEADER_LEN - 1, HEADER_LEN, BUNDLE_LEN - 1] {
            let mut bad = bundle.clone();
            bad[i] ^= 1;
            assert!(a.open(&bad).is_err(), "byte {i} flipped");
        }
        assert!(a.open(&bundle[..BUNDLE_LEN - 1]).is_err());
        // Two bundles of the same record share nothing but the header's fixed part.
        let again = seal(&a.public(), &moved()).expect("seal");
        assert_ne!(bundle[HEADER_LEN..], again[HEADER_LEN..]);
    }

    #[test]
    fn keys_are_stable_per_seed_and_bad_public_keys_are_refused() {
        assert_eq!(MigrationKey::from_seed([9; 32]).public(), MigrationKey::from_seed([9; 32]).public());
        assert!(seal(&[4; 65], &moved()).is_err());
        assert!(seal(&[], &moved()).is_err());
    }
}
