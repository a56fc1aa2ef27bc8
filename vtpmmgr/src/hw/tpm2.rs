//! The TPM 2.0 operations the manager needs from the hardware TPM, over [`HwTpm`]:
//! - seal the root key as a sealed-data object under the owner's primary key, released only by
//!   a policy session satisfying PolicyPCR over the chosen PCRs;
//! - an NV counter (TPM_NT_COUNTER) bound into every store root against rollback, written and
//!   read only with its authValue (which only the manager derives, from the root key);
//! - the attestation key of deep quotes, an ordinary key under the storage primary whose
//!   authValue comes from the root key.
//!
//! The primary key is recreated from its template at each start (same seed, same key), or kept
//! at a persistent handle when the owner's auth is set (then starting needs no owner
//! authorization). Its Name is recorded at init and checked at every start. Owner-authorized
//! commands use the owner's auth through HMAC sessions. Secrets cross the bus only encrypted: they travel as the
//! first parameter of a command or response under a session salted to that primary key
//! ([`super::session`]), and authValues are used through HMAC sessions, never as passwords.

use sha2::Digest;
use xvtpm_tis::HwTpm;

use super::session::{self, Session, Use, CONTINUE, DECRYPT, ENCRYPT};
use super::{pcr_bitmap as select, pcrs_in_order};
use crate::{Error, Result};

const ST_NO_SESSIONS: u16 = 0x8001;
const ST_SESSIONS: u16 = 0x8002;
const RH_OWNER: u32 = 0x4000_0001;
const RH_NULL: u32 = 0x4000_0007;
const RS_PW: u32 = 0x4000_0009;
const ALG_SHA256: u16 = 0x000B;
const ALG_NULL: u16 = 0x0010;
/// TPM_RC_POLICY_FAIL's number among the format-one codes (which carry a session number).
const RC_POLICY_FAIL: u32 = 0x01D;
/// TPM_RC_PCR_CHANGED.
const RC_PCR_CHANGED: u32 = 0x128;
/// TPM_RC_OBJECT_MEMORY and TPM_RC_OBJECT_HANDLES: no room for another transient object.
const RC_OBJECT_FULL: [u32; 2] = [0x902, 0x906];
/// TPM_RC_SESSION_MEMORY and TPM_RC_SESSION_HANDLES: no room for another session.
const RC_SESSION_FULL: [u32; 2] = [0x903, 0x905];
/// First handles of transient objects, HMAC sessions and policy sessions.
const HR_TRANSIENT: u32 = 0x8000_0000;
const HR_HMAC_SESSION: u32 = 0x0200_0000;
const HR_POLICY_SESSION: u32 = 0x0300_0000;

/// TPM_RC_AUTH_FAIL and TPM_RC_BAD_AUTH (format-one codes): a wrong authValue.
const RC_AUTH_FAIL: [u32; 2] = [0x00E, 0x022];
/// TPM_RC_HANDLE (format-one code): no such handle.
const RC_HANDLE: u32 = 0x00B;
const SE_HMAC: u8 = 0x00;
const SE_POLICY: u8 = 0x01;
const SE_TRIAL: u8 = 0x03;
/// TPMA_NV_WRITTEN.
const NV_WRITTEN: u32 = 1 << 29;

/// The Name of an object or NV index with public area `public`: nameAlg (SHA-256), then the
/// digest of that area.
fn name_of(public: &[u8]) -> Vec<u8> {
    [&ALG_SHA256.to_be_bytes()[..], &sha2::Sha256::digest(public)].concat()
}

/// The format-one number of `rc` (what it says, without which handle or session it names).
fn rc_number(rc: u32) -> Option<u32> {
    (rc & 0x80 != 0).then_some(rc & 0x3F)
}

/// A TPM 2.0 command under construction.
struct Cmd {
    cc: u32,
    handles: Vec<u32>,
    /// Each handle's Name (what an HMAC covers).
    names: Vec<Vec<u8>>,
    auth: Option<Vec<u8>>,
    /// An authorization session whose area is computed when the command is encoded.
    session: Option<Use>,
    params: Vec<u8>,
}

