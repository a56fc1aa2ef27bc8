//! The vtpm with its state key at the vTPM manager, over the simulated Xen: the manager
//! (hardware TPM: Debian's swtpm) serves tpmback in domain 0; the vtpm runs in domain 5,
//! reaching the manager through its own tpmfront device and serving the guest in domain 7.
//! The guest's TPM state survives restarts of both; a vTPM the manager does not know is
//! refused; state files the manager has no key for stop the vtpm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xvtpm_backend::{Backend, BackendConfig, BackendHandle, DeviceFilter};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::{Family, HwTpm};
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::server::XenHandler;
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::Xen;

const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");
const VTPM_UUID: &str = "0a0b0c0d-0e0f-4011-8213-141516171819";
const GUEST_UUID: &str = "1a1b1c1d-1e1f-4021-8223-242526272829";
const STRANGER_UUID: &str = "2a2b2c2d-2e2f-4031-8233-343536373839";

struct Kill(Child, PathBuf);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Kill {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn uuid(s: &str) -> [u8; 16] {
    xvtpm_proto::Uuid::parse(s).expect("uuid").0
}

fn rc(rsp: &[u8]) -> u32 {
    u32::from_be_bytes([rsp[6], rsp[7], rsp[8], rsp[9]])
}

fn swtpm(dir: &Path) -> SwtpmProcess {
    SwtpmProcess::start(dir, true).expect("swtpm (apt-get install swtpm)")
}

fn hw(p: &SwtpmProcess) -> Box<dyn HwTpm + Send> {
    Box::new(
        Swtpm::connect(&Address::Unix(p.data.clone()), &Address::Unix(p.ctrl.clone()), Family::Tpm20).expect("swtpm"),
    )
}

/// The manager serving tpmback in domain 0 (in this process; dropping it stops it).
fn manager(host: &SimHost, store: &Path, tpm: Box<dyn HwTpm + Send>) -> BackendHandle {
    manager_with(host, store, tpm, |_| {})
}

/// [`manager`], set up by `configure` first.
fn manager_with(
    host: &SimHost,
    store: &Path,
    tpm: Box<dyn HwTpm + Send>,
    configure: impl FnOnce(&mut Manager<FileDev>),
) -> BackendHandle {
    // The previous manager's device threads let go of the store within moments of its stop.
    let end = Instant::now() + Duration::from_secs(10);
    let dev = loop {
        match FileDev::open(store, false) {
            Ok(d) => break d,
            Err(e) if Instant::now() < end && e.to_string().contains("in use") => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("store: {e}"),
        }
    };
    let mut m = Manager::open(dev, tpm).expect("manager opens");
    configure(&mut m);
    // Measures vTPM domains the way `vtpmmgr serve --xen` does: from libxl's image record.
    let xs = host.xen(0).xenstore().expect("xenstore");
    let measure = move |domid| xvtpm_vtpmmgr::peer::measure_domain(&xs, domid);
    let handler = Arc::new(XenHandler::new(Arc::new(Mutex::new(m))).measuring(Box::new(measure)));
    Backend::new(Arc::new(host.xen(0)), handler, BackendConfig::serving(DeviceFilter::All)).spawn().expect("backend")
}

fn vtpm_args(host: &SimHost, state: &Path, domid: u16) -> Vec<String> {
    vec![
        "--state-dir".into(),
        state.display().to_string(),
        "--manager".into(),
        "xen:0".into(),
        "--sim".into(),
        host.dir().display().to_string(),
        "--domid".into(),
        domid.to_string(),
    ]
}

fn serve(host: &SimHost, state: &Path, n: u32) -> Kill {
    let log = host.dir().join(format!("vtpm-{n}.log"));
    let child = Command::new(VTPM)
        .args(["serve", "--uuid", GUEST_UUID])
        .args(vtpm_args(host, state, 5))
        .arg("--snapshot-dir")
        .arg(host.dir().join("snapshots"))
        .args(["--guest-life-wait-secs", "10"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("vtpm serve");
    let k = Kill(child, log);
    let end = Instant::now() + Duration::from_secs(30);
    while !k.log().contains("watching") {
        assert!(Instant::now() < end, "vtpm did not start:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    k
}

/// A manager store on `tpm` that knows the vTPM domain's vTPM.
fn provisioned_store(host: &SimHost, tpm: &SwtpmProcess) -> PathBuf {
    let store = host.dir().join("mgr.img");
    let cfg = InitConfig { pcrs: vec![0], ..InitConfig::default() };
    let mut m = Manager::init(FileDev::open(&store, true).expect("store"), hw(tpm), &cfg).expect("init");
    m.provision(uuid(VTPM_UUID), 0, None).expect("provision");
    store
}

/// The vTPM domain (5), whose device goes to the manager in domain 0, and the guest (7),
/// whose device goes to the vTPM domain.
fn vtpm_domain_and_guest(xs: &xvtpm_xen::Xenstore) {
    toolstack::add_domain(xs, 5, "vtpm-guest").expect("vtpm domain");
    toolstack::add_vtpm(xs, 5, 0, 0, VTPM_UUID).expect("the vtpm's device to the manager");
    toolstack::add_domain(xs, 7, "guest").expect("guest domain");
    toolstack::add_vtpm(xs, 7, 5, 0, GUEST_UUID).expect("the guest's device to the vtpm");
    // The guest's life, which the vTPM domain may not read, told as dom0's xvtpmd tells it.
    let vm = toolstack::vm_path(7);
    let start = xs.read(xvtpm_xen::TxId::NONE, &format!("{vm}/start_time")).expect("start_time");
    let life = format!("{vm}@{}", String::from_utf8_lossy(&start));
    let key = format!("/local/domain/5/backend/vtpm/7/0/{}", xvtpm_xen::xenbus::GUEST_LIFE_KEY);
    xs.write(xvtpm_xen::TxId::NONE, &key, life.as_bytes()).expect("the guest's life");
}

#[test]
fn state_survives_restarts_of_vtpm_and_manager() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let tpm = swtpm(&host.dir().join("hwtpm"));
    let store = provisioned_store(&host, &tpm);
    let mgr = manager(&host, &store, hw(&tpm));
    vtpm_domain_and_guest(&xs);

    let state = host.dir().join("vtpm-state");
    let out = Command::new(VTPM).arg("create").args(vtpm_args(&host, &state, 5)).output().expect("create");
    assert!(out.status.success(), "create: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!state.join("tpm2-permall.xvtpm").exists(), "no key-file state: only manager slots");

    let vtpm = serve(&host, &state, 1);
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(7), cfg.clone()).expect("guest connects");
    let r = fe.transmit(&[0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10]).expect("getrandom");
    assert_eq!((rc(&r), r.len()), (0, 28));
    assert_eq!(rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"", b"guest-secret")).expect("cmd")), 0);
    fe.close().expect("close");
    drop(vtpm);
    drop(mgr);

    // Both restart: the manager unseals its store again, the vtpm loads the slot it names.
    let mgr = manager(&host, &store, hw(&tpm));
    let vtpm = serve(&host, &state, 2);
    let mut fe = Frontend::connect(&host.xen(7), cfg).expect("guest reconnects");
    assert_ne!(rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"", b"x")).expect("cmd")), 0, "{}", vtpm.log());
    assert_eq!(rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"guest-secret", b"")).expect("cmd")), 0);
    fe.close().expect("close");
    drop(vtpm);

    // A vTPM the manager was never told about: refused, loudly, and nothing is created.
    toolstack::add_domain(&xs, 6, "stranger").expect("domain");
    toolstack::add_vtpm(&xs, 6, 0, 0, STRANGER_UUID).expect("device");
    let other = host.dir().join("stranger-state");
    let out = Command::new(VTPM).arg("create").args(vtpm_args(&host, &other, 6)).output().expect("create");
    assert!(!out.status.success(), "a vTPM the manager does not know must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused SAVEHASHKEY"), "{err}");

    // State files the manager has no key for (copied to another vTPM): refused, not reset.
    drop(mgr);
    {
        let end = Instant::now() + Duration::from_secs(10);
        let dev = loop {
            match FileDev::open(&store, false) {
                Ok(d) => break d,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("store: {e}"),
            }
        };
        let mut m = Manager::open(dev, hw(&tpm)).expect("open");
        m.provision(uuid(STRANGER_UUID), 0, None).expect("provision the stranger");
    }
    let _mgr = manager(&host, &store, hw(&tpm));
    let copied = host.dir().join("copied-state");
    std::fs::create_dir_all(&copied).expect("dir");
    for f in std::fs::read_dir(&state).expect("ls").flatten() {
        if f.file_name().to_string_lossy().starts_with("managed-") {
            std::fs::copy(f.path(), copied.join(f.file_name())).expect("copy");
        }
    }
    let out = Command::new(VTPM)
        .args(["serve", "--uuid", "3a3b3c3d-3e3f-4041-8243-444546474849"])
        .args(vtpm_args(&host, &copied, 6))
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the manager has no key"), "{err}");
}

