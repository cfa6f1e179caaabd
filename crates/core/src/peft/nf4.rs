//! 4-bit NormalFloat (NF4) weights for QLoRA (Dettmers et al., 2023), stored as bitsandbytes
//! stores them: the (out, in) weight flattened row-major, cut into blocks of 64, each scaled by
//! its absolute maximum and rounded to the nearest of 16 levels (the quantiles of a normal
//! distribution, §3 of the paper), two codes per byte (the even element in the high nibble).
//! Double quantisation stores the block maxima themselves in 8 bits: their mean is subtracted,
//! then they are quantised in blocks of 256 with the signed dynamic-exponent map of 8-bit
//! optimizers (Dettmers et al., 2016). The weight is dequantised in the forward pass.
//!
//! Rounding follows bitsandbytes' reference path (scale by the reciprocal of the maximum, clamp
//! to ±1, bucket by the midpoints between levels), so the codes match its `quantize_4bit`
//! bit for bit on the same input (checked against it in tests/qlora.rs).

use tch::{Device, Kind, Tensor};

/// The 16 NF4 levels, in ascending order (QLoRA, Appendix E; bitsandbytes' `nf4` code).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Elements per NF4 block and block maxima per second-level block (the paper's settings).
pub const BLOCK: i64 = 64;
pub const BLOCK2: i64 = 256;

