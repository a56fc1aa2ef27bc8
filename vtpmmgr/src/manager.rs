//! The manager: the store opened with the root key the hardware TPM unsealed, kept in step
//! with the hardware counter. Starting a vTPM (LOADHASHKEY) reads memory only; saving one
//! (SAVEHASHKEY) commits the store, and the counter follows within its window
//! ([`CounterSchedule`]); every other update increments the counter at once.

use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use xvtpm_tis::{Family, HwTpm};

use crate::hw::tpm12::{SealInfo, Tpm12};
use crate::hw::tpm2::{Counter, Tpm2};
use crate::hw::Sealed;
use crate::migrate::{self, MigrationKey};
use crate::pace::{Anchor, Buckets, Clock, CounterSchedule, Rate};
use crate::store::dev::BlockDev;
use crate::store::record::{EXPORTED, HAS_KEY, IS_GROUP};
use crate::store::{self, CounterState, Purpose, Record, Store};
use crate::{hex, BootHash};
use crate::{uuid_str, Error, Result};

/// Largest hash-and-key blob a vTPM saves (Xen: 52 bytes, SHA-1 hash and AES-256 key; up to
/// 64).
pub const MAX_BLOB: usize = 64;
/// Smallest.
pub const MIN_BLOB: usize = 52;
/// TPM 1.2 owner, SRK and sealed-data auth: the well-known secret (20 zero bytes), as Xen's
/// manager defaults to. The root key's protection is the PCR and locality binding.
const WELL_KNOWN: [u8; 20] = [0; 20];

/// How a new store binds to the hardware TPM.
#[derive(Clone)]
pub struct InitConfig {
    /// PCRs the root key is sealed to.
    pub pcrs: Vec<u8>,
    /// The NV index of the anti-rollback counter (owner range 0x01800000-0x01BFFFFF).
    pub nv_index: u32,
    /// Locality of the manager's TPM commands.
    pub locality: u8,
    /// The TPM's owner auth, if the owner set one (TPM 2.0: its bytes; TPM 1.2: 20 bytes, or
    /// the SHA-1 of what is given, as tpm-tools hash a password). Used at init only.
    pub owner_auth: Vec<u8>,
    /// TPM 2.0: set the owner's auth to this at the end of init, so that only its holder can
    /// undefine the counter (and make primary keys under the owner hierarchy).
    pub new_owner_auth: Option<Vec<u8>>,
    /// TPM 2.0: keep the storage primary key at this persistent handle, so that starting needs
    /// no owner authorization. Chosen as [`DEFAULT_SRK_HANDLE`] whenever an owner auth is
    /// given or set.
    pub srk_handle: Option<u32>,
}

impl std::fmt::Debug for InitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the owner auths.
        f.debug_struct("InitConfig")
            .field("pcrs", &self.pcrs)
            .field("nv_index", &format_args!("{:#x}", self.nv_index))
            .field("locality", &self.locality)
            .field("srk_handle", &self.srk_handle)
            .finish_non_exhaustive()
    }
}

/// The TCG's persistent handle for the storage root key, whose ECC template ours is.
pub const DEFAULT_SRK_HANDLE: u32 = 0x8100_0001;

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            pcrs: (0..8).collect(),
            nv_index: 0x0181_584D,
            locality: 0,
            owner_auth: Vec::new(),
            new_owner_auth: None,
            srk_handle: None,
        }
    }
}

impl InitConfig {
    /// Where the storage primary key is kept (TPM 2.0), if anywhere.
    fn persistent_srk(&self) -> Option<u32> {
        let owner = !self.owner_auth.is_empty() || self.new_owner_auth.is_some();
        self.srk_handle.or(owner.then_some(DEFAULT_SRK_HANDLE))
    }
}

/// A TPM 1.2 owner auth from what an operator gives: 20 bytes as they are, else their SHA-1
/// (as tpm-tools hash a password), the empty one being the well-known secret.
fn owner_auth12(given: &[u8]) -> [u8; 20] {
    match given.len() {
        0 => WELL_KNOWN,
        20 => given.try_into().unwrap_or(WELL_KNOWN),
        _ => sha1::Sha1::digest(given).into(),
    }
}

/// Each vTPM's GET_QUOTE allowance by default: 4 at once, then one a second: plenty for
/// attestation, too little to starve others.
pub const QUOTE_RATE: Rate = Rate { burst: 4, interval: Duration::from_secs(1) };

/// What [`Manager::recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The counter value the store's newest root carried.
    pub store_counter: u64,
    /// The hardware counter's value, now in both roots.
    pub hw_counter: u64,
    /// The counter was gone or not the store's, and was defined again.
    pub redefined: bool,
    /// The store's roots were rewritten with the hardware counter's value.
    pub rebased: bool,
    /// vTPMs in the store (every node verified).
    pub vtpms: usize,
}

/// The manager.
pub struct Manager<D> {
    store: Store<D>,
    tpm: Box<dyn HwTpm + Send>,
    sealed: Sealed,
    /// The newest root is one ahead of the hardware counter: its increment is deferred (see
    /// `schedule`), or failed (`counter_uncertain`).
    counter_behind: bool,
    /// When the counter is incremented.
    schedule: CounterSchedule,
    /// Woken when an increment becomes owed (the thread that makes deferred increments).
    flusher: Option<std::thread::Thread>,
    /// The least counter value an [`Anchor::Now`] commit may carry: values below it may be
    /// carried by another copy of this store too (one a commit ahead of the counter when this
    /// store was opened), and restoring that copy would undo the update.
    now_floor: u64,
    clock: Clock,
    /// TPM 1.2: the counter's auth (sealed together with the root key).
    counter_auth: [u8; 20],
    /// TPM 2.0: the counter, with its Name and authValue.
    counter2: Option<Counter>,
    /// An increment failed: the TPM may or may not have executed it.
    counter_uncertain: bool,
    /// Why this manager stopped serving (the hardware counter moved under it): every vTPM
    /// request is refused with it until `vtpmmgr recover`.
    halted: Option<String>,
    /// The group numbers (an index of the group records, so provisioning does not scan the
    /// store).
    group_numbers: std::collections::BTreeSet<u32>,
    /// Per group, the boot hashes its vTPMs may run with (none: any). An index of the
    /// approval records.
    approved: std::collections::BTreeMap<u32, std::collections::BTreeSet<BootHash>>,
    /// TPM 1.2: the quote key, wrapped by the SRK, made at the first GET_QUOTE (RSA key
    /// generation takes the TPM up to seconds; loading the wrapped key takes milliseconds).
    quote_key12: Option<Vec<u8>>,
    /// Each vTPM's GET_QUOTE allowance: a quote holds the hardware TPM (and every other
    /// vTPM's command) for milliseconds to a second, so one vTPM must not loop on it.
    pub quotes: Buckets,
    /// Each vTPM's SAVEHASHKEY allowance (unlimited unless set): every save is a store commit,
    /// so one guest looping on NV writes must not own the manager's disk and time.
    pub saves: Buckets,
    /// Unknown vTPMs that save are provisioned into group 0 (Xen's behaviour; off by default).
    pub auto_provision: bool,
    /// Hardware TPM commands sent since the store was opened.
    pub tpm_commands: u64,
}

