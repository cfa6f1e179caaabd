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
  grad.<parameter>           each parameter's gradient of `loss` before any step (llm.c's check)

Beside them:
  tests/fixtures/<family>_rm/   a tiny *ForSequenceClassification (one label) with golden scores
                                of the same three rows: the reward-model head as transformers reads it
  tests/fixtures/sampling/      logits with transformers' Temperature/TopK/TopP logits processors
                                applied: what temper's sampler keeps
  tests/fixtures/preference/    the DPO family's losses and gradients on fixed log-probs, from TRL's
                                code (ORPO and SimPO call TRL's own loss methods; DPO, IPO, hinge and KTO
                                are TRL's loss branches restated, since TRL computes them inside its
                                training step), and a DPO loss on the tiny GPT-2's real forward
  tests/fixtures/grpo/          GRPO's advantages (every scale_rewards, RLOO's baseline) and clipped loss
                                with its gradient (every loss_type, token and sequence ratios,
                                clip-higher, k3 KL), as TRL's GRPOTrainer computes them
  tests/fixtures/vader/         real movie-review snippets and tweets with the compound score of the
                                vaderSentiment package itself, and the part of its lexicon they use

The Llama-layout families (qwen2, qwen3, mistral, llama3: see FAMILY_CONFIGS) get the same
golden as llama, and qwen2 a reward-model one.

golden.json records the settings and the reference calls. Rerun with the project venv, after
scripts/fetch_data.sh (the VADER golden reads the fetched snippets):
  .venv/bin/python scripts/make_goldens.py [NAME ...]   # no NAME: all of them
The tests read these files without Python.
"""
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification,
                          Qwen3Config, Qwen3ForCausalLM)
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# The Llama-layout families, each with the switch that sets it apart, small enough that the
# golden inputs (12 tokens, greedy decoding to 22) exercise it: Qwen2's q/k/v biases, Qwen3's
# per-head q/k norms with head_dim != hidden/heads, Mistral's sliding window (5 tokens), and
# Llama 3.1's rope scaling (original context 32, so frequencies fall in all three bands) with
# Llama's attention and MLP biases and tied embeddings.
FAMILY_CONFIGS = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, dict(head_dim=16, attention_bias=False)),
    "mistral": (MistralConfig, dict(sliding_window=5, head_dim=8)),
    "llama3": (LlamaConfig, dict(num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                 mlp_bias=True, tie_word_embeddings=True,
                                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0,
                                                   original_max_position_embeddings=32))),
}
CAUSAL_LM = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
             "qwen3": Qwen3ForCausalLM, "mistral": MistralForCausalLM, "llama3": LlamaForCausalLM}


def tiny_config(family, **extra):
    if family == "gpt2":
        return GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                          bos_token_id=None, eos_token_id=None, pad_token_id=0, **extra)
    cls, own = FAMILY_CONFIGS[family]
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return cls(**{**base, **own, **extra})


def tiny(family):
    return CAUSAL_LM[family](tiny_config(family))


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
    grads = {}
    for step in range(4):
        step_loss = lm_loss(train(input_ids=ids, attention_mask=mask, position_ids=pos).logits, ids, mask)
        losses.append(step_loss.item())
        if step == 3:
            break
        opt.zero_grad()
        step_loss.backward()
        if step == 0:
            grads = {f"grad.{n}": p.grad.detach().clone().contiguous()
                     for n, p in train.named_parameters()}
        opt.step()

    save_file({
        "input_ids": ids, "attention_mask": mask, "position_ids": pos,
        "logits": logits.contiguous(), "logprobs": logprobs.contiguous(), "loss": loss,
        "adamw_losses": torch.tensor(losses),
        "greedy_prompt_ids": prompt, "greedy_prompt_mask": prompt_mask,
        "greedy_tokens": greedy.contiguous(),
        **grads,
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
                "grad.*": "p.grad of `loss` for every named parameter, before the first AdamW step",
            },
        }, f, indent=1)
    print(f"{family}: loss {loss.item():.6f}, adamw losses {[round(l, 6) for l in losses]}")


def make_reward_model(family, seed):
    """A tiny *ForSequenceClassification with one label, and its scores of the three golden rows
    (unpadded, right-padded, left-padded): transformers reads the score at the last non-pad
    token, as temper's `last_token` pooling does."""
    torch.manual_seed(seed)
    cls = {"gpt2": GPT2ForSequenceClassification, "llama": LlamaForSequenceClassification,
           "qwen2": Qwen2ForSequenceClassification}[family]
    model = cls(tiny_config(family, num_labels=1)).eval()
    out_dir = os.path.join(ROOT, f"{family}_rm")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids, mask, pos = inputs(model.config.vocab_size)
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
    save_file({"input_ids": ids, "attention_mask": mask, "scores": scores.contiguous()},
              os.path.join(out_dir, "golden.safetensors"))
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump({"family": family, "seed": seed, "reference_calls": {
            "scores": f"{cls.__name__}(num_labels=1)(input_ids, attention_mask, position_ids).logits[:, 0]"}},
            f, indent=1)
    print(f"{family}_rm: scores {[round(x, 5) for x in scores.tolist()]}")


