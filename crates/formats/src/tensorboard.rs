//! TensorBoard event files, so existing viewers can show a kiln run (`kiln train
//! --tensorboard` writes `RUN/tensorboard/events.out.tfevents.*`).
//!
//! The format is TFRecord framing around serialized `tensorflow.Event` protobufs:
//! `u64 length, u32 masked_crc32c(length), bytes, u32 masked_crc32c(bytes)`, where
//! `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. The two messages used are encoded by
//! hand (field numbers from tensorflow/core/util/event.proto and summary.proto):
//! `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }`,
//! `Summary { repeated Value value = 1; }`, `Value { string tag = 1; float simple_value = 2; }`.
//! Only scalars: no histograms, images or graphs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time, step, … }` with either a file version or scalar values.
fn event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.push((1 << 3) | 1); // wall_time: fixed64
    out.extend(wall_time.to_le_bytes());
    out.push(2 << 3); // step: varint
    varint(step as u64, &mut out);
    if let Some(version) = file_version {
        bytes_field(3, version.as_bytes(), &mut out);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v);
            v.push((2 << 3) | 5); // simple_value: fixed32
            v.extend(value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, &mut out);
    }
    out
}

/// Appends scalar events to one event file.
pub struct EventWriter {
    file: File,
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<time>.kiln` and writes its version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!("events.out.tfevents.{}.kiln", now.as_secs()));
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = EventWriter { file, path };
        writer.record(&event(now.as_secs_f64(), 0, Some("brain.Event:2"), &[]))?;
        Ok(writer)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend(len);
        frame.extend(masked_crc(&len).to_le_bytes());
        frame.extend(data);
        frame.extend(masked_crc(data).to_le_bytes());
        self.file.write_all(&frame)?;
        self.file.flush()?;
        Ok(())
    }

    /// Writes scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f32)]) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.record(&event(now.as_secs_f64(), step as i64, None, scalars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::bytes::le_at;

    #[test]
    fn crc32c_and_varints_match_their_specifications() {
        // The CRC-32C check value from the iSCSI specification (RFC 3720, appendix B.4).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // Protobuf's own example: 300 encodes as AC 02.
        let mut out = Vec::new();
        varint(300, &mut out);
        assert_eq!(out, [0xAC, 0x02]);
    }

    #[test]
    fn records_are_framed_with_lengths_and_checksums() {
        let dir = std::env::temp_dir().join(format!("kiln-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(7, &[("train/loss", 2.5)]).unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        // Walk the records: each length and payload must carry its masked CRC.
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = le_at::<u64>(&bytes, at).unwrap() as usize;
            assert_eq!(
                le_at::<u32>(&bytes, at + 8).unwrap(),
                masked_crc(&bytes[at..at + 8])
            );
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(
                le_at::<u32>(&bytes, at + 12 + len).unwrap(),
                masked_crc(data)
            );
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