impl Cmd {
    fn new(cc: u32) -> Self {
        Self { cc, handles: Vec::new(), names: Vec::new(), auth: None, session: None, params: Vec::new() }
    }
    /// A handle whose Name is the handle itself (permanent handles, PCRs, sessions).
    fn handle(self, h: u32) -> Self {
        self.named(h, h.to_be_bytes().to_vec())
    }
    /// A handle with its Name (objects and NV indices).
    fn named(mut self, h: u32, name: Vec<u8>) -> Self {
        self.handles.push(h);
        self.names.push(name);
        self
    }
    /// Authorised (and possibly encrypted) through a session.
    fn with(mut self, u: Use) -> Self {
        self.session = Some(u);
        self
    }
    /// An empty-password authorization (TPM_RS_PW) for each handle that needs one.
    fn pw(mut self, n: usize) -> Self {
        let one = [&RS_PW.to_be_bytes()[..], &[0, 0, 0, 0, 0]].concat();
        self.auth = Some(one.repeat(n));
        self
    }
    fn u8(mut self, v: u8) -> Self {
        self.params.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.params.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.params.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.params.extend_from_slice(b);
        self
    }
    fn b2(self, b: &[u8]) -> Self {
        self.u16(b.len() as u16).raw(b)
    }
    /// A TPML_PCR_SELECTION of `pcrs` in the sha256 bank.
    fn pcrs(self, pcrs: &[u8]) -> Self {
        self.u32(1).u16(ALG_SHA256).u8(3).raw(&select(pcrs))
    }
    fn encode(&self) -> Vec<u8> {
        let mut params = self.params.clone();
        let auth = match &self.session {
            Some(u) => Some(u.authorize(self.cc, &self.names, &mut params)),
            None => self.auth.clone(),
        };
        let tag = if auth.is_some() { ST_SESSIONS } else { ST_NO_SESSIONS };
        let mut c = tag.to_be_bytes().to_vec();
        c.extend_from_slice(&[0; 4]);
        c.extend_from_slice(&self.cc.to_be_bytes());
        for h in &self.handles {
            c.extend_from_slice(&h.to_be_bytes());
        }
        if let Some(a) = &auth {
            c.extend_from_slice(&(a.len() as u32).to_be_bytes());
            c.extend_from_slice(a);
        }
        c.extend_from_slice(&params);
        let n = c.len() as u32;
        c[2..6].copy_from_slice(&n.to_be_bytes());
        c
    }
}

impl Counter {
    /// Its Name now: nameAlg and the digest of its public area.
    fn current_name(&self) -> Vec<u8> {
        name_of(&self.public)
    }

    /// After its first write, TPMA_NV_WRITTEN is set, which changes its Name.
    fn written(&mut self) {
        if let Some(a) = self.public.get_mut(6..10) {
            let attrs = u32::from_be_bytes([a[0], a[1], a[2], a[3]]) | NV_WRITTEN;
            a.copy_from_slice(&attrs.to_be_bytes());
        }
        self.name = self.current_name();
    }

    /// A refusal of this counter's authValue, said plainly.
    fn refused(&self, e: Error) -> Error {
        match e {
            Error::TpmRc { rc, .. } if rc_number(rc).is_some_and(|n| RC_AUTH_FAIL.contains(&n)) => {
                Error::CounterLost(format!(
                    "the anti-rollback counter {:#x} refuses this store's authorization: it was undefined and \
                 defined again by someone else; `vtpmmgr recover` defines it again and accepts its new value",
                    self.index
                ))
            }
            e => e,
        }
    }
}

/// A response being read.
pub(crate) struct Rsp<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rsp<'a> {
    /// Reads `b` from its start.
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| Error::Tpm("TPM response too short".into()))?;
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    pub(crate) fn b2(&mut self) -> Result<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// The parameters of a response to a command with sessions: they end at parameterSize (the
/// session area follows). Read from after parameterSize.
fn params<'r>(r: &'r [u8], what: &str) -> Result<Rsp<'r>> {
    let end = 4 + Rsp { b: r, at: 0 }.u32()? as usize;
    let b = r.get(..end).ok_or_else(|| Error::Tpm(format!("{what}: parameterSize beyond the response")))?;
    Ok(Rsp { b, at: 4 })
}

/// The TPM 2.0 side of the manager.
pub struct Tpm2<'a> {
    tpm: &'a mut dyn HwTpm,
    locality: u8,
    /// Commands sent so far (the benchmark reports them).
    pub commands: u64,
    /// Objects and sessions this instance made and has not flushed (some sessions end with
    /// their command; keeping those listed only spares them a flush).
    live: Vec<u32>,
    /// The storage primary key's Name: recorded by the first CreatePrimary, or set by the
    /// caller from the store ([`Tpm2::pin_primary`]); a primary with another Name is refused.
    primary_name: Option<Vec<u8>>,
    /// The persistent handle of the storage primary key, if it is kept there.
    srk: Option<u32>,
    /// The owner hierarchy's auth (empty: the TPM's default).
    owner_auth: Vec<u8>,
}

/// The storage primary key, loaded.
#[derive(Debug)]
struct Primary {
    handle: u32,
    name: Vec<u8>,
    /// Its ECC point, what sessions are salted to.
    x: Vec<u8>,
    y: Vec<u8>,
}

/// An NV counter as the manager uses it: its index, Name and authValue.
#[derive(Clone)]
pub struct Counter {
    /// The index.
    pub index: u32,
    name: Vec<u8>,
    /// TPMS_NV_PUBLIC as read, so the Name can follow TPMA_NV_WRITTEN.
    public: Vec<u8>,
    auth: Vec<u8>,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter").field("index", &format_args!("{:#x}", self.index)).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Tpm2<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm2").field("locality", &self.locality).field("commands", &self.commands).finish()
    }
}

impl<'a> Tpm2<'a> {
    /// Uses `tpm` at `locality`.
    pub fn new(tpm: &'a mut dyn HwTpm, locality: u8) -> Self {
        Self { tpm, locality, commands: 0, live: Vec::new(), primary_name: None, srk: None, owner_auth: Vec::new() }
    }

    /// Refuses a storage primary key whose Name is not `name` (recorded at init): another TPM,
    /// a cleared owner hierarchy, or something between this manager and the TPM that answers
    /// with its own key to read what is encrypted to it.
    pub fn pin_primary(&mut self, name: Vec<u8>) {
        self.primary_name = Some(name);
    }

