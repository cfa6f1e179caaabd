#!/usr/bin/env python3
"""Small, learnable, synthetic fixtures for the stage and pipeline tests (tests/fixtures/tiny/).
Plain Python, deterministic: rerun with `python3 scripts/make_tiny_fixtures.py`.

- corpus.txt        300 documents from a small grammar (strong word-order structure, so a
                    model's loss falls far below the unigram entropy), blank-line separated
- sft.jsonl / sft_eval.jsonl        alpaca rows: "What does the cat like?" -> "The cat likes the ball."
                                    (a fixed subject -> object map the model can learn)
- pairs.jsonl / pairs_eval.jsonl    preference pairs: for "Describe the weather." the reply with
                                    pleasant words is chosen over the one with gloomy words
- prompts.jsonl / prompts_eval.jsonl    prompts for PPO and evaluation
"""
import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tiny")
rng = random.Random(1234)

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the old man", "a child"]
VERBS = ["sees", "likes", "finds", "follows", "watches"]
OBJECTS = ["the ball", "a tree", "the river", "the red house", "a small boat"]
ENDINGS = ["today.", "at night.", "in the park.", "again."]
LIKES = dict(zip(SUBJECTS, ["the ball", "a tree", "the river", "the red house", "a small boat", "the ball"]))
GOOD = ["sunny", "warm", "lovely", "bright", "calm", "pleasant"]
BAD = ["rainy", "cold", "grim", "dark", "stormy", "bleak"]
ASK = ["Describe the weather.", "How is the weather today?", "Tell me about the weather."]


def sentence():
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
    return s[0].upper() + s[1:]


def sft_row():
    subj = rng.choice(SUBJECTS)
    q = rng.choice(["What does {} like?", "Tell me what {} likes.", "Which thing does {} like?"]).format(subj)
    a = f"{subj[0].upper() + subj[1:]} likes {LIKES[subj]}."
    return {"instruction": q, "output": a}


def weather(words):
    a, b = rng.sample(words, 2)
    return rng.choice(["It is {} and {} today.", "The day is {} and {}.", "A {} and {} morning."]).format(a, b)


def pair_row():
    return {"prompt": rng.choice(ASK), "chosen": weather(GOOD), "rejected": weather(BAD)}


def write_jsonl(name, rows):
    with open(os.path.join(OUT, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "corpus.txt"), "w") as f:
    f.write("\n\n".join(" ".join(sentence() for _ in range(rng.randint(5, 10))) for _ in range(300)) + "\n")
write_jsonl("sft.jsonl", [sft_row() for _ in range(240)])
write_jsonl("sft_eval.jsonl", [sft_row() for _ in range(24)])
write_jsonl("pairs.jsonl", [pair_row() for _ in range(240)])
write_jsonl("pairs_eval.jsonl", [pair_row() for _ in range(60)])
write_jsonl("prompts.jsonl", [{"prompt": rng.choice(ASK)} for _ in range(64)])
write_jsonl("prompts_eval.jsonl", [{"prompt": q} for q in ASK for _ in range(4)])
print("wrote", OUT)
