#!/usr/bin/env python3
"""Parity goldens for temper's parameter-efficient fine-tuning, made with the `peft` package.

For each case below this wraps a tiny fixture model (tests/fixtures/<base>/, made by
make_goldens.py) with peft.get_peft_model, sets every adapter tensor to seeded random values
(PEFT's own init makes B = 0, which would hide a wrong B·A), saves the adapter with
save_pretrained under tests/fixtures/peft/<case>/, and writes golden.safetensors beside it:

  logits / scores      the PEFT model's output on the golden rows of make_goldens.py
                       (unpadded, right-padded, left-padded), adapters unmerged
  merged_logits        the same after merge_and_unload() (what temper's merge computes)
  grad.<key>           gradient of make_goldens' LM loss for every trainable adapter tensor
                       (keys as in adapter_model.safetensors)
  step.<key>           the tensor after one torch.optim.AdamW step (settings in golden.json)

PiSSA (make_pissa): init_lora_weights="pissa" on GPT-2 and Llama (rsLoRA): starting factors,
residual weights, logits after moving the adapter, and PEFT's conversion to plain LoRA.
AdaLoRA (make_adalora): AdaLoraConfig trained for a few AdamW updates with PEFT's own loop
(regulariser, update_and_allocate): losses, final factors, rank pattern, logits, saved adapter.
Cases: LoRA on GPT-2 (Conv1D, fan_in_fan_out) and Llama, rsLoRA, DoRA (both families), LoRA
with trained biases on selected layers, and a LoRA reward model (GPT-2 *ForSequenceClassification
with the score head in modules_to_save).

QLoRA (make_qlora): bitsandbytes' NF4 on its CPU path. tests/fixtures/peft/nf4/golden.safetensors
holds a seeded weight with a partial last block and more than 256 blocks, its 4-bit codes, block
maxima (plain, and double-quantised: 8-bit codes, second-level scales, offset), the NF4 code and
the dynamic map; tests/fixtures/peft/llama_qlora/ a LoRA adapter over a tiny Llama (its base/,
every dense dimension a multiple of the block) loaded in 4-bit (BitsAndBytesConfig nf4 + double quantisation, fp32 compute) and that model's logits.
Prompt tuning (make_prompt): PEFT's PromptTuningConfig on the GPT-2 and Llama fixtures with
random virtual tokens; logits of the real positions and the gradient of the prompt embeddings.
P-tuning (make_ptuning): PromptEncoderConfig with an MLP (GPT-2) and an LSTM (Llama) encoder.
Bottleneck adapters (make_bottleneck; PEFT has none): temper's own files, applied to the
transformers model by forward hooks. Prefix tuning (make_prefix): PrefixTuningConfig (P-tuning v2 layout: the prefix learned
directly; on Llama, grouped-query attention sizes it by the key/value heads); the same checks.

Rerun with the project venv:
  .venv/bin/python scripts/make_peft_goldens.py
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_goldens import ROOT, inputs, lm_loss  # noqa: E402

ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

CASES = {
    "gpt2_lora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_rslora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_rslora=True)),
    "gpt2_dora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)),
    "gpt2_bias": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_proj"], bias="lora_only",
                               layers_to_transform=[1])),
    "llama_lora": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                                 use_dora=True)),
    "gpt2_rm_lora": ("gpt2_rm", dict(r=4, lora_alpha=8, target_modules=["c_attn"],
                                     task_type="SEQ_CLS")),
}


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (p.requires_grad and name.endswith("bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0) * p)
            if "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make(case, base, settings, seed):
    base_dir = os.path.join(ROOT, base)
    rm = base.endswith("_rm")
    cls = AutoModelForSequenceClassification if rm else AutoModelForCausalLM
    model = cls.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **settings))
    randomise(peft_model, seed)
    out = os.path.join(ROOT, "peft", case)
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # PEFT's model-card template
    n_saved = len(get_peft_model_state_dict(peft_model))
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = f"../../{base}"  # relative to this folder, for readers
    config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set: any order
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)

    ids, mask, pos = inputs(model.config.vocab_size)
    peft_model.eval()
    with torch.no_grad():
        out_main = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos)
    golden = {"input_ids": ids, "attention_mask": mask}
    if rm:
        golden["scores"] = out_main.logits[:, 0].contiguous()
    else:
        golden["logits"] = out_main.logits.contiguous()
        # One AdamW step on the adapter: gradients first, then the updated tensors.
        peft_model.train()
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(list(params.values()), lr=ADAMW["lr"], betas=ADAMW["betas"],
                                eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
        loss = lm_loss(peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, ids, mask)
        loss.backward()
        saved_keys = get_peft_model_state_dict(peft_model).keys()
        to_key = {n: saved_key(n) for n in params}
        assert set(to_key.values()) <= set(saved_keys), (set(to_key.values()) - set(saved_keys))
        for n, p in params.items():
            golden[f"grad.{to_key[n]}"] = p.grad.detach().clone().contiguous()
        opt.step()
        for n, p in params.items():
            golden[f"step.{to_key[n]}"] = p.detach().clone().contiguous()
        peft_model.eval()
        # Back to the saved values, then merge.
        peft_model = get_peft_model(cls.from_pretrained(base_dir), LoraConfig(lora_dropout=0.0, **settings))
        randomise(peft_model, seed)
        merged = peft_model.merge_and_unload()
        with torch.no_grad():
            golden["merged_logits"] = merged(input_ids=ids, attention_mask=mask,
                                             position_ids=pos).logits.contiguous()
    save_file(golden, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": case, "base": base, "seed": seed, "settings": settings,
                   "adamw": {**ADAMW, "betas": list(ADAMW["betas"])},
                   "peft": __import__("peft").__version__, "torch": torch.__version__}, f, indent=1)
    print(f"{case}: {n_saved} adapter tensors")


def saved_key(param_name):
    # base_model.model.<path>.lora_A.default.weight -> base_model.model.<path>.lora_A.weight
    # (DoRA's magnitude is saved without ".weight")
    if param_name.endswith("lora_magnitude_vector.default.weight"):
        return param_name[: -len(".default.weight")]
    return param_name.replace(".default", "")


def make_pissa(case, base, settings, seed):
    """PiSSA (init_lora_weights="pissa") on a fixture: the starting factors and residual
    weights, then the adapter moved as training would move it, that model's logits, and the
    adapter PEFT saves converted to plain LoRA (path_initial_model_for_weight_conversion).

    golden.safetensors: init_delta.<module> (scale·B₀A₀, out × in, sign-free unlike A₀ and B₀),
    residual.<module> (the base weight after init, in the checkpoint's layout),
    trained.<adapter key> (the moved A and B), logits (PiSSA model, moved adapter);
    converted/ holds the converted adapter (rank 2r over the original base)."""
    import tempfile

    base_dir = os.path.join(ROOT, base)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(lora_dropout=0.0, init_lora_weights="pissa", **settings)
    peft_model = get_peft_model(model, config)
    out = os.path.join(ROOT, "peft", case)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    golden = {}
    g = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        # PEFT's recipe: save the starting adapter marked as a plain one, train, then save
        # converted against it.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(os.path.join(tmp, "init"))
        with torch.no_grad():
            for name, module in peft_model.named_modules():
                if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                    path = name[len("base_model.model."):]
                    a = module.lora_A["default"].weight
                    b = module.lora_B["default"].weight
                    golden[f"init_delta.{path}"] = (module.scaling["default"] * b @ a).contiguous()
                    golden[f"residual.{path}"] = module.base_layer.weight.detach().clone().contiguous()
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
                    golden[f"trained.{saved_key(name)}"] = p.detach().clone().contiguous()
        peft_model.save_pretrained(os.path.join(out, "converted"),
                                   path_initial_model_for_weight_conversion=os.path.join(tmp, "init"))
    os.remove(os.path.join(out, "converted", "README.md"))
    with open(os.path.join(out, "converted", "adapter_config.json")) as f:
        adapter = json.load(f)
    adapter["base_model_name_or_path"] = f"../../../{base}"
    adapter["target_modules"] = sorted(adapter["target_modules"])
    with open(os.path.join(out, "converted", "adapter_config.json"), "w") as f:
        json.dump(adapter, f, indent=2)
    ids, mask, pos = inputs(model.config.vocab_size)
    peft_model.eval()
    with torch.no_grad():
        golden["logits"] = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.contiguous()
    golden["input_ids"], golden["attention_mask"] = ids, mask
    save_file(golden, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": case, "base": base, "seed": seed, "settings": settings,
                   "peft": __import__("peft").__version__, "torch": torch.__version__}, f, indent=1)
    print(f"{case}: PiSSA on {sum(k.startswith('residual.') for k in golden)} layers, converted to rank {adapter['r']}")


def make_adalora(case, base, settings, steps, seed):
    """AdaLoRA trained for `steps` AdamW updates on make_goldens' rows, PEFT's loop: loss with
    the orthogonality regulariser (PEFT adds it when labels are given), backward, step,
    update_and_allocate(step), zero_grad. A, B and E start at seeded random values (PEFT's
    E = 0 would leave nothing to rank at first).

    golden.safetensors: init.<key> (A, B, E before training), loss (each step's regularised
    loss), final.<key> (after the last update), logits (the trained model); golden.json has
    the rank pattern; the folder holds the adapter PEFT saved (pruned by the pattern)."""
    from peft import AdaLoraConfig

    base_dir = os.path.join(ROOT, base)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # CAUSAL_LM: PeftModelForCausalLM goes through AdaLoraModel.forward, which adds the
    # regulariser to the loss (a bare PeftModel calls the transformers model directly).
    peft_model = get_peft_model(model, AdaLoraConfig(lora_dropout=0.0, total_step=steps, task_type="CAUSAL_LM",
                                                     **settings))
    g = torch.Generator().manual_seed(seed)
    golden = {}
    params = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_E" in name else 0.2))
                key = name.replace(".default", "")
                golden[f"init.{key}"] = p.detach().clone()
                params[key] = p
    ids, mask, pos = inputs(model.config.vocab_size)
    target_ok = mask.clone()
    target_ok[:, 1:] *= mask[:, :-1]
    labels = ids.masked_fill(target_ok == 0, -100)
    opt = torch.optim.AdamW(list(params.values()), lr=ADAMW["lr"], betas=ADAMW["betas"],
                            eps=ADAMW["eps"], weight_decay=0.0)
    peft_model.train()
    losses = []
    for step in range(steps):
        loss = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    golden["loss"] = torch.tensor(losses)
    for key, p in params.items():
        golden[f"final.{key}"] = p.detach().clone()
    peft_model.eval()
    with torch.no_grad():
        golden["logits"] = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.contiguous()
    golden["input_ids"], golden["attention_mask"] = ids, mask
    out = os.path.join(ROOT, "peft", case)
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = f"../../{base}"
    config["target_modules"] = sorted(config["target_modules"])
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: v.contiguous() for k, v in golden.items()}, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": case, "base": base, "seed": seed, "steps": steps, "settings": settings,
                   "adamw": {**ADAMW, "betas": list(ADAMW["betas"]), "weight_decay": 0.0},
                   "rank_pattern": config["rank_pattern"],
                   "peft": __import__("peft").__version__, "torch": torch.__version__}, f, indent=1)
    alive = {k: sum(v) for k, v in config["rank_pattern"].items()}
    print(f"{case}: {steps} updates, ranks left {alive}")


def make_nf4():
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(7)
    weight = torch.randn(96, 200, generator=g)  # 19,200 = 300 blocks of 64; 256 + 44 maxima
    golden = {"weight": weight}
    for double in (False, True):
        packed, st = F.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                     compress_statistics=double)
        p = "double" if double else "plain"
        golden[f"{p}.packed"] = packed.reshape(-1).contiguous()
        golden[f"{p}.dequantized"] = F.dequantize_4bit(packed, st).contiguous()
        if double:
            golden[f"{p}.absmax_codes"] = st.absmax.contiguous()
            golden[f"{p}.absmax2"] = st.state2.absmax.contiguous()
            golden[f"{p}.offset"] = st.offset.reshape(1).float().contiguous()
            golden["dynamic_map"] = st.state2.code.contiguous()
        else:
            golden[f"{p}.absmax"] = st.absmax.contiguous()
        golden["nf4_code"] = st.code.contiguous()
    out = os.path.join(ROOT, "peft", "nf4")
    os.makedirs(out, exist_ok=True)
    save_file(golden, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": "nf4", "blocksize": 64, "blocksize2": 256,
                   "bitsandbytes": __import__("bitsandbytes").__version__,
                   "torch": torch.__version__}, f, indent=1)
    print("nf4: codes and maxima of a", list(weight.shape), "weight")


def make_qlora(seed=200):
    from transformers import BitsAndBytesConfig

    settings = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    # The Llama fixture is narrower than a block (hidden 32), which bitsandbytes' CPU kernels
    # refuse; this base has every dense dimension a multiple of 64.
    from transformers import LlamaConfig, LlamaForCausalLM

    out = os.path.join(ROOT, "peft", "llama_qlora")
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0))
    base.save_pretrained(os.path.join(out, "base"))
    import bitsandbytes.functional as F

    four_bit = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"),
                                                    quantization_config=quant, device_map="cpu",
                                                    dtype=torch.float32)
    # bitsandbytes' CPU kernel for a 4-bit matmul repacks the weight and computes at lower
    # precision (its output differs from x·Wᵀ of its own dequantised W by ~1e-3 here), so the
    # golden runs PEFT's LoRA over bitsandbytes' dequantised weights with an exact matmul:
    # what QLoRA computes (dequantise, then matmul in the compute precision).
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"), dtype=torch.float32)
    dense = dict(model.named_modules())
    n_quantised = 0
    with torch.no_grad():
        for name, module in four_bit.named_modules():
            if hasattr(module, "weight") and hasattr(module.weight, "quant_state"):
                w = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dense[name].weight.copy_(w)
                n_quantised += 1
    assert n_quantised == 2 * 7, n_quantised
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **settings))
    randomise(peft_model, seed)
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = "base"
    config["target_modules"] = sorted(config["target_modules"])
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    ids, mask, pos = inputs(model.config.vocab_size)
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.float().contiguous()},
              os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": "llama_qlora", "base": "peft/llama_qlora/base", "seed": seed, "settings": settings,
                   "quantization": "bitsandbytes nf4 with double quantisation (every dense layer "
                                   "of the blocks), dequantised; fp32 matmuls",
                   "peft": __import__("peft").__version__,
                   "bitsandbytes": __import__("bitsandbytes").__version__,
                   "torch": torch.__version__}, f, indent=1)
    print("llama_qlora: adapter over the 4-bit base and its logits")


def virtual_token_case(case, base, peft_config, seed, randomise_scale=None, extra=None):
    """A prompt-learning adapter (prompt, P- or prefix tuning) on a fixture: saved with
    save_pretrained, the logits of the rows without left padding (PEFT drops position ids for
    these methods, so positions count padding there; temper counts real tokens, as everywhere)
    after the virtual positions, and the gradient of the trained input embeddings."""
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, base))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config)
    encoder = peft_model.prompt_encoder["default"]
    emb = encoder.embedding.weight
    if randomise_scale is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            emb.copy_(torch.randn(emb.shape, generator=g) * randomise_scale)
    out = os.path.join(ROOT, "peft", case)
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = f"../../{base}"
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    ids, mask, _ = inputs(model.config.vocab_size)
    ids, mask = ids[:2].contiguous(), mask[:2].contiguous()
    n_out = 0 if config["peft_type"] == "PREFIX_TUNING" else config["num_virtual_tokens"]
    logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, n_out:]
    lm_loss(logits, ids, mask).backward()
    golden = {"input_ids": ids, "attention_mask": mask, "logits": logits.detach().contiguous(),
              "grad.prompt_embeddings": emb.grad.detach().clone().contiguous()}
    golden.update((extra or (lambda e: {}))(encoder))
    save_file(golden, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": case, "base": base, "seed": seed, "peft_type": config["peft_type"],
                   "num_virtual_tokens": config["num_virtual_tokens"],
                   "peft": __import__("peft").__version__, "torch": torch.__version__}, f,
                  indent=1)
    print(f"{case}: {config['peft_type']} with {config['num_virtual_tokens']} virtual tokens")


def make_prompt(case, base, n_virtual, seed):
    from peft import PromptTuningConfig

    virtual_token_case(case, base, PromptTuningConfig(task_type="CAUSAL_LM",
                                                      num_virtual_tokens=n_virtual),
                       seed, randomise_scale=0.1)


def make_prefix(case, base, n_virtual, seed):
    """P-tuning v2 layout: the prefix learned directly; on Llama, grouped-query attention sizes
    it by the key/value heads."""
    from peft import PrefixTuningConfig

    virtual_token_case(case, base, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                      num_virtual_tokens=n_virtual),
                       seed, randomise_scale=0.5)


def make_ptuning(case, base, n_virtual, encoder, seed):
    """The saved adapter holds the encoder's output; golden.safetensors also holds the
    encoder's own tensors (`encoder.<name>`), so temper's encoder is checked too."""
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual,
                                 encoder_hidden_size=16, encoder_reparameterization_type=encoder)
    virtual_token_case(case, base, config, seed, extra=lambda enc: {
        f"encoder.{name}": t.detach().clone().contiguous()
        for name, t in enc.state_dict().items()})


def make_bottleneck(case, base, reduction, drop_layers, activation, seed):
    """Bottleneck adapters (no PEFT type exists): written here in temper's documented format and
    applied to the transformers model with forward hooks on each block's attention and MLP,
    y + up(act(down(y))), so the golden comes from PyTorch/transformers, not from temper."""
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, base)).eval()
    d = model.config.hidden_size
    k = max(d // reduction, 1)
    blocks = model.transformer.h if base.startswith("gpt2") else model.model.layers
    prefix = "transformer.h" if base.startswith("gpt2") else "model.layers"
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}[activation]
    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def adapter(name):
        t = {f"{name}.down.weight": torch.randn(k, d, generator=g) * 0.2,
             f"{name}.down.bias": torch.randn(k, generator=g) * 0.1,
             f"{name}.up.weight": torch.randn(d, k, generator=g) * 0.2,
             f"{name}.up.bias": torch.randn(d, generator=g) * 0.1}
        tensors.update(t)

        def apply(y):
            h = act(y @ t[f"{name}.down.weight"].T + t[f"{name}.down.bias"])
            return y + h @ t[f"{name}.up.weight"].T + t[f"{name}.up.bias"]
        return apply

    for i, block in enumerate(blocks):
        if i < drop_layers:
            continue
        attn_mod = block.attn if base.startswith("gpt2") else block.self_attn
        after_attn = adapter(f"base_model.model.{prefix}.{i}.attn_adapter")
        after_mlp = adapter(f"base_model.model.{prefix}.{i}.mlp_adapter")
        attn_mod.register_forward_hook(lambda m, a, out, f=after_attn: (f(out[0]),) + tuple(out[1:]))
        block.mlp.register_forward_hook(lambda m, a, out, f=after_mlp: f(out))
    out = os.path.join(ROOT, "peft", case)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    save_file({n: t.contiguous() for n, t in tensors.items()},
              os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "TEMPER_BOTTLENECK", "task_type": "CAUSAL_LM",
                   "base_model_name_or_path": f"../../{base}", "reduction": reduction,
                   "bottleneck_size": k, "activation": activation, "drop_layers": drop_layers,
                   "placement": ["attn", "mlp"]}, f, indent=2)
    ids, mask, pos = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
              os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"case": case, "base": base, "seed": seed, "reduction": reduction,
                   "drop_layers": drop_layers, "activation": activation,
                   "torch": torch.__version__}, f, indent=1)
    print(f"{case}: bottleneck {k}, adapters from block {drop_layers}")


if __name__ == "__main__":
    for i, (case, (base, settings)) in enumerate(CASES.items()):
        make(case, base, settings, 100 + i)
    make_pissa("gpt2_pissa", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), 700)
    make_pissa("llama_pissa", "llama", dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                            use_rslora=True), 701)
    make_adalora("gpt2_adalora", "gpt2", dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=2, lora_alpha=8,
                                              target_modules=["c_attn", "c_fc"]), 8, 800)
    # Without the regulariser the allocation here leaves q_proj with no rank at all.
    make_adalora("llama_adalora", "llama", dict(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, lora_alpha=6,
                                                orth_reg_weight=0.0, target_modules=["q_proj", "v_proj", "up_proj"]),
                 6, 801)
    make_nf4()
    make_qlora()
    make_prompt("gpt2_prompt", "gpt2", 4, 300)
    make_prompt("llama_prompt", "llama", 3, 301)
    make_prefix("gpt2_prefix", "gpt2", 4, 400)
    make_prefix("llama_prefix", "llama", 3, 401)
    make_ptuning("gpt2_ptuning", "gpt2", 4, "MLP", 500)
    make_ptuning("llama_ptuning_lstm", "llama", 3, "LSTM", 501)
    make_bottleneck("gpt2_adapter", "gpt2", 4, 0, "relu", 600)
    make_bottleneck("llama_adapter_drop", "llama", 8, 1, "silu", 601)
