//! temper-dpo: preference optimisation without RL. The policy learns from preference pairs
//! directly — DPO (`sigmoid`, with `label_smoothing` for cDPO), `ipo`, `hinge` (SLiC), the
//! reference-free `orpo` and `simpo` — or from unpaired desirable/undesirable examples (`kto`).
//! The reference is the policy's starting checkpoint unless `reference` says otherwise; with
//! `precompute_reference` its log-probs are computed once, cached in the stage folder, and the
//! reference is not held during training. Metrics use TRL's names; evaluation adds the KL to
//! the reference on replies the policy samples.

mod config;
mod losses;
mod reference;

use std::path::Path;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use temper_core::dist::{Placement, Ranks, World};
use temper_core::peft::Reference;
use temper_core::preference::{PairLogps, PreferenceLoss};
use temper_core::sample::{generate, SamplingConfig};
use temper_core::scoring::{decode_replies, response_logprobs};
use temper_core::{
    load_checkpoint, load_with_tokenizer, resume_or_start, save_state, with_autocast, LoadSpec,
    Loaded, Precision, Transformer,
};
use temper_data::{
    seed_for, seeds_for, shuffled, ChatTemplate, Epochs, Example, LoadOptions, RenderedPair,
};
use temper_stage::{
    check_finite, checked_config, invalid, step_fields, Cadence, ConfigFile, MetricsLog, StageArgs,
    StageError, StageKind, Throughput,
};

use crate::config::{check, Config};
use crate::losses::{pair_logps, LossSettings};
use crate::reference::{reference_cache, CachedLogps, ReferenceCache};

fn main() {
    temper_stage::stage_main(
        "temper-dpo",
        "Preference optimisation without RL: DPO, cDPO, IPO, hinge, ORPO, SimPO and KTO on preference pairs.",
        run,
    )
}

/// Training data: pairs, or unpaired examples for kto.
enum Data {
    Pairs(Vec<RenderedPair>),
    Unpaired(Vec<(Example, bool)>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Pairs(p) => p.len(),
            Data::Unpaired(u) => u.len(),
        }
    }
}

struct Setup {
    m: Loaded,
    /// Held while training unless the reference's log-probs are precomputed or the policy is
    /// LoRA (its own reference with the adapters bypassed).
    reference: Option<Transformer>,
    /// The policy is LoRA and no `reference` was named.
    bypass_reference: bool,
    template: ChatTemplate,
    train: Data,
    eval: Data,
    /// Held-out prompts for the KL measurement.
    kl_prompts: Vec<Vec<i64>>,
}

fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let mut m = load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    m.tune(c.peft.as_ref(), c.steps as usize)
        .map_err(|e| cfg.error(&e.field, e.message))?;
    let template = ChatTemplate::new(&m.tokenizer).map_err(invalid)?;
    let max_len = c.max_len.unwrap_or(m.model.token_room() as usize);
    cfg.ensure(
        max_len as i64 <= m.model.token_room(),
        "max_len",
        format!(
            "exceeds the {} positions the model has for tokens",
            m.model.token_room()
        ),
    )?;
    let estimate = m
        .model
        .config
        .training_bytes(2 * c.batch_size as i64, max_len as i64);
    temper_core::device::check_memory(device, estimate, "training at this batch_size and max_len")
        .map_err(|msg| cfg.error("batch_size", msg))?;
    let opts = LoadOptions {
        tokenizer: &m.tokenizer,
        template: template.clone(),
        fields: &c.fields,
        max_len,
        overlong: c.overlong,
        train_on_prompt: false,
    };
    let load = |path: &Path| -> Result<Data, StageError> {
        Ok(match c.loss {
            PreferenceLoss::Kto => Data::Unpaired(opts.unpaired(path).map_err(invalid)?.0),
            _ => Data::Pairs(opts.pairs(path).map_err(invalid)?.0),
        })
    };
    let train = load(&c.data)?;
    let eval = match &c.eval_data {
        Some(p) => load(p)?,
        None => Data::Pairs(Vec::new()),
    };
    tracing::info!(
        "{}: {} training examples ({:?} loss)",
        c.data.display(),
        train.len(),
        c.loss
    );
    // A LoRA policy is its own reference with the adapters bypassed.
    let bypass = m.tuning.is_lora() && c.reference.is_none();
    let needs_model = c.loss.needs_reference() && !c.precompute_reference && !bypass;
    let reference = needs_model.then(|| load_reference(c, device)).transpose()?;
    let kl_prompts: Vec<Vec<i64>> = match &eval {
        Data::Pairs(p) => p.iter().map(|p| prompt_of(&p.chosen)).collect(),
        Data::Unpaired(u) => u.iter().map(|(e, _)| prompt_of(e)).collect(),
    };
    let kl_prompts: Vec<Vec<i64>> = kl_prompts
        .into_iter()
        .filter(|p: &Vec<i64>| !p.is_empty())
        .take(c.kl_samples)
        .collect();
    Ok(Setup {
        m,
        reference,
        bypass_reference: bypass,
        template,
        train,
        eval,
        kl_prompts,
    })
}

