//! The Debian package (`scripts/package.sh`), built from this build's binaries: lintian finds
//! no error in it; it installs with apt into a clean Debian 12 root made by mmdebstrap from
//! Debian's packages (its dependencies resolved there), where `systemd-analyze verify` accepts
//! its units (man pages included) and the binaries, the man pages and the configuration are
//! where a Debian user looks for them; removing and purging it keep the vTPM state unless told.
//! Needs root (mmdebstrap's root mode), lintian, mmdebstrap and Debian's mirror.

use std::path::{Path, PathBuf};
use std::process::Command;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const XVTPMD: &str = env!("CARGO_BIN_EXE_xvtpmd");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn in_root(root: &Path, script: &str) -> String {
    run(Command::new("chroot").arg(root).args(["/bin/sh", "-c", script]))
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

#[test]
fn the_package_passes_lintian_installs_into_a_clean_debian_root_and_keeps_state_on_purge() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    assert_eq!(Path::new(XVTPMD).parent(), Some(bins.as_path()));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo").to_path_buf();
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("package");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let out = run(Command::new(repo.join("scripts/package.sh")).arg("--bin-dir").arg(&bins).arg("--out").arg(&work));
    let deb = PathBuf::from(out.lines().find(|l| l.starts_with('/') && l.ends_with(".deb")).expect("the .deb's path"));
    assert!(deb.is_file(), "{out}");

    let lintian = Command::new("lintian").args(["--fail-on", "error", "--tag-display-limit", "0"]).arg(&deb).output();
    let lintian = lintian.expect("lintian (install it: apt install lintian)");
    let said = String::from_utf8_lossy(&lintian.stdout).into_owned();
    eprintln!("lintian:\n{said}");
    assert!(lintian.status.success() && !said.lines().any(|l| l.starts_with("E: ")), "lintian errors:\n{said}");

    // A clean Debian 12 root; apt installs the package there from inside, fetching what it
    // depends on from Debian.
    let root = work.join("root");
    let name = deb.file_name().expect("name").to_string_lossy().into_owned();
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--include=systemd,man-db", "-q"])
        .arg(format!("--customize-hook=copy-in {} /tmp", deb.display()))
        .arg(format!("--customize-hook=chroot \"$1\" apt-get install -y -q /tmp/{name}"))
        .args(["bookworm"])
        .arg(&root));
    let verify = in_root(
        &root,
        "systemd-analyze verify /lib/systemd/system/vtpmmgr.service /lib/systemd/system/xvtpmd.service 2>&1; echo verified",
    );
    assert_eq!(verify.trim(), "verified", "systemd-analyze verify complained:\n{verify}");
    let seen = in_root(
        &root,
        "xvtpm --version; vtpm --version; vtpmmgr --version; xvtpmd --version; man -w xvtpmd vtpm-serve xvtpm-status; \
         readlink /etc/systemd/system/multi-user.target.wants/xvtpmd.service; getent group xvtpm | cut -d: -f1; \
         grep -c . /var/lib/dpkg/info/xvtpm.conffiles; ls /usr/share/bash-completion/completions/xvtpm; \
         grep -a -o '1[.][0-9.]*-debian-xvtpm-tpm' /usr/lib/xvtpm/seabios-xen-tpm.bin | head -n 1; \
         od -An -c -N 4 /usr/lib/xvtpm/acpi-tpm2.bin | tr -d ' '",
    );
    for want in [
        "xvtpm 0.1.0",
        "vtpm 0.1.0",
        "vtpmmgr 0.1.0",
        "xvtpmd 0.1.0",
        "/usr/share/man/man1/xvtpmd.1.gz",
        "/usr/share/man/man1/vtpm-serve.1.gz",
        "/usr/share/man/man1/xvtpm-status.1.gz",
        "/lib/systemd/system/xvtpmd.service",
        "xvtpm",
        "/usr/share/bash-completion/completions/xvtpm",
        // Measured boot of HVM guests: our SeaBIOS build and the TPM2 table.
        "1.16.2-debian-xvtpm-tpm",
        "TPM2",
    ] {
        assert!(
            seen.lines().any(|l| l.trim() == want),
            "{want:?} missing from what the installed package shows:\n{seen}"
        );
    }
    assert_eq!(mode(&root.join("var/lib/xvtpm")), 0o700);
    assert_eq!(mode(&root.join("var/lib/xvtpm/vtpms")), 0o700);
    assert_eq!(mode(&root.join("etc/xvtpm/xvtpmd.toml")), 0o644);

    // Remove, then purge: the vTPM state stays; purge with XVTPM_PURGE_STATE=yes takes it.
    let state = root.join("var/lib/xvtpm/vtpms/5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b");
    std::fs::create_dir_all(&state).expect("a vTPM's state");
    std::fs::write(state.join("permanent.xvtpm"), b"state").expect("state file");
    in_root(&root, "dpkg --remove xvtpm");
    assert!(state.join("permanent.xvtpm").is_file(), "remove took the vTPM state");
    assert!(!root.join("usr/bin/vtpm").exists() && root.join("etc/xvtpm/xvtpmd.toml").is_file());
    let purged = in_root(&root, "dpkg --purge xvtpm 2>&1");
    assert!(state.join("permanent.xvtpm").is_file(), "purge took the vTPM state");
    assert!(purged.contains("vTPM state kept in /var/lib/xvtpm"), "purge must say what it kept: {purged}");
    assert!(!root.join("etc/xvtpm/xvtpmd.toml").exists(), "purge leaves the configuration");
    // (mmdebstrap emptied /tmp.)
    std::fs::copy(&deb, root.join("root").join(&name)).expect("copy the .deb in");
    in_root(&root, &format!("dpkg -i /root/{name} >/dev/null && XVTPM_PURGE_STATE=yes dpkg --purge xvtpm"));
    assert!(!root.join("var/lib/xvtpm").exists(), "XVTPM_PURGE_STATE=yes purge kept the state");
    let _ = std::fs::remove_dir_all(&work);
}