    /// The storage primary key's Name, once a primary was made or pinned.
    pub fn primary_name(&self) -> Option<&[u8]> {
        self.primary_name.as_deref()
    }

    /// One command; the whole response and its code.
    fn transmit(&mut self, cmd: &[u8]) -> Result<(Vec<u8>, u32)> {
        let r = super::busy::transmit(
            self.tpm,
            self.locality,
            cmd,
            &super::busy::TPM2,
            super::busy::Backoff::default(),
            &mut self.commands,
        )?;
        let rc = r.get(6..10).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(u32::MAX);
        Ok((r, rc))
    }

    /// Sends `cmd`; the response after its header, or the TPM's code as an error. When the
    /// TPM has no room for another object or session, what it holds that this instance did
    /// not make is flushed and the command sent once more: talking to the TPM directly (TIS,
    /// swtpm), a manager killed in the middle of an operation leaves its objects and sessions
    /// loaded. Only on a TPM the manager owns ([`HwTpm::owns_tpm`]; not the kernel's devices,
    /// whose other users' sessions these would be) and runs one operation at a time on.
    fn run(&mut self, what: &str, cmd: Cmd) -> Result<Vec<u8>> {
        self.run_in(what, cmd).map(|(r, _)| r)
    }

    /// [`Tpm2::run`] for a command with an authorization session: its response is checked
    /// (HMAC) and decrypted; also returns the session with the TPM's new nonce.
    fn run_in(&mut self, what: &str, cmd: Cmd) -> Result<(Vec<u8>, Option<Session>)> {
        let bytes = cmd.encode();
        let (mut r, mut rc) = self.transmit(&bytes)?;
        let full = if RC_OBJECT_FULL.contains(&rc) {
            Some(&[HR_TRANSIENT][..])
        } else if RC_SESSION_FULL.contains(&rc) {
            Some(&[HR_HMAC_SESSION, HR_POLICY_SESSION][..])
        } else {
            None
        };
        if let Some(ranges) = full.filter(|_| self.tpm.owns_tpm()) {
            self.flush_leftovers(what, ranges, &cmd.handles)?;
            (r, rc) = self.transmit(&bytes)?;
        }
        if rc != 0 {
            // A failed command does not end its session.
            if let Some(u) = &cmd.session {
                self.flush(u.session.handle);
            }
            return Err(Error::TpmRc { what: what.to_string(), rc });
        }
        // CreatePrimary, Load, LoadExternal and StartAuthSession return the new handle first.
        let handles = matches!(cmd.cc, 0x131 | 0x157 | 0x167 | 0x176);
        if handles {
            if let Ok(h) = (Rsp { b: &r, at: 10 }).u32() {
                self.live.push(h);
            }
        }
        let mut body = r[10..].to_vec();
        let Some(u) = &cmd.session else { return Ok((body, None)) };
        let start = if handles { 4 } else { 0 };
        let size = Rsp { b: &body, at: start }.u32()? as usize;
        let rest = &mut body[start + 4..];
        if size > rest.len() {
            return Err(Error::Tpm(format!("{what}: parameterSize beyond the response")));
        }
        let (params, area) = rest.split_at_mut(size);
        let s = u.finish(cmd.cc, params, area).map_err(|e| Error::Tpm(format!("{what}: {e}")))?;
        if u.attrs & CONTINUE == 0 {
            self.live.retain(|&h| h != s.handle);
        }
        Ok((body, Some(s)))
    }

    /// Flushes the objects or sessions (handle ranges starting at `ranges`) that the TPM holds
    /// and this instance did not make, except `keep`.
    fn flush_leftovers(&mut self, what: &str, ranges: &[u32], keep: &[u32]) -> Result<()> {
        let mut held = Vec::new();
        for &first in ranges {
            // TPM2_GetCapability(TPM_CAP_HANDLES, first, 64): moreData, capability, TPML_HANDLE.
            let cmd = Cmd::new(0x17A).u32(1).u32(first).u32(64).encode();
            let (r, rc) = self.transmit(&cmd)?;
            if rc != 0 {
                return Err(Error::TpmRc { what: "GetCapability(TPM_CAP_HANDLES)".into(), rc });
            }
            let mut p = Rsp { b: &r, at: 15 };
            for _ in 0..p.u32()? {
                held.push(p.u32()?);
            }
        }
        held.retain(|h| !self.live.contains(h) && !keep.contains(h));
        log::warn!(
            "{what}: the TPM is full; flushing the {} objects or sessions it holds that this manager did not make \
             (left by a manager that was killed?)",
            held.len()
        );
        for h in held {
            self.flush_any(h);
        }
        Ok(())
    }

    /// Flushes what this instance loaded or started and still holds (a persistent key, or a
    /// session its command ended, is not flushed).
    fn flush(&mut self, handle: u32) {
        if self.live.contains(&handle) {
            self.flush_any(handle);
        }
    }

    fn flush_any(&mut self, handle: u32) {
        self.live.retain(|&h| h != handle);
        if let Err(e) = self.run("FlushContext", Cmd::new(0x165).u32(handle)) {
            log::warn!("flushing TPM handle {handle:#x}: {e}");
        }
    }

