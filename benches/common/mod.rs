//! What the benches share: the thread pool they measure in, and quick criterion settings.
//!
//! candle's CPU kernels (GEMM and tandem's fused kernels) split their work over the rayon pool
//! they are called from, as on a device executor. Each bench runs its measurement inside a
//! pool of `TANDEM_BENCH_THREADS` threads (default 1: figures that do not depend on the core
//! count or on other load, and the shape of one `cpu:N` executor), after the same thread setup
//! as the binary (`init_compute_threads`: no candle barrier pool spinning beside the pool).
//! They also use the binary's allocator (`src/allocator.rs`: mimalloc, keeping freed memory), so
//! that a measurement pays for page faults only where the binary would.

#![allow(dead_code)] // each bench binary uses a different part

use std::time::Duration;

use criterion::Criterion;

// Its unit test module compiles here too, without its test; hence `unused_imports`.
#[allow(unsafe_code, unused_imports)]
#[path = "../../src/allocator.rs"]
mod allocator;

/// The pool every measurement runs in.
pub fn pool() -> rayon::ThreadPool {
    allocator::keep_freed_memory();
    tandem_actors::device::init_compute_threads();
    let threads = std::env::var("TANDEM_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bench-{i}"))
        .build()
        .expect("bench thread pool")
}

/// Short runs, so that `cargo bench` finishes in minutes: 10 samples, 1 s warm-up, `secs` of
/// measurement per function.
pub fn quick(secs: u64) -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(secs))
}
