//! temper-data's plain-vector batches as tensors on a device.

use tch::{Device, Tensor};
use temper_data::{pad_right, Batch, Example};

/// A right-padded batch: ids, attention mask and loss mask, each (B, T) Int64.
pub struct BatchTensors {
    pub ids: Tensor,
    pub attention: Tensor,
    pub loss_mask: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub tokens: u64,
}

impl BatchTensors {
    pub fn new(b: &Batch, device: Device) -> Self {
        let shape = [b.rows as i64, b.cols as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        Self {
            ids: t(&b.ids),
            attention: t(&b.attention_mask),
            loss_mask: t(&b.loss_mask),
            tokens: b.attention_mask.iter().sum::<i64>() as u64,
        }
    }

    /// `rows` right-padded with `pad`.
    pub fn pad(rows: &[&Example], pad: u32, device: Device) -> Self {
        Self::new(&pad_right(rows, pad), device)
    }
}
