"""`stepwise compare runs/a runs/b ...`: runs side by side, like the DSS paper's tables.

Per run: task metrics with 95% CIs, forgetting change per benchmark and the gate, trainable
parameters, peak memory and wall time (from the manifest's train/eval stages), plus a paired
comparison of each run against the first on the same test items (bootstrap CI of the difference,
McNemar p), and each run's student vs teacher (teacher score, cost per 1k requests of both, break-even;
from eval/student_vs_teacher.json, stepwise.evals.teacher_compare). `compare_figure`/`compare_svg` give the chart the HTML report embeds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import yaml
from stepwise.evals.stats import paired_diff
from stepwise.evals.stats import pct_ci as _pct_ci

from stepwise.io import atomic_write_json, atomic_write_text, read_jsonl
from stepwise.layout import RunLayout


def _load_json(p: Path) -> dict[str, Any] | None:
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _find_number(d: dict[str, Any] | None, *needles: str) -> float | None:
    """First numeric value whose key contains all needles (searching nested dicts)."""
    if not isinstance(d, dict):
        return None
    for k, v in d.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and all(n in k.lower() for n in needles):
            return float(v)
    for v in d.values():
        if isinstance(v, dict):
            found = _find_number(v, *needles)
            if found is not None:
                return found
    return None


def load_run(path: Path) -> dict[str, Any]:
    path = Path(path)
    eval_dir = path / "eval" if (path / "eval").is_dir() else path
    task = _load_json(eval_dir / "task.json")
    forgetting = _load_json(eval_dir / "forgetting.json")
    if task is None and forgetting is None:
        raise FileNotFoundError(f"{path}: no eval/task.json or eval/forgetting.json; run `stepwise eval` first")
    run_root = eval_dir.parent
    manifest = _load_json(run_root / "manifest.json") or {}
    recipe_path = run_root / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.exists() else {}
    preds_path = eval_dir / "task_predictions.jsonl"
    items_path = eval_dir / "forgetting_items.jsonl"
    return {
        "path": str(run_root), "task": task, "forgetting": forgetting, "manifest": manifest,
        "student_vs_teacher": _load_json(RunLayout(run_root).student_vs_teacher),
        "recipe": recipe or {}, "predictions": read_jsonl(preds_path) if preds_path.exists() else [],
        "forgetting_items": read_jsonl(items_path) if items_path.exists() else [],
    }


def _train_dir(model_info: dict[str, Any]) -> Path | None:
    p = model_info.get("path")
    if not p:
        return None
    d = Path(p)
    return d.parent if d.name == "merged" else d


def _axolotl_facts(train_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(resolved axolotl.yaml, summary.json) that `stepwise train` leaves in the model's dir."""
    if train_dir is None:
        return {}, {}
    cfg_path, summary_path = train_dir / "axolotl.yaml", train_dir / "summary.json"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    summary = _load_json(summary_path) or {}
    return cfg if isinstance(cfg, dict) else {}, summary


def describe(run: dict[str, Any]) -> dict[str, Any]:
    """The facts of one run the table shows."""
    stages = run["manifest"].get("stages", {})
    train, ev = stages.get("train") or {}, stages.get("eval") or {}
    model_info = (run["task"] or run["forgetting"] or {}).get("model_info") or ev.get("model") or {}
    training = (run["recipe"].get("training") or {}) if isinstance(run["recipe"], dict) else {}
    teacher = (run["recipe"].get("teacher") or {}) if isinstance(run["recipe"], dict) else {}
    axo, summary = _axolotl_facts(_train_dir(model_info))
    if summary.get("backend") == "trl":  # stepwise.training.trl_backend: lora / ia3 / prefix_tuning / prompt_tuning
        modality = summary.get("modality")
    elif axo:
        modality = axo.get("adapter") or "full"
        if modality == "lora" and (axo.get("load_in_4bit") or model_info.get("quantized")):
            modality = "qlora"
    elif model_info.get("peft_type"):
        modality = "lora"
    else:
        modality = training.get("modality") or ("full" if model_info.get("kind") == "hf" else None)
    params = model_info.get("parameters") or {}
    peak = _peak_mb(summary) or _peak_mb(train)
    return {
        "run": Path(run["path"]).name,
        "model": model_info.get("label"),
        "modality": modality,
        "lora_r": axo.get("lora_r") or summary.get("lora_r") or model_info.get("r") or training.get("lora_r"),
        "learning_rate": axo.get("learning_rate") or summary.get("learning_rate") or training.get("learning_rate"),
        "dss_output": (run["task"] or {}).get("dss_output") or training.get("dss_output"),
        "teacher_format": teacher.get("format"),
        "trainable_params": _find_number(summary, "trainable") or _find_number(train, "trainable")
        or params.get("trainable"),
        "total_params": params.get("total"),
        "peak_memory_mb": peak,
        "train_wall_s": summary.get("wall_s") or train.get("wall_s"),
        "eval_wall_s": ev.get("wall_s"),
    }


