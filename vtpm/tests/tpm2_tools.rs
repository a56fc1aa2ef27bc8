//! Debian's tpm2-tools against `vtpm socket` through libtss2's swtpm TCTI: the everyday TPM 2.0
//! operations, checked by their results, and state kept across a restart of the vtpm.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{start, Vtpm};

use sha1::Sha1;
use sha2::{Digest, Sha256};

struct Tools<'a> {
    vtpm: &'a Vtpm,
    dir: &'a Path,
}

impl Tools<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(args[0])
            .args(&args[1..])
            .current_dir(self.dir)
            .env("TPM2TOOLS_TCTI", format!("swtpm:host=127.0.0.1,port={}", self.vtpm.port))
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (is tpm2-tools installed?)", args[0]))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}\nvtpm log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.vtpm.log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) {
        assert!(!self.run(args).status.success(), "{args:?} should have failed");
    }

    fn flush(&self) {
        self.ok(&["tpm2_flushcontext", "-t"]);
        self.ok(&["tpm2_flushcontext", "-s"]);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The hex value tpm2_pcrread prints for `bank` index 16.
fn pcr16(out: &str, bank: &str) -> String {
    let mut in_bank = false;
    for line in out.lines() {
        let t = line.trim();
        if t.ends_with(':') && !t.starts_with("16") {
            in_bank = t.trim_end_matches(':') == bank;
        } else if in_bank && t.starts_with("16") {
            return t.split(':').nth(1).expect("value").trim().trim_start_matches("0x").to_ascii_lowercase();
        }
    }
    panic!("no {bank} PCR 16 in {out}");
}

#[test]
fn tpm2_tools_session_and_restart() {
    let dir = std::env::temp_dir().join(format!("xvtpm-tools-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let state = dir.join("state");
    let key = dir.join("key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    common::create(&state, &key);

    let vtpm = start(&state, &key, 1);
    let t = Tools { vtpm: &vtpm, dir: &dir };
    t.ok(&["tpm2_selftest", "--fulltest"]);
    let r = t.ok(&["tpm2_getrandom", "--hex", "16"]);
    assert_eq!(r.trim().len(), 32, "{r}");

    // PCR 16 in both banks: extend and check against the digest computed here.
    let d1 = Sha1::digest(b"xvtpm sha1");
    let d256 = Sha256::digest(b"xvtpm sha256");
    t.ok(&["tpm2_pcrreset", "16"]);
    t.ok(&["tpm2_pcrextend", &format!("16:sha1={},sha256={}", hex(&d1), hex(&d256))]);
    let out = t.ok(&["tpm2_pcrread", "sha1:16+sha256:16"]);
    let want1 = Sha1::new().chain_update([0u8; 20]).chain_update(d1).finalize();
    let want256 = Sha256::new().chain_update([0u8; 32]).chain_update(d256).finalize();
    assert_eq!(pcr16(&out, "sha1"), hex(&want1));
    assert_eq!(pcr16(&out, "sha256"), hex(&want256));

    // Primary keys, RSA and ECC; a signing key created, loaded, used and verified.
    t.ok(&["tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "ecc.ctx"]);
    t.flush();
    t.ok(&["tpm2_createprimary", "-C", "o", "-G", "rsa", "-c", "prim.ctx"]);
    t.flush();
    t.ok(&["tpm2_create", "-C", "prim.ctx", "-G", "ecc", "-u", "sig.pub", "-r", "sig.priv"]);
    t.flush();
    t.ok(&["tpm2_load", "-C", "prim.ctx", "-u", "sig.pub", "-r", "sig.priv", "-c", "sig.ctx"]);
    t.flush();
    std::fs::write(dir.join("msg"), b"a message to sign").expect("msg");
    t.ok(&["tpm2_sign", "-c", "sig.ctx", "-g", "sha256", "-o", "msg.sig", "msg"]);
    t.flush();
    t.ok(&["tpm2_verifysignature", "-c", "sig.ctx", "-g", "sha256", "-m", "msg", "-s", "msg.sig"]);
    t.flush();
    std::fs::write(dir.join("other"), b"another message").expect("msg");
    t.fails(&["tpm2_verifysignature", "-c", "sig.ctx", "-g", "sha256", "-m", "other", "-s", "msg.sig"]);
    t.flush();

    // Seal under a PCR policy; unseal works until the PCR changes.
    t.ok(&["tpm2_pcrread", "sha256:16", "-o", "pcr.bin"]);
    t.ok(&["tpm2_createpolicy", "--policy-pcr", "-l", "sha256:16", "-f", "pcr.bin", "-L", "pcr.policy"]);
    std::fs::write(dir.join("secret"), b"sealed secret 42").expect("secret");
    t.ok(&["tpm2_create", "-C", "prim.ctx", "-L", "pcr.policy", "-i", "secret", "-u", "seal.pub", "-r", "seal.priv"]);
    t.flush();
    t.ok(&["tpm2_load", "-C", "prim.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx"]);
    t.flush();
    let unsealed = t.ok(&["tpm2_unseal", "-c", "seal.ctx", "-p", "pcr:sha256:16"]);
    assert_eq!(unsealed, "sealed secret 42");
    t.flush();
    t.ok(&["tpm2_pcrextend", &format!("16:sha256={}", hex(&d256))]);
    t.fails(&["tpm2_unseal", "-c", "seal.ctx", "-p", "pcr:sha256:16"]);
    t.flush();

    // NV index and a persistent key.
    t.ok(&["tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite"]);
    std::fs::write(dir.join("nvdata"), [0xa5u8; 32]).expect("nv");
    t.ok(&["tpm2_nvwrite", "0x1500016", "-C", "o", "-i", "nvdata"]);
    t.ok(&["tpm2_evictcontrol", "-C", "o", "-c", "prim.ctx", "0x81000001"]);
    t.flush();
    let pub_before = t.ok(&["tpm2_readpublic", "-c", "0x81000001"]);
    drop(vtpm);

    // Restart, powered on but not started: the client starts it, then the persistent key and
    // the NV index are still there.
    let vtpm = common::start_with(&state, &key, 2, true, "not-need-init");
    let t = Tools { vtpm: &vtpm, dir: &dir };
    t.fails(&["tpm2_getrandom", "--hex", "8"]);
    t.ok(&["tpm2_startup", "-c"]);
    assert_eq!(t.ok(&["tpm2_readpublic", "-c", "0x81000001"]), pub_before);
    t.ok(&["tpm2_nvread", "0x1500016", "-C", "o", "-s", "32", "-o", "nvout"]);
    assert_eq!(std::fs::read(dir.join("nvout")).expect("nvout"), vec![0xa5u8; 32]);
    drop(vtpm);
    let _ = std::fs::remove_dir_all(&dir);
}
