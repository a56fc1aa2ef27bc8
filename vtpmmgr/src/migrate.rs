//! Moving a vTPM to another manager. What moves through the manager is the vTPM's record: the
//! hash and key of its last saved state, and its token's digest (not its group: groups are
//! each manager's own). It travels encrypted to the destination manager's migration key (ECDH
//! on P-256 with a fresh ephemeral key, HKDF-SHA256, AES-256-GCM over the whole header as
//! associated data), signed by the source manager (ECDSA P-256), with a random export id.
//! The destination accepts a bundle only from a source whose key its operator pinned, and
//! each export id once. The vTPM's state travels on its own (its disk or state directory),
//! and is already encrypted under the key the bundle carries.
//!
//! A manager's migration identity, what `xvtpm vtpm migration-key` prints: its ECDH public key
//! (65 bytes) and its signing public key (65 bytes), both derived from the store's root key.
//!
//! Bundle: `"XVTPMMIG" | version u32 (2) | destination identity (130) | source identity (130) |
//! export id (16) | ephemeral public key (65) | nonce (12) | ciphertext of the record as the
//! store encodes it (120 bytes, group 0) | GCM tag (16) | signature (r | s, 64) over
//! everything before it`, 626 bytes.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use p256::ecdh::diffie_hellman;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};

use crate::store::record::{Record, HAS_KEY, RECORD_LEN};
use crate::{Error, Result};

/// The bundle's first bytes.
pub const MAGIC: &[u8; 8] = b"XVTPMMIG";
const VERSION: u32 = 2;
/// A P-256 public key: an uncompressed SEC1 point.
pub const POINT_LEN: usize = 65;
/// A migration identity: the ECDH key, then the signing key.
pub const PUBLIC_LEN: usize = 2 * POINT_LEN;
/// An export id.
pub const ID_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const SIG_LEN: usize = 64;
const DEST_AT: usize = 12;
const SOURCE_AT: usize = DEST_AT + PUBLIC_LEN;
const ID_AT: usize = SOURCE_AT + PUBLIC_LEN;
const EPH_AT: usize = ID_AT + ID_LEN;
const HEADER_LEN: usize = EPH_AT + POINT_LEN + NONCE_LEN;
/// A bundle's length.
pub const BUNDLE_LEN: usize = HEADER_LEN + RECORD_LEN + 16 + SIG_LEN;
const KDF_SALT: &[u8] = b"xvtpm-vtpm-migration-v2";

/// What of `rec` moves: no group, and of its flags only [`HAS_KEY`] and the saved blob's
/// length (bits 8 and up).
fn moving(rec: &Record) -> Record {
    Record { group: 0, flags: rec.flags & (HAS_KEY | !0xFF), ..rec.clone() }
}

/// A manager's migration keys: derived from its store's root key, so only the manager whose
/// store the hardware TPM unseals holds them.
pub struct MigrationKey {
    secret: SecretKey,
    sign: SigningKey,
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
        .expand(&header[DEST_AT..HEADER_LEN - NONCE_LEN], &mut key)
        .map_err(|_| Error::Protocol("key derivation failed".into()))?;
    Ok(key)
}

fn point(b: &[u8]) -> Result<PublicKey> {
    PublicKey::from_sec1_bytes(b).map_err(|_| {
        Error::Protocol(format!(
            "not a migration key (two uncompressed P-256 points, {PUBLIC_LEN} bytes, as `xvtpm vtpm migration-key` prints)"
        ))
    })
}

/// Checks that `b` is a migration identity.
pub fn check_public(b: &[u8]) -> Result<()> {
    if b.len() != PUBLIC_LEN {
        return Err(point(&[]).err().unwrap_or_else(|| Error::Protocol("bad length".into())));
    }
    point(&b[..POINT_LEN]).and_then(|_| point(&b[POINT_LEN..])).map(drop)
}

/// A bundle's fields; checks its format and version only (its contents open only with the
/// destination's key).
struct Parts<'a> {
    dest: &'a [u8],
    source: &'a [u8],
    id: [u8; ID_LEN],
    signed: &'a [u8],
    signature: &'a [u8],
}

