//! What a process costs at rest, from /proc: its threads' context switches (each one a
//! wake-up) and their CPU time.

use std::time::Duration;

/// Context switches (voluntary and not) of every thread of `pid`, and per thread "name count".
pub fn wakeups(pid: u32) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut per_thread = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| -> u64 {
            status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        let n = field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:");
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        per_thread.push(format!("{} {n}", name.trim()));
        total += n;
    }
    (total, per_thread)
}

/// CPU time so far of all the threads of `pid` (the first field of each thread's schedstat,
/// in nanoseconds, not clock ticks).
pub fn cpu(pid: u32) -> Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_nanos(ns)
}
