//! The TPM 2.0 operations the manager needs from the hardware TPM, over [`HwTpm`]:
//! - seal the root key as a sealed-data object under the owner's primary key, released only by
//!   a policy session satisfying PolicyPCR over the chosen PCRs;
//! - an NV counter (TPM_NT_COUNTER) bound into every store root against rollback.
//!
//! The primary key is recreated from its template at each start (same seed, same key), so
//! nothing but the sealed object's public and private parts is kept.

use sha2::Digest;
use xvtpm_tis::HwTpm;

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

/// A TPM 2.0 command under construction.
struct Cmd {
    cc: u32,
    handles: Vec<u32>,
    auth: Option<Vec<u8>>,
    params: Vec<u8>,
}

impl Cmd {
    fn new(cc: u32) -> Self {
        Self { cc, handles: Vec::new(), auth: None, params: Vec::new() }
    }
    fn handle(mut self, h: u32) -> Self {
        self.handles.push(h);
        self
    }
    /// An empty-password authorization (TPM_RS_PW) for each handle that needs one.
    fn pw(mut self, n: usize) -> Self {
        let one = [&RS_PW.to_be_bytes()[..], &[0, 0, 0, 0, 0]].concat();
        self.auth = Some(one.repeat(n));
        self
    }
    /// A policy session's authorization (no HMAC: the policy carries no auth value).
    fn policy(mut self, session: u32) -> Self {
        self.auth = Some([&session.to_be_bytes()[..], &[0, 0, 0, 0, 0]].concat());
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
        let tag = if self.auth.is_some() { ST_SESSIONS } else { ST_NO_SESSIONS };
        let mut c = tag.to_be_bytes().to_vec();
        c.extend_from_slice(&[0; 4]);
        c.extend_from_slice(&self.cc.to_be_bytes());
        for h in &self.handles {
            c.extend_from_slice(&h.to_be_bytes());
        }
        if let Some(a) = &self.auth {
            c.extend_from_slice(&(a.len() as u32).to_be_bytes());
            c.extend_from_slice(a);
        }
        c.extend_from_slice(&self.params);
        let n = c.len() as u32;
        c[2..6].copy_from_slice(&n.to_be_bytes());
        c
    }
}

/// A response being read.
struct Rsp<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rsp<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
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
    fn b2(&mut self) -> Result<&'a [u8]> {
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
}

impl std::fmt::Debug for Tpm2<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm2").field("locality", &self.locality).field("commands", &self.commands).finish()
    }
}

impl<'a> Tpm2<'a> {
    /// Uses `tpm` at `locality`.
    pub fn new(tpm: &'a mut dyn HwTpm, locality: u8) -> Self {
        Self { tpm, locality, commands: 0, live: Vec::new() }
    }