    /// The storage primary key under the owner hierarchy (ECC P-256, AES-128-CFB).
    fn primary(&mut self) -> Result<Primary> {
        let public = [
            &0x0023u16.to_be_bytes()[..],
            &ALG_SHA256.to_be_bytes(),
            &0x0003_0472u32.to_be_bytes(),
            &[0, 0],
            &0x0006u16.to_be_bytes(),
            &128u16.to_be_bytes(),
            &0x0043u16.to_be_bytes(),
            &ALG_NULL.to_be_bytes(),
            &0x0003u16.to_be_bytes(),
            &ALG_NULL.to_be_bytes(),
            &[0, 0, 0, 0],
        ]
        .concat();
        let (handle, r) = match self.srk {
            Some(h) => {
                let r = self.run("ReadPublic (storage primary key)", Cmd::new(0x173).handle(h)).map_err(|e| {
                    Error::Tpm(format!(
                        "the persistent storage primary key {h:#x} this store uses cannot be read ({e}): evicted, \
                         or the owner hierarchy cleared?"
                    ))
                })?;
                (h, r)
            }
            None => {
                let cmd = self.as_owner(Cmd::new(0x131).handle(RH_OWNER))?;
                let r = self.run("CreatePrimary", cmd.raw(&[0, 4, 0, 0, 0, 0]).b2(&public).u16(0).u32(0))?;
                let h = Rsp { b: &r, at: 0 }.u32()?;
                // After the handle: parameterSize, then outPublic.
                (h, r[8..].to_vec())
            }
        };
        let mut p = Rsp { b: &r, at: 0 };
        let public = p.b2()?;
        // TPMT_PUBLIC of our template: type, nameAlg, attributes, authPolicy (empty),
        // symmetric (AES, 128, CFB), scheme (NULL), curve, kdf (NULL), then the point.
        let mut q = Rsp { b: public, at: 2 + 2 + 4 + 2 + 6 + 2 + 2 + 2 };
        let point = (|| Ok::<_, Error>((q.b2()?.to_vec(), q.b2()?.to_vec())))();
        let name = name_of(public);
        let (x, y) = match point {
            Ok(p) if public.get(..2) == Some(&[0, 0x23]) => p,
            _ => {
                self.flush(handle);
                return Err(Error::Tpm("CreatePrimary returned a key that is not of the template asked for".into()));
            }
        };
        match self.primary_name.clone() {
            Some(want) if want != name => {
                self.flush(handle);
                return Err(Error::Tpm(format!(
                    "the TPM's storage primary key is not the one this store was initialised with (Name {}, \
                     recorded {}): another TPM, a cleared owner hierarchy, or something between this manager \
                     and the TPM answering with its own key. Nothing secret was sent to it",
                    crate::hex(&name),
                    crate::hex(&want)
                )));
            }
            Some(_) => {}
            None => self.primary_name = Some(name.clone()),
        }
        Ok(Primary { handle, name, x, y })
    }

    /// Starts a session of `kind`: unsalted (its key is empty: an HMAC session then proves
    /// knowledge of an authValue without revealing it), or salted to `primary` with AES-128-CFB
    /// parameter encryption (its key is known only to this process and that key's TPM).
    fn start_session(&mut self, kind: u8, salted: Option<&Primary>) -> Result<Session> {
        let nonce: [u8; 32] = rand::random();
        let (salt, secret) = match salted {
            Some(p) => session::ecc_salt(&p.x, &p.y)
                .map(|(s, e)| (Some(s), e))
                .ok_or_else(|| Error::Tpm("the storage primary key's point is not on P-256".into()))?,
            None => (None, Vec::new()),
        };
        let mut cmd = Cmd::new(0x176);
        cmd = match salted {
            Some(p) => cmd.named(p.handle, p.name.clone()),
            None => cmd.handle(RH_NULL),
        };
        cmd = cmd.handle(RH_NULL).b2(&nonce).b2(&secret).u8(kind);
        cmd = if salted.is_some() { cmd.u16(0x0006).u16(128).u16(0x0043) } else { cmd.u16(ALG_NULL) };
        let r = self.run("StartAuthSession", cmd.u16(ALG_SHA256))?;
        let mut p = Rsp { b: &r, at: 0 };
        let handle = p.u32()?;
        let nonce_tpm = p.b2()?.to_vec();
        let key = salt.map(|s| session::kdfa(&s, "ATH", &nonce_tpm, &nonce, 32)).unwrap_or_default();
        Ok(Session { handle, key, nonce_tpm, policy: kind != SE_HMAC })
    }

    /// An HMAC session salted to a freshly made primary (flushed again before returning).
    fn salted_session(&mut self) -> Result<Session> {
        let p = self.primary()?;
        let s = self.start_session(SE_HMAC, Some(&p));
        self.flush(p.handle);
        s
    }

    fn session(&mut self, kind: u8) -> Result<u32> {
        self.start_session(kind, None).map(|s| s.handle)
    }

    fn policy_pcr(&mut self, session: u32, pcrs: &[u8]) -> Result<()> {
        let cmd = Cmd::new(0x17F).handle(session).u16(0).pcrs(pcrs);
        self.run("PolicyPCR", cmd).map(drop)
    }

