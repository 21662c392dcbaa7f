"""The learning curves of a `stepwise experiment` directory as a markdown table (for BENCHMARKS.md).

Usage:
    stepwise experiment examples/support-tickets/recipe.experiment.yaml --dir /tmp/bench-exp \
        --cpu --max-steps 12 --offline --points 3,7,0,4,2,6,1,5 --parallel 2
    python benchmarks/bench_experiment_grid.py /tmp/bench-exp

One row per data fraction: each target's metric with its bootstrap 95% CI, the paired difference
(first target minus second, same test items) with its CI, and the verdict stepwise's report states
("better" only when that CI excludes 0). Reads what the experiment wrote; runs nothing.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from stepwise.experiment_report import _pct, collect, paired, verdict
from stepwise.layout import ExperimentLayout


def main(root: str) -> None:
    data = collect(ExperimentLayout(Path(root)))
    done = [p for p in data["points"] if p.get("metric")]
    by: dict[float, dict[str, dict]] = defaultdict(dict)
    for p in done:
        by[p["values"]["data_fraction"]][p["values"]["target"]] = p
    targets = sorted({p["values"]["target"] for p in done}, reverse=True)  # multitask before label_only
    print("| fraction | train rows | " + " | ".join(f"{t} accuracy [95% CI]" for t in targets)
          + " | paired difference | verdict | train s (" + ", ".join(targets) + ") |")
    print("|---" * (4 + len(targets)) + "|---|")
    for f in sorted(by):
        row = by[f]
        cells = [_pct(row[t]["metric"]) if t in row else "-" for t in targets]
        rows = next((row[t]["train_rows"] for t in targets if t in row), None)
        diff, text = "-", "-"
        if len(targets) == 2 and all(t in row for t in targets):
            d = paired(row[targets[1]], row[targets[0]])
            if d and d.get("delta") is not None:
                lo, hi = d["delta_ci"]
                diff = f"{100 * d['delta']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            text = verdict(targets[1], targets[0], d)
        secs = ", ".join(f"{row[t]['train_wall_s']:.0f}" if t in row and row[t]["train_wall_s"] else "-"
                         for t in targets)
        print(f"| {f:g} | {rows} | " + " | ".join(cells) + f" | {diff} | {text} | {secs} |")
    missing = [p["id"] for p in data["points"] if not p.get("metric")]
    if missing:
        print(f"\nnot measured (yet): {', '.join(missing)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/support-tickets-experiment/experiment")