/// The training batches of epoch `e`: a seeded shuffle cut into `batch_size` pieces.
/// Epoch `e`'s batches of `batch` examples (the global batch: per-rank size × ranks).
fn epoch_batches(n: usize, batch: usize, c: &Config) -> impl Fn(u64) -> Vec<Vec<usize>> + '_ {
    move |e| {
        let order = shuffled(n, seed_for(c.seed, "epoch", e));
        order.chunks(batch).map(<[usize]>::to_vec).collect()
    }
}

impl Setup {
    /// The frozen reference held in memory: its own model, or the LoRA policy with its
    /// adapters bypassed; None when neither is held (reference-free loss, or precomputed).
    fn reference(&self) -> Option<Reference<'_>> {
        match &self.reference {
            Some(r) => Some(Reference::Model(r)),
            None if self.m.tuning.is_lora() && self.bypass_reference => {
                Some(Reference::Bypassed(&self.m.model, &self.m.tuning))
            }
            None => None,
        }
    }
}

fn load_reference(c: &Config, device: tch::Device) -> Result<Transformer, StageError> {
    let dir = c.reference.as_ref().unwrap_or(&c.policy);
    let (mut vs, model) = load_checkpoint(dir, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    vs.freeze();
    Ok(model)
}

fn prompt_of(e: &Example) -> Vec<i64> {
    e.ids[..e.prompt_len()].iter().map(|&t| t as i64).collect()
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Dpo, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    // Data parallel (torchrun / Slurm): `batch_size` pairs per rank; a bad environment stops
    // here, before anything is read.
    let placement = Placement::from_env().map_err(|e| invalid(anyhow::anyhow!(e)))?;
    if placement.world > 1 && cfg.value.loss == PreferenceLoss::Kto {
        // KTO's reference point is an estimate over the whole batch, not a per-example mean.
        return Err(invalid(anyhow::anyhow!(
            "{}: loss `kto` trains on one process only (its KL reference point is a batch \
             estimate); run it without WORLD_SIZE > 1",
            cfg.path.display()
        )));
    }
    let device = placement
        .device(cfg.value.device)
        .map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let s = prepare(&cfg, device)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let world = World::join_placed(placement, device).map_err(|e| invalid(anyhow::anyhow!(e)))?;

    let c = &cfg.value;
    let stores = s.m.stores();
    let ranks = Ranks::open(&world, &args.out, "dpo")?;
    if world.is_main() {
        cfg.write_resolved(&ranks.out)?;
    }
    let mut log = MetricsLog::open(&ranks.log_dir)?;
    let mut opt = s.m.optimizer(c.optim.adamw());
    let mut progress = ranks.resume(&world, |out| {
        resume_or_start(out, &mut log, &stores, &mut [&mut opt], &cfg.hash)
    })?;
    world.start_together(progress.step, &opt.parameters())?;
    // Gradients averaged over the ranks in buckets, reduced while the last backward runs.
    let sync = world.grad_sync(&opt.parameters())?;
    // Rank 0 computes (or finds) the reference's log-probs and writes them; the others read.
    let global_batch = c.batch_size * world.size();
    let cache = ranks.resume(&world, |out| {
        reference_cache(&s, c, out, &cfg.hash, global_batch, world.is_main())
    })?;
    let settings = LossSettings {
        loss: c.loss,
        beta: c.beta,
        label_smoothing: c.label_smoothing,
        gamma: c.gamma,
        desirable_weight: c.desirable_weight,
        undesirable_weight: c.undesirable_weight,
    };
    let every = Cadence::new(c.log_every, c.eval_every, c.save_every, c.steps);
    let mut batches = Epochs::new(epoch_batches(s.train.len(), global_batch, c));
    let mut bar = ranks.progress(c.steps, progress.step);
    let mut throughput = Throughput::new();
    let mut last_eval = None;
    if progress.step == 0 {
        last_eval = evaluate(&s, c, &settings, cache.as_ref(), &mut log, 0)?;
    }
    while progress.step < c.steps {
        let step = progress.step;
        let lr = c.optim.lr_at(step, c.steps);
        let accum = c.optim.grad_accum;
        let (mut step_loss, mut step_metrics, mut step_tokens) = (0.0, Vec::new(), 0);
        s.m.tuning.set_training(true); // adapter dropout, when there is one
        for micro in 0..accum {
            let global = batches.get(step * accum + micro);
            // This rank's pairs, counting by their share of the batch. A rank left without any
            // (a short last batch) scores the first pair with weight 0, so it still joins the
            // all-reduces with the same gradients and metric names as the others.
            let range = world.shard(global.len());
            let (idx, share) = if range.is_empty() {
                (global[..1].to_vec(), 0.0)
            } else {
                (
                    global[range.clone()].to_vec(),
                    range.len() as f64 / global.len() as f64,
                )
            };
            let b = batch_loss(
                &s,
                &settings,
                c.precision,
                &idx,
                cache.as_ref().map(|x| &x.train),
            )?;
            let value = b.loss.double_value(&[]);
            if let Err(e) = check_finite(value, step + 1, step) {
                if world.is_main() {
                    save_state(&ranks.out, &log, &stores, &[&opt], &progress)?;
                }
                return Err(e.into());
            }
            let weight = share * world.size() as f64 / accum as f64;
            if micro + 1 == accum {
                sync.arm_last_backward();
            }
            (s.m.tuning.regularised(b.loss) * weight).backward();
            step_loss += value * share / accum as f64;
            let shared: Vec<(&'static str, f64)> =
                b.metrics.iter().map(|(k, v)| (*k, v * share)).collect();
            accumulate(&mut step_metrics, &shared, accum);
            if share > 0.0 {
                step_tokens += b.tokens;
            }
        }
        // The mean gradient over the global batch; every rank then takes the same step.
        sync.finish()?;
        let mut local = vec![step_loss, step_tokens as f64];
        local.extend(step_metrics.iter().map(|(_, v)| *v));
        let sums = world.sum_values(&local)?;
        let (step_loss, step_tokens) = (sums[0], sums[1] as u64);
        for ((_, v), total) in step_metrics.iter_mut().zip(&sums[2..]) {
            *v = *total;
        }
        progress.tokens_seen += step_tokens;
        throughput.add(step_tokens);
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || s.m.tuning.after_update())?;
        progress.step += 1;
        let step = progress.step;
        bar.set(step, format!("loss {step_loss:.4}"));
        if every.log_due(step) {
            let mut fields = step_fields(
                step_loss,
                lr,
                grad_norm,
                progress.tokens_seen,
                throughput.take(),
            );
            fields.extend(step_metrics);
            log.log_train(step, &fields)?;
        }
        if every.eval_due(step) {
            last_eval = evaluate(&s, c, &settings, cache.as_ref(), &mut log, step)?;
        }
        if every.save_due(step) && world.is_main() {
            save_state(&ranks.out, &log, &stores, &[&opt], &progress)?;
        }
        every.stop_if_asked(step)?;
    }
    bar.finish();
    if !world.is_main() {
        return ranks.finish();
    }

    s.m.save_final(&ranks.out, &c.save)?;
    let mut summary = log.summary_base(&progress);
    for (k, v) in s.m.param_fields() {
        summary.insert(k.into(), v.into());
    }
    match last_eval {
        Some(fields) => summary.extend(fields.into_iter().map(|(k, v)| (k.to_string(), json!(v)))),
        // Resumed at the last step, after the final evaluation and save (stopped before the
        // summary): the loop did not run, and the final evaluation is the one logged then.
        None => summary.extend(log.eval_logged_at_resume()),
    }
    log.write_summary("ok", summary)?;
    Ok(())
}

/// Running mean of a micro-batch's metrics over the step's `accum` micro-batches.
fn accumulate(into: &mut Vec<(&'static str, f64)>, add: &[(&'static str, f64)], accum: u64) {
    if into.is_empty() {
        into.extend(add.iter().map(|(k, _)| (*k, 0.0)));
    }
    for ((_, acc), (_, v)) in into.iter_mut().zip(add) {
        *acc += v / accum as f64;
    }
}

