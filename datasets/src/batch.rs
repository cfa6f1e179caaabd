//! Batches for the stages, as plain vectors (this crate has no tch): right-padded ids with
//! attention and loss masks, length-grouped batching, SFT packing, deterministic shuffling,
//! and the over-long example policy.

use serde::{Deserialize, Serialize};

use crate::chat::Example;

/// A padded batch, row-major (rows × cols).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    pub ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// 1 where the token is a training target.
    pub loss_mask: Vec<i64>,
}

/// Right-pads `examples` to the longest one.
pub fn pad_right(examples: &[&Example], pad_id: u32) -> Batch {
    let cols = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let mut b = Batch {
        rows: examples.len(),
        cols,
        ids: Vec::with_capacity(examples.len() * cols),
        attention_mask: Vec::with_capacity(examples.len() * cols),
        loss_mask: Vec::with_capacity(examples.len() * cols),
    };
    for e in examples {
        let pad = cols - e.len();
        b.ids.extend(
            e.ids
                .iter()
                .map(|&t| t as i64)
                .chain(std::iter::repeat_n(pad_id as i64, pad)),
        );
        b.attention_mask
            .extend(std::iter::repeat_n(1, e.len()).chain(std::iter::repeat_n(0, pad)));
        b.loss_mask.extend(
            e.loss_mask
                .iter()
                .map(|&m| m as i64)
                .chain(std::iter::repeat_n(0, pad)),
        );
    }
    b
}

/// splitmix64: a small, well-mixed generator. Ours rather than a crate's, so seeded orders (and
/// so resumed runs and generated datasets) can never change with a dependency upgrade.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The seed of one stream of randomness (`"epoch"`, `"sample"`, `"minibatch"`, …) at one index,
/// derived from a run's seed. Streams are separated by name, not by shifting bits into the
/// seed (`seed ^ (i << 20)` collides once i is large, and two streams sharing a shift collide
/// always).
pub fn seed_for(seed: u64, stream: &str, index: u64) -> u64 {
    // FNV-1a of the stream name: stable across builds and platforms.
    let name = stream.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let mut a = SplitMix64(seed ^ name);
    let mut b = SplitMix64(a.next_u64() ^ index);
    b.next_u64()
}

/// `n` per-item seeds of one draw (a batch of prompts at one step, say):
/// `seed_for(seed_for(seed, stream, index), "item", i)` for i in 0..n.
pub fn seeds_for(seed: u64, stream: &str, index: u64, n: usize) -> Vec<u64> {
    let base = seed_for(seed, stream, index);
    (0..n as u64).map(|i| seed_for(base, "item", i)).collect()
}

/// The `index`-th batch of `size` items of 0..n in seeded passes: pass `index / per_pass` is a
/// fresh permutation, cut into batches (the last one shorter). A function of `index` alone, so a
/// resumed RL run draws exactly the prompts an uninterrupted one would.
pub fn pass_batch(n: usize, size: usize, seed: u64, index: u64) -> Vec<usize> {
    let per_pass = n.div_ceil(size.max(1)) as u64;
    let order = shuffled(n, seed_for(seed, "prompt-pass", index / per_pass));
    let start = ((index % per_pass) as usize) * size;
    order[start..(start + size).min(order.len())].to_vec()
}

/// The items of a training run in seeded epochs: item k of the run is item k % n of epoch
/// k / n, each epoch built by `make(epoch)` (which must give n items every time). A function
/// of k alone, so a resumed run reads exactly what an uninterrupted one would.
pub struct Epochs<T, F: Fn(u64) -> Vec<T>> {
    make: F,
    current: Option<(u64, Vec<T>)>,
    per_epoch: usize,
}

impl<T, F: Fn(u64) -> Vec<T>> Epochs<T, F> {
    pub fn new(make: F) -> Self {
        let first = make(0);
        assert!(!first.is_empty(), "an epoch needs at least one item");
        Self {
            per_epoch: first.len(),
            current: Some((0, first)),
            make,
        }
    }

    pub fn per_epoch(&self) -> usize {
        self.per_epoch
    }

    pub fn get(&mut self, k: u64) -> &T {
        let epoch = k / self.per_epoch as u64;
        if self.current.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let items = (self.make)(epoch);
            debug_assert_eq!(
                items.len(),
                self.per_epoch,
                "every epoch has the same length"
            );
            self.current = Some((epoch, items));
        }
        let items = &self.current.as_ref().expect("set above").1;
        &items[(k % self.per_epoch as u64) as usize]
    }
}

/// A seeded permutation of 0..n (Fisher–Yates).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Batches of indices whose examples have similar lengths, to save padding, in a seeded order.
/// Examples are shuffled, sorted by length within windows of 50 batches, cut into batches, and
/// the batches shuffled again, so batches stay random in order but tight in length.
pub fn length_grouped_batches(lengths: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let order = shuffled(lengths.len(), seed);
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    let perm = shuffled(batches.len(), seed_for(seed, "batch-order", 0));
    perm.into_iter()
        .map(|i| std::mem::take(&mut batches[i]))
        .collect()
}

/// SFT packing: concatenates examples (in the given order) into rows of at most `block_size`
/// tokens, keeping each example's loss mask. Examples in one row attend to each other (no
/// block-diagonal mask); each is closed by its EOS, which the model learns to treat as a
/// boundary. An example longer than a block gets a row of its own.
pub fn pack(examples: &[Example], block_size: usize) -> Vec<Example> {
    let mut rows: Vec<Example> = Vec::new();
    let mut current = Example::default();
    for e in examples {
        if !current.is_empty() && current.len() + e.len() > block_size {
            rows.push(std::mem::take(&mut current));
        }
        current.ids.extend_from_slice(&e.ids);
        current.loss_mask.extend_from_slice(&e.loss_mask);
    }
    if !current.is_empty() {
        rows.push(current);
    }
    rows
}

/// What to do with an example longer than the context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Stop with an error naming the example (the default: nothing is dropped silently).
    #[default]
    Error,
    /// Keep the first `max_len` tokens.
    Truncate,
    /// Leave the example out, counted in the report.
    Skip,
}
