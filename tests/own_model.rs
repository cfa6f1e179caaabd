//! Bring your own model: a model temper did not make (tests/fixtures/qwen2_chatml: a tiny Qwen2
//! transformers built, bf16 in three shards, ChatML template in chat_template.jinja;
//! tests/fixtures/llama3_chat: Llama 3.1 rope scaling and Llama 3 headers) fine-tuned by
//! `temper-sft`, fully and with LoRA, then checked from transformers' side
//! (scripts/check_hf_chat.py): `apply_chat_template` renders the prompt temper rendered, the
//! checkpoint loads with no missing key, and greedy `generate` gives temper's greedy reply.

mod common;

use std::path::Path;

use common::{assert_ok, repo, run_stage, tiny, write};
use tch::Device;
use temper_core::{generate, load_with_tokenizer, LoadSpec, SamplingConfig};
use temper_data::records::{Message, Role};
use temper_data::ChatTemplate;

fn fixture(name: &str) -> std::path::PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// Fine-tunes the checkpoint `init` at learning rate `lr` with `peft` (a YAML block, or empty) and returns
/// the checkpoint. 40 steps take the random model from repeating one token to replies of
/// several distinct tokens, so greedy decoding is a real comparison.
fn fine_tune(dir: &Path, init: &Path, lr: f64, peft: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = write(
        &dir.join("sft.yaml"),
        &format!(
            "init: {}\ndata: {}\nsteps: 40\nbatch_size: 8\noptim: {{lr: {lr}, warmup_steps: 4}}\nsave_every: 40\n{peft}",
            init.display(),
            tiny("sft.jsonl").display()
        ),
    );
    let out = dir.join("sft");
    assert_ok(&run_stage("temper-sft", &cfg, &out), "sft");
    out.join("checkpoint")
}

/// temper's prompt and greedy reply for one conversation, checked in transformers.
fn check_in_transformers(checkpoint: &Path, dir: &Path, what: &str) {
    let loaded = load_with_tokenizer(checkpoint, LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
    let template = ChatTemplate::new(&loaded.tokenizer).unwrap();
    assert!(
        !template.is_temper(),
        "{what}: the model's own template is used"
    );
    let messages = vec![Message::new(Role::User, "What does the dog like?")];
    let prompt = template
        .render_prompt(&loaded.tokenizer, &messages)
        .unwrap();
    let mut sampling = SamplingConfig::greedy(10);
    sampling.eos_token_id = Some(template.eos as i64);
    sampling.also_stop = template.also_stop();
    sampling.pad_token_id = template.pad as i64;
    let prompt_i64: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let gen = tch::no_grad(|| generate(&loaded.model, &[prompt_i64], &sampling, &[0])).unwrap();
    let tokens: Vec<i64> = Vec::<i64>::try_from(gen.tokens.get(0)).unwrap();
    let mask: Vec<bool> = Vec::<bool>::try_from(gen.mask.get(0)).unwrap();
    let reply: Vec<i64> = tokens
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(&t, _)| t)
        .collect();
    let case = serde_json::json!({
        "messages": messages,
        "end_of_turn": loaded.tokenizer.token(template.eos).unwrap(),
        "prompt_ids": prompt,
        "tokens": reply,
    });
    let case_path = write(&dir.join("case.json"), &case.to_string());
    let out = std::process::Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("scripts/check_hf_chat.py"))
        .arg(checkpoint)
        .arg(&case_path)
        .output()
        .expect("the project venv's python runs (scripts/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{what}: {}", text.trim());
    assert!(
        out.status.success(),
        "{what}: transformers check failed:\n{text}"
    );
}

#[test]
fn a_qwen2_with_chatml_fine_tunes_and_transformers_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fine_tune(dir.path(), &fixture("qwen2_chatml"), 1e-2, "");
    // The model's own files travel with it.
    for f in [
        "chat_template.jinja",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f} not carried into the checkpoint");
    }
    let config = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
    assert!(config.contains("\"model_type\": \"qwen2\""), "{config}");
    // Stored as it came (bf16), in one file unless asked: save_dtype defaults to the input's.
    assert!(config.contains("\"torch_dtype\": \"bfloat16\""), "{config}");
    let weights = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    assert!(weights.iter().all(|(_, t)| t.kind() == tch::Kind::BFloat16));
    check_in_transformers(&ckpt, dir.path(), "qwen2 full");
}

#[test]
fn a_qwen2_with_lora_saves_an_adapter_transformers_agrees_with() {
    let dir = tempfile::tempdir().unwrap();
    // LoRA over a random model barely moves it (its frozen embeddings carry no signal), so
    // the adapter goes on the fully fine-tuned model: temper's Qwen2 checkpoint as a base.
    let full = fine_tune(&dir.path().join("full"), &fixture("qwen2_chatml"), 1e-2, "");
    let peft =
        "peft: {method: lora, r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}\n";
    let ckpt = fine_tune(&dir.path().join("lora"), &full, 1e-2, peft);
    assert!(ckpt.join("adapter_config.json").exists());
    check_in_transformers(&ckpt, dir.path(), "qwen2 lora");
}

#[test]
fn a_llama3_model_fine_tunes_and_saves_sharded_for_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let save = "save: {dtype: bf16, max_shard_size: 16KB}\n";
    let ckpt = fine_tune(dir.path(), &fixture("llama3_chat"), 1e-2, save);
    let index = std::fs::read_to_string(ckpt.join("model.safetensors.index.json")).unwrap();
    let shards = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("model-") && name.ends_with(".safetensors")
        })
        .count();
    assert!(
        shards >= 3,
        "{shards} shards for ~50 KB in bf16 at 16 KB each"
    );
    assert!(index.contains("weight_map") && !ckpt.join("model.safetensors").exists());
    check_in_transformers(&ckpt, dir.path(), "llama3 full");
}

#[test]
fn a_template_that_raises_stops_the_stage_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixture("qwen2_chatml")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System messages are not supported') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let data = write(
        &dir.path().join("chat.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"Be terse.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n",
    );
    let cfg = write(
        &dir.path().join("sft.yaml"),
        &format!(
            "init: {}\ndata: {}\nsteps: 2\nbatch_size: 1\n",
            model.display(),
            data.display()
        ),
    );
    let out = dir.path().join("sft");
    let result = run_stage("temper-sft", &cfg, &out);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("System messages are not supported")
            && stderr.contains("chat_template.jinja")
            && stderr.contains("chat.jsonl: line 2"),
        "{stderr}"
    );
    assert!(
        !out.exists(),
        "nothing is written for a template that raises"
    );
}
