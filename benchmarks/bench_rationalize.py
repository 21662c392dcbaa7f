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

`--only drop` / `--only rationalize` runs one variant (the table uses the latest run of each that
exists); `--until curate` stops both after curation (training rows and rationalization outcomes only).
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


def run_variant(recipe: Path, max_steps: int, until: str) -> tuple[int, float]:
    t0 = time.time()
    rc = subprocess.call([str(STEPWISE), "run", str(recipe), "--new-run", "--cpu", "--max-steps", str(max_steps),
                          "--until", until, "--no-progress"], cwd=REPO)
    return rc, time.time() - t0


def summarize(run: Path) -> dict:
    """Curation (always) and eval (when it ran) of one run."""
    funnel = json.loads((run / "curate" / "funnel.json").read_text(encoding="utf-8"))
    out = {"run": str(run), "train_rows": funnel["kept"]["train"], "val_rows": funnel["kept"]["val"],
           "removed": funnel.get("removed_by_reason"), "rationalize": funnel.get("rationalize"),
           "rationale_sources": (funnel.get("rationale_sources") or {}).get("train")}
    task = run / "eval" / "task.json"
    if task.exists():
        report = json.loads(task.read_text(encoding="utf-8"))
        out["metrics"] = {k: report["metrics"][k] for k in ("accuracy", "invalid_rate")}
        out["predictions"] = [json.loads(x) for x in (run / "eval" / "task_predictions.jsonl").read_text(
            encoding="utf-8").splitlines()]
    return out


def _ci(m: dict) -> str:
    lo, hi = m.get("ci") or [None, None]
    return f"{100 * m['value']:.1f}%" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else "")


def table(rows: dict[str, dict]) -> str:
    """Markdown, one column per variant; the paired differences (rationalize - drop) over the same
    test ids from stepwise.evals.stats.paired_diff (bootstrap CI, McNemar's exact p)."""
    from stepwise.evals.stats import paired_diff

    names = [m for m in VARIANTS if m in rows]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def add(label: str, fn) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(rows[m]) for m in names) + " |")

    add("training rows (val)", lambda r: f"{r['train_rows']} ({r['val_rows']})")
    add("train rationale sources", lambda r: ", ".join(f"{k} {v}" for k, v in (r["rationale_sources"] or {}).items()))
    add("gold mismatches rationalized", lambda r: "-" if not r["rationalize"] else
        f"{r['rationalize']['requested']} asked, kept {sum(r['rationalize']['in_splits'].values())}; "
        + ", ".join(f"{k} {v}" for k, v in r["rationalize"]["outcomes"].items()))
    if all("metrics" in rows[m] for m in names):
        add("student accuracy [95% CI]", lambda r: _ci(r["metrics"]["accuracy"]))
        add("invalid answers [95% CI]", lambda r: _ci(r["metrics"]["invalid_rate"]))
        if len(names) == 2:
            a, b = ({p["id"]: p for p in rows[m]["predictions"] if p.get("gold") is not None} for m in names)
            ids = sorted(set(a) & set(b), key=str)
            for label, score in (("accuracy", lambda p: float(p["correct"])),
                                 ("invalid", lambda p: float(p["pred"] is None))):
                d = paired_diff([score(a[i]) for i in ids], [score(b[i]) for i in ids], n_boot=2000, seed=0)
                lo, hi = d["delta_ci"]
                p = d.get("mcnemar_p", d["p_value"])
                lines.append(f"| Δ {label}, {names[1]} - {names[0]} (paired, n={d['n']}) | "
                             f"{100 * d['delta']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}], p={p:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "examples" / "support-tickets" / "recipe.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--only", choices=VARIANTS)
    ap.add_argument("--until", default="eval", choices=("curate", "eval"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in VARIANTS:
        recipe = variant_recipe(args.recipe.resolve(), args.out.resolve(), mode)
        if args.only and args.only != mode:
            continue
        rc, wall = run_variant(recipe, args.max_steps, args.until)
        print(f"{mode}: exit {rc} in {wall:.0f}s", flush=True)
    runs = {m: latest_run(args.out, m) for m in VARIANTS}
    rows = {m: summarize(r) for m, r in runs.items() if r is not None and (r / "curate" / "funnel.json").exists()}
    print(table(rows))


if __name__ == "__main__":
    main()
