//! The TPM 1.2 operations the manager needs, over [`HwTpm`]: the endorsement key (created if
//! the TPM has none), taking ownership (owner and SRK auth encrypted with RSA-OAEP under the
//! EK), OIAP and OSAP sessions with HMAC-SHA1 authorisation (responses verified too),
//! TPM_Seal/TPM_Unseal under the SRK with a TPM_PCR_INFO_LONG (PCRs and a locality mask), a
//! monotonic counter, and quotes with a signing key wrapped by the SRK. The seal and the
//! unseal of the root key run inside an encrypted transport session (TPM_EstablishTransport
//! with its secret under the SRK's public key, TPM_ExecuteTransport with MGF1 masking), so
//! the root key never crosses the bus in the clear.

use hmac::{Hmac, Mac};
use rand::RngCore;
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha1::{Digest, Sha1};
use xvtpm_tis::HwTpm;

use super::{pcr_bitmap as select, pcrs_in_order};
use crate::{Error, Result};

type HmacSha1 = Hmac<Sha1>;

const RQU: u16 = 0x00C1;
const AUTH1: u16 = 0x00C2;
const AUTH2: u16 = 0x00C3;
const KH_SRK: u32 = 0x4000_0000;
const KH_OWNER: u32 = 0x4000_0001;
const ET_KEYHANDLE: u16 = 0x0001;
const ET_OWNER: u16 = 0x0002;
/// TPM_NO_ENDORSEMENT.
const RC_NO_ENDORSEMENT: u32 = 0x23;
/// TPM_WRONGPCRVAL: the PCRs differ from those the data was sealed to.
const RC_WRONGPCRVAL: u32 = 0x18;
/// TPM_BAD_LOCALITY.
const RC_BAD_LOCALITY: u32 = 0x3D;
/// TPM_RESOURCES: no room for another authorization session.
const RC_RESOURCES: u32 = 0x15;
/// TPM_NOSPACE: no room to load another key.
const RC_NOSPACE: u32 = 0x11;
/// Resource types (TPM_RESOURCE_TYPE) for TPM_GetCapability(TPM_CAP_HANDLE) and
/// TPM_FlushSpecific.
const RT_KEY: u32 = 1;
const RT_AUTH: u32 = 2;

/// TPM_TRANSPORT_PUBLIC: encrypted (TPM_TRANSPORT_ENCRYPT), with MGF1 (TPM_ALG_MGF1,
/// TPM_ES_NONE).
const TRANSPORT_PUBLIC: [u8; 12] = [0x00, 0x1E, 0, 0, 0, 0x01, 0, 0, 0, 0x07, 0x00, 0x01];

/// An encrypted transport session.
struct Transport {
    handle: u32,
    /// Its authData, which also keys its masks.
    auth: [u8; 20],
    /// The TPM's latest nonce.
    nonce_even: [u8; 20],
}

/// MGF1 with SHA-1: `len` bytes from `seed`.
fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 20);
    let mut counter = 0u32;
    while out.len() < len {
        out.extend_from_slice(&sha1(&[seed, &counter.to_be_bytes()]));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// Masks (or unmasks) `data` for a transport session: `direction` is `b"in"` for a command,
/// `b"out"` for a response.
fn mask(data: &mut [u8], even: &[u8; 20], odd: &[u8; 20], direction: &[u8], auth: &[u8; 20]) {
    let pad = mgf1(&[&even[..], odd, direction, auth].concat(), data.len());
    data.iter_mut().zip(pad).for_each(|(d, p)| *d ^= p);
}

/// An RSA public key from a TPM_PUBKEY: TPM_KEY_PARMS (algorithm, encScheme, sigScheme,
/// parmSize, parms), then TPM_STORE_PUBKEY (keyLength, key).
pub fn rsa_of_pubkey(pubkey: &[u8]) -> Result<RsaPublicKey> {
    let bad = || Error::Tpm("malformed TPM_PUBKEY".into());
    let parm_size = be32(pubkey, 8)? as usize;
    let parms = pubkey.get(12..12 + parm_size).ok_or_else(bad)?;
    let exp_size = be32(parms, 8)? as usize;
    let exponent = match parms.get(12..12 + exp_size) {
        Some(e) if !e.is_empty() => BigUint::from_bytes_be(e),
        _ => BigUint::from(65537u32),
    };
    let at = 12 + parm_size;
    let n_len = be32(pubkey, at)? as usize;
    let n = pubkey.get(at + 4..at + 4 + n_len).ok_or_else(bad)?;
    RsaPublicKey::new(BigUint::from_bytes_be(n), exponent).map_err(|e| Error::Tpm(format!("TPM_PUBKEY: {e}")))
}

/// An authorization session.
struct Session {
    handle: u32,
    nonce_even: [u8; 20],
}

fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8; 20], parts: &[&[u8]]) -> [u8; 20] {
    // An HMAC takes keys of any length.
    let mut m = <HmacSha1 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// An auth value encrypted for an OSAP session (ADIP): XOR with SHA-1(shared ‖ nonceEven).
fn adip(shared: &[u8; 20], s: &Session, auth: &[u8; 20]) -> [u8; 20] {
    let pad = sha1(&[shared, &s.nonce_even]);
    std::array::from_fn(|i| auth[i] ^ pad[i])
}

fn nonce() -> [u8; 20] {
    let mut n = [0u8; 20];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn be32(b: &[u8], at: usize) -> Result<u32> {
    xvtpm_proto::tpm::be32(b, at).ok_or_else(|| Error::Tpm("TPM 1.2 response too short".into()))
}

/// The TPM 1.2 side of the manager.
pub struct Tpm12<'a> {
    tpm: &'a mut dyn HwTpm,
    locality: u8,
    /// Commands sent so far.
    pub commands: u64,
    /// Sessions and keys this instance made (sessions end with the command they authorize;
    /// keeping those listed only spares them a flush).
    live: Vec<u32>,
}

impl std::fmt::Debug for Tpm12<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm12").field("locality", &self.locality).field("commands", &self.commands).finish()
    }
}

