//! A vTPM stub domain destroyed and made again under its running guest, on the simulated Xen:
//! the vtpm in the new domain resumes the guest's TPM from the snapshot on its disk, because
//! dom0's xvtpmd tells it the guest's life (a domain other than dom0 may not read it). The
//! life is written only where both sides of a device name each other, the guest cannot write
//! it, and a guest's next life gets a reset TPM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::tpm2::{pcr_extend_sha256, pcr_read_sha256, rc};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::xenbus::{vtpm_backend_path, GUEST_LIFE_KEY};
use xvtpm_xen::{TxId, Xen, Xenstore};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const XVTPMD: &str = env!("CARGO_BIN_EXE_xvtpmd");
const UUID: &str = "6b6c6d6e-6f70-4172-8374-757677787980";
const GUEST: u16 = 5;

struct Proc(Child, PathBuf);

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str) {
        self.wait_for_n(needle, 1);
    }

    fn wait_for_n(&self, needle: &str, n: usize) {
        let end = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < n {
            assert!(Instant::now() < end, "never logged {needle:?} {n} times:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // kill -9: as a destroyed domain's processes end.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    Proc(child, log)
}

/// The vtpm of the stub domain `domid`, its disk being `disk` (state and snapshots).
fn stub_vtpm(bins: &Path, host: &SimHost, domid: u16, disk: &Path, wait_secs: u32) -> Proc {
    let mut cmd = Command::new(bins.join("vtpm"));
    cmd.args(["serve", "--uuid", UUID, "--domid", &domid.to_string()])
        .arg("--sim")
        .arg(host.dir())
        .arg("--state-dir")
        .arg(disk.join("state"))
        .arg("--key")
        .arg(disk.join("key"))
        .arg("--snapshot-dir")
        .arg(disk.join("snapshots"))
        .args(["--guest-life-wait-secs", &wait_secs.to_string()]);
    let p = spawn(&mut cmd, host.dir().join(format!("vtpm-dom{domid}.log")));
    p.wait_for("watching");
    p
}

/// The host boot the tests' xvtpmd tells, unless one plays a host reboot.
const BOOT: &str = "boot-1";

/// A guest's life as xvtpmd tells it: its `vm` path in this host boot, its `start_time`.
fn life_of(xs: &Xenstore, domid: u16) -> String {
    let read = |p: &str| String::from_utf8(xs.read(TxId::NONE, p).expect(p)).expect("utf-8");
    let vm = read(&format!("/local/domain/{domid}/vm"));
    format!("{vm}#{BOOT}@{}", read(&format!("{vm}/start_time")))
}

fn wait_life(xs: &Xenstore, be: &str, want: &str, d: &Proc) {
    let end = Instant::now() + Duration::from_secs(15);
    let key = format!("{be}/{GUEST_LIFE_KEY}");
    while xs.try_read(TxId::NONE, &key).expect("read").as_deref() != Some(want.as_bytes()) {
        assert!(Instant::now() < end, "no life {want} in {key}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pcr16(fe: &mut Frontend) -> Vec<u8> {
    let r = fe.transmit(&pcr_read_sha256(16)).expect("PCR_Read");
    assert_eq!(rc(&r), 0);
    r[r.len() - 32..].to_vec()
}

fn connect(host: &SimHost, domid: u16) -> Frontend {
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    Frontend::connect(&host.xen(domid), cfg).expect("guest connects")
}

/// The simulated host and a vTPM domain's disk (its state, with a key file here where real
/// stub domains use the manager, and its snapshots).
struct Host {
    host: SimHost,
    xs: Xenstore,
    bins: PathBuf,
    disk: PathBuf,
}

/// dom0's `xvtpmd --stub-domains-only`.
fn xvtpmd(host: &SimHost) -> Proc {
    xvtpmd_in(host, BOOT)
}

/// [`xvtpmd`] in host boot `boot`.
fn xvtpmd_in(host: &SimHost, boot: &str) -> Proc {
    let mut cmd = Command::new(XVTPMD);
    cmd.args(["--stub-domains-only", "--domid", "0", "--host-boot-id", boot, "--sim"]).arg(host.dir());
    let d = spawn(&mut cmd, host.dir().join("xvtpmd.log"));
    d.wait_for("guests' lives");
    d
}

impl Host {
    fn start() -> Host {
        let host = SimHost::temp().expect("sim");
        let xs = host.xen(0).xenstore().expect("xs");
        toolstack::init_dom0(&xs).expect("dom0");
        let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
        let disk = host.dir().join("disk");
        std::fs::create_dir_all(&disk).expect("disk");
        std::fs::write(disk.join("key"), [0x5a; 32]).expect("key");
        let made = Command::new(bins.join("vtpm"))
            .arg("create")
            .arg("--state-dir")
            .arg(disk.join("state"))
            .arg("--key")
            .arg(disk.join("key"))
            .output()
            .expect("create");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        Host { host, xs, bins, disk }
    }
}

#[test]
fn a_stub_domain_made_again_under_its_running_guest_resumes_the_guests_tpm() {
    let Host { host, xs, bins, disk } = Host::start();
    toolstack::add_domain(&xs, 3, "vtpm-stub").expect("stub domain");
    toolstack::add_domain(&xs, 8, "other").expect("another guest");
    toolstack::add_domain(&xs, GUEST, "guest").expect("guest");
    // Domain 8's device names another backend on its side (its guest owns that side and may
    // write anything there): the sides disagree, so no life is written for it.
    toolstack::add_vtpm(&xs, 8, 3, 0, UUID).expect("domain 8's device");
    let other_xs = host.xen(8).xenstore().expect("other xs");
    other_xs
        .write(TxId::NONE, "/local/domain/8/device/vtpm/0/backend", b"/local/domain/0/backend/vtpm/8/0")
        .expect("forge");
    let fake = vtpm_backend_path(3, 8, 0);
    let d = xvtpmd(&host);
    let vtpm = stub_vtpm(&bins, &host, 3, &disk, 10);
    toolstack::add_vtpm(&xs, GUEST, 3, 0, UUID).expect("the guest's vtpm= line");
    let be = vtpm_backend_path(3, GUEST, 0);
    wait_life(&xs, &be, &life_of(&xs, GUEST), &d);
    assert_eq!(xs.try_read(TxId::NONE, &format!("{fake}/{GUEST_LIFE_KEY}")).expect("read"), None, "{}", d.log());
    // The guest reads its life there, and cannot write it.
    let guest_xs = host.xen(GUEST).xenstore().expect("guest xs");
    assert!(guest_xs.write(TxId::NONE, &format!("{be}/{GUEST_LIFE_KEY}"), b"/vm/forged@1").is_err());
    // Neither can domain 8.
    assert!(other_xs.write(TxId::NONE, &format!("{be}/{GUEST_LIFE_KEY}"), b"/vm/forged@1").is_err());

    let mut fe = connect(&host, GUEST);
    let r = fe.transmit(&pcr_extend_sha256(16, &[0x16; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    let pcr = pcr16(&mut fe);
    assert_ne!(pcr, [0u8; 32]);

    // `xl destroy` of the vTPM domain (its vtpm killed, its home gone), then the guest's device
    // detached (libxl forces it after its timeout) and attached to the new vTPM domain 4.
    drop(vtpm);
    drop(fe);
    toolstack::remove_domain(&xs, 3).expect("destroy the stub domain");
    toolstack::remove_vtpm(&xs, GUEST, 3, 0, Duration::from_millis(200)).expect("detach");
    toolstack::add_domain(&xs, 4, "vtpm-stub").expect("stub domain again");
    let vtpm = stub_vtpm(&bins, &host, 4, &disk, 10);
    toolstack::add_vtpm(&xs, GUEST, 4, 0, UUID).expect("vtpm-attach");
    let mut fe = connect(&host, GUEST);
    assert_eq!(pcr16(&mut fe), pcr, "PCR 16 after the vTPM domain was made again:\n{}", vtpm.log());
    vtpm.wait_for("resumed from snapshot");
    assert!(!vtpm.log().contains("starts reset"), "{}", vtpm.log());
    let life = life_of(&xs, GUEST);
    assert!(vtpm.log().contains(&life), "the vtpm names the guest's life:\n{}", vtpm.log());

    // The guest reboots: a new domain, a new life, a reset TPM.
    drop(fe);
    assert!(toolstack::remove_vtpm(&xs, GUEST, 4, 0, Duration::from_secs(10)).expect("remove"), "{}", vtpm.log());
    toolstack::remove_domain(&xs, GUEST).expect("destroy the guest");
    toolstack::add_domain(&xs, 6, "guest").expect("rebooted guest");
    toolstack::add_vtpm(&xs, 6, 4, 0, UUID).expect("its vtpm= line");
    let mut fe = connect(&host, 6);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "the rebooted guest found its old PCRs:\n{}", vtpm.log());

    // The vTPM domain made again while dom0's xvtpmd is not running: the vtpm cannot know the
    // guest's life, so it never matches the guest to a snapshot (a domain id repeats after a
    // host reboot, which the disk outlives); as the snapshot names this domain id, the guest
    // may be the running one, and is refused rather than handed a reset TPM.
    drop(d);
    let r = fe.transmit(&pcr_extend_sha256(16, &[0x61; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    drop(vtpm);
    drop(fe);
    toolstack::remove_vtpm(&xs, 6, 4, 0, Duration::from_millis(200)).expect("detach");
    let vtpm = stub_vtpm(&bins, &host, 4, &disk, 1);
    toolstack::add_vtpm(&xs, 6, 4, 0, UUID).expect("attach again");
    let mut fe = connect(&host, 6);
    let r = fe.transmit(&pcr_read_sha256(16)).expect("PCR_Read");
    assert_eq!(rc(&r), 0x101, "TPM_RC_FAILURE for a guest whose life is unknown:\n{}", vtpm.log());
    vtpm.wait_for("is xvtpmd running in dom0?");
    vtpm.wait_for("no snapshot can be its own");
    // Its next life (a new domain id) has no snapshot: a reset TPM, as at power-on.
    drop(fe);
    assert!(toolstack::remove_vtpm(&xs, 6, 4, 0, Duration::from_secs(10)).expect("remove"), "{}", vtpm.log());
    toolstack::remove_domain(&xs, 6).expect("destroy the guest");
    toolstack::add_domain(&xs, 9, "guest").expect("rebooted guest");
    toolstack::add_vtpm(&xs, 9, 4, 0, UUID).expect("its vtpm= line");
    let mut fe = connect(&host, 9);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "{}", vtpm.log());
}

/// `xl save` and `xl restore` of a guest whose vTPM is in a stub domain: the guest's suspend,
/// which only dom0 may ask Xen about, reaches the vTPM domain through xvtpmd's note in the
/// device's directory; the restored guest (a new domain, the same `vm` path) continues its
/// TPM. A guest that reboots instead (Xen says reboot) gets a reset one.
#[test]
fn a_saved_and_restored_guest_of_a_stub_domain_finds_its_tpm_as_it_was() {
    let Host { host, xs, bins, disk } = Host::start();
    let d = xvtpmd(&host);
    toolstack::add_domain(&xs, 3, "vtpm-stub").expect("stub domain");
    let vtpm = stub_vtpm(&bins, &host, 3, &disk, 10);
    vtpm.wait_for("through what dom0's xvtpmd writes");
    toolstack::add_domain(&xs, GUEST, "guest").expect("guest");
    toolstack::add_vtpm(&xs, GUEST, 3, 0, UUID).expect("vtpm= line");
    let mut fe = connect(&host, GUEST);
    let r = fe.transmit(&pcr_extend_sha256(16, &[0x26; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    let pcr = pcr16(&mut fe);

    // xl save: the guest suspends (Xen's shutdown reason), then its domain is destroyed.
    host.shut_down(GUEST, xvtpm_xen::ShutdownReason::Suspend).expect("suspend");
    let be = vtpm_backend_path(3, GUEST, 0);
    let suspended = xvtpm_xen::DomainInfo { shutdown: Some(xvtpm_xen::ShutdownReason::Suspend), dying: false };
    wait_note(&xs, &be, &suspended.to_flags().to_string(), &d);
    vtpm.wait_for("is being suspended");
    // A suspended guest does not close its frontend: the device goes with the domain.
    assert!(toolstack::remove_vtpm(&xs, GUEST, 3, 0, Duration::from_secs(10)).expect("remove"), "{}", vtpm.log());
    // Not remove_domain: it would take the vm record the restored domain keeps.
    xs.rm(TxId::NONE, &format!("/local/domain/{GUEST}")).expect("destroy");
    drop(fe);
    // xl restore: a new domain with the guest's `vm` path.
    toolstack::add_domain_of(&xs, 7, "guest", &toolstack::vm_path(GUEST)).expect("restored domain");
    toolstack::add_vtpm(&xs, 7, 3, 0, UUID).expect("its device");
    let mut fe = connect(&host, 7);
    assert_eq!(pcr16(&mut fe), pcr, "PCR 16 after save and restore:\n{}", vtpm.log());
    vtpm.wait_for("continues");

    // `xl save -c` (a checkpoint): suspended, resumed in place (which xenstored does not
    // announce, so the note still says suspended), a command run; then a real save. The note
    // is the same as before, and written again, so the vTPM domain hears of this suspend too.
    let be = vtpm_backend_path(3, 7, 0);
    host.shut_down(7, xvtpm_xen::ShutdownReason::Suspend).expect("checkpoint");
    wait_note(&xs, &be, &suspended.to_flags().to_string(), &d);
    vtpm.wait_for_n("is being suspended", 2);
    host.resume_domain(7).expect("resumed in place");
    let r = fe.transmit(&pcr_extend_sha256(16, &[0x27; 32])).expect("extend after the checkpoint");
    assert_eq!(rc(&r), 0);
    let pcr = pcr16(&mut fe);
    host.shut_down(7, xvtpm_xen::ShutdownReason::Suspend).expect("save");
    vtpm.wait_for_n("is being suspended", 3);
    assert!(toolstack::remove_vtpm(&xs, 7, 3, 0, Duration::from_secs(10)).expect("remove"), "{}", vtpm.log());
    xs.rm(TxId::NONE, "/local/domain/7").expect("destroy");
    drop(fe);
    toolstack::add_domain_of(&xs, 10, "guest", &toolstack::vm_path(GUEST)).expect("restored again");
    toolstack::add_vtpm(&xs, 10, 3, 0, UUID).expect("its device");
    let mut fe = connect(&host, 10);
    assert_eq!(pcr16(&mut fe), pcr, "PCR 16 after a checkpoint, a command, a save and a restore:\n{}", vtpm.log());

    // The restored guest reboots: to Xen a reboot, so its next domain starts reset even with
    // the same `vm` path.
    host.shut_down(10, xvtpm_xen::ShutdownReason::Reboot).expect("reboot");
    let rebooted = xvtpm_xen::DomainInfo { shutdown: Some(xvtpm_xen::ShutdownReason::Reboot), dying: false };
    wait_note(&xs, &vtpm_backend_path(3, 10, 0), &rebooted.to_flags().to_string(), &d);
    assert!(toolstack::remove_vtpm(&xs, 10, 3, 0, Duration::from_secs(10)).expect("remove"), "{}", vtpm.log());
    xs.rm(TxId::NONE, "/local/domain/10").expect("destroy");
    drop(fe);
    toolstack::add_domain_of(&xs, 8, "guest", &toolstack::vm_path(GUEST)).expect("rebooted domain");
    toolstack::add_vtpm(&xs, 8, 3, 0, UUID).expect("its device");
    let mut fe = connect(&host, 8);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "the rebooted guest found its old PCRs:\n{}", vtpm.log());
}

fn wait_note(xs: &Xenstore, be: &str, want: &str, d: &Proc) {
    let end = Instant::now() + Duration::from_secs(15);
    let key = format!("{be}/{}", xvtpm_xen::xenbus::GUEST_DOMAIN_KEY);
    while xs.try_read(TxId::NONE, &key).expect("read").as_deref() != Some(want.as_bytes()) {
        assert!(Instant::now() < end, "no {want} in {key}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A vTPM domain's snapshots are on its disk, which outlives the host: a guest suspended
/// before a host reboot and booted afresh after it, in a domain with the same `vm` path (its
/// domain file fixes `uuid=`), is a new platform and gets a reset TPM, not the saved one.
#[test]
fn a_guest_suspended_before_a_host_reboot_and_booted_afresh_gets_a_reset_tpm() {
    let Host { host, xs, bins, disk } = Host::start();
    let d = xvtpmd(&host);
    toolstack::add_domain(&xs, 3, "vtpm-stub").expect("stub domain");
    let vtpm = stub_vtpm(&bins, &host, 3, &disk, 10);
    toolstack::add_domain(&xs, GUEST, "guest").expect("guest");
    toolstack::add_vtpm(&xs, GUEST, 3, 0, UUID).expect("vtpm= line");
    let mut fe = connect(&host, GUEST);
    let r = fe.transmit(&pcr_extend_sha256(16, &[0x28; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    host.shut_down(GUEST, xvtpm_xen::ShutdownReason::Suspend).expect("suspend");
    vtpm.wait_for("is being suspended");
    // The host goes down with the guest saved; its save file is not restored after the reboot.
    drop((fe, vtpm, d));
    toolstack::remove_vtpm(&xs, GUEST, 3, 0, Duration::from_millis(200)).expect("remove");
    xs.rm(TxId::NONE, &format!("/local/domain/{GUEST}")).expect("destroy");
    xs.rm(TxId::NONE, "/local/domain/3").expect("the vTPM domain");
    let d = xvtpmd_in(&host, "boot-2");
    toolstack::add_domain(&xs, 4, "vtpm-stub").expect("stub domain after the reboot");
    let vtpm = stub_vtpm(&bins, &host, 4, &disk, 10);
    toolstack::add_domain_of(&xs, 6, "guest", &toolstack::vm_path(GUEST)).expect("booted afresh");
    toolstack::add_vtpm(&xs, 6, 4, 0, UUID).expect("its device");
    let mut fe = connect(&host, 6);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "the guest booted after a host reboot found its saved PCRs:\n{}", vtpm.log());
    assert!(!vtpm.log().contains("continues"), "{}\n{}", vtpm.log(), d.log());
}
