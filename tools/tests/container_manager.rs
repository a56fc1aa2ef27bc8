//! `xvtpm container create --manager-socket`: a container vTPM whose state key the manager
//! keeps (here a manager in this process on Debian's swtpm). Creating provisions it at the
//! manager and leaves no key file; destroying deletes it there; a failed create leaves
//! nothing behind at either end. (Serving needs /dev/vtpmx: `container_vm.rs`.)

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::manager;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");

fn run(root: &Path, args: &[&str]) -> Output {
    run_with(root, &xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM).join("vtpm"), args)
}

fn run_with(root: &Path, vtpm: &Path, args: &[&str]) -> Output {
    Command::new(XVTPM)
        .arg("container")
        .args(args)
        .arg("--root")
        .arg(root)
        .arg("--run-dir")
        .arg(root.join("run"))
        .arg("--vtpm")
        .arg(vtpm)
        .output()
        .expect("xvtpm")
}

fn admin(sock: &Path, args: &[&str]) -> Output {
    Command::new(XVTPM).args(args).arg("--admin-socket").arg(sock).output().expect("xvtpm")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn a_container_vtpm_keeps_its_key_at_the_manager() {
    let dir = std::env::temp_dir().join(format!("xvtpm-container-mgr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (_tpm, vtpm_sock, admin_sock) = manager(&dir);
    let root = dir.join("containers");
    let (vs, asock) = (vtpm_sock.to_str().expect("utf-8"), admin_sock.to_str().expect("utf-8"));

    let o = run(&root, &["create", "web1", "--no-start", "--manager-socket", vs, "--admin-socket", asock]);
    assert!(o.status.success(), "{}", text(&o));
    let c = root.join("web1");
    assert!(!c.join("key").exists(), "no key file: the manager keeps the key");
    assert!(c.join("token").exists() && c.join("state").is_dir());
    let listed = text(&run(&root, &["list", "--json"]));
    let uuid = listed
        .split("\"vtpm_uuid\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no vtpm_uuid in {listed}"))
        .to_string();
    assert!(listed.contains("{\"name\":\"web1\",\"running\":false,\"key\":\"manager\""), "{listed}");
    // `vtpm create` manufactured the TPM and stored its key at the manager.
    let shown = admin(&admin_sock, &["vtpm", "show", &uuid, "--json"]);
    assert!(text(&shown).contains("\"has_key\":true"), "{}", text(&shown));

    // A second one with the same name is refused and changes nothing at the manager.
    let before = text(&admin(&admin_sock, &["vtpm", "list"]));
    let again = run(&root, &["create", "web1", "--no-start", "--manager-socket", vs, "--admin-socket", asock]);
    assert!(!again.status.success() && text(&again).contains("exists"), "{}", text(&again));
    assert_eq!(text(&admin(&admin_sock, &["vtpm", "list"])), before);

    // A create that fails before provisioning (no such group) or after it (`vtpm create`
    // fails) leaves nothing at either end.
    let no_group =
        run(&root, &["create", "web2", "--no-start", "--manager-socket", vs, "--admin-socket", asock, "--group", "7"]);
    assert!(!no_group.status.success() && text(&no_group).contains("group 7"), "{}", text(&no_group));
    let failing = run_with(
        &root,
        Path::new("/bin/false"),
        &["create", "web2", "--no-start", "--manager-socket", vs, "--admin-socket", asock],
    );
    assert!(!failing.status.success() && text(&failing).contains("vtpm create failed"), "{}", text(&failing));
    assert!(!root.join("web2").exists());
    assert_eq!(text(&admin(&admin_sock, &["vtpm", "list"])), before);

    // Destroy: deleted at the manager, then here.
    let d = run(&root, &["destroy", "web1"]);
    assert!(d.status.success(), "{}", text(&d));
    assert_eq!(admin(&admin_sock, &["vtpm", "show", &uuid]).status.code(), Some(3), "gone at the manager");
    assert!(!c.exists());
    assert_eq!(run(&root, &["destroy", "web1"]).status.code(), Some(3), "no such container vTPM");
    let _ = std::fs::remove_dir_all(&dir);
}
