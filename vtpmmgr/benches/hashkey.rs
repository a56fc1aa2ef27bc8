//! The manager with 20,000 vTPMs in its store and Debian's swtpm (TPM 2.0) as the hardware
//! TPM: LOADHASHKEY and SAVEHASHKEY per second through the protocol handler, blocks written
//! per update, and hardware TPM commands per vTPM start and per save, and hardware NV writes per
//! save with the counter window off and at the daemon's default.
//!
//! Run: `cargo bench -p xvtpm-vtpmmgr --bench hashkey` (env `VTPMS`, default 20000). The store
//! is filled on /dev/shm (fast), then copied to the target directory's disk, where the
//! figures are taken (two fdatasyncs per update).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use xvtpm_tis::nvcount::NvWriteCounter;
use xvtpm_vtpmmgr::pace::COUNTER_WINDOW;

use xvtpm_proto::mgr::{status, Request};
use xvtpm_vtpmmgr::dispatch::{self, Caller};
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::store::dev::FileDev;

fn uuid(i: u32) -> [u8; 16] {
    let mut u = [0u8; 16];
    // Spread over the key space like random uuids.
    u[..4].copy_from_slice(&i.wrapping_mul(0x9E37_79B9).to_be_bytes());
    u[12..].copy_from_slice(&i.to_be_bytes());
    u
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n: u32 = std::env::var("VTPMS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let dir = common::tmpdir("bench");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let shm = std::path::Path::new("/dev/shm").join(format!("xvtpm-bench-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    let t = Instant::now();
    {
        let cfg = InitConfig { pcrs: vec![0, 16], ..InitConfig::default() };
        let mut m = Manager::init(FileDev::open(&shm, true)?, hw.connect(), &cfg)?;
        for i in 0..n {
            m.provision(uuid(i), 0, None)?;
            m.save(&uuid(i), &[i as u8; 52])?;
        }
    }
    println!("filled a store with {n} vTPMs (provision and save each) in {:.1} s", t.elapsed().as_secs_f64());
    let disk = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vtpmmgr-bench.img");
    std::fs::copy(&shm, &disk)?;
    let _ = std::fs::remove_file(&shm);

    let t = Instant::now();
    let counted = NvWriteCounter::new(hw.connect());
    let nv_writes = counted.counter();
    let mut m = Manager::open(FileDev::open(&disk, false)?, Box::new(counted))?;
    let open_cmds = m.tpm_commands;
    println!(
        "open: {:.1} ms, {} hardware TPM commands (unseal the root key, certify its creation, read the counter), every node verified",
        t.elapsed().as_secs_f64() * 1e3,
        open_cmds
    );
    println!(
        "store: {} vTPMs, tree depth {}, {} blocks",
        m.store().len(),
        m.store().root().depth,
        m.store().root().high_water
    );

    let iters = 5000u32;
    let mut load = Vec::new();
    let before = m.tpm_commands;
    let start = Instant::now();
    for i in 0..iters {
        let mut caller = Caller::Vtpm(uuid((i * 7919) % n));
        let t = Instant::now();
        let r = dispatch::handle(&mut m, &mut caller, None, &Request::LoadHashKey.encode());
        load.push(t.elapsed());
        assert_eq!(u32::from_be_bytes([r[6], r[7], r[8], r[9]]), status::SUCCESS);
    }
    let load_rate = f64::from(iters) / start.elapsed().as_secs_f64();
    let load_cmds = m.tpm_commands - before;

    // Saves, with the counter incremented for each (window 0) and with the daemon's window
    // (60 s: the saves of this run share one increment).
    let mut save_runs = Vec::new();
    let mut blocks = Vec::new();
    for (k, window) in [Duration::ZERO, COUNTER_WINDOW].into_iter().enumerate() {
        m.set_counter_window(window);
        let saves = 500u32;
        let mut save = Vec::new();
        let (before, nv_before) = (m.tpm_commands, nv_writes.load(SeqCst));
        let start = Instant::now();
        for i in 0..saves {
            let mut caller = Caller::Vtpm(uuid((i * 104_729 + k as u32) % n));
            let w0 = m.store().root().seq;
            let t = Instant::now();
            let r = dispatch::handle(
                &mut m,
                &mut caller,
                None,
                &Request::SaveHashKey(xvtpm_proto::Secret(vec![(i % 251) as u8; 52])).encode(),
            );
            save.push(t.elapsed());
            assert_eq!(u32::from_be_bytes([r[6], r[7], r[8], r[9]]), status::SUCCESS);
            assert_eq!(m.store().root().seq, w0 + 1);
            blocks.push(u64::from(m.store().root().depth) + 1);
        }
        let rate = f64::from(saves) / start.elapsed().as_secs_f64();
        let cmds = m.tpm_commands - before;
        // The increment still owed for the last window counts.
        m.flush_counter(true)?;
        let per = |x: u64| x as f64 / f64::from(saves);
        save_runs.push((window, rate, median(save), per(cmds), per(nv_writes.load(SeqCst) - nv_before)));
    }
    println!(
        "LOADHASHKEY: {load_rate:.0}/s, median {:.1} µs, {} hardware TPM commands in {iters} (per vTPM start: {})",
        median(load).as_secs_f64() * 1e6,
        load_cmds,
        load_cmds as f64 / f64::from(iters)
    );
    for (window, rate, med, cmds, nv) in save_runs {
        println!(
            "SAVEHASHKEY, counter window {window:?}: {rate:.0}/s, median {:.2} ms, {cmds:.2} hardware TPM commands and {nv:.3} hardware NV writes per save",
            med.as_secs_f64() * 1e3,
        );
    }
    println!(
        "blocks written per update: {} (the path from leaf to root, plus the root slot; depth {})",
        blocks.iter().max().unwrap_or(&0),
        m.store().root().depth
    );
    drop(m);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