    /// One command; the whole response and its code.
    fn transmit(&mut self, cmd: &[u8]) -> Result<(Vec<u8>, u32)> {
        self.commands += 1;
        let r = self.tpm.transmit(self.locality, cmd)?;
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
            return Err(Error::TpmRc { what: what.to_string(), rc });
        }
        // CreatePrimary, Load, LoadExternal and StartAuthSession return the new handle first.
        if matches!(cmd.cc, 0x131 | 0x157 | 0x167 | 0x176) {
            if let Ok(h) = (Rsp { b: &r, at: 10 }).u32() {
                self.live.push(h);
            }
        }
        Ok(r[10..].to_vec())
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
            self.flush(h);
        }
        Ok(())
    }

    fn flush(&mut self, handle: u32) {
        self.live.retain(|&h| h != handle);
        if let Err(e) = self.run("FlushContext", Cmd::new(0x165).u32(handle)) {
            log::warn!("flushing TPM handle {handle:#x}: {e}");
        }
    }

    /// The storage primary key under the owner hierarchy (ECC P-256, AES-128-CFB).
    fn primary(&mut self) -> Result<u32> {
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
        let cmd = Cmd::new(0x131).handle(RH_OWNER).pw(1).raw(&[0, 4, 0, 0, 0, 0]).b2(&public).u16(0).u32(0);
        let r = self.run("CreatePrimary", cmd)?;
        Rsp { b: &r, at: 0 }.u32()
    }

    fn session(&mut self, kind: u8) -> Result<u32> {
        let cmd = Cmd::new(0x176)
            .handle(RH_NULL)
            .handle(RH_NULL)
            .b2(&[0x5A; 16])
            .u16(0)
            .u8(kind)
            .u16(ALG_NULL)
            .u16(ALG_SHA256);
        let r = self.run("StartAuthSession", cmd)?;
        Rsp { b: &r, at: 0 }.u32()
    }

    fn policy_pcr(&mut self, session: u32, pcrs: &[u8]) -> Result<()> {
        let cmd = Cmd::new(0x17F).handle(session).u16(0).pcrs(pcrs);
        self.run("PolicyPCR", cmd).map(drop)
    }

    /// The policy digest of PolicyPCR over the current values of `pcrs` (a trial session).
    pub fn pcr_policy(&mut self, pcrs: &[u8]) -> Result<Vec<u8>> {
        let s = self.session(0x03)?;
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
        // creationPCR: the creation data records the sealed PCRs' values at creation, and the
        // creation ticket lets the TPM vouch for that record later.
        let cmd = Cmd::new(0x153).handle(parent).pw(1).b2(&sensitive).b2(&public).u16(0).pcrs(pcrs);
        let r = self.run("Create", cmd);
        self.flush(parent);
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
        let loaded = self.run("Load", Cmd::new(0x157).handle(parent).pw(1).b2(private).b2(public));
        self.flush(parent);
        let item = Rsp { b: &loaded?, at: 0 }.u32()?;
        let out = (|| {
            let s = self.session(0x01)?;
            if let Err(e) = self.policy_pcr(s, pcrs) {
                self.flush(s);
                return Err(e);
            }
            // The session ends with the command (continueSession is clear).
            let r = self.run("Unseal", Cmd::new(0x15E).handle(item).policy(s));
            if r.is_err() {
                self.flush(s);
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

    /// Defines NV counter `index` (index auth empty) and increments it once so it can be read;
    /// returns its value. An index that already exists is refused.
    pub fn counter_create(&mut self, index: u32) -> Result<u64> {
        // TPMA_NV_AUTHWRITE | TPM_NT_COUNTER | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA.
        let attrs: u32 = (1 << 2) | (1 << 4) | (1 << 18) | (1 << 25);
        let public =
            [&index.to_be_bytes()[..], &ALG_SHA256.to_be_bytes(), &attrs.to_be_bytes(), &[0, 0], &8u16.to_be_bytes()]
                .concat();
        self.run("NV_DefineSpace", Cmd::new(0x12A).handle(RH_OWNER).pw(1).u16(0).b2(&public)).map_err(|e| match e {
            // TPM_RC_NV_DEFINED
            Error::TpmRc { rc: 0x14c, .. } => Error::Tpm(format!(
                "NV index {index:#x} already exists on the hardware TPM: a store was initialised on this TPM \
                 before. Its counter is not reused (that would let an old copy of that store pass the \
                 rollback check): give another --nv-index, or, if that store is gone for good, remove \
                 the index (tpm2_nvundefine {index:#x})"
            )),
            e => e,
        })?;
        self.counter_increment(index)?;
        self.counter_read(index)
    }

    /// Reads NV counter `index`.
    pub fn counter_read(&mut self, index: u32) -> Result<u64> {
        // Only a counter can be trusted never to go back: an ordinary index redefined at the
        // same handle could hold any value.
        let public = self.run("NV_ReadPublic", Cmd::new(0x169).handle(index))?;
        let nv = Rsp { b: &public, at: 0 }.b2()?;
        let attrs = nv.get(6..10).map(|a| u32::from_be_bytes([a[0], a[1], a[2], a[3]])).unwrap_or_default();
        if (attrs >> 4) & 0xF != 1 {
            return Err(Error::Tpm(format!(
                "NV index {index:#x} is not a counter (attributes {attrs:#x}); refusing it"
            )));
        }
        let r = self.run("NV_Read", Cmd::new(0x14E).handle(index).handle(index).pw(1).u16(8).u16(0))?;
        let v = Rsp { b: &r, at: 4 }.b2()?;
        Ok(u64::from_be_bytes(v.try_into().map_err(|_| Error::Tpm("NV counter is not 8 bytes".into()))?))
    }

    /// Increments NV counter `index`.
    pub fn counter_increment(&mut self, index: u32) -> Result<()> {
        self.run("NV_Increment", Cmd::new(0x134).handle(index).handle(index).pw(1)).map(drop)
    }

    /// Quotes `pcrs` (sha256 bank) with a fresh attestation key (ECC P-256, ECDSA-SHA256,
    /// the owner hierarchy's primary for that template): (the key's TPMT_PUBLIC, the
    /// TPMS_ATTEST, the TPMT_SIGNATURE).
    pub fn quote(&mut self, qualifying: &[u8; 32], pcrs: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let template = [
            &0x0023u16.to_be_bytes()[..],
            &ALG_SHA256.to_be_bytes(),
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
        let cmd = Cmd::new(0x131).handle(RH_OWNER).pw(1).raw(&[0, 4, 0, 0, 0, 0]).b2(&template).u16(0).u32(0);
        let r = self.run("CreatePrimary (attestation key)", cmd)?;
        let mut p = Rsp { b: &r, at: 0 };
        let ak = p.u32()?;
        p.u32()?;
        let public = p.b2()?.to_vec();
        let cmd = Cmd::new(0x158).handle(ak).pw(1).b2(qualifying).u16(ALG_NULL).pcrs(pcrs);
        let q = self.run("Quote", cmd);
        self.flush(ak);
        let q = q?;
        let mut p = params(&q, "Quote")?;
        let attest = p.b2()?.to_vec();
        let signature = p.b[p.at..].to_vec();
        Ok((public, attest, signature))
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