def make_sampling():
    """What temper's sampler keeps of a distribution: transformers' own logits processors."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 50, generator=g) * 3
    temperature = 0.7
    scaled = TemperatureLogitsWarper(temperature)(None, logits.clone())
    top_k = TopKLogitsWarper(top_k=5)(None, scaled.clone())
    top_p = TopPLogitsWarper(top_p=0.8)(None, scaled.clone())
    both = TopPLogitsWarper(top_p=0.8)(None, TopKLogitsWarper(top_k=10)(None, scaled.clone()))
    out_dir = os.path.join(ROOT, "sampling")
    os.makedirs(out_dir, exist_ok=True)
    save_file({"logits": logits, "top_k_5": top_k, "top_p_0.8": top_p, "top_k_10_top_p_0.8": both},
              os.path.join(out_dir, "golden.safetensors"))
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump({"temperature": temperature, "reference_calls": {
            "top_k_5": "TopKLogitsWarper(5)(TemperatureLogitsWarper(0.7)(logits))",
            "top_p_0.8": "TopPLogitsWarper(0.8)(TemperatureLogitsWarper(0.7)(logits))",
            "top_k_10_top_p_0.8": "TopPLogitsWarper(0.8)(TopKLogitsWarper(10)(TemperatureLogitsWarper(0.7)(logits)))"}},
            f, indent=1)
    print("sampling: kept per row", (top_p > float("-inf")).sum(-1).tolist())


def make_preference():
    """The preference losses against TRL 1.16 on fixed completion log-probs (4 pairs)."""
    import types
    import torch.nn.functional as F
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    g = torch.Generator().manual_seed(5)
    lens_c = torch.tensor([5.0, 9.0, 3.0, 7.0])
    lens_r = torch.tensor([6.0, 4.0, 8.0, 7.0])
    pc0 = -(torch.rand(4, generator=g) * 2 + 0.5) * lens_c
    pr0 = -(torch.rand(4, generator=g) * 2 + 0.5) * lens_r
    rc = pc0 + torch.randn(4, generator=g) * 0.5
    rr = pr0 + torch.randn(4, generator=g) * 0.5
    beta, eps, gamma, wd, wu = 0.2, 0.1, 0.5, 1.0, 1.5
    fake = types.SimpleNamespace(beta=beta, label_smoothing=eps, alpha=0.0, loss_type="simpo",
                                 simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))
    out = {"policy_chosen": pc0, "policy_rejected": pr0, "reference_chosen": rc,
           "reference_rejected": rr, "chosen_len": lens_c, "rejected_len": lens_r}

    def record(name, fn):
        pc = pc0.clone().requires_grad_(True)
        pr = pr0.clone().requires_grad_(True)
        loss = fn(pc, pr)
        loss.backward()
        out[f"{name}.loss"] = loss.detach().reshape(())
        out[f"{name}.grad_chosen"] = pc.grad
        out[f"{name}.grad_rejected"] = pr.grad

    def delta(pc, pr):
        return (pc - rc) - (pr - rr)

    # trl/trainer/dpo_trainer.py, _compute_loss, loss_type "sigmoid" / "hinge" / "ipo".
    record("sigmoid", lambda pc, pr: (-F.logsigmoid(beta * delta(pc, pr))).mean())
    # Conservative DPO: the label-smoothed sigmoid of TRL's CPO "sigmoid" branch.
    record("cdpo", lambda pc, pr: (-F.logsigmoid(beta * delta(pc, pr)) * (1 - eps)
                                   - F.logsigmoid(-beta * delta(pc, pr)) * eps).mean())
    record("hinge", lambda pc, pr: torch.relu(1 - beta * delta(pc, pr)).mean())
    record("ipo", lambda pc, pr: (((pc - rc) / lens_c - (pr - rr) / lens_r) - 1 / (2 * beta)).pow(2).mean())
    # SimPO: TRL's own CPOTrainer.cpo_loss (loss_type "simpo") on per-token averages.
    fake.label_smoothing = 0.0
    record("simpo", lambda pc, pr: CPOTrainer.cpo_loss(fake, pc / lens_c, pr / lens_r)[0].mean())
    # ORPO: TRL's own ORPOTrainer.odds_ratio_loss on averages; the NLL is the chosen tokens' mean.
    record("orpo", lambda pc, pr: -pc.sum() / lens_c.sum()
           - ORPOTrainer.odds_ratio_loss(fake, pc / lens_c, pr / lens_r)[0].mean())
    # KTO: trl/trainer/kto_trainer.py, _compute_loss: chosen = the pair's chosen replies as
    # desirable examples, rejected as undesirable, z0 from mismatched log-ratios (given here).
    mismatched = torch.tensor([0.3, -0.1, 0.4, 0.2])
    out["kto_mismatched_logratios"] = mismatched
    kl = mismatched.mean().clamp(min=0)
    record("kto", lambda pc, pr: torch.cat((
        wd * (1 - torch.sigmoid(beta * ((pc - rc) - kl))),
        wu * (1 - torch.sigmoid(beta * (kl - (pr - rr)))))).mean())

    # DPO on the tiny GPT-2's real forward: the fixture as policy, a perturbed copy as reference.
    torch.manual_seed(17)
    policy = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "gpt2")).eval()
    reference = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "gpt2")).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref_dir = os.path.join(ROOT, "preference", "reference")
    os.makedirs(ref_dir, exist_ok=True)
    reference.save_pretrained(ref_dir, safe_serialization=True)
    ids = torch.randint(1, 101, (4, 10), generator=g)  # rows 0-1 chosen, 2-3 rejected
    completion = torch.zeros(4, 10, dtype=torch.long)
    completion[:, 4:] = 1  # prompt = the first 4 tokens
    ids[2:, :4] = ids[:2, :4]  # the same prompts for both sides

    def completion_logps(model):
        logits = model(input_ids=ids).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * completion[:, 1:]).sum(1)

    with torch.no_grad():
        lp, rlp = completion_logps(policy), completion_logps(reference)
    d = (lp[:2] - rlp[:2]) - (lp[2:] - rlp[2:])
    out.update({"forward.ids": ids, "forward.completion_mask": completion, "forward.policy_logps": lp,
                "forward.reference_logps": rlp, "forward.sigmoid_loss": (-F.logsigmoid(beta * d)).mean()})
    out_dir = os.path.join(ROOT, "preference")
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "golden.safetensors"))
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump({"beta": beta, "label_smoothing": eps, "simpo_gamma": gamma, "desirable_weight": wd,
                   "undesirable_weight": wu, "trl": __import__("trl").__version__, "reference_calls": {
                       "sigmoid/hinge/ipo": "trl/trainer/dpo_trainer.py DPOTrainer._compute_loss branches",
                       "cdpo": "trl/experimental/cpo/cpo_trainer.py CPOTrainer.cpo_loss 'sigmoid' (label smoothing)",
                       "simpo": "CPOTrainer.cpo_loss(loss_type='simpo') called on per-token averages",
                       "orpo": "ORPOTrainer.odds_ratio_loss called on averages; NLL = chosen tokens' mean",
                       "kto": "trl/trainer/kto_trainer.py KTOTrainer._compute_loss, loss_type 'kto'",
                       "forward.sigmoid_loss": "DPO on GPT2LMHeadModel completion log-probs (fixture vs reference/)"}},
                  f, indent=1)
    print("preference: losses", {k: round(v.item(), 5) for k, v in out.items() if k.endswith(".loss")})


def make_vader():
    """Real movie-review snippets and tweets (every 35th and 40th line of the fetched files, ASCII
    only) with vaderSentiment's own compound score, VADER's documented tricky sentences, and the
    lexicon entries those texts use (a derived fixture; the full lexicon is fetched, not kept)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    raw = os.path.join(os.environ.get("TEMPER_CACHE", os.path.expanduser("~/.cache/temper")), "raw",
                       "vader", "hutto_ICWSM_2014")
    texts = []
    for name, every in [("movieReviewSnippets_GroundTruth.txt", 35), ("tweets_GroundTruth.txt", 40)]:
        with open(os.path.join(raw, name), encoding="utf-8", errors="replace") as f:
            lines = f.read().replace("\r\n", "\n").split("\n")
        for line in lines[::every]:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip() and parts[2].isascii():
                texts.append(parts[2].strip())
    texts += ["VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
              "The book was only kind of good.", "At least it isn't a horrible book.",
              "The plot was good, but the characters are uncompelling and the dialog is not great.",
              "Sentiment analysis has never been this good!", "Without a doubt, excellent idea.",
              "Roger Dodger is one of the least compelling variations on this theme.",
              "On the other hand, VADER is quite bad ass", "No, it is not good, nor fun at all??",
              "Not bad at all", "It was kind of a mess, but the acting is the bomb!"]
    analyzer = SentimentIntensityAnalyzer()
    used = {w.lower() for t in texts for w in t.split()} | {w.lower().strip(".,!?;:\"'()") for t in texts for w in t.split()}
    lexicon = {w: v for w, v in analyzer.lexicon.items() if w in used}
    out_dir = os.path.join(ROOT, "vader")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lexicon.txt"), "w") as f:
        for w in sorted(lexicon):
            f.write(f"{w}\t{lexicon[w]}\n")
    with open(os.path.join(out_dir, "golden.jsonl"), "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "compound": analyzer.polarity_scores(t)["compound"]}) + "\n")
    print(f"vader: {len(texts)} texts, {len(lexicon)} lexicon entries")


def make_grpo():
    """GRPO's advantages and clipped loss on fixed log-probs, as TRL 1.16's GRPOTrainer computes
    them (`_generate_and_score_completions` for the advantages with TRL's own `nanstd`;
    `_compute_loss` for the loss, restated from its source since it runs inside the training
    step): every scale_rewards, every loss_type of the clipped family, token and sequence
    importance ratios, clip-higher and the k3 KL term."""
    from trl.trainer.utils import nanstd
    g = torch.Generator().manual_seed(11)
    G, P, N = 4, 3, 6
    B = G * P
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25, 0.7, 0.7, 0.7, 0.7])
    lengths = torch.tensor([6, 4, 5, 1, 6, 3, 2, 6, 5, 4, 6, 3])
    mask = (torch.arange(N)[None] < lengths[:, None]).float()
    logp = torch.randn(B, N, generator=g) * 0.5 - 2.0
    old = logp + torch.randn(B, N, generator=g) * 0.15
    ref = logp + torch.randn(B, N, generator=g) * 0.2
    out = {"rewards": rewards, "mask": mask, "logp": logp, "old_logp": old, "ref_logp": ref}
    mean_grouped = rewards.view(-1, G).mean(dim=1).repeat_interleave(G, dim=0)
    for scale in ["group", "batch", "none"]:
        advantages = rewards - mean_grouped
        if scale == "group":
            std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        elif scale == "batch":
            std = nanstd(rewards).expand_as(rewards)
        if scale != "none":
            advantages = advantages / (std + 1e-4)
        out[f"advantages.{scale}"] = advantages
    settings = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=N)
    advantages = out["advantages.group"][:, None]
    for level in ["token", "sequence"]:
        for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
            lp = logp.clone().requires_grad_(True)
            log_ratio = lp - old
            if level == "token":
                w = log_ratio
            else:
                w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            coef_1 = torch.exp(w)
            per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
            coef_2 = torch.clamp(coef_1, 1 - settings["epsilon_low"], 1 + settings["epsilon_high"])
            per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
            per_token_loss = per_token_loss + settings["beta"] * per_token_kl
            if loss_type == "grpo":
                loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
            elif loss_type == "bnpo":
                loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
            elif loss_type == "dr_grpo":
                loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * N)
            else:  # dapo: num_items_in_batch, the generation batch's completion tokens
                loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
            loss.backward()
            out[f"{level}.{loss_type}.loss"] = loss.detach()
            out[f"{level}.{loss_type}.grad"] = lp.grad.detach().clone()
    # RLOO's leave-one-out baseline (TRL's RLOOTrainer: (G r - sum) / (G - 1)).
    grouped = rewards.view(-1, G)
    out["advantages.rloo"] = ((grouped * G - grouped.sum(1, keepdim=True)) / (G - 1)).view(-1)
    d = os.path.join(ROOT, "grpo")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "golden.safetensors"))
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump({"num_generations": G, **settings, "trl": __import__("trl").__version__,
                   "reference": "trl/trainer/grpo_trainer.py: _generate_and_score_completions "
                                "(advantages) and _compute_loss (loss), restated; nanstd imported"},
                  f, indent=1)
    print(f"grpo: {len([k for k in out if k.endswith('.loss')])} losses")


