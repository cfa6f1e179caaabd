//! Writing a stage's final model as PEFT files (see `files.rs` for the layout): the adapter
//! config for each method, the adapter tensors (AdaLoRA's switched-off triplets dropped, PiSSA
//! converted to apply to the original base), temper's pointer to the base, and — when the base
//! exists only in memory — the base itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::files::{relative_path, ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEMPER_ADAPTER};
use super::{LoraBias, LoraInit, PeftConfig, Tuning};
use crate::error::{CoreError, Result};
use crate::model::Transformer;

impl Tuning {
    /// Writes the trained model into the folder `dir`: PEFT files over `base` for an adapter
    /// method (`base` None: the base exists only in memory, so it is written to `dir/base/`),
    /// a full checkpoint otherwise. `write` applies to a full checkpoint; adapters are saved
    /// in fp32 over their base.
    pub fn save_into(
        &self,
        dir: &Path,
        model: &Transformer,
        vs: &VarStore,
        tokenizer: &Path,
        base: Option<&Path>,
        write: crate::checkpoint::WriteOptions,
    ) -> Result<()> {
        if let (Some(adapters), Some(PeftConfig::Prompt(c))) = (&self.adapters, &self.config) {
            let (base, inside) = base_for(dir, model, vs, tokenizer, base)?;
            return super::prompt::save(dir, c, adapters, model, &base, inside, tokenizer);
        }
        if let (Some(adapters), Some(PeftConfig::Adapter(c))) = (&self.adapters, &self.config) {
            let (base, inside) = base_for(dir, model, vs, tokenizer, base)?;
            let saved = super::bottleneck::Saved {
                config: c,
                adapters,
                vs,
                model,
            };
            return super::bottleneck::save(dir, &saved, &base, inside, tokenizer);
        }
        if let Some(PeftConfig::Ptuning(c)) = &self.config {
            let (base, inside) = base_for(dir, model, vs, tokenizer, base)?;
            return super::prompt::save_ptuning(dir, c, model, &base, inside, tokenizer);
        }
        if let Some(PeftConfig::Prefix(c)) = &self.config {
            let (base, inside) = base_for(dir, model, vs, tokenizer, base)?;
            return super::prompt::save_prefix(dir, c, model, &base, inside, tokenizer);
        }
        let low_rank = matches!(
            &self.config,
            Some(PeftConfig::Lora(_) | PeftConfig::Qlora(_) | PeftConfig::Adalora(_))
        );
        let (Some(adapters), true) = (&self.adapters, low_rank) else {
            crate::checkpoint::save_checkpoint_with(model, vs, dir, write)?;
            return copy_tokenizer(tokenizer, dir);
        };
        let (base, inside) = base_for(dir, model, vs, tokenizer, base)?;
        let (tensors, pissa_converted) = self.low_rank_tensors(adapters, model, vs, inside);
        write_adapter_weights(dir, &tensors)?;
        let config = self.low_rank_config(model, &base, inside, pissa_converted);
        write_json(&dir.join(ADAPTER_CONFIG), &config)?;
        let pointer = json!({
            "format": 1,
            "base": relative_path(&base, dir),
            "config": model.hf_config_json(),
        });
        write_json(&dir.join(TEMPER_ADAPTER), &pointer)?;
        copy_tokenizer(tokenizer, dir)
    }

    /// A LoRA's or AdaLoRA's tensors under PEFT's keys, with the base's trained biases and a
    /// new head; and whether PiSSA was converted. PiSSA trained over a residual weight: over
    /// the original base on disk (`!inside`) the adapter is saved as PEFT converts it, BA −
    /// B₀A₀ = [B | −B₀][A ; A₀], a plain LoRA of rank 2r with the same scale; a base written
    /// from memory is the residual itself, which the adapter as trained completes. AdaLoRA
    /// keeps only the triplets its allocation kept, as PEFT saves them.
    fn low_rank_tensors(
        &self,
        adapters: &VarStore,
        model: &Transformer,
        vs: &VarStore,
        inside: bool,
    ) -> (Vec<(String, Tensor)>, bool) {
        let mut tensors: BTreeMap<String, Tensor> = adapters.variables().into_iter().collect();
        let pissa_converted = !inside && convert_pissa(model, &mut tensors);
        if let Some(pattern) = self
            .adalora
            .as_ref()
            .and_then(super::Allocator::rank_pattern)
        {
            keep_allocated(&mut tensors, &pattern);
        }
        let adapted = adapted_modules(model);
        for (name, t) in vs.variables() {
            if t.requires_grad() {
                // PEFT keeps an adapted layer's own weights under `base_layer`.
                let key = match name.strip_suffix(".bias") {
                    Some(module) if adapted.contains(module) => format!("{module}.base_layer.bias"),
                    _ => name,
                };
                tensors.insert(format!("base_model.model.{key}"), t);
            }
        }
        (tensors.into_iter().collect(), pissa_converted)
    }

