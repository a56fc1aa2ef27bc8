//! Checks constants and struct layouts against the C headers they mirror: compiles a program
//! that prints each C expression, runs it, and compares with our values. A missing `cc` or
//! header is a failure (CI installs them).

use std::collections::HashMap;

/// Compiles `prelude` (includes and helpers, ending in `int main(void) {`) followed by a
/// printf of every expression of `values`, and asserts each C value equals ours. `hint` says
/// what to install when compiling fails.
pub fn check<E: AsRef<str>>(prelude: &str, values: &[(E, u64)], hint: &str) {
    let mut src = prelude.to_string();
    for (expr, _) in values {
        let expr = expr.as_ref();
        src.push_str(&format!("    printf(\"%s=%llu\\n\", \"{expr}\", (unsigned long long)({expr}));\n"));
    }
    src.push_str("    return 0;\n}\n");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("xvtpm-clayout-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (c, exe) = (dir.join("layout.c"), dir.join("layout"));
    std::fs::write(&c, &src).expect("write C source");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .arg("-Wall")
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?} (install a C toolchain): {e}"));
    assert!(
        out.status.success(),
        "compiling against the C headers failed ({hint}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = std::process::Command::new(&exe).output().expect("run layout program");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "layout program failed");
    let printed = String::from_utf8(run.stdout).expect("utf-8 output");
    let c_values: HashMap<&str, u64> =
        printed.lines().filter_map(|l| l.rsplit_once('=')).map(|(k, v)| (k, v.parse().expect("number"))).collect();
    assert_eq!(c_values.len(), values.len(), "every value printed once:\n{printed}");
    for (expr, rust) in values {
        let expr = expr.as_ref();
        assert_eq!(c_values.get(expr), Some(rust), "{expr}: C vs Rust");
    }
}
