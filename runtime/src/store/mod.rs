//! The trajectory store: every trajectory the run settles, in `RUN_DIR/trajectories/`.
//!
//! Layout: an append-only log split into segment files `seg-000001.log`, `seg-000002.log`, ...;
//! a segment is closed (and fsynced) and the next begun once it passes `store.segment_bytes`.
//! A segment is a sequence of records, each
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC32 (IEEE) of the payload
//! [u8]    payload: a bincode 2 (standard config, serde) encoding of a [`Record`]
//! ```
//!
//! with no header or padding, so a record's byte offset is the sum of the sizes before it.
//!
//! Who writes: the learner sends each step's [`tandem_actors::StepRecords`] (trajectories it
//! trained on, with per-token rewards, advantages and returns, and those the replay buffer
//! dropped as stale) over a bounded channel to the store's own thread ([`spawn_writer`]), off
//! the actors' hot path. If the writer falls behind by `store.queue` steps the learner waits.
//! The writer flushes to the OS after every step (so a killed process loses at most the record
//! being written) and flushes and fsyncs when the channel closes at the end of the run
//! (including Ctrl-C) and at each segment change.
//!
//! Damage: readers check every length and checksum. A record cut short at the end of the last
//! segment (a crash mid-write) is a *torn tail*: [`SegmentWriter::open`] cuts it off (truncating
//! the file at the last whole record) before appending, and [`read_store`] in
//! [`ReadMode::Tolerant`] stops before it; neither ever yields it as data. Anything else — a
//! bad checksum, a record that does not decode, a short record in an earlier segment — is
//! reported as [`StoreError::Damaged`] with the segment file and the byte offset of the first
//! bad record.

mod record;
mod segment;
mod writer;

pub use record::{decode, encode, Outcome, Record, StoredTrajectory};
pub use segment::{
    list_segments, read_store, segment_name, set_aside_from_step, Damage, ReadMode, SegmentWriter, Skipped, StoreRead,
    HEADER_BYTES,
};
pub use writer::{spawn_writer, spawn_writer_with_fault, StoreFailure, StoreStats, StoreWriter};

use std::path::PathBuf;

/// The store's directory inside a run directory.
pub fn store_dir(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("trajectories")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} at byte {offset}: {damage}", path.display())]
    Damaged { path: PathBuf, offset: u64, damage: Damage },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<StoreError> for crate::RuntimeError {
    fn from(e: StoreError) -> Self {
        crate::RuntimeError::Store(e.to_string())
    }
}
