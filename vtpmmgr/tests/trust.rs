//! The manager against the attackers of its trust model (issue 19), each driven the way the
//! attack was, with Debian's swtpm as the hardware TPM:
//! - a process with TPM access increments the anti-rollback counter with an empty auth;
//! - the TPM's owner (empty owner auth) undefines the counter and defines their own in its
//!   place, under a running manager;
//! - an old copy of the store is put back;
//! - a local process recreates the deep-quote key with CreatePrimary;
//! - something between the manager and the TPM records the bus.

mod common;

use std::sync::{Arc, Mutex};

use xvtpm_tis::{Family, HwTpm};
use xvtpm_vtpmmgr::hw::tpm12::Tpm12;
use xvtpm_vtpmmgr::hw::tpm2::Tpm2;
use xvtpm_vtpmmgr::hw::Sealed;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::store::dev::BLOCK;
use xvtpm_vtpmmgr::store::root::Root;
use xvtpm_vtpmmgr::Error;

const INDEX: u32 = 0x0181_584D;

fn cfg() -> InitConfig {
    InitConfig { pcrs: vec![0, 16], nv_index: INDEX, ..InitConfig::default() }
}

fn blob(i: u8) -> Vec<u8> {
    (0..52).map(|j| i.wrapping_mul(17).wrapping_add(j)).collect()
}

/// A TPM 2.0 command with one empty-password authorization (what `tpm2_nvincrement <index>
/// -C <index>` sends for an index without auth).
fn with_empty_password(cc: u32, handles: &[u32]) -> Vec<u8> {
    let mut c = vec![0x80, 0x02, 0, 0, 0, 0];
    c.extend_from_slice(&cc.to_be_bytes());
    for h in handles {
        c.extend_from_slice(&h.to_be_bytes());
    }
    c.extend_from_slice(&9u32.to_be_bytes());
    c.extend_from_slice(&[0x40, 0, 0, 0x09, 0, 0, 0, 0, 0]);
    let n = c.len() as u32;
    c[2..6].copy_from_slice(&n.to_be_bytes());
    c
}

/// One connection to the TPM shared by the manager and another process (as the kernel's
/// /dev/tpmrm0 shares the TPM; swtpm serves one connection at a time).
#[derive(Clone)]
struct Shared(Arc<Mutex<Box<dyn HwTpm + Send>>>);

impl Shared {
    fn new(hw: &common::HwSwtpm) -> Self {
        Self(Arc::new(Mutex::new(hw.connect())))
    }
    fn boxed(&self) -> Box<dyn HwTpm + Send> {
        Box::new(self.clone())
    }
}

impl HwTpm for Shared {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> xvtpm_tis::Result<Vec<u8>> {
        self.0.lock().expect("lock").transmit(locality, command)
    }
    fn family(&self) -> Family {
        self.0.lock().expect("lock").family()
    }
    fn describe(&self) -> String {
        self.0.lock().expect("lock").describe()
    }
}

fn rc(r: &[u8]) -> u32 {
    u32::from_be_bytes([r[6], r[7], r[8], r[9]])
}

