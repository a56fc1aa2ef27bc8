//! TPM 1.2 mode: TrouSerS' tcsd (TCP device) and tpm-tools against `vtpm socket`: version,
//! endorsement key, take ownership, seal and unseal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Tcsd(Child);

impl Drop for Tcsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(port: u16, args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .env("TSS_TCSD_PORT", port.to_string())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (are trousers and tpm-tools installed?)", args[0]))
}

#[test]
fn tcsd_and_tpm_tools_take_ownership_and_seal() {
    let dir = std::env::temp_dir().join(format!("xvtpm-tpm12-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (state, key) = (dir.join("state"), dir.join("key"));
    std::fs::write(&key, [3u8; 32]).expect("key");
    common::create_version(&state, &key, false);
    let vtpm = common::start_version(&state, &key, 1, false);

    // tcsd insists on a config owned by root:tss, mode 0640, and a tss-writable directory.
    let work = dir.join("tcsd");
    std::fs::create_dir_all(&work).expect("tcsd dir");
    let tcsd_port = common::free_ports();
    let conf = work.join("tcsd.conf");
    std::fs::write(&conf, format!("port = {tcsd_port}\nsystem_ps_file = {}/system.data\n", work.display()))
        .expect("conf");
    let chown = Command::new("chown").arg("root:tss").arg(&conf).status().expect("chown");
    assert!(chown.success());
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    assert!(Command::new("chown").arg("tss:tss").arg(&work).status().expect("chown").success());
    let tcsd = Tcsd(
        Command::new("tcsd")
            .arg("-c")
            .arg(&conf)
            .args(["-e", "-f"])
            .env("TCSD_USE_TCP_DEVICE", "1")
            .env("TCSD_TCP_DEVICE_PORT", vtpm.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcsd (is trousers installed?)"),
    );
    let end = Instant::now() + Duration::from_secs(20);
    let version = loop {
        let out = tool(tcsd_port, &["tpm_version"]);
        if out.status.success() || Instant::now() > end {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = String::from_utf8_lossy(&version.stdout);
    assert!(version.status.success() && text.contains("TPM 1.2 Version Info"), "{text}\n{}", vtpm.log());

    for args in [&["tpm_createek"][..], &["tpm_takeownership", "-y", "-z"]] {
        let out = tool(tcsd_port, args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain = dir.join("plain.txt");
    let sealed = dir.join("sealed.blob");
    std::fs::write(&plain, "a TPM 1.2 secret\n").expect("plain");
    let out = tool(
        tcsd_port,
        &["tpm_sealdata", "-z", "-i", plain.to_str().expect("utf-8"), "-o", sealed.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "seal: {}", String::from_utf8_lossy(&out.stderr));
    let out = tool(tcsd_port, &["tpm_unsealdata", "-z", "-i", sealed.to_str().expect("utf-8")]);
    assert!(out.status.success(), "unseal: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a TPM 1.2 secret\n");
    // Ownership is permanent state: a second take-ownership is refused.
    assert!(!tool(tcsd_port, &["tpm_takeownership", "-y", "-z"]).status.success());
    drop(tcsd);
    drop(vtpm);
    let _ = std::fs::remove_dir_all(&dir);
}
