"""An experiment's results (`results.json`) and report (`experiment.html`) (hand-written).

Reads each point's sub-run (eval/task.json + per-item predictions, eval/forgetting.json, the
training summary, the planner's estimate from experiment.json, the teacher cost of the rows the
point trained on) and renders, in report.html's style (Jinja2 templates in
stepwise/templates/experiment/, report.css shared; charts are matplotlib SVG inline):
learning curves (metric vs data fraction, one line per target, bootstrap 95% bands), metric vs
peak memory vs wall time per modality, the alpha:rank table, forgetting and teacher cost per
point, and the Pareto-best points with the command that reproduces each.

Honest statistics: a comparison is called "better" only when the paired bootstrap CI of the
difference on the same test items (stepwise.evals.stats.paired_diff) excludes 0; otherwise it
says "no detectable difference at n = ...".
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from stepwise.evals.stats import pct_ci
from stepwise.io import atomic_write_json, atomic_write_text, iter_jsonl
from stepwise.layout import ExperimentLayout, RunLayout

OTHER_AXES = ("modality", "lora_r", "alpha_ratio", "learning_rate", "general_mix")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, ValueError):
        return None


def _ids(path: Path) -> set[str]:
    return {str(r["id"]) for _, r in iter_jsonl(path) if not r.get("general")} if path.exists() else set()


def point_result(layout: ExperimentLayout, pid: str, plan_entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """What one point measured (None where it measured nothing)."""
    from stepwise.evals.compare import _peak_mb

    lay = RunLayout(layout.point(pid))
    status = _read_json(layout.point_status(pid)) or {}
    task = _read_json(lay.task_report) or {}
    main = "accuracy" if task.get("task_type") == "classification" else "exact_match"
    item_key = "correct" if task.get("task_type") == "classification" else "exact_match"
    scores = {}
    if lay.task_predictions.exists():
        scores = {str(r["id"]): float(r[item_key]) for _, r in iter_jsonl(lay.task_predictions)
                  if r.get(item_key) is not None}
    forgetting = _read_json(lay.forgetting_report) or {}
    manifest = _read_json(lay.manifest) or {}
    train_info = (manifest.get("stages") or {}).get("train") or {}
    summary = {}
    if train_info.get("config"):
        summary = _read_json(lay.train_output(train_info["config"]) / "summary.json") or {}
    # teacher cost of the rows this point trained on (its train + val rows), from the shared responses
    used = _ids(lay.curated("train")) | _ids(lay.curated("val"))
    cost, tokens = 0.0, 0
    if lay.responses.exists():
        for _, r in iter_jsonl(lay.responses):
            if str(r.get("id")) in used:
                cost += float(r.get("cost") or 0.0)
                usage = r.get("usage") or {}
                tokens += int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)
    headline = task.get("headline") or {}
    return {
        "id": pid, "status": status.get("status", "not_run"), "values": status.get("values")
        or (plan_entry or {}).get("values"), "main_metric": main if task else None,
        "metric": headline.get(main), "metrics": {k: v.get("value") for k, v in headline.items()
                                                  if isinstance(v, dict) and v.get("value") is not None},
        "scores": scores, "n_test": len(scores),
        "forgetting": {b: {k: v.get(k) for k in ("delta", "delta_ci", "exceeds_max_drop")}
                       for b, v in (forgetting.get("benchmarks") or {}).items()},
        "gate": (forgetting.get("gate") or {}).get("verdict"),
        "peak_memory_mb": _peak_mb(summary) or _peak_mb(train_info),
        "estimate_gb": (plan_entry or {}).get("estimate_gb"),
        "train_wall_s": summary.get("wall_s") or train_info.get("wall_s"),
        "train_rows": len(_ids(lay.curated("train"))) or None,
        "teacher_cost": round(cost, 6), "teacher_tokens": tokens,
        "tracking_run_id": status.get("tracking_run_id"), "detail": status.get("detail", ""),
        "shared_data": status.get("shared_data"),  # the fingerprint of the shared curated data it trained on
    }


def collect(layout: ExperimentLayout) -> dict[str, Any]:
    plan = _read_json(layout.plan) or {}
    results = [point_result(layout, p["id"], p) for p in plan.get("points", [])]
    return {"plan": plan, "points": results}


# -- statistics --------------------------------------------------------------------------------


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """b - a on the test items both scored (paired bootstrap)."""
    from stepwise.evals.stats import paired_diff

    common = sorted(set(a["scores"]) & set(b["scores"]))
    if not common:
        return None
    return paired_diff([a["scores"][i] for i in common], [b["scores"][i] for i in common], n_boot=1000)


def verdict(name_a: str, name_b: str, d: dict[str, Any] | None) -> str:
    """A sentence that says "better" only when the paired CI excludes 0."""
    if not d or d.get("delta") is None:
        return f"{name_b} vs {name_a}: no common test items"
    lo, hi = d["delta_ci"]
    span = f"{100 * d['delta']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else \
        f"{100 * d['delta']:+.1f} pts (no CI)"
    if lo is not None and lo > 0:
        return f"{name_b} is better than {name_a}: {span}, n = {d['n']}"
    if hi is not None and hi < 0:
        return f"{name_a} is better than {name_b}: {span}, n = {d['n']}"
    return f"{name_b} vs {name_a}: no detectable difference at n = {d['n']} ({span})"


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on metric (higher), memory and train time (lower) at once."""
    def key(p: dict[str, Any]) -> tuple[float, float, float] | None:
        m = (p.get("metric") or {}).get("value")
        if m is None:
            return None
        mem = p.get("peak_memory_mb") or ((p.get("estimate_gb") or 0) * 1024) or 0.0
        return (m, mem, p.get("train_wall_s") or 0.0)

    scored = [(p, key(p)) for p in points if key(p) is not None]
    front = []
    for p, k in scored:
        dominated = any(o[0] >= k[0] and o[1] <= k[1] and o[2] <= k[2] and o != k for _, o in scored)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: -p["metric"]["value"])


