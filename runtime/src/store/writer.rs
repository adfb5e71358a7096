//! The store's writer thread: turns each learner step's records into log records.
//!
//! A write that fails (a full disk, say) ends the thread: it records the error in the
//! [`StoreFailure`] the run watches, fsyncs what it wrote and drops its receiver, so the
//! learner's next send fails and the learner stops the run at that step boundary (see
//! `tandem_actors::learner`); a checkpoint waiting for the store gives up at once. The store
//! never stops silently while training goes on.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tandem_actors::trajectory::unix_ms;
use tandem_actors::StepRecords;

use super::record::{encode, Outcome, Record, StoredTrajectory};
use super::segment::SegmentWriter;
use super::StoreError;
use crate::config::StoreConfig;

/// What the writer wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    pub trajectories: u64,
    pub bytes: u64,
}

impl StoreStats {
    pub fn bytes_per_trajectory(&self) -> f64 {
        self.bytes as f64 / self.trajectories.max(1) as f64
    }
}

/// Why the writer stopped early: set once, by the writer thread, when a write fails.
pub type StoreFailure = Arc<OnceLock<String>>;

/// The running writer thread; [`StoreWriter::finish`] waits for it.
pub struct StoreWriter {
    thread: JoinHandle<Result<StoreStats, StoreError>>,
    written: Arc<AtomicU64>,
    failed: StoreFailure,
}

impl StoreWriter {
    /// The writer's error once a write has failed (and it has stopped).
    pub fn failure(&self) -> StoreFailure {
        self.failed.clone()
    }

    /// Learner steps whose records are written and flushed (or not kept): one past the last.
    pub fn steps_written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    /// Waits until every sender is dropped and the writer has flushed and fsynced the log.
    pub fn finish(self) -> Result<StoreStats, StoreError> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(StoreError::io("trajectories", std::io::Error::other("writer panicked"))))
    }
}

/// Opens (or reopens, cutting a torn tail) the store in `dir` and starts its writer thread.
/// The returned sender is bounded by `cfg.queue` steps; `first_step` is the first step the
/// run will send (its resume point).
pub fn spawn_writer(
    dir: &Path,
    cfg: &StoreConfig,
    first_step: u64,
) -> Result<(Sender<StepRecords>, StoreWriter), StoreError> {
    spawn_writer_with_fault(dir, cfg, first_step, None)
}

/// [`spawn_writer`] whose writes fail as on a full disk from learner step `disk_full_at` on
/// (`faults.disk_full_store_at_step`).
pub fn spawn_writer_with_fault(
    dir: &Path,
    cfg: &StoreConfig,
    first_step: u64,
    disk_full_at: Option<u64>,
) -> Result<(Sender<StepRecords>, StoreWriter), StoreError> {
    let (segments, _) = SegmentWriter::open(dir, cfg.segment_bytes)?;
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue.max(1));
    let cfg = cfg.clone();
    let written = Arc::new(AtomicU64::new(first_step));
    let failed = StoreFailure::default();
    let (w, f) = (written.clone(), failed.clone());
    let dir_name = dir.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("tandem-store".into())
        .spawn(move || {
            let out = write_loop(segments, rx, &cfg, &w, disk_full_at, &dir_name);
            if let Err(e) = &out {
                let _ = f.set(e.to_string());
            }
            out
        })
        .map_err(|e| StoreError::io(dir, e))?;
    Ok((
        tx,
        StoreWriter {
            thread,
            written,
            failed,
        },
    ))
}

fn write_loop(
    mut w: SegmentWriter,
    rx: Receiver<StepRecords>,
    cfg: &StoreConfig,
    written: &AtomicU64,
    disk_full_at: Option<u64>,
    dir: &Path,
) -> Result<StoreStats, StoreError> {
    let mut stats = StoreStats::default();
    let result = (|| {
        for rec in rx.iter() {
            if !cfg.keeps(rec.step) {
                written.fetch_max(rec.step + 1, Ordering::Release);
                continue;
            }
            let now = unix_ms();
            let step = rec.step;
            if tandem_actors::faults::disk_full_at(disk_full_at, step) {
                return Err(StoreError::io(dir, tandem_actors::faults::disk_full()));
            }
            let used = rec
                .used
                .into_iter()
                .map(|(t, c)| StoredTrajectory::new(t, Some(c), Outcome::Used { step }, now));
            let dropped = rec
                .dropped
                .into_iter()
                .map(|t| StoredTrajectory::new(t, None, Outcome::Dropped { step }, now));
            for t in used.chain(dropped) {
                let bytes = w.append(&encode(&Record::Trajectory(t)))?;
                stats.trajectories += 1;
                stats.bytes += bytes;
                metrics::counter!("tandem_store_bytes_written").increment(bytes);
                metrics::counter!("tandem_store_trajectories_written").increment(1);
            }
            w.flush()?;
            written.fetch_max(step + 1, Ordering::Release);
            metrics::gauge!("tandem_store_bytes_per_trajectory").set(stats.bytes_per_trajectory());
        }
        Ok(())
    })();
    if let Err(e) = &result {
        tracing::error!("trajectory store: {e}; no more trajectories are stored, so the run stops");
    }
    // Flush what was written, even after an error.
    let synced = w.sync();
    result.and(synced).map(|()| stats)
}
