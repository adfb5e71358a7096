//! The trajectory store's log: every field round-trips, damage is found at the right offset,
//! a torn tail is cut on reopen, segments roll over, and retention picks the steps.

use std::path::Path;

use tandem_actors::{StepRecords, TokenOutputs, Trajectory};
use tandem_runtime::store::{
    encode, read_store, segment_name, spawn_writer, Damage, Outcome, ReadMode, Record, SegmentWriter, StoreError,
    StoredTrajectory, HEADER_BYTES,
};
use tandem_runtime::{Retention, StoreConfig};

fn trajectory(i: u64) -> StoredTrajectory {
    let f = |k: f32| vec![k + i as f32, -0.5 * k, 1e-3 * k];
    StoredTrajectory {
        ticket: 7 + i,
        row: 3 + i as u32,
        prompt_index: 1000 + i,
        prompt_ids: vec![1, 2, 3, i as u32],
        response_ids: vec![9, 8, 7],
        behaviour_logprobs: f(-1.0),
        full_logprobs: f(-1.5),
        ref_logprobs: f(-2.0),
        stopped: i.is_multiple_of(2),
        score: 0.25 + i as f32,
        values: f(0.5),
        token_rewards: f(0.01),
        advantages: f(1.5),
        returns: f(2.5),
        policy_version: 40 + i,
        // Some records span two versions (the record's other variant).
        token_versions: if i % 4 == 1 {
            vec![40 + i, 41 + i, 41 + i]
        } else {
            vec![]
        },
        sampler: format!("rollout/cpu:0/{i}"),
        sampling_seed: 0xDEAD_BEEF_0000 + i,
        sampled_unix_ms: 1_700_000_000_000 + i,
        stored_unix_ms: 1_700_000_000_500 + i,
        outcome: if i.is_multiple_of(3) {
            Outcome::Dropped { step: 11 + i }
        } else {
            Outcome::Used { step: 12 + i }
        },
    }
}

/// Writes `n` records into `dir`; returns each record's (segment name, offset).
fn write(dir: &Path, n: u64, segment_bytes: u64) -> Vec<(String, u64)> {
    let (mut w, cut) = SegmentWriter::open(dir, segment_bytes).unwrap();
    assert_eq!(cut, None);
    let mut at = vec![];
    let mut offset = 0;
    let mut seg = w.path().to_path_buf();
    for i in 0..n {
        let payload = encode(&Record::Trajectory(trajectory(i)));
        let size = w.append(&payload).unwrap();
        if w.path() != seg {
            seg = w.path().to_path_buf();
            offset = 0;
        }
        at.push((seg.file_name().unwrap().to_string_lossy().into_owned(), offset));
        offset += size;
    }
    w.sync().unwrap();
    at
}

fn damaged(e: StoreError) -> (String, u64, Damage) {
    match e {
        StoreError::Damaged { path, offset, damage } => {
            (path.file_name().unwrap().to_string_lossy().into_owned(), offset, damage)
        }
        other => panic!("expected damage, got {other}"),
    }
}

#[test]
fn every_field_round_trips_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let at = write(dir.path(), 5, 64 << 20);
    let read = read_store(dir.path(), ReadMode::Strict).unwrap();
    assert_eq!(read.records.len(), 5);
    assert!(read.torn_tail.is_none());
    for (i, (path, offset, r)) in read.records.into_iter().enumerate() {
        assert_eq!(r, Record::Trajectory(trajectory(i as u64)));
        assert_eq!(
            (path.file_name().unwrap().to_string_lossy().into_owned(), offset),
            at[i]
        );
    }
    let len = std::fs::metadata(dir.path().join(segment_name(1))).unwrap().len();
    assert_eq!(read.bytes, len);
}

