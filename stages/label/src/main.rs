//! temper-label: on-policy AI feedback. The policy answers every prompt `num_generations`
//! times (seeded per reply, so a resumed run writes the same replies); a labeller — the
//! program rewards GRPO has (`lexicon`, `exact_match`, `regex`, `length`, a user's `command`,
//! e.g. a local LLM judge) and reward models, weighted — scores every reply; and the stage
//! writes what the next stages train on: `pairs.jsonl` (best against worst reply of each
//! prompt, or every pair above `min_margin`; ties dropped) for a reward model or DPO, and
//! `best_of_n.jsonl` (each prompt's best reply, rejection sampling / ReST) for SFT. Its
//! metrics show the labels before anything trains on them: the score distribution, the pairs
//! kept and why others were dropped, the margins, and the lengths of chosen against rejected
//! replies (a labeller that prefers long or short replies shows here first).

mod config;
mod outputs;
mod select;

use std::time::Instant;

use tch::{Device, Kind};
use temper_core::chat_model::{load_prompts, PromptSettings, Prompts};
use temper_core::reward_set::{ReplyBatch, RewardSet};
use temper_core::train::{self, TrainRun};
use temper_core::{generate, load_with_tokenizer, with_autocast, LoadSpec, Loaded};
use temper_core::{SamplingConfig, Transformer};
use temper_data::{seeds_for, ChatTemplate, PromptRecord};
use temper_stage::{invalid, Cadence, ConfigFile, Every, StageArgs, StageError, StageKind};

use crate::config::{check, Config};
use crate::select::Labelled;

fn main() {
    temper_stage::stage_main(
        "temper-label",
        "On-policy feedback: sample replies from a policy, score them with a labeller, write preference pairs and best-of-n SFT rows.",
        run,
    )
}

/// The policy, its template, the prompts and the labeller.
struct Setup {
    policy: Loaded,
    template: ChatTemplate,
    prompts: Prompts,
    labeller: RewardSet,
}

fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    let policy = load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let template = ChatTemplate::new(&policy.tokenizer).map_err(invalid)?;
    let settings = PromptSettings {
        file: &c.prompts,
        fields: &c.fields,
        max_new_tokens: c.max_new_tokens,
        max_prompt_len: c.max_prompt_len,
    };
    let room = policy.model.token_room();
    let (mut prompts, _) = load_prompts(cfg, &policy.tokenizer, &template, room, settings)?;
    prompts.truncate(c.max_prompts.unwrap_or(usize::MAX));
    cfg.ensure(!prompts.is_empty(), "prompts", "no prompt fits the model")?;
    let labeller = RewardSet::load(cfg, "labeller", &c.labeller, &policy, device)?;
    labeller.check_prompts(cfg, &c.prompts, &prompts)?;
    Ok(Setup {
        policy,
        template,
        prompts,
        labeller,
    })
}

