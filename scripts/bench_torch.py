#!/usr/bin/env python3
"""The PyTorch side of scripts/bench.sh: the same GPT-2-style model as temper-bench (pre-norm
blocks, fused qkv, scaled_dot_product_attention, GELU-tanh MLP, tied head), trained eagerly
(and with torch.compile where it works) with AdamW on one fixed batch; and Hugging Face
`generate` with sampling at the same batch, prompt length and new tokens. Warm-up excluded,
median of repeats. Prints one JSON object.

Usage: bench_torch.py L d h V T B steps warmup repeats device precision gen_B gen_prompt gen_new
"""
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

L, d, h, V, T, B, steps, warmup, repeats = (int(x) for x in sys.argv[1:10])
device, precision = sys.argv[10], sys.argv[11]
gen_b, gen_prompt, gen_new = (int(x) for x in sys.argv[12:15])
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
bf16 = precision == "bf16"
torch.backends.cuda.matmul.allow_tf32 = True


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def train(compiled):
    torch.manual_seed(0)
    model = GPT().to(device)
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=fused)
    f = torch.compile(model) if compiled else model
    x = torch.randint(0, V, (B, T), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = f(x)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(B * T * steps / (time.perf_counter() - t))
    return statistics.median(rates)


out = {"device": device, "precision": precision, "threads": torch.get_num_threads(), "torch": torch.__version__}
out["eager_tok_per_s"] = train(False)
try:
    out["compiled_tok_per_s"] = train(True)
except Exception as e:  # no C++ compiler or an unsupported backend: report, do not fail
    out["compiled_error"] = str(e).splitlines()[0][:200]

def decode_gemm_floor():
    """Tokens/s if a decode step cost only its matrix multiplies (the four per layer and the
    vocabulary projection, at the generation batch), with nothing else: attention, sampling,
    layer norms and dispatch all free. No implementation on this machine can beat it."""
    dt = torch.bfloat16 if bf16 else torch.float32
    mk = lambda *s: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    x, hid = mk(gen_b, d), mk(gen_b, 4 * d)
    layers = [(mk(d, 3 * d), mk(3 * d), mk(d, d), mk(d), mk(d, 4 * d), mk(4 * d), mk(4 * d, d), mk(d)) for _ in range(L)]
    emb = mk(V, d)

    def step():
        for a, ab, p, pb, f, fb, o, ob in layers:
            torch.addmm(ab, x, a), torch.addmm(pb, x, p), torch.addmm(fb, x, f), torch.addmm(ob, hid, o)
        x @ emb.T

    with torch.no_grad():
        for _ in range(20):
            step()
        rates = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            for _ in range(gen_new):
                step()
            sync()
            rates.append(gen_b * gen_new / (time.perf_counter() - t))
    return statistics.median(rates)


out["decode_gemm_floor_tok_per_s"] = decode_gemm_floor()

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=max(T, gen_prompt + gen_new), n_embd=d, n_layer=L, n_head=h)).to(device).eval()
if bf16:
    hf = hf.to(torch.bfloat16)
prompt = torch.randint(1, V, (gen_b, gen_prompt), device=device)
rates = []
with torch.no_grad():
    hf.generate(prompt, max_new_tokens=4, do_sample=True, pad_token_id=0)
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        hf.generate(prompt, max_new_tokens=gen_new, min_new_tokens=gen_new, do_sample=True, pad_token_id=0)
        sync()
        rates.append(gen_b * gen_new / (time.perf_counter() - t))
out["hf_generate_tok_per_s"] = statistics.median(rates)
print(json.dumps(out))