    /// PEFT's `adapter_config.json` for a LoRA or AdaLoRA over `base`.
    fn low_rank_config(
        &self,
        model: &Transformer,
        base: &Path,
        inside: bool,
        pissa_converted: bool,
    ) -> Value {
        let targeted: BTreeSet<String> = adapted_modules(model)
            .iter()
            .filter_map(|m| m.rsplit('.').next().map(String::from))
            .collect();
        let seq_cls = model.heads.score && !model.heads.lm;
        let mut config = json!({
            "task_type": if seq_cls { "SEQ_CLS" } else { "CAUSAL_LM" },
            // A base inside the folder is named relative to it, so the folder stays whole when
            // moved (load it with PeftModel.from_pretrained(<base model>, folder)).
            "base_model_name_or_path": if inside {
                PathBuf::from("base")
            } else {
                std::path::absolute(base).unwrap_or(base.to_path_buf())
            },
            "target_modules": targeted,
            "fan_in_fan_out": model.config.arch == crate::config::Arch::Gpt2,
            "modules_to_save": if seq_cls { json!(["score"]) } else { Value::Null },
            "inference_mode": true,
        });
        let method = match &self.config {
            Some(PeftConfig::Adalora(c)) => json!({
                "peft_type": "ADALORA",
                "lora_alpha": c.alpha,
                "lora_dropout": c.dropout,
                "bias": "none",
                "layers_to_transform": c.layers,
                "init_lora_weights": true,
                "init_r": c.init_r,
                "target_r": c.target_r,
                "tinit": c.tinit,
                "tfinal": c.tfinal,
                "deltaT": c.delta_t,
                "beta1": c.beta1,
                "beta2": c.beta2,
                "orth_reg_weight": c.orth_reg_weight,
                "total_step": self.adalora.as_ref().and_then(super::Allocator::total),
                "rank_pattern": self.adalora.as_ref().and_then(super::Allocator::rank_pattern),
            }),
            Some(PeftConfig::Lora(c) | PeftConfig::Qlora(c)) => json!({
                "peft_type": "LORA",
                "r": if pissa_converted { 2 * c.r } else { c.r },
                // alpha/r (or alpha/√r) unchanged at rank 2r.
                "lora_alpha": match (pissa_converted, c.rslora) {
                    (false, _) => c.alpha(),
                    (true, false) => 2.0 * c.alpha(),
                    (true, true) => std::f64::consts::SQRT_2 * c.alpha(),
                },
                "lora_dropout": c.dropout,
                "bias": match c.bias { LoraBias::None => "none", LoraBias::All => "all", LoraBias::LoraOnly => "lora_only" },
                "use_rslora": c.rslora,
                "use_dora": c.dora,
                "layers_to_transform": c.layers,
                // What PEFT should do when it creates the layers before loading these tensors:
                // never PiSSA's SVD again, which would change the base it loads.
                "init_lora_weights": match c.init { LoraInit::Default | LoraInit::Pissa => json!(true), LoraInit::Gaussian => json!("gaussian") },
            }),
            _ => unreachable!("a low-rank method"),
        };
        if let (Some(all), Value::Object(extra)) = (config.as_object_mut(), method) {
            all.extend(extra);
        }
        config
    }
}