#[test]
fn tpm2_counter_refuses_an_increment_with_an_empty_auth() {
    let dir = common::tmpdir("counter-empty-auth");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    let shared = Shared::new(&hw);
    let mut m = Manager::init(common::dev(&path, true), shared.boxed(), &cfg()).expect("init");
    m.provision([1; 16], 0, None).expect("provision");
    m.save(&[1; 16], &blob(1)).expect("save");
    let before = m.store().root().counter;
    // Any process with TPM access: NV_Increment on the index, authorised by the index with an
    // empty password; and NV_Read the same way.
    let mut tpm = shared.boxed();
    for cc in [0x134, 0x14E] {
        let mut cmd = with_empty_password(cc, &[INDEX, INDEX]);
        if cc == 0x14E {
            cmd.extend_from_slice(&[0, 8, 0, 0]);
            let n = cmd.len() as u32;
            cmd[2..6].copy_from_slice(&n.to_be_bytes());
        }
        let r = tpm.transmit(0, &cmd).expect("transmit");
        // TPM_RC_AUTH_FAIL for the first session (0x98E), or TPM_RC_BAD_AUTH (0x9A2).
        assert!(matches!(rc(&r), 0x98E | 0x9A2), "command {cc:#x} with an empty auth: rc {:#x}", rc(&r));
    }
    // The manager noticed nothing, because nothing happened.
    m.save(&[1; 16], &blob(2)).expect("save");
    assert_eq!(m.store().root().counter, before + 1);
    drop((m, tpm, shared));
    let m = Manager::open(common::dev(&path, false), hw.connect()).expect("reopen");
    assert_eq!(m.load(&[1; 16]).expect("load"), blob(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The owner (whose auth is empty unless the operator set one) replaces the counter with one
/// of their own and increments it: the running manager stops with a clear error instead of
/// committing, a restart refuses the store, and `recover` brings every vTPM back.
#[test]
fn tpm2_a_counter_replaced_under_a_running_manager_halts_it_and_recover_brings_every_vtpm_back() {
    let dir = common::tmpdir("counter-replaced");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    let uuids: Vec<[u8; 16]> = (1..=3u8).map(|i| [i; 16]).collect();
    let shared = Shared::new(&hw);
    let mut m = Manager::init(common::dev(&path, true), shared.boxed(), &cfg()).expect("init");
    for (i, u) in uuids.iter().enumerate() {
        m.provision(*u, 0, None).expect("provision");
        m.save(u, &blob(i as u8)).expect("save");
    }
    {
        let mut tpm = shared.boxed();
        let mut t = Tpm2::new(tpm.as_mut(), 0);
        t.nv_undefine(INDEX).expect("the owner undefines the counter");
        let (mut c, _) = t.counter_create(INDEX, &[]).expect("and defines their own");
        t.counter_bump(&mut c, 3).expect("and increments it");
    }
    let e = m.save(&uuids[0], &blob(9)).expect_err("a commit under a replaced counter");
    assert!(matches!(e, Error::Halted(_)), "{e}");
    assert!(e.to_string().contains("vtpmmgr recover"), "{e}");
    assert!(m.halted().is_some());
    assert!(matches!(m.load(&uuids[1]), Err(Error::Halted(_))), "a halted manager serves no vTPM");
    drop((m, shared));
    let e = Manager::open(common::dev(&path, false), hw.connect()).expect_err("restart");
    assert!(e.to_string().contains("vtpmmgr recover"), "{e}");

    let r = Manager::recover(common::dev(&path, false), hw.connect(), Some((&[0, 16], 0)), &[]).expect("recover");
    assert!(r.redefined, "{r:?}");
    assert_eq!(r.vtpms, 3);
    let mut m = Manager::open(common::dev(&path, false), hw.connect()).expect("open after recover");
    for (i, u) in uuids.iter().enumerate() {
        assert_eq!(m.load(u).expect("load"), blob(i as u8), "the save refused while halted changed nothing");
    }
    m.save(&uuids[0], &blob(10)).expect("saves work again");
    drop(m);
    let m = Manager::open(common::dev(&path, false), hw.connect()).expect("reopen");
    assert_eq!(m.load(&uuids[0]).expect("load"), blob(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tpm2_an_old_copy_is_refused_and_recover_accepts_it_on_request() {
    old_copy(Family::Tpm20);
}

#[test]
fn tpm12_an_old_copy_is_refused_and_recover_accepts_it_on_request() {
    old_copy(Family::Tpm12);
}

fn old_copy(family: Family) {
    let dir = common::tmpdir(&format!("old-copy-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
    let path = dir.join("store.img");
    {
        let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
        m.provision([1; 16], 0, None).expect("provision");
        m.save(&[1; 16], &blob(1)).expect("save");
    }
    let copy = std::fs::read(&path).expect("copy");
    {
        let mut m = Manager::open(common::dev(&path, false), hw.connect()).expect("open");
        m.save(&[1; 16], &blob(2)).expect("save");
        m.provision([2; 16], 0, None).expect("provision");
    }
    std::fs::write(&path, &copy).expect("put the old copy back");
    let e = Manager::open(common::dev(&path, false), hw.connect()).expect_err("old copy");
    assert!(matches!(e, Error::Rollback { .. }) && e.to_string().contains("vtpmmgr recover"), "{e}");
    // Recovery needs the store's PCRs: a recover with other expectations touches nothing.
    let e = Manager::recover(common::dev(&path, false), hw.connect(), Some((&[0], 0)), &[]).expect_err("other PCRs");
    assert!(e.to_string().contains("expects PCRs"), "{e}");
    let r = Manager::recover(common::dev(&path, false), hw.connect(), Some((&[0, 16], 0)), &[]).expect("recover");
    assert!(r.hw_counter > r.store_counter && !r.redefined, "{r:?}");
    let mut m = Manager::open(common::dev(&path, false), hw.connect()).expect("open after recover");
    // What the copy held: the later save and provisioning are lost, as the warning says.
    assert_eq!(m.load(&[1; 16]).expect("load"), blob(1));
    assert!(matches!(m.load(&[2; 16]), Err(Error::UnknownVtpm(_))));
    m.save(&[1; 16], &blob(3)).expect("saves work again");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The old attestation key was the owner hierarchy's primary for a fixed template: anyone
/// could recreate it and sign "deep quotes". Now its `unique` and auth come from the root key.
#[test]
fn tpm2_the_deep_quote_key_cannot_be_recreated_or_used_by_another_process() {
    let dir = common::tmpdir("ak2");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
    m.provision([1; 16], 0, None).expect("provision");
    let quote = m.quote(&[1; 16], None, &[7; 20], &[16]).expect("quote");
    let ak = &quote[2..2 + u16::from_be_bytes([quote[0], quote[1]]) as usize];
    assert_eq!(m.attestation_public().expect("published"), ak, "the published key signs the quotes");
    // Reopened: the same key (verifiers register it once).
    drop(m);
    let shared = Shared::new(&hw);
    let mut m = Manager::open(common::dev(&path, false), shared.boxed()).expect("reopen");
    assert_eq!(m.attestation_public().expect("published"), ak);
    // The attacker's CreatePrimary with the old template (empty unique, empty auth).
    let template = [
        &[0x00, 0x23, 0x00, 0x0B][..],
        &0x0005_0472u32.to_be_bytes(),
        &[0, 0, 0x00, 0x10, 0x00, 0x18, 0x00, 0x0B, 0x00, 0x03, 0x00, 0x10, 0, 0, 0, 0],
    ]
    .concat();
    let mut cmd = with_empty_password(0x131, &[0x4000_0001]);
    cmd.extend_from_slice(&[0, 4, 0, 0, 0, 0]);
    cmd.extend_from_slice(&(template.len() as u16).to_be_bytes());
    cmd.extend_from_slice(&template);
    cmd.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let n = cmd.len() as u32;
    cmd[2..6].copy_from_slice(&n.to_be_bytes());
    let r = shared.boxed().transmit(0, &cmd).expect("transmit");
    assert_eq!(rc(&r), 0, "CreatePrimary");
    // handle, parameterSize, outPublic.
    let n = u16::from_be_bytes([r[18], r[19]]) as usize;
    let theirs = &r[20..20 + n];
    assert_eq!(&theirs[..4], &ak[..4], "same key type");
    assert_ne!(theirs, ak, "the old template yields another key");
    m.quote(&[1; 16], None, &[8; 20], &[16]).expect("the manager's key still quotes");
    let _ = std::fs::remove_dir_all(&dir);
}

/// TPM 1.2: the quote key is kept in the sealed-key block, with a usage auth from the root
/// key: the well-known auth no longer uses it.
#[test]
fn tpm12_the_deep_quote_key_refuses_the_well_known_auth() {
    let dir = common::tmpdir("ak12");
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), Family::Tpm12);
    let path = dir.join("store.img");
    let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
    m.provision([1; 16], 0, None).expect("provision");
    let quote = m.quote(&[1; 16], None, &[7; 20], &[16]).expect("quote");
    let public = m.attestation_public().expect("published");
    assert_eq!(&quote[2..2 + public.len()], &public[..], "the published key signs the quotes");
    drop(m);
    let block = xvtpm_vtpmmgr::store::read_sealed(&mut common::dev(&path, false)).expect("read");
    let sealed = Sealed::decode(&block).expect("decode");
    let mut tpm = hw.connect();
    let mut t = Tpm12::new(tpm.as_mut(), 0);
    let h = t.load_key(&[0; 20], &sealed.ak).expect("anyone can load it under the SRK");
    let e = t.quote(h, &[0; 20], &[1; 20], &[16]).expect_err("but not use it with the well-known auth");
    assert!(e.to_string().contains("rc 0x1"), "TPM_AUTHFAIL: {e}");
    let _ = t.flush_key(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Everything that crossed the bus, both ways.
#[derive(Clone, Default)]
struct Recording(Arc<Mutex<Vec<u8>>>);

struct Recorder {
    inner: Box<dyn HwTpm + Send>,
    bytes: Recording,
}

impl HwTpm for Recorder {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> xvtpm_tis::Result<Vec<u8>> {
        let r = self.inner.transmit(locality, command)?;
        let mut b = self.bytes.0.lock().expect("lock");
        b.extend_from_slice(command);
        b.extend_from_slice(&r);
        Ok(r)
    }
    fn family(&self) -> Family {
        self.inner.family()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The root key never crosses the bus in the clear: no 32 bytes of what the manager and the
/// TPM exchanged at init, at open and at a quote open the store's root. (Before: the Create
/// or Seal at init sent it, and the Unseal at every start returned it, as plain parameters;
/// now TPM 2.0 uses sessions salted to the storage primary, TPM 1.2 encrypted transport
/// sessions to the SRK.)
#[test]
fn tpm2_the_root_key_never_crosses_the_bus_in_the_clear() {
    root_key_never_crosses_the_bus(Family::Tpm20);
}

#[test]
fn tpm12_the_root_key_never_crosses_the_bus_in_the_clear() {
    root_key_never_crosses_the_bus(Family::Tpm12);
}

fn root_key_never_crosses_the_bus(family: Family) {
    let dir = common::tmpdir(&format!("bus-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
    let path = dir.join("store.img");
    let rec = Recording::default();
    let recorded = || Box::new(Recorder { inner: hw.connect(), bytes: rec.clone() });
    {
        let mut m = Manager::init(common::dev(&path, true), recorded(), &cfg()).expect("init");
        m.provision([1; 16], 0, None).expect("provision");
        m.save(&[1; 16], &blob(1)).expect("save");
    }
    let mut m = Manager::open(common::dev(&path, false), recorded()).expect("open");
    m.quote(&[1; 16], None, &[7; 20], &[16]).expect("quote");
    assert_eq!(m.load(&[1; 16]).expect("load"), blob(1), "the recorded manager works");
    drop(m);
    let bytes = rec.0.lock().expect("lock").clone();
    let mut slot = [0u8; BLOCK];
    let store = std::fs::read(&path).expect("read");
    slot.copy_from_slice(&store[..BLOCK]);
    let mut other = [0u8; BLOCK];
    other.copy_from_slice(&store[BLOCK..2 * BLOCK]);
    assert!(bytes.len() > 1000, "{} bytes recorded", bytes.len());
    // The oracle: a candidate root key opens a root slot under its store sub-key.
    let opens = |key: &[u8; 32]| {
        let aead = xvtpm_vtpmmgr::store::subkey(key, xvtpm_vtpmmgr::store::Purpose::StoreAead);
        [&slot, &other].iter().any(|s| matches!(Root::open(&aead, s), Ok(Some(_))))
    };
    for w in bytes.windows(32) {
        assert!(!opens(&w.try_into().expect("32")), "the root key crossed the bus in the clear");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same at the level of the seal and unseal themselves, with a key the test knows.
#[test]
fn tpm2_seal_and_unseal_send_and_return_the_secret_encrypted() {
    let dir = common::tmpdir("bus-seal");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let rec = Recording::default();
    let mut tpm: Box<dyn HwTpm + Send> = Box::new(Recorder { inner: hw.connect(), bytes: rec.clone() });
    let mut t = Tpm2::new(tpm.as_mut(), 0);
    t.startup().expect("startup");
    let secret = [0xA5u8; 32];
    let (private, public, creation) = t.seal(&secret, &[0, 16]).expect("seal");
    assert_eq!(t.unseal(&private, &public, &creation, &[0, 16]).expect("unseal"), secret);
    let bytes = rec.0.lock().expect("lock").clone();
    assert!(!bytes.windows(32).any(|w| w == secret), "the secret crossed the bus in the clear");
    assert!(!bytes.windows(8).any(|w| w == [0xA5; 8]), "not even a part of it");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The storage primary's Name is recorded at init: a TPM answering with another primary
/// (what an interposer must do to read what is encrypted to it) is refused before the unseal.
#[test]
fn tpm2_a_different_storage_primary_is_refused_before_the_unseal() {
    let dir = common::tmpdir("primary");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    drop(Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init"));
    let block = xvtpm_vtpmmgr::store::read_sealed(&mut common::dev(&path, false)).expect("read");
    let sealed = Sealed::decode(&block).expect("decode");
    assert_eq!(sealed.primary_name.len(), 34, "nameAlg and a SHA-256 digest");
    let mut tpm = hw.connect();
    let mut t = Tpm2::new(tpm.as_mut(), 0);
    let mut name = sealed.primary_name.clone();
    name[10] ^= 1;
    t.pin_primary(name);
    let e = t.unseal(&sealed.private, &sealed.public, &sealed.creation, &sealed.pcrs).expect_err("other primary");
    assert!(e.to_string().contains("not the one this store was initialised with"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Someone who knows only the destination's public migration key (all a bundle needed before)
/// makes a bundle for a vTPM with a key and token of their choosing: the destination refuses
/// it, because it does not come from a source its operator pinned. The pinned source's bundle
/// is taken, once.
#[test]
fn tpm2_a_forged_or_replayed_migration_bundle_is_refused() {
    use xvtpm_vtpmmgr::migrate::MigrationKey;
    use xvtpm_vtpmmgr::store::record::Record;
    let dir = common::tmpdir("forged-bundle");
    let (hwa, hwb) = (common::HwSwtpm::start(&dir.join("tpm-a")), common::HwSwtpm::start(&dir.join("tpm-b")));
    let mut a = Manager::init(common::dev(&dir.join("a.img"), true), hwa.connect(), &cfg()).expect("init a");
    let mut b = Manager::init(common::dev(&dir.join("b.img"), true), hwb.connect(), &cfg()).expect("init b");
    let to = b.migration_key().public();
    let forger = MigrationKey::from_seeds([0x66; 32], [0x67; 32]);
    let mut rec = Record::new([0x42; 16], 0);
    rec.key = [0x66; 32];
    let forged = forger.seal(&to, &rec).expect("seal");
    let e = b.import(&forged, 0).expect_err("forged");
    assert!(matches!(e, Error::NotAuthorized(_)) && e.to_string().contains("not pinned"), "{e}");
    assert!(b.list().expect("list").is_empty());
    // A's bundle: refused until B pins A, then taken once.
    a.provision([1; 16], 0, None).expect("provision");
    a.save(&[1; 16], &blob(1)).expect("save");
    let bundle = a.export(&[1; 16], &to, false).expect("export");
    assert!(b.import(&bundle, 0).is_err(), "A is not pinned yet");
    assert!(b.trust_source(&a.migration_key().public()).expect("pin"));
    assert_eq!(b.import(&bundle, 0).expect("import"), [1; 16]);
    assert_eq!(b.load(&[1; 16]).expect("load"), blob(1));
    b.delete(&[1; 16]).expect("delete");
    let e = b.import(&bundle, 0).expect_err("replayed");
    assert!(e.to_string().contains("imported here before"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connects to `path` as user `uid`: from a thread of its own that takes that uid alone (the
/// kernel records the connecting thread's credentials).
#[allow(unsafe_code)] // reason: setresuid(2) on one thread, to act as another local user
fn connect_as(uid: u32, path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: the raw syscall changes only this thread's ids (glibc's setresuid would
        // change every thread's); the thread ends after the connect.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::os::unix::net::UnixStream::connect(path)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
}

/// The vTPM socket of `--socket-group`: mode 0660 in that group, so the sandboxed vtpms (in the
/// group, each its own uid) connect and other local users do not; the admin socket stays
/// root's (0600) whatever the group.
#[test]
fn the_vtpm_socket_belongs_to_its_group_and_the_admin_socket_to_root_alone() {
    use std::os::unix::fs::MetadataExt;
    use xvtpm_vtpmmgr::server;
    let dir = common::tmpdir("group");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let m = Arc::new(Mutex::new(
        Manager::init(common::dev(&dir.join("store.img"), true), hw.connect(), &cfg()).expect("init"),
    ));
    // As root any group (one the socket would not have by itself); else our own, which
    // needs no privilege (and proves less).
    let mine = std::fs::metadata(&dir).expect("dir").gid();
    let gid = if std::fs::metadata("/proc/self").expect("proc").uid() == 0 { 4242 } else { mine };
    let (vtpm, admin) = (dir.join("vtpm.sock"), dir.join("admin.sock"));
    server::serve_unix_group(m.clone(), &vtpm, 8, Some(gid)).expect("vtpm socket");
    server::serve_unix(m, &admin, true, 8).expect("admin socket");
    let v = std::fs::metadata(&vtpm).expect("vtpm socket");
    assert_eq!((v.mode() & 0o777, v.gid()), (0o660, gid));
    assert_eq!(std::fs::metadata(&admin).expect("admin socket").mode() & 0o777, 0o600);
}

/// Whether the manager closed `s` (within two seconds).
fn closed(s: &mut std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("timeout");
    matches!(s.read(&mut [0u8; 16]), Ok(0) | Err(_))
}

/// A local user fills the manager's vTPM socket with idle connections that never bind: the
/// manager takes only a few per uid, closes them after a while, and a vTPM of another uid
/// binds at once (it used to wait for over a minute).
#[test]
fn idle_unbound_connections_of_one_user_cannot_keep_a_vtpm_out() {
    use std::os::unix::fs::PermissionsExt;
    use xvtpm_vtpmmgr::server::{self, Client, Limits};
    let dir = common::tmpdir("unbound");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let mut m = Manager::init(common::dev(&dir.join("store.img"), true), hw.connect(), &cfg()).expect("init");
    let token = [0x5Au8; 32];
    m.provision([1; 16], 0, Some(&token)).expect("provision");
    let sock = dir.join("vtpm.sock");
    let limits = Limits {
        max_clients: 64,
        unbound_per_uid: 4,
        unbound_timeout: std::time::Duration::from_millis(500),
        ..Limits::default()
    };
    server::serve_unix_with(Arc::new(Mutex::new(m)), &sock, false, limits).expect("serve");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().next() == Some("0")))
        .unwrap_or(false);
    // The attacker: user nobody if this test may act as another user, else this test's own.
    let attacker = if root { 65534 } else { u32::MAX };
    if root {
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("open the socket up");
    }
    let connect = || if root { connect_as(attacker, &sock) } else { std::os::unix::net::UnixStream::connect(&sock) };
    let mut idle: Vec<_> = (0..4).map(|_| connect().expect("connect")).collect();
    let mut fifth = connect().expect("connect");
    assert!(closed(&mut fifth), "a fifth unbound connection of one uid was kept");
    if root {
        // The vTPM (root here) binds at once, the attacker's four still connected.
        let mut c = Client::connect(&sock).expect("connect");
        let bind = c
            .call(xvtpm_proto::mgr::TAG_REQ2, xvtpm_proto::mgr::ord::BIND, &[&[1u8; 16][..], &token].concat())
            .expect("bind");
        assert_eq!(bind.0, 0, "BIND while another user holds idle connections");
    }
    // The idle ones are closed after the timeout, and that uid may connect again.
    for s in &mut idle {
        assert!(closed(s), "an idle unbound connection was kept");
    }
    let mut again = connect().expect("connect");
    again.set_read_timeout(Some(std::time::Duration::from_millis(200))).expect("timeout");
    let r = std::io::Read::read(&mut again, &mut [0u8; 16]);
    assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "served again: {r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vtpmmgr init` sets the owner's auth when asked: the storage primary key is then kept at a
/// persistent handle, so the manager serves without the owner auth, and a process without it
/// can no longer undefine the counter (which, with the owner auth empty, anyone could).
#[test]
fn tpm2_an_owner_auth_set_at_init_keeps_the_counter_defined() {
    let dir = common::tmpdir("owner-auth");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    let owner = b"the owner's secret".to_vec();
    let init = InitConfig { new_owner_auth: Some(owner.clone()), ..cfg() };
    let mut m = Manager::init(common::dev(&path, true), hw.connect(), &init).expect("init");
    m.provision([1; 16], 0, None).expect("provision");
    m.save(&[1; 16], &blob(1)).expect("save");
    drop(m);
    let block = xvtpm_vtpmmgr::store::read_sealed(&mut common::dev(&path, false)).expect("read");
    assert_eq!(Sealed::decode(&block).expect("decode").srk_handle, 0x8100_0001);
    {
        let mut tpm = hw.connect();
        let mut t = Tpm2::new(tpm.as_mut(), 0);
        let e = t.nv_undefine(INDEX).expect_err("undefine without the owner auth");
        assert!(matches!(e, Error::TpmRc { rc: 0x9A2 | 0x98E, .. }), "{e:?}");
    }
    // Serving needs no owner auth: open, load, save, quote.
    let mut m = Manager::open(common::dev(&path, false), hw.connect()).expect("open");
    assert_eq!(m.load(&[1; 16]).expect("load"), blob(1));
    m.save(&[1; 16], &blob(2)).expect("save");
    m.quote(&[1; 16], None, &[3; 20], &[16]).expect("quote");
    drop(m);
    // The owner (with the auth) may still undefine it; recover then needs the owner auth too.
    {
        let mut tpm = hw.connect();
        let mut t = Tpm2::new(tpm.as_mut(), 0);
        t.set_owner_auth(owner.clone());
        t.nv_undefine(INDEX).expect("the owner undefines it");
    }
    let e = Manager::recover(common::dev(&path, false), hw.connect(), Some((&[0, 16], 0)), &[]).expect_err("no auth");
    assert!(e.to_string().contains("--owner-auth-file"), "{e}");
    let r = Manager::recover(common::dev(&path, false), hw.connect(), Some((&[0, 16], 0)), &owner).expect("recover");
    assert!(r.redefined);
    let m = Manager::open(common::dev(&path, false), hw.connect()).expect("open after recover");
    assert_eq!(m.load(&[1; 16]).expect("load"), blob(2));
    let _ = std::fs::remove_dir_all(&dir);
}