impl<D> std::fmt::Debug for Manager<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("store", &self.store).field("tpm", &self.tpm.describe()).finish_non_exhaustive()
    }
}

impl<D: BlockDev> Manager<D> {
    /// Creates a store on `dev`: a new random root key sealed to `cfg.pcrs`, and a new NV
    /// counter.
    pub fn init(mut dev: D, mut tpm: Box<dyn HwTpm + Send>, cfg: &InitConfig) -> Result<Self> {
        // Before any TPM work: a refused init leaves no NV index or counter behind.
        store::ensure_empty(&mut dev)?;
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        let family = tpm.family();
        let mut counter_auth = [0u8; 20];
        let mut counter2 = None;
        let (sealed, counter, commands) = match family {
            Family::Tpm20 => {
                let mut t = Tpm2::new(tpm.as_mut(), cfg.locality);
                t.startup()?;
                t.set_owner_auth(cfg.owner_auth.clone());
                if let Some(h) = cfg.persistent_srk() {
                    t.persist_primary(h)?;
                }
                let (private, public, creation) = t.seal(&key, &cfg.pcrs)?;
                let (c, counter) = t.counter_create(cfg.nv_index, &store::subkey(&key, Purpose::CounterAuth))?;
                counter2 = Some(c);
                let (ak_private, ak_public) = t.create_attestation_key(&store::subkey(&key, Purpose::AkAuth))?;
                if let Some(new) = &cfg.new_owner_auth {
                    t.change_owner_auth(new)?;
                    log::info!("the TPM's owner auth is set: only its holder can undefine the counter");
                }
                let s = Sealed {
                    family,
                    locality: cfg.locality,
                    pcrs: cfg.pcrs.clone(),
                    nv_index: cfg.nv_index,
                    private,
                    public,
                    creation,
                    primary_name: t.primary_name().unwrap_or_default().to_vec(),
                    counter_auth: true,
                    ak: Sealed::ak_from_parts(&ak_private, &ak_public),
                    srk_handle: cfg.persistent_srk().unwrap_or(0),
                };
                (s, counter, t.commands)
            }
            Family::Tpm12 => {
                if cfg.new_owner_auth.is_some() || cfg.srk_handle.is_some() {
                    return Err(Error::Tpm(
                        "on a TPM 1.2, the owner auth is set by taking ownership: give it with the owner auth \
                         file on a TPM without an owner (and no SRK handle: 1.2 has one SRK)"
                            .into(),
                    ));
                }
                let owner = owner_auth12(&cfg.owner_auth);
                let mut t = Tpm12::new(tpm.as_mut(), cfg.locality);
                t.startup()?;
                if !t.owned()? {
                    let which = if owner == WELL_KNOWN { "well-known" } else { "given" };
                    log::info!("taking ownership of the TPM 1.2 ({which} owner auth, well-known SRK auth)");
                    t.take_ownership(&owner, &WELL_KNOWN)?;
                }
                rand::thread_rng().fill_bytes(&mut counter_auth);
                let (id, counter) = t.counter_create(&owner, &counter_auth).map_err(|e| match e {
                    Error::TpmRc { rc: 1, .. } => {
                        Error::Tpm("the TPM 1.2 refused its owner auth: give the owner's with --owner-auth-file".into())
                    }
                    e => e,
                })?;
                let payload = [&key[..], &counter_auth].concat();
                // The SRK's public key, recorded: every seal and unseal of the root key runs in
                // a transport session encrypted to it.
                let srk_public = t.srk_public(&owner)?;
                let private = t.seal(&WELL_KNOWN, &WELL_KNOWN, &payload, &cfg.pcrs, Some(&srk_public))?;
                let mut ak_auth = [0u8; 20];
                ak_auth.copy_from_slice(&store::subkey(&key, Purpose::AkAuth)[12..]);
                log::info!("creating the deep quotes' signing key (RSA-2048, wrapped by the SRK)");
                let ak = t.create_signing_key(&WELL_KNOWN, &ak_auth)?;
                let s = Sealed {
                    family,
                    locality: cfg.locality,
                    pcrs: cfg.pcrs.clone(),
                    nv_index: id,
                    private,
                    public: Vec::new(),
                    creation: Vec::new(),
                    primary_name: srk_public,
                    counter_auth: true,
                    ak,
                    srk_handle: 0,
                };
                (s, counter, t.commands)
            }
        };
        let store = Store::create(dev, key, &sealed.encode(), counter)?;
        log::info!(
            "new store: root key sealed by a TPM {family} to PCRs {:?}, counter {:#x} at {counter}",
            cfg.pcrs,
            sealed.nv_index
        );
        let mut m = Self::assemble(store, tpm, sealed, counter_auth, false, commands);
        m.counter2 = counter2;
        Ok(m)
    }

    /// A manager over an opened store; everything else starts empty or at its default.
    fn assemble(
        store: Store<D>,
        tpm: Box<dyn HwTpm + Send>,
        sealed: Sealed,
        counter_auth: [u8; 20],
        counter_behind: bool,
        tpm_commands: u64,
    ) -> Self {
        Self {
            store,
            tpm,
            sealed,
            counter_behind,
            schedule: CounterSchedule::new(Duration::ZERO),
            flusher: None,
            now_floor: 0,
            clock: crate::pace::system_clock(),
            counter_auth,
            counter2: None,
            counter_uncertain: false,
            halted: None,
            group_numbers: [0].into(),
            approved: Default::default(),
            quote_key12: None,
            quotes: Buckets::new(QUOTE_RATE),
            saves: Buckets::new(Rate::UNLIMITED),
            auto_provision: false,
            tpm_commands,
        }
    }

    /// Opens the store on `dev`: the TPM unseals the root key (only with the PCR values it was
    /// sealed to), the counter is read, and the store must be in step with it.
    pub fn open(dev: D, tpm: Box<dyn HwTpm + Send>) -> Result<Self> {
        Self::open_checked(dev, tpm, None)
    }

    /// Like [`Manager::open`], but the store must be sealed to exactly `pcrs` at `locality`
    /// (the daemon's configuration): the sealed-key block is not authenticated before the
    /// unseal, so without this a store sealed to fewer PCRs would be accepted.
    pub fn open_expecting(dev: D, tpm: Box<dyn HwTpm + Send>, pcrs: &[u8], locality: u8) -> Result<Self> {
        Self::open_checked(dev, tpm, Some((pcrs, locality)))
    }

