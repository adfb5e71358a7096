//! Segment files: writing records with their length and checksum, reading and checking them.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::record::{decode, Record};
use super::StoreError;

/// Bytes before each payload: length and CRC32, both u32 LE.
pub const HEADER_BYTES: u64 = 8;
/// Longest payload a reader accepts (a longer length field is damage, not a huge record).
const MAX_PAYLOAD: u64 = 1 << 30;

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("record cut short: {needed} bytes needed, {left} left in the file")]
    Torn { needed: u64, left: u64 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("implausible record length {0}")]
    Length(u64),
    #[error("record does not decode: {0}")]
    Decode(String),
}

/// `seg-000001.log` for segment 1.
pub fn segment_name(n: u32) -> String {
    format!("seg-{n:06}.log")
}

/// The segment files in `dir`, in order (none if `dir` does not exist).
pub fn list_segments(dir: &Path) -> Result<Vec<(u32, PathBuf)>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    let mut out = vec![];
    for e in entries {
        let e = e.map_err(|e| StoreError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse::<u32>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Walks the records of one segment's bytes, calling `each(offset, payload)` for every whole
/// record with a good checksum; stops at the first bad one and returns its offset and damage.
fn scan(buf: &[u8], mut each: impl FnMut(u64, &[u8]) -> Result<(), Damage>) -> Option<(u64, Damage)> {
    let mut at = 0usize;
    while at < buf.len() {
        let left = (buf.len() - at) as u64;
        if left < HEADER_BYTES {
            return Some((
                at as u64,
                Damage::Torn {
                    needed: HEADER_BYTES,
                    left,
                },
            ));
        }
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as u64;
        let stored = u32::from_le_bytes(buf[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Some((at as u64, Damage::Length(len)));
        }
        if HEADER_BYTES + len > left {
            return Some((
                at as u64,
                Damage::Torn {
                    needed: HEADER_BYTES + len,
                    left,
                },
            ));
        }
        let payload = &buf[at + 8..at + 8 + len as usize];
        let computed = crc32fast::hash(payload);
        if computed != stored {
            return Some((at as u64, Damage::Checksum { stored, computed }));
        }
        if let Err(d) = each(at as u64, payload) {
            return Some((at as u64, d));
        }
        at += 8 + len as usize;
    }
    None
}

/// How readers treat a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Every byte must be a whole, good record (`tandem replay --verify`).
    Strict,
    /// A record cut short at the end of the last segment (a crash mid-write) ends the log;
    /// it is reported in [`StoreRead::torn_tail`], never read. Other damage is an error.
    Tolerant,
    /// Damage of any kind is skipped: reading goes on at the next offset where a whole record
    /// with a good checksum that decodes begins, and each skipped byte range is reported in
    /// [`StoreRead::skipped`] (`tandem replay --skip-corrupt`).
    SkipCorrupt,
}

/// A byte range of a segment that [`ReadMode::SkipCorrupt`] skipped.
#[derive(Debug)]
pub struct Skipped {
    pub path: PathBuf,
    /// The first skipped byte and one past the last.
    pub start: u64,
    pub end: u64,
    /// Good records of this segment before the range.
    pub after_records: usize,
    /// What was wrong at `start`.
    pub damage: Damage,
}

/// Everything a reader found.
#[derive(Debug, Default)]
pub struct StoreRead {
    /// Each record with its segment file and byte offset.
    pub records: Vec<(PathBuf, u64, Record)>,
    /// Total bytes of good records (headers included).
    pub bytes: u64,
    /// In [`ReadMode::Tolerant`]: the segment and offset where a torn tail begins.
    pub torn_tail: Option<(PathBuf, u64)>,
    /// In [`ReadMode::SkipCorrupt`]: the damaged ranges that were skipped, in order.
    pub skipped: Vec<Skipped>,
}

/// Whether a whole record with a good checksum that decodes begins at `at`.
fn record_at(buf: &[u8], at: usize) -> bool {
    let left = (buf.len() - at) as u64;
    if left < HEADER_BYTES {
        return false;
    }
    let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as u64;
    let stored = u32::from_le_bytes(buf[at + 4..at + 8].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD || HEADER_BYTES + len > left {
        return false;
    }
    let payload = &buf[at + 8..at + 8 + len as usize];
    crc32fast::hash(payload) == stored && decode(payload).is_ok()
}

/// [`scan`] that skips damage: after a bad record it goes on at the next offset where
/// [`record_at`] holds (or the end). Returns each skipped range with its damage and the number
/// of good records before it.
fn scan_skipping(buf: &[u8], mut each: impl FnMut(u64, &[u8]) -> Result<(), Damage>) -> Vec<(u64, u64, usize, Damage)> {
    let mut skipped = vec![];
    let (mut at, mut good) = (0usize, 0usize);
    while at < buf.len() {
        let base = at as u64;
        let bad = scan(&buf[at..], |o, p| {
            each(base + o, p)?;
            good += 1;
            Ok(())
        });
        let Some((o, damage)) = bad else { break };
        let start = at + o as usize;
        let end = (start + 1..buf.len()).find(|&o| record_at(buf, o)).unwrap_or(buf.len());
        skipped.push((start as u64, end as u64, good, damage));
        at = end;
    }
    skipped
}

/// Reads and checks every record in `dir` (a run's `trajectories/`).
pub fn read_store(dir: &Path, mode: ReadMode) -> Result<StoreRead, StoreError> {
    let segments = list_segments(dir)?;
    let mut out = StoreRead::default();
    for (i, (_, path)) in segments.iter().enumerate() {
        let buf = std::fs::read(path).map_err(|e| StoreError::io(path, e))?;
        let mut bytes = 0u64;
        if mode == ReadMode::SkipCorrupt {
            let skipped = scan_skipping(&buf, |offset, payload| {
                let r = decode(payload).map_err(Damage::Decode)?;
                bytes += HEADER_BYTES + payload.len() as u64;
                out.records.push((path.clone(), offset, r));
                Ok(())
            });
            out.bytes += bytes;
            out.skipped
                .extend(skipped.into_iter().map(|(start, end, after_records, damage)| Skipped {
                    path: path.clone(),
                    start,
                    end,
                    after_records,
                    damage,
                }));
            continue;
        }
        let bad = scan(&buf, |offset, payload| {
            let r = decode(payload).map_err(Damage::Decode)?;
            bytes += HEADER_BYTES + payload.len() as u64;
            out.records.push((path.clone(), offset, r));
            Ok(())
        });
        out.bytes += bytes;
        match bad {
            None => {}
            Some((offset, Damage::Torn { .. })) if mode == ReadMode::Tolerant && i + 1 == segments.len() => {
                out.torn_tail = Some((path.clone(), offset));
            }
            Some((offset, damage)) => {
                return Err(StoreError::Damaged {
                    path: path.clone(),
                    offset,
                    damage,
                })
            }
        }
    }
    Ok(out)
}

/// Appends records to the last segment of a store, starting new segments past a size.
pub struct SegmentWriter {
    dir: PathBuf,
    number: u32,
    path: PathBuf,
    file: BufWriter<File>,
    len: u64,
    segment_bytes: u64,
}

impl SegmentWriter {
    /// Opens `dir` for appending (creating it). A torn tail of the last segment — a record cut
    /// short, or a last record whose checksum fails — is cut off and logged, and its offset
    /// returned; the cut bytes are kept in `seg-N.log.torn-OFFSET` beside it. Other damage in
    /// the last segment is an error (nothing is thrown away).
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, Option<u64>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let segments = list_segments(dir)?;
        let (number, path) = segments
            .last()
            .cloned()
            .unwrap_or_else(|| (1, dir.join(segment_name(1))));
        let mut cut = None;
        let mut len = 0;
        if path.exists() {
            let buf = std::fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
            len = buf.len() as u64;
            let mut last_end = 0u64;
            let bad = scan(&buf, |offset, payload| {
                last_end = offset + HEADER_BYTES + payload.len() as u64;
                Ok(())
            });
            if let Some((offset, damage)) = bad {
                let is_tail = match &damage {
                    Damage::Torn { .. } => true,
                    // A whole last record with a bad checksum: a write the crash left half-done.
                    Damage::Checksum { .. } => {
                        let l = u32::from_le_bytes(buf[offset as usize..offset as usize + 4].try_into().expect("4"));
                        offset + HEADER_BYTES + l as u64 == len
                    }
                    _ => false,
                };
                if !is_tail {
                    return Err(StoreError::Damaged { path, offset, damage });
                }
                debug_assert_eq!(offset, last_end);
                // The cut bytes are kept beside the segment: a damaged length field can look
                // like a torn write, and then more than one record would follow it.
                let aside = path.with_file_name(format!(
                    "{}.torn-{offset}",
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                std::fs::write(&aside, &buf[offset as usize..]).map_err(|e| StoreError::io(&aside, e))?;
                tracing::warn!(
                    segment = %path.display(),
                    offset,
                    bytes = len - offset,
                    kept = %aside.display(),
                    "trajectory store: cutting off a torn last record ({damage})"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| StoreError::io(&path, e))?;
                f.set_len(offset).map_err(|e| StoreError::io(&path, e))?;
                f.sync_all().map_err(|e| StoreError::io(&path, e))?;
                len = offset;
                cut = Some(offset);
            }
        }
        let file = Self::open_file(&path)?;
        Ok((
            Self {
                dir: dir.to_path_buf(),
                number,
                path,
                file,
                len,
                segment_bytes,
            },
            cut,
        ))
    }

    fn open_file(path: &Path) -> Result<BufWriter<File>, StoreError> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        Ok(BufWriter::with_capacity(1 << 20, f))
    }

    /// The segment being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record; returns the bytes it took (header included).
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        let size = HEADER_BYTES + payload.len() as u64;
        if self.len > 0 && self.len + size > self.segment_bytes {
            self.sync()?;
            self.number += 1;
            self.path = self.dir.join(segment_name(self.number));
            self.file = Self::open_file(&self.path)?;
            self.len = 0;
        }
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let p = &self.path;
        self.file.write_all(&header).map_err(|e| StoreError::io(p, e))?;
        self.file.write_all(payload).map_err(|e| StoreError::io(p, e))?;
        self.len += size;
        Ok(size)
    }

    /// Hands buffered records to the OS (they survive the process being killed).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.file.flush().map_err(|e| StoreError::io(&self.path, e))
    }

    /// Flushes and fsyncs the current segment (they survive a machine crash).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| StoreError::io(&self.path, e))
    }
}

