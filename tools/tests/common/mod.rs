//! What several of the tools' test binaries need.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::Family;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::server;
use xvtpm_vtpmmgr::store::dev::FileDev;

/// A manager in this process on Debian's swtpm (a new store in `dir`), serving its vTPM socket
/// and its admin socket: (the swtpm, the vTPM socket, the admin socket).
pub fn manager(dir: &Path) -> (SwtpmProcess, PathBuf, PathBuf) {
    let p = SwtpmProcess::start(&dir.join("tpm"), true).expect("swtpm (apt-get install swtpm)");
    let tpm =
        Swtpm::connect(&Address::Unix(p.data.clone()), &Address::Unix(p.ctrl.clone()), Family::Tpm20).expect("connect");
    let dev = FileDev::open(&dir.join("mgr.img"), true).expect("store");
    let m = Manager::init(dev, Box::new(tpm), &InitConfig { pcrs: vec![0], ..InitConfig::default() }).expect("init");
    let m = Arc::new(Mutex::new(m));
    let (vtpm_sock, admin_sock) = (dir.join("mgr.sock"), dir.join("admin.sock"));
    server::serve_unix(m.clone(), &vtpm_sock, false, 16).expect("vTPM socket");
    server::serve_unix(m, &admin_sock, true, 16).expect("admin socket");
    (p, vtpm_sock, admin_sock)
}

/// A manager with its admin and vTPM sockets in `dir` (its swtpm lives as long as it).
pub struct Site {
    pub _tpm: SwtpmProcess,
    pub admin: PathBuf,
    pub vtpms: PathBuf,
}

pub fn site(dir: &Path) -> Site {
    std::fs::create_dir_all(dir).expect("dir");
    let (p, vtpms, admin) = manager(dir);
    Site { _tpm: p, admin, vtpms }
}

/// `xvtpm ARGS` against `s`'s manager.
pub fn xvtpm(s: &Site, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xvtpm")).args(args).arg("--admin-socket").arg(&s.admin).output().expect("xvtpm")
}

/// What a command that must succeed printed.
pub fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