#[test]
fn a_flipped_byte_is_found_at_its_records_offset() {
    let dir = tempfile::tempdir().unwrap();
    let at = write(dir.path(), 4, 64 << 20);
    let path = dir.path().join(segment_name(1));
    let mut bytes = std::fs::read(&path).unwrap();
    let bad = at[2].1;
    bytes[(bad + HEADER_BYTES + 5) as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    for mode in [ReadMode::Strict, ReadMode::Tolerant] {
        let (seg, offset, damage) = damaged(read_store(dir.path(), mode).unwrap_err());
        assert_eq!((seg.as_str(), offset), ("seg-000001.log", bad));
        assert!(matches!(damage, Damage::Checksum { .. }), "{damage}");
    }
    // Not a tail: reopening refuses rather than throwing records away.
    let (_, offset, _) = damaged(SegmentWriter::open(dir.path(), 64 << 20).err().unwrap());
    assert_eq!(offset, bad);
    let e = read_store(dir.path(), ReadMode::Strict).unwrap_err().to_string();
    assert!(
        e.contains(&format!("seg-000001.log at byte {bad}: checksum mismatch")),
        "{e}"
    );
}

#[test]
fn a_truncation_mid_record_is_torn_and_reopening_cuts_it() {
    let dir = tempfile::tempdir().unwrap();
    let at = write(dir.path(), 4, 64 << 20);
    let path = dir.path().join(segment_name(1));
    let last = at[3].1;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(last + HEADER_BYTES + 3).unwrap();
    drop(f);
    let (seg, offset, damage) = damaged(read_store(dir.path(), ReadMode::Strict).unwrap_err());
    assert_eq!((seg.as_str(), offset), ("seg-000001.log", last));
    assert!(matches!(damage, Damage::Torn { .. }), "{damage}");
    // A tolerant reader stops before the torn record, never reading it.
    let read = read_store(dir.path(), ReadMode::Tolerant).unwrap();
    assert_eq!(read.records.len(), 3);
    assert_eq!(read.torn_tail.as_ref().map(|(_, o)| *o), Some(last));
    // Reopening cuts it off and appends after the last whole record.
    let tail = std::fs::read(&path).unwrap()[last as usize..].to_vec();
    let (mut w, cut) = SegmentWriter::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(cut, Some(last));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last);
    // The cut bytes are kept beside the segment, byte for byte.
    let aside = dir.path().join(format!("seg-000001.log.torn-{last}"));
    assert_eq!(std::fs::read(&aside).unwrap(), tail);
    w.append(&encode(&Record::Trajectory(trajectory(9)))).unwrap();
    w.sync().unwrap();
    let read = read_store(dir.path(), ReadMode::Strict).unwrap();
    assert_eq!(read.records.len(), 4);
    assert_eq!(read.records[3].1, last);
    assert_eq!(read.records[3].2, Record::Trajectory(trajectory(9)));
    // A header cut short is torn too.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(last + 5).unwrap();
    drop(f);
    let (_, offset, damage) = damaged(read_store(dir.path(), ReadMode::Strict).unwrap_err());
    assert_eq!((offset, damage), (last, Damage::Torn { needed: 8, left: 5 }));
}

#[test]
fn segments_roll_over_and_damage_names_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let at = write(dir.path(), 10, 500);
    let segments: std::collections::BTreeSet<_> = at.iter().map(|(s, _)| s.clone()).collect();
    assert!(segments.len() >= 3, "{segments:?}");
    for (seg, _) in &at {
        assert!(std::fs::metadata(dir.path().join(seg)).unwrap().len() <= 500);
    }
    let read = read_store(dir.path(), ReadMode::Strict).unwrap();
    assert_eq!(read.records.len(), 10);
    // A record cut short in a segment that is not the last is damage, even for a tolerant reader.
    let (seg, offset) = at
        .iter()
        .find(|(s, o)| s == "seg-000002.log" && *o > 0)
        .unwrap()
        .clone();
    let path = dir.path().join(&seg);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(offset + 20).unwrap();
    drop(f);
    let (s, o, _) = damaged(read_store(dir.path(), ReadMode::Tolerant).unwrap_err());
    assert_eq!((s, o), (seg, offset));
}

fn raw(i: u64) -> Trajectory {
    let t = trajectory(i);
    Trajectory {
        ticket: t.ticket,
        row: t.row,
        prompt_index: t.prompt_index,
        prompt_ids: t.prompt_ids,
        response_ids: t.response_ids,
        behaviour_logprobs: t.behaviour_logprobs,
        full_logprobs: t.full_logprobs,
        stopped: t.stopped,
        policy_version: t.policy_version,
        token_versions: t.token_versions,
        sampler: t.sampler,
        sampling_seed: t.sampling_seed,
        ref_logprobs: t.ref_logprobs,
        score: t.score,
        values: t.values,
        sampled_unix_ms: t.sampled_unix_ms,
    }
}

