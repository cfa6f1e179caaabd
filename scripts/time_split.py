"""Where PPO's or GRPO's iterations spent their time, per branch of a sweep.

Reads `temper metrics FILE --split train --json` on stdin and prints, for every stage branch
with the seed taken out of its name (so `ppo@precision=fp32,seed=1..3` form one group), the
mean seconds per iteration of each `time/*` metric, as mean ± sample std over the group's seeds
(each seed's own mean over its iterations first).

    temper metrics configs/precision.yaml --split train --json | python3 scripts/time_split.py
"""

import json
import re
import statistics
import sys
from collections import defaultdict


def group_of(stage: str) -> str:
    """The branch name without its seed: `ppo@precision=bf16,seed=2` -> `ppo@precision=bf16`."""
    name = re.sub(r"(?<=[@,])seed=[^,]*,?", "", stage)
    return name.rstrip(",@")


def main() -> None:
    per_stage = defaultdict(lambda: defaultdict(list))  # stage -> metric -> values
    for line in sys.stdin:
        if not line.strip():
            continue
        row = json.loads(line)
        for key, value in row["metrics"].items():
            if key.startswith("time/") and isinstance(value, (int, float)):
                per_stage[row["stage"]][key].append(value)
    if not per_stage:
        sys.exit("no time/* metrics on stdin: pipe `temper metrics FILE --split train --json` in")
    groups = defaultdict(lambda: defaultdict(list))  # group -> metric -> per-seed means
    for stage, metrics in per_stage.items():
        for key, values in metrics.items():
            groups[group_of(stage)][key].append(statistics.mean(values))
    keys = sorted({k for metrics in groups.values() for k in metrics})
    print(f"{'branch':<32}" + "".join(f"{k:>22}" for k in keys) + f"{'total':>22}")
    for group in sorted(groups):
        cells, seeds = [], 0
        for key in keys:
            means = groups[group].get(key, [])
            seeds = max(seeds, len(means))
            spread = statistics.stdev(means) if len(means) > 1 else 0.0
            cells.append(f"{statistics.mean(means):.3f} ± {spread:.3f}" if means else "-")
        totals = [sum(v) for v in zip(*(groups[group][k] for k in keys))]
        spread = statistics.stdev(totals) if len(totals) > 1 else 0.0
        cells.append(f"{statistics.mean(totals):.3f} ± {spread:.3f}")
        print(f"{group + f' (n={seeds})':<32}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
