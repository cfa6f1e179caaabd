//! temper-merge: folds a LoRA/DoRA adapter into its base and writes a full Hugging Face
//! checkpoint (config.json, model.safetensors, tokenizer.json), so a stage trained with
//! `peft: {method: lora}` feeds tools and stages that want plain weights:
//! SFT with LoRA → merge → reward model is one pipeline.

use serde::{Deserialize, Serialize};
use temper_core::checkpoint::{
    check_save, save_full_checkpoint, SaveDtype, SaveOptions, ScoreHead,
};
use temper_core::peft::{is_adapter, read_adapter_config};
use temper_core::{load_checkpoint, resolve_device, DeviceSpec, LoadSpec};
use temper_stage::{
    checked_config, invalid, ConfigFile, InputPath, Inputs, MetricsLog, StageArgs, StageError,
    StageFolder, StageKind,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A checkpoint folder holding a PEFT LoRA adapter (adapter_config.json,
    /// adapter_model.safetensors, tokenizer.json), e.g. `${sft.checkpoint}`.
    adapter: InputPath,
    /// Where to merge (the arithmetic is the same anywhere; a GPU only makes it faster).
    /// How the merged checkpoint is written: `dtype` (fp32, bf16, fp16; default the base's)
    /// and `max_shard_size` (`5GB`; default one file).
    #[serde(default)]
    save: SaveOptions,
    #[serde(default)]
    device: DeviceSpec,
    /// A pipeline-wide default the orchestrator passes to every stage; merging draws nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Also a pipeline-wide default: merging computes in the weights' own precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    precision: Option<temper_core::Precision>,
}

fn main() {
    temper_stage::stage_main(
        "temper-merge",
        "Fold a LoRA/DoRA adapter into its base: a full Hugging Face checkpoint.",
        run,
    )
}

fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    check_save(cfg, &c.save)?;
    inputs.checkpoint(cfg, "adapter", &c.adapter, true)?;
    if !inputs.any_pending() {
        cfg.ensure(
            is_adapter(&c.adapter),
            "adapter",
            format!(
                "{} is a full checkpoint, not an adapter: there is nothing to merge",
                c.adapter.display()
            ),
        )?;
    }
    Ok(())
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Merge, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    let c = &cfg.value;
    let adapter = read_adapter_config(&c.adapter).map_err(invalid)?;
    // A reward model or critic adapter carries its score head; a policy its LM head.
    let spec = match adapter.task_type.as_deref() {
        Some("SEQ_CLS") => LoadSpec {
            lm_head: false,
            score: ScoreHead::Load,
        },
        _ => LoadSpec::CAUSAL_LM,
    };
    let device = resolve_device(c.device).map_err(invalid)?;
    let (vs, model) = load_checkpoint(&c.adapter, spec, device).map_err(invalid)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let folder = StageFolder::claim(&args.out, "merge")?;
    cfg.write_resolved(&folder.path)?;
    let log = MetricsLog::open(&folder.path)?;
    let write = c.save.resolve(SaveDtype::of_checkpoint(&c.adapter));
    save_full_checkpoint(
        &folder.path,
        &model,
        &vs,
        &c.adapter.join("tokenizer.json"),
        write,
    )?;
    let mut summary = temper_stage::Summary::new();
    summary.insert("params".into(), model.config.param_count().into());
    summary.insert(
        "adapter_mb".into(),
        serde_json::json!(temper_stage::footprint::dir_bytes(&c.adapter) as f64 / 1e6),
    );
    log.write_summary("ok", summary)?;
    tracing::info!(
        "merged {} into {}",
        c.adapter.display(),
        folder.path.join("checkpoint").display()
    );
    Ok(())
}
