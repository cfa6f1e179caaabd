"""What the independent judge (VADER) makes of the demo's human-written data, as the reference
for issue 13's judge targets. Two numbers per instruction polarity:

- pairs: how often VADER prefers the chosen snippet of a held-out reward-model pair
  (rm_eval.parquet) — the judge's own accuracy on the task the reward model is scored on
  (a tie counts one half);
- replies: the eval stage's "judge agreement" (compound >= 0.05 for a positive instruction,
  <= -0.05 for a negative one) of the human replies of the held-out SFT set (sft_eval.parquet)
  — what a policy writing exactly like the reviewers would score.

    .venv/bin/python scripts/judge_reference.py [data/demo]

Uses the vaderSentiment package, the reference implementation that temper's judge matches
(tests/parity: worst |compound difference| 5e-5).
"""
import collections
import sys

import pyarrow.parquet as pq
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

data = sys.argv[1] if len(sys.argv) > 1 else "data/demo"
judge = SentimentIntensityAnalyzer()
compound = lambda text: judge.polarity_scores(text)["compound"]  # noqa: E731

pairs = collections.defaultdict(list)
for row in pq.read_table(f"{data}/rm_eval.parquet").to_pylist():
    sign = 1.0 if row["sentiment"] == "positive" else -1.0
    d = sign * (compound(row["chosen"]) - compound(row["rejected"]))
    pairs[row["sentiment"]].append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)

replies = collections.defaultdict(list)
for row in pq.read_table(f"{data}/sft_eval.parquet").to_pylist():
    reply = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
    c = compound(reply)
    wanted = row["sentiment"]
    replies[wanted].append(c >= 0.05 if wanted == "positive" else c <= -0.05)

mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
print(f"VADER on the demo's human-written held-out data ({data})")
print(f"{'':34} {'all':>6} {'positive':>9} {'negative':>9}")
for name, table in [("pair accuracy (rm_eval)", pairs), ("reply agreement (sft_eval)", replies)]:
    every = [x for xs in table.values() for x in xs]
    n = len(every)
    print(f"{name + f', n={n}':34} {mean(every):6.3f} {mean(table['positive']):9.3f} "
          f"{mean(table['negative']):9.3f}")
