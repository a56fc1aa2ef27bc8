//! What vTPMs cost at rest: wake-ups per second and CPU of `vtpm serve` processes, each
//! serving a connected, idle guest on the simulated Xen, against swtpm socket processes (the
//! peer), each with a connected, idle client, in the same run.
//!
//! Run: `cargo bench -p xvtpm-vtpm --bench idle` (env `N` vTPMs of each kind, default 10;
//! `SECS` measured, default 20; `VTPM_BIN` another build of `vtpm` to measure, e.g. an older
//! one).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::procstat;
use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tests::tpm2;
use xvtpm_tis::swtpm::Swtpm;
use xvtpm_tis::{Family, HwTpm};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::Xen;

const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vtpm_bin() -> String {
    std::env::var("VTPM_BIN").unwrap_or_else(|_| VTPM.to_string())
}

fn vtpm(sim: &Path, i: usize) -> anyhow::Result<(Killed, String)> {
    let state = sim.join(format!("vtpm{i}"));
    let key = state.with_extension("key");
    std::fs::write(&key, [0x5a; 32])?;
    let out = Command::new(vtpm_bin()).arg("create").arg("--state-dir").arg(&state).arg("--key").arg(&key).output()?;
    ensure!(out.status.success(), "vtpm create: {}", String::from_utf8_lossy(&out.stderr));
    let uuid = format!("1d1e0000-0000-4000-8000-{i:012}");
    let log = state.with_extension("log");
    let child = Command::new(vtpm_bin())
        .args(["serve", "--uuid", &uuid, "--domid", "0", "--sim"])
        .arg(sim)
        .arg("--snapshot-dir")
        .arg(sim.join("snapshots"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--key")
        .arg(&key)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let end = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("watching") {
        ensure!(Instant::now() < end, "vtpm serve did not start: {}", std::fs::read_to_string(&log)?);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Killed(child), uuid))
}

fn guest(host: &SimHost, domid: u16, uuid: &str) -> anyhow::Result<Frontend> {
    let xs = host.xen(0).xenstore()?;
    toolstack::add_domain(&xs, domid, "idle")?;
    toolstack::add_vtpm(&xs, domid, 0, 0, uuid)?;
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(60), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(domid), cfg)?;
    let r = fe.transmit(&tpm2::get_random(16))?;
    ensure!(tpm2::rc(&r) == 0, "GetRandom failed: {r:02x?}");
    Ok(fe)
}

/// A client of swtpm that started the TPM and got one answer.
fn swtpm_client(p: &SwtpmProcess) -> anyhow::Result<Swtpm> {
    let mut s = Swtpm::connect_unix(&p.data, &p.ctrl, Family::Tpm20)?;
    for cmd in [tpm2::startup_clear(), tpm2::get_random(16)] {
        s.transmit(0, &cmd)?;
    }
    Ok(s)
}

struct Sample {
    wakeups: u64,
    cpu: Duration,
}

fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample { wakeups: 0, cpu: Duration::ZERO };
    for &p in pids {
        s.wakeups += procstat::wakeups(p).0;
        s.cpu += procstat::cpu(p);
    }
    s
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let secs: u64 = std::env::var("SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let host = SimHost::temp()?;
    let mut ours = Vec::new();
    let mut guests = Vec::new();
    for i in 0..n {
        let (p, uuid) = vtpm(host.dir(), i)?;
        guests.push(guest(&host, 5 + i as u16, &uuid)?);
        ours.push(p);
    }
    let dirs: Vec<PathBuf> = (0..n).map(|i| host.dir().join(format!("swtpm{i}"))).collect();
    let peers: Vec<SwtpmProcess> =
        dirs.iter().map(|d| SwtpmProcess::start(d, true)).collect::<std::io::Result<_>>().context("swtpm")?;
    let clients: Vec<Swtpm> = peers.iter().map(swtpm_client).collect::<anyhow::Result<_>>()?;
    let our_pids: Vec<u32> = ours.iter().map(|p| p.0.id()).collect();
    let peer_pids: Vec<u32> = peers.iter().map(SwtpmProcess::pid).collect();
    // Settled: connections made, first answers given, snapshots written.
    std::thread::sleep(Duration::from_secs(1));
    let (a0, b0) = (sample(&our_pids), sample(&peer_pids));
    std::thread::sleep(Duration::from_secs(secs));
    let (a1, b1) = (sample(&our_pids), sample(&peer_pids));
    println!(
        "{n} vTPMs of each kind at rest for {secs} s, each with a connected client that sent one command; machine: {} cores",
        std::thread::available_parallelism().map(|c| c.get()).unwrap_or(0)
    );
    println!("{:<44} {:>18} {:>22}", "", "wake-ups/s per vTPM", "CPU µs/s per vTPM");
    let per =
        |w: u64, c: Duration| (w as f64 / (secs * n as u64) as f64, c.as_secs_f64() * 1e6 / (secs * n as u64) as f64);
    let (wa, ca) = per(a1.wakeups - a0.wakeups, a1.cpu - a0.cpu);
    let (wb, cb) = per(b1.wakeups - b0.wakeups, b1.cpu - b0.cpu);
    println!("{:<44} {wa:>18.2} {ca:>22.2}", "vtpm serve (simulated Xen, a connected guest)");
    println!("  ({})", vtpm_bin());
    println!("{:<44} {wb:>18.2} {cb:>22.2}", "swtpm socket (a connected client)");
    drop((guests, clients));
    Ok(())
}
