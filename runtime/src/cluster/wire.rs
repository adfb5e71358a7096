//! What the head and a worker node say to each other, as bytes inside ractor_cluster messages.
//!
//! Control payloads ([`Setup`], [`SetupReply`], [`Commit`], [`CommitReply`], [`SampleRequest`],
//! [`SampleReply`]) are bincode-encoded serde values. Weight chunks are framed by hand (a
//! 20-byte header, then the raw bytes) so that megabytes of tensor data are copied, not
//! serialised byte by byte.
//!
//! Weights travel as one safetensors blob per policy version, cut into [`WeightChunk`]s of at
//! most `cluster.chunk_bytes`; each chunk carries the CRC32 of its bytes and the [`Commit`] that
//! follows carries the length and CRC32 of the whole blob, which the worker checks before it
//! builds a model from it.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tandem_actors::{DeviceId, TrajectoryBatch, WorkTicket};
use tandem_models::SamplingConfig;

/// Head → node, once per connection: what to host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// The node name the head placed these rollouts under.
    pub node: String,
    /// The policy's `config.json`.
    pub model_config_json: String,
    pub sampling: SamplingConfig,
    /// One entry per rollout slot: the device it samples on.
    pub slots: Vec<DeviceId>,
}

/// Node → head: the node is ready; `version` is the policy version it already holds (after a
/// reconnect), so the head sends weights only when they changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetupReply {
    pub result: Result<Option<u64>, String>,
}

/// One piece of a version's safetensors blob, kept in its encoded frame (a 20-byte header:
/// version, index, total, CRC32 of the data; then the data) so it is copied once per side.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightChunk {
    pub version: u64,
    pub index: u32,
    pub total: u32,
    pub crc32: u32,
    frame: Vec<u8>,
}

const CHUNK_HEADER: usize = 8 + 4 + 4 + 4;

impl WeightChunk {
    pub fn new(version: u64, index: u32, total: u32, data: &[u8]) -> Self {
        let crc32 = crc32fast::hash(data);
        let mut frame = Vec::with_capacity(CHUNK_HEADER + data.len());
        frame.extend_from_slice(&version.to_le_bytes());
        frame.extend_from_slice(&index.to_le_bytes());
        frame.extend_from_slice(&total.to_le_bytes());
        frame.extend_from_slice(&crc32.to_le_bytes());
        frame.extend_from_slice(data);
        Self {
            version,
            index,
            total,
            crc32,
            frame,
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.frame[CHUNK_HEADER..]
    }

    pub fn encode(self) -> Vec<u8> {
        self.frame
    }

    /// Decodes and checks the chunk's CRC32.
    pub fn decode(frame: Vec<u8>) -> Result<Self, String> {
        if frame.len() < CHUNK_HEADER {
            return Err(format!(
                "weight chunk of {} bytes is shorter than its header",
                frame.len()
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(frame[i..i + 4].try_into().expect("4 bytes"));
        let version = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
        let (index, total, crc32) = (u32_at(8), u32_at(12), u32_at(16));
        if crc32fast::hash(&frame[CHUNK_HEADER..]) != crc32 {
            return Err(format!(
                "weight chunk {index}/{total} of version {version}: CRC32 mismatch"
            ));
        }
        Ok(Self {
            version,
            index,
            total,
            crc32,
            frame,
        })
    }
}

/// Cuts `blob` into chunks of at most `chunk_bytes`.
pub fn chunks(version: u64, blob: &[u8], chunk_bytes: usize) -> impl Iterator<Item = WeightChunk> + '_ {
    let total = blob.len().div_ceil(chunk_bytes).max(1) as u32;
    (0..total).map(move |i| {
        let lo = (i as usize * chunk_bytes).min(blob.len());
        let hi = (lo + chunk_bytes).min(blob.len());
        WeightChunk::new(version, i, total, &blob[lo..hi])
    })
}

/// Head → node after the last chunk of a version: adopt it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commit {
    pub version: u64,
    pub chunks: u32,
    pub bytes: u64,
    pub crc32: u32,
}

/// Node → head: the version was checked and adopted (seconds to build the model), or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitReply {
    pub result: Result<f64, String>,
}

/// Head → node: sample this ticket on rollout slot `slot`, as sampler `sampler`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRequest {
    pub slot: u32,
    pub sampler: String,
    pub ticket: WorkTicket,
}

/// Node → head: the sampled batch, or why there is none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleReply {
    pub result: Result<TrajectoryBatch, String>,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("wire values always encode")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| format!("malformed {what} from the other node: {e}"))
}

/// The safetensors bytes of a set of tensors (names sorted, so equal weights give equal bytes).
pub fn weights_to_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>, String> {
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::tensor::serialize(named, None).map_err(|e| format!("cannot serialise weights: {e}"))
}

pub fn weights_from_bytes(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>, String> {
    candle_core::safetensors::load_buffer(bytes, device).map_err(|e| format!("cannot read weights: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reassemble_and_corruption_is_caught() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let parts: Vec<WeightChunk> = chunks(3, &blob, 4096).collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|c| c.data().len() <= 4096 && c.total == 3));
        let mut back = Vec::new();
        for c in &parts {
            let d = WeightChunk::decode(c.clone().encode()).unwrap();
            assert_eq!(&d, c);
            back.extend_from_slice(d.data());
        }
        assert_eq!(back, blob);
        let mut bad = parts[1].clone().encode();
        bad[CHUNK_HEADER + 5] ^= 1;
        assert!(WeightChunk::decode(bad).unwrap_err().contains("CRC32 mismatch"));
        assert!(WeightChunk::decode(vec![0; 3]).is_err());
    }

    #[test]
    fn weights_round_trip_through_safetensors_bytes() {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert(
            "a".to_string(),
            Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap(),
        );
        t.insert("b".to_string(), Tensor::new(&[1.5f32], &dev).unwrap());
        let bytes = weights_to_bytes(&t).unwrap();
        assert_eq!(bytes, weights_to_bytes(&t).unwrap());
        let back = weights_from_bytes(&bytes, &dev).unwrap();
        assert_eq!(back["a"].to_vec2::<f32>().unwrap(), t["a"].to_vec2::<f32>().unwrap());
        assert_eq!(back["b"].to_vec1::<f32>().unwrap(), vec![1.5]);
    }
}
