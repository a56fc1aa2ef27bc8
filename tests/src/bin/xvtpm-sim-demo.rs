//! The demo the README's first command runs until the QEMU-emulated Xen harness exists: a
//! simulated Xen with two guests, our tpmback in a separate process, and each guest's tpmfront
//! doing the xenstore handshake and exchanging commands through its shared page.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::{percentiles, BackendProcess};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen};

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let exe = std::env::current_exe()?;
    let backend_exe: PathBuf = exe.with_file_name("xvtpm-sim-backend");
    let host = SimHost::temp()?;
    println!("simulated Xen at {}", host.dir().display());
    let xs = host.xen(0).xenstore()?;
    let backend = BackendProcess::start(&backend_exe, host.dir(), 0, &[])
        .with_context(|| format!("starting {} (build it with the demo)", backend_exe.display()))?;
    println!("dom0: tpmback running in its own process, watching /local/domain/0/backend/vtpm");
    for (domid, uuid) in [(1u16, "0b5e0001-7d1c-4c4e-9b1a-000000000001"), (2, "0b5e0002-7d1c-4c4e-9b1a-000000000002")] {
        toolstack::add_domain(&xs, domid, &format!("guest{domid}"))?;
        toolstack::add_vtpm(&xs, domid, 0, 0, uuid)?;
        println!("toolstack: guest{domid} (domain {domid}) created with vtpm=[\"backend=0,uuid={uuid}\"]");
    }
    for domid in [1u16, 2] {
        let t = Instant::now();
        let mut fe = Frontend::connect(&host.xen(domid), FrontendConfig::default())?;
        println!("guest{domid}: tpmfront connected in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        for key in ["ring-ref", "event-channel", "feature-protocol-v2", "state"] {
            let v = xs.read_string(TxId::NONE, &format!("/local/domain/{domid}/device/vtpm/0/{key}"))?;
            println!("    /local/domain/{domid}/device/vtpm/0/{key} = {v}");
        }
        // A TPM2_GetRandom(16) command; the demo's backend echoes it back.
        let cmd = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10];
        let rsp = fe.transmit(&cmd)?;
        anyhow::ensure!(rsp == cmd, "echo mismatch");
        println!("guest{domid}: sent {} bytes, got them back: {}", cmd.len(), hex(&rsp));
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            fe.transmit(&cmd)?;
            samples.push(t.elapsed());
        }
        let (median, p99) = percentiles(&mut samples);
        println!(
            "guest{domid}: 2000 round trips, median {:.1} µs, p99 {:.1} µs",
            median.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        fe.close()?;
        println!(
            "guest{domid}: closed; backend state now {}",
            xs.read_string(TxId::NONE, &format!("/local/domain/0/backend/vtpm/{domid}/0/state"))?
        );
    }
    let closed = toolstack::remove_vtpm(&xs, 1, 0, 0, Duration::from_secs(10))?;
    println!("toolstack: xl destroy guest1 -> backend reached Closed: {closed}");
    println!("--- tpmback log ---\n{}", backend.log().trim_end());
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
