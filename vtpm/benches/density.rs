//! What many vTPMs on one host cost in memory: N instances of Debian's swtpm and N of our
//! drop-in `xvtpm-swtpm` (same command line: TPM 2.0, new state, TCP channels), each used once
//! (a GetRandom), all N running together; then the PSS per instance (shared pages divided
//! among the processes that map them, from /proc/PID/smaps_rollup) and the private memory per
//! instance. Rounds alternate the two, and the medians and our ratio to swtpm are printed.
//!
//! Run: `cargo bench -p xvtpm-vtpm --bench density` (env `INSTANCES`, default 100; `ROUNDS`,
//! default 3). Needs Debian's swtpm.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use xvtpm_tests::tpm2;

struct Instance(Child);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(exe: &str, state: &Path) -> anyhow::Result<Instance> {
    let (child, _) = tpm2::start_socket_server(Command::new(exe), state, Stdio::null(), Duration::from_secs(30))
        .with_context(|| exe.to_string())?;
    Ok(Instance(child))
}

/// (PSS, private) of a process in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        rollup.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
    };
    Ok((field("Pss:"), field("Private_Clean:") + field("Private_Dirty:")))
}

/// N instances of `exe` at once: mean PSS and private KiB per instance.
fn measure(exe: &str, n: usize, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    let all: Vec<Instance> = (0..n).map(|i| start(exe, &dir.join(i.to_string()))).collect::<anyhow::Result<_>>()?;
    // Let lazily freed memory settle.
    std::thread::sleep(Duration::from_millis(500));
    let (mut pss, mut private) = (0u64, 0u64);
    for inst in &all {
        let (p, q) = memory_kib(inst.0.id())?;
        pss += p;
        private += q;
    }
    drop(all);
    let _ = std::fs::remove_dir_all(dir);
    Ok((pss as f64 / n as f64, private as f64 / n as f64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("INSTANCES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // `OURS=/path/to/xvtpm-swtpm` compares another build (e.g. one linked differently).
    let ours_env = std::env::var("OURS").ok();
    let ours = ours_env.as_deref().unwrap_or(env!("CARGO_BIN_EXE_xvtpm-swtpm"));
    let dir = std::env::temp_dir().join(format!("xvtpm-density-{}", std::process::id()));
    let (mut s_pss, mut s_priv, mut o_pss, mut o_priv) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let (p, q) = measure("swtpm", n, &dir)?;
        s_pss.push(p);
        s_priv.push(q);
        let (p2, q2) = measure(ours, n, &dir)?;
        o_pss.push(p2);
        o_priv.push(q2);
        eprintln!("round {r}: swtpm {p:.0}/{q:.0} KiB, xvtpm-swtpm {p2:.0}/{q2:.0} KiB (PSS/private per instance)");
    }
    let (sp, sq, op, oq) = (median(s_pss), median(s_priv), median(o_pss), median(o_priv));
    println!("{n} instances running, per instance, median of {rounds} rounds:");
    println!("  swtpm        PSS {sp:7.0} KiB  private {sq:7.0} KiB");
    println!("  xvtpm-swtpm  PSS {op:7.0} KiB  private {oq:7.0} KiB");
    println!("  ratio ours/swtpm: PSS {:.2}x, private {:.2}x", op / sp, oq / sq);
    Ok(())
}
