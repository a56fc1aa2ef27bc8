//! Hardware NV wear: what guests' state saves cost the hardware TPM's NV memory, counted by a
//! proxy in front of swtpm (every NV-writing command that succeeded), with the daemon's
//! default counter window and save rate, on a clock the test moves.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xvtpm_tis::nvcount::NvWriteCounter;
use xvtpm_tis::Family;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::pace::{Clock, COUNTER_WINDOW, SAVE_RATE};
use xvtpm_vtpmmgr::store::dev::{BlockDev, MemDev};
use xvtpm_vtpmmgr::Error;

fn blob(i: u32) -> Vec<u8> {
    let mut b: Vec<u8> = (0..52u8).collect();
    b[..4].copy_from_slice(&i.to_be_bytes());
    b
}

/// A clock that only moves when the test says.
#[derive(Clone)]
struct TestClock(Arc<Mutex<Instant>>);

impl TestClock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
    fn advance(&self, d: Duration) {
        *self.0.lock().expect("clock") += d;
    }
    fn clock(&self) -> Clock {
        let c = self.0.clone();
        Arc::new(move || *c.lock().expect("clock"))
    }
}

/// A manager on `dev` over swtpm (`family`) behind an NV-write counter, with the daemon's
/// defaults, one provisioned vTPM, and the count at zero.
fn manager<D: BlockDev>(
    hw: &common::HwSwtpm,
    dev: D,
    clock: &TestClock,
    window: Duration,
) -> (Manager<D>, Arc<AtomicU64>, [u8; 16]) {
    let tpm = NvWriteCounter::new(hw.connect());
    let writes = tpm.counter();
    let cfg = InitConfig { pcrs: vec![0, 16], ..InitConfig::default() };
    let mut m = Manager::init(dev, Box::new(tpm), &cfg).expect("init");
    m.set_clock(clock.clock());
    m.set_counter_window(window);
    m.saves.rate = SAVE_RATE;
    let u = [0x5A; 16];
    m.provision(u, 0, None).expect("provision");
    writes.store(0, SeqCst);
    (m, writes, u)
}

/// What the manager's counter thread does: the owed increment once it is due.
fn tick<D: BlockDev>(m: &mut Manager<D>) {
    m.flush_counter(false).expect("a due increment");
}

