//! The loss of a batch of DPO's data, for training and evaluation alike, and the evaluation:
//! held-out loss and metrics in the training's names, and the KL to the reference on replies
//! the policy samples to held-out prompts.

use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::peft::Reference;
use temper_core::preference::PairLogps;
use temper_core::sample::{generate, SamplingConfig};
use temper_core::scoring::{decode_replies, response_logprobs};
use temper_core::{with_autocast, Precision, Transformer};
use temper_data::{seeds_for, Example, RenderedPair};
use temper_stage::{MetricsLog, Summary};

use crate::config::Config;
use crate::losses::{self, pair_logps, BatchLoss, LossSettings};
use crate::reference::{CachedLogps, ReferenceCache};
use crate::setup::{load_reference, Data, Setup};

/// The loss of the examples at `idx` of `data` (pairs or, for kto, unpaired examples), the
/// reference's log-probs from `cached` (the precomputed ones for this data) or computed now.
pub fn data_loss(
    s: &Setup,
    settings: &LossSettings,
    precision: Precision,
    data: &Data,
    idx: &[usize],
    cached: Option<&CachedLogps>,
) -> anyhow::Result<BatchLoss> {
    match data {
        Data::Pairs(pairs) => {
            let picked: Vec<&RenderedPair> = idx.iter().map(|&i| &pairs[i]).collect();
            pairs_loss(
                s,
                settings,
                precision,
                &picked,
                cached.map(|c| c.select(idx)),
            )
        }
        Data::Unpaired(examples) => {
            let picked: Vec<&(Example, bool)> = idx.iter().map(|&i| &examples[i]).collect();
            let reference = s.reference().expect("kto holds its reference");
            let (model, pad) = (&s.chat.m.model, s.chat.template.pad);
            losses::kto(model, &reference, &picked, pad, precision, settings)
        }
    }
}

/// The loss of `pairs`, with the reference's log-probs from the cache or computed now.
fn pairs_loss(
    s: &Setup,
    settings: &LossSettings,
    precision: Precision,
    pairs: &[&RenderedPair],
    cached: Option<PairLogps>,
) -> anyhow::Result<BatchLoss> {
    let pad = s.chat.template.pad;
    let (policy, tokens) = pair_logps(&s.chat.m.model, pairs, pad, precision)?;
    let reference = match (cached, s.reference()) {
        (Some(c), _) => Some(c),
        (None, Some(r)) if settings.loss.needs_reference() => {
            let (lp, _) = tch::no_grad(|| r.run(|r| pair_logps(r, pairs, pad, precision)))?;
            Some(lp)
        }
        _ => None,
    };
    let (loss, metrics) = losses::paired(&policy, reference.as_ref(), settings)?;
    Ok(BatchLoss {
        loss,
        metrics,
        tokens,
    })
}

/// Held-out loss and metrics (the same names as training), and the KL to the reference on
/// replies the policy samples; logged, with the replies in samples.jsonl.
pub fn evaluate(
    s: &Setup,
    c: &Config,
    settings: &LossSettings,
    cache: Option<&ReferenceCache>,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<Summary>> {
    s.chat.m.tuning.set_training(false);
    if s.eval.len() == 0 {
        return Ok(None);
    }
    let mut fields: Vec<(&'static str, f64)> = Vec::new();
    let mut loss = 0.0;
    let chunks: Vec<Vec<usize>> = (0..s.eval.len())
        .collect::<Vec<_>>()
        .chunks(c.batch_size)
        .map(<[usize]>::to_vec)
        .collect();
    // Each batch's means weighted by its rows, summed, then divided once: an accuracy is then
    // its count over the pairs exactly, whatever the batch size (one process or several).
    for idx in &chunks {
        let rows = idx.len() as f64;
        let cached = cache.map(|x| &x.eval);
        let b = tch::no_grad(|| data_loss(s, settings, c.precision, &s.eval, idx, cached))?;
        loss += b.loss.double_value(&[]) * rows;
        if fields.is_empty() {
            fields.extend(b.metrics.iter().map(|(k, _)| (*k, 0.0)));
        }
        for ((_, acc), (_, v)) in fields.iter_mut().zip(&b.metrics) {
            *acc += v * rows;
        }
    }
    let n = s.eval.len() as f64;
    for (_, v) in fields.iter_mut() {
        *v /= n;
    }
    fields.insert(0, ("loss", loss / n));
    if !s.kl_prompts.is_empty() {
        let (kl, records) = kl_to_reference(s, c, step)?;
        fields.push(("kl_to_reference", kl));
        log.log_samples(&records)?;
    }
    log.log_eval(step, &fields)?;
    Ok(Some(
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect(),
    ))
}

/// The mean of Σ log π − log π_ref over replies the policy samples to held-out prompts.
fn kl_to_reference(
    s: &Setup,
    c: &Config,
    step: u64,
) -> anyhow::Result<(f64, Vec<serde_json::Value>)> {
    let (model, template, tokenizer) = (&s.chat.m.model, &s.chat.template, &s.chat.m.tokenizer);
    let held;
    let reference = match s.reference() {
        Some(r) => r,
        None => {
            held = load_reference(c, model.device()).map_err(|e| e.error)?;
            Reference::Model(&held)
        }
    };
    let room = model.token_room() - s.kl_prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let sampling = SamplingConfig::chat(template, c.max_new_tokens.min(room).max(1), 1.0);
    let seeds = seeds_for(c.seed, "kl-sample", step, s.kl_prompts.len());
    let g = with_autocast(model.device(), c.precision, || {
        generate(model, &s.kl_prompts, &sampling, &seeds)
    })??;
    let joined = g.joined();
    let p = g.prompt.size()[1];
    let mask = g.mask.to_kind(Kind::Float);
    let kl = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let lp = |m: &Transformer| -> anyhow::Result<Tensor> {
            Ok(response_logprobs(m, &joined.seq, &joined.attention, p, &g.tokens, 1.0)?.0)
        };
        let reference_lp = reference.run(lp)?;
        Ok(((lp(model)? - reference_lp) * &mask).sum_dim_intlist(1, false, Kind::Float))
    })?;
    let per_reply = Vec::<f64>::try_from(kl.to_kind(Kind::Double))?;
    let replies = decode_replies(tokenizer, &g.tokens, &g.mask, &template.stop_ids())?;
    let records = replies
        .iter()
        .zip(&per_reply)
        .zip(&s.kl_prompts)
        .take(4)
        .map(|((r, kl), prompt)| {
            let ids: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
            let prompt = tokenizer.decode(&ids).unwrap_or_default();
            json!({"step": step, "prompt": prompt, "response": r.text, "kl": kl})
        })
        .collect();
    Ok((
        per_reply.iter().sum::<f64>() / per_reply.len().max(1) as f64,
        records,
    ))
}
