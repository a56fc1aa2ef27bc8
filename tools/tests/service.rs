//! The packaged dom0 service under QEMU-emulated Xen (Xen 4.17, xl, stock guest kernels): the
//! .deb built from this build's binaries is installed with dpkg in dom0; the manager (on dom0's
//! TPM through /dev/tpmrm0) and xvtpmd start with their units' ExecStart lines (that dom0 has no
//! systemd). Three PV guests from plain domain files (one `vtpm=` line each, created on first
//! use) get their own TPMs; a killed vtpm is restarted by the daemon and its guest keeps PCR 16;
//! xvtpmd restarted under running guests keeps theirs; a guest saved and restored with xl keeps
//! its PCR 16 (its vtpm stopped with the device, a new one continues it); `xl destroy` stops that guest's vtpm; with `auto-create =
//! false` an unknown uuid is refused by name; `xvtpm status --json` shows it all. Every vtpm
//! runs in its sandbox (checked from /proc: uid, groups, capabilities, filter, mounts, the Xen
//! devices it holds, its domain helper), and one made to call what its filter forbids (with
//! ptrace, tests/harness/syscall-inject.c) is killed, logged and resumed while the others go on.
//! A guest cannot write an HVM TPM request into dom0's xenstore (each tries, with Xen's client).
//! Scenario: tests/harness/xen-service-dom0-init.sh.

use std::path::PathBuf;

use xvtpm_tests::xen_qemu;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");

/// The first reported line containing `key`, from `key` on.
fn line<'a>(c: &'a xen_qemu::Console, key: &str) -> &'a str {
    c.report().into_iter().find_map(|l| l.find(key).map(|i| &l[i..])).unwrap_or("")
}

/// The full PCR 16 a guest reported when ready.
fn ready_pcr(c: &xen_qemu::Console, guest: &str) -> String {
    let l = line(c, &format!("SVC {guest} svc ready pcr16 "));
    l.rsplit(' ').next().unwrap_or("").to_string()
}

