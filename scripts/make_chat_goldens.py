#!/usr/bin/env python3
"""Chat-template goldens: what transformers' `apply_chat_template` gives, for temper to match.

For each template below this writes tests/fixtures/chat/<name>/ with a tokenizer saved by
transformers (`PreTrainedTokenizerFast.save_pretrained`: tokenizer.json, tokenizer_config.json,
special_tokens_map.json and, for some, chat_template.jinja) and golden.json holding, per
conversation:

  ids            apply_chat_template(conversation, tokenize=True)
  prompt_ids     apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True)
  assistant_mask apply_chat_template(..., return_assistant_tokens_mask=True)["assistant_masks"]
                 (templates with {% generation %} blocks only)
  replies        the text each assistant turn should train on: the reply as the template writes
                 it and the token that ends the turn (for templates without generation blocks)

Templates (written here, in the style of the models that ship them, no download):
  temper   temper's own, as every temper checkpoint carries it (stages/../datasets/src/chat.rs)
  chatml   Qwen2.5-style ChatML with a default system prompt, in tokenizer_config.json
  llama3   Llama 3.1-style headers, bos_token, trimmed content, raise_exception on bad roles,
           in chat_template.jinja
  mistral  [INST] turns with the eos_token after each reply, strict alternation

The tokenizer is the checked-in fixture BPE (tests/fixtures/tokenizer/gpt2_style.json) with each
template's special tokens added. Rerun with the project venv:
  .venv/bin/python scripts/make_chat_goldens.py
"""
import json
import os
import shutil

import transformers
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
BASE = os.path.join(ROOT, "tokenizer", "gpt2_style.json")

TEMPER = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' }}{% if message['role'] == 'assistant' %}"
          "{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}{% else %}"
          "{{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

CHATML = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

TEMPLATES = {
    # name: (template, special tokens to add, tokenizer kwargs, where the template lives,
    #        whether it trims content, end-of-turn token)
    "temper": (TEMPER, ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"], dict(eos_token="<|endoftext|>", pad_token="<|pad|>"), "config", False,
               "<|endoftext|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], dict(eos_token="<|im_end|>", pad_token="<|pad|>"),
               "config", False, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "jinja", True, "<|eot_id|>"),
    "mistral": (MISTRAL, ["<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>"), "jinja", False, "</s>"),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Review the film in one line."},
     {"role": "assistant", "content": "A quiet delight, warmly acted."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "  Another, please \n"},
     {"role": "assistant", "content": " Green — café au lait, even. "}],
]


def make(name):
    template, added, kwargs, where, trims, end = TEMPLATES[name]
    out = os.path.join(ROOT, "chat", name)
    shutil.rmtree(out, ignore_errors=True)
    base = Tokenizer.from_file(BASE)
    base.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added
                             if base.token_to_id(t) is None])
    tok = PreTrainedTokenizerFast(tokenizer_object=base, **kwargs)
    tok.chat_template = template
    tok.save_pretrained(out)
    config_path = os.path.join(out, "tokenizer_config.json")
    jinja_path = os.path.join(out, "chat_template.jinja")
    with open(config_path) as f:
        config = json.load(f)
    # Put the template where this fixture is meant to test reading it from.
    if where == "config":
        config["chat_template"] = template
        if os.path.exists(jinja_path):
            os.remove(jinja_path)
    else:
        config.pop("chat_template", None)
        with open(jinja_path, "w") as f:
            f.write(template)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    assert tok.chat_template == template

    cases = []
    for conv in CONVERSATIONS:
        if name == "mistral" and conv[0]["role"] == "system":
            continue
        case = {
            "messages": conv,
            "ids": tok.apply_chat_template(conv, tokenize=True),
            "prompt_ids": tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True),
            "replies": [(m["content"].strip() if trims else m["content"]) + end
                        for m in conv if m["role"] == "assistant"],
        }
        if "{% generation %}" in template:
            d = tok.apply_chat_template(conv, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
            assert d["input_ids"] == case["ids"]
            case["assistant_mask"] = d["assistant_masks"]
        cases.append(case)
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"template": name, "end_of_turn": end, "transformers": transformers.__version__,
                   "reference_calls": {
                       "ids": "tokenizer.apply_chat_template(messages, tokenize=True)",
                       "prompt_ids": "tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)",
                       "assistant_mask": "apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)"},
                   "cases": cases}, f, indent=1, ensure_ascii=False)
    print(f"chat/{name}: {len(cases)} conversations, {sum(len(c['ids']) for c in cases)} tokens")


if __name__ == "__main__":
    for name in TEMPLATES:
        make(name)