    /// Recovery after the manager refused its store over the hardware counter (a rollback
    /// refusal, a counter moved under a running manager, a counter undefined or redefined by
    /// the TPM's owner). The root key is unsealed as at every start and the whole tree
    /// verified; then the TPM's current counter value is accepted (a TPM 2.0 counter that is
    /// gone or no longer takes the store's authValue is defined again first) and both roots are
    /// rewritten with it. Operator-only: it needs the store's device, which a running manager
    /// holds. What it cannot tell is whether the store is an old copy: if it is, every update
    /// made after that copy is lost, and the vTPMs saved since then will not open (their state
    /// keys here are older); the warning says so.
    pub fn recover(
        mut dev: D,
        mut tpm: Box<dyn HwTpm + Send>,
        expect: Option<(&[u8], u8)>,
        owner_auth: &[u8],
    ) -> Result<Recovered> {
        let (sealed, key, _, _) = Self::unseal(&mut dev, tpm.as_mut(), expect)?;
        let mut store = Store::open_verified(dev, key)?;
        let idx = sealed.nv_index;
        let (hw, redefined) = match sealed.family {
            Family::Tpm20 => {
                let mut t = sealed.tpm2(tpm.as_mut());
                // Defining the counter again is the owner's to authorize.
                t.set_owner_auth(owner_auth.to_vec());
                let auth = Self::counter_auth2(&sealed, &key);
                match t.counter(idx, &auth).and_then(|c| t.counter_read(&c)) {
                    Ok(hw) => (hw, false),
                    Err(Error::CounterLost(why)) => {
                        log::warn!("{why}; defining counter {idx:#x} again");
                        if let Err(e) = t.nv_undefine(idx) {
                            log::info!("undefining {idx:#x}: {e}");
                        }
                        (t.counter_create(idx, &auth)?.1, true)
                    }
                    Err(e) => return Err(e),
                }
            }
            Family::Tpm12 => (Tpm12::new(tpm.as_mut(), sealed.locality).counter_read(idx)?, false),
        };
        let found = store.root().counter;
        // One ahead is a store whose last increment was still owed at the stop: the next start
        // makes it.
        let rebased = !(hw == found || found == hw + 1) || redefined;
        if !rebased {
            log::info!("the store ({found}) and the hardware counter ({hw}) are in step: nothing to recover");
        } else {
            log::warn!(
                "RECOVERY: the store's newest root was committed at counter {found}, the hardware counter {idx:#x} \
                 is at {hw}{}. Accepting it. If this store is an old copy put in place of the current one, every \
                 update made after that copy (saved vTPM state keys, provisioned, deleted or migrated vTPMs) is \
                 lost, and a vTPM saved since then will not open: its state key here is older than its state. \
                 If nobody restored a copy, something with access to the TPM changed the counter",
                if redefined { " (defined again)" } else { "" }
            );
            store.rebase_counter(hw)?;
        }
        let vtpms = store.list()?.iter().filter(|r| r.is_vtpm()).count();
        Ok(Recovered { store_counter: found, hw_counter: hw, redefined, rebased, vtpms })
    }

    /// Unseals the store's root key: (the sealed-key block, the root key, the TPM 1.2
    /// counter's auth, hardware commands spent).
    fn unseal(
        dev: &mut D,
        tpm: &mut dyn HwTpm,
        expect: Option<(&[u8], u8)>,
    ) -> Result<(Sealed, [u8; 32], [u8; 20], u64)> {
        let sealed = Sealed::decode(&store::read_sealed(dev)?)?;
        if let Some((pcrs, locality)) = expect {
            let mut want = pcrs.to_vec();
            want.sort_unstable();
            want.dedup();
            let mut have = sealed.pcrs.clone();
            have.sort_unstable();
            have.dedup();
            if want != have || locality != sealed.locality {
                return Err(Error::Tpm(format!(
                    "the store is sealed to PCRs {have:?} at locality {}, this manager expects PCRs {want:?} at locality {locality}",
                    sealed.locality
                )));
            }
        }
        if sealed.family != tpm.family() {
            return Err(Error::Tpm(format!(
                "the store was sealed by a TPM {}, this is a TPM {}",
                sealed.family,
                tpm.family()
            )));
        }
        let mut counter_auth = [0u8; 20];
        let (key, commands) = match sealed.family {
            Family::Tpm20 => {
                let mut t = sealed.tpm2(tpm);
                t.startup()?;
                if sealed.primary_name.is_empty() {
                    log::warn!(
                        "this store was made before the storage primary key's Name was recorded: the root key's \
                         unseal cannot tell the real TPM from something answering in its place"
                    );
                }
                let key = t.unseal(&sealed.private, &sealed.public, &sealed.creation, &sealed.pcrs)?;
                (key, t.commands)
            }
            Family::Tpm12 => {
                let mut t = Tpm12::new(tpm, sealed.locality);
                t.startup()?;
                let srk_public = (!sealed.primary_name.is_empty()).then_some(&sealed.primary_name[..]);
                if srk_public.is_none() {
                    log::warn!(
                        "this store was made before the SRK's public key was recorded: its root key is unsealed in \
                         the clear (no encrypted transport session)"
                    );
                }
                let payload = t.unseal(&WELL_KNOWN, &WELL_KNOWN, &sealed.private, srk_public)?;
                // The seal info is authenticated now: it must say this manager sealed it.
                SealInfo::parse(&sealed.private)?.check(sealed.locality, &sealed.pcrs)?;
                if payload.len() != 52 {
                    return Err(Error::Tpm(format!("unsealed {} bytes, expected 52", payload.len())));
                }
                let mut key = [0u8; 32];
                key.copy_from_slice(&payload[..32]);
                counter_auth.copy_from_slice(&payload[32..]);
                (key, t.commands)
            }
        };
        Ok((sealed, key, counter_auth, commands))
    }

    /// The TPM 2.0 counter's authValue for a store: from its root key, or empty (older stores).
    fn counter_auth2(sealed: &Sealed, key: &[u8; 32]) -> Vec<u8> {
        if sealed.counter_auth {
            return store::subkey(key, Purpose::CounterAuth).to_vec();
        }
        log::warn!(
            "the anti-rollback counter {:#x} of this store has no authValue (made by an older vtpmmgr): \
             anyone with access to the TPM can increment it, and the manager then stops until `vtpmmgr \
             recover`. Move the vTPMs to a store made by `vtpmmgr init` (`xvtpm vtpm export`/`import`) \
             to close that",
            sealed.nv_index
        );
        Vec::new()
    }

    fn open_checked(mut dev: D, mut tpm: Box<dyn HwTpm + Send>, expect: Option<(&[u8], u8)>) -> Result<Self> {
        let (sealed, key, counter_auth, mut commands) = Self::unseal(&mut dev, tpm.as_mut(), expect)?;
        let (counter2, hw) = match sealed.family {
            Family::Tpm20 => {
                let mut t = sealed.tpm2(tpm.as_mut());
                let r = t.counter(sealed.nv_index, &Self::counter_auth2(&sealed, &key)).and_then(|c| {
                    let hw = t.counter_read(&c)?;
                    Ok((c, hw))
                });
                commands += t.commands;
                let (c, hw) = r?;
                (Some(c), hw)
            }
            Family::Tpm12 => {
                let mut t = Tpm12::new(tpm.as_mut(), sealed.locality);
                let hw = t.counter_read(sealed.nv_index);
                commands += t.commands;
                (None, hw?)
            }
        };
        let (store, state) = Store::open(dev, key, hw)?;
        let mut m = Self::assemble(store, tpm, sealed, counter_auth, state == CounterState::Behind, commands);
        m.counter2 = counter2;
        // A copy of this store one commit ahead of `hw` may exist (taken while an increment was
        // owed); this store's own next value may equal it.
        m.now_floor = hw + 2;
        for r in m.store.list()? {
            if r.is_group() {
                m.group_numbers.insert(r.group);
            } else if r.is_approval() {
                m.approved.entry(r.group).or_default().insert(r.hash);
            }
        }
        if m.counter_behind {
            log::warn!("the last commit before the stop did not reach the hardware counter; catching up");
            m.catch_up()?;
        }
        log::info!("store open: {} vTPMs, counter at {}", m.store.len(), m.store.root().counter);
        Ok(m)
    }

