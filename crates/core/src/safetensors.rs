//! Reading safetensors files tensor by tensor. The header gives every tensor's dtype, shape and
//! byte range, so a loader checks names and shapes before reading any weight, then reads one
//! tensor at a time into its variable: a checkpoint never sits in memory twice (reading a whole
//! file first, as `Tensor::read_safetensors` does, costs its size again on top of the model).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};

/// One tensor of a file: where its bytes are and what they hold.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub file: PathBuf,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

fn bad(file: &Path, message: String) -> CoreError {
    CoreError::Io {
        path: file.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    }
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// The tensors `file` holds, from its header alone.
pub fn entries(file: &Path) -> Result<Vec<Entry>> {
    let mut f = File::open(file).map_err(|source| CoreError::Io {
        path: file.into(),
        source,
    })?;
    let io = |source| CoreError::Io {
        path: file.into(),
        source,
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(io)?.len();
    if header_len > file_len.saturating_sub(8) {
        return Err(bad(
            file,
            "not a safetensors file (header longer than the file)".into(),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(file, format!("safetensors header is not JSON: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or_default();
        let kind = kind_of(dtype).ok_or_else(|| {
            bad(
                file,
                format!("tensor `{name}` has unsupported dtype `{dtype}`"),
            )
        })?;
        let shape: Vec<i64> = serde_json::from_value(info["shape"].clone())
            .map_err(|_| bad(file, format!("tensor `{name}` has no valid shape")))?;
        let offsets: [u64; 2] = serde_json::from_value(info["data_offsets"].clone())
            .map_err(|_| bad(file, format!("tensor `{name}` has no valid data_offsets")))?;
        let (start, end) = (data_start + offsets[0], data_start + offsets[1]);
        let expected = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
        if end < start || end - start != expected || end > file_len {
            return Err(bad(
                file,
                format!("tensor `{name}`: its byte range does not match its shape and dtype (truncated file?)"),
            ));
        }
        out.push(Entry {
            name,
            kind,
            shape,
            file: file.into(),
            start,
            end,
        });
    }
    Ok(out)
}

impl Entry {
    fn open_at_start(&self) -> Result<File> {
        let io = |source| CoreError::Io {
            path: self.file.clone(),
            source,
        };
        let mut f = File::open(&self.file).map_err(io)?;
        f.seek(SeekFrom::Start(self.start)).map_err(io)?;
        Ok(f)
    }

    /// The tensor's data, read from disk now (CPU, its stored dtype).
    pub fn read(&self) -> Result<Tensor> {
        let mut bytes = vec![0u8; (self.end - self.start) as usize];
        self.open_at_start()?
            .read_exact(&mut bytes)
            .map_err(|source| CoreError::Io {
                path: self.file.clone(),
                source,
            })?;
        Ok(Tensor::f_from_data_size(&bytes, &self.shape, self.kind)?)
    }

    /// Reads the tensor into `dst` (same shape). A contiguous CPU destination of the stored
    /// dtype is filled straight from the file, with no copy in between; anything else (another
    /// dtype, a GPU) goes through [`Entry::read`] and a converting copy.
    pub fn read_into(&self, dst: &mut Tensor) -> Result<()> {
        let direct = dst.kind() == self.kind
            && dst.device() == tch::Device::Cpu
            && dst.is_contiguous()
            && dst.size() == self.shape;
        if !direct {
            dst.f_copy_(&self.read()?)?;
            return Ok(());
        }
        let len = (self.end - self.start) as usize;
        // SAFETY: `dst` is a contiguous CPU tensor of this entry's dtype and shape, so its
        // storage holds exactly `len` bytes from `data_ptr`; nothing else uses it while we
        // write (loading runs before the model does anything).
        let bytes = unsafe { std::slice::from_raw_parts_mut(dst.data_ptr() as *mut u8, len) };
        self.open_at_start()?
            .read_exact(bytes)
            .map_err(|source| CoreError::Io {
                path: self.file.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_tch_wrote_tensor_by_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.safetensors");
        let a = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]);
        let b = Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16);
        Tensor::write_safetensors(&[("a", &a), ("b", &b)], &file).unwrap();
        let mut e = entries(&file).unwrap();
        e.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(e[0].shape, [3, 4]);
        assert_eq!(e[1].kind, Kind::BFloat16);
        assert_eq!(e[0].read().unwrap(), a);
        assert_eq!(e[1].read().unwrap(), b);
        // Straight into a matching tensor, and converting into an fp32 one.
        let mut direct = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
        e[0].read_into(&mut direct).unwrap();
        assert_eq!(direct, a);
        let mut widened = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        e[1].read_into(&mut widened).unwrap();
        assert_eq!(widened, b.to_kind(Kind::Float));
        // A truncated file is named, not read past its end.
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        let err = entries(&file).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
