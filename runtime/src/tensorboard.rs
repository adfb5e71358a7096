//! TensorBoard event files: with `[metrics] tensorboard = true` a run writes every learner
//! step's scalars to `RUN_DIR/tb/events.out.tfevents.<unix seconds>.<host>.<pid>`, so
//! `tensorboard --logdir RUN_DIR/tb` (or a parent holding several runs) shows the curves.
//!
//! One scalar per numeric field of the step's `metrics.jsonl` line, tagged with the field's
//! name (`reward_mean`, `score_mean`, `kl`, `beta`, `policy_loss`, ...; `true` / `false` as 1 /
//! 0), at the line's `step`. The file is flushed after every step, so a live run can be
//! watched. A resumed run writes a new file beginning with a `SessionLog` START event at the
//! step it resumes from: TensorBoard then drops the earlier file's points of the redone steps,
//! as `metrics.jsonl` sets their lines aside.
//!
//! The format is TensorFlow's, written here by hand because it is small and no maintained Rust
//! crate writes it: each record is `u64 LE length`, `u32 LE masked CRC-32C of the length
//! bytes`, the payload, `u32 LE masked CRC-32C of the payload`; each payload is an `Event`
//! protocol buffer (`wall_time` = 1, `step` = 2, `file_version` = 3, `summary` = 5,
//! `session_log` = 6), the first one carrying `file_version = "brain.Event:2"`. A `Summary`
//! holds repeated `Value { tag = 1, simple_value = 2 }`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::RuntimeError;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with its wall time and step, and one more field already encoded.
fn event(wall_time: f64, step: i64, rest: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(16 + rest.len());
    e.push(0x09); // wall_time: field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        e.push(0x10); // step: field 2, varint
        varint(&mut e, step as u64);
    }
    e.extend_from_slice(rest);
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The scalars of a `metrics.jsonl` line: every number and boolean at the top level but
/// `step`, with the field name as tag.
pub fn scalars_of(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(obj) = line.as_object() else { return vec![] };
    obj.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let x = match v {
                serde_json::Value::Number(n) => n.as_f64()?,
                serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
                _ => return None,
            };
            Some((k.clone(), x as f32))
        })
        .collect()
}

/// One event file being written.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it, beginning with the `file_version` event; with
    /// `resumed_at`, a `SessionLog` START at that step follows.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let secs = now() as u64;
        let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{}", std::process::id()));
        let file = File::create(&path).map_err(|e| RuntimeError::io(&path, e))?;
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        let mut version = Vec::new();
        bytes_field(&mut version, 3, b"brain.Event:2");
        w.record(&event(now(), 0, &version))?;
        if let Some(step) = resumed_at {
            // SessionLog { status = START (1) } as Event field 6.
            let mut log = Vec::new();
            bytes_field(&mut log, 6, &[0x08, 0x01]);
            w.record(&event(now(), step as i64, &log))?;
        }
        w.flush()?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event with `scalars` at `step` and flushes it to the file.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f32)]) -> Result<(), RuntimeError> {
        let mut summary = Vec::new();
        for (tag, x) in scalars {
            let mut value = Vec::with_capacity(tag.len() + 8);
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(0x15); // simple_value: field 2, 32-bit
            value.extend_from_slice(&x.to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        let mut rest = Vec::with_capacity(summary.len() + 4);
        bytes_field(&mut rest, 5, &summary);
        self.record(&event(now(), step as i64, &rest))?;
        self.flush()
    }

    fn record(&mut self, payload: &[u8]) -> Result<(), RuntimeError> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut write = || -> std::io::Result<()> {
            self.out.write_all(&len)?;
            self.out.write_all(&masked_crc32c(&len).to_le_bytes())?;
            self.out.write_all(payload)?;
            self.out.write_all(&masked_crc32c(payload).to_le_bytes())
        };
        write().map_err(|e| RuntimeError::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<(), RuntimeError> {
        self.out.flush().map_err(|e| RuntimeError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The check value of CRC-32C (RFC 3720, appendix B.4) and an all-zero block.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn scalars_are_the_numbers_and_booleans_but_step() {
        let line =
            serde_json::json!({"step": 3, "reward_mean": 0.5, "on_policy": true, "adopt_latency_s": null, "name": "x"});
        let mut s = scalars_of(&line);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            s,
            vec![("on_policy".to_string(), 1.0), ("reward_mean".to_string(), 0.5)]
        );
    }

    #[test]
    fn varints_encode_as_protobuf_does() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        let mut v = Vec::new();
        varint(&mut v, 1);
        assert_eq!(v, [0x01]);
    }
}