def _peak_mb(d: dict[str, Any]) -> float | None:
    """Peak memory in MB from a summary/manifest dict; 0 (CPU runs report no device memory) is None."""
    mb = _find_number(d, "peak", "mb")
    if mb is None:
        gib = (_find_number(d, "max_allocated") or _find_number(d, "peak", "gb") or _find_number(d, "peak", "gib")
               or _find_number(d, "max_active"))
        mb = gib * 1024 if gib is not None else _find_number(d, "peak")
    return mb or None


def _paired_task(first: dict[str, Any], other: dict[str, Any], key: str, n_boot: int = 1000) -> dict[str, Any] | None:
    a = {r["id"]: r.get(key) for r in first["predictions"] if r.get(key) is not None}
    b = {r["id"]: r.get(key) for r in other["predictions"] if r.get(key) is not None}
    common = sorted(set(a) & set(b), key=str)
    if not common:
        return None
    return paired_diff([a[i] for i in common], [b[i] for i in common], n_boot=n_boot)


def _paired_forgetting(first: dict[str, Any], other: dict[str, Any], n_boot: int = 1000) -> dict[str, Any]:
    """Per benchmark: the two students' "after" scores on the same questions."""
    def by_bench(run: dict[str, Any]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for row in run["forgetting_items"]:
            out.setdefault(row["benchmark"], []).append(float(row["after"]))
        return out

    a, b = by_bench(first), by_bench(other)
    return {name: paired_diff(a[name], b[name], n_boot=n_boot) for name in a if name in b and len(a[name]) == len(b[name])}


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run directories, with an experiment directory (`stepwise experiment`: experiment.json) standing
    for its points' sub-runs that have eval results, in the grid's order."""
    out: list[Path] = []
    for p in map(Path, paths):
        plan = _load_json(p / "experiment.json")
        if plan is None:
            out.append(p)
            continue
        points = [p / e["run"] for e in plan.get("points", [])]
        found = [d for d in points if (d / "eval" / "task.json").exists() or (d / "eval" / "forgetting.json").exists()]
        if not found:
            raise FileNotFoundError(f"{p}: an experiment with no evaluated point yet; run `stepwise experiment` first")
        out += found
    return out


def compare_runs(paths: list[Path]) -> dict[str, Any]:
    runs = [load_run(p) for p in expand_runs(paths)]
    benchmarks: list[str] = []
    for r in runs:
        for b in ((r["forgetting"] or {}).get("benchmarks") or {}):
            if b not in benchmarks:
                benchmarks.append(b)
    task_type = next((r["task"]["task_type"] for r in runs if r["task"]), None)
    main = "accuracy" if task_type == "classification" else "exact_match"
    second = "macro_f1" if task_type == "classification" else "partial_f1"
    item_key = "correct" if task_type == "classification" else "exact_match"
    entries = []
    for i, r in enumerate(runs):
        facts = describe(r)
        metrics = (r["task"] or {}).get("metrics") or {}
        forg = (r["forgetting"] or {}).get("benchmarks") or {}
        entry = {
            **facts, "path": r["path"],
            "task": {k: metrics.get(k) for k in metrics},
            "forgetting": {b: {k: forg[b].get(k) for k in ("before", "after", "delta", "delta_ci", "relative",
                                                           "exceeds_max_drop", "in_domain")} for b in forg},
            "gate": (r["forgetting"] or {}).get("gate", {}).get("passed"),
            "gate_verdict": (r["forgetting"] or {}).get("gate", {}).get("verdict"),
            "vs_first": _paired_task(runs[0], r, item_key) if i and r["predictions"] and runs[0]["predictions"] else None,
            "forgetting_vs_first": _paired_forgetting(runs[0], r) if i else None,
            "student_vs_teacher": _business(r.get("student_vs_teacher"), main),
        }
        entries.append(entry)
    columns = ["run", "model", "modality", "dss", main, second, *[f"Δ{b} (pts)" for b in benchmarks], "gate",
               "trainable", "peak MB", "train s", "eval s", f"Δ{main} vs first (p)", f"teacher {main}",
               "student $/1k req", "teacher $/1k req", "break-even"]
    table = []
    for e in entries:
        vs = e["vs_first"]
        table.append([
            e["run"], e["model"] or "-", e["modality"] or "-", e["dss_output"] or "-",
            _pct_ci(e["task"].get(main)), _pct_ci(e["task"].get(second)),
            *[_pts(e["forgetting"].get(b)) for b in benchmarks],
            {True: "pass", False: "FAIL", None: "-"}[e["gate"]] if e["gate_verdict"] != "not_measured"
            else "not measured",
            _int(e["trainable_params"]), _num(e["peak_memory_mb"]), _num(e["train_wall_s"]), _num(e["eval_wall_s"]),
            f"{100 * vs['delta']:+.1f} (p={vs['mcnemar_p'] if vs.get('mcnemar_p') is not None else vs['p_value']:.3f})"
            if vs else "-",
            *_business_cells(e["student_vs_teacher"]),
        ])
    return {"task_type": task_type, "main_metric": main, "second_metric": second, "benchmarks": benchmarks,
            "runs": entries, "columns": columns, "table": table}


def _business(table: dict[str, Any] | None, main: str) -> dict[str, Any] | None:
    """The run's student-vs-teacher record (eval/student_vs_teacher.json) reduced to what compare shows."""
    if not table:
        return None
    by_role = {m["role"]: m for m in table.get("models") or []}
    teacher, student = by_role.get("teacher") or {}, by_role.get("student") or {}
    return {"teacher_model": teacher.get("model"), "teacher": (teacher.get("metrics") or {}).get(main),
            "student_cost_per_1k": student.get("cost_per_1k"), "teacher_cost_per_1k": teacher.get("cost_per_1k"),
            "break_even": (table.get("break_even") or {}).get("text")}


def _business_cells(b: dict[str, Any] | None) -> list[str]:
    if not b:
        return ["-", "-", "-", "-"]
    usd = [("-" if v is None else f"${v:.4f}") for v in (b["student_cost_per_1k"], b["teacher_cost_per_1k"])]
    return [_pct_ci(b["teacher"]), *usd, b["break_even"] or "-"]


def _pts(f: dict[str, Any] | None) -> str:
    if not f or f.get("delta") is None:
        return "-"
    flag = " !" if f.get("exceeds_max_drop") else ""
    return f"{100 * f['delta']:+.1f}{flag}" + (" (in-domain)" if f.get("in_domain") else "")


def _int(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


def _num(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}"


def markdown(result: dict[str, Any]) -> str:
    head = "| " + " | ".join(result["columns"]) + " |\n| " + " | ".join("---" for _ in result["columns"]) + " |\n"
    body = "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in result["table"])
    note = ("\nTask metrics in % with bootstrap 95% CIs; Δ benchmark = after - before in accuracy points "
            "(`!` = beyond the gate's max_drop); last column: paired difference against the first run on the "
            "same test items (McNemar p).\n")
    return head + body + note


def compare_figure(result: dict[str, Any]):
    """Matplotlib figure: task metric per run (with CI bars) and forgetting change per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [r["run"] for r in runs]
    main = result["main_metric"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) + 4), 3.6))
    vals = [((r["task"].get(main) or {}).get("value") or 0) * 100 for r in runs]
    lo = [v - ((r["task"].get(main) or {}).get("ci_low") or v / 100) * 100 for v, r in zip(vals, runs, strict=True)]
    hi = [((r["task"].get(main) or {}).get("ci_high") or v / 100) * 100 - v for v, r in zip(vals, runs, strict=True)]
    axes[0].bar(names, vals, yerr=[lo, hi], capsize=4, color="#4c72b0")
    axes[0].set_ylabel(f"{main} (%)")
    axes[0].set_title("task (95% CI)")
    axes[0].tick_params(axis="x", rotation=30)
    benchmarks = result["benchmarks"]
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        deltas = [100 * ((r["forgetting"].get(b) or {}).get("delta") or 0) for b in benchmarks]
        xs = [j + i * width for j in range(len(benchmarks))]
        axes[1].bar(xs, deltas, width=width, label=r["run"])
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(benchmarks))])
    axes[1].set_xticklabels(benchmarks)
    axes[1].set_ylabel("after - before (pts)")
    axes[1].set_title("forgetting")
    if runs and benchmarks:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def compare_svg(result: dict[str, Any]) -> str:
    """The chart as an inline SVG string (for the HTML report)."""
    import matplotlib.pyplot as plt

    fig = compare_figure(result)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):] if "<svg" in text else text


def write_compare(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.svg"]
    atomic_write_json(paths[0], result)
    atomic_write_text(paths[1], markdown(result))
    atomic_write_text(paths[2], compare_svg(result))
    return paths
