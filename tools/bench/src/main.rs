//! temper-bench: training and generation throughput of temper's core for one model shape,
//! measured the way scripts/bench_torch.py measures PyTorch, so scripts/bench.sh can print the
//! two side by side. Warm-up steps are excluded; the median of several timed repeats is
//! reported. Prints one JSON object.

use std::time::Instant;

use clap::Parser;
use serde_json::json;
use tch::{Device, Kind, Tensor};
use temper_core::model::MemorySaving;
use temper_core::optim::Moments;
use temper_core::sample::{generate, SamplingConfig};
use temper_core::{
    causal_lm_loss, resolve_device, with_autocast, AdamW, AdamWConfig, Arch, DeviceSpec, Heads,
    ModelConfig, Precision, Transformer,
};

/// Measure temper's training step (forward, backward, fused AdamW) and KV-cache sampling.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[arg(long, default_value_t = 4)]
    layers: i64,
    #[arg(long, default_value_t = 256)]
    width: i64,
    #[arg(long, default_value_t = 4)]
    heads: i64,
    #[arg(long, default_value_t = 8192)]
    vocab: i64,
    #[arg(long, default_value_t = 256)]
    context: i64,
    #[arg(long, default_value_t = 8)]
    batch: i64,
    /// Timed training steps per repeat.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    #[arg(long, value_parser = ["fp32", "bf16", "auto"], default_value = "fp32")]
    precision: String,
    #[arg(long, default_value_t = 16)]
    gen_batch: usize,
    #[arg(long, default_value_t = 32)]
    gen_prompt: usize,
    /// Generated tokens per reply (0: no generation measurement).
    #[arg(long, default_value_t = 64)]
    gen_new: i64,
    /// Train with activation checkpointing (recompute each block in the backward pass).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Compute the loss this many positions at a time (0: the whole B × T × V logits).
    #[arg(long, default_value_t = 0)]
    loss_chunk: usize,
    /// Keep AdamW's moments in bf16 (half the optimizer state).
    #[arg(long)]
    bf16_moments: bool,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let device = resolve_device(a.device)?;
    let precision = match a.precision.as_str() {
        "bf16" => Precision::Bf16,
        "auto" => Precision::Auto,
        _ => Precision::Fp32,
    };
    tch::manual_seed(0);
    let cfg = ModelConfig {
        arch: Arch::Gpt2,
        vocab_size: a.vocab,
        n_layer: a.layers,
        n_head: a.heads,
        d_model: a.width,
        max_position: a.context.max(a.gen_prompt as i64 + a.gen_new),
        rope_theta: 10_000.0,
        pad_token_id: Some(0),
        ..Default::default()
    };
    let vs = tch::nn::VarStore::new(device);
    let heads = Heads {
        lm: true,
        score: false,
    };
    let model = Transformer::new(&vs.root(), &cfg, heads)?;
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let train_tps = median(train_rates(&a, &vs, &model, precision)?);
    let generation = generation_rates(&a, &model, precision)?;
    println!(
        "{}",
        json!({
            "device": format!("{device:?}"), "precision": a.precision, "params": params, "threads": tch::get_num_threads(),
            "shape": {"L": a.layers, "d": a.width, "h": a.heads, "V": a.vocab, "T": a.context, "B": a.batch},
            "train_tok_per_s": train_tps,
            "train_step_ms": 1e3 * (a.batch * a.context) as f64 / train_tps,
            "train_tflops": 6.0 * params as f64 * train_tps / 1e12,
            "activation_checkpointing": a.activation_checkpointing, "loss_chunk": a.loss_chunk,
            "bf16_moments": a.bf16_moments,
            "generate": {"B": a.gen_batch, "prompt": a.gen_prompt, "new": a.gen_new,
                         "tok_per_s": if generation.is_empty() { f64::NAN } else { median(generation) }},
        })
    );
    Ok(())
}

/// Training tokens per second, one figure per repeat, after the warm-up steps: forward,
/// loss, backward and an AdamW update on random tokens.
fn train_rates(
    a: &Args,
    vs: &tch::nn::VarStore,
    model: &Transformer,
    precision: Precision,
) -> anyhow::Result<Vec<f64>> {
    let device = vs.device();
    let moments = if a.bf16_moments {
        Moments::Bf16
    } else {
        Moments::Fp32
    };
    let adamw = AdamWConfig {
        weight_decay: 0.0,
        moments,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(vs, adamw);
    let x = Tensor::randint(a.vocab, [a.batch, a.context], (Kind::Int64, device));
    let ones = x.ones_like();
    let saving = MemorySaving {
        checkpoint_blocks: a.activation_checkpointing,
        loss_chunk: a.loss_chunk,
    };
    let mut step = || -> anyhow::Result<()> {
        if saving.any() {
            model.lm_loss_backward(&x, None, &ones, precision, 1.0, saving)?;
        } else {
            let loss = with_autocast(device, precision, || -> anyhow::Result<Tensor> {
                let (_, logits) = model.forward(&x, None)?;
                Ok(causal_lm_loss(&logits, &x, &ones))
            })??;
            loss.backward();
        }
        opt.update(0.0, 3e-4)?;
        Ok(())
    };
    for _ in 0..a.warmup {
        step()?;
    }
    sync(device);
    let mut rates = Vec::new();
    for _ in 0..a.repeats {
        let t = Instant::now();
        for _ in 0..a.steps {
            step()?;
        }
        sync(device);
        rates.push((a.batch * a.context) as f64 * a.steps as f64 / t.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// Generated tokens per second with the KV cache, one figure per repeat (none when no tokens
/// are asked for), after one warm-up generation.
fn generation_rates(
    a: &Args,
    model: &Transformer,
    precision: Precision,
) -> anyhow::Result<Vec<f64>> {
    let device = model.device();
    let prompts: Vec<Vec<i64>> = (0..a.gen_batch)
        .map(|i| {
            (0..a.gen_prompt)
                .map(|j| 1 + ((i * 31 + j * 7) as i64 % (a.vocab - 1)))
                .collect()
        })
        .collect();
    let sampling = SamplingConfig {
        temperature: 1.0,
        ..SamplingConfig::greedy(a.gen_new)
    };
    let seeds: Vec<u64> = (0..a.gen_batch as u64).collect();
    let gen = || {
        with_autocast(device, precision, || {
            generate(model, &prompts, &sampling, &seeds)
        })
    };
    let mut rates = Vec::new();
    if a.gen_new > 0 {
        gen()??;
    }
    for _ in 0..a.repeats * usize::from(a.gen_new > 0) {
        sync(device);
        let t = Instant::now();
        let g = gen()??;
        sync(device);
        rates.push(g.tokens.numel() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(rates)
}
