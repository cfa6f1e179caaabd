#!/usr/bin/env python3
"""Checks a fine-tuned checkpoint of a model temper did not make, from transformers' side.

Usage: check_hf_chat.py CHECKPOINT_DIR CASE_JSON
CASE_JSON holds `messages` (a conversation ending in a user turn), `end_of_turn` (the token
that ends a reply) and what temper computed: `prompt_ids` (its rendering for generation) and
`tokens` (its greedy reply, stopped after end_of_turn). Exits 0 when
  - AutoTokenizer.apply_chat_template(messages, add_generation_prompt=True) gives prompt_ids,
  - AutoModelForCausalLM loads every tensor (no missing or unexpected keys) — or, for a PEFT
    adapter folder, peft.PeftModel loads it over the base its temper_adapter.json names — and
  - greedy generate (stopping at end_of_turn and at generation_config.json's eos ids, as temper
    does) gives the same tokens.
"""
import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(path, case_path):
    case = json.load(open(case_path))
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True)
    if prompt != case["prompt_ids"]:
        print(f"apply_chat_template gives {prompt}\n temper rendered {case['prompt_ids']}")
        return 1
    adapter = os.path.join(path, "temper_adapter.json")
    if os.path.exists(adapter):
        # A PEFT adapter: the base it points at, then the adapter over it.
        base = os.path.join(path, json.load(open(adapter))["base"])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            print(f"transformers reported loading problems: {problems}")
            return 1
    end = tok.convert_tokens_to_ids(case["end_of_turn"])
    # Stop where temper stops: the turn's end and every eos id of generation_config.json.
    listed = model.generation_config.eos_token_id
    stops = sorted({end, *(listed if isinstance(listed, list) else [listed] if listed is not None else [])})
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(case["tokens"]) or 1,
                                    do_sample=False, eos_token_id=stops, pad_token_id=end)
    reply = out[0, len(prompt):].tolist()
    first_stop = next((i for i, t in enumerate(reply) if t in stops), None)
    if first_stop is not None:
        reply = reply[:first_stop + 1]
    print(f"{type(model).__name__}: greedy reply {reply}; temper {case['tokens']}")
    return 0 if reply == case["tokens"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