/// A command's body: handles, then parameters (the HMACs cover the parameters only).
struct Body<'b> {
    handles: &'b [u32],
    params: &'b [u8],
    /// Handles the response returns before its parameters (outside the response HMAC).
    out_handles: usize,
}

impl<'b> Body<'b> {
    fn new(handles: &'b [u32], params: &'b [u8]) -> Self {
        Self { handles, params, out_handles: 0 }
    }
}

impl<'a> Tpm12<'a> {
    /// Uses `tpm` at `locality`.
    pub fn new(tpm: &'a mut dyn HwTpm, locality: u8) -> Self {
        Self { tpm, locality, commands: 0, live: Vec::new() }
    }

    fn send(&mut self, what: &str, tag: u16, ordinal: u32, body: &[u8]) -> Result<Vec<u8>> {
        let mut c = tag.to_be_bytes().to_vec();
        c.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
        c.extend_from_slice(&ordinal.to_be_bytes());
        c.extend_from_slice(body);
        let r = super::busy::transmit(
            self.tpm,
            self.locality,
            &c,
            // An authorized command's error ends its OIAP/OSAP session on TPM 1.2: resending
            // it would only fail on the dead session. Only unauthorized ones are retried.
            if tag == RQU { &super::busy::TPM12 } else { &[] },
            super::busy::Backoff::default(),
            &mut self.commands,
        )?;
        let rc = be32(&r, 6)?;
        if rc != 0 {
            return Err(Error::TpmRc { what: what.to_string(), rc });
        }
        Ok(r)
    }

    /// An unauthorized command; the response after its header.
    fn plain(&mut self, what: &str, ordinal: u32, body: &[u8]) -> Result<Vec<u8>> {
        Ok(self.send(what, RQU, ordinal, body)?[10..].to_vec())
    }