/// A guest writing an NV index 1,000 times through the whole stack (tpmfront, the vtpm's
/// libtpms, its state saved through the manager): the hardware TPM behind the manager, counted
/// by a proxy, sees at most 10 NV writes with the daemon's counter window. The manager's save
/// rate is set tight here so that the vtpm is told to retry many times: the guest still sees
/// every write succeed.
#[test]
fn a_guest_writing_nv_a_thousand_times_costs_the_hardware_at_most_ten_nv_writes() {
    use xvtpm_tests::tpm2::{nv_define, nv_read, nv_read_data, nv_write};
    use xvtpm_tis::nvcount::NvWriteCounter;
    use xvtpm_vtpmmgr::pace::{Rate, COUNTER_WINDOW};
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let tpm = swtpm(&host.dir().join("hwtpm"));
    let store = provisioned_store(&host, &tpm);
    let counting = NvWriteCounter::new(hw(&tpm));
    let writes = counting.counter();
    let _mgr = manager_with(&host, &store, Box::new(counting), |m| {
        m.set_counter_window(COUNTER_WINDOW);
        m.saves.rate = Rate { burst: 4, interval: Duration::from_millis(5) };
    });
    vtpm_domain_and_guest(&xs);
    let state = host.dir().join("vtpm-state");
    let out = Command::new(VTPM).arg("create").args(vtpm_args(&host, &state, 5)).output().expect("create");
    assert!(out.status.success(), "create: {}", String::from_utf8_lossy(&out.stderr));
    let vtpm = serve(&host, &state, 1);
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(7), cfg).expect("guest connects");
    const INDEX: u32 = 0x0150_0016;
    assert_eq!(rc(&fe.transmit(&nv_define(INDEX, 4)).expect("define")), 0, "{}", vtpm.log());
    let before = writes.load(std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    for i in 0..1000u32 {
        let r = fe.transmit(&nv_write(INDEX, &i.to_be_bytes())).expect("write");
        assert_eq!(rc(&r), 0, "NV_Write {i}: {}", vtpm.log());
    }
    let took = start.elapsed();
    let r = fe.transmit(&nv_read(INDEX, 4)).expect("read");
    assert_eq!(nv_read_data(&r), Some(&999u32.to_be_bytes()[..]));
    let hw_writes = writes.load(std::sync::atomic::Ordering::SeqCst) - before;
    eprintln!("1000 guest NV_Writes in {took:?}: {hw_writes} hardware NV writes");
    assert!(hw_writes <= 10, "{hw_writes} hardware NV writes for 1000 guest NV writes");
    // Over a tight save rate the vtpm waits; it never fails a command.
    assert!(took >= Duration::from_millis(5 * (1000 - 4)), "the save rate held the guest back ({took:?})");
    fe.close().expect("close");
}

