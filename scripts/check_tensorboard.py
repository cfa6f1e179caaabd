#!/usr/bin/env python3
"""Reads a stage folder's TensorBoard files with TensorBoard's own reader and checks they hold
every number of its metrics.jsonl, and nothing else.

Usage: check_tensorboard.py STAGE_DIR [STAGE_DIR...]
For every row of STAGE_DIR/metrics.jsonl and every numeric field, the scalar `<split>/<field>`
at that step must exist in STAGE_DIR/tb with the value (as float32). Exits 0 when all match.
"""
import json
import math
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def check(stage_dir):
    acc = EventAccumulator(os.path.join(stage_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    checked = 0
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            for k, v in row.items():
                if k in ("step", "split", "time_s") or not isinstance(v, (int, float)):
                    continue
                tag = f"{row['split']}/{k}"
                got = scalars.get(tag, {}).get(row["step"])
                if got is None:
                    print(f"{stage_dir}: {tag} at step {row['step']} missing from tb/")
                    return None
                if not math.isclose(got, v, rel_tol=1e-6, abs_tol=1e-6 * max(1.0, abs(v))):
                    print(f"{stage_dir}: {tag} at step {row['step']}: tb {got} vs metrics {v}")
                    return None
                checked += 1
    # Nothing more: a resumed run's event file holds no rows of the steps it lost.
    total = sum(len(v) for v in scalars.values())
    if total != checked:
        print(f"{stage_dir}: tb/ holds {total} values, metrics.jsonl {checked}")
        return None
    return checked


def main(dirs):
    for d in dirs:
        n = check(d)
        if n is None:
            return 1
        print(f"{d}: {n} values of metrics.jsonl found in tb/")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
