#!/usr/bin/env python3
"""A GPT-2 style tokenizer.json made by Hugging Face's own `tokenizers` library (byte-level BPE,
GPT-2's pre-tokenizer and `<|endoftext|>`), so temper's tests prove they load a file temper
did not write. Small vocabulary (300) to keep the fixture tiny.
Rerun: .venv/bin/python scripts/make_tokenizer_fixture.py"""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "A film that is funny, moving and sharp; the best of the year.",
] * 20

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(CORPUS, trainer)
os.makedirs(OUT, exist_ok=True)
tok.save(os.path.join(OUT, "gpt2_style.json"))
enc = tok.encode("The best film of the year.")
print(len(enc.ids), enc.ids)