fn parts(bundle: &[u8]) -> Result<Parts<'_>> {
    if bundle.len() != BUNDLE_LEN || &bundle[..8] != MAGIC {
        return Err(Error::Protocol(format!(
            "not a vTPM migration bundle ({} bytes; {BUNDLE_LEN} starting with XVTPMMIG expected)",
            bundle.len()
        )));
    }
    let version = u32::from_be_bytes([bundle[8], bundle[9], bundle[10], bundle[11]]);
    if version != VERSION {
        return Err(Error::Protocol(format!(
            "migration bundle version {version} (this manager reads {VERSION}; export it again from a current manager)"
        )));
    }
    let (signed, signature) = bundle.split_at(BUNDLE_LEN - SIG_LEN);
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&bundle[ID_AT..EPH_AT]);
    Ok(Parts { dest: &bundle[DEST_AT..SOURCE_AT], source: &bundle[SOURCE_AT..ID_AT], id, signed, signature })
}

/// The migration identity a bundle was made for.
pub fn destination(bundle: &[u8]) -> Result<&[u8]> {
    parts(bundle).map(|p| p.dest)
}

/// The migration identity of the manager that made a bundle (not yet verified).
pub fn source(bundle: &[u8]) -> Result<&[u8]> {
    parts(bundle).map(|p| p.source)
}

/// What opening a bundle yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The vTPM's record, as it moves.
    pub record: Record,
    /// The export's id (a destination accepts each once).
    pub id: [u8; ID_LEN],
    /// The source's migration identity (its signature verified).
    pub source: Vec<u8>,
}

impl MigrationKey {
    /// The keys for `seed` and `sign_seed` (32 bytes each that only this manager can derive).
    pub fn from_seeds(seed: [u8; 32], sign_seed: [u8; 32]) -> Self {
        // A seed outside the curve's order (odds about 2^-32) is hashed again.
        let scalar = |mut s: [u8; 32]| loop {
            if let Ok(secret) = SecretKey::from_slice(&s) {
                return secret;
            }
            s = Sha256::digest(s).into();
        };
        Self { secret: scalar(seed), sign: SigningKey::from(scalar(sign_seed)) }
    }

    /// The migration identity, as `export` and `trust` take it.
    pub fn public(&self) -> [u8; PUBLIC_LEN] {
        let mut out = [0u8; PUBLIC_LEN];
        out[..POINT_LEN].copy_from_slice(self.secret.public_key().to_encoded_point(false).as_bytes());
        out[POINT_LEN..].copy_from_slice(self.sign.verifying_key().to_encoded_point(false).as_bytes());
        out
    }

    /// Decrypts a bundle made for this manager, signed by the source it names; whether that
    /// source is trusted, and whether the export id is new, the caller decides.
    pub fn open(&self, bundle: &[u8]) -> Result<Opened> {
        let p = parts(bundle)?;
        if p.dest != self.public() {
            return Err(Error::NotAuthorized("the bundle was made for another manager's migration key".into()));
        }
        let signer = VerifyingKey::from_sec1_bytes(&p.source[POINT_LEN..])
            .map_err(|_| Error::NotAuthorized("the bundle names no valid source key".into()))?;
        let sig = Signature::from_slice(p.signature)
            .map_err(|_| Error::NotAuthorized("the bundle's signature is malformed".into()))?;
        signer
            .verify(p.signed, &sig)
            .map_err(|_| Error::NotAuthorized("the bundle's signature does not verify (damaged or forged)".into()))?;
        let header = &bundle[..HEADER_LEN];
        let eph = point(&header[EPH_AT..EPH_AT + POINT_LEN])?;
        let shared = diffie_hellman(self.secret.to_nonzero_scalar(), eph.as_affine());
        let key = bundle_key(&shared, header)?;
        let nonce = Nonce::from_slice(&header[HEADER_LEN - NONCE_LEN..]);
        let plain =
            Aes256Gcm::new(&key.into())
                .decrypt(nonce, Payload { msg: &p.signed[HEADER_LEN..], aad: header })
                .map_err(|_| Error::NotAuthorized("the migration bundle does not authenticate (damaged?)".into()))?;
        match plain.len() {
            // Sealed as `moving` made it, so it is a vTPM's record and nothing else.
            RECORD_LEN => Ok(Opened { record: moving(&Record::decode(&plain)), id: p.id, source: p.source.to_vec() }),
            n => Err(Error::Protocol(format!("a migration bundle holding {n} bytes, not a record"))),
        }
    }

