//! TPM 2.0 authorization sessions as the manager uses them (TPM 2.0 Part 1, "Authorizations
//! and Acknowledgments" and "Session-based encryption"):
//! - HMAC authorizations, so an authValue never crosses the bus;
//! - sessions salted to the storage primary key's ECC point, so their key is known only to
//!   this process and the TPM that holds that key;
//! - AES-128-CFB parameter encryption with that key, for the first parameter of a command
//!   (a secret sent to the TPM) or of a response (the unsealed root key).
//!
//! The KDFs (KDFa: SP 800-108 counter mode with HMAC-SHA256; KDFe: SP 800-56A's one-step KDF
//! with SHA-256) are the spec's; this is our own implementation of them.

use aes::cipher::{BlockEncrypt, KeyInit};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Session attribute: keep the session after the command.
pub const CONTINUE: u8 = 0x01;
/// Session attribute: the command's first parameter is encrypted.
pub const DECRYPT: u8 = 0x20;
/// Session attribute: the response's first parameter is encrypted.
pub const ENCRYPT: u8 = 0x40;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// KDFa with SHA-256: `bytes` bytes derived from `key` for `label` and the two contexts.
pub fn kdfa(key: &[u8], label: &str, u: &[u8], v: &[u8], bytes: usize) -> Vec<u8> {
    let bits = (bytes as u32 * 8).to_be_bytes();
    let mut out = Vec::with_capacity(bytes + 32);
    let mut i = 1u32;
    while out.len() < bytes {
        out.extend_from_slice(&hmac(key, &[&i.to_be_bytes(), label.as_bytes(), &[0], u, v, &bits]));
        i += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe with SHA-256, one block (256 bits): the salt of an ECC-salted session.
pub fn kdfe(z: &[u8], label: &str, u: &[u8], v: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(1u32.to_be_bytes())
        .chain_update(z)
        .chain_update(label.as_bytes())
        .chain_update([0])
        .chain_update(u)
        .chain_update(v)
        .finalize()
        .into()
}

/// AES-128 in CFB mode over whole 16-byte feedback blocks, the last one partial.
fn cfb(key: &[u8], newer: &[u8], older: &[u8], data: &mut [u8], encrypt: bool) {
    let k = kdfa(key, "CFB", newer, older, 32);
    let aes = aes::Aes128::new(k[..16].into());
    let mut iv: [u8; 16] = k[16..].try_into().unwrap_or_default();
    for chunk in data.chunks_mut(16) {
        let mut stream = aes::Block::from(iv);
        aes.encrypt_block(&mut stream);
        let cipher: Vec<u8> = if encrypt {
            chunk.iter_mut().zip(stream.iter()).for_each(|(c, s)| *c ^= s);
            chunk.to_vec()
        } else {
            let c = chunk.to_vec();
            chunk.iter_mut().zip(stream.iter()).for_each(|(c, s)| *c ^= s);
            c
        };
        iv[..cipher.len()].copy_from_slice(&cipher);
    }
}

/// A started session (HMAC or policy).
#[derive(Clone)]
pub struct Session {
    /// Its handle.
    pub handle: u32,
    /// sessionKey: empty for an unsalted, unbound session.
    pub key: Vec<u8>,
    /// The TPM's latest nonce.
    pub nonce_tpm: Vec<u8>,
    /// A policy session: the policies here need no authValue, so its HMACs are keyed by the
    /// session key alone, and are empty when that is (unsalted, unbound).
    pub policy: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("handle", &format_args!("{:#x}", self.handle)).finish_non_exhaustive()
    }
}

/// One command's use of a session: what its authorization area and the response check need.
#[derive(Clone)]
pub struct Use {
    /// The session.
    pub session: Session,
    /// sessionKey || authValue of the entity authorised: the HMAC and encryption key.
    key: Vec<u8>,
    nonce_caller: [u8; 16],
    /// Session attributes.
    pub attrs: u8,
    /// The response's HMAC key, when the command changes the authValue it uses.
    response_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Use").field("session", &self.session).field("attrs", &self.attrs).finish_non_exhaustive()
    }
}

/// An authValue as it keys an HMAC: the TPM drops its trailing zero bytes.
fn trimmed(auth: &[u8]) -> &[u8] {
    let n = auth.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &auth[..n]
}

impl Use {
    /// `session` authorising an entity whose authValue is `auth` (or adding encryption only).
    pub fn new(session: &Session, auth: &[u8], attrs: u8) -> Self {
        let auth = if session.policy { &[] } else { trimmed(auth) };
        let key = [&session.key[..], auth].concat();
        Self { session: session.clone(), key, nonce_caller: rand::random(), attrs, response_key: None }
    }

    /// For a command that changes the entity's authValue to `new` (HierarchyChangeAuth): the
    /// TPM keys the response's HMAC with the new one.
    pub fn answered_with(mut self, new: &[u8]) -> Self {
        self.response_key = Some([&self.session.key[..], trimmed(new)].concat());
        self
    }

    /// A policy session with an empty key: its HMACs are empty.
    fn no_hmac(&self) -> bool {
        self.session.policy && self.key.is_empty()
    }