#[test]
fn the_packaged_service_serves_guests_from_plain_domain_files() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-service");
    xen_qemu::package_into(&img, &bins);
    let c = xen_qemu::run(&img, &bins, "service", xen_qemu::Tpm::ForDom0, 1500);
    let ctx = || c.ctx();
    assert!(line(&c, "installed: ").contains("xvtpm 0.1.0 install ok installed"), "dpkg -i; {}", ctx());

    // Three guests, three TPMs: PCR 16 extended once, twice, three times from zero.
    let pcrs: Vec<String> = ["g1", "g2", "g3"].iter().map(|g| ready_pcr(&c, g)).collect();
    for (g, p) in ["g1", "g2", "g3"].iter().zip(&pcrs) {
        assert!(p.starts_with("0x") && p.len() == 66, "{g} has no TPM: {p:?}; {}", ctx());
    }
    assert!(pcrs[0] != pcrs[1] && pcrs[1] != pcrs[2] && pcrs[0] != pcrs[2], "separate TPMs: {pcrs:?}");
    let status1 = line(&c, "SVCSTATUS1 ");
    for u in ["11111111-", "22222222-", "33333333-"] {
        assert!(status1.contains(u), "status lists {u}: {status1}; {}", ctx());
    }
    assert_eq!(status1.matches("\"state\":\"running\"").count(), 3, "{status1}");
    // Each guest, as an attacker, tried to request an HVM TPM (another guest's vTPM) by
    // writing where the device model's wrapper writes: refused by xenstored, nothing served.
    let req = line(&c, "SVCHVMREQ ");
    // (Its client works: it read its domain id and wrote its own data directory.)
    let (tries, rest) = req.trim_start_matches("SVCHVMREQ ").split_once(" requests: ").unwrap_or(("", ""));
    let refused = tries.split('|').filter(|s| s.starts_with("svc request write refused (domain ")).collect::<Vec<_>>();
    assert_eq!(refused.len(), 3, "{req}; {}", ctx());
    for r in refused {
        let dom = r.trim_start_matches("svc request write refused (domain ");
        assert!(dom.starts_with(|ch: char| ch.is_ascii_digit()) && r.contains("own data write ok"), "{r}");
    }
    assert!(!tries.contains("ALLOWED") && !rest.contains("uuid =") && !rest.contains("state ="), "{req}");
    assert!(rest.ends_with("hvm vtpms: 0"), "xvtpmd served no request: {req}");

    // Each vtpm in its sandbox: a uid of its own from the range (its state directory's owner,
    // mode 0700), its gid, the manager socket's group (101 in this image), no capabilities,
    // no_new_privs, the filter, no core files, and a root with only its own directories.
    let mut uids = Vec::new();
    for (g, u) in [
        ("g1", "11111111-1111-4111-8111-111111111111"),
        ("g2", "22222222-2222-4222-8222-222222222222"),
        ("g3", "33333333-3333-4333-8333-333333333333"),
    ] {
        let sb = line(&c, &format!("SVCSANDBOX {g} "));
        let get =
            |k: &str| sb.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap_or("").to_string();
        let uid: u32 = get("uid").parse().unwrap_or_else(|_| panic!("{g}: no uid in {sb:?}; {}", ctx()));
        assert!((0x7000_0000..0x7001_0000).contains(&uid), "{g} runs as uid {uid}: {sb}; {}", ctx());
        assert_eq!(get("gid"), uid.to_string(), "{sb}");
        assert_eq!(get("groups"), "101", "the manager socket's group: {sb}");
        for k in ["capeff", "capprm"] {
            assert_eq!(get(k), "0000000000000000", "{g} {k}: {sb}");
        }
        assert_eq!((get("nnp").as_str(), get("seccomp").as_str(), get("core").as_str()), ("1", "2", "0"), "{sb}");
        let want = format!("/,/run/xvtpm/mgr,/run/xvtpm/snapshots/{u},/var/lib/xvtpm/vtpms/{u}/state,");
        assert_eq!(get("mounts"), want, "{g}'s root shows its own directories and nothing else: {sb}");
        assert_eq!(get("vtpms"), format!("{u},"), "{g} sees no other vTPM: {sb}");
        assert_eq!(get("etc"), "1", "no /etc in its root (one line: the error): {sb}");
        assert_eq!(get("state"), format!("drwx------/{uid}"), "{g}'s state directory is its own: {sb}");
        // Grant mapping and its event channel handle, no privcmd and no xenstore device (the
        // domain helper holds them).
        assert_eq!(get("xendevs"), "evtchn,gntdev,", "{g}'s Xen devices: {sb}");
        uids.push(uid);
    }
    // Its domain helper: the same uid, its own filter, no capabilities; it, not the vtpm,
    // holds privcmd (and its hypercall page's device).
    for (g, uid) in ["g1", "g2", "g3"].iter().zip(&uids) {
        let h = line(&c, &format!("SVCHELPER {g} "));
        let get =
            |k: &str| h.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap_or("").to_string();
        assert!(get("helper").parse::<u32>().is_ok(), "{g} has no domain helper: {h}; {}", ctx());
        assert_eq!(get("uid"), uid.to_string(), "{h}");
        assert_eq!(
            (get("seccomp").as_str(), get("nnp").as_str(), get("capeff").as_str()),
            ("2", "1", "0000000000000000"),
            "{h}"
        );
        assert!(get("xendevs").contains("privcmd"), "the helper holds privcmd: {h}");
        eprintln!("memory: {h}");
    }
    uids.dedup();
    assert_eq!(uids.len(), 3, "one uid per vTPM: {uids:?}");
    // xvtpmd kept CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, KILL, SETGID, SETUID, IPC_LOCK,
    // SYS_CHROOT and SYS_ADMIN: nothing else, for itself or any vtpm it starts.
    assert_eq!(line(&c, "SVCDAEMONCAPS "), "SVCDAEMONCAPS eff=00000000002440ef bnd=00000000002440ef", "{}", ctx());

    // The killed vtpm came back, with g2's PCR 16.
    let killed = line(&c, "SVC killed g2 vtpm ");
    let short = |p: &str| p[..18].to_string();
    assert!(killed.contains(&format!("pcr16 {}", short(&pcrs[1]))), "after the kill: {killed}; {}", ctx());
    let inject = line(&c, "SVC inject: ");
    assert!(
        inject.contains("made socket(AF_INET)") && inject.contains("killed by signal 31"),
        "g2's vtpm, made to open a network socket, is killed by its filter: {inject}; {}",
        ctx()
    );
    let meanwhile = line(&c, "SVC meanwhile g1: ");
    assert!(
        meanwhile.contains(&format!("pcr16 {}", short(&pcrs[0]))),
        "g1 while g2's vtpm died: {meanwhile}; {}",
        ctx()
    );
    let sigsys = line(&c, "SVC sigsys log: ");
    assert!(
        sigsys.contains("vtpm for 22222222-2222-4222-8222-222222222222")
            && sigsys.contains("killed by its sandbox for a forbidden system call"),
        "the daemon names the guest and the cause: {sigsys}; {}",
        ctx()
    );
    let counted = line(&c, "SVCSTATUSK ");
    assert!(counted.contains("\"restarts\":1"), "the killed vtpm's restart is counted: {counted}; {}", ctx());
    let restarted = line(&c, "SVC daemon restarted: ");
    assert!(
        restarted.contains("g1 svc tick")
            && restarted.contains(&format!("pcr16 {}", short(&pcrs[0])))
            && restarted.contains(&format!("pcr16 {}", short(&pcrs[1]))),
        "after xvtpmd's restart: {restarted}; {}",
        ctx()
    );
    let restored = line(&c, "SVC g1 restored: ");
    assert!(
        restored.contains(&format!("pcr16 {}", short(&pcrs[0]))),
        "after xl save and restore: {restored}; {}",
        ctx()
    );
    let g3 = line(&c, "SVC g3 vtpm ");
    assert!(g3.starts_with("SVC g3 vtpm ") && g3.ends_with(" stopped"), "xl destroy: {g3}; {}", ctx());
    // The unknown uuid: xl create fails (the backend closed the device), the log says why.
    assert!(line(&c, "SVC g4 xl: ").starts_with("SVC g4 xl: 1 failed"), "{}; {}", line(&c, "SVC g4 xl: "), ctx());
    let refused = line(&c, "SVC g4 refused: ");
    assert!(
        refused.contains("vtpm 0: vTPM 44444444-4444-4444-8444-444444444444: no vTPM here")
            && refused.contains("auto-create = true"),
        "the unknown uuid: {refused}; {}",
        ctx()
    );
    let status2 = line(&c, "SVCSTATUS2 ");
    assert_eq!(status2.matches("\"state\":\"running\"").count(), 2, "g1 and g2 still served: {status2}; {}", ctx());
    assert!(!status2.contains("33333333-"), "the destroyed guest's vTPM is gone from the status: {status2}");
    assert!(c.passed && c.text.contains("RESULT PASS"), "{}", ctx());
}
