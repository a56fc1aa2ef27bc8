//! The `vtpmmgr` daemon with Debian's swtpm (TPM 2.0 and 1.2) as the hardware TPM: vTPMs that may act
//! only for themselves, hostile messages, and kill -9 at 100 random moments during updates
//! losing no acknowledged record.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use xvtpm_proto::mgr::{ord as proto, status, TAG_REQ, TAG_REQ2};
use xvtpm_tis::Family;
use xvtpm_vtpmmgr::admin::Admin;
use xvtpm_vtpmmgr::server::Client;
use xvtpm_vtpmmgr::Error;

const BIN: &str = env!("CARGO_BIN_EXE_vtpmmgr");

use common::Daemon;

fn init(store: &Path, hw: &common::HwSwtpm) {
    common::init_store(store, hw, "0,16");
}

fn serve(store: &Path, hw: &common::HwSwtpm, dir: &Path, log: &str) -> Daemon {
    serve_with(store, hw, dir, log, &[])
}

fn serve_with(store: &Path, hw: &common::HwSwtpm, dir: &Path, log: &str, extra: &[&str]) -> Daemon {
    let (sock, admin) = (dir.join("mgr.sock"), dir.join("admin.sock"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&admin);
    let child = Command::new(BIN)
        .args(["serve", "--pcrs", "0,16", "--store"])
        .arg(store)
        .args(["--tpm", &hw.arg()])
        .arg("--socket")
        .arg(&sock)
        .arg("--admin-socket")
        .arg(&admin)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).expect("log"))
        .spawn()
        .expect("vtpmmgr serve");
    let end = Instant::now() + Duration::from_secs(20);
    // Both sockets: the admin socket is made after the vTPM socket.
    while Client::connect(&sock).is_err() || Client::connect(&admin).is_err() {
        assert!(
            Instant::now() < end,
            "manager did not start: {}",
            std::fs::read_to_string(dir.join(log)).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Daemon(child)
}

#[test]
fn serve_refuses_a_store_sealed_to_other_pcrs() {
    let dir = common::tmpdir("pcrs");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    init(&store, &hw);
    // Sealed to PCRs 0 and 16; this manager is configured for 0-7.
    let out = Command::new(BIN)
        .args(["serve", "--store"])
        .arg(&store)
        .args(["--tpm", &hw.arg()])
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sealed to PCRs [0, 16]") && err.contains("expects PCRs [0, 1, 2, 3, 4, 5, 6, 7]"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn provision(dir: &Path, token: &[u8; 32]) -> [u8; 16] {
    Admin::connect(&dir.join("admin.sock")).expect("admin").provision(None, 0, Some(token)).expect("provision")
}

fn bind(c: &mut Client, uuid: &[u8; 16], token: &[u8; 32]) -> u32 {
    c.call(TAG_REQ2, proto::BIND, &[&uuid[..], token].concat()).expect("bind").0
}

#[test]
fn tpm2_a_vtpm_gets_only_what_it_is_entitled_to() {
    entitled(Family::Tpm20);
}

#[test]
fn tpm12_a_vtpm_gets_only_what_it_is_entitled_to() {
    entitled(Family::Tpm12);
}

fn entitled(family: Family) {
    let dir = common::tmpdir(&format!("entitled-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
    let store = dir.join("store.img");
    init(&store, &hw);
    let _d = serve(&store, &hw, &dir, "mgr.log");
    let sock = dir.join("mgr.sock");
    let (ta, tb) = ([0xA1u8; 32], [0xB2u8; 32]);
    let (ua, ub) = (provision(&dir, &ta), provision(&dir, &tb));
    let blob_a: Vec<u8> = (0..52).collect();

    let mut a = Client::connect(&sock).expect("a");
    assert_eq!(bind(&mut a, &ua, &ta), status::SUCCESS);
    assert_eq!(a.call(TAG_REQ, proto::SAVEHASHKEY, &blob_a).expect("save").0, status::SUCCESS);
    assert_eq!(a.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load"), (status::SUCCESS, blob_a.clone()));

    // A client with A's token cannot become B, and then acts for nobody.
    let mut x = Client::connect(&sock).expect("x");
    assert_eq!(x.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("unbound").0, status::AUTHFAIL);
    assert_eq!(bind(&mut x, &ub, &ta), status::AUTHFAIL);
    assert_eq!(x.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load").0, status::AUTHFAIL);
    assert_eq!(x.call(TAG_REQ, proto::SAVEHASHKEY, &blob_a).expect("save").0, status::AUTHFAIL);
    assert_eq!(bind(&mut x, &[7; 16], &ta), status::AUTHFAIL, "an unknown uuid answers as a wrong token does");
    // Management is for the admin socket only.
    let (st, body) = x.call(TAG_REQ2, proto::VTPM_LIST, &[0; 8]).expect("list");
    assert_eq!((st, body.len()), (status::AUTHFAIL, 0));
    // B sees its own (empty) slot, not A's key.
    let mut b = Client::connect(&sock).expect("b");
    assert_eq!(bind(&mut b, &ub, &tb), status::SUCCESS);
    assert_eq!(b.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load"), (status::BAD_PARAMETER, vec![]));

    // Hostile messages: a size that lies, an unknown tag, a short SAVEHASHKEY.
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).expect("raw");
    use std::io::{Read, Write};
    raw.write_all(&[0x01, 0xC1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2]).expect("write");
    let mut r = [0u8; 10];
    raw.read_exact(&mut r).expect("an error reply before the drop");
    assert_eq!(u32::from_be_bytes([r[6], r[7], r[8], r[9]]), status::SIZE);
    assert_eq!(a.call(0x1234, 1, &[]).expect("tag").0, status::BADTAG);
    assert_eq!(a.call(TAG_REQ, proto::SAVEHASHKEY, &[1; 10]).expect("short").0, status::BAD_PARAMETER);
    assert_eq!(a.call(TAG_REQ, 99, &[]).expect("ordinal").0, status::BAD_ORDINAL);
    // A still works and its key is intact.
    assert_eq!(a.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load"), (status::SUCCESS, blob_a));
    let mut admin = Admin::connect(&dir.join("admin.sock")).expect("admin");
    let listed = admin.list(0).expect("list");
    assert!(listed.contains(&ua) && listed.contains(&ub) && listed.len() == 2, "{listed:?}");
    // A's uuid deleted and provisioned anew with another token: A's old connection acts for
    // nobody.
    admin.delete(&ua).expect("delete");
    admin.provision(Some(ua), 0, Some(&[0xC3; 32])).expect("provision anew");
    assert_eq!(a.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load").0, status::AUTHFAIL);
    assert_eq!(a.call(TAG_REQ, proto::SAVEHASHKEY, &[1; 52]).expect("save").0, status::AUTHFAIL);
    let _ = std::fs::remove_dir_all(&dir);
}

fn blob(n: u32) -> Vec<u8> {
    let mut b = vec![0u8; 52];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b[4..8].copy_from_slice(&(!n).to_be_bytes());
    b
}

#[test]
fn tpm2_kill_9_at_100_random_moments_loses_no_acknowledged_record() {
    kill9(Family::Tpm20);
}

#[test]
fn tpm12_kill_9_at_100_random_moments_loses_no_acknowledged_record() {
    kill9(Family::Tpm12);
}

fn kill9(family: Family) {
    let dir: PathBuf = common::tmpdir(&format!("kill9-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
    let store = dir.join("store.img");
    init(&store, &hw);
    let token = [0x33u8; 32];
    let uuid = {
        let _d = serve(&store, &hw, &dir, "first.log");
        provision(&dir, &token)
    };
    let mut rng = rand::thread_rng();
    let mut acked: Option<u32> = None;
    let mut next = 1u32;
    for round in 0..100 {
        let d = serve(&store, &hw, &dir, "mgr.log");
        let mut c = Client::connect(&dir.join("mgr.sock")).expect("connect");
        assert_eq!(bind(&mut c, &uuid, &token), status::SUCCESS, "round {round}");
        let (st, got) = c.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load");
        match acked {
            None => assert!(st == status::BAD_PARAMETER || got == blob(1), "round {round}: nothing saved yet"),
            Some(n) => {
                assert_eq!(st, status::SUCCESS, "round {round}: the acknowledged record is gone");
                assert!(got == blob(n) || got == blob(n + 1), "round {round}: neither {n} nor {}", n + 1);
                next = if got == blob(n) { n + 1 } else { n + 2 };
                acked = Some(if got == blob(n) { n } else { n + 1 });
            }
        }
        // Save in a loop until killed at a random moment.
        let pid = d.0.id();
        let delay = Duration::from_micros(rng.gen_range(0..40_000));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // As an operator or the OOM killer would.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        });
        loop {
            match c.call(TAG_REQ, proto::SAVEHASHKEY, &blob(next)) {
                Ok((status::SUCCESS, _)) => {
                    acked = Some(next);
                    next += 1;
                }
                // Over the vTPM's save rate: wait and retry, as a vTPM does.
                Ok((status::RETRY, _)) => std::thread::sleep(Duration::from_millis(20)),
                Ok((st, _)) => panic!("round {round}: save refused with {st}"),
                Err(_) => break,
            }
        }
        killer.join().expect("killer");
        drop(d);
    }
    assert!(next > 100, "saves happened ({next})");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn groups() {
    let dir = common::tmpdir("groups");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    init(&store, &hw);
    let _d = serve(&store, &hw, &dir, "mgr.log");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(dir.join(p)).expect("socket").permissions().mode() & 0o777;
    assert_eq!((mode("admin.sock"), mode("mgr.sock")), (0o600, 0o660));
    let mut a = Admin::connect(&dir.join("admin.sock")).expect("admin");
    let g = a.group_new().expect("group");
    assert_eq!(g.number, 1);
    let v = a.provision(None, 1, None).expect("provision into group 1");
    assert!(matches!(a.provision(None, 9, None), Err(Error::NotFound(_))), "no group 9");
    let groups = a.groups().expect("groups");
    assert_eq!(groups.iter().map(|g| (g.number, g.vtpms)).collect::<Vec<_>>(), vec![(0, 0), (1, 1)]);
    assert_eq!(groups[1].uuid, g.uuid);
    assert_eq!(a.list(1).expect("list"), vec![v]);
    assert!(a.list(0).expect("list").is_empty());
    let shown = a.show(&v).expect("show");
    assert_eq!((shown.group, shown.has_key), (1, false));
    assert!(matches!(a.show(&g.uuid), Err(Error::UnknownVtpm(_))), "a group's uuid is no vTPM");
    assert!(a.group_delete(1).is_err(), "not empty");
    assert!(a.group_delete(0).is_err(), "group 0 stays");
    let mut c = Client::connect(&dir.join("mgr.sock")).expect("connect");
    assert_eq!(bind(&mut c, &g.uuid, &[0; 32]), status::AUTHFAIL);
    assert_eq!(c.call(TAG_REQ2, proto::GROUP_NEW, &[]).expect("call").0, status::AUTHFAIL, "admin only");
    a.delete(&v).expect("delete");
    assert!(matches!(a.delete(&v), Err(Error::UnknownVtpm(_))));
    a.group_delete(1).expect("delete the empty group");
    assert_eq!(a.groups().expect("groups").len(), 1);
    // More vTPMs than one reply holds (255): the list comes in pages.
    let many: Vec<[u8; 16]> = (0..300).map(|_| a.provision(None, 0, None).expect("provision")).collect();
    let listed = a.list(0).expect("list");
    assert_eq!(listed.len(), 300);
    assert!(many.iter().all(|u| listed.contains(u)));
    // More groups than one reply holds (1018 numbers): paged too.
    for _ in 0..1100 {
        a.group_new().expect("group");
    }
    let groups = a.groups().expect("groups");
    assert_eq!(groups.iter().map(|g| g.number).collect::<Vec<_>>(), (0..=1100).collect::<Vec<u32>>());
    // And more approved hashes of one group than one reply holds (127).
    let hashes: Vec<[u8; 32]> =
        (0..200u32).map(|i| <sha2::Sha256 as sha2::Digest>::digest(i.to_be_bytes()).into()).collect();
    for h in &hashes {
        assert!(a.approve(5, h).expect("approve"));
    }
    let mut approved = a.approved(5).expect("approved");
    approved.sort();
    let mut want = hashes.clone();
    want.sort();
    assert_eq!(approved, want);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that connects in a loop cannot take more than `--max-clients` connections; the
/// ones beyond are closed at once, and a freed slot serves the next client.
#[test]
fn connections_beyond_the_cap_are_closed() {
    let dir: PathBuf = common::tmpdir("cap");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    init(&store, &hw);
    let _d = serve_with(&store, &hw, &dir, "mgr.log", &["--max-clients", "3"]);
    let token = [0x44u8; 32];
    let uuid = provision(&dir, &token);
    // Served: connect and BIND (the start-up probes may hold a slot for a moment).
    let served = || -> Option<Client> {
        let mut c = Client::connect(&dir.join("mgr.sock")).ok()?;
        match c.call(TAG_REQ2, proto::BIND, &[&uuid[..], &token].concat()) {
            Ok((status::SUCCESS, _)) => Some(c),
            _ => None,
        }
    };
    let within = |f: &dyn Fn() -> Option<Client>| {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(c) = f() {
                return c;
            }
            assert!(Instant::now() < end, "no slot was freed");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut clients: Vec<Client> = (0..3).map(|_| within(&served)).collect();
    for _ in 0..5 {
        assert!(served().is_none(), "a fourth client was served");
    }
    // The three keep working.
    for c in &mut clients {
        assert_eq!(c.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load").0, status::BAD_PARAMETER, "nothing saved");
    }
    clients.pop();
    let _again = within(&served);
    let log = std::fs::read_to_string(dir.join("mgr.log")).unwrap_or_default();
    assert!(log.contains("3 clients connected already"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A group's approved boot hashes decide which vTPM executables get their keys: the manager
/// measures each socket client's executable (here, this test binary), answers GET_BOOT_HASH
/// with it, refuses keys and quotes to an unapproved one, keeps approvals across restarts,
/// and leaves other groups' vTPMs alone.
#[test]
fn approved_boot_hashes_gate_keys_and_quotes() {
    use sha2::{Digest, Sha256};
    let dir = common::tmpdir("boothash");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    init(&store, &hw);
    let d = serve(&store, &hw, &dir, "mgr.log");
    let sock = dir.join("mgr.sock");
    let admin = || Admin::connect(&dir.join("admin.sock")).expect("admin");
    let me: [u8; 32] = Sha256::digest(std::fs::read("/proc/self/exe").expect("own executable")).into();
    let other = [0x11u8; 32];
    let g = admin().group_new().expect("group").number;
    let (ta, tb) = ([0xA1u8; 32], [0xB2u8; 32]);
    let ua = admin().provision(None, g, Some(&ta)).expect("provision a");
    let ub = admin().provision(None, 0, Some(&tb)).expect("provision b");
    let blob: Vec<u8> = (0..52).collect();
    let client = |uuid: &[u8; 16], token: &[u8; 32]| {
        let mut c = Client::connect(&sock).expect("connect");
        assert_eq!(bind(&mut c, uuid, token), status::SUCCESS);
        c
    };
    let load = |c: &mut Client| c.call(TAG_REQ, proto::LOADHASHKEY, &[]).expect("load");
    let quote = |c: &mut Client| c.call(TAG_REQ, proto::GET_QUOTE, &[&[9u8; 20][..], &[0, 3, 0, 0, 1]].concat());

    // No approvals: any executable may save and load.
    let mut a = client(&ua, &ta);
    assert_eq!(a.call(TAG_REQ, proto::SAVEHASHKEY, &blob).expect("save").0, status::SUCCESS);
    let mut b = client(&ub, &tb);
    assert_eq!(b.call(TAG_REQ, proto::SAVEHASHKEY, &blob).expect("save").0, status::SUCCESS);
    // GET_BOOT_HASH: Xen's 20-byte digest, the first 20 bytes of the executable's SHA-256.
    assert_eq!(a.call(TAG_REQ, proto::GET_BOOT_HASH, &[]).expect("boot hash"), (status::SUCCESS, me[..20].to_vec()));
    let mut unbound = Client::connect(&sock).expect("connect");
    assert_eq!(unbound.call(TAG_REQ, proto::GET_BOOT_HASH, &[]).expect("boot hash").0, status::AUTHFAIL);

    // Group g approves another executable only: this one loses its keys and quotes there.
    assert!(admin().approve(g, &other).expect("approve"));
    assert!(!admin().approve(g, &other).expect("approve twice"), "approved already");
    assert_eq!(admin().approved(g).expect("list"), vec![other]);
    assert_eq!(load(&mut a).0, status::AUTHFAIL);
    assert_eq!(a.call(TAG_REQ, proto::SAVEHASHKEY, &[7u8; 52]).expect("save").0, status::AUTHFAIL);
    assert_eq!(quote(&mut a).expect("quote").0, status::AUTHFAIL);
    // ...while group 0's vTPM goes on.
    assert_eq!(load(&mut b), (status::SUCCESS, blob.clone()));
    let log = std::fs::read_to_string(dir.join("mgr.log")).expect("log");
    let hex: String = me.iter().map(|x| format!("{x:02x}")).collect();
    assert!(log.contains(&format!("runs with boot hash {hex}, which group {g} has not approved")), "{log}");
    assert!(admin().approve(7, &other).is_err(), "no group 7");

    // Approved: the refused save changed nothing, the last saved key comes back.
    assert!(admin().approve(g, &me).expect("approve"));
    assert_eq!(load(&mut a), (status::SUCCESS, blob.clone()));
    assert_eq!(quote(&mut a).expect("quote").0, status::SUCCESS);

    // Approvals are in the store: they survive a restart.
    drop((a, b, d));
    let _d = serve(&store, &hw, &dir, "mgr2.log");
    let mut want = vec![me, other];
    want.sort();
    assert_eq!(admin().approved(g).expect("list"), want);
    let mut a = client(&ua, &ta);
    assert_eq!(load(&mut a), (status::SUCCESS, blob.clone()));
    assert!(admin().revoke(g, &me).expect("revoke"));
    assert!(!admin().revoke(g, &me).expect("revoke twice"), "not approved any more");
    assert_eq!(load(&mut a).0, status::AUTHFAIL);
    // The last approval gone, any executable is accepted again.
    assert!(admin().revoke(g, &other).expect("revoke"));
    assert_eq!(admin().approved(g).expect("list"), Vec::<[u8; 32]>::new());
    assert_eq!(load(&mut a), (status::SUCCESS, blob));
    // Approvals are neither vTPMs nor left behind by a deleted group.
    assert!(admin().approve(g, &other).expect("approve"));
    assert_eq!(admin().list(g).expect("list"), vec![ua]);
    admin().delete(&ua).expect("delete");
    admin().group_delete(g).expect("delete the group");
    let again = admin().group_new().expect("group").number;
    assert_eq!(again, g, "the number is reused");
    assert_eq!(admin().approved(again).expect("list"), Vec::<[u8; 32]>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The operator's commands of issue 19: `init --set-owner-auth-file` (then `serve` runs without
/// the owner auth), and `recover`, which reports a store in step without touching it.
#[test]
fn init_sets_the_owner_auth_serve_runs_without_it_and_recover_reports() {
    let dir = common::tmpdir("owner-cli");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    let auth = dir.join("owner.auth");
    std::fs::write(&auth, "owner secret\n").expect("auth file");
    let out = Command::new(BIN)
        .args(["init", "--pcrs", "0,16", "--store"])
        .arg(&store)
        .args(["--tpm", &hw.arg(), "--set-owner-auth-file"])
        .arg(&auth)
        .output()
        .expect("vtpmmgr init");
    assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
    let d = serve(&store, &hw, &dir, "mgr.log");
    let uuid = provision(&dir, &[0x21; 32]);
    let mut c = Client::connect(&dir.join("mgr.sock")).expect("connect");
    assert_eq!(bind(&mut c, &uuid, &[0x21; 32]), status::SUCCESS);
    assert_eq!(c.call(TAG_REQ, proto::SAVEHASHKEY, &blob(1)).expect("save").0, status::SUCCESS);
    drop((c, d));
    let recover = |pcrs: &str| {
        Command::new(BIN)
            .args(["recover", "--pcrs", pcrs, "--store"])
            .arg(&store)
            .args(["--tpm", &hw.arg()])
            .output()
            .expect("vtpmmgr recover")
    };
    let out = recover("0,16");
    assert!(out.status.success(), "recover: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"), "{out:?}");
    let out = recover("0");
    assert!(!out.status.success(), "a recover expecting other PCRs touches nothing");
    let _ = std::fs::remove_dir_all(&dir);
}