# -- rendering ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    loader = jinja2.ChoiceLoader([jinja2.PackageLoader("stepwise", "templates/experiment"),
                                  jinja2.PackageLoader("stepwise", "templates/report")])  # report.css, _macros
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)


def _pct(m: dict[str, Any] | None) -> str:
    return pct_ci(m, "%")


def _num(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _group_key(values: dict[str, Any]) -> tuple:
    return tuple(values.get(a) for a in OTHER_AXES)


def _group_label(values: dict[str, Any], axes: dict[str, Any]) -> str:
    parts = [f"{a}={values.get(a)}" for a in OTHER_AXES if a in axes]
    return ", ".join(parts) or "all points"


def _curve_svg(title: str, lines: dict[str, list[tuple[float, dict[str, Any]]]], metric: str) -> Markup:
    from stepwise.report import _plt, _svg

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    for target, pts in sorted(lines.items()):
        pts = sorted(pts, key=lambda t: t[0])
        xs = [x for x, _ in pts]
        ys = [100 * m["value"] for _, m in pts]
        ax.plot(xs, ys, marker="o", label=target)
        if all(m.get("ci_low") is not None for _, m in pts):
            ax.fill_between(xs, [100 * m["ci_low"] for _, m in pts], [100 * m["ci_high"] for _, m in pts], alpha=0.18)
    if len({x for pts in lines.values() for x, _ in pts}) > 1:
        ax.set_xscale("log", base=2)
    xs_all = sorted({x for pts in lines.values() for x, _ in pts})
    ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_xlabel("data fraction (of the curated training rows)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _svg(fig)


def _modality_svg(points: list[dict[str, Any]], metric: str) -> Markup | None:
    """Metric vs memory (measured peak, else the planner's estimate), one colour per modality, the
    training seconds written beside each point."""
    from stepwise.report import _plt, _svg

    pts = [p for p in points if p.get("peak_memory_mb") or p.get("estimate_gb")]
    if len({p["values"]["modality"] for p in pts}) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    for m in sorted({p["values"]["modality"] for p in pts}):
        mine = [p for p in pts if p["values"]["modality"] == m]
        xs = [(p["peak_memory_mb"] / 1024) if p["peak_memory_mb"] else p["estimate_gb"] for p in mine]
        ys = [100 * p["metric"]["value"] for p in mine]
        ax.scatter(xs, ys, label=m)
        for x, y, p in zip(xs, ys, mine, strict=True):
            if p.get("train_wall_s"):
                ax.annotate(f"{p['train_wall_s']:.0f}s", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    measured = all(p["peak_memory_mb"] for p in pts)
    ax.set_xlabel("peak memory (GB)" if measured else "memory (GB; the planner's estimate where none was measured)")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    return _svg(fig)


def _data_of(p: dict[str, Any], current: str | None) -> str | None:
    """The shared data a point trained on (a point from before fingerprints: the experiment's)."""
    return p.get("shared_data") or current


def _section_grid(data: dict[str, Any], cmd: Any, current: str | None) -> dict[str, Any]:
    rows = []
    for p in data["points"]:
        v = p["values"] or {}
        status = p["status"]
        plan = next((e for e in data["plan"].get("points", []) if e["id"] == p["id"]), {})
        if not plan.get("fits", True):
            status = f"does not fit (planner: {plan.get('estimate_gb'):.1f} GB)"
        elif status == "done" and _data_of(p, current) != current:
            status = f"done on older curated data ({str(_data_of(p, current))[:8]})"
        rows.append([p["id"], v.get("target"), v.get("data_fraction"), v.get("modality"), v.get("lora_r") or "-",
                     v.get("alpha_ratio") or "-", v.get("learning_rate") or "default", status, _pct(p["metric"]),
                     _num(p["train_rows"]), _num(p["train_wall_s"], "{:.1f}"), cmd(p["id"])])
    return {"headers": ["point", "target", "fraction", "modality", "r", "alpha:r", "lr", "status", "metric [95% CI]",
                        "train rows", "train s", "reproduce"], "rows": rows}


def render(layout: ExperimentLayout, data: dict[str, Any]) -> str:
    plan = data["plan"]
    axes = plan.get("axes") or {}
    points = data["points"]
    current = (plan.get("shared_data") or {}).get("fingerprint")
    finished = [p for p in points if p.get("metric")]
    metric = next((p["main_metric"] for p in finished if p.get("main_metric")), "accuracy")
    # one grid, one curation version: points trained on older shared data get curves of their own and
    # stay out of every comparison with the current ones (stepwise.experiment's guard stops new mixing)
    done = [p for p in finished if _data_of(p, current) == current]
    older = [p for p in finished if _data_of(p, current) != current]
    flags = plan.get("flags") or []

    def cmd(pid: str) -> str:
        return " ".join(shlex.quote(x) for x in ["stepwise", "experiment", str(plan.get("recipe")),
                                                 "--dir", str(layout.root), "--points", pid, *flags])

    sections = []
    sections.append({"title": "Grid", "template": "grid.html.j2",
                     "ctx": {**_section_grid(data, cmd, current), "axes": axes}})

    # learning curves: one chart per combination of the other axes, one line per target
    curves = []
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for p in done + older:
        groups[(_data_of(p, current) != current, _data_of(p, current), *_group_key(p["values"]))].append(p)
    for (is_older, fp, *_), members in groups.items():
        label = _group_label(members[0]["values"], axes)
        if is_older:
            label += (f" (older curated data {str(fp)[:8]}: trained before the shared data changed; "
                      "`--force` re-runs them on the current data)")
        lines: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        for p in members:
            lines[p["values"]["target"]].append((p["values"]["data_fraction"], p["metric"]))
        comparisons = []
        targets = sorted(lines)
        by = {(p["values"]["target"], p["values"]["data_fraction"]): p for p in members}
        fractions = sorted({p["values"]["data_fraction"] for p in members})
        for f in fractions:
            for i, a in enumerate(targets):
                for b in targets[i + 1:]:
                    if (a, f) in by and (b, f) in by:
                        comparisons.append(f"fraction {f:g}: " + verdict(a, b, paired(by[(a, f)], by[(b, f)])))
        curves.append({"label": label, "svg": _curve_svg(label, lines, metric), "comparisons": comparisons})
    sections.append({"title": "Learning curves", "template": "curves.html.j2", "ctx": {"curves": curves,
                     "metric": metric}})

    # per modality: metric vs peak memory vs wall time
    mod_rows = []
    for p in sorted(done, key=lambda p: (str(p["values"]["modality"]), p["id"])):
        mem = f"{p['peak_memory_mb']:.0f} MB measured" if p["peak_memory_mb"] else (
            f"{p['estimate_gb']:.1f} GB planner" if p["estimate_gb"] else "-")
        mod_rows.append([p["values"]["modality"], p["id"], _pct(p["metric"]), mem, _num(p["train_wall_s"], "{:.1f}")])
    mod_notes = []
    modalities = sorted({p["values"]["modality"] for p in done})
    if len(modalities) > 1:
        base = {}
        for p in done:
            k = (p["values"]["target"], p["values"]["data_fraction"])
            base.setdefault(k, {})[p["values"]["modality"]] = p
        for k, by_mod in base.items():
            ref = by_mod.get("full") or next(iter(by_mod.values()))
            for p in by_mod.values():
                if p is not ref:
                    mod_notes.append(f"{k[0]}, fraction {k[1]:g}: " + verdict(ref["id"], p["id"], paired(ref, p)))
    sections.append({"title": "Modality: metric vs memory vs time", "template": "table.html.j2",
                     "ctx": {"headers": ["modality", "point", "metric [95% CI]", "peak memory", "train s"],
                             "rows": mod_rows, "notes": mod_notes, "svg": _modality_svg(done, metric)}})

    # alpha:rank table
    ranks = sorted({p["values"]["lora_r"] for p in done if p["values"]["modality"] != "full"})
    ratios = sorted({p["values"]["alpha_ratio"] for p in done if p["values"]["modality"] != "full"})
    ar_rows = []
    for r in ranks:
        row = [f"r={r}"]
        for a in ratios:
            cell = [p for p in done if p["values"]["lora_r"] == r and p["values"]["alpha_ratio"] == a
                    and p["values"]["modality"] != "full"]
            row.append("; ".join(f"{_pct(p['metric'])} ({p['id']})" for p in cell) or "-")
        ar_rows.append(row)
    sections.append({"title": "alpha:rank", "template": "table.html.j2",
                     "ctx": {"headers": ["lora_r \\ alpha:r", *[f"{a:g}:1" for a in ratios]], "rows": ar_rows,
                             "notes": [] if len(ranks) * len(ratios) > 1 else
                             ["one rank and one ratio in this grid: sweep `lora_r` / `alpha_ratio` to fill the table"]}})

    # forgetting per point
    benches = sorted({b for p in finished for b in p["forgetting"]})
    f_rows = []
    for p in finished:  # per point, no comparison: the older points too
        cells = []
        for b in benches:
            f = p["forgetting"].get(b) or {}
            ci = f.get("delta_ci") or [None, None]
            cells.append("-" if f.get("delta") is None else f"{100 * f['delta']:+.1f} pts" + (
                f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci[0] is not None else ""))
        f_rows.append([p["id"], *cells, p.get("gate") or "-"])
    sections.append({"title": "Forgetting", "template": "table.html.j2",
                     "ctx": {"headers": ["point", *[f"Δ{b}" for b in benches], "gate"], "rows": f_rows,
                             "notes": [] if benches else ["no forgetting benchmarks measured (eval.forgetting)"]}})

    # teacher cost per point
    c_rows = [[p["id"], _num(p["train_rows"]), f"${p['teacher_cost']:.4f}", f"{p['teacher_tokens']:,}"] for p in points]
    sections.append({"title": "Teacher cost", "template": "table.html.j2",
                     "ctx": {"headers": ["point", "train rows", "teacher cost of its rows", "teacher tokens"],
                             "rows": c_rows, "notes": ["generation, curation and review ran once, in shared/, "
                                                       "for every point; a point's cost is that of the rows it used"]}})

    # Pareto-best points
    front = pareto(done)
    p_rows = []
    for p in front:
        mem = f"{p['peak_memory_mb']:.0f} MB" if p["peak_memory_mb"] else (
            f"{p['estimate_gb']:.1f} GB (planner)" if p["estimate_gb"] else "-")
        p_rows.append([p["id"], _pct(p["metric"]), mem, _num(p["train_wall_s"], "{:.1f}"), cmd(p["id"])])
    if not front:
        p_notes = ["no finished point with a metric yet"]
    else:  # the best by metric against the others on the front: cheaper, but is it worse?
        p_notes = [verdict(p["id"], front[0]["id"], paired(p, front[0])) for p in front[1:]] or [
            f"{front[0]['id']} is at least as good as every other point on metric, memory and time at once"]
    sections.append({"title": "Pareto-best points", "template": "table.html.j2",
                     "ctx": {"headers": ["point", "metric [95% CI]", "memory", "train s", "reproduce"],
                             "rows": p_rows, "notes": p_notes}})

    env = _env()
    rendered = [{"title": s["title"], "anchor": s["title"].lower().replace(" ", "-").replace(":", ""),
                 "html": Markup(env.get_template(s["template"]).render(**s["ctx"]).strip())} for s in sections]
    return env.get_template("page.html.j2").render(name=plan.get("name", ""), root=str(layout.root),
                                                   recipe=plan.get("recipe"), sections=rendered)


def write_experiment_report(recipe: Any, layout: ExperimentLayout, points: Any = None) -> Path:
    data = collect(layout)
    atomic_write_json(layout.results, {"plan": data["plan"], "points": [
        {k: v for k, v in p.items() if k != "scores"} for p in data["points"]]})
    atomic_write_text(layout.report_html, render(layout, data))
    return layout.report_html