/// The loss of the training examples at `idx` (pairs or, for kto, unpaired examples).
fn batch_loss(
    s: &Setup,
    settings: &LossSettings,
    precision: Precision,
    idx: &[usize],
    cached: Option<&CachedLogps>,
) -> anyhow::Result<losses::BatchLoss> {
    match &s.train {
        Data::Pairs(pairs) => pairs_loss(
            s,
            settings,
            precision,
            &idx.iter().map(|&i| &pairs[i]).collect::<Vec<_>>(),
            cached.map(|c| c.select(idx)),
        ),
        Data::Unpaired(examples) => {
            let picked: Vec<&(Example, bool)> = idx.iter().map(|&i| &examples[i]).collect();
            let reference = s.reference().expect("kto holds its reference");
            losses::kto(
                &s.m.model,
                &reference,
                &picked,
                s.template.pad,
                precision,
                settings,
            )
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
) -> anyhow::Result<losses::BatchLoss> {
    let (policy, tokens) = pair_logps(&s.m.model, pairs, s.template.pad, precision)?;
    let reference = match (cached, s.reference()) {
        (Some(c), _) => Some(c),
        (None, Some(r)) if settings.loss.needs_reference() => {
            let (lp, _) =
                tch::no_grad(|| r.run(|r| pair_logps(r, pairs, s.template.pad, precision)))?;
            Some(lp)
        }
        _ => None,
    };
    let (loss, metrics) = losses::paired(&policy, reference.as_ref(), settings)?;
    Ok(losses::BatchLoss {
        loss,
        metrics,
        tokens,
    })
}

/// Held-out loss and metrics (the same names as training), and the KL to the reference on
/// replies the policy samples; logged, with the replies in samples.jsonl.
fn evaluate(
    s: &Setup,
    c: &Config,
    settings: &LossSettings,
    cache: Option<&ReferenceCache>,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<Vec<(&'static str, f64)>>> {
    s.m.tuning.set_training(false);
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
    for idx in &chunks {
        let w = idx.len() as f64 / s.eval.len() as f64;
        let b = tch::no_grad(|| -> anyhow::Result<_> {
            match &s.eval {
                Data::Pairs(pairs) => {
                    let picked: Vec<&RenderedPair> = idx.iter().map(|&i| &pairs[i]).collect();
                    pairs_loss(
                        s,
                        settings,
                        c.precision,
                        &picked,
                        cache.map(|x| x.eval.select(idx)),
                    )
                }
                Data::Unpaired(ex) => {
                    let picked: Vec<&(Example, bool)> = idx.iter().map(|&i| &ex[i]).collect();
                    let r = s.reference().expect("kto holds its reference");
                    losses::kto(
                        &s.m.model,
                        &r,
                        &picked,
                        s.template.pad,
                        c.precision,
                        settings,
                    )
                }
            }
        })?;
        loss += b.loss.double_value(&[]) * w;
        if fields.is_empty() {
            fields.extend(b.metrics.iter().map(|(k, _)| (*k, 0.0)));
        }
        for ((_, acc), (_, v)) in fields.iter_mut().zip(&b.metrics) {
            *acc += v * w;
        }
    }
    fields.insert(0, ("loss", loss));
    if !s.kl_prompts.is_empty() {
        let (kl, records) = kl_to_reference(s, c, step)?;
        fields.push(("kl_to_reference", kl));
        log.log_samples(&records)?;
    }
    log.log_eval(step, &fields)?;
    Ok(Some(fields))
}

/// The mean of Σ log π − log π_ref over replies the policy samples to held-out prompts.
fn kl_to_reference(
    s: &Setup,
    c: &Config,
    step: u64,
) -> anyhow::Result<(f64, Vec<serde_json::Value>)> {
    let model = &s.m.model;
    let held;
    let reference = match s.reference() {
        Some(r) => r,
        None => {
            held = load_reference(c, model.device()).map_err(|e| e.error)?;
            Reference::Model(&held)
        }
    };
    let sampling = SamplingConfig {
        max_new_tokens: c
            .max_new_tokens
            .min(model.token_room() - s.kl_prompts.iter().map(Vec::len).max().unwrap_or(0) as i64)
            .max(1),
        temperature: 1.0,
        top_k: None,
        top_p: None,
        eos_token_id: Some(s.template.eos as i64),
        also_stop: s.template.also_stop(),
        pad_token_id: s.template.pad as i64,
    };
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
    let replies = decode_replies(&s.m.tokenizer, &g.tokens, &g.mask, &s.template.stop_ids())?;
    let records = replies
        .iter()
        .zip(&per_reply)
        .zip(&s.kl_prompts)
        .take(4)
        .map(|((r, kl), prompt)| {
            let ids: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
            json!({"step": step, "prompt": s.m.tokenizer.decode(&ids).unwrap_or_default(), "response": r.text, "kl": kl})
        })
        .collect();
    Ok((
        per_reply.iter().sum::<f64>() / per_reply.len().max(1) as f64,
        records,
    ))
}