/// Drops the triplets AdaLoRA switched off: rows of `lora_A` and `lora_E`, columns of
/// `lora_B` (PEFT's `resize_state_dict_by_rank_pattern`).
fn keep_allocated(tensors: &mut BTreeMap<String, Tensor>, pattern: &BTreeMap<String, Vec<bool>>) {
    for (key, alive) in pattern {
        let module = key.strip_suffix(".lora_E").unwrap_or(key);
        let keep: Vec<i64> = (0..alive.len() as i64)
            .filter(|&i| alive[i as usize])
            .collect();
        for (factor, dim) in [("lora_A", 0), ("lora_E", 0), ("lora_B", 1)] {
            let name = format!("base_model.model.{module}.{factor}");
            if let Some(t) = tensors.get(&name) {
                let idx = Tensor::from_slice(&keep).to_device(t.device());
                let kept = t.index_select(dim, &idx);
                tensors.insert(name, kept);
            }
        }
    }
}

/// Replaces each PiSSA layer's factors by `[A ; A₀]` and `[B | −B₀]`; whether there were any.
fn convert_pissa(model: &Transformer, tensors: &mut BTreeMap<String, Tensor>) -> bool {
    let mut any = false;
    for (_, linear) in model.block_linears() {
        let Some((a0, b0)) = linear.lora.as_ref().and_then(|l| l.initial.as_ref()) else {
            continue;
        };
        let key = |factor: &str| format!("base_model.model.{}.{factor}.weight", linear.module);
        let (ka, kb) = (key("lora_A"), key("lora_B"));
        let a = Tensor::cat(&[&tensors[&ka], a0], 0);
        let b = Tensor::cat(&[&tensors[&kb], &-b0], 1);
        tensors.insert(ka, a);
        tensors.insert(kb, b);
        any = true;
    }
    any
}

/// Creates the adapter folder `dir` and returns its base: `base`, or — when the base exists
/// only in memory (the stage started from an adapter, merged) — the model written to
/// `dir/base/` (dense, for a QLoRA model). The flag says which.
pub(crate) fn base_for(
    dir: &Path,
    model: &Transformer,
    vs: &VarStore,
    tokenizer: &Path,
    base: Option<&Path>,
) -> Result<(PathBuf, bool)> {
    std::fs::create_dir_all(dir).map_err(|source| CoreError::Io {
        path: dir.into(),
        source,
    })?;
    if let Some(b) = base {
        return Ok((b.to_path_buf(), false));
    }
    let b = dir.join("base");
    super::with_dense_weights(model, || {
        crate::checkpoint::save_full_checkpoint(
            &dir.join("base_tmp"),
            model,
            vs,
            tokenizer,
            Default::default(),
        )
    })?;
    replace(&dir.join("base_tmp").join("checkpoint"), &b)?;
    let _ = std::fs::remove_dir_all(dir.join("base_tmp"));
    Ok((b, true))
}

/// Writes `adapter_model.safetensors` into `dir` atomically (CPU, contiguous, detached).
pub(crate) fn write_adapter_weights(dir: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tensors: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    let tmp = dir.join(format!(".{ADAPTER_WEIGHTS}.tmp"));
    Tensor::write_safetensors(&tensors, &tmp)?;
    replace(&tmp, &dir.join(ADAPTER_WEIGHTS))
}

pub(crate) fn copy_tokenizer(tokenizer: &Path, dir: &Path) -> Result<()> {
    crate::save::write_tokenizer_files(tokenizer, dir)
}

pub(crate) fn replace(from: &Path, to: &Path) -> Result<()> {
    if to.is_dir() {
        std::fs::remove_dir_all(to).map_err(|source| CoreError::Io {
            path: to.into(),
            source,
        })?;
    }
    std::fs::rename(from, to).map_err(|source| CoreError::Io {
        path: to.into(),
        source,
    })
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    write_bytes(
        path,
        serde_json::to_string_pretty(v)
            .expect("JSON serialises")
            .as_bytes(),
    )
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    temper_stage::atomic::write_atomic(path, bytes).map_err(|e| CoreError::Io {
        path: path.into(),
        source: std::io::Error::other(format!("{e:#}")),
    })
}

/// The module paths of the layers that carry a LoRA.
fn adapted_modules(model: &Transformer) -> BTreeSet<String> {
    model
        .block_linears()
        .iter()
        .filter(|(_, l)| l.lora.is_some())
        .map(|(_, l)| l.module.clone())
        .collect()
}