    /// Brings the hardware counter to the newest root's value and reads it back (TPM 2.0: an
    /// HMAC-checked NV_Read; TPM 1.2: the value IncrementCounter's authenticated response
    /// carries). After an increment whose outcome is unknown (an error: the TPM may have
    /// executed it), the counter is read first, so a retry never overshoots: a counter ahead of
    /// the store would refuse the store at the next start. A counter found anywhere but where
    /// this manager put it halts the manager ([`Manager::halted`]).
    fn catch_up(&mut self) -> Result<()> {
        let target = self.store.root().counter;
        let (idx, loc, auth) = (self.sealed.nv_index, self.sealed.locality, self.counter_auth);
        let uncertain = self.counter_uncertain;
        let (r, n) = match self.sealed.family {
            Family::Tpm20 => {
                let mut c = self.counter2.clone().ok_or_else(|| Error::Tpm("no counter".into()))?;
                let mut t = self.sealed.tpm2(self.tpm.as_mut());
                let r = (|| {
                    let hw = if uncertain { t.counter_read(&c)? } else { target - 1 };
                    t.counter_bump(&mut c, target.saturating_sub(hw))
                })();
                let n = t.commands;
                self.counter2 = Some(c);
                (r, n)
            }
            Family::Tpm12 => {
                let mut t = Tpm12::new(self.tpm.as_mut(), loc);
                let r = (|| {
                    let mut hw = if uncertain { t.counter_read(idx)? } else { target - 1 };
                    while hw < target {
                        hw = t.counter_increment(idx, &auth)?;
                    }
                    Ok(hw)
                })();
                (r, t.commands)
            }
        };
        self.tpm_commands += n;
        let now = (self.clock)();
        match r {
            Ok(hw) if hw == target => {
                self.counter_behind = false;
                self.counter_uncertain = false;
                self.store.set_counter_pending(false);
                self.schedule.incremented(now);
                Ok(())
            }
            Ok(hw) => {
                self.counter_uncertain = true;
                Err(self.halt(hw))
            }
            Err(Error::CounterLost(why)) => {
                self.counter_uncertain = true;
                Err(self.halt_because(why))
            }
            Err(e) => {
                self.counter_uncertain = true;
                self.schedule.failed(now);
                self.wake_flusher();
                Err(e)
            }
        }
    }

    /// Stops serving: the hardware counter is at `hw`, not where this manager put it.
    fn halt(&mut self, hw: u64) -> Error {
        let why = format!(
            "the hardware counter {:#x} is at {hw}, the store's newest root at {}: something else changed it",
            self.sealed.nv_index,
            self.store.root().counter
        );
        self.halt_because(why)
    }

    fn halt_because(&mut self, why: String) -> Error {
        let why = format!(
            "{why}. This manager stopped serving; stop it and run `vtpmmgr recover` (docs/dom0.md, \
             \"Recovering the store\")"
        );
        log::error!("{why}");
        self.halted = Some(why.clone());
        self.schedule.clear();
        Error::Halted(why)
    }

    /// Why this manager stopped serving, if it did: the hardware counter moved under it.
    /// vTPM requests and updates are refused from then on; listing still works.
    pub fn halted(&self) -> Option<&str> {
        self.halted.as_deref()
    }

    fn serving(&self) -> Result<()> {
        self.halted.as_ref().map_or(Ok(()), |why| Err(Error::Halted(why.clone())))
    }

    /// Reads the hardware counter before a commit: it must be where this manager left it (one
    /// below the newest root while an increment is deferred).
    fn check_counter(&mut self) -> Result<()> {
        let expected = self.store.root().counter - u64::from(self.counter_behind);
        let loc = self.sealed.locality;
        let (hw, n) = match (&self.counter2, self.sealed.family) {
            (Some(c), Family::Tpm20) => {
                let mut t = self.sealed.tpm2(self.tpm.as_mut());
                (t.counter_read(c), t.commands)
            }
            _ => {
                let mut t = Tpm12::new(self.tpm.as_mut(), loc);
                (t.counter_read(self.sealed.nv_index), t.commands)
            }
        };
        self.tpm_commands += n;
        match hw {
            Ok(hw) if hw == expected => Ok(()),
            Ok(hw) => Err(self.halt(hw)),
            Err(Error::CounterLost(why)) => Err(self.halt_because(why)),
            Err(e) => Err(e),
        }
    }

    /// Commits through `f`, its counter increment made at once.
    fn commit(&mut self, f: impl FnOnce(&mut Store<D>) -> Result<Option<store::Commit>>) -> Result<()> {
        self.commit_anchored(Anchor::Now, f)
    }

