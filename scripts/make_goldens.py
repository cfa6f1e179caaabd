#!/usr/bin/env python3
"""Parity goldens for temper-core, made with the reference implementation (transformers).

For each family (GPT-2, Llama) this builds a tiny random model (2 layers, vocab ~100), saves it
with `save_pretrained` under tests/fixtures/<family>/, and writes golden.safetensors beside it:

  input_ids, attention_mask  (3, 12) int64: row 0 unpadded, row 1 right-padded, row 2 left-padded
  position_ids               (3, 12) int64: cumsum(mask) - 1, clamped at 0 (temper's convention)
  logits                     (3, 12, V)    model(input_ids, attention_mask, position_ids).logits
  logprobs                   (3, 11)       log_softmax(logits[:, :-1]).gather(input_ids[:, 1:])
  loss                       ()            CE of shifted logits, labels -100 where mask[t] or mask[t-1] == 0
  adamw_losses               (4,)          loss before and after each of 3 torch.optim.AdamW steps
  greedy_prompt_ids/_mask    (2, 6)        left-padded prompts
  greedy_tokens              (2, 16)       model.generate(do_sample=False, max_new_tokens=16)

golden.json records the settings and the reference calls. Rerun with the project venv:
  .venv/bin/python scripts/make_goldens.py
The tests read these files without Python.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def tiny(family):
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def inputs(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ids = ids * mask  # pad id 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


def lm_loss(logits, ids, mask):
    # A target counts when it and the token predicting it are real: the first real token of a
    # left-padded row is predicted from padding, which carries no information.
    target_ok = mask.clone()
    target_ok[:, 1:] *= mask[:, :-1]
    labels = ids.masked_fill(target_ok == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def adamw_groups(model):
    # temper's rule: decay tensors of rank >= 2 (matrices, embeddings), never biases or norms.
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": ADAMW["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make(family, seed):
    torch.manual_seed(seed)
    model = tiny(family).eval()
    out_dir = os.path.join(ROOT, family)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids, mask, pos = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = lm_loss(logits, ids, mask)

    prompt = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 14, 15, 92, 65, 35]])
    prompt_mask = (torch.arange(6)[None] >= torch.tensor([[2], [0]])).long()
    with torch.no_grad():
        greedy = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=16,
                                min_new_tokens=16, do_sample=False, pad_token_id=0)[:, 6:]

    train = tiny(family)
    train.load_state_dict(model.state_dict())
    train.train()  # dropout is 0, so train mode computes the same function
    opt = torch.optim.AdamW(adamw_groups(train), lr=ADAMW["lr"], betas=ADAMW["betas"],
                            eps=ADAMW["eps"])
    losses = []
    for step in range(4):
        step_loss = lm_loss(train(input_ids=ids, attention_mask=mask, position_ids=pos).logits, ids, mask)
        losses.append(step_loss.item())
        if step == 3:
            break
        opt.zero_grad()
        step_loss.backward()
        opt.step()

    save_file({
        "input_ids": ids, "attention_mask": mask, "position_ids": pos,
        "logits": logits.contiguous(), "logprobs": logprobs.contiguous(), "loss": loss,
        "adamw_losses": torch.tensor(losses),
        "greedy_prompt_ids": prompt, "greedy_prompt_mask": prompt_mask,
        "greedy_tokens": greedy.contiguous(),
    }, os.path.join(out_dir, "golden.safetensors"))
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump({
            "family": family, "seed": seed,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "adamw": {**ADAMW, "betas": list(ADAMW["betas"]),
                      "groups": "weight_decay on params with dim >= 2, 0 on the rest"},
            "reference_calls": {
                "logits": "model(input_ids, attention_mask, position_ids).logits",
                "loss": "cross_entropy(logits[:, :-1], input_ids[:, 1:] with -100 where mask[t] == 0 or mask[t-1] == 0)",
                "adamw_losses": "torch.optim.AdamW(groups, lr, betas, eps); loss before each of 3 steps and after the last",
                "greedy_tokens": "model.generate(prompt, attention_mask, max_new_tokens=16, do_sample=False)",
            },
        }, f, indent=1)
    print(f"{family}: loss {loss.item():.6f}, adamw losses {[round(l, 6) for l in losses]}")


if __name__ == "__main__":
    make("gpt2", 1234)
    make("llama", 4321)
    sys.exit(0)
