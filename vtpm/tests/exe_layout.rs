//! The vTPM executables keep the code and tables that only a panic reads out of the 64 KiB
//! blocks that an idle vTPM touches (`link/cold-text.ld`, `build.rs`): the kernel maps file
//! pages in aligned 64 KiB blocks around each page touched, so one stray neighbour costs
//! 64 KiB of resident size in every vTPM. The layout is checked on the built executables,
//! since a new section or a growing `.rodata` can undo it without any other symptom.

use std::collections::HashMap;
use std::process::Command;

const BLOCK: u64 = 0x10000;

/// Allocated sections: name -> (address, size).
fn sections(exe: &str) -> HashMap<String, (u64, u64)> {
    let out = Command::new("readelf").args(["-SW", exe]).output().expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -SW {exe}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("readelf prints text");
    let mut map = HashMap::new();
    for line in text.lines() {
        // "  [12] .rodata  PROGBITS  00000000000065e0 0065e0 00a858 00 AMS  0   0 16"
        let Some((_, rest)) = line.split_once(']') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 7 || !f[6].contains('A') {
            continue;
        }
        let hex = |s: &str| u64::from_str_radix(s, 16).expect("readelf prints hex");
        map.insert(f[0].to_string(), (hex(f[2]), hex(f[4])));
    }
    map
}

fn check(exe: &str) {
    let s = sections(exe);
    let get = |n: &str| *s.get(n).unwrap_or_else(|| panic!("{exe} has no {n} section"));
    let block = |addr: u64| addr / BLOCK;
    // What runs reads these: the end of the block they share must come before the panic tables.
    let mut read = vec![(".rodata", get(".rodata"))];
    if let Some(g) = s.get(".debug_gdb_scripts") {
        // Rust's `main` reads this section (a volatile load that keeps it for gdb).
        read.push((".debug_gdb_scripts", *g));
    }
    for panic_only in [".gcc_except_table", ".eh_frame_hdr", ".eh_frame"] {
        let Some(&(at, _)) = s.get(panic_only) else { continue };
        for (name, (addr, size)) in &read {
            assert!(
                block(addr + size - 1) < block(at),
                "{exe}: {panic_only} at {at:#x} shares a 64 KiB block with {name} ({addr:#x}+{size:#x})"
            );
        }
    }
    let (text, _) = get(".text");
    let (cold, cold_size) = get(".text.rust_cold");
    assert_eq!(text % BLOCK, 0, "{exe}: .text at {text:#x} does not start a 64 KiB block");
    assert!(cold + cold_size <= text, "{exe}: the panic-only code is not before .text");
}

#[test]
fn panic_only_code_and_tables_sit_in_blocks_of_their_own() {
    check(env!("CARGO_BIN_EXE_xvtpm-swtpm"));
    check(env!("CARGO_BIN_EXE_vtpm"));
}
