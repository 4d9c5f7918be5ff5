"""Compare two recordings of record_runs.sh (before and after a change): every log.jsonl record with its timing keys
dropped, every metrics / captions / submission JSON, every scores .npz, and the weights and optimizer state of
checkpoint_last.pth and checkpoint_best.pth, bitwise.

    python results/one_trainer_2026-12-02/compare_runs.py BEFORE_DIR AFTER_DIR
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import torch

RUNS = ("retrieval", "clip", "caption", "cir")
TIMING = ("time", "_per_s")


def clean(record: dict) -> dict:
    """A record without timing keys and without paths (the two recordings live in different folders)."""
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING) and k not in ("from", "checkpoint")}


def compare_logs(a_dir: str, b_dir: str, run: str) -> bool:
    before = [clean(json.loads(line)) for line in open(f"{a_dir}/{run}/log.jsonl")]
    after = [clean(json.loads(line)) for line in open(f"{b_dir}/{run}/log.jsonl")]
    if before == after:
        print(f"{run}: log.jsonl identical ({len(before)} records, timing keys dropped)")
        return True
    print(f"{run}: log.jsonl differs ({len(before)} records before, {len(after)} after)")
    a_lines, b_lines = ([json.dumps(r, sort_keys=True) for r in records] for records in (before, after))
    for line in a_lines:
        if line not in b_lines:
            print("  only before:", line)
    for line in b_lines:
        if line not in a_lines:
            print("  only after: ", line)
    return False


def compare_files(a_dir: str, b_dir: str, run: str) -> bool:
    same = True
    for path in sorted(glob.glob(f"{a_dir}/{run}/**/*.json", recursive=True)):
        rel = os.path.relpath(path, a_dir)
        before = json.load(open(path))
        after = json.loads(open(os.path.join(b_dir, rel)).read().replace(b_dir, a_dir))
        if isinstance(before, dict):
            before, after = clean(before), clean(after)
        print(f"  {rel}: {'identical' if before == after else 'DIFFERS'}")
        same &= before == after
    for path in sorted(glob.glob(f"{a_dir}/{run}/**/*.npz", recursive=True)):
        rel = os.path.relpath(path, a_dir)
        before, after = np.load(path), np.load(os.path.join(b_dir, rel))
        equal = set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
        print(f"  {rel}: {'bitwise identical' if equal else 'DIFFERS'} ({', '.join(sorted(before))})")
        same &= equal
    for name in ("checkpoint_last.pth", "checkpoint_best.pth"):
        a = torch.load(f"{a_dir}/{run}/{name}", weights_only=True, map_location="cpu")
        b = torch.load(f"{b_dir}/{run}/{name}", weights_only=True, map_location="cpu")
        equal = a["model"].keys() == b["model"].keys() and all(
            torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
        )
        if "optimizer" in a:
            state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
            equal &= all(torch.equal(state_a[i][n], state_b[i][n]) for i in state_a for n in state_a[i])
        verdict = "bitwise identical" if equal else "DIFFERS"
        print(
            f"  {run}/{name}: weights{' + optimizer' if 'optimizer' in a else ''} {verdict} ({len(a['model'])} tensors)"
        )
        print(f"    format {a.get('format')} -> {b.get('format')}")
        same &= equal
    return same


def main() -> None:
    a_dir, b_dir = sys.argv[1], sys.argv[2]
    logs_same, files_same = True, True
    for run in RUNS:
        logs_same &= compare_logs(a_dir, b_dir, run)
        files_same &= compare_files(a_dir, b_dir, run)
    print("outputs and weights:", "ALL IDENTICAL" if files_same else "DIFFERENCES FOUND")
    print("logs:", "ALL IDENTICAL" if logs_same else "DIFFERENCES FOUND (listed above)")


if __name__ == "__main__":
    main()