def make_sharded():
    """The Llama fixture as the Hub ships big models: bf16 tensors in shards listed by
    model.safetensors.index.json (transformers' own save_pretrained), with the logits of the
    bf16 weights computed in fp32, which temper must reproduce after loading."""
    src = os.path.join(ROOT, "llama")
    out = os.path.join(ROOT, "llama_sharded_bf16")
    shutil.rmtree(out, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="40KB")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, pos = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
              os.path.join(out, "golden.safetensors"))
    shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
    print(f"llama_sharded_bf16: {len(shards)} bf16 shards")


def make_own_model(name):
    """A model temper did not make, as the Hub ships one: a tiny random Qwen2 (tied embeddings,
    bf16, sharded, ChatML template) or Llama 3.1 (rope scaling, Llama 3 headers), built by
    transformers with the tokenizer and template of tests/fixtures/chat/<chatml|llama3>/ and a
    generation_config.json. tests/own_model.rs fine-tunes it with temper-sft and checks the
    result in transformers."""
    family, chat = {"qwen2_chatml": ("qwen2", "chatml"), "llama3_chat": ("llama3", "llama3")}[name]
    tok_dir = os.path.join(ROOT, "chat", chat)
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    end = json.load(open(os.path.join(tok_dir, "golden.json")))["end_of_turn"]
    extra = dict(vocab_size=len(tok), eos_token_id=tok.convert_tokens_to_ids(end), max_position_embeddings=256,
                 pad_token_id=tok.pad_token_id)
    if family == "qwen2":
        extra["tie_word_embeddings"] = True
    else:
        extra["bos_token_id"] = tok.bos_token_id
    torch.manual_seed(11)
    model = CAUSAL_LM[family](tiny_config(family, **extra))
    if family == "qwen2":
        # As Qwen ships it: generation stops at the turn's end or the document's end.
        model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(end),
                                                tok.convert_tokens_to_ids("<|endoftext|>")]
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, max_shard_size="20KB")
    else:
        model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{name}: {family} with the {chat} template, vocab {len(tok)}, "
          f"{len([f for f in os.listdir(out) if f.endswith('.safetensors')])} weight file(s)")


