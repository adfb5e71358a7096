//! Device executors: where model compute runs.
//!
//! Compute never runs on a tokio worker. Each device named in the placement (`cpu:0`, `cpu:1`,
//! ...) is an [`Executor`] with its own rayon thread pool of a configured size; candle's CPU
//! kernels parallelise inside the pool they are called from, so `cpu:0` and `cpu:1` really
//! compute at the same time on disjoint threads. Actors hand a closure to their executor with
//! [`Executor::run`] and await the result; several actors placed on one device share its
//! threads and queue behind each other, as they would on one GPU. `cuda:N` devices (behind the
//! `cuda` feature) run on a single host thread that drives the GPU.
//!
//! Every compute thread belongs to an executor. candle 0.11 keeps process-wide thread state of
//! its own: a spinning "barrier pool" for elementwise ops, sized from the core count, and a
//! GEMM thread count re-read (from `/proc/cpuinfo`) on every matmul. Left alone, the barrier
//! pool's threads spin beside the executors' and serialise the devices' elementwise ops on one
//! lock. [`init_compute_threads`] turns both off once, before any thread starts: the barrier
//! pool gets no workers (elementwise ops run on the calling executor thread, and the fused
//! kernels of `tandem_models::kernels` split over the executor's own pool), and GEMM splits
//! into at most as many tasks as there are cores, which run on the calling executor's pool.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::ActorError;

/// A device name from the placement: `cpu:N` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    Cpu(usize),
    Cuda(usize),
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Cpu(i) => write!(f, "cpu:{i}"),
            DeviceId::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, idx) = s.split_once(':').unwrap_or((s, "0"));
        let idx: usize = idx
            .parse()
            .map_err(|_| format!("bad device index in {s:?} (expected cpu:N or cuda:N)"))?;
        match kind {
            "cpu" => Ok(DeviceId::Cpu(idx)),
            "cuda" => Ok(DeviceId::Cuda(idx)),
            _ => Err(format!("unknown device {s:?} (expected cpu:N or cuda:N)")),
        }
    }
}

impl DeviceId {
    /// Whether this build can open the device: a `cuda:N` device in a build without the `cuda`
    /// feature is an error that says how to get one. Config loading and the command line check
    /// every device with this before anything starts, so such a request is bad input (exit 2)
    /// from every command rather than a failure half-way through a run.
    pub fn check_built(&self) -> Result<(), String> {
        match self {
            DeviceId::Cuda(i) if !cfg!(feature = "cuda") => Err(format!(
                "cuda:{i} needs a tandem built with CUDA support: \
                 `cargo build --release --features cuda` (or `cargo install --path . --features cuda`)"
            )),
            _ => Ok(()),
        }
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Sets candle's thread knobs (see the module docs). The binary calls it first thing in
/// `main`, before any other thread exists; [`Executor::new`] calls it too (a no-op after the
/// first call), for programs and tests that start executors directly.
pub fn init_compute_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY (edition 2024 would require `unsafe`): called before other threads read the
        // environment, or, from `Executor::new`, only through Rust's locked env accessors.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    });
}

/// One device: a candle device plus the threads that drive it.
pub struct Executor {
    id: DeviceId,
    device: Device,
    pool: rayon::ThreadPool,
    busy: busy_clock::BusyClock,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("id", &self.id)
            .field("threads", &self.pool.current_num_threads())
            .finish()
    }
}

impl Executor {
    /// Starts the executor for `id` with `threads` OS threads (CPU) or one driver thread (CUDA).
    pub fn new(id: DeviceId, threads: usize) -> Result<Arc<Self>, ActorError> {
        Self::start(id, threads, None)
    }

    /// [`Executor::new`], with thread `i` of the pool pinned to `cores[i % cores.len()]` when
    /// `cores` is given (see [`core_plan`]).
    pub fn start(id: DeviceId, threads: usize, cores: Option<Vec<usize>>) -> Result<Arc<Self>, ActorError> {
        init_compute_threads();
        let device = match id {
            DeviceId::Cpu(_) => Device::Cpu,
            DeviceId::Cuda(i) => cuda_device(i)?,
        };
        let threads = if matches!(id, DeviceId::Cuda(_)) {
            1
        } else {
            threads.max(1)
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("tandem-{id}-{i}"))
            .start_handler(move |i| {
                if let Some(cores) = cores.as_deref().filter(|c| !c.is_empty()) {
                    let core = cores[i % cores.len()];
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(device = %id, core, "could not pin an executor thread");
                    }
                }
            })
            .build()
            .map_err(|e| ActorError::Device(format!("{id}: cannot start thread pool: {e}")))?;
        Ok(Arc::new(Self {
            id,
            device,
            pool,
            busy: Default::default(),
        }))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Seconds this device has spent computing since it started.
    pub fn busy_seconds(&self) -> f64 {
        self.busy.total().as_secs_f64()
    }