/// A guest making 1,000 NV writes (one save each) as fast as its save rate lets it: at most
/// one hardware NV write per 100 saves. The same saves with the window off cost one each,
/// which is what the proxy would count if the window did nothing.
fn thousand_saves(family: Family) {
    let dir = common::tmpdir(&format!("nv-wear-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
    let clock = TestClock::new();
    let (mut m, writes, u) = manager(&hw, MemDev::default(), &clock, COUNTER_WINDOW);
    let (mut saved, mut refused) = (0u32, 0u32);
    while saved < 1000 {
        match m.save(&u, &blob(saved)) {
            Ok(()) => saved += 1,
            Err(Error::Busy(_)) => refused += 1,
            Err(e) => panic!("save {saved}: {e}"),
        }
        clock.advance(Duration::from_millis(20));
        tick(&mut m);
    }
    m.flush_counter(true).expect("the increment owed at the end");
    let hw_writes = writes.load(SeqCst);
    eprintln!("{family}: 1000 saves ({refused} refused over the rate first), {hw_writes} hardware NV writes");
    assert!(refused > 0, "the save rate held the guest back");
    assert!(hw_writes <= 10, "{hw_writes} hardware NV writes for 1000 saves");
    assert!(hw_writes >= 1, "the counter still moves");
    assert_eq!(m.load(&u).expect("load"), blob(999));

    // The control: window 0, the counter increments with every save.
    drop(m);
    let hw2 = common::HwSwtpm::start_family(&dir.join("tpm2"), family);
    let (mut m, writes, u) = manager(&hw2, MemDev::default(), &clock, Duration::ZERO);
    m.saves.rate = xvtpm_vtpmmgr::pace::Rate::UNLIMITED;
    for i in 0..20 {
        m.save(&u, &blob(i)).expect("save");
    }
    assert_eq!(writes.load(SeqCst), 20, "without a window each save is one hardware NV write");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tpm2_a_thousand_guest_nv_writes_cost_at_most_ten_hardware_nv_writes() {
    thousand_saves(Family::Tpm20);
}

#[test]
fn tpm12_a_thousand_guest_nv_writes_cost_at_most_ten_hardware_nv_writes() {
    thousand_saves(Family::Tpm12);
}

/// A hostile guest saving in a tight loop for an hour (simulated time; every try that the rate
/// allows is a real commit and a real counter check against swtpm): at most 100 hardware NV
/// writes, and its refused saves touch neither the TPM nor the store.
#[test]
fn a_hostile_guest_looping_on_nv_writes_for_an_hour_costs_at_most_100_hardware_nv_writes() {
    let dir = common::tmpdir("nv-wear-hostile");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let clock = TestClock::new();
    let (mut m, writes, u) = manager(&hw, MemDev::default(), &clock, COUNTER_WINDOW);
    let end = Duration::from_secs(3600);
    let (mut t, mut saved, mut refused) = (Duration::ZERO, 0u32, 0u64);
    while t < end {
        let cmds = m.tpm_commands;
        match m.save(&u, &blob(saved)) {
            Ok(()) => saved += 1,
            Err(Error::Busy(_)) => {
                refused += 1;
                assert_eq!(m.tpm_commands, cmds, "a refused save sends the TPM nothing");
            }
            Err(e) => panic!("save at {t:?}: {e}"),
        }
        // The guest retries as soon as it can: every 10 ms.
        let step = Duration::from_millis(10);
        clock.advance(step);
        t += step;
        tick(&mut m);
    }
    let hw_writes = writes.load(SeqCst);
    eprintln!("an hour of a hostile loop: {saved} saves, {refused} refused, {hw_writes} hardware NV writes");
    assert!(saved >= 3600 * 9, "the guest got its rate ({saved} saves)");
    assert!(hw_writes <= 100, "{hw_writes} hardware NV writes in an hour");
    assert!(hw_writes >= 50, "the counter kept up with the saves ({hw_writes})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a copy of the store can bring back with the window on: the saves of the last two
/// windows (the documented price), nothing older, and nothing from before a management update.
#[test]
fn a_store_copy_brings_back_at_most_the_saves_of_the_last_two_windows() {
    let dir = common::tmpdir("nv-wear-rollback");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let clock = TestClock::new();
    let path = dir.join("store.img");
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::copy(&path, &to).expect("copy the store");
        to
    };
    let open = |p: &std::path::Path| {
        let mut m = Manager::open(common::dev(p, false), hw.connect())?;
        m.set_clock(clock.clock());
        m.set_counter_window(COUNTER_WINDOW);
        Ok::<_, Error>(m)
    };
    let second = Duration::from_secs(1);
    let (mut m, _, u) = manager(&hw, common::dev(&path, true), &clock, COUNTER_WINDOW);
    clock.advance(COUNTER_WINDOW);
    m.save(&u, &blob(1)).expect("save 1, after a quiet window: incremented at once");
    assert_eq!(m.counter_due(), None);
    let old = copy("old.img");
    clock.advance(second);
    m.save(&u, &blob(2)).expect("save 2, its increment deferred");
    assert!(m.counter_due().is_some(), "an increment is owed");
    let recent = copy("recent.img");
    clock.advance(COUNTER_WINDOW);
    tick(&mut m);
    assert_eq!(m.counter_due(), None, "the owed increment was made");
    clock.advance(second);
    m.save(&u, &blob(3)).expect("save 3, deferred");
    drop(m); // as a crash would: the increment for save 3 is still owed

    assert!(matches!(open(&old), Err(Error::Rollback { .. })), "older than the last-but-one increment");
    // The price of the window: a copy from the previous window opens, and save 3 is lost in it.
    let m = open(&recent).expect("a copy of the previous window");
    assert_eq!(m.load(&u).expect("load"), blob(2));
    drop(m);
    // The newest store opens too (one increment ahead: made now).
    let mut m = open(&path).expect("the newest store");
    assert_eq!(m.load(&u).expect("load"), blob(3));
    // (Opening incremented the counter by the system's clock, not this test's.)
    m.save(&u, &blob(4)).expect("save 4");
    clock.advance(second);
    m.save(&u, &blob(5)).expect("save 5, deferred");
    assert!(m.counter_due().is_some());
    let before_delete = copy("before-delete.img");
    // Management updates are anchored at once, each on a counter value of its own: the owed
    // increment is made first.
    let other = [0x77; 16];
    m.provision(other, 0, None).expect("provision");
    assert!(m.delete(&other).expect("delete"));
    assert_eq!(m.counter_due(), None, "nothing owed after a management update");
    drop(m);
    assert!(
        matches!(open(&before_delete), Err(Error::Rollback { .. })),
        "a copy from before a deletion cannot bring the vTPM back"
    );
    assert!(matches!(open(&recent), Err(Error::Rollback { .. })), "two windows on, refused");
    let m = open(&path).expect("the newest state opens");
    assert_eq!(m.load(&u).expect("load"), blob(5));
    assert!(m.record(&other).expect("record").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Someone who can replace the store's file keeps a copy taken while an increment was owed
/// (one ahead of the counter), puts back an older copy, and lets the operator make a
/// management update on it. The kept copy must not open afterwards: it lacks the update.
#[test]
fn a_management_update_on_a_restored_copy_cannot_be_undone_by_a_kept_newer_copy() {
    let dir = common::tmpdir("nv-wear-branch");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let clock = TestClock::new();
    let path = dir.join("store.img");
    let (mut m, _, u) = manager(&hw, common::dev(&path, true), &clock, COUNTER_WINDOW);
    clock.advance(COUNTER_WINDOW);
    m.save(&u, &blob(1)).expect("save 1, incremented at once");
    let older = dir.join("older.img");
    std::fs::copy(&path, &older).expect("copy");
    clock.advance(Duration::from_secs(1));
    m.save(&u, &blob(2)).expect("save 2, deferred");
    drop(m);
    let kept = dir.join("kept.img");
    std::fs::copy(&path, &kept).expect("copy");
    // The older copy goes back in place, and opens: it is in step with the counter.
    std::fs::copy(&older, &path).expect("put the older copy back");
    let mut m = Manager::open(common::dev(&path, false), hw.connect()).expect("the older copy");
    let other = [0x66; 16];
    m.provision(other, 0, None).expect("a management update");
    drop(m);
    assert!(
        matches!(Manager::open(common::dev(&kept, false), hw.connect()), Err(Error::Rollback { .. })),
        "the kept copy, without the provisioning, must be refused"
    );
    let m = Manager::open(common::dev(&path, false), hw.connect()).expect("the store with the update");
    assert!(m.record(&other).expect("record").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon's counter thread makes the owed increment when the window ends, on its own.
#[test]
fn the_counter_thread_makes_the_owed_increment_at_the_end_of_the_window() {
    let dir = common::tmpdir("nv-wear-flusher");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let window = Duration::from_millis(300);
    let tpm = NvWriteCounter::new(hw.connect());
    let writes = tpm.counter();
    let cfg = InitConfig { pcrs: vec![0, 16], ..InitConfig::default() };
    let mut m = Manager::init(MemDev::default(), Box::new(tpm), &cfg).expect("init");
    m.set_counter_window(window);
    let u = [0x44; 16];
    m.provision(u, 0, None).expect("provision");
    let shared = Arc::new(Mutex::new(m));
    let _flusher = xvtpm_vtpmmgr::server::spawn_counter_flusher(shared.clone()).expect("counter thread");
    let start = writes.load(SeqCst);
    {
        let mut m = shared.lock().expect("manager");
        m.save(&u, &blob(1)).expect("save 1: deferred, the provisioning just incremented");
        m.save(&u, &blob(2)).expect("save 2: deferred");
        assert!(m.counter_due().is_some());
    }
    assert_eq!(writes.load(SeqCst), start, "nothing written yet");
    let end = Instant::now() + Duration::from_secs(10);
    while shared.lock().expect("manager").counter_due().is_some() {
        assert!(Instant::now() < end, "the owed increment was never made");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(writes.load(SeqCst), start + 1, "one increment for both saves");
    let _ = std::fs::remove_dir_all(&dir);
}
