//! tpmfront scenarios as one domain of a simulated Xen. Exits non-zero on any mismatch.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use xvtpm_frontend::{Error, Frontend, FrontendConfig};
use xvtpm_xen::sim::SimXen;
use xvtpm_xen::tpmif::MAX_PACKET;

#[derive(Parser, Debug)]
#[command(about = "tpmfront scenarios on a simulated Xen (for tests and benchmarks)")]
struct Args {
    /// Simulation directory.
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Domain id to act as.
    #[arg(long)]
    domid: u16,
    /// Device handle.
    #[arg(long, default_value_t = 0)]
    handle: u32,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Commands of random sizes (10..=4088 bytes) echoed and compared byte for byte.
    Echo {
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// A 4089-byte command must be refused by the frontend; the next one works.
    TooLarge,
    /// A slow command times out and is cancelled; the next command works.
    Cancel,
    /// Connect, echo, close, several times (a guest rebooting).
    Reopen {
        #[arg(long, default_value_t = 3)]
        cycles: usize,
    },
    /// Echo for a while, checking every reply.
    Hold {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

fn config(handle: u32) -> FrontendConfig {
    FrontendConfig {
        handle,
        connect_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn echo_random(fe: &mut Frontend, rng: &mut impl Rng, count: usize, tag: u8) -> anyhow::Result<()> {
    for i in 0..count {
        let len = rng.gen_range(10..=MAX_PACKET);
        let mut cmd = vec![0u8; len];
        rng.fill(&mut cmd[..]);
        // Never start with the slow marker; mark whose data it is.
        cmd[0] = tag;
        let rsp = fe.transmit(&cmd).with_context(|| format!("command {i} ({len} bytes)"))?;
        ensure!(rsp == cmd, "command {i}: response of {} bytes differs from the {len}-byte command", rsp.len());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let xen = SimXen::new(&args.dir, args.domid);
    let tag = args.domid as u8;
    match args.scenario {
        Scenario::Echo { count, seed } => {
            let mut fe = Frontend::connect(&xen, config(args.handle))?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            echo_random(&mut fe, &mut rng, count, tag)?;
            fe.close()?;
            println!("OK echoed {count}");
        }
        Scenario::TooLarge => {
            let mut fe = Frontend::connect(&xen, config(args.handle))?;
            match fe.transmit(&vec![1u8; MAX_PACKET + 1]) {
                Err(e @ Error::CommandTooLarge { .. }) => println!("refused: {e}"),
                other => bail!("4089-byte command was not refused: {other:?}"),
            }
            ensure!(fe.transmit(b"\x01after")? == b"\x01after", "next command failed");
            println!("OK too-large");
        }
        Scenario::Cancel => {
            let mut fe = Frontend::connect(
                &xen,
                FrontendConfig { command_timeout: Duration::from_millis(300), ..config(args.handle) },
            )?;
            let t = Instant::now();
            match fe.transmit(xvtpm_tests::SLOW_MARKER) {
                Err(e @ Error::Timeout(_)) => println!("slow command: {e} after {:?}", t.elapsed()),
                other => bail!("slow command was not timed out: {other:?}"),
            }
            ensure!(t.elapsed() < Duration::from_secs(5), "cancel took {:?}", t.elapsed());
            ensure!(fe.transmit(b"\x02after")? == b"\x02after", "command after cancel failed");
            println!("OK cancel");
        }
        Scenario::Reopen { cycles } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            for c in 0..cycles {
                let mut fe = Frontend::connect(&xen, config(args.handle)).with_context(|| format!("connect {c}"))?;
                echo_random(&mut fe, &mut rng, 20, tag).with_context(|| format!("cycle {c}"))?;
                fe.close()?;
            }
            println!("OK reopen {cycles}");
        }
        Scenario::Hold { seconds, seed } => {
            let mut fe = Frontend::connect(&xen, config(args.handle))?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let end = Instant::now() + Duration::from_secs_f64(seconds);
            let mut n = 0;
            while Instant::now() < end {
                echo_random(&mut fe, &mut rng, 1, tag)?;
                n += 1;
            }
            fe.close()?;
            println!("OK held {n}");
        }
    }
    Ok(())
}
