"""Rebuild the bundled forgetting-benchmark subsets in `evals/data/` (stdlib only).

Usage: python evals/data/build_subsets.py [--source ../shared/data/benchmarks] [--rows 500]

Selection (deterministic, documented in evals/data/README.md): for each benchmark split, the row
indices 0..n-1 are shuffled with `random.Random("stepwise:<benchmark>:<split>")` and the first
`--rows` of that permutation are written in permutation order, each row gaining `source_index`
(its 0-based line in the upstream file). So the first N rows of a bundled file are a uniform random
N-subset of the full split, and `forgetting.subset_size: N` reads exactly those. MMLU's dev split
(few-shot exemplars, 285 rows) is copied whole, in upstream order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent.parent / "shared" / "data" / "benchmarks"

# benchmark -> (split file, subsample?)
SPLITS: dict[str, list[tuple[str, bool]]] = {
    "mmlu": [("test.jsonl", True), ("dev.jsonl", False)],
    "arc_easy": [("test.jsonl", True)],
    "arc_challenge": [("test.jsonl", True)],
    "hellaswag": [("validation.jsonl", True)],
    "gsm8k": [("test.jsonl", True)],
    "truthfulqa_mc": [("validation.jsonl", True)],
}


def select(rows: list[str], benchmark: str, split: str, n: int) -> list[tuple[int, str]]:
    order = list(range(len(rows)))
    random.Random(f"stepwise:{benchmark}:{split}").shuffle(order)
    return [(i, rows[i]) for i in order[:n]]


def build(source: Path, n_rows: int) -> None:
    for bench, splits in SPLITS.items():
        src_dir, out_dir = source / bench, HERE / bench
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / "LICENSE", out_dir / "LICENSE")
        shutil.copyfile(src_dir / "SOURCE.md", out_dir / "UPSTREAM_SOURCE.md")
        table = []
        for fname, subsample in splits:
            lines = [ln for ln in (src_dir / fname).read_text(encoding="utf-8").split("\n") if ln.strip()]
            split = fname.removesuffix(".jsonl")
            picked = select(lines, bench, split, n_rows) if subsample else list(enumerate(lines))
            out = out_dir / fname
            with out.open("w", encoding="utf-8") as fh:
                for idx, line in picked:
                    row = json.loads(line)
                    row["source_index"] = row.get("source_index", idx) if bench == "hellaswag" else idx
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            how = f"seeded shuffle `stepwise:{bench}:{split}`, first {len(picked)}" if subsample else "all rows"
            table.append(f"| `{fname}` | {len(picked)} of {len(lines)} | {how} | `{digest}` |")
        print(bench, *table, sep="\n  ")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--rows", type=int, default=500)
    args = ap.parse_args()
    build(args.source, args.rows)
