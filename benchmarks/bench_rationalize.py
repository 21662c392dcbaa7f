"""Gold-mismatch rows: `curation.on_gold_mismatch: drop` vs `rationalize`, side by side (issue 16).

The same recipe (examples/support-tickets by default), the same seeds and training steps, run
twice through `stepwise run --cpu --max-steps N`, differing only in `curation.on_gold_mismatch`.
Both use the example's recorded teacher cache (`teacher.cache`), so the rationalization requests
the `rationalize` run makes are recorded there and later runs replay them offline. The forgetting
eval is turned off in both variants (it measures nothing this comparison needs and costs minutes
on CPU); everything else is the example's recipe.

Printed: training rows and their rationale sources, the student's accuracy and invalid rate on the
test items with bootstrap CIs, and the paired difference (`stepwise compare`: paired bootstrap
and McNemar's exact test over the same test ids).

    nice -n 5 .venv/bin/python benchmarks/bench_rationalize.py --out /tmp/bench-rat --max-steps 40

`--only drop` / `--only rationalize` runs one variant (re-using the other's run dir if present).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STEPWISE = Path(sys.executable).parent / "stepwise"
VARIANTS = ("drop", "rationalize")


def variant_recipe(src: Path, out: Path, mode: str) -> Path:
    """The example's recipe with absolute paths (so it runs from `out`), one on_gold_mismatch."""
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    base = src.parent

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    d = data["data"]
    d["inputs"] = [absolute(p) for p in d["inputs"]] if isinstance(d["inputs"], list) else absolute(d["inputs"])
    if d.get("test_file"):
        d["test_file"] = absolute(d["test_file"])
    if isinstance(data["task"].get("classes"), str):
        data["task"]["classes"] = absolute(data["task"]["classes"])
    if data["teacher"].get("cache"):
        data["teacher"]["cache"] = absolute(data["teacher"]["cache"])
    data.setdefault("curation", {})["on_gold_mismatch"] = mode
    data.setdefault("eval", {}).setdefault("forgetting", {})["benchmarks"] = []
    data["runs_dir"] = str(out / mode)
    path = out / f"recipe-{mode}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def latest_run(out: Path, mode: str) -> Path | None:
    runs = sorted((out / mode).glob("*/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None


def run_variant(recipe: Path, max_steps: int) -> tuple[int, float]:
    t0 = time.time()
    rc = subprocess.call([str(STEPWISE), "run", str(recipe), "--new-run", "--cpu", "--max-steps", str(max_steps),
                          "--until", "eval", "--no-progress"], cwd=REPO)
    return rc, time.time() - t0


def summarize(run: Path) -> dict:
    funnel = json.loads((run / "curate" / "funnel.json").read_text(encoding="utf-8"))
    task = json.loads((run / "eval" / "task.json").read_text(encoding="utf-8"))
    sources: dict[str, int] = {}
    for line in (run / "export" / "train.lineage.jsonl").read_text(encoding="utf-8").splitlines():
        lin = json.loads(line)
        if lin.get("kind") in ("rationale", "cot"):
            key = lin.get("rationale_source") or "none"
            sources[key] = sources.get(key, 0) + 1
    student = task.get("student") or task
    return {"run": str(run), "train_rows": funnel["kept"]["train"], "val_rows": funnel["kept"]["val"],
            "removed": funnel.get("removed_by_reason"), "rationale_sources": sources,
            "rationalize": funnel.get("rationalize"), "headline": student.get("headline") or task.get("headline")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "examples" / "support-tickets" / "recipe.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--only", choices=VARIANTS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in VARIANTS:
        recipe = variant_recipe(args.recipe.resolve(), args.out.resolve(), mode)
        if args.only and args.only != mode:
            continue
        rc, wall = run_variant(recipe, args.max_steps)
        print(f"{mode}: exit {rc} in {wall:.0f}s", flush=True)
    runs = {m: latest_run(args.out, m) for m in VARIANTS}
    rows = {m: summarize(r) for m, r in runs.items() if r is not None and (r / "eval" / "task.json").exists()}
    print(json.dumps(rows, indent=2))
    if len(rows) == 2:
        subprocess.call([str(STEPWISE), "compare", str(runs["drop"]), str(runs["rationalize"]),
                         "--out", str(args.out)], cwd=REPO)


if __name__ == "__main__":
    main()