    /// Encrypts what of `rec` moves to the manager whose migration identity is `to`, signed
    /// by this manager, under a fresh export id.
    pub fn seal(&self, to: &[u8], rec: &Record) -> Result<Vec<u8>> {
        check_public(to)?;
        let dest = point(&to[..POINT_LEN])?;
        let eph = p256::ecdh::EphemeralSecret::random(&mut rand::rngs::OsRng);
        let eph_pub = eph.public_key().to_encoded_point(false);
        let nonce: [u8; NONCE_LEN] = rand::random();
        let id: [u8; ID_LEN] = rand::random();
        let mut b = Vec::with_capacity(BUNDLE_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(to);
        b.extend_from_slice(&self.public());
        b.extend_from_slice(&id);
        b.extend_from_slice(eph_pub.as_bytes());
        b.extend_from_slice(&nonce);
        let key = bundle_key(&eph.diffie_hellman(&dest), &b)?;
        let sealed = Aes256Gcm::new(&key.into())
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &moving(rec).encode(), aad: &b })
            .map_err(|_| Error::Protocol("encryption failed".into()))?;
        b.extend_from_slice(&sealed);
        let sig: Signature = self.sign.sign(&b);
        b.extend_from_slice(&sig.to_bytes());
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved() -> Record {
        Record { uuid: [7; 16], group: 0, flags: HAS_KEY | 64 << 8, hash: [1; 32], key: [2; 32], token: [3; 32] }
    }

    fn key(n: u8) -> MigrationKey {
        MigrationKey::from_seeds([n; 32], [n + 100; 32])
    }

    #[test]
    fn a_bundle_opens_only_with_its_key_and_intact() {
        let (src, a, b) = (key(1), key(9), key(10));
        let bundle = src.seal(&a.public(), &moved()).expect("seal");
        assert_eq!(bundle.len(), BUNDLE_LEN);
        let opened = a.open(&bundle).expect("open");
        assert_eq!(opened.record, moved());
        assert_eq!(opened.source, src.public());
        assert_eq!(source(&bundle).expect("source"), src.public());
        assert!(matches!(b.open(&bundle), Err(Error::NotAuthorized(_))), "another manager's key");
        // No byte can change unnoticed, header and signature included.
        for i in
            [0, 9, 20, 100, SOURCE_AT + 70, ID_AT, HEADER_LEN - 1, HEADER_LEN, BUNDLE_LEN - SIG_LEN, BUNDLE_LEN - 1]
        {
            let mut bad = bundle.clone();
            bad[i] ^= 1;
            assert!(a.open(&bad).is_err(), "byte {i} flipped");
        }
        assert!(a.open(&bundle[..BUNDLE_LEN - 1]).is_err());
        // Every export has its own id and shares nothing but the header's fixed part.
        let again = src.seal(&a.public(), &moved()).expect("seal");
        assert_ne!(a.open(&again).expect("open").id, opened.id);
        assert_ne!(bundle[ID_AT..], again[ID_AT..]);
    }

    /// Someone who knows only the destination's public key (all a v1 bundle needed): their
    /// bundle names them as its source, or carries a signature that does not verify.
    #[test]
    fn a_forged_bundle_names_its_forger_or_fails_its_signature() {
        let (src, dest, forger) = (key(1), key(9), key(30));
        let forged = forger.seal(&dest.public(), &moved()).expect("seal");
        assert_eq!(dest.open(&forged).expect("a valid bundle").source, forger.public(), "it names the forger");
        // Claiming the real source: the signature is the forger's, so it fails.
        let mut claimed = forged.clone();
        claimed[SOURCE_AT..ID_AT].copy_from_slice(&src.public());
        assert!(matches!(dest.open(&claimed), Err(Error::NotAuthorized(_))));
    }

    #[test]
    fn keys_are_stable_per_seed_and_bad_public_keys_are_refused() {
        assert_eq!(key(9).public(), key(9).public());
        assert_ne!(key(9).public()[..POINT_LEN], key(9).public()[POINT_LEN..]);
        assert!(key(1).seal(&[4; PUBLIC_LEN], &moved()).is_err());
        assert!(key(1).seal(&key(9).public()[..POINT_LEN], &moved()).is_err(), "a v1 (ECDH-only) key");
        assert!(key(1).seal(&[], &moved()).is_err());
    }
}
