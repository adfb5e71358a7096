//! The store's writer thread: turns each learner step's records into log records.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The running writer thread; [`StoreWriter::finish`] waits for it.
pub struct StoreWriter {
    thread: JoinHandle<Result<StoreStats, StoreError>>,
    written: Arc<AtomicU64>,
}

impl StoreWriter {
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
    let (segments, _) = SegmentWriter::open(dir, cfg.segment_bytes)?;
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue.max(1));
    let cfg = cfg.clone();
    let written = Arc::new(AtomicU64::new(first_step));
    let w = written.clone();
    let thread = std::thread::Builder::new()
        .name("tandem-store".into())
        .spawn(move || write_loop(segments, rx, &cfg, &w))
        .map_err(|e| StoreError::io(dir, e))?;
    Ok((tx, StoreWriter { thread, written }))
}

fn write_loop(
    mut w: SegmentWriter,
    rx: Receiver<StepRecords>,
    cfg: &StoreConfig,
    written: &AtomicU64,
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
        tracing::error!("trajectory store: {e}; no more trajectories are stored");
    }
    // Flush what was written, even after an error.
    let synced = w.sync();
    result.and(synced).map(|()| stats)
}
