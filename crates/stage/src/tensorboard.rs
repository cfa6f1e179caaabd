//! TensorBoard scalars beside `metrics.jsonl`: `<stage folder>/tb/events.out.tfevents.*`, tags
//! `train/<metric>` and `eval/<metric>`, one run per stage.
//!
//! A small writer of our own rather than a crate: the format is three protobuf messages (Event,
//! Summary, Summary.Value: five fields in all) in TFRecord framing (length, masked CRC32C of the
//! length, data, masked CRC32C of the data). The maintained Rust writers pull in a full protobuf
//! runtime and code generation for those few bytes. TensorBoard's own reader checks the
//! CRCs; a test reads our files back with it.
//!
//! The event file is always a replay of `metrics.jsonl`: the first row a process logs rebuilds
//! `tb/` from the rows already there (so a resumed run, whose metrics were trimmed to the saved
//! step, shows no rows from the lost steps), then each new row is appended.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// CRC-32C (Castagnoli), reflected, as TFRecord uses.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` with `wall_time` (1, double), `step` (2, int64) and either `file_version` (3) or a
/// `Summary` (5) of `Value`s with `tag` (1) and `simple_value` (2, float).
fn event(wall_time: f64, step: i64, body: Body) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09);
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(step as u64, &mut e);
    match body {
        Body::Version => bytes_field(3, b"brain.Event:2", &mut e),
        Body::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut value);
                value.push(0x15);
                value.extend_from_slice(&(v as f32).to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, &mut e);
        }
    }
    e
}

enum Body<'a> {
    Version,
    Scalars(Vec<(&'a str, f64)>),
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The event file of one stage folder.
pub struct EventFile {
    file: File,
    /// Unix time of `time_s` = 0 for this run, so replayed rows keep their spacing.
    origin: f64,
}

impl EventFile {
    /// Rebuilds `<out>/tb/` from `<out>/metrics.jsonl` and opens it for appending. `elapsed` is
    /// the run's clock now (the `time_s` of a row logged at this instant).
    pub fn rebuild(out: &Path, elapsed: f64) -> anyhow::Result<Self> {
        let dir = out.join("tb");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = unix_now();
        let path: PathBuf = dir.join(format!("events.out.tfevents.{:010}.temper", now as u64));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut f = Self {
            file,
            origin: now - elapsed,
        };
        f.write(&event(now, 0, Body::Version))?;
        if let Ok(rows) = File::open(out.join("metrics.jsonl")) {
            for line in BufReader::new(rows).lines() {
                let Ok(row) = serde_json::from_str::<Value>(&line?) else {
                    continue; // a torn last line: metrics.jsonl's readers skip it too
                };
                f.row(&row)?;
            }
        }
        Ok(f)
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.file
            .write_all(&record(data))
            .and_then(|_| self.file.flush())
            .context("writing the TensorBoard event file")
    }

    /// Appends one metrics row (`step`, `split`, `time_s`, numbers); non-numbers are skipped.
    pub fn row(&mut self, row: &Value) -> anyhow::Result<()> {
        let Some(obj) = row.as_object() else {
            return Ok(());
        };
        let step = obj.get("step").and_then(Value::as_i64).unwrap_or(0);
        let split = obj.get("split").and_then(Value::as_str).unwrap_or("train");
        let time = obj.get("time_s").and_then(Value::as_f64).unwrap_or(0.0);
        let tags: Vec<(String, f64)> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "split" | "time_s"))
            .filter_map(|(k, v)| v.as_f64().map(|x| (format!("{split}/{k}"), x)))
            .collect();
        if tags.is_empty() {
            return Ok(());
        }
        let values = tags.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.write(&event(self.origin + time, step, Body::Scalars(values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C of "123456789" is 0xE3069283 (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_fields_encode_as_protobuf_does() {
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, [0xac, 0x02]);
        let mut f = Vec::new();
        bytes_field(1, b"ab", &mut f);
        assert_eq!(f, [0x0a, 2, b'a', b'b']);
    }
}