/// Where the labelled replies so far are kept between saves: the state's progress extras.
const REPLIES: &str = "replies";

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Sampling and labelling are cheap next to training, and pairs need every reply of a
    // prompt in one place: one process.
    temper_core::dist::World::require_single("label").map_err(invalid)?;
    let Some(st) = train::start(args, StageKind::Label, check, |c| c.device, prepare)? else {
        return Ok(());
    };
    let (c, s) = (&st.cfg.value, &st.setup);
    let n = s.prompts.len();
    let batches = n.div_ceil(c.batch_size) as u64;
    let every = Cadence::new(Every::new(1), Every::new(1), c.save_every, batches);
    let mut run = TrainRun::open_with(st.world, &args.out, &st.cfg, &[], &mut [], every)?;
    let mut labelled: Vec<Labelled> = match run.progress.extra.get(REPLIES) {
        Some(v) => serde_json::from_value(v.clone()).map_err(invalid)?,
        None => Vec::new(),
    };
    // One seed per reply, a function of the prompt's index and the reply's: a resumed or
    // re-batched run samples the same replies.
    let seeds = seeds_for(c.seed, "label", 0, n * c.num_generations);
    let sampling = SamplingConfig {
        top_k: c.top_k,
        top_p: c.top_p,
        ..SamplingConfig::chat(&s.template, c.max_new_tokens, c.temperature)
    };
    while run.progress.step < batches {
        let b = run.progress.step as usize;
        let rows = b * c.batch_size..((b + 1) * c.batch_size).min(n);
        let started = Instant::now();
        let batch = label_batch(s, c, &sampling, rows, &seeds)?;
        let mean = batch.iter().map(|r| r.score).sum::<f64>() / batch.len() as f64;
        let tokens: usize = batch.iter().map(|r| r.tokens).sum();
        let mut fields = vec![
            ("label/score_mean".to_string(), mean),
            (
                "response/len_mean".into(),
                tokens as f64 / batch.len() as f64,
            ),
            (
                "response/eos_rate".into(),
                batch.iter().filter(|r| r.eos).count() as f64 / batch.len() as f64,
            ),
            ("time/batch_s".into(), started.elapsed().as_secs_f64()),
        ];
        for (k, (name, _)) in batch[0].parts.iter().enumerate() {
            let m = batch.iter().map(|r| r.parts[k].1).sum::<f64>() / batch.len() as f64;
            fields.push((format!("label/{name}"), m));
        }
        labelled.extend(batch);
        let step = run.iterated(tokens as u64, format!("score {mean:.3}"));
        run.log.log_train(step, &fields)?;
        let value = serde_json::to_value(&labelled).map_err(invalid)?;
        run.progress.extra.insert(REPLIES.into(), value);
        run.save_when_due(&[], &[])?;
    }
    let Some(mut done) = run.finish()? else {
        return Ok(());
    };
    let written = outputs::write(&done.out, &st.cfg, &s.prompts, &labelled)?;
    let step = done.progress.step;
    done.log.log_eval(step, &written.fields)?;
    done.log.log_samples(&written.samples)?;
    let mut summary = done.log.summary_base(&done.progress);
    summary.insert("prompts".into(), n.into());
    summary.insert("replies".into(), labelled.len().into());
    for (k, v) in &written.fields {
        summary.insert(k.clone(), temper_stage::metrics::json_number(*v));
    }
    done.write(summary)
}

/// The replies to the prompts at `rows`, `num_generations` each, labelled.
fn label_batch(
    s: &Setup,
    c: &Config,
    sampling: &SamplingConfig,
    rows: std::ops::Range<usize>,
    seeds: &[u64],
) -> anyhow::Result<Vec<Labelled>> {
    let k = c.num_generations;
    let mut ids = Vec::new();
    let mut records: Vec<&PromptRecord> = Vec::new();
    let mut index = Vec::new();
    for i in rows.clone() {
        for j in 0..k {
            ids.push(s.prompts[i].0.iter().map(|&t| i64::from(t)).collect());
            records.push(&s.prompts[i].1);
            index.push((i, j));
        }
    }
    let model: &Transformer = &s.policy.model;
    let seeds = &seeds[rows.start * k..rows.end * k];
    let g = with_autocast(model.device(), c.precision, || {
        generate(model, &ids, sampling, seeds)
    })??;
    let joined = g.joined();
    let replies = ReplyBatch {
        joined: &joined,
        prompt: &g.prompt,
        prompt_mask: &g.prompt_mask,
        tokens: &g.tokens,
        mask: &g.mask,
    };
    let stops = s.template.stop_ids();
    let scored = s
        .labeller
        .score(&records, &replies, &s.policy.tokenizer, &stops)?;
    let lengths = Vec::<i64>::try_from(g.mask.to_kind(Kind::Int64).sum_dim_intlist(
        1,
        false,
        Kind::Int64,
    ))?;
    let eos = Vec::<bool>::try_from(g.stopped(&stops))?;
    Ok(index
        .into_iter()
        .enumerate()
        .map(|(r, (prompt, sample))| Labelled {
            prompt,
            sample,
            text: scored.replies[r].clone(),
            tokens: lengths[r] as usize,
            eos: eos[r],
            score: scored.totals[r],
            parts: scored
                .per_name
                .iter()
                .map(|(name, v)| (name.clone(), v[r]))
                .collect(),
        })
        .collect())
}