fn run_writer(retention: Retention, every: u64, steps: u64) -> Vec<StoredTrajectory> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        retention,
        every,
        segment_bytes: 4096,
        queue: 1,
    };
    let (tx, w) = spawn_writer(dir.path(), &cfg, 0).unwrap();
    for step in 0..steps {
        let t = trajectory(step);
        let computed = TokenOutputs {
            rewards: t.token_rewards.clone(),
            advantages: t.advantages.clone(),
            returns: t.returns.clone(),
        };
        tx.send(StepRecords {
            step,
            used: vec![(raw(step), computed)],
            dropped: vec![raw(100 + step)],
        })
        .unwrap();
    }
    drop(tx);
    let stats = w.finish().unwrap();
    let read = read_store(dir.path(), ReadMode::Strict).unwrap();
    assert_eq!(stats.trajectories as usize, read.records.len());
    assert_eq!(stats.bytes, read.bytes);
    read.records
        .into_iter()
        .map(|(_, _, r)| match r {
            Record::Trajectory(t) => t,
        })
        .collect()
}

#[test]
fn the_writer_stores_used_and_dropped_with_their_step() {
    let stored = run_writer(Retention::All, 1, 6);
    assert_eq!(stored.len(), 12);
    let (used, dropped) = (&stored[4], &stored[5]);
    let mut want = trajectory(2);
    want.outcome = Outcome::Used { step: 2 };
    want.stored_unix_ms = used.stored_unix_ms;
    assert_eq!(used, &want);
    assert!(used.stored_unix_ms > 1_700_000_000_000);
    assert_eq!(dropped.outcome, Outcome::Dropped { step: 2 });
    assert_eq!(dropped.ticket, trajectory(102).ticket);
    assert!(dropped.advantages.is_empty() && dropped.token_rewards.is_empty() && dropped.returns.is_empty());
}

#[test]
fn retention_keeps_every_nth_step_or_none() {
    let steps = |v: Vec<StoredTrajectory>| {
        let mut s: Vec<u64> = v.iter().map(|t| t.outcome.step()).collect();
        s.dedup();
        s
    };
    assert_eq!(steps(run_writer(Retention::EveryN, 3, 8)), vec![0, 3, 6]);
    assert!(run_writer(Retention::None, 1, 4).is_empty());
}

#[test]
fn skip_corrupt_reads_around_every_damaged_range_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let at = write(dir.path(), 8, 64 << 20);
    let path = dir.path().join(segment_name(1));
    let mut bytes = std::fs::read(&path).unwrap();
    // Record 2: a payload byte (checksum). Record 5: its length field (the resync must find 6).
    bytes[at[2].1 as usize + HEADER_BYTES as usize + 3] ^= 0xff;
    bytes[at[5].1 as usize + 2] ^= 0x40;
    // And a torn last record.
    let end = bytes.len();
    bytes.truncate(end - 5);
    std::fs::write(&path, &bytes).unwrap();
    for mode in [ReadMode::Strict, ReadMode::Tolerant] {
        assert!(read_store(dir.path(), mode).is_err(), "{mode:?}");
    }
    let read = read_store(dir.path(), ReadMode::SkipCorrupt).unwrap();
    let kept: Vec<u64> = read
        .records
        .iter()
        .map(|(_, _, Record::Trajectory(t))| t.ticket - 7)
        .collect();
    assert_eq!(kept, vec![0, 1, 3, 4, 6]);
    let ranges: Vec<(u64, u64, usize)> = read.skipped.iter().map(|s| (s.start, s.end, s.after_records)).collect();
    assert_eq!(
        ranges,
        vec![
            (at[2].1, at[3].1, 2),
            (at[5].1, at[6].1, 4),
            (at[7].1, end as u64 - 5, 5)
        ]
    );
    assert!(matches!(read.skipped[0].damage, Damage::Checksum { .. }));
    assert!(matches!(read.skipped[2].damage, Damage::Torn { .. }));
}
