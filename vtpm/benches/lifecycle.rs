//! What keeping a guest's TPM across vtpm restarts costs, and how long the guest waits.
//!
//! Two `vtpm serve` processes on one simulated Xen, each serving its own guest (a user-space
//! tpmfront in this process): one writes its volatile snapshot after every command (the
//! default, to the simulation's tmpfs), the other keeps none (`--snapshot-dir none`, the peer).
//! Blocks of commands alternate between the two. Reported: median round trip per command, the
//! ratio to the peer, CPU per command of each vtpm process (/proc schedstat), and the snapshot's
//! size. Then the guest-visible gap of a restart under a running guest: from the stop (SIGTERM
//! or kill -9) until the guest's next command is answered by the new process, which resumes the
//! TPM; medians over `RESTARTS` restarts.
//!
//! Run: `cargo bench -p xvtpm-vtpm --bench lifecycle` (env `ITERS`, default 2000 per command
//! and vtpm; `RESTARTS`, default 10).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::{percentiles, tpm2};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::Xen;

const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");

struct Vtpm {
    child: Child,
    log: PathBuf,
}

impl Drop for Vtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vtpm {
    fn start(sim: &Path, state: &Path, uuid: &str, snapshots: &str, n: u32) -> anyhow::Result<Vtpm> {
        let log = state.with_extension(format!("log{n}"));
        let child = Command::new(VTPM)
            .args(["serve", "--uuid", uuid, "--domid", "0", "--snapshot-dir", snapshots, "--sim"])
            .arg(sim)
            .arg("--state-dir")
            .arg(state)
            .arg("--key")
            .arg(state.with_extension("key"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Vtpm { child, log })
    }

    /// CPU time so far of all the process's threads.
    fn cpu(&self) -> anyhow::Result<Duration> {
        Ok(xvtpm_tests::procstat::cpu(self.child.id()))
    }

    fn stop(mut self, signal: &str) -> anyhow::Result<()> {
        ensure!(Command::new("kill").args([signal, &self.child.id().to_string()]).status()?.success());
        self.child.wait()?;
        Ok(())
    }
}

fn create(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let state = dir.join(name);
    std::fs::write(state.with_extension("key"), [0x5a; 32])?;
    let out = Command::new(VTPM)
        .arg("create")
        .arg("--state-dir")
        .arg(&state)
        .arg("--key")
        .arg(state.with_extension("key"))
        .output()?;
    ensure!(out.status.success(), "vtpm create: {}", String::from_utf8_lossy(&out.stderr));
    Ok(state)
}

fn guest(host: &SimHost, domid: u16, uuid: &str) -> anyhow::Result<Frontend> {
    let xs = host.xen(0).xenstore()?;
    toolstack::add_domain(&xs, domid, "bench")?;
    toolstack::add_vtpm(&xs, domid, 0, 0, uuid)?;
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(60), ..FrontendConfig::default() };
    Ok(Frontend::connect(&host.xen(domid), cfg)?)
}

fn ok(fe: &mut Frontend, cmd: &[u8]) -> anyhow::Result<()> {
    let r = fe.transmit(cmd)?;
    ensure!(tpm2::rc(&r) == 0, "command failed: {r:02x?}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let restarts: usize = std::env::var("RESTARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let host = SimHost::temp()?;
    let snaps = host.dir().join("snapshots");
    let (kept, none) = (create(host.dir(), "kept")?, create(host.dir(), "none")?);
    let (u1, u2) = ("5ba1e7e5-0000-4000-8000-00000000000a", "5ba1e7e5-0000-4000-8000-00000000000b");
    let snap_arg = snaps.to_string_lossy().into_owned();
    let mut with = Vtpm::start(host.dir(), &kept, u1, &snap_arg, 0)?;
    let without = Vtpm::start(host.dir(), &none, u2, "none", 0)?;
    let (mut fe1, mut fe2) = (guest(&host, 5, u1)?, guest(&host, 6, u2)?);
    println!(
        "vtpm serve on the simulated Xen, a user-space tpmfront per guest, {iters} commands of each kind per vtpm in \
         blocks of 100, machine: {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("{:<22} {:>16} {:>16} {:>7}", "command", "snapshots: median", "none: median", "ratio");
    let commands: [(&str, Vec<u8>); 3] = [
        ("PCR_Read", tpm2::pcr_read_sha256(16)),
        ("PCR_Extend", tpm2::pcr_extend_sha256(16, &[1; 32])),
        ("GetRandom(16)", tpm2::get_random(16)),
    ];
    let cpu0 = (with.cpu()?, without.cpu()?);
    for (name, cmd) in &commands {
        let (mut a, mut b) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for block in 0..iters.div_ceil(100) {
            let n = 100.min(iters - block * 100);
            for (fe, out) in [(&mut fe1, &mut a), (&mut fe2, &mut b)] {
                for _ in 0..n {
                    let t = Instant::now();
                    ok(fe, cmd)?;
                    out.push(t.elapsed());
                }
            }
        }
        let (ma, _) = percentiles(&mut a);
        let (mb, _) = percentiles(&mut b);
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!("{name:<22} {:>13.1} µs {:>13.1} µs {:>6.2}x", us(ma), us(mb), us(ma) / us(mb));
    }
    let total = (commands.len() * iters) as f64;
    let cpu = |now: Duration, before: Duration| (now - before).as_secs_f64() * 1e6 / total;
    println!(
        "CPU per command (vtpm process, all threads, all kinds): snapshots {:.1} µs, none {:.1} µs",
        cpu(with.cpu()?, cpu0.0),
        cpu(without.cpu()?, cpu0.1)
    );
    let snapshot = std::fs::read_dir(&snaps)?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".snapshot"))
        .context("no snapshot written")?;
    println!("snapshot size: {} bytes (two slot files take them in turn)", snapshot.metadata()?.len());
    drop(without);

    // The restart gap, as the guest sees it.
    let check = tpm2::pcr_read_sha256(16);
    let expected = fe1.transmit(&check)?;
    for signal in ["-TERM", "-KILL"] {
        let mut gaps = Vec::with_capacity(restarts);
        for i in 0..restarts {
            let t = Instant::now();
            with.stop(signal)?;
            with = Vtpm::start(host.dir(), &kept, u1, &snap_arg, (i + 1) as u32)?;
            let r = fe1.transmit(&check)?;
            gaps.push(t.elapsed());
            ensure!(r == expected, "PCR 16 changed across the restart; log:\n{}", std::fs::read_to_string(&with.log)?);
        }
        let (median, _) = percentiles(&mut gaps);
        let what = if signal == "-TERM" { "SIGTERM" } else { "kill -9" };
        println!(
            "restart under the running guest ({what}, a new process resumes the TPM): guest waits {:.1} ms (median of {restarts})",
            median.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
