//! What the sandbox costs one syscall: times a few syscalls of serving in
//! this process before and after `sandbox::apply`, same process, same file.
//!
//! usage (root for the full sandbox): `syscall_cost [ITERATIONS]`
//!
//! `pread64` (syscall 17, early in the BPF program) and `preadv2` (327, the
//! last syscall the program compares) are allowed with any arguments, which
//! the kernel's seccomp action cache answers without running the filter:
//! they cost the same. `fcntl` and `statx` are allowed only with some
//! arguments, so the BPF program runs for each of them. Each figure is the best of five rounds, to keep a burst of
//! load from elsewhere out of it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Instant;

fn best_ns_per_call(iterations: u32, mut call: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iterations {
            call();
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
        best = best.min(ns);
    }
    best
}

fn measure(file: &File, iterations: u32) -> Vec<(&'static str, f64)> {
    let mut byte = [0u8; 1];
    let mut page = vec![0u8; 4096];
    vec![
        (
            "pread64 1 byte",
            best_ns_per_call(iterations, || {
                let _ = rustix::io::pread(file, &mut byte, 0);
            }),
        ),
        (
            "pread64 4 KiB",
            best_ns_per_call(iterations, || {
                let _ = rustix::io::pread(file, &mut page, 0);
            }),
        ),
        (
            "preadv2 1 byte",
            best_ns_per_call(iterations, || {
                let mut bufs = [std::io::IoSliceMut::new(&mut byte)];
                let _ =
                    rustix::io::preadv2(file, &mut bufs, 0, rustix::io::ReadWriteFlags::empty());
            }),
        ),
        (
            "fadvise64 WILLNEED 4 KiB",
            best_ns_per_call(iterations, || {
                let _ = rustix::fs::fadvise(
                    file,
                    0,
                    std::num::NonZeroU64::new(4096),
                    rustix::fs::Advice::WillNeed,
                );
            }),
        ),
        (
            "fcntl F_GETFL",
            best_ns_per_call(iterations, || {
                let _ = rustix::fs::fcntl_getfl(file);
            }),
        ),
        (
            "statx (File::metadata)",
            best_ns_per_call(iterations, || {
                let _ = file.metadata();
            }),
        ),
    ]
}

fn main() -> std::process::ExitCode {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let file = match std::env::current_exe().and_then(File::open) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("opening this program: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let before = measure(&file, iterations);
    let config = sandbox::SandboxConfig {
        keep_fds: vec![1, 2, file.as_raw_fd()],
        allow_threads: false,
        ..sandbox::SandboxConfig::default()
    };
    let report = match sandbox::apply(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sandbox: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let after = measure(&file, iterations);
    print!("{report}");
    println!("| syscall | unconfined ns | confined ns | cost ns | ratio |");
    println!("|---|---|---|---|---|");
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        println!("| {name} | {b:.0} | {a:.0} | {:.0} | {:.3} |", a - b, a / b);
    }
    std::process::ExitCode::SUCCESS
}
