//! Rewrites the seed corpus: `cargo run --example gen_corpus` (in `fuzz/`). Each target's
//! folder under `corpus/` is emptied first, so the corpus is exactly what `seeds::all` builds.

use std::path::Path;

fn main() {
    // The state-file seeds come from stores in scratch directories: under target/, not /tmp.
    let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    std::env::set_var("TMPDIR", &scratch);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, _) in xvtpm_fuzz::TARGETS {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("corpus dir");
    }
    let seeds = xvtpm_fuzz::seeds::all();
    for (target, name, bytes) in &seeds {
        // Every seed must pass its own harness.
        let run = xvtpm_fuzz::TARGETS.iter().find(|(t, _)| t == target).expect("known target").1;
        run(bytes);
        std::fs::write(root.join(target).join(name), bytes).expect("write seed");
    }
    println!("{} seeds written under {}", seeds.len(), root.display());
}
