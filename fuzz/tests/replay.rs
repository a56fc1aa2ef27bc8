//! Replays the committed seed corpus and the saved crash inputs (`regressions/`) through every
//! harness without libFuzzer: `cargo test` in `fuzz/`.

use std::path::Path;

/// Keeps the harnesses' state directories under the target directory.
fn tmpdir() {
    // Every test sets the same value before any harness runs.
    std::env::set_var("TMPDIR", env!("CARGO_TARGET_TMPDIR"));
}

fn replay(sub: &str) -> usize {
    tmpdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(sub);
    let mut n = 0;
    for (target, run) in xvtpm_fuzz::TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else { continue };
        for e in entries {
            let path = e.expect("dir entry").path();
            if path.file_name().is_some_and(|f| f.to_string_lossy().starts_with('.')) {
                continue;
            }
            let bytes = std::fs::read(&path).expect("read input");
            eprintln!("{target}: {}", path.display());
            run(&bytes);
            n += 1;
        }
    }
    n
}

#[test]
fn seed_corpus_passes_every_harness() {
    assert!(replay("corpus") > 0, "no seeds: run `cargo run --example gen_corpus`");
}

#[test]
fn regressions_pass_every_harness() {
    replay("regressions");
}

#[test]
fn generated_seeds_pass_every_harness() {
    tmpdir();
    for (target, name, bytes) in xvtpm_fuzz::seeds::all() {
        let run = xvtpm_fuzz::TARGETS.iter().find(|(t, _)| *t == target).expect("target").1;
        eprintln!("{target}: {name}");
        run(&bytes);
    }
}