    /// Runs `f` on this device's threads and returns its result together with the time it took.
    /// Cancel safety: dropping the future does not stop `f`; its result is discarded.
    pub async fn run<R, F>(self: &Arc<Self>, f: F) -> Result<(R, Duration), ActorError>
    where
        R: Send + 'static,
        F: FnOnce(&Device) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        self.pool.spawn(move || {
            let start = Instant::now();
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&me.device)));
            let took = start.elapsed();
            me.busy.add(took);
            let _ = tx.send(out.map(|r| (r, took)));
        });
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => Err(ActorError::Panicked(panic_message(&panic))),
            Err(_) => Err(ActorError::Device(format!("{}: executor dropped the task", self.id))),
        }
    }
}

/// Which cores each CPU device's threads are pinned to when `placement.pin_threads` is on:
/// the CPU devices in index order take consecutive cores of those this process may use (its
/// affinity mask), `threads` each, so `cpu:0` and `cpu:1` never share a core and the OS never
/// moves a device's thread onto another device's core. Control threads stay unpinned. `Err`
/// says why no plan fits (more executor threads than usable cores); CUDA devices are skipped.
pub fn core_plan(devices: &[DeviceId], threads: usize) -> Result<BTreeMap<DeviceId, Vec<usize>>, String> {
    let mut cores: Vec<usize> = core_affinity::get_core_ids()
        .ok_or("cannot read this process's CPU affinity")?
        .into_iter()
        .map(|c| c.id)
        .collect();
    cores.sort_unstable();
    let cpus: BTreeSet<DeviceId> = devices
        .iter()
        .filter(|d| matches!(d, DeviceId::Cpu(_)))
        .copied()
        .collect();
    let needed = cpus.len() * threads.max(1);
    if needed > cores.len() {
        return Err(format!(
            "{} CPU device(s) x {} thread(s) need {needed} cores; this process may use {}",
            cpus.len(),
            threads.max(1),
            cores.len()
        ));
    }
    Ok(cpus
        .into_iter()
        .zip(cores.chunks(threads.max(1)))
        .map(|(d, c)| (d, c.to_vec()))
        .collect())
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(feature = "cuda")]
fn cuda_device(i: usize) -> Result<Device, ActorError> {
    Device::new_cuda(i).map_err(|e| ActorError::Device(format!("cuda:{i}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(i: usize) -> Result<Device, ActorError> {
    Err(ActorError::Device(DeviceId::Cuda(i).check_built().unwrap_err()))
}

mod busy_clock {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Accumulated busy time in nanoseconds.
    #[derive(Default)]
    pub struct BusyClock(AtomicU64);

    impl BusyClock {
        pub fn add(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
        pub fn total(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::Relaxed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu:1".parse::<DeviceId>().unwrap(), DeviceId::Cpu(1));
        assert_eq!("cuda:0".parse::<DeviceId>().unwrap(), DeviceId::Cuda(0));
        assert!("tpu:0".parse::<DeviceId>().is_err());
        assert!("cpu:x".parse::<DeviceId>().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_cpu_devices_compute_at_the_same_time() {
        let a = Executor::new(DeviceId::Cpu(0), 1).unwrap();
        let b = Executor::new(DeviceId::Cpu(1), 1).unwrap();
        let spin = |_: &Device| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(200) {
                std::hint::spin_loop();
            }
            std::thread::current().name().unwrap_or("").to_string()
        };
        let start = Instant::now();
        let (ra, rb) = tokio::join!(a.run(spin), b.run(spin));
        let wall = start.elapsed();
        let (na, nb) = (ra.unwrap().0, rb.unwrap().0);
        assert!(
            na.starts_with("tandem-cpu:0") && nb.starts_with("tandem-cpu:1"),
            "{na} {nb}"
        );
        // Two 200 ms jobs on separate devices overlap; on one device they would take 400 ms.
        assert!(wall < Duration::from_millis(380), "took {wall:?}");
        assert!(a.busy_seconds() >= 0.19);
    }

    #[test]
    fn pinned_devices_get_disjoint_cores_and_their_threads_stay_there() {
        let usable = core_affinity::get_core_ids().unwrap().len();
        let devices = [DeviceId::Cpu(1), DeviceId::Cpu(0), DeviceId::Cpu(1)];
        if usable < 2 {
            assert!(core_plan(&devices, 1).is_err());
            return;
        }
        let plan = core_plan(&devices, 1).unwrap();
        assert_eq!(plan.len(), 2);
        assert_ne!(plan[&DeviceId::Cpu(0)], plan[&DeviceId::Cpu(1)]);
        let err = core_plan(&devices, usable).unwrap_err();
        assert!(err.contains("need"), "{err}");

        let core = plan[&DeviceId::Cpu(1)][0];
        let exec = Executor::start(DeviceId::Cpu(1), 1, Some(vec![core])).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        exec.pool.spawn(move || {
            // The thread's allowed CPUs, from the kernel: exactly the planned core.
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
            tx.send(allowed).unwrap();
        });
        if let Some(allowed) = rx.recv().unwrap() {
            assert_eq!(allowed, core.to_string());
        }
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_not_a_crash() {
        let a = Executor::new(DeviceId::Cpu(0), 1).unwrap();
        let r: Result<((), _), _> = a.run(|_| panic!("boom")).await;
        assert!(matches!(r, Err(ActorError::Panicked(m)) if m == "boom"));
        assert_eq!(a.run(|_| 3).await.unwrap().0, 3);
    }
}
