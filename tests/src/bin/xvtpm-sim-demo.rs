//! A demo without Xen or QEMU: a simulated Xen with two guests, each served by its own
//! `vtpm serve` process (a libtpms TPM 2.0 behind tpmback), and each guest's tpmfront doing
//! the xenstore handshake and sending real TPM 2.0 commands through its shared page.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::percentiles;
use xvtpm_tests::tpm2;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen};

struct Vtpm(Child, PathBuf);

impl Drop for Vtpm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_vtpm(vtpm: &Path, sim: &Path, uuid: &str) -> anyhow::Result<Vtpm> {
    let state = sim.join(format!("state-{uuid}"));
    // Each vTPM's state is encrypted with its own key (the manager will hold these later).
    let key = sim.join(format!("key-{uuid}"));
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    std::fs::write(&key, bytes)?;
    let out = Command::new(vtpm).arg("create").arg("--state-dir").arg(&state).arg("--key").arg(&key).output()?;
    ensure!(out.status.success(), "vtpm create: {}", String::from_utf8_lossy(&out.stderr));
    let log = sim.join(format!("vtpm-{uuid}.log"));
    let child = Command::new(vtpm)
        .args(["serve", "--uuid", uuid, "--domid", "0", "--sim"])
        .arg(sim)
        .arg("--snapshot-dir")
        .arg(sim.join("snapshots"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", vtpm.display()))?;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if std::fs::read_to_string(&log)?.contains("watching") {
            return Ok(Vtpm(child, log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("vtpm serve did not start:\n{}", std::fs::read_to_string(&log)?)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let vtpm_exe = std::env::current_exe()?.with_file_name("vtpm");
    let host = SimHost::temp()?;
    println!("simulated Xen at {}", host.dir().display());
    let xs = host.xen(0).xenstore()?;
    let guests = [(1u16, "0b5e0001-7d1c-4c4e-9b1a-000000000001"), (2, "0b5e0002-7d1c-4c4e-9b1a-000000000002")];
    let mut vtpms = Vec::new();
    for (domid, uuid) in guests {
        vtpms.push(start_vtpm(&vtpm_exe, host.dir(), uuid)?);
        println!("dom0: vtpm serve --uuid {uuid} running (new TPM 2.0, state AES-256-GCM encrypted on disk)");
        toolstack::add_domain(&xs, domid, &format!("guest{domid}"))?;
        toolstack::add_vtpm(&xs, domid, 0, 0, uuid)?;
        println!("toolstack: guest{domid} (domain {domid}) created with vtpm=[\"backend=0,uuid={uuid}\"]");
    }
    for (domid, _) in guests {
        let t = Instant::now();
        let mut fe = Frontend::connect(&host.xen(domid), FrontendConfig::default())?;
        println!("guest{domid}: tpmfront connected in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        for key in ["ring-ref", "event-channel", "state"] {
            let v = xs.read_string(TxId::NONE, &format!("/local/domain/{domid}/device/vtpm/0/{key}"))?;
            println!("    /local/domain/{domid}/device/vtpm/0/{key} = {v}");
        }
        let r = fe.transmit(&tpm2::get_random(16))?;
        ensure!(tpm2::rc(&r) == 0, "GetRandom failed: {}", hex(&r));
        println!("guest{domid}: TPM2_GetRandom(16) = {}", hex(&r[12..]));
        let digest: [u8; 32] = [domid as u8; 32];
        let r = fe.transmit(&tpm2::pcr_extend_sha256(0, &digest))?;
        ensure!(tpm2::rc(&r) == 0, "PCR_Extend failed: {}", hex(&r));
        let r = fe.transmit(&tpm2::pcr_read_sha256_0_7())?;
        ensure!(tpm2::rc(&r) == 0, "PCR_Read failed: {}", hex(&r));
        // Response: header, update counter, selection (10 bytes), digest count, first digest.
        let pcr0 = r.get(30..62).map(hex).unwrap_or_default();
        println!("guest{domid}: extended PCR 0 with {}..; PCR 0 (sha256) = {pcr0}", &hex(&digest)[..8]);
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            fe.transmit(&tpm2::get_random(32))?;
            samples.push(t.elapsed());
        }
        let (median, p99) = percentiles(&mut samples);
        println!(
            "guest{domid}: 2000 x TPM2_GetRandom(32) through tpmif to libtpms: median {:.1} µs, p99 {:.1} µs",
            median.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        fe.close()?;
    }
    let closed = toolstack::remove_vtpm(&xs, 1, 0, 0, Duration::from_secs(10))?;
    println!("toolstack: xl destroy guest1 -> its vtpm backend reached Closed: {closed}");
    for v in &vtpms {
        println!("--- {} ---\n{}", v.1.display(), std::fs::read_to_string(&v.1)?.trim_end());
    }
    Ok(())
}