    /// The handles of the resources of type `rt` the TPM holds (TPM_GetCapability,
    /// TPM_CAP_HANDLE: a TPM_KEY_HANDLE_LIST).
    fn held(&mut self, rt: u32) -> Result<Vec<u32>> {
        let body: Vec<u8> = [0x14u32, 4, rt].iter().flat_map(|v| v.to_be_bytes()).collect();
        let r = self.plain("GetCapability(TPM_CAP_HANDLE)", 0x65, &body)?;
        let n = r
            .get(4..6)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| Error::Tpm("short handle list".into()))?;
        (0..n as usize).map(|i| be32(&r, 6 + 4 * i)).collect()
    }

    /// Runs `f`; when the TPM has no room for another resource of type `rt`, flushes those it
    /// holds that this instance did not make and runs `f` once more. A TPM 1.2 keeps sessions
    /// and loaded keys until they are used up or flushed, so each manager killed in the middle
    /// of a command leaves one behind, and after a few such kills (3 slots on some chips) the
    /// manager could not start again. Only on a TPM the manager owns ([`HwTpm::owns_tpm`]) and
    /// runs one operation at a time on, where nobody else's are there.
    fn with_room<T>(&mut self, rt: u32, f: impl Fn(&mut Self) -> Result<T>) -> Result<T> {
        // The code each kind of resource runs out with.
        let full = if rt == RT_AUTH { RC_RESOURCES } else { RC_NOSPACE };
        match f(self) {
            Err(Error::TpmRc { rc, what }) if rc == full && self.tpm.owns_tpm() => {
                let mut held = self.held(rt)?;
                held.retain(|h| !self.live.contains(h));
                let kind = if rt == RT_AUTH { "authorization sessions" } else { "loaded keys" };
                log::warn!(
                    "{what}: the TPM is full; flushing the {} {kind} it holds (left by a manager that was killed?)",
                    held.len()
                );
                for h in held {
                    // One that cannot go (an owner-evict key) must not keep the rest.
                    if let Err(e) = self.flush_specific(h, rt) {
                        log::warn!("flushing left-over TPM handle {h:#x}: {e}");
                    }
                }
                f(self)
            }
            r => r,
        }
    }

    fn oiap(&mut self) -> Result<Session> {
        let r = self.with_room(RT_AUTH, |t| t.plain("OIAP", 0x0A, &[]))?;
        let mut s = Session { handle: be32(&r, 0)?, nonce_even: [0; 20] };
        self.live.push(s.handle);
        s.nonce_even.copy_from_slice(r.get(4..24).ok_or_else(|| Error::Tpm("short OIAP".into()))?);
        Ok(s)
    }

    /// An OSAP session for an entity whose auth is `secret`; the session and its shared
    /// secret.
    fn osap(&mut self, et: u16, value: u32, secret: &[u8; 20]) -> Result<(Session, [u8; 20])> {
        let odd = nonce();
        let body = [&et.to_be_bytes()[..], &value.to_be_bytes(), &odd].concat();
        let r = self.with_room(RT_AUTH, |t| t.plain("OSAP", 0x0B, &body))?;
        let mut s = Session { handle: be32(&r, 0)?, nonce_even: [0; 20] };
        self.live.push(s.handle);
        s.nonce_even.copy_from_slice(r.get(4..24).ok_or_else(|| Error::Tpm("short OSAP".into()))?);
        let even_osap = r.get(24..44).ok_or_else(|| Error::Tpm("short OSAP".into()))?;
        Ok((s, hmac(secret, &[even_osap, &odd])))
    }

    /// An authorized command: each (session, key) authorizes in turn. Checks each response
    /// HMAC; returns the output parameters.
    fn authorized(
        &mut self,
        what: &str,
        ordinal: u32,
        body: Body<'_>,
        auths: &[(&Session, &[u8; 20])],
    ) -> Result<Vec<u8>> {
        let (c, odds) = Self::authorize(ordinal, &body, auths);
        let tag = if auths.len() == 2 { AUTH2 } else { AUTH1 };
        let r = self.send(what, tag, ordinal, &c)?;
        Self::check_response(what, ordinal, &body, auths, &odds, &r)
    }

    /// The body of an authorized command (handles, parameters, authorization trailers) and
    /// the odd nonces it uses.
    fn authorize(ordinal: u32, body: &Body<'_>, auths: &[(&Session, &[u8; 20])]) -> (Vec<u8>, Vec<[u8; 20]>) {
        let digest = sha1(&[&ordinal.to_be_bytes(), body.params]);
        let mut c: Vec<u8> = body.handles.iter().flat_map(|h| h.to_be_bytes()).collect();
        c.extend_from_slice(body.params);
        let mut odds = Vec::new();
        for (s, key) in auths {
            let odd = nonce();
            // continueAuthSession = 0: the TPM ends the session with the command.
            let mac = hmac(key, &[&digest, &s.nonce_even, &odd, &[0]]);
            c.extend_from_slice(&s.handle.to_be_bytes());
            c.extend_from_slice(&odd);
            c.push(0);
            c.extend_from_slice(&mac);
            odds.push(odd);
        }
        (c, odds)
    }

    /// Checks the authorizations of response `r` (its header included); its output parameters.
    fn check_response(
        what: &str,
        ordinal: u32,
        body: &Body<'_>,
        auths: &[(&Session, &[u8; 20])],
        odds: &[[u8; 20]],
        r: &[u8],
    ) -> Result<Vec<u8>> {
        let trailer = 41 * auths.len();
        let out_end = r
            .len()
            .checked_sub(trailer)
            .filter(|&e| e >= 10)
            .ok_or_else(|| Error::Tpm(format!("{what}: short response")))?;
        let out = &r[10..out_end];
        let hashed = out.get(4 * body.out_handles..).ok_or_else(|| Error::Tpm(format!("{what}: short response")))?;
        let out_digest = sha1(&[&0u32.to_be_bytes(), &ordinal.to_be_bytes(), hashed]);
        for (i, (_, key)) in auths.iter().enumerate() {
            let t = &r[out_end + 41 * i..out_end + 41 * (i + 1)];
            let want = hmac(key, &[&out_digest, &t[..20], &odds[i], &t[20..21]]);
            if want[..] != t[21..41] {
                return Err(Error::Tpm(format!("{what}: the response's authorization does not verify")));
            }
        }
        Ok(out.to_vec())
    }

    /// The EK's public key; the TPM gets one first if it has none.
    pub fn endorsement_key(&mut self) -> Result<RsaPublicKey> {
        let r = match self.plain("ReadPubek", 0x7C, &nonce()) {
            Err(Error::TpmRc { rc: RC_NO_ENDORSEMENT, .. }) => {
                log::info!("the TPM has no endorsement key; creating one");
                let body = [&nonce()[..], &rsa_parms()].concat();
                self.plain("CreateEndorsementKeyPair", 0x78, &body)?
            }
            r => r?,
        };
        rsa_of_pubkey(&r).map_err(|e| Error::Tpm(format!("EK: {e}")))
    }

    /// Takes ownership with `owner` and `srk` auth values.
    pub fn take_ownership(&mut self, owner: &[u8; 20], srk: &[u8; 20]) -> Result<()> {
        let ek = self.endorsement_key()?;
        let enc = |v: &[u8; 20]| {
            ek.encrypt(&mut rand::thread_rng(), Oaep::new_with_label::<Sha1, _>("TCPA"), v)
                .map_err(|e| Error::Tpm(format!("RSA-OAEP under the EK: {e}")))
        };
        let (eo, es) = (enc(owner)?, enc(srk)?);
        let mut p = 5u16.to_be_bytes().to_vec();
        for e in [&eo, &es] {
            p.extend_from_slice(&(e.len() as u32).to_be_bytes());
            p.extend_from_slice(e);
        }
        p.extend_from_slice(&srk_template());
        let s = self.oiap()?;
        self.authorized("TakeOwnership", 0x0D, Body::new(&[], &p), &[(&s, owner)]).map(drop)
    }

    /// Whether the TPM has an owner (TPM_GetCapability(TPM_CAP_PROPERTY, TPM_CAP_PROP_OWNER)).
    pub fn owned(&mut self) -> Result<bool> {
        let body = [&5u32.to_be_bytes()[..], &4u32.to_be_bytes(), &0x111u32.to_be_bytes()].concat();
        let r = self.plain("GetCapability", 0x65, &body)?;
        Ok(r.get(4) == Some(&1))
    }

    /// The composite digest of the current values of `pcrs`.
    pub fn composite(&mut self, pcrs: &[u8]) -> Result<[u8; 20]> {
        let mut values = Vec::new();
        for p in pcrs_in_order(pcrs) {
            let r = self.plain("PcrRead", 0x15, &u32::from(p).to_be_bytes())?;
            values.extend_from_slice(r.get(..20).ok_or_else(|| Error::Tpm("short PcrRead".into()))?);
        }
        Ok(sha1(&[&3u16.to_be_bytes(), &select(pcrs), &(values.len() as u32).to_be_bytes(), &values]))
    }

    /// Seals `secret` under the SRK to the current values of `pcrs`, releasable only at
    /// `locality`; the TPM_STORED_DATA12 blob.
    /// Inside an encrypted transport session to the SRK whose public key is `srk_public`, if
    /// given.
    pub fn seal(
        &mut self,
        srk: &[u8; 20],
        data_auth: &[u8; 20],
        secret: &[u8],
        pcrs: &[u8],
        srk_public: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        self.seal_to(srk, data_auth, secret, pcrs, None, srk_public)
    }

    /// Seals `secret` to `release` (a composite digest of `pcrs`), or to their current values.
    pub fn seal_to(
        &mut self,
        srk: &[u8; 20],
        data_auth: &[u8; 20],
        secret: &[u8],
        pcrs: &[u8],
        release: Option<[u8; 20]>,
        srk_public: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let digest = self.composite(pcrs)?;
        let at_release = release.unwrap_or(digest);
        let loc = 1u8 << self.locality;
        let sel = [&3u16.to_be_bytes()[..], &select(pcrs)].concat();
        let info = [&0x0006u16.to_be_bytes()[..], &[loc, loc], &sel, &sel, &digest, &at_release].concat();
        let transport = srk_public.map(|p| self.establish_transport(p, srk)).transpose()?;
        let (s, shared) = self.osap(ET_KEYHANDLE, KH_SRK, srk)?;
        let enc_auth = adip(&shared, &s, data_auth);
        let p =
            [&enc_auth[..], &(info.len() as u32).to_be_bytes(), &info, &(secret.len() as u32).to_be_bytes(), secret]
                .concat();
        let body = Body::new(&[KH_SRK], &p);
        match &transport {
            Some(t) => self.in_transport(t, "Seal", 0x17, body, &[(&s, &shared)]),
            None => self.authorized("Seal", 0x17, body, &[(&s, &shared)]),
        }
    }

    /// Unseals a blob from [`Tpm12::seal`]: inside an encrypted transport session to the SRK
    /// whose public key is `srk_public` (the secret comes back masked), or, for stores made
    /// before that key was recorded (`None`), in the clear.
    pub fn unseal(
        &mut self,
        srk: &[u8; 20],
        data_auth: &[u8; 20],
        sealed: &[u8],
        srk_public: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let transport = srk_public.map(|p| self.establish_transport(p, srk)).transpose()?;
        let (s1, s2) = (self.oiap()?, self.oiap()?);
        let body = Body::new(&[KH_SRK], sealed);
        let auths = [(&s1, srk), (&s2, data_auth)];
        let r = match &transport {
            Some(t) => self.in_transport(t, "Unseal", 0x18, body, &auths),
            None => self.authorized("Unseal", 0x18, body, &auths),
        };
        let r = r
            .map_err(|e| match e {
                Error::TpmRc { rc: RC_WRONGPCRVAL | RC_BAD_LOCALITY, .. } => Error::Tpm(format!(
                    "the TPM refused to unseal the store's root key: the PCRs or the locality differ from those it was sealed to ({e})"
                )),
                e => e,
            })?;
        let n = be32(&r, 0)? as usize;
        r.get(4..4 + n).map(<[u8]>::to_vec).ok_or_else(|| Error::Tpm("short Unseal".into()))
    }

    /// The SRK's public key (TPM_OwnerReadInternalPub with the owner's auth): a TPM_PUBKEY.
    pub fn srk_public(&mut self, owner: &[u8; 20]) -> Result<Vec<u8>> {
        let s = self.oiap()?;
        // The key handle is a parameter here: the HMAC covers it.
        self.authorized("OwnerReadInternalPub", 0x81, Body::new(&[], &KH_SRK.to_be_bytes()), &[(&s, owner)])
    }

    /// Opens an encrypted transport session: its authData travels RSA-OAEP-encrypted under
    /// the SRK's public key `srk_public` (a TPM_PUBKEY recorded at init), so only this TPM
    /// learns it, and a TPM answering with another SRK cannot.
    fn establish_transport(&mut self, srk_public: &[u8], srk: &[u8; 20]) -> Result<Transport> {
        let key = rsa_of_pubkey(srk_public)?;
        let auth = nonce();
        let transport_auth = [&0x001Du16.to_be_bytes()[..], &auth].concat();
        let secret = key
            .encrypt(&mut rand::thread_rng(), Oaep::new_with_label::<Sha1, _>("TCPA"), &transport_auth)
            .map_err(|e| Error::Tpm(format!("RSA-OAEP under the SRK: {e}")))?;
        let p = [&TRANSPORT_PUBLIC[..], &(secret.len() as u32).to_be_bytes(), &secret].concat();
        let s = self.oiap()?;
        let body = Body { out_handles: 1, ..Body::new(&[KH_SRK], &p) };
        let r = self.authorized("EstablishTransport", 0xE6, body, &[(&s, srk)])?;
        // transHandle, locality, TPM_CURRENT_TICKS (32 bytes), transNonceEven.
        let handle = be32(&r, 0)?;
        let mut nonce_even = [0u8; 20];
        nonce_even.copy_from_slice(r.get(40..60).ok_or_else(|| Error::Tpm("short EstablishTransport".into()))?);
        Ok(Transport { handle, auth, nonce_even })
    }

    /// An authorized command inside transport session `t`, which ends with it: its parameters
    /// and those of its answer cross the bus masked; both the transport's and the command's
    /// own authorizations are checked. Returns the output parameters.
    fn in_transport(
        &mut self,
        t: &Transport,
        what: &str,
        ordinal: u32,
        body: Body<'_>,
        auths: &[(&Session, &[u8; 20])],
    ) -> Result<Vec<u8>> {
        let (inner, odds) = Self::authorize(ordinal, &body, auths);
        let tag = if auths.len() == 2 { AUTH2 } else { AUTH1 };
        let mut wrapped = tag.to_be_bytes().to_vec();
        wrapped.extend_from_slice(&((10 + inner.len()) as u32).to_be_bytes());
        wrapped.extend_from_slice(&ordinal.to_be_bytes());
        wrapped.extend_from_slice(&inner);
        let odd = nonce();
        let start = 10 + 4 * body.handles.len();
        mask(&mut wrapped[start..start + body.params.len()], &t.nonce_even, &odd, b"in", &t.auth);
        let h1 = sha1(&[&ordinal.to_be_bytes(), body.params]);
        let digest = sha1(&[&0xE7u32.to_be_bytes(), &(wrapped.len() as u32).to_be_bytes(), &h1]);
        // continueTransSession = 0: the session ends with this command.
        let mac = hmac(&t.auth, &[&digest, &t.nonce_even, &odd, &[0]]);
        let mut c = (wrapped.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(&wrapped);
        c.extend_from_slice(&t.handle.to_be_bytes());
        c.extend_from_slice(&odd);
        c.push(0);
        c.extend_from_slice(&mac);
        let r = self.send(what, AUTH1, 0xE7, &c)?;
        let short = || Error::Tpm(format!("{what}: short ExecuteTransport response"));
        // currentTicks (8), locality (4), wrappedRspSize, wrappedRsp, then the trailer.
        let size = be32(&r, 22)? as usize;
        let mut rsp = r.get(26..26 + size).ok_or_else(short)?.to_vec();
        let trailer = r.get(26 + size..26 + size + 41).ok_or_else(short)?;
        let mut even = [0u8; 20];
        even.copy_from_slice(&trailer[..20]);
        let rc = be32(&rsp, 6)?;
        let s2 = 10 + 4 * body.out_handles;
        let len2 = if rc == 0 { rsp.len().checked_sub(s2 + 41 * auths.len()).ok_or_else(short)? } else { 0 };
        mask(&mut rsp[s2..s2 + len2], &even, &odd, b"out", &t.auth);
        let h2 = sha1(&[&rc.to_be_bytes(), &ordinal.to_be_bytes(), &rsp[s2..s2 + len2]]);
        let out_digest =
            sha1(&[&0u32.to_be_bytes(), &0xE7u32.to_be_bytes(), &r[10..22], &(size as u32).to_be_bytes(), &h2]);
        if hmac(&t.auth, &[&out_digest, &even, &odd, &trailer[20..21]])[..] != trailer[21..41] {
            return Err(Error::Tpm(format!("{what}: the transport's authorization of the response does not verify")));
        }
        if rc != 0 {
            return Err(Error::TpmRc { what: what.to_string(), rc });
        }
        Self::check_response(what, ordinal, &body, auths, &odds, &rsp)
    }

    /// Creates a monotonic counter with `counter_auth`; its id and value.
    pub fn counter_create(&mut self, owner: &[u8; 20], counter_auth: &[u8; 20]) -> Result<(u32, u64)> {
        let (s, shared) = self.osap(ET_OWNER, KH_OWNER, owner)?;
        let enc = adip(&shared, &s, counter_auth);
        let p = [&enc[..], b"XVTM"].concat();
        let r = self.authorized("CreateCounter", 0xDC, Body::new(&[], &p), &[(&s, &shared)])?;
        Ok((be32(&r, 0)?, u64::from(be32(&r, 10)?)))
    }

    /// Reads counter `id`.
    pub fn counter_read(&mut self, id: u32) -> Result<u64> {
        let r = self.plain("ReadCounter", 0xDE, &id.to_be_bytes())?;
        Ok(u64::from(be32(&r, 6)?))
    }

    /// Increments counter `id`.
    pub fn counter_increment(&mut self, id: u32, counter_auth: &[u8; 20]) -> Result<u64> {
        let s = self.oiap()?;
        let r = self.authorized("IncrementCounter", 0xDD, Body::new(&[], &id.to_be_bytes()), &[(&s, counter_auth)])?;
        Ok(u64::from(be32(&r, 6)?))
    }

    /// Creates a non-migratable RSA-2048 signing key (PKCS#1 v1.5 with SHA-1) under the SRK
    /// with usage auth `key_auth`; the wrapped TPM_KEY12, which only this TPM can load.
    pub fn create_signing_key(&mut self, srk: &[u8; 20], key_auth: &[u8; 20]) -> Result<Vec<u8>> {
        let (s, shared) = self.osap(ET_KEYHANDLE, KH_SRK, srk)?;
        let usage = adip(&shared, &s, key_auth);
        // The TPM ignores a non-migratable key's migration auth (it uses its own tpmProof).
        let migration = nonce();
        let p = [&usage[..], &migration, &signing_key_template()].concat();
        self.authorized("CreateWrapKey", 0x1F, Body::new(&[KH_SRK], &p), &[(&s, &shared)])
    }

    /// Loads a wrapped key under the SRK; its handle (flush it with [`Tpm12::flush_key`]).
    pub fn load_key(&mut self, srk: &[u8; 20], wrapped: &[u8]) -> Result<u32> {
        self.with_room(RT_KEY, |t| {
            let s = t.oiap()?;
            let body = Body { out_handles: 1, ..Body::new(&[KH_SRK], wrapped) };
            let r = t.authorized("LoadKey2", 0x41, body, &[(&s, srk)])?;
            let h = be32(&r, 0)?;
            t.live.push(h);
            Ok(h)
        })
    }

    /// Unloads a key (TPM_FlushSpecific).
    pub fn flush_key(&mut self, handle: u32) -> Result<()> {
        self.live.retain(|&h| h != handle);
        self.flush_specific(handle, RT_KEY)
    }

    /// TPM_FlushSpecific of `handle`, a resource of type `rt`.
    fn flush_specific(&mut self, handle: u32, rt: u32) -> Result<()> {
        self.plain("FlushSpecific", 0xBA, &[handle.to_be_bytes(), rt.to_be_bytes()].concat()).map(drop)
    }

    /// TPM_Quote of `pcrs` with the loaded key `handle` over `external`: the
    /// TPM_PCR_COMPOSITE it quoted and the signature over the TPM_QUOTE_INFO.
    pub fn quote(
        &mut self,
        handle: u32,
        key_auth: &[u8; 20],
        external: &[u8; 20],
        pcrs: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let s = self.oiap()?;
        let p = [&external[..], &3u16.to_be_bytes(), &select(pcrs)].concat();
        let r = self.authorized("Quote", 0x16, Body::new(&[handle], &p), &[(&s, key_auth)])?;
        let short = || Error::Tpm("short Quote response".into());
        let sel = u16::from_be_bytes([*r.first().ok_or_else(short)?, *r.get(1).ok_or_else(short)?]) as usize;
        let values = be32(&r, 2 + sel)? as usize;
        let end = 2 + sel + 4 + values;
        let composite = r.get(..end).ok_or_else(short)?.to_vec();
        let sig_len = be32(&r, end)? as usize;
        let sig = r.get(end + 4..end + 4 + sig_len).ok_or_else(short)?.to_vec();
        Ok((composite, sig))
    }

    /// TPM_Startup(ST_CLEAR); an already started TPM is fine.
    pub fn startup(&mut self) -> Result<()> {
        match self.plain("Startup", 0x99, &[0, 1]) {
            Err(Error::TpmRc { rc: 0x26, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Resets `pcr` (TPM_PCR_Reset; only resettable PCRs at allowed localities).
    pub fn pcr_reset(&mut self, pcr: u8) -> Result<()> {
        let body = [&3u16.to_be_bytes()[..], &select(&[pcr])].concat();
        self.plain("PCR_Reset", 0xC8, &body).map(drop)
    }

    /// Extends `pcr` (tests use it to change the platform's state).
    pub fn pcr_extend(&mut self, pcr: u32, digest: &[u8; 20]) -> Result<()> {
        self.plain("Extend", 0x14, &[&pcr.to_be_bytes()[..], digest].concat()).map(drop)
    }
}

/// The TPM_PCR_INFO_LONG of a TPM_STORED_DATA12: where and under which PCR state it was
/// sealed, and what releases it. The TPM checks it against the sealed secret at unseal, so
/// after a successful unseal it can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealInfo {
    /// localityAtCreation.
    pub locality_at_creation: u8,
    /// localityAtRelease.
    pub locality_at_release: u8,
    /// creationPCRSelection.
    pub creation_pcrs: Vec<u8>,
    /// releasePCRSelection.
    pub release_pcrs: Vec<u8>,
    /// digestAtCreation.
    pub digest_at_creation: [u8; 20],
    /// digestAtRelease.
    pub digest_at_release: [u8; 20],
}

impl SealInfo {
    /// Parses the seal info of a TPM_STORED_DATA12.
    pub fn parse(sealed: &[u8]) -> Result<Self> {
        let bad = || Error::Tpm("sealed blob: malformed TPM_STORED_DATA12".into());
        let info_size = be32(sealed, 4)? as usize;
        let info = sealed.get(8..8 + info_size).ok_or_else(bad)?;
        if info.get(..2) != Some(&[0x00, 0x06]) {
            return Err(bad());
        }
        let sel = |at: usize| -> Result<(Vec<u8>, usize)> {
            let n = u16::from_be_bytes([*info.get(at).ok_or_else(bad)?, *info.get(at + 1).ok_or_else(bad)?]) as usize;
            Ok((info.get(at + 2..at + 2 + n).ok_or_else(bad)?.to_vec(), at + 2 + n))
        };
        let (creation_pcrs, at) = sel(4)?;
        let (release_pcrs, at) = sel(at)?;
        let digest =
            |at: usize| -> Result<[u8; 20]> { info.get(at..at + 20).and_then(|d| d.try_into().ok()).ok_or_else(bad) };
        Ok(SealInfo {
            locality_at_creation: info[2],
            locality_at_release: info[3],
            creation_pcrs,
            release_pcrs,
            digest_at_creation: digest(at)?,
            digest_at_release: digest(at + 20)?,
        })
    }

    /// Whether the blob was sealed the way this manager seals: at `locality`, to `pcrs`, and in
    /// the same PCR state as the one that releases it. A blob sealed elsewhere or in another
    /// platform state (someone else's key, or one made while the platform was not approved)
    /// fails.
    pub fn check(&self, locality: u8, pcrs: &[u8]) -> Result<()> {
        let loc = 1u8 << locality;
        let sel = select(pcrs).to_vec();
        if self.locality_at_creation != loc
            || self.locality_at_release != loc
            || self.creation_pcrs != sel
            || self.release_pcrs != sel
            || self.digest_at_creation != self.digest_at_release
        {
            return Err(Error::Tpm(
                "the sealed root key was not sealed by this manager in the state that releases it (a substituted store?)".into(),
            ));
        }
        Ok(())
    }
}

/// TPM_KEY_PARMS of a 2048-bit RSA storage key (OAEP, no signatures, e = 65537).
fn rsa_parms() -> Vec<u8> {
    let mut p = 1u32.to_be_bytes().to_vec();
    p.extend_from_slice(&3u16.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&12u32.to_be_bytes());
    for v in [2048u32, 2, 0] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

/// The TPM_KEY12 template of [`Tpm12::create_signing_key`].
fn signing_key_template() -> Vec<u8> {
    let mut k = 0x0028u16.to_be_bytes().to_vec(); // TPM_TAG_KEY12
    k.extend_from_slice(&[0, 0]);
    k.extend_from_slice(&0x0010u16.to_be_bytes()); // TPM_KEY_SIGNING
    k.extend_from_slice(&0u32.to_be_bytes()); // not migratable
    k.push(1); // TPM_AUTH_ALWAYS
    k.extend_from_slice(&1u32.to_be_bytes()); // RSA
    k.extend_from_slice(&1u16.to_be_bytes()); // TPM_ES_NONE
    k.extend_from_slice(&2u16.to_be_bytes()); // TPM_SS_RSASSAPKCS1v15_SHA1
    k.extend_from_slice(&12u32.to_be_bytes());
    for v in [2048u32, 2, 0] {
        k.extend_from_slice(&v.to_be_bytes());
    }
    for _ in 0..3 {
        k.extend_from_slice(&0u32.to_be_bytes()); // no PCR info, no public key, no private part
    }
    k
}

/// The TPM_PUBKEY (key parameters and modulus) of a wrapped TPM_KEY12.
pub fn public_key_of(wrapped: &[u8]) -> Result<Vec<u8>> {
    let bad = || Error::Tpm("malformed TPM_KEY12".into());
    let parms_at = 11;
    let parms_end = parms_at + 12 + be32(wrapped, parms_at + 8)? as usize;
    let pub_at = parms_end + 4 + be32(wrapped, parms_end)? as usize;
    let pub_end = pub_at + 4 + be32(wrapped, pub_at)? as usize;
    let parms = wrapped.get(parms_at..parms_end).ok_or_else(bad)?;
    let key = wrapped.get(pub_at..pub_end).ok_or_else(bad)?;
    Ok([parms, key].concat())
}

/// The TPM_QUOTE_INFO a TPM_Quote signs: version 1.1.0.0, "QUOT", the SHA-1 of the
/// TPM_PCR_COMPOSITE, and the external data.
pub fn quote_info(composite: &[u8], external: &[u8; 20]) -> Vec<u8> {
    [&[1u8, 1, 0, 0][..], b"QUOT", &sha1(&[composite]), external].concat()
}

/// The SRK's TPM_KEY for TakeOwnership.
fn srk_template() -> Vec<u8> {
    let mut k = vec![1, 1, 0, 0];
    k.extend_from_slice(&0x0011u16.to_be_bytes());
    k.extend_from_slice(&0u32.to_be_bytes());
    k.push(1);
    k.extend_from_slice(&rsa_parms());
    k.extend_from_slice(&0u32.to_be_bytes());
    k.extend_from_slice(&0u32.to_be_bytes());
    k.extend_from_slice(&0u32.to_be_bytes());
    k
}