/// Sets aside every record of learner steps `>= step` (a resumed run redoes them): the rest of
/// the segment holding the first such record goes to `seg-N.log.superseded-OFFSET`, later
/// segments are renamed `seg-N.log.superseded`. Records are in step order, so everything
/// before the cut is kept. Returns how many records were set aside.
pub fn set_aside_from_step(dir: &Path, step: u64) -> Result<usize, StoreError> {
    let read = read_store(dir, ReadMode::Tolerant)?;
    let Some(first) = read.records.iter().position(|(_, _, r)| match r {
        Record::Trajectory(t) => t.outcome.step() >= step,
    }) else {
        return Ok(0);
    };
    let n = read.records.len() - first;
    let (path, offset, _) = &read.records[first];
    let aside = |p: &Path, suffix: String| {
        p.with_file_name(format!(
            "{}.{suffix}",
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    };
    let buf = std::fs::read(path).map_err(|e| StoreError::io(path, e))?;
    let kept = aside(path, format!("superseded-{offset}"));
    std::fs::write(&kept, &buf[*offset as usize..]).map_err(|e| StoreError::io(&kept, e))?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    f.set_len(*offset).map_err(|e| StoreError::io(path, e))?;
    f.sync_all().map_err(|e| StoreError::io(path, e))?;
    for (_, later) in list_segments(dir)?.into_iter().filter(|(_, p)| p > path) {
        let to = aside(&later, "superseded".into());
        std::fs::rename(&later, &to).map_err(|e| StoreError::io(&later, e))?;
    }
    tracing::info!(records = n, step, kept = %kept.display(), "trajectory store: set aside the records of steps the resumed run redoes");
    Ok(n)
}