/// The signed 8-bit dynamic map: for exponent e = 0..6, the midpoints of 2^e + 1 evenly spaced
/// points on [0.1, 1], times 10^(e-6), with both signs; then 0 and 1; sorted: 2·127 + 2 = 256
/// levels. Computed with libtorch's own fp32 kernels, so every level rounds as in
/// bitsandbytes.
pub fn dynamic_map() -> Vec<f32> {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (e, scale) in SCALES.iter().enumerate() {
        let points = Tensor::linspace(0.1, 1.0, (1i64 << e) + 1, (Kind::Float, Device::Cpu));
        let n = points.size()[0];
        let means = (points.narrow(0, 0, n - 1) + points.narrow(0, 1, n - 1)) / 2.0;
        for side in [*scale, -*scale] {
            data.extend(Vec::<f32>::try_from(&(&means * side)).expect("fp32 levels"));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// A frozen weight in NF4, with its block maxima double-quantised or kept in fp32.
pub struct Nf4Weight {
    /// (out, in): the dense weight's `nn.Linear` shape.
    pub shape: [i64; 2],
    /// Two codes per byte, ceil(numel / 2) bytes.
    pub packed: Tensor,
    pub absmax: Absmax,
}

pub enum Absmax {
    Plain(Tensor),
    /// 8-bit codes into [`dynamic_map`], one fp32 scale per 256 maxima, and their mean.
    Double {
        codes: Tensor,
        scales: Tensor,
        offset: f64,
    },
}

/// Blockwise absmax scaling of a flat fp32 tensor: (scaled values in [-1, 1], maxima). A last
/// partial block gets its own maximum.
fn scale_blocks(flat: &Tensor, block: i64) -> (Tensor, Tensor) {
    let n = flat.size()[0];
    let full = n - n % block;
    let head = flat.narrow(0, 0, full).reshape([-1, block]);
    let mut absmax = head.abs().amax([1i64].as_slice(), false);
    let mut scaled = (&head * absmax.clamp_min(1e-38).reciprocal().unsqueeze(1))
        .clamp(-1.0, 1.0)
        .reshape([-1]);
    if full < n {
        let tail = flat.narrow(0, full, n - full);
        let am = tail.abs().max().clamp_min(1e-38);
        scaled = Tensor::cat(&[scaled, (&tail / &am).clamp(-1.0, 1.0)], 0);
        absmax = Tensor::cat(&[absmax, am.unsqueeze(0)], 0);
    }
    (scaled, absmax)
}

/// Per element, the index of the nearest level in the sorted `levels` (ties to the lower).
fn nearest(scaled: &Tensor, levels: &Tensor) -> Tensor {
    let n = levels.size()[0];
    let bounds = (levels.narrow(0, 0, n - 1) + levels.narrow(0, 1, n - 1)) / 2.0;
    scaled.bucketize(&bounds, false, false)
}

/// Scales per block of `block` of a flat tensor: value × scale of its block.
fn unscale_blocks(values: &Tensor, scales: &Tensor, block: i64) -> Tensor {
    let n = values.size()[0];
    let full = n - n % block;
    let head = (values.narrow(0, 0, full).reshape([-1, block])
        * scales.narrow(0, 0, full / block).unsqueeze(1))
    .reshape([-1]);
    if full == n {
        return head;
    }
    let tail = values.narrow(0, full, n - full) * scales.get(full / block);
    Tensor::cat(&[head, tail], 0)
}

fn levels(device: Device) -> Tensor {
    Tensor::from_slice(&NF4_LEVELS).to_device(device)
}

impl Nf4Weight {
    /// Quantises `w` (out, in), on its device.
    pub fn quantize(w: &Tensor, double_quant: bool) -> Self {
        tch::no_grad(|| {
            let size = w.size();
            let shape = [size[0], size[1]];
            let flat = w.to_kind(Kind::Float).contiguous().reshape([-1]);
            let (scaled, absmax) = scale_blocks(&flat, BLOCK);
            let mut codes = nearest(&scaled, &levels(w.device())).to_kind(Kind::Uint8);
            if codes.size()[0] % 2 == 1 {
                codes = Tensor::cat(&[codes, Tensor::zeros([1], (Kind::Uint8, w.device()))], 0);
            }
            let pairs = codes.reshape([-1, 2]);
            let packed = pairs
                .select(1, 0)
                .bitwise_left_shift_tensor_scalar(4)
                .bitwise_or_tensor(&pairs.select(1, 1));
            let absmax = if double_quant {
                let offset = absmax.mean(Kind::Float).double_value(&[]);
                let map = Tensor::from_slice(&dynamic_map()).to_device(w.device());
                let (scaled2, scales) = scale_blocks(&(absmax - offset), BLOCK2);
                Absmax::Double {
                    codes: nearest(&scaled2, &map).to_kind(Kind::Uint8),
                    scales,
                    offset,
                }
            } else {
                Absmax::Plain(absmax)
            };
            Self {
                shape,
                packed,
                absmax,
            }
        })
    }

    /// The block maxima in fp32 (decoded from 8 bits with double quantisation).
    pub fn block_absmax(&self) -> Tensor {
        match &self.absmax {
            Absmax::Plain(a) => a.shallow_clone(),
            Absmax::Double {
                codes,
                scales,
                offset,
            } => {
                let map = Tensor::from_slice(&dynamic_map()).to_device(codes.device());
                let values = map.index_select(0, &codes.to_kind(Kind::Int64));
                unscale_blocks(&values, scales, BLOCK2) + *offset
            }
        }
    }

    /// The dense (out, in) weight in fp32; not part of any autograd graph.
    pub fn dequantize(&self) -> Tensor {
        tch::no_grad(|| {
            let n = self.shape[0] * self.shape[1];
            let high = self.packed.bitwise_right_shift_tensor_scalar(4);
            let low = self.packed.bitwise_and(0xF);
            let codes = Tensor::stack(&[high, low], 1)
                .reshape([-1])
                .narrow(0, 0, n)
                .to_kind(Kind::Int64);
            let values = levels(self.packed.device()).index_select(0, &codes);
            unscale_blocks(&values, &self.block_absmax(), BLOCK).reshape(self.shape)
        })
    }

    /// Bytes held: the packed codes and the block maxima (and their scales).
    pub fn bytes(&self) -> i64 {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => 4 * a.numel() as i64,
            Absmax::Double { codes, scales, .. } => {
                codes.numel() as i64 + 4 * scales.numel() as i64 + 8
            }
        };
        self.packed.numel() as i64 + absmax
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_map_has_256_sorted_levels_from_minus_one_to_one() {
        let m = dynamic_map();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        // The lowest level is minus the top exponent's last midpoint: -(1 - 0.9/64/2).
        assert!((m[0] + 0.992_968_75).abs() < 1e-6, "{}", m[0]);
        assert_eq!(m.iter().filter(|x| **x == 0.0).count(), 1);
    }

    #[test]
    fn levels_round_trip_exactly_and_blocks_keep_their_maxima() {
        // A row of every level times a block maximum of 2 comes back exactly.
        let vals: Vec<f32> = (0..64).map(|i| 2.0 * NF4_LEVELS[i % 16]).collect();
        let w = Tensor::from_slice(&vals).reshape([2, 32]);
        let q = Nf4Weight::quantize(&w, false);
        assert_eq!(q.packed.size(), [32]);
        let back = q.dequantize();
        assert_eq!(
            (back - &w).abs().max().double_value(&[]),
            0.0,
            "levels are exact"
        );
        // The first byte packs levels 0 and 1: high nibble first.
        assert_eq!(q.packed.int64_value(&[0]), 0x01);
        assert!(q.bytes() < 4 * 64);
    }

    #[test]
    fn random_weights_lose_at_most_half_a_level_gap_per_block() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 130], (Kind::Float, Device::Cpu)); // partial last block
        for double in [false, true] {
            let q = Nf4Weight::quantize(&w, double);
            let err = (q.dequantize() - &w).abs().max().double_value(&[]);
            let max = w.abs().max().double_value(&[]);
            // The widest gap between levels is 1 - 0.7230, so half of it times the maximum,
            // plus the 8-bit error on the maxima with double quantisation.
            assert!(
                err < max * (0.139 + if double { 0.01 } else { 0.0 }),
                "{err}"
            );
        }
    }
}
