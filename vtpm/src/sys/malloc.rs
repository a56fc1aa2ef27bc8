//! One malloc arena for the whole process. glibc gives each thread that allocates an arena of
//! its own (a 132 KiB heap, a few pages of it touched); a vTPM has two or three threads that
//! seldom allocate at the same moment, so the main arena serves them all and an idle vTPM is
//! about 12 KiB smaller (measured against swtpm, see docs/benchmarks.md).

/// Limits malloc to one arena. Call it before starting threads; on a libc other than glibc it
/// does nothing.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a malloc tunable; M_ARENA_MAX with a positive value is
        // valid at any time, and no other thread is allocating yet.
        // A refusal only costs the memory; nothing to report (no logger runs yet).
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}