    /// The policy digest of PolicyPCR over the current values of `pcrs` (a trial session).
    pub fn pcr_policy(&mut self, pcrs: &[u8]) -> Result<Vec<u8>> {
        let s = self.session(SE_TRIAL)?;
        let r = self.policy_pcr(s, pcrs).and_then(|()| self.run("PolicyGetDigest", Cmd::new(0x189).handle(s)));
        self.flush(s);
        Ok(Rsp { b: &r?, at: 0 }.b2()?.to_vec())
    }

    /// Seals `secret` to the current values of `pcrs`: the sealed object's (private, public).
    pub fn seal(&mut self, secret: &[u8; 32], pcrs: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        self.seal_to(secret, pcrs, None)
    }

    /// Seals `secret` under `policy` (a PolicyPCR digest over `pcrs`, e.g. for values they
    /// will hold later), or under the current values of `pcrs`.
    pub fn seal_to(
        &mut self,
        secret: &[u8; 32],
        pcrs: &[u8],
        policy: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let policy = match policy {
            Some(p) => p,
            None => self.pcr_policy(pcrs)?,
        };
        let public = [
            &0x0008u16.to_be_bytes()[..],
            &ALG_SHA256.to_be_bytes(),
            // fixedTPM | fixedParent; no userWithAuth: only the policy releases it.
            &0x0000_0012u32.to_be_bytes(),
            &(policy.len() as u16).to_be_bytes(),
            &policy,
            &ALG_NULL.to_be_bytes(),
            &[0, 0],
        ]
        .concat();
        let sensitive = [&[0, 0, 0, 32][..], secret].concat();
        let parent = self.primary()?;
        // The secret is the first parameter: encrypted under a session salted to the parent.
        let s = self.start_session(SE_HMAC, Some(&parent));
        // creationPCR: the creation data records the sealed PCRs' values at creation, and the
        // creation ticket lets the TPM vouch for that record later.
        let r = s.and_then(|s| {
            let cmd = Cmd::new(0x153).named(parent.handle, parent.name.clone()).with(Use::new(&s, &[], DECRYPT));
            self.run("Create", cmd.b2(&sensitive).b2(&public).u16(0).pcrs(pcrs))
        });
        self.flush(parent.handle);
        let r = r?;
        let mut p = params(&r, "Create")?;
        let (private, public) = (p.b2()?.to_vec(), p.b2()?.to_vec());
        // creationData, creationHash and creationTicket, as the TPM returned them.
        Ok((private, public, p.b[p.at..].to_vec()))
    }

