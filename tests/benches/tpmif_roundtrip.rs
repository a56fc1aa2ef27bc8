//! Round trip of one command through tpmfront -> shared page + event channel -> tpmback (echo
//! handler) -> back, over the simulated Xen, frontend and backend in separate processes.
//!
//! Run: `cargo bench -p xvtpm-tests --bench tpmif_roundtrip` (env `ITERS` to change the count).
//! Reports median and p99 latency and commands per second for a 12-byte command and for the
//! largest packet (4088 bytes, "4 KiB").

use std::path::Path;
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::{percentiles, BackendProcess};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::tpmif::MAX_PACKET;
use xvtpm_xen::Xen;

fn measure(fe: &mut Frontend, size: usize, iters: usize) -> anyhow::Result<(Duration, Duration, f64)> {
    let cmd: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..iters / 10 {
        fe.transmit(&cmd)?;
    }
    let mut samples = Vec::with_capacity(iters);
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        let rsp = fe.transmit(&cmd)?;
        samples.push(t.elapsed());
        anyhow::ensure!(rsp.len() == size, "short echo");
    }
    let total = start.elapsed();
    let (median, p99) = percentiles(&mut samples);
    Ok((median, p99, iters as f64 / total.as_secs_f64()))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; other arguments are not ours.
    let iters: usize = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let host = SimHost::temp()?;
    let xs = host.xen(0).xenstore()?;
    toolstack::add_domain(&xs, 1, "bench")?;
    toolstack::add_vtpm(&xs, 1, 0, 0, "5ba1e7e5-0000-4000-8000-000000000001")?;
    let _backend = BackendProcess::start(Path::new(env!("CARGO_BIN_EXE_xvtpm-sim-backend")), host.dir(), 0, &[])?;
    println!("tpmif round trip over the simulated Xen, frontend and backend in separate processes, echo handler");
    println!(
        "{iters} iterations per size (after {} warm-up), machine: {} cores",
        iters / 10,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("{:<34} {:<16} {:>10} {:>10} {:>11}", "frontend", "command", "median", "p99", "commands/s");
    // The default frontend polls the page briefly before sleeping on the event channel; the
    // second configuration is the pure event-channel path (a frontend that never polls).
    let configs = [
        ("default (polls up to 50 µs)", FrontendConfig::default().spin),
        ("no polling (event channel only)", Duration::ZERO),
    ];
    for (name, spin) in configs {
        let mut fe = Frontend::connect(&host.xen(1), FrontendConfig { spin, ..FrontendConfig::default() })?;
        for (label, size) in [("12 B", 12), ("4 KiB (4088 B)", MAX_PACKET)] {
            let (median, p99, rate) = measure(&mut fe, size, iters)?;
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!("{name:<34} {label:<16} {:>7.1} µs {:>7.1} µs {rate:>11.0}", us(median), us(p99));
        }
        fe.close()?;
    }
    Ok(())
}
