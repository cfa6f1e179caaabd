//! `precompute_reference`: the frozen reference's completion log-probs, computed once for the
//! pairs a run will visit, cached in the stage folder, and read back on resume, so the
//! reference is not held in memory while the policy trains.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::{Kind, Tensor};
use temper_core::peft::Reference;
use temper_core::preference::PairLogps;
use temper_data::{Epochs, RenderedPair};
use temper_stage::progress_bar;

use crate::config::Config;
use crate::losses::pair_logps;
use crate::setup::{epoch_batches, load_reference, Data, Setup};

/// The reference's completion log-probs of each pair, indexed like the data. Pairs the run
/// never visits hold NaN, so reading one by mistake poisons the loss, which the stage's
/// finite-loss check reports, instead of training on a silent zero.
pub struct CachedLogps {
    chosen: Tensor,
    rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
}

impl CachedLogps {
    pub fn select(&self, idx: &[usize]) -> PairLogps {
        let i = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(self.chosen.device());
        PairLogps {
            chosen: self.chosen.index_select(0, &i),
            rejected: self.rejected.index_select(0, &i),
            chosen_len: self.chosen_len.index_select(0, &i),
            rejected_len: self.rejected_len.index_select(0, &i),
        }
    }
}

pub struct ReferenceCache {
    pub train: CachedLogps,
    pub eval: CachedLogps,
}

const FIELDS: [&str; 4] = ["chosen", "rejected", "chosen_len", "rejected_len"];

/// The training pairs the run's `steps × grad_accum` micro-batches visit, in index order.
/// The batches are a pure function of the seed, so this is the exact set training reads;
/// the config hash in the cache's stamp covers every setting it depends on.
fn visited(c: &Config, n: usize, batch: usize) -> Vec<usize> {
    let mut batches = Epochs::new(epoch_batches(n, batch, c));
    let mut seen = BTreeSet::new();
    for k in 0..c.steps * c.optim.grad_accum {
        seen.extend(batches.get(k).iter().copied());
        if seen.len() == n {
            break;
        }
    }
    seen.into_iter().collect()
}

/// With `precompute_reference` (and a loss that has a reference): the cache read from
/// `<out>/reference_logps.safetensors` when it was written under this config, else computed
/// (the reference model is loaded for it and dropped after) and written atomically.
pub fn reference_cache(
    s: &Setup,
    c: &Config,
    out: &Path,
    config_hash: &str,
    global_batch: usize,
    may_write: bool,
) -> anyhow::Result<Option<ReferenceCache>> {
    if !c.precompute_reference || !c.loss.needs_reference() {
        return Ok(None);
    }
    // Which pairs training visits depends on the global batch (per-rank batch × ranks).
    let stamp_text = format!("{config_hash} global batch {global_batch}");
    let file = out.join("reference_logps.safetensors");
    let stamp = out.join("reference_logps.json");
    let device = s.chat.m.model.device();
    let fresh = std::fs::read_to_string(&stamp)
        .ok()
        .is_some_and(|t| t.trim() == stamp_text);
    let named = if fresh && file.exists() {
        Tensor::read_safetensors(&file)?.into_iter().collect()
    } else {
        let named = compute(s, c, global_batch)?;
        if !may_write {
            return finish(named, &file, device);
        }
        let tmp = out.join(".reference_logps.safetensors.tmp");
        let cpu: Vec<(String, Tensor)> = named
            .iter()
            .map(|(k, t)| (k.clone(), t.to_device(tch::Device::Cpu)))
            .collect();
        Tensor::write_safetensors(&cpu, &tmp)?;
        std::fs::rename(&tmp, &file)?;
        temper_stage::atomic::write_atomic(&stamp, stamp_text.as_bytes())?;
        named
    };
    finish(named, &file, device)
}

/// The cache's train and eval halves from its named tensors, on `device`.
fn finish(
    mut named: BTreeMap<String, Tensor>,
    file: &Path,
    device: tch::Device,
) -> anyhow::Result<Option<ReferenceCache>> {
    let mut take = |split: &str| -> anyhow::Result<CachedLogps> {
        let mut get = |k: &str| {
            named
                .remove(&format!("{split}.{k}"))
                .map(|t| t.to_device(device))
                .ok_or_else(|| anyhow::anyhow!("{}: lacks {split}.{k}", file.display()))
        };
        Ok(CachedLogps {
            chosen: get("chosen")?,
            rejected: get("rejected")?,
            chosen_len: get("chosen_len")?,
            rejected_len: get("rejected_len")?,
        })
    };
    Ok(Some(ReferenceCache {
        train: take("train")?,
        eval: take("eval")?,
    }))
}

/// Runs the reference over the visited training pairs and every held-out pair.
fn compute(s: &Setup, c: &Config, batch: usize) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let held;
    let reference = match s.reference() {
        Some(r) => r,
        None => {
            held = load_reference(c, s.chat.m.model.device()).map_err(|e| e.error)?;
            Reference::Model(&held)
        }
    };
    let mut named = BTreeMap::new();
    for (split, data) in [("train", &s.train), ("eval", &s.eval)] {
        let Data::Pairs(pairs) = data else { continue };
        let wanted = match split {
            "train" => visited(c, pairs.len(), batch),
            _ => (0..pairs.len()).collect(),
        };
        tracing::info!(
            "reference log-probs: computing {} of {} {split} pairs",
            wanted.len(),
            pairs.len()
        );
        let bar = progress_bar(wanted.len() as u64, 0);
        let full = Tensor::full(
            [pairs.len() as i64],
            f64::NAN,
            (Kind::Float, s.chat.m.model.device()),
        );
        let mut columns: Vec<Tensor> = FIELDS.iter().map(|_| full.copy()).collect();
        for chunk in wanted.chunks(c.batch_size.max(8)) {
            // Nothing is saved yet, so a stop simply ends here; the next run recomputes.
            if temper_stage::signals::stop_requested() {
                return Err(temper_stage::Interrupted { step: 0 }.into());
            }
            let refs: Vec<&RenderedPair> = chunk.iter().map(|&i| &pairs[i]).collect();
            let (lp, _) = tch::no_grad(|| {
                reference.run(|r| pair_logps(r, &refs, s.chat.template.pad, c.precision))
            })?;
            let at = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(full.device());
            let values = [lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len];
            for (column, v) in columns.iter_mut().zip(values) {
                let _ = column.index_copy_(0, &at, &v.to_kind(Kind::Float));
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        for (k, column) in FIELDS.iter().zip(columns) {
            named.insert(format!("{split}.{k}"), column);
        }
    }
    Ok(named)
}