    /// The current sha256 values of `pcrs`, in ascending order (a TPM returns at least eight
    /// per PCR_Read).
    pub fn pcr_values(&mut self, pcrs: &[u8]) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::new();
        for chunk in pcrs_in_order(pcrs).chunks(8) {
            let r = self.run("PCR_Read", Cmd::new(0x17E).pcrs(chunk))?;
            let mut p = Rsp { b: &r, at: 4 };
            for _ in 0..p.u32()?.min(8) {
                p.take(2)?;
                let n = p.take(1)?[0] as usize;
                p.take(n)?;
            }
            let count = p.u32()? as usize;
            if count != chunk.len() {
                return Err(Error::Tpm(format!("PCR_Read returned {count} of {} values", chunk.len())));
            }
            for _ in 0..count {
                out.push(p.b2()?.try_into().map_err(|_| Error::Tpm("PCR_Read: not a sha256 value".into()))?);
            }
        }
        Ok(out)
    }

    /// Checks, with the TPM's creation ticket, that the loaded object `item` was created by
    /// this TPM at `locality` with `pcrs` holding the values they hold now (the state that
    /// releases it): an object made by someone else, or in another platform state, fails.
    fn certify_creation(&mut self, item: u32, creation: &[u8], pcrs: &[u8], locality: u8) -> Result<()> {
        let bad = |why: &str| {
            Error::Tpm(format!(
                "the sealed root key was not created by this manager in the state that releases it ({why}; a substituted store?)"
            ))
        };
        let mut p = Rsp { b: creation, at: 0 };
        let data = p.b2().map_err(|_| bad("no creation data"))?.to_vec();
        let hash = p.b2().map_err(|_| bad("no creation hash"))?.to_vec();
        let ticket = creation[p.at..].to_vec();
        let cmd = Cmd::new(0x14A).handle(RH_NULL).handle(item).pw(1).u16(0).b2(&hash).u16(ALG_NULL).raw(&ticket);
        self.run("CertifyCreation", cmd).map_err(|e| bad(&format!("the TPM does not vouch for it: {e}")))?;
        if sha2::Sha256::digest(&data)[..] != hash[..] {
            return Err(bad("creation data and hash differ"));
        }
        // TPMS_CREATION_DATA: pcrSelect, pcrDigest, locality, ...
        let want_sel = Cmd::new(0).pcrs(pcrs).params;
        if data.get(..want_sel.len()) != Some(&want_sel[..]) {
            return Err(bad("other PCRs"));
        }
        let mut d = Rsp { b: &data, at: want_sel.len() };
        let digest = d.b2().map_err(|_| bad("malformed creation data"))?.to_vec();
        let loc = *data.get(d.at).ok_or_else(|| bad("malformed creation data"))?;
        let now = sha2::Sha256::digest(self.pcr_values(pcrs)?.concat());
        if now[..] != digest[..] {
            return Err(bad("created in another PCR state"));
        }
        if loc != 1 << locality {
            return Err(bad("created at another locality"));
        }
        Ok(())
    }

    /// Unseals a sealed object under the PCR policy, after checking with its creation ticket
    /// (`creation`, from [`Tpm2::seal`]) that this manager created it.
    pub fn unseal(&mut self, private: &[u8], public: &[u8], creation: &[u8], pcrs: &[u8]) -> Result<[u8; 32]> {
        let parent = self.primary()?;
        let loaded = self.run("Load", Cmd::new(0x157).handle(parent.handle).pw(1).b2(private).b2(public));
        // The policy session is salted to the parent: the root key comes back encrypted.
        let s = loaded.as_ref().ok().map(|_| self.start_session(SE_POLICY, Some(&parent)));
        self.flush(parent.handle);
        let loaded = loaded?;
        let mut p = Rsp { b: &loaded, at: 0 };
        let item = p.u32()?;
        // Load's parameters: the object's Name, which the policy session's HMAC covers.
        let name = (|| {
            Ok::<_, Error>({
                p.u32()?;
                p.b2()?.to_vec()
            })
        })();
        let out = (|| {
            let name = name?;
            let s = s.unwrap_or_else(|| Err(Error::Tpm("no session".into())))?;
            if let Err(e) = self.policy_pcr(s.handle, pcrs) {
                self.flush(s.handle);
                return Err(e);
            }
            // The session ends with the command (continueSession is clear).
            let r = self.run("Unseal", Cmd::new(0x15E).named(item, name).with(Use::new(&s, &[], ENCRYPT)));
            if r.is_err() {
                self.flush(s.handle);
            }
            r
        })();
        // Unsealed (so the PCRs are in the releasing state): now the creation record must show
        // that this manager made the object in that same state.
        let out = out.and_then(|r| self.certify_creation(item, creation, pcrs, self.locality).map(|()| r));
        self.flush(item);
        let r = out.map_err(|e| match e {
            Error::TpmRc { rc, .. } if (rc & 0x80 != 0 && rc & 0x3F == RC_POLICY_FAIL) || rc == RC_PCR_CHANGED => Error::Tpm(format!(
                "the TPM refused to unseal the store's root key: PCRs {pcrs:?} differ from the values it was sealed to (rc {rc:#x})"
            )),
            e => e,
        })?;
        let data = Rsp { b: &r, at: 4 }.b2()?;
        data.try_into().map_err(|_| Error::Tpm(format!("unsealed {} bytes, expected a 32-byte key", data.len())))
    }

    /// Defines NV counter `index` with authValue `auth` (an empty one for stores made before
    /// counters had one), which travels encrypted, and increments it once so it can be read:
    /// the counter and its value. An index that already exists is refused.
    pub fn counter_create(&mut self, index: u32, auth: &[u8]) -> Result<(Counter, u64)> {
        // TPMA_NV_AUTHWRITE | TPM_NT_COUNTER | TPMA_NV_OWNERREAD (an operator can read it with
        // `tpm2_nvread -C o`) | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA (a wrong auth must not start
        // the dictionary-attack lockout: anyone could then lock the manager out).
        let attrs: u32 = (1 << 2) | (1 << 4) | (1 << 17) | (1 << 18) | (1 << 25);
        let public =
            [&index.to_be_bytes()[..], &ALG_SHA256.to_be_bytes(), &attrs.to_be_bytes(), &[0, 0], &8u16.to_be_bytes()]
                .concat();
        let s = self.salted_session()?;
        let owner = self.owner_auth.clone();
        let cmd = Cmd::new(0x12A).handle(RH_OWNER).with(Use::new(&s, &owner, DECRYPT)).b2(auth).b2(&public);
        self.run("NV_DefineSpace", cmd).map_err(|e| match e {
            // TPM_RC_NV_DEFINED
            Error::TpmRc { rc: 0x14c, .. } => Error::Tpm(format!(
                "NV index {index:#x} already exists on the hardware TPM: a store was initialised on this TPM \
                 before. Its counter is not reused (that would let an old copy of that store pass the \
                 rollback check): give another --nv-index, or, if that store is gone for good, remove \
                 the index (tpm2_nvundefine {index:#x})"
            )),
            Error::TpmRc { rc, .. } if rc_number(rc).is_some_and(|n| RC_AUTH_FAIL.contains(&n)) => Error::Tpm(
                "the TPM refused the owner's authorization to define the counter: its owner auth is set; give it \
                 with --owner-auth-file"
                    .into(),
            ),
            e => e,
        })?;
        let c = Counter { index, name: Vec::new(), public, auth: auth.to_vec() };
        let c = Counter { name: c.current_name(), ..c };
        let mut c = c;
        let v = self.counter_bump(&mut c, 1)?;
        Ok((c, v))
    }

    /// The NV counter at `index`, used with authValue `auth`: checks that it is a counter.
    pub fn counter(&mut self, index: u32, auth: &[u8]) -> Result<Counter> {
        // Only a counter can be trusted never to go back: an ordinary index redefined at the
        // same handle could hold any value.
        let r = self.run("NV_ReadPublic", Cmd::new(0x169).handle(index)).map_err(|e| match e {
            Error::TpmRc { rc, .. } if rc_number(rc) == Some(RC_HANDLE) => Error::CounterLost(format!(
                "the anti-rollback counter {index:#x} is gone from the hardware TPM (undefined by its owner?); \
                 `vtpmmgr recover` defines it again and accepts its new value"
            )),
            e => e,
        })?;
        let public = Rsp { b: &r, at: 0 }.b2()?.to_vec();
        let attrs = public.get(6..10).map(|a| u32::from_be_bytes([a[0], a[1], a[2], a[3]])).unwrap_or_default();
        if (attrs >> 4) & 0xF != 1 {
            return Err(Error::Tpm(format!(
                "NV index {index:#x} is not a counter (attributes {attrs:#x}); refusing it"
            )));
        }
        let c = Counter { index, name: Vec::new(), public, auth: auth.to_vec() };
        Ok(Counter { name: c.current_name(), ..c })
    }

    /// Reads NV counter `c` (authorised by its authValue; the value is HMAC-checked).
    pub fn counter_read(&mut self, c: &Counter) -> Result<u64> {
        let s = self.start_session(SE_HMAC, None)?;
        self.counter_read_in(c, &s, 0).map(|(v, _)| v)
    }

    fn counter_read_in(&mut self, c: &Counter, s: &Session, attrs: u8) -> Result<(u64, Option<Session>)> {
        let cmd = Cmd::new(0x14E).named(c.index, c.name.clone()).named(c.index, c.name.clone());
        let (r, s) =
            self.run_in("NV_Read", cmd.with(Use::new(s, &c.auth, attrs)).u16(8).u16(0)).map_err(|e| c.refused(e))?;
        let v = Rsp { b: &r, at: 4 }.b2()?;
        Ok((u64::from_be_bytes(v.try_into().map_err(|_| Error::Tpm("NV counter is not 8 bytes".into()))?), s))
    }

    /// Increments NV counter `c` `times` times, then reads it back, all in one HMAC session:
    /// the value read.
    pub fn counter_bump(&mut self, c: &mut Counter, times: u64) -> Result<u64> {
        let mut s = self.start_session(SE_HMAC, None)?;
        for _ in 0..times {
            let cmd = Cmd::new(0x134).named(c.index, c.name.clone()).named(c.index, c.name.clone());
            let r = self.run_in("NV_Increment", cmd.with(Use::new(&s, &c.auth, CONTINUE)));
            match r {
                Ok((_, Some(next))) => s = next,
                Ok((_, None)) => return Err(Error::Tpm("NV_Increment: no session in the response".into())),
                Err(e) => {
                    self.flush(s.handle);
                    return Err(c.refused(e));
                }
            }
            c.written();
        }
        let r = self.counter_read_in(c, &s, 0);
        if r.is_err() {
            self.flush(s.handle);
        }
        r.map(|(v, _)| v)
    }

    /// Undefines NV index `index` with the owner's authorization.
    pub fn nv_undefine(&mut self, index: u32) -> Result<()> {
        // An HMAC covers the index's Name: NV_ReadPublic's second answer.
        let r = self.run("NV_ReadPublic", Cmd::new(0x169).handle(index))?;
        let mut p = Rsp { b: &r, at: 0 };
        p.b2()?;
        let name = p.b2()?.to_vec();
        let cmd = self.as_owner(Cmd::new(0x122).handle(RH_OWNER).named(index, name))?;
        self.run("NV_UndefineSpace", cmd).map(drop)
    }

    /// Creates the attestation key under the storage primary: a restricted ECC P-256 signing
    /// key (ECDSA-SHA256) with authValue `auth` (from the root key), which crosses the bus
    /// only encrypted (Create's first parameter, under a salted session). Its (private,
    /// public) parts, kept in the sealed-key block: only this manager can use it, and no
    /// other process can make the same key.
    pub fn create_attestation_key(&mut self, auth: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let template = [
            &0x0023u16.to_be_bytes()[..],
            &ALG_SHA256.to_be_bytes(),
            // fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA | restricted | sign
            &0x0005_0472u32.to_be_bytes(),
            &[0, 0],
            &ALG_NULL.to_be_bytes(),
            &0x0018u16.to_be_bytes(),
            &ALG_SHA256.to_be_bytes(),
            &0x0003u16.to_be_bytes(),
            &ALG_NULL.to_be_bytes(),
            &[0, 0, 0, 0],
        ]
        .concat();
        let sensitive = [&(auth.len() as u16).to_be_bytes()[..], auth, &[0, 0]].concat();
        let parent = self.primary()?;
        let r = self.start_session(SE_HMAC, Some(&parent)).and_then(|s| {
            let cmd = Cmd::new(0x153).named(parent.handle, parent.name.clone()).with(Use::new(&s, &[], DECRYPT));
            self.run("Create (attestation key)", cmd.b2(&sensitive).b2(&template).u16(0).u32(0))
        });
        self.flush(parent.handle);
        let r = r?;
        let mut p = params(&r, "Create")?;
        Ok((p.b2()?.to_vec(), p.b2()?.to_vec()))
    }

    /// Quotes `pcrs` (sha256 bank) with the attestation key (`private`, `public` from
    /// [`Tpm2::create_attestation_key`], authValue `auth`): (the key's TPMT_PUBLIC, the
    /// TPMS_ATTEST, the TPMT_SIGNATURE).
    pub fn quote(
        &mut self,
        qualifying: &[u8; 32],
        pcrs: &[u8],
        (private, public): (&[u8], &[u8]),
        auth: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let parent = self.primary()?;
        let loaded =
            self.run("Load (attestation key)", Cmd::new(0x157).handle(parent.handle).pw(1).b2(private).b2(public));
        self.flush(parent.handle);
        let loaded = loaded?;
        let mut p = Rsp { b: &loaded, at: 0 };
        let ak = p.u32()?;
        let name = (|| {
            Ok::<_, Error>({
                p.u32()?;
                p.b2()?.to_vec()
            })
        })();
        let q = name.and_then(|name| {
            let s = self.start_session(SE_HMAC, None)?;
            let cmd = Cmd::new(0x158).named(ak, name).with(Use::new(&s, auth, 0));
            self.run("Quote", cmd.b2(qualifying).u16(ALG_NULL).pcrs(pcrs))
        });
        self.flush(ak);
        let q = q?;
        let mut p = params(&q, "Quote")?;
        let attest = p.b2()?.to_vec();
        let signature = p.b[p.at..].to_vec();
        Ok((public.to_vec(), attest, signature))
    }

    /// Makes the storage primary key persistent at `handle` (owner-authorized), or, if a key is
    /// there already, checks it is that same key: from then on it is used from there, and
    /// starting needs no owner authorization (the owner's auth may be set).
    pub fn persist_primary(&mut self, handle: u32) -> Result<()> {
        let made = self.primary()?;
        let there = self.run("ReadPublic", Cmd::new(0x173).handle(handle));
        match there {
            Ok(r) => {
                self.flush(made.handle);
                let public = Rsp { b: &r, at: 0 }.b2()?;
                let name = name_of(public);
                if name != made.name {
                    return Err(Error::Tpm(format!(
                        "persistent handle {handle:#x} holds another key than this manager's storage primary key; \
                         give another --srk-handle"
                    )));
                }
                log::info!("the storage primary key is at {handle:#x} already");
            }
            Err(Error::TpmRc { rc, .. }) if rc_number(rc) == Some(RC_HANDLE) => {
                let cmd = self.as_owner(Cmd::new(0x120).handle(RH_OWNER).named(made.handle, made.name.clone()));
                let r = cmd.and_then(|c| self.run("EvictControl", c.u32(handle)));
                self.flush(made.handle);
                r?;
                log::info!("the storage primary key made persistent at {handle:#x}");
            }
            Err(e) => {
                self.flush(made.handle);
                return Err(e);
            }
        }
        self.srk = Some(handle);
        Ok(())
    }

    /// Uses the persistent storage primary key at `handle` instead of making it each time.
    pub fn use_persistent_primary(&mut self, handle: u32) {
        self.srk = Some(handle);
    }

    /// Authorizes the owner hierarchy with `auth` (through HMAC sessions) from now on.
    pub fn set_owner_auth(&mut self, auth: Vec<u8>) {
        self.owner_auth = auth;
    }

    /// Changes the owner hierarchy's auth to `new` (sent encrypted).
    pub fn change_owner_auth(&mut self, new: &[u8]) -> Result<()> {
        let s = self.salted_session()?;
        let owner = self.owner_auth.clone();
        let cmd = Cmd::new(0x129).handle(RH_OWNER).with(Use::new(&s, &owner, DECRYPT).answered_with(new)).b2(new);
        self.run("HierarchyChangeAuth (owner)", cmd)?;
        self.owner_auth = new.to_vec();
        Ok(())
    }

    /// `cmd` (its handles set, the owner's first) authorized by the owner: the empty password,
    /// or an HMAC session with the owner's auth.
    fn as_owner(&mut self, cmd: Cmd) -> Result<Cmd> {
        if self.owner_auth.is_empty() {
            return Ok(cmd.pw(1));
        }
        let s = self.start_session(SE_HMAC, None)?;
        Ok(cmd.with(Use::new(&s, &self.owner_auth, 0)))
    }

    /// Resets `pcr` (only resettable PCRs at allowed localities).
    pub fn pcr_reset(&mut self, pcr: u32) -> Result<()> {
        self.run("PCR_Reset", Cmd::new(0x13D).handle(pcr).pw(1)).map(drop)
    }

    /// Extends `pcr` (sha256) with `digest` (tests use it to change the platform's state).
    pub fn pcr_extend(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<()> {
        self.run("PCR_Extend", Cmd::new(0x182).handle(pcr).pw(1).u32(1).u16(ALG_SHA256).raw(digest)).map(drop)
    }

    /// TPM2_Startup(CLEAR); an already started TPM is fine.
    pub fn startup(&mut self) -> Result<()> {
        match self.run("Startup", Cmd::new(0x144).u16(0)) {
            Err(Error::TpmRc { rc: 0x100, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
