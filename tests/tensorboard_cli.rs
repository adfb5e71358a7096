//! `[metrics] tensorboard = true`: a run writes its per-step scalars as TensorBoard event files
//! in `RUN_DIR/tb/`. One test reads them with a parser written here (record framing and both
//! masked CRC-32Cs, the protobuf fields), independent of the writer; another reads them with
//! the `tensorboard` Python package's own reader, and says that it skipped when there is no
//! Python with `tensorboard` (`TANDEM_PYTHON`, else `python3`).

mod common;
use common::OutputWithin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// Runs the quickstart for `steps` steps with TensorBoard on (twice with `resume_to`: then
/// resumed to that many steps), returning the run directory's `metrics.jsonl` lines.
fn run_with_tensorboard(run_dir: &Path, steps: u64, resume_to: Option<u64>) -> Vec<serde_json::Value> {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let out = tandem()
        .arg("run")
        .arg(&config)
        .args(["--quiet", "--run-dir"])
        .arg(run_dir)
        .args(["--set", &format!("steps={steps}"), "--set", "metrics.tensorboard=true"])
        .args(["--set", "metrics.enabled=false", "--set", "data.prompts_per_step=16"])
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if let Some(n) = resume_to {
        let out = tandem()
            .args(["run", "--quiet", "--resume"])
            .arg(run_dir)
            .args(["--set", &format!("steps={n}")])
            .output_within();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn event_files(run_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run_dir.join("tb"))
        .expect("RUN_DIR/tb exists")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// CRC-32C, bit by bit (the writer uses a table; this is the definition).
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// A protobuf reader over one message: (field number, wire type, value) triples.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> Vec<(u64, Field<'_>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7F) as u64) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let f = match key & 7 {
            0 => Field::Varint(varint(&mut b)),
            1 => {
                let (x, rest) = b.split_at(8);
                b = rest;
                Field::Fixed64(x.try_into().unwrap())
            }
            2 => {
                let n = varint(&mut b) as usize;
                let (x, rest) = b.split_at(n);
                b = rest;
                Field::Bytes(x)
            }
            5 => {
                let (x, rest) = b.split_at(4);
                b = rest;
                Field::Fixed32(x.try_into().unwrap())
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((key >> 3, f));
    }
    out
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    session_start: bool,
    scalars: Vec<(String, f32)>,
}

/// Reads every record of an event file, checking both CRCs of each.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut events = Vec::new();
    while pos < bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            masked(len_bytes),
            "{}: length CRC at byte {pos}",
            path.display()
        );
        let data = &bytes[pos + 12..pos + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked(data), "{}: data CRC at byte {pos}", path.display());
        pos += 16 + len;
        let mut e = Event::default();
        for (n, f) in fields(data) {
            match (n, f) {
                (1, Field::Fixed64(x)) => e.wall_time = f64::from_le_bytes(x),
                (2, Field::Varint(x)) => e.step = x as i64,
                (3, Field::Bytes(x)) => e.file_version = Some(String::from_utf8(x.to_vec()).unwrap()),
                (5, Field::Bytes(summary)) => {
                    for (n, f) in fields(summary) {
                        let (1, Field::Bytes(value)) = (n, f) else {
                            panic!("Summary field {n}")
                        };
                        let (mut tag, mut x) = (String::new(), None);
                        for (n, f) in fields(value) {
                            match (n, f) {
                                (1, Field::Bytes(t)) => tag = String::from_utf8(t.to_vec()).unwrap(),
                                (2, Field::Fixed32(v)) => x = Some(f32::from_le_bytes(v)),
                                (n, _) => panic!("unexpected Summary.Value field {n}"),
                            }
                        }
                        e.scalars.push((tag, x.expect("simple_value")));
                    }
                }
                (6, Field::Bytes(log)) => {
                    e.session_start = matches!(fields(log).first(), Some((1, Field::Varint(1))));
                }
                (n, _) => panic!("unexpected Event field {n}"),
            }
        }
        events.push(e);
    }
    events
}

#[test]
fn event_files_hold_every_steps_scalars_with_valid_framing() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let lines = run_with_tensorboard(&run_dir, 3, Some(5));
    assert_eq!(lines.len(), 5);
    let files = event_files(&run_dir);
    assert_eq!(files.len(), 2, "one file per session: {files:?}");

    let mut seen: BTreeMap<i64, Vec<(String, f32)>> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = read_events(f);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"), "{name}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(events.iter().all(|e| (now - e.wall_time).abs() < 3600.0), "{events:?}");
        // The resumed session's file starts with a SessionLog START at the step it resumed from.
        let starts: Vec<i64> = events.iter().filter(|e| e.session_start).map(|e| e.step).collect();
        if i == 0 {
            assert!(starts.is_empty(), "{starts:?}");
        } else {
            assert_eq!(starts.len(), 1);
            assert!((0..=3).contains(&starts[0]), "{starts:?}");
        }
        for e in events.into_iter().filter(|e| !e.scalars.is_empty()) {
            seen.insert(e.step, e.scalars); // a redone step: the later session's values win
        }
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    for line in &lines {
        let step = line["step"].as_i64().unwrap();
        let scalars: BTreeMap<&str, f32> = seen[&step].iter().map(|(t, x)| (t.as_str(), *x)).collect();
        for tag in [
            "reward_mean",
            "score_mean",
            "kl",
            "beta",
            "policy_loss",
            "value_loss",
            "wall_s",
        ] {
            let want = line[tag].as_f64().unwrap() as f32;
            assert_eq!(scalars.get(tag), Some(&want), "step {step} {tag}");
        }
        let on_policy = if line["on_policy"].as_bool().unwrap() { 1.0 } else { 0.0 };
        assert_eq!(scalars.get("on_policy"), Some(&on_policy), "step {step}");
        assert!(!scalars.contains_key("step"));
    }
}

#[test]
fn tensorboards_own_reader_reads_the_event_files() {
    let python = std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import tensorboard"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!(
            "skipped: {python} cannot import tensorboard (pip install tensorboard, or set TANDEM_PYTHON \
             to a Python that has it)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let lines = run_with_tensorboard(&run_dir, 3, None);
    let script = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0})
acc.Reload()
out = {tag: [[s.step, s.value] for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
print(json.dumps(out))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(run_dir.join("tb"))
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tags: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for tag in ["reward_mean", "score_mean", "kl", "beta", "entropy", "clip_frac"] {
        let points = tags[tag].as_array().unwrap_or_else(|| panic!("no {tag} in {tags}"));
        assert_eq!(points.len(), lines.len(), "{tag}: {points:?}");
        for (p, line) in points.iter().zip(&lines) {
            assert_eq!(p[0], line["step"], "{tag}");
            let want = line[tag].as_f64().unwrap() as f32;
            assert_eq!(p[1].as_f64().unwrap() as f32, want, "{tag} at step {}", p[0]);
        }
    }
}