GOLDENS = {
    "gpt2": lambda: make("gpt2", 1234),
    "llama": lambda: make("llama", 4321),
    "qwen2": lambda: make("qwen2", 2002),
    "qwen3": lambda: make("qwen3", 3003),
    "mistral": lambda: make("mistral", 4004),
    "llama3": lambda: make("llama3", 5005),
    "gpt2_rm": lambda: make_reward_model("gpt2", 99),
    "llama_rm": lambda: make_reward_model("llama", 98),
    "qwen2_rm": lambda: make_reward_model("qwen2", 97),
    "sampling": make_sampling,
    "preference": make_preference,
    "grpo": make_grpo,
    "vader": make_vader,
    "llama_sharded_bf16": make_sharded,
    # After scripts/make_chat_goldens.py, whose tokenizers these use.
    "qwen2_chatml": lambda: make_own_model("qwen2_chatml"),
    "llama3_chat": lambda: make_own_model("llama3_chat"),
}

if __name__ == "__main__":
    # No argument: every golden. Names (fixture folders) remake just those.
    names = sys.argv[1:] or list(GOLDENS)
    unknown = [n for n in names if n not in GOLDENS]
    if unknown:
        sys.exit(f"unknown golden {unknown}; choose from {list(GOLDENS)}")
    for name in names:
        GOLDENS[name]()
    sys.exit(0)
