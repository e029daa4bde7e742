//! The heap policy of a MicroMsg client process.
//!
//! glibc hands the free memory at the top of a heap back to the kernel as soon as more than
//! `M_TRIM_THRESHOLD` (128 KiB at start) is free there. It raises that threshold by itself,
//! but only when a block that came from `mmap` (128 KiB or more at start) is freed: then the
//! `mmap` threshold becomes that block's size and the trim threshold twice that, up to 32 and
//! 64 MiB. A P2P session moving large messages never frees such a block: each 64 KiB message
//! is a frame buffer and a text allocated from the heap and freed a moment later, so the
//! threshold stays at 128 KiB, and whether the freed buffers are handed back depends on where
//! they happen to lie. When they are, every message's buffers are faulted in and zeroed again:
//! 16 page faults per 64 KiB message, and a session at 850–880 MB/s instead of 1.2–1.5 GB/s on
//! the same machine (docs/performance.md, "p2p at 64 KiB").
//!
//! [`keep_freed_heap`] sets both thresholds where glibc's own rule ends up, at its ceiling, from
//! the start. The cost: free memory at the top of a heap is kept mapped up to 64 MiB, which is
//! as large as a thread's malloc arena heap gets, so an arena other than the main one keeps
//! the most it ever held, up to 64 MiB, and `malloc_trim` cannot shrink it (glibc makes up to
//! 8 arenas per core; the `micromsg` process runs its sessions on its main thread, in the main
//! arena, plus a blocking pool). Only memory the process has used is kept: one that never
//! holds much never keeps much. Blocks of more than 32 MiB still come from `mmap` and go back
//! when freed.
//!
//! Malloc settings of the user's own win: with any `glibc.malloc.` tunable in
//! `GLIBC_TUNABLES`, or any of glibc's older `MALLOC_*_` variables set, the policy leaves the
//! allocator as they set it. Other C libraries have no such thresholds; there it does nothing.

#![deny(unsafe_code)]

/// Blocks of at least this many bytes come from `mmap` (glibc's dynamic ceiling on 64-bit).
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of a heap is handed back once it passes this many bytes (twice the
/// `mmap` threshold, as glibc's dynamic rule sets it).
pub const TRIM_THRESHOLD: usize = 64 << 20;

/// Applies this crate's policy to the whole process. Call it first thing in `main`, before
/// other threads start. Returns whether it was applied: `false` where the C library has no
/// such setting, or where `GLIBC_TUNABLES` sets the allocator already.
pub fn keep_freed_heap() -> bool {
    !tuned_by_user() && set_thresholds()
}

/// glibc's older names for the malloc tunables, which it still reads.
const MALLOC_VARIABLES: [&str; 5] = [
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
];

/// Whether the environment sets the allocator already.
fn tuned_by_user() -> bool {
    let tunables = std::env::var_os("GLIBC_TUNABLES")
        .is_some_and(|t| t.to_string_lossy().contains("glibc.malloc."));
    tunables
        || MALLOC_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_thresholds() -> bool {
    let as_int = |bytes: usize| libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` only stores an integer parameter of glibc's allocator (under the main
    // arena's lock); it takes no pointer and has no precondition. It returns 1 on success.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, as_int(MMAP_THRESHOLD)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(TRIM_THRESHOLD)) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Set in the child processes of the test: `default` or `kept`.
    const CHILD: &str = "MICROMSG_HEAP_TEST_CHILD";
    const ROUNDS: u64 = 200;

    /// Minor page faults of this process so far (`/proc/self/stat`, field 10).
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
        // The command name (field 2) may hold spaces; the fields after its `)` do not.
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        after_name
            .split(' ')
            .nth(7)
            .and_then(|f| f.parse().ok())
            .expect("minflt")
    }

    /// What a session does with large messages: a few 64 KiB buffers in flight, written, then
    /// all freed; [`ROUNDS`] times over, on a thread (so on a heap) of its own. The page faults
    /// taken after the first round.
    fn churn() -> u64 {
        std::thread::spawn(|| {
            let round = || {
                let buffers: Vec<Vec<u8>> = (1..=8).map(|i| vec![i; 64 << 10]).collect();
                std::hint::black_box(&buffers);
            };
            round();
            let before = minor_faults();
            for _ in 0..ROUNDS {
                round();
            }
            minor_faults() - before
        })
        .join()
        .expect("churn thread")
    }

    /// Page faults of [`churn`] in a fresh process of this test, with or without the policy:
    /// a process's heap cannot be put back as it was, so each case gets its own.
    fn churn_in_child(kept: bool) -> u64 {
        let mut command = std::process::Command::new(std::env::current_exe().expect("binary"));
        command
            .args([
                "--exact",
                "tests::freed_large_buffers_are_not_faulted_in_again",
            ])
            .args(["--nocapture", "--test-threads", "1"])
            .env(CHILD, if kept { "kept" } else { "default" })
            .env_remove("GLIBC_TUNABLES");
        for variable in MALLOC_VARIABLES {
            command.env_remove(variable);
        }
        let out = command.output().expect("child test process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed: {stdout}{stderr}");
        stdout
            .lines()
            .find_map(|line| line.split_once("faults ").map(|(_, n)| n))
            .and_then(|n| n.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no count from the child: {stdout}"))
    }

    #[test]
    fn freed_large_buffers_are_not_faulted_in_again() {
        if let Ok(mode) = std::env::var(CHILD) {
            if mode == "kept" {
                assert!(keep_freed_heap(), "glibc refused the thresholds");
            }
            println!("faults {}", churn());
            return;
        }
        // The premise: with glibc's defaults the freed buffers go back to the kernel, and the
        // rounds fault them in again (16 pages each).
        let default_faults = churn_in_child(false);
        assert!(
            default_faults >= ROUNDS * 16,
            "glibc's defaults did not hand the buffers back ({default_faults} faults in \
             {ROUNDS} rounds): this test cannot show the policy's effect here"
        );
        let kept_faults = churn_in_child(true);
        assert!(
            kept_faults < ROUNDS,
            "{kept_faults} page faults in {ROUNDS} rounds with the policy (without: \
             {default_faults})"
        );
    }
}
