#!/usr/bin/env python3
"""Loads an adapter temper saved with the `peft` package and checks it computes what temper did.

Usage: check_peft_load.py ADAPTER_DIR LOGITS_FILE
ADAPTER_DIR holds temper's adapter_config.json (LoRA, DoRA, prompt, P- or prefix tuning), adapter_model.safetensors and temper_adapter.json
(whose `base` names the base checkpoint folder, relative to ADAPTER_DIR). LOGITS_FILE holds
input_ids, attention_mask and what temper computed with the adapter: `logits` for a causal LM,
`scores` (one per row, at the last real token) for a sequence-classification adapter.
Exits 0 when peft.PeftModel.from_pretrained(base, ADAPTER_DIR) loads every adapter tensor and
its outputs on real tokens match temper's within 1e-4; non-zero otherwise.
"""
import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


def main(adapter_dir, logits_file):
    with open(os.path.join(adapter_dir, "temper_adapter.json")) as f:
        base_dir = os.path.join(adapter_dir, json.load(f)["base"])
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    seq_cls = config["task_type"] == "SEQ_CLS"
    virtual = config["peft_type"] in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
    # Prompt and P-tuning's virtual tokens come back as outputs (prefix tuning's do not).
    n_out = config["num_virtual_tokens"] if config["peft_type"] in ("PROMPT_TUNING", "P_TUNING") else 0
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    base = cls.from_pretrained(base_dir, **({"num_labels": 1} if seq_cls else {}))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ref = load_file(logits_file)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        if virtual:
            # PEFT's prompt and prefix tuning ignore position ids (positions then count
            # padding, where temper counts real tokens): compare the rows without left padding
            # (and, for prompt tuning, the outputs after the virtual tokens).
            out = model(input_ids=ids, attention_mask=mask).logits[:, n_out:]
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    if seq_cls:
        diff = (out[:, 0] - ref["scores"]).abs().max().item()
    else:
        real = mask.bool()
        if virtual:
            real &= mask[:, :1].bool()
        diff = (out[real] - ref["logits"][real]).abs().max().item()
    kind = "scores" if seq_cls else "logits"
    print(f"PeftModel over {type(base).__name__}: max |{kind} - temper| = {diff:.3e}")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