/// A vTPM domain's boot hash is its image as libxl recorded it (kernel, ramdisk, command
/// line): the manager answers GET_BOOT_HASH with it, and once the group approves images, a
/// vTPM domain built from another one gets no key, loudly.
#[test]
fn a_vtpm_domain_built_from_an_unapproved_image_gets_no_key() {
    use xvtpm_vtpmmgr::peer::measure_domain_image;
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let tpm = swtpm(&host.dir().join("hwtpm"));
    let store = host.dir().join("mgr.img");
    let (kernel, evil, ramdisk) =
        (host.dir().join("vmlinuz"), host.dir().join("vmlinuz-evil"), host.dir().join("initrd.img"));
    std::fs::write(&kernel, b"kernel image v1").expect("kernel");
    std::fs::write(&evil, b"kernel image, altered").expect("kernel");
    std::fs::write(&ramdisk, b"initramfs with vtpm").expect("ramdisk");
    let good = measure_domain_image(&kernel, Some(&ramdisk), "console=hvc0").expect("measure");
    {
        let cfg = InitConfig { pcrs: vec![0], ..InitConfig::default() };
        let mut m = Manager::init(FileDev::open(&store, true).expect("store"), hw(&tpm), &cfg).expect("init");
        m.provision(uuid(VTPM_UUID), 0, None).expect("provision");
        m.provision(uuid(STRANGER_UUID), 0, None).expect("provision");
        m.approve(0, &good).expect("approve");
    }
    let _mgr = manager(&host, &store, hw(&tpm));
    let path = |p: &Path| p.display().to_string();
    toolstack::add_domain(&xs, 5, "vtpm-guest").expect("vtpm domain");
    toolstack::record_pv_image(&xs, 5, &path(&kernel), Some(&path(&ramdisk)), "console=hvc0").expect("image");
    toolstack::add_vtpm(&xs, 5, 0, 0, VTPM_UUID).expect("the vtpm's device to the manager");

    // Built from the approved image: it saves its first state.
    let state = host.dir().join("vtpm-state");
    let out = Command::new(VTPM).arg("create").args(vtpm_args(&host, &state, 5)).output().expect("create");
    assert!(out.status.success(), "create: {}", String::from_utf8_lossy(&out.stderr));
    // GET_BOOT_HASH through the domain's own device: Xen's 20 bytes.
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(5), cfg).expect("connect to the manager");
    let r = fe.transmit(&xvtpm_proto::mgr::Request::GetBootHash.encode()).expect("cmd");
    assert_eq!((rc(&r), &r[10..]), (0, &good[..20]));
    fe.close().expect("close");

    // Another vTPM domain, same command line and ramdisk, altered kernel: refused.
    toolstack::add_domain(&xs, 6, "vtpm-evil").expect("domain");
    toolstack::record_pv_image(&xs, 6, &path(&evil), Some(&path(&ramdisk)), "console=hvc0").expect("image");
    toolstack::add_vtpm(&xs, 6, 0, 0, STRANGER_UUID).expect("device");
    let other = host.dir().join("evil-state");
    let out = Command::new(VTPM).arg("create").args(vtpm_args(&host, &other, 6)).output().expect("create");
    assert!(!out.status.success(), "an unapproved image must not get a key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the manager refused this vTPM") && err.contains("not approved"), "{err}");
    // A domain libxl recorded no image for cannot be measured: refused as well.
    toolstack::add_domain(&xs, 8, "vtpm-unknown").expect("domain");
    toolstack::add_vtpm(&xs, 8, 0, 0, STRANGER_UUID).expect("device");
    let out =
        Command::new(VTPM).arg("create").args(vtpm_args(&host, &host.dir().join("s8"), 8)).output().expect("create");
    assert!(!out.status.success(), "an unmeasured domain must not get a key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("the manager refused this vTPM"));
}
