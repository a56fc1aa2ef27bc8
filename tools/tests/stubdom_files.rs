//! `xvtpm stubdom`: the disks and domain files of the stub-domain deployment, as files (the
//! QEMU-emulated Xen test, `stubdom_e2e.rs`, boots them).

use std::path::Path;
use std::process::{Command, Output};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");

fn xvtpm(args: &[&str]) -> Output {
    Command::new(XVTPM).args(args).output().expect("xvtpm")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A file inside an ext4 image, read with e2fsprogs' debugfs.
fn ext4_file(img: &Path, name: &str) -> Option<String> {
    let o = Command::new("debugfs").args(["-R", &format!("cat /{name}")]).arg(img).output().expect("debugfs");
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    let missing = String::from_utf8_lossy(&o.stderr).contains("File not found");
    (!missing).then_some(s)
}

#[test]
fn manager_and_vtpm_domain_files_and_disks() {
    let dir = tempdir();
    let p = |n: &str| dir.join(n).to_str().expect("utf-8").to_string();
    let o = xvtpm(&["stubdom", "manager", "--disk", &p("mgr.img"), "--config", &p("mgr.cfg"), "--images", "/img"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("xvtpm.init"), "the first start is explained: {}", text(&o));
    let cfg = std::fs::read_to_string(dir.join("mgr.cfg")).expect("config");
    for line in [
        "name = \"vtpmmgr\"",
        "kernel = \"/img/vmlinuz\"",
        "ramdisk = \"/img/vtpmmgr-stubdom.cpio.xz\"",
        "iomem = [ \"fed40,5\" ]",
        "memory = 128",
    ] {
        assert!(cfg.lines().any(|l| l == line), "{line:?} missing in\n{cfg}");
    }
    assert!(cfg.contains(&format!("disk = [ \"{},raw,xvda,w\" ]", p("mgr.img"))), "{cfg}");
    assert_eq!(std::fs::metadata(dir.join("mgr.img")).expect("disk").len(), 16 << 20);

    let guest = "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b";
    let o = xvtpm(&[
        "stubdom",
        "vtpm",
        "--name",
        "vtpm-g1",
        "--uuid",
        guest,
        "--disk",
        &p("g1.img"),
        "--config",
        &p("g1.cfg"),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let json = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(json.contains(&format!("\"uuid\":\"{guest}\"")), "{json}");
    assert!(json.contains(&format!("backend=vtpm-g1,uuid={guest}")), "the guest's line: {json}");
    let vtpm_uuid = json.split("\"vtpm_uuid\":\"").nth(1).and_then(|r| r.get(..36)).expect("vtpm_uuid").to_string();
    let cfg = std::fs::read_to_string(dir.join("g1.cfg")).expect("config");
    assert!(cfg.contains(&format!("vtpm = [ \"backend=vtpmmgr,uuid={vtpm_uuid}\" ]")), "{cfg}");
    assert!(cfg.contains("ramdisk = \"/usr/lib/xvtpm/vtpm-stubdom.cpio.xz\""), "{cfg}");
    // The disk says whom it serves and asks for its TPM to be made.
    let img = dir.join("g1.img");
    assert_eq!(ext4_file(&img, "xvtpm.conf").as_deref(), Some(format!("uuid={guest}\ntpm=2.0\n").as_str()));
    assert_eq!(ext4_file(&img, "create").as_deref(), Some(""));
    assert_eq!(ext4_file(&img, "nonexistent"), None, "the debugfs check can fail");

    // Nothing is overwritten: a second run with the same disk fails and leaves it as it was.
    let before = std::fs::read(&img).expect("disk");
    let o = xvtpm(&["stubdom", "vtpm", "--name", "vtpm-g1", "--disk", &p("g1.img"), "--config", &p("other.cfg")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("exists; not overwritten"), "{}", text(&o));
    assert_eq!(std::fs::read(&img).expect("disk"), before);
    assert!(!dir.join("other.cfg").exists());
    // Malformed input is refused before anything is made.
    let o = xvtpm(&["stubdom", "vtpm", "--name", "bad name", "--disk", &p("x.img"), "--config", &p("x.cfg")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o =
        xvtpm(&["stubdom", "vtpm", "--name", "x", "--uuid", "nope", "--disk", &p("x.img"), "--config", &p("x.cfg")]);
    assert!(text(&o).contains("malformed uuid"), "{}", text(&o));
    assert!(!dir.join("x.img").exists() && !dir.join("x.cfg").exists());
    // A TPM 1.2 vTPM.
    let o =
        xvtpm(&["stubdom", "vtpm", "--name", "v12", "--tpm1.2", "--disk", &p("v12.img"), "--config", &p("v12.cfg")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(ext4_file(&dir.join("v12.img"), "xvtpm.conf").is_some_and(|c| c.contains("tpm=1.2\n")));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("xvtpm-stubdom-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}
