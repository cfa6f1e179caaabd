#!/usr/bin/env python3
"""Loads a checkpoint temper saved with transformers and checks it computes what temper did.

Usage: check_hf_load.py CHECKPOINT_DIR
CHECKPOINT_DIR holds model.safetensors + config.json (temper's save_checkpoint) and
temper_logits.safetensors with input_ids, attention_mask and the logits temper computed.
Exits 0 when AutoModelForCausalLM.from_pretrained loads every tensor (no missing or unexpected
keys) and its logits on real tokens match temper's within 1e-4; non-zero otherwise.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        print(f"transformers reported loading problems: {problems}")
        return 1
    ref = load_file(f"{path}/temper_logits.safetensors")
    ids, mask = ref["input_ids"], ref["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    diff = (logits[real] - ref["logits"][real]).abs().max().item()
    print(f"{type(model).__name__}: max |logits - temper| on real tokens = {diff:.3e}")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