    /// Commits through `f`, keeping the hardware counter in step: the counter is read first
    /// (it must be where this manager left it), a counter left uncertain by a failed increment
    /// is caught up first, or nothing is written. The increment follows at once, or, for
    /// [`Anchor::Batched`] within the counter's window, when [`Manager::flush_counter`] finds
    /// it due (or the next [`Anchor::Now`] commit makes it).
    fn commit_anchored(
        &mut self,
        anchor: Anchor,
        f: impl FnOnce(&mut Store<D>) -> Result<Option<store::Commit>>,
    ) -> Result<()> {
        self.serving()?;
        // An update that must not be undone by a copy of the store is never made under the
        // counter value deferred saves share: that value goes into the hardware first.
        if self.counter_uncertain || (anchor == Anchor::Now && self.counter_behind) {
            self.catch_up()?;
        } else {
            self.check_counter()?;
        }
        if anchor == Anchor::Now && self.store.root().counter + 1 < self.now_floor {
            // Step past the value another copy may carry: an unchanged root under it, then its
            // increment (each step leaves a store one ahead of the counter at most).
            self.store.rebase_counter(self.store.root().counter + 1)?;
            self.counter_behind = true;
            self.catch_up()?;
        }
        if f(&mut self.store)?.is_some() {
            // Durable now; the counter follows. If that fails, the next commit (or the flusher)
            // retries first.
            self.counter_behind = true;
            if self.schedule.defer(anchor, (self.clock)()) {
                // Until the increment, commits keep this root's counter value.
                self.store.set_counter_pending(true);
                self.wake_flusher();
                return Ok(());
            }
            match self.catch_up() {
                Err(e @ Error::Halted(_)) => return Err(e),
                Err(e) => {
                    log::error!("incrementing the anti-rollback counter failed: {e}; will retry before the next update")
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// The record of `uuid`.
    pub fn record(&self, uuid: &[u8; 16]) -> Result<Option<Record>> {
        self.store.get(uuid)
    }

    /// Groups: (number, uuid, vTPMs in it). Group 0 always exists (its uuid is all zeros).
    pub fn groups(&self) -> Result<Vec<(u32, [u8; 16], usize)>> {
        let all = self.store.list()?;
        let count = |g: u32| all.iter().filter(|r| r.is_vtpm() && r.group == g).count();
        let mut out = vec![(0, [0u8; 16], count(0))];
        out.extend(all.iter().filter(|r| r.is_group()).map(|r| (r.group, r.uuid, count(r.group))));
        out.sort_by_key(|g| g.0);
        Ok(out)
    }

    /// Creates a group: its number and uuid.
    pub fn new_group(&mut self) -> Result<(u32, [u8; 16])> {
        let next = self.group_numbers.last().copied().unwrap_or(0) + 1;
        let uuid = xvtpm_proto::Uuid::from_random(rand::random()).0;
        let mut rec = Record::new(uuid, next);
        rec.flags = IS_GROUP;
        self.commit(|s| s.put(&rec).map(Some))?;
        self.group_numbers.insert(next);
        Ok((next, uuid))
    }

    /// Deletes an empty group (not group 0).
    pub fn delete_group(&mut self, group: u32) -> Result<()> {
        let g = self.groups()?.into_iter().find(|g| g.0 == group);
        match g {
            None => Err(Error::NotFound(format!("group {group}"))),
            Some((0, ..)) => Err(Error::Protocol("group 0 cannot be deleted".into())),
            Some((_, _, n)) if n > 0 => Err(Error::Protocol(format!("group {group} still holds {n} vTPMs"))),
            Some((_, uuid, _)) => {
                // Its approvals first: a crash in between leaves a group with fewer approvals,
                // never approvals that a later group of the same number would inherit.
                for h in self.approved.get(&group).cloned().unwrap_or_default() {
                    self.revoke(group, &h)?;
                }
                self.commit(|s| s.delete(&uuid))?;
                self.group_numbers.remove(&group);
                Ok(())
            }
        }
    }

    /// Provisions a vTPM in `group`; `token`, if given, lets Unix-socket clients act for it.
    pub fn provision(&mut self, uuid: [u8; 16], group: u32, token: Option<&[u8]>) -> Result<()> {
        if self.store.get(&uuid)?.is_some() {
            return Err(Error::Exists(format!("vTPM {} is already provisioned", uuid_str(&uuid))));
        }
        if !self.group_numbers.contains(&group) {
            return Err(Error::NotFound(format!("group {group}")));
        }
        let mut rec = Record::new(uuid, group);
        if let Some(t) = token {
            rec.token = Sha256::digest(t).into();
        }
        self.commit(|s| s.put(&rec).map(Some))
    }

    /// Removes a vTPM and its key.
    pub fn delete(&mut self, uuid: &[u8; 16]) -> Result<bool> {
        if self.vtpm(uuid)?.is_none() {
            return Ok(false);
        }
        let mut found = false;
        self.commit(|s| {
            let c = s.delete(uuid)?;
            found = c.is_some();
            Ok(c)
        })?;
        // The uid its clients ran as goes with it: a vTPM provisioned anew starts unbound.
        // (Each store update is a commit of its own, with its own counter increment.)
        let binding = Record::uid_binding(uuid, 0).uuid;
        if self.store.get(&binding)?.is_some() {
            self.commit(|s| s.delete(&binding))?;
        }
        Ok(found)
    }

    /// Binds vTPM `uuid`'s socket clients to `uid` (the operator's choice, replacing what the
    /// first BIND recorded), or clears the binding so the next BIND records one: the way out
    /// for a vTPM bound to the wrong uid, which would otherwise be refused for good.
    pub fn set_uid(&mut self, uuid: &[u8; 16], uid: Option<u32>) -> Result<()> {
        self.vtpm(uuid)?.ok_or_else(|| Error::UnknownVtpm(uuid_str(uuid)))?;
        let rec = Record::uid_binding(uuid, uid.unwrap_or(0));
        let current = self.store.get(&rec.uuid)?;
        match uid {
            Some(u) if current.as_ref().map(|r| r.group) != Some(u) => self.commit(|s| s.put(&rec).map(Some))?,
            Some(_) => {}
            None if current.is_some() => self.commit(|s| s.delete(&rec.uuid))?,
            None => {}
        }
        log::info!(
            "vTPM {}: socket clients bound to {} by the operator",
            uuid_str(uuid),
            match uid {
                Some(u) => format!("uid {u}"),
                None => "the uid of the next BIND".to_string(),
            }
        );
        Ok(())
    }

    /// Whether socket clients running as `uid` may act for vTPM `uuid`: its first BIND
    /// records the uid it came from (one commit, once); later BINDs must come from that uid.
    /// Deleting the vTPM drops the binding.
    pub fn bind_uid(&mut self, uuid: &[u8; 16], uid: u32) -> Result<()> {
        let rec = Record::uid_binding(uuid, uid);
        match self.store.get(&rec.uuid)? {
            Some(r) if r.group == uid => Ok(()),
            Some(r) => Err(Error::NotAuthorized(format!(
                "vTPM {} is bound to clients running as uid {}; this one runs as uid {uid}",
                uuid_str(uuid),
                r.group
            ))),
            None => {
                self.commit(|s| s.put(&rec).map(Some))?;
                log::info!("vTPM {}: bound to socket clients running as uid {uid} (its first BIND)", uuid_str(uuid));
                Ok(())
            }
        }
    }

    /// Every vTPM.
    pub fn list(&self) -> Result<Vec<Record>> {
        Ok(self.store.list()?.into_iter().filter(Record::is_vtpm).collect())
    }

    /// This manager's migration keys: derived from the store's root key, so they are as bound
    /// to the hardware TPM as the store is.
    pub fn migration_key(&self) -> MigrationKey {
        MigrationKey::from_seeds(
            self.store.derive_key(b"xvtpm-migration-key"),
            self.store.subkey(Purpose::MigrationSigning),
        )
    }

    /// Exports vTPM `uuid` to the manager whose migration identity is `to`: the bundle,
    /// signed by this manager, under a fresh export id. From then on the vTPM is frozen here
    /// (its key is refused) until it is deleted, or imported back: two managers never both
    /// hand out one vTPM's key. A vTPM exported already goes again only to the same manager
    /// (a lost bundle), unless `force` (that bundle is gone for good).
    pub fn export(&mut self, uuid: &[u8; 16], to: &[u8], force: bool) -> Result<Vec<u8>> {
        let mut rec = self.vtpm(uuid)?.ok_or_else(|| Error::UnknownVtpm(uuid_str(uuid)))?;
        let dest = Record::export_destination(uuid, to);
        if rec.is_exported() && !force {
            match self.store.get(&dest.uuid)? {
                Some(d) if d.hash == dest.hash => {}
                _ => {
                    return Err(Error::Exists(format!(
                        "vTPM {} was exported to another manager already; a second copy would run there \
                         too. Export it to that manager again, or, if its bundle is lost for good, with --force",
                        uuid_str(uuid)
                    )))
                }
            }
        }
        let bundle = self.migration_key().seal(to, &rec)?;
        if !rec.is_exported() {
            rec.flags |= EXPORTED;
            self.commit(|s| s.put(&rec).map(Some))?;
        }
        if self.store.get(&dest.uuid)?.as_ref() != Some(&dest) {
            self.commit(|s| s.put(&dest).map(Some))?;
        }
        log::info!("vTPM {} exported; frozen here until deleted or imported back", uuid_str(uuid));
        Ok(bundle)
    }

    /// Imports a bundle made for this manager's migration key into `group`; the vTPM's uuid.
    /// Only bundles signed by a pinned source ([`Manager::trust_source`]) or by this manager
    /// are taken, each export once. A vTPM this manager has is refused, unless it was exported from here (it
    /// comes back).
    pub fn import(&mut self, bundle: &[u8], group: u32) -> Result<[u8; 16]> {
        let me = self.migration_key();
        let opened = me.open(bundle)?;
        let trusted = Record::trusted_source(&opened.source);
        // Its own bundles (a vTPM coming back) need no pin.
        let own = opened.source == me.public();
        if !own && self.store.get(&trusted.uuid)?.is_none_or(|r| r.hash != trusted.hash) {
            return Err(Error::NotAuthorized(format!(
                "the bundle comes from a manager whose migration key is not pinned here (`xvtpm vtpm trust-source \
                 {}` if it is the source you expect)",
                crate::hex(&opened.source)
            )));
        }
        let seen = Record::seen_export(&opened.id);
        if self.store.get(&seen.uuid)?.is_some() {
            return Err(Error::Exists(format!(
                "this bundle of vTPM {} was imported here before: a replay (export it again for a new import)",
                uuid_str(&opened.record.uuid)
            )));
        }
        if !self.group_numbers.contains(&group) {
            return Err(Error::NotFound(format!("group {group}")));
        }
        let m = opened.record;
        match self.store.get(&m.uuid)? {
            Some(r) if r.is_vtpm() && r.is_exported() => {
                log::info!("vTPM {} comes back (it was exported from here)", uuid_str(&m.uuid));
            }
            Some(_) => return Err(Error::Exists(format!("vTPM {} is already provisioned here", uuid_str(&m.uuid)))),
            None => {}
        }
        let rec = Record { group, ..m };
        self.commit(|s| s.put(&rec).map(Some))?;
        // After the import: a crash between the two leaves the vTPM here, which refuses the
        // bundle again as "already provisioned".
        self.commit(|s| s.put(&seen).map(Some))?;
        log::info!("vTPM {} imported into group {group}", uuid_str(&rec.uuid));
        Ok(rec.uuid)
    }

    /// Pins the source manager whose migration identity is `identity`: bundles it signs are
    /// imported. `false`: pinned already.
    pub fn trust_source(&mut self, identity: &[u8]) -> Result<bool> {
        migrate::check_public(identity)?;
        let rec = Record::trusted_source(identity);
        if self.store.get(&rec.uuid)?.is_some() {
            return Ok(false);
        }
        self.commit(|s| s.put(&rec).map(Some))?;
        log::info!("migration source {} pinned", crate::hex(&identity[..8]));
        Ok(true)
    }

    /// Unpins a source manager. `false`: it was not pinned.
    pub fn distrust_source(&mut self, identity: &[u8]) -> Result<bool> {
        migrate::check_public(identity)?;
        let rec = Record::trusted_source(identity);
        let mut found = false;
        self.commit(|s| {
            let c = s.delete(&rec.uuid)?;
            found = c.is_some();
            Ok(c)
        })?;
        Ok(found)
    }

    /// The record of vTPM `uuid` if it may run here: known, and not exported.
    fn live_vtpm(&self, uuid: &[u8; 16]) -> Result<Record> {
        self.vtpm(uuid)?.ok_or_else(|| Error::UnknownVtpm(uuid_str(uuid))).and_then(Self::live)
    }

    /// `rec`, unless it was exported (then it is frozen here).
    fn live(rec: Record) -> Result<Record> {
        match rec.is_exported() {
            true => Err(Error::NotAuthorized(format!(
                "vTPM {} was exported to another manager and is frozen here (delete it, or import it back)",
                uuid_str(&rec.uuid)
            ))),
            false => Ok(rec),
        }
    }

    /// The record of vTPM `uuid` (a group's uuid is no vTPM).
    pub fn vtpm(&self, uuid: &[u8; 16]) -> Result<Option<Record>> {
        Ok(self.store.get(uuid)?.filter(Record::is_vtpm))
    }

    /// Approves `boot_hash` for the vTPMs of `group`: once a group has approvals, its vTPMs
    /// must run with one of them (Xen's list of approved vTPM kernels). `false`: it was
    /// approved already.
    pub fn approve(&mut self, group: u32, boot_hash: &BootHash) -> Result<bool> {
        self.require_group(group)?;
        if self.approved.get(&group).is_some_and(|s| s.contains(boot_hash)) {
            return Ok(false);
        }
        let rec = Record::approval(group, boot_hash);
        self.commit(|s| s.put(&rec).map(Some))?;
        self.approved.entry(group).or_default().insert(*boot_hash);
        log::info!("group {group}: boot hash {} approved", hex(boot_hash));
        Ok(true)
    }

    /// Withdraws an approval; `false`: it was not approved. Removing the last one lets the
    /// group's vTPMs run with any boot hash again.
    pub fn revoke(&mut self, group: u32, boot_hash: &BootHash) -> Result<bool> {
        self.require_group(group)?;
        if !self.approved.get(&group).is_some_and(|s| s.contains(boot_hash)) {
            return Ok(false);
        }
        let uuid = Record::approval(group, boot_hash).uuid;
        self.commit(|s| s.delete(&uuid))?;
        if let Some(set) = self.approved.get_mut(&group) {
            set.remove(boot_hash);
            if set.is_empty() {
                self.approved.remove(&group);
            }
        }
        log::info!("group {group}: boot hash {} no longer approved", hex(boot_hash));
        Ok(true)
    }

    /// The boot hashes approved for `group` (empty: any is accepted).
    pub fn approved(&self, group: u32) -> Result<Vec<BootHash>> {
        self.require_group(group)?;
        Ok(self.approved.get(&group).map(|s| s.iter().copied().collect()).unwrap_or_default())
    }

    fn require_group(&self, group: u32) -> Result<()> {
        match self.group_numbers.contains(&group) {
            true => Ok(()),
            false => Err(Error::NotFound(format!("group {group}"))),
        }
    }

    /// Whether vTPM `uuid`, measured as `boot_hash` by its transport (`None`: it could not be
    /// measured), may use its record: its group (group 0 for a vTPM not provisioned yet) has
    /// no approvals, or approves this hash. Checked at every SAVEHASHKEY, LOADHASHKEY and
    /// GET_QUOTE, like Xen's check of the vTPM's kernel against its group.
    pub fn check_boot(&self, uuid: &[u8; 16], boot_hash: Option<&BootHash>) -> Result<()> {
        // No approvals anywhere (the usual case): no record lookup on the vTPMs' path.
        if self.approved.is_empty() {
            return Ok(());
        }
        let group = self.vtpm(uuid)?.map(|r| r.group).unwrap_or(0);
        let Some(ok) = self.approved.get(&group) else { return Ok(()) };
        match boot_hash {
            Some(h) if ok.contains(h) => Ok(()),
            Some(h) => Err(Error::NotAuthorized(format!(
                "vTPM {} runs with boot hash {}, which group {group} has not approved",
                uuid_str(uuid),
                hex(h)
            ))),
            None => Err(Error::NotAuthorized(format!(
                "vTPM {} could not be measured, and group {group} accepts only approved boot hashes",
                uuid_str(uuid)
            ))),
        }
    }

    /// Checks a Unix-socket client's token for `uuid`.
    pub fn authorize(&self, uuid: &[u8; 16], token: &[u8]) -> Result<()> {
        self.authorize_digest(uuid, &Sha256::digest(token).into())
    }

    /// Checks the SHA-256 of a Unix-socket client's token for `uuid`.
    pub fn authorize_digest(&self, uuid: &[u8; 16], digest: &[u8; 32]) -> Result<()> {
        let rec = self.vtpm(uuid)?.ok_or_else(|| Error::UnknownVtpm(uuid_str(uuid)))?;
        if rec.token == [0; 32] || rec.token != *digest {
            return Err(Error::NotAuthorized(format!("wrong token for vTPM {}", uuid_str(uuid))));
        }
        Ok(())
    }

    /// SAVEHASHKEY: stores the hash and key of the vTPM's newly written state.
    pub fn save(&mut self, uuid: &[u8; 16], blob: &[u8]) -> Result<()> {
        if !(MIN_BLOB..=MAX_BLOB).contains(&blob.len()) {
            return Err(Error::Protocol(format!("SAVEHASHKEY of {} bytes (52 to 64 expected)", blob.len())));
        }
        // An auto-provisioning save is a provisioning: anchored at once.
        let (mut rec, anchor) = match self.vtpm(uuid)? {
            Some(r) => (Self::live(r)?, Anchor::Batched),
            // A group's uuid is never a vTPM, not even an auto-provisioned one.
            None if self.auto_provision && self.store.get(uuid)?.is_none() => {
                log::info!("auto-provisioning vTPM {} in group 0", uuid_str(uuid));
                (Record::new(*uuid, 0), Anchor::Now)
            }
            None => return Err(Error::UnknownVtpm(uuid_str(uuid))),
        };
        let mut full = [0u8; MAX_BLOB];
        full[..blob.len()].copy_from_slice(blob);
        rec.hash.copy_from_slice(&full[..32]);
        rec.key.copy_from_slice(&full[32..]);
        rec.flags = HAS_KEY | (blob.len() as u32) << 8;
        self.saves.spend(uuid, (self.clock)(), "SAVEHASHKEY")?;
        self.commit_anchored(anchor, |s| s.put(&rec).map(Some))
    }

    /// LOADHASHKEY: the hash and key last saved for the vTPM. No hardware TPM command.
    pub fn load(&self, uuid: &[u8; 16]) -> Result<Vec<u8>> {
        self.serving()?;
        let rec = self.live_vtpm(uuid)?;
        if !rec.has_key() {
            return Err(Error::NoSavedState(uuid_str(uuid)));
        }
        let len = ((rec.flags >> 8) as usize).clamp(MIN_BLOB, MAX_BLOB);
        Ok([&rec.hash[..], &rec.key[..]].concat()[..len].to_vec())
    }

    /// GET_QUOTE: a hardware quote of `pcrs` whose qualifying data binds the calling vTPM's
    /// uuid, its boot hash (zeros when it could not be measured) and its `nonce`:
    /// q = SHA-256("xvtpm-deep-quote" ‖ uuid ‖ boot hash ‖ nonce). Three parts, each with a
    /// u16 length:
    /// - TPM 2.0: the attestation key's TPMT_PUBLIC (ECC P-256), the TPMS_ATTEST (extraData
    ///   = q, sha256 bank) and the TPMT_SIGNATURE (ECDSA-SHA256);
    /// - TPM 1.2: the signing key's TPM_PUBKEY (RSA-2048), the TPM_QUOTE_INFO (externalData =
    ///   the first 20 bytes of q) and the PKCS#1 v1.5 SHA-1 signature over it.
    pub fn quote(
        &mut self,
        uuid: &[u8; 16],
        boot_hash: Option<&BootHash>,
        nonce: &[u8],
        pcrs: &[u8],
    ) -> Result<Vec<u8>> {
        self.serving()?;
        self.live_vtpm(uuid)?;
        self.quotes.spend(uuid, (self.clock)(), "GET_QUOTE")?;
        let q: [u8; 32] = Sha256::new()
            .chain_update(b"xvtpm-deep-quote")
            .chain_update(uuid)
            .chain_update(boot_hash.unwrap_or(&[0; 32]))
            .chain_update(nonce)
            .finalize()
            .into();
        let parts = match self.sealed.family {
            Family::Tpm20 => {
                let auth = self.store.subkey(Purpose::AkAuth);
                let ak = self.sealed.ak_parts().ok_or_else(|| {
                    Error::Tpm(
                        "this store has no attestation key (made by an earlier build): quotes need a new store".into(),
                    )
                })?;
                let mut t = self.sealed.tpm2(self.tpm.as_mut());
                let r = t.quote(&q, pcrs, ak, &auth);
                self.tpm_commands += t.commands;
                let (public, attest, sig) = r?;
                [public, attest, sig]
            }
            Family::Tpm12 => self.quote12(&q, pcrs)?,
        };
        let mut out = Vec::new();
        for part in &parts {
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    /// TPM 1.2 quote: loads the quote key (made on first use), quotes, unloads it.
    fn quote12(&mut self, q: &[u8; 32], pcrs: &[u8]) -> Result<[Vec<u8>; 3]> {
        let mut external = [0u8; 20];
        external.copy_from_slice(&q[..20]);
        let auth = if self.sealed.ak.is_empty() { WELL_KNOWN } else { self.quote_auth12() };
        let mut t = Tpm12::new(self.tpm.as_mut(), self.sealed.locality);
        let r = (|| {
            let wrapped = match (&self.quote_key12, self.sealed.ak.is_empty()) {
                (_, false) => self.sealed.ak.clone(),
                (Some(k), true) => k.clone(),
                (None, true) => {
                    // A store made before the quote key was: one per run, with the well-known
                    // usage auth (as it was).
                    log::info!("creating the TPM 1.2 quote key (RSA-2048, wrapped by the SRK)");
                    let k = t.create_signing_key(&WELL_KNOWN, &WELL_KNOWN)?;
                    self.quote_key12 = Some(k.clone());
                    k
                }
            };
            let public = crate::hw::tpm12::public_key_of(&wrapped)?;
            let handle = t.load_key(&WELL_KNOWN, &wrapped)?;
            let quoted = t.quote(handle, &auth, &external, pcrs);
            if let Err(e) = t.flush_key(handle) {
                log::warn!("cannot unload the quote key {handle:#x}: {e}");
            }
            let (composite, sig) = quoted?;
            Ok([public, crate::hw::tpm12::quote_info(&composite, &external), sig])
        })();
        self.tpm_commands += t.commands;
        r
    }

    /// The TPM 1.2 quote key's usage auth: from the root key, so only this manager can use
    /// the key.
    fn quote_auth12(&self) -> [u8; 20] {
        let mut a = [0u8; 20];
        a.copy_from_slice(&self.store.subkey(Purpose::AkAuth)[12..]);
        a
    }

    /// The public part of the key that signs deep quotes, for verifiers to register: TPM 2.0,
    /// the attestation key's TPMT_PUBLIC; TPM 1.2, the quote key's TPM_PUBKEY.
    pub fn attestation_public(&mut self) -> Result<Vec<u8>> {
        match self.sealed.family {
            Family::Tpm20 => match self.sealed.ak_parts() {
                Some((_, public)) => Ok(public.to_vec()),
                None => Err(Error::Tpm("this store has no attestation key (made by an earlier build)".into())),
            },
            Family::Tpm12 if self.sealed.ak.is_empty() => Err(Error::Tpm(
                "this store was made before TPM 1.2 stores kept a quote key: each run makes its own".into(),
            )),
            Family::Tpm12 => crate::hw::tpm12::public_key_of(&self.sealed.ak),
        }
    }

    /// The store (benchmarks read its root).
    pub fn store(&self) -> &Store<D> {
        &self.store
    }

    /// Lets vTPM state saves share one counter increment per `window` (zero, the default: one
    /// increment per save). Every other update still increments at once.
    pub fn set_counter_window(&mut self, window: Duration) {
        self.schedule.window = window;
    }

    /// Replaces the clock the rates and the counter's window are measured with.
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// The thread to wake when an increment becomes owed (it calls
    /// [`Manager::flush_counter`] at [`Manager::counter_due`]).
    pub fn wake_on_owed_increment(&mut self, thread: std::thread::Thread) {
        self.flusher = Some(thread);
    }

    /// When a deferred counter increment is due, if one is owed.
    pub fn counter_due(&self) -> Option<Instant> {
        self.schedule.due()
    }

    /// How long until the owed counter increment is due, on this manager's clock.
    pub fn counter_wait(&self) -> Option<Duration> {
        self.schedule.due().map(|due| due.saturating_duration_since((self.clock)()))
    }

    fn wake_flusher(&self) {
        if let Some(t) = &self.flusher {
            t.unpark();
        }
    }

    /// Makes the owed counter increment if it is due, or at once with `now`. Nothing happens
    /// when none is owed.
    pub fn flush_counter(&mut self, now: bool) -> Result<()> {
        if self.halted.is_some() || !self.counter_behind {
            self.schedule.clear();
            return Ok(());
        }
        match self.schedule.due() {
            Some(due) if now || (self.clock)() >= due => self.catch_up(),
            None if now => self.catch_up(),
            _ => Ok(()),
        }
    }
}

/// The manager as the protocol dispatcher sees it.
impl<D: BlockDev> crate::dispatch::Service for Manager<D> {
    fn authorize(&self, uuid: &[u8; 16], token: &[u8]) -> Result<()> {
        Manager::authorize(self, uuid, token)
    }
    fn authorize_digest(&self, uuid: &[u8; 16], digest: &[u8; 32]) -> Result<()> {
        Manager::authorize_digest(self, uuid, digest)
    }
    fn bind_uid(&mut self, uuid: &[u8; 16], uid: u32) -> Result<()> {
        Manager::bind_uid(self, uuid, uid)
    }
    fn set_uid(&mut self, uuid: &[u8; 16], uid: Option<u32>) -> Result<()> {
        Manager::set_uid(self, uuid, uid)
    }
    fn check_boot(&self, uuid: &[u8; 16], boot: Option<&BootHash>) -> Result<()> {
        Manager::check_boot(self, uuid, boot)
    }
    fn save(&mut self, uuid: &[u8; 16], blob: &[u8]) -> Result<()> {
        Manager::save(self, uuid, blob)
    }
    fn load(&self, uuid: &[u8; 16]) -> Result<Vec<u8>> {
        Manager::load(self, uuid)
    }
    fn quote(&mut self, uuid: &[u8; 16], boot: Option<&BootHash>, nonce: &[u8], pcrs: &[u8]) -> Result<Vec<u8>> {
        Manager::quote(self, uuid, boot, nonce, pcrs)
    }
    fn provision(&mut self, uuid: [u8; 16], group: u32, token: Option<&[u8]>) -> Result<()> {
        Manager::provision(self, uuid, group, token)
    }
    fn show(&self, uuid: &[u8; 16]) -> Result<Option<xvtpm_proto::mgr::VtpmShow>> {
        Ok(self.vtpm(uuid)?.map(|r| xvtpm_proto::mgr::VtpmShow {
            group: r.group,
            has_key: r.has_key(),
            exported: r.is_exported(),
        }))
    }
    fn delete(&mut self, uuid: &[u8; 16]) -> Result<bool> {
        Manager::delete(self, uuid)
    }
    fn vtpms_of(&self, group: u32) -> Result<Vec<[u8; 16]>> {
        Ok(self.list()?.into_iter().filter(|r| r.group == group).map(|r| r.uuid).collect())
    }
    fn groups(&self) -> Result<Vec<(u32, [u8; 16], usize)>> {
        Manager::groups(self)
    }
    fn new_group(&mut self) -> Result<(u32, [u8; 16])> {
        Manager::new_group(self)
    }
    fn delete_group(&mut self, group: u32) -> Result<()> {
        Manager::delete_group(self, group)
    }
    fn approve(&mut self, group: u32, hash: &BootHash) -> Result<bool> {
        Manager::approve(self, group, hash)
    }
    fn revoke(&mut self, group: u32, hash: &BootHash) -> Result<bool> {
        Manager::revoke(self, group, hash)
    }
    fn approved(&self, group: u32) -> Result<Vec<BootHash>> {
        Manager::approved(self, group)
    }
    fn migration_public(&self) -> Vec<u8> {
        self.migration_key().public().to_vec()
    }
    fn attestation_public(&mut self) -> Result<Vec<u8>> {
        Manager::attestation_public(self)
    }
    fn export(&mut self, uuid: &[u8; 16], to: &[u8], force: bool) -> Result<Vec<u8>> {
        Manager::export(self, uuid, to, force)
    }
    fn trust_source(&mut self, source: &[u8]) -> Result<bool> {
        Manager::trust_source(self, source)
    }
    fn distrust_source(&mut self, source: &[u8]) -> Result<bool> {
        Manager::distrust_source(self, source)
    }
    fn import(&mut self, bundle: &[u8], group: u32) -> Result<[u8; 16]> {
        Manager::import(self, bundle, group)
    }
}