    /// Encrypts the first parameter (a TPM2B at the start of `params`) if DECRYPT is set, and
    /// returns the authorization area for a command `cc` on handles with `names`.
    pub fn authorize(&self, cc: u32, names: &[Vec<u8>], params: &mut [u8]) -> Vec<u8> {
        if self.attrs & DECRYPT != 0 {
            if let Some(data) = first_tpm2b(params) {
                cfb(&self.key, &self.nonce_caller, &self.session.nonce_tpm, data, true);
            }
        }
        let hmac = if self.no_hmac() {
            Vec::new()
        } else {
            let cp = Sha256::new().chain_update(cc.to_be_bytes());
            let cp = names.iter().fold(cp, |h, n| h.chain_update(n)).chain_update(&*params).finalize();
            hmac(&self.key, &[&cp, &self.nonce_caller, &self.session.nonce_tpm, &[self.attrs]]).to_vec()
        };
        let mut a = self.session.handle.to_be_bytes().to_vec();
        a.extend_from_slice(&(self.nonce_caller.len() as u16).to_be_bytes());
        a.extend_from_slice(&self.nonce_caller);
        a.push(self.attrs);
        a.extend_from_slice(&(hmac.len() as u16).to_be_bytes());
        a.extend_from_slice(&hmac);
        a
    }

    /// Checks a successful response's HMAC (HMAC sessions) over `params` and its session area
    /// `area`, decrypts the first parameter if ENCRYPT was asked for, and returns the
    /// session with the TPM's new nonce. `Err` names what does not check out.
    pub fn finish(&self, cc: u32, params: &mut [u8], area: &[u8]) -> Result<Session, String> {
        let mut r = crate::hw::tpm2::Rsp::new(area);
        let parsed = (|| Some((r.b2().ok()?.to_vec(), r.take(1).ok()?[0], r.b2().ok()?.to_vec())))();
        let (nonce, attrs, hmac_got) = parsed.ok_or("malformed response session area")?;
        if !self.no_hmac() {
            let rp = Sha256::new().chain_update(0u32.to_be_bytes()).chain_update(cc.to_be_bytes());
            let rp = rp.chain_update(&*params).finalize();
            let key = self.response_key.as_ref().unwrap_or(&self.key);
            let want = hmac(key, &[&rp, &nonce, &self.nonce_caller, &[attrs]]);
            if hmac_got[..] != want[..] {
                return Err("the response's HMAC does not verify (the response was altered between \
                            the TPM and this manager?)"
                    .into());
            }
        }
        if self.attrs & ENCRYPT != 0 {
            if let Some(data) = first_tpm2b(params) {
                cfb(&self.key, &nonce, &self.nonce_caller, data, false);
            }
        }
        Ok(Session { nonce_tpm: nonce, ..self.session.clone() })
    }
}

/// The data of the TPM2B at the start of `b`.
fn first_tpm2b(b: &mut [u8]) -> Option<&mut [u8]> {
    let n = u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize;
    b.get_mut(2..2 + n)
}

/// A fresh ECC salt for a session salted to the P-256 key at (`x`, `y`): (the salt, the
/// TPMS_ECC_POINT to send as encryptedSalt). `None` if that is not a point of the curve.
pub fn ecc_salt(x: &[u8], y: &[u8]) -> Option<([u8; 32], Vec<u8>)> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let their = p256::PublicKey::from_sec1_bytes(&[&[4u8][..], x, y].concat()).ok()?;
    let eph = p256::SecretKey::random(&mut rand::thread_rng());
    let z = p256::ecdh::diffie_hellman(eph.to_nonzero_scalar(), their.as_affine());
    let ours = eph.public_key().to_encoded_point(false);
    let (ex, ey) = (ours.x()?.to_vec(), ours.y()?.to_vec());
    let salt = kdfe(z.raw_secret_bytes(), "SECRET", &ex, x);
    let mut point = Vec::new();
    for c in [&ex, &ey] {
        point.extend_from_slice(&(c.len() as u16).to_be_bytes());
        point.extend_from_slice(c);
    }
    Some((salt, point))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfb_roundtrips_over_partial_blocks() {
        let plain: Vec<u8> = (0..37).collect();
        let mut b = plain.clone();
        cfb(b"k", b"newer", b"older", &mut b, true);
        assert_ne!(b, plain);
        cfb(b"k", b"newer", b"older", &mut b, false);
        assert_eq!(b, plain);
    }

    #[test]
    fn kdfa_is_counter_mode_hmac() {
        // Two blocks, the second with counter 2; truncated to the size asked for.
        let a = kdfa(b"key", "L", b"u", b"v", 40);
        assert_eq!(a.len(), 40);
        let bits = 320u32.to_be_bytes();
        assert_eq!(a[..32], hmac(b"key", &[&1u32.to_be_bytes(), b"L", &[0], b"u", b"v", &bits]));
        assert_eq!(a[32..], hmac(b"key", &[&2u32.to_be_bytes(), b"L", &[0], b"u", b"v", &bits])[..8]);
    }

    #[test]
    fn trailing_zeros_do_not_key_the_hmac() {
        assert_eq!(trimmed(&[1, 0, 2, 0, 0]), &[1, 0, 2]);
        assert_eq!(trimmed(&[0, 0]), &[] as &[u8]);
    }
}
