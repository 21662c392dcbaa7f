"""report.html: one self-contained page per run (inline SVG plots, no external assets).

Sections: student vs teacher first (accuracy, latency, cost per 1k requests, break-even, and a plot of
accuracy against cost), stage status and timings, teacher cost and tokens, the curation funnel, label
distribution before/after balance, dedup, review agreement, training loss, task metrics with
confidence intervals, forgetting before/after with the gate's verdict, and links to artifacts.
Each section reads only its stage's files and says plainly when that stage has not run.

Every number is the one the run measured: stage status, seconds and detail come from the
manifest's record of what `stepwise run` printed (`stages.<stage>.pipeline`, the wall time around
the whole stage), else from the stage's own record; the report's own row says "this page". When
generate replayed every response from the teacher cache, its time is the replay's, and it says so.

A verdict over too little data says so instead of a green pass (thresholds below): the forgetting
gate and student-vs-base comparisons show "too little data to judge" when the student trained on
fewer than MIN_TRAIN_ROWS rows, a benchmark scored fewer than MIN_BENCHMARK_ITEMS questions, or the
test split has fewer than MIN_TEST_ITEMS items. This is the report's reading only; the gate's exit
code is `stepwise eval`'s. Per-class tables beyond MAX_CLASS_ROWS classes show the worst classes
first and fold the rest behind a <details> toggle.

Hand-written: what each section reads and computes (plain values). Library: the HTML comes from the
Jinja2 templates in stepwise/templates/report/ (package data: page.html.j2, report.css, one
sections/<name>.html.j2 per section), rendered with autoescape on, so run data (labels, notes,
model names) is always text; the only markup passed in is matplotlib's inline SVG.
"""

from __future__ import annotations

import csv
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from stepwise.io import atomic_write_text, read_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import STAGES, RunDir, effective_status, file_entry

# "Too little data to judge" below these (see the module doc): with 20 items a 95% interval on an
# accuracy is still about +-20 points, so anything smaller cannot back a pass.
MIN_TRAIN_ROWS = 20
MIN_TEST_ITEMS = 20
MIN_BENCHMARK_ITEMS = 20
MAX_CLASS_ROWS = 20  # per-class rows shown before the rest fold behind a toggle


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    # Autoescape everything: run data (labels, teacher text, file names) never becomes markup. The one
    # trusted fragment is matplotlib's SVG, passed in as Markup.
    return jinja2.Environment(loader=jinja2.PackageLoader("stepwise", "templates/report"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


def _render(template: str, **ctx: Any) -> Markup:
    return Markup(_env().get_template(template).render(**ctx).strip())


def _svg(fig) -> Markup:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return Markup(text[text.find("<svg"):])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _missing(what: str) -> Markup:
    return _render("sections/missing.html.j2", what=what)


# -- sections: each reads its stage's files and renders sections/<name>.html.j2 --------------------


def _stages(run: RunDir) -> Markup:
    """Status, seconds and detail as `stepwise run` printed them (the manifest's `pipeline` record),
    else the stage's own record; the report's row is this page, still being written."""
    m = run.read_manifest()
    rows: list[dict[str, Any]] = []
    for name in STAGES:
        info = m.get("stages", {}).get(name) or {}
        if name == "report":
            rows.append({"name": name, "this_page": True})
            continue
        ran = info.get("pipeline") or {}
        status = effective_status(info) if info.get("status") else "pending"
        seconds, detail = info.get("wall_s"), str(info.get("error", ""))
        if ran and status not in ("running", "interrupted"):
            status, seconds, detail = ran.get("status", status), ran.get("wall_s"), str(ran.get("detail", ""))
        cls = {"done": "ok", "failed": "bad", "interrupted": "bad", "gate_failed": "bad", "not_measured": "bad",
               "incomplete": "warn", "stopped": "warn", "skipped": "ok"}.get(status, "muted")
        secs = f"{seconds:.1f}" if isinstance(seconds, int | float) else ""
        if status == "skipped" and isinstance(ran.get("earlier_wall_s"), int | float):
            secs += f" (inputs unchanged; took {ran['earlier_wall_s']:.1f} when it ran)"
        if name == "generate" and secs:
            secs += _replay_note(info)
        rows.append({"name": name, "this_page": False, "cls": cls, "status": status, "secs": secs,
                     "detail": detail[:300]})
    return _render("sections/stages.html.j2", rows=rows)


def _replay_note(info: dict[str, Any]) -> str:
    """Generate's time is the teacher's only when it asked the teacher: say when it was a replay."""
    cache = info.get("cache") or {}
    hits, sent = int(cache.get("hits") or 0), int(cache.get("requests_sent") or 0)
    if hits and not sent:
        return f" (replayed from cache: {hits} responses; the teacher's original time is not recorded)"
    if hits:
        return f" ({sent} requests to the teacher, {hits} responses from cache)"
    return ""


def _teacher(run: RunDir) -> Markup:
    info = run.stage_info("generate")
    path = run.layout.responses
    if not info or not path.exists():
        return _missing("generate")
    rows = read_jsonl(path)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["parse_status"]] = statuses.get(r["parse_status"], 0) + 1
    t, c, tok = info.get("teacher", {}), info.get("cost", {}), info.get("tokens", {})
    cache = info.get("cache", {})
    facts = [
        ["teacher", f"{t.get('provider')}:{t.get('model')}" + (f" @ {t['base_url']}" if t.get("base_url") else "")],
        ["format / samples per input", f"{t.get('format')} / {t.get('num_rationales')}"],
        ["rows", len(rows)],
        ["prompt / completion tokens", f"{tok.get('input', 0):,} / {tok.get('output', 0):,}"],
        ["cost (all responses / paid this run)", f"${c.get('total_usd', 0):.4f} / ${c.get('this_run_usd', 0):.4f}"],
        ["cache hits / requests sent / failed", f"{cache.get('hits', 0)} / {cache.get('requests_sent', 0)} / "
                                                f"{cache.get('failed', 0)}"],
    ]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    names = sorted(statuses, key=lambda k: -statuses[k])
    ax.barh(names, [statuses[n] for n in names], color=["#2e7d32" if n == "ok" else "#c77700" for n in names])
    ax.invert_yaxis()
    ax.set_title("parse status of teacher responses")
    return _render("sections/teacher.html.j2", facts=facts, svg=_svg(fig))


def _funnel(run: RunDir) -> Markup:
    funnel = _read_json(run.layout.funnel)
    if not funnel:
        return _missing("curate")
    steps = funnel.get("steps", [])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(steps) + 1))
    labels = [s["step"] for s in steps]
    ax.barh(labels, [s["in"] for s in steps], color="#cfd8e3", label="in")
    ax.barh(labels, [s["out"] for s in steps], color="#1565c0", label="out")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title(f"curation funnel: {funnel.get('responses')} teacher responses -> kept {funnel.get('kept')}")
    rows = [[s["step"], s["in"], s["out"],
             (", ".join(f"{k}: {v}" for k, v in s.get("removed", {}).items()) or "-")
             + "".join(f"; kept after repair ({k}): {v}" for k, v in (s.get("repaired") or {}).items())
             + "".join(f"; to {k}: {v}" for k, v in (s.get("moved") or {}).items())]
            for s in steps]
    acc = funnel.get("teacher_accuracy") or {}
    decon = next((s for s in steps if s["step"] == "decontaminate"), None)
    refs = ""
    if decon and decon.get("references"):
        refs = ", ".join(f"{k} ({v.get('rows')} rows)" for k, v in decon["references"].items())
    return _render("sections/funnel.html.j2", svg=_svg(fig), rows=rows, accuracy=acc.get("accuracy"),
                   agree=acc.get("agree"), rows_with_gold=acc.get("rows_with_gold"), decontaminated=refs,
                   dropped_against=(decon or {}).get("dropped_against") or "none",
                   held_out=funnel.get("held_out_before_generation"),
                   rationalize=funnel.get("rationalize"), sources=_rationale_sources(run, funnel),
                   rejected=_rel(run, run.layout.curate_rejected))


def _rationale_sources(run: RunDir, funnel: dict[str, Any]) -> tuple[str, dict[str, int]] | None:
    """Whose rationales the training rows carry (teacher / rationalized / reviewer / none): from the
    export when it ran (after review), else from curation's train split."""
    export = ((run.stage_info("export") or {}).get("export") or {}).get("train") or {}
    if export.get("rationale_sources"):
        return "export/train", export["rationale_sources"]
    train = (funnel.get("rationale_sources") or {}).get("train")
    return ("curate/train", train) if train else None


def _rel(run: RunDir, path: Path) -> str:
    """A link from report.html (at the run's root) to a file of the run."""
    return path.relative_to(run.path).as_posix()


def _balance(run: RunDir) -> Markup:
    funnel = _read_json(run.layout.funnel) or {}
    step = next((s for s in funnel.get("steps", []) if s["step"] == "balance"), None)
    if not step or "histogram_before" not in step:
        return _missing("class balance (classification only)")
    before = step["histogram_before"].get("train", {})
    after = step["histogram_after"].get("train", {})
    labels = sorted(set(before) | set(after))
    plt = _plt()
    import numpy as np

    many = len(labels) > MAX_CLASS_ROWS  # e.g. 151 classes: a fixed-width chart sorted by count, no names
    if many:
        labels.sort(key=lambda k: (-after.get(k, 0), -before.get(k, 0), k))
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9 if many else max(5, 0.55 * len(labels) + 2), 2.8))
    ax.bar(x - 0.2, [before.get(k, 0) for k in labels], 0.4, label="before balance", color="#90a4ae")
    ax.bar(x + 0.2, [after.get(k, 0) for k in labels], 0.4, label="after balance", color="#1565c0")
    if many:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(labels)} classes, largest first (per-class counts: curate/funnel.json)")
    else:
        ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.legend()
    ax.set_title("train label distribution")
    ratio = (max(after.values()) / max(1, min(after.values()))) if after else 0
    return _render("sections/balance.html.j2", svg=_svg(fig), ratio=ratio)


def _dedup(run: RunDir) -> Markup:
    funnel = _read_json(run.layout.funnel) or {}
    steps = [s for s in funnel.get("steps", []) if s["step"].startswith("dedup")]
    if not steps:
        return _missing("dedup")
    rows = []
    for s in steps:
        params = {k: v for k, v in s.items() if k not in ("step", "in", "out", "removed")}
        rows.append([s["step"], s["in"], s["out"], sum(s.get("removed", {}).values()), json.dumps(params)[:160]])
    sizes: dict[int, int] = {}
    train = run.layout.curated("train")
    if train.exists():
        for r in read_jsonl(train):
            n = int(r.get("dedup_cluster_size") or 1)
            sizes[n] = sizes.get(n, 0) + 1
    return _render("sections/dedup.html.j2", rows=rows,
                   sizes=", ".join(f"{k}: {v}" for k, v in sorted(sizes.items())))


def _review(run: RunDir) -> Markup:
    agreement = _read_json(run.layout.agreement)
    if not agreement:
        return _missing("review")
    questions = [[q] + [_fmt(stats.get(k)) for k in ("agreement", "cohen_kappa", "fleiss_kappa")]
                 for q, stats in (agreement.get("questions") or {}).items() if isinstance(stats, dict)]
    acc = agreement.get("teacher_accuracy")
    return _render("sections/review.html.j2", mode=agreement.get("mode"),
                   counts=[[k, v] for k, v in agreement.get("counts", {}).items()], questions=questions,
                   teacher_accuracy=None if acc is None else _fmt(acc))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict) and "value" in v:
        return _fmt(v["value"])
    return "-" if v is None else str(v)


def _training(run: RunDir) -> Markup:
    train_dir = run.layout.train_dir
    curves = sorted(p for p in train_dir.glob("*/loss.csv")) if train_dir.exists() else []
    if not curves:
        return _missing("train")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    rows = []
    for path in curves:
        with path.open(encoding="utf-8") as fh:
            data = list(csv.DictReader(fh))
        train = [(float(r["step"]), float(r["loss"])) for r in data if r.get("kind", "train") == "train" and r.get("loss")]
        evals = [(float(r["step"]), float(r["eval_loss"])) for r in data if r.get("eval_loss")]
        if train:
            ax.plot(*zip(*train, strict=True), marker="o", label=f"{path.parent.name} train")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="s", linestyle="--", label=f"{path.parent.name} eval")
        rows.append({"name": path.parent.name, "steps": len(train),
                     "last_train": f"{train[-1][1]:.4f}" if train else "-",
                     "last_eval": f"{evals[-1][1]:.4f}" if evals else "-",
                     "log": _rel(run, path.parent / "train.log"), "loss_csv": _rel(run, path)})
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("training loss")
    return _render("sections/training.html.j2", svg=_svg(fig), rows=rows)


def _train_rows(run: RunDir) -> int | None:
    """Rows the student trained on: export's train rows (after review), else curate's count."""
    stages = run.read_manifest().get("stages", {})
    export = ((stages.get("export") or {}).get("export") or {}).get("train") or {}
    if isinstance(export.get("rows"), int):
        return export["rows"]
    n = ((stages.get("curate") or {}).get("counts") or {}).get("train")
    return n if isinstance(n, int) else None


def _too_little(run: RunDir, *, test_items: int | None = None, benchmark_items: dict[str, int] | None = None) -> list[str]:
    """Why a verdict over this run's data cannot be trusted (empty when it can)."""
    why = []
    rows = _train_rows(run)
    if rows is not None and rows < MIN_TRAIN_ROWS:
        why.append(f"the student trained on {rows} row{'s' * (rows != 1)} (< {MIN_TRAIN_ROWS})")
    if test_items is not None and test_items < MIN_TEST_ITEMS:
        why.append(f"{test_items} test item{'s' * (test_items != 1)} (< {MIN_TEST_ITEMS})")
    small = {k: n for k, n in (benchmark_items or {}).items() if n < MIN_BENCHMARK_ITEMS}
    if small:
        why.append(", ".join(f"{k} scored on {n} questions" for k, n in small.items())
                   + f" (< {MIN_BENCHMARK_ITEMS})")
    return why


def _student_vs_teacher(run: RunDir) -> Markup:
    """The business case first: teacher, base and student side by side (eval/student_vs_teacher.json,
    stepwise.evals.teacher_compare), and accuracy against cost per 1k requests, one point per model."""
    from stepwise.evals.teacher_compare import table_rows

    table = _read_json(run.layout.student_vs_teacher)
    if not table:
        return _missing("the student-vs-teacher comparison (eval)")
    columns, rows = table_rows(table)
    metric = table.get("main_metric", "accuracy")
    points = [(m["role"], m.get("cost_per_1k"), (m.get("metrics") or {}).get(metric) or {})
              for m in table.get("models") or []]
    points = [(role, cost, v) for role, cost, v in points if cost is not None and v.get("value") is not None]
    svg: Markup | str = ""
    if points:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        colors = {"teacher": "#c77700", "base": "#90a4ae", "student": "#1565c0"}
        for role, cost, v in points:
            y = 100 * v["value"]
            err = ([[y - 100 * v["ci_low"]], [100 * v["ci_high"] - y]] if v.get("ci_low") is not None else None)
            ax.errorbar([cost], [y], yerr=err, fmt="o", capsize=4, color=colors.get(role, "#333"), label=role)
            ax.annotate(role, (cost, y), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("cost per 1,000 requests (USD)")
        ax.set_ylabel(f"{metric} (%, 95% CI)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=-0.05 * (max(cost for _, cost, _ in points) or 1.0))  # a point at $0 stays visible
        ax.set_title(f"{metric} vs cost")
        svg = _svg(fig)
    return _render("sections/student_vs_teacher.html.j2", n=table.get("n"), metric=metric,
                   cph=f"{table.get('student_cost_per_hour', 0):g}", columns=columns, rows=rows,
                   break_even=table.get("break_even") or {}, notes=table.get("notes") or [],
                   bases=[(m["role"], m.get("cost_basis")) for m in table.get("models") or []], svg=svg)


def _task(run: RunDir) -> Markup:
    task = _read_json(run.layout.task_report)
    if not task:
        return _missing("task evaluation")
    headline = []
    for name, v in (task.get("headline") or {}).items():
        if isinstance(v, dict):
            lo, hi = v.get("ci_low", v.get("low")), v.get("ci_high", v.get("high"))
            ci = f"[{lo:.3f}, {hi:.3f}]" if isinstance(lo, float) and isinstance(hi, float) else "-"
            headline.append([name, _fmt(v.get("value")), ci])
        else:
            headline.append([name, _fmt(v), "-"])
    n = task.get("n", task.get("items"))
    model = task.get("model")
    why = _too_little(run, test_items=n if isinstance(n, int) else None)
    per_class = (task.get("metrics") or {}).get("per_class") or task.get("per_class")
    return _render("sections/task.html.j2", model=model.get("label") if isinstance(model, dict) else model,
                   n=n if n is not None else "?", why=why, headline=headline,
                   repairs=[(fix, count) for fix, count in (task.get("repairs") or {}).items() if count],
                   comparison=_base_comparison(task.get("base_comparison")),
                   per_class=_per_class(per_class) if isinstance(per_class, dict) else None)


def _per_class(per_class: dict[str, Any]) -> dict[str, Any]:
    """Per-class rows; beyond MAX_CLASS_ROWS classes, the worst (lowest F1, then most support)
    first and the rest behind a toggle, so 150 classes do not push the other sections away."""
    items = [(c, m) for c, m in per_class.items() if isinstance(m, dict)]

    def row(c: str, m: dict[str, Any]) -> list[str]:
        return [c, _fmt(m.get("precision")), _fmt(m.get("recall")), _fmt(m.get("f1")), str(m.get("support", ""))]

    if len(items) > MAX_CLASS_ROWS:
        items.sort(key=lambda cm: (float(cm[1].get("f1") or 0.0), -int(cm[1].get("support") or 0), cm[0]))
    head, rest = items[:MAX_CLASS_ROWS], items[MAX_CLASS_ROWS:]
    return {"total": len(items), "shown": [row(c, m) for c, m in head], "rest": [row(c, m) for c, m in rest]}


def _base_comparison(comp: dict | None) -> dict[str, Any] | None:
    """Student vs base on the same test items (eval.task.compare_base)."""
    if not isinstance(comp, dict) or not comp.get("metrics"):
        return None
    rows = []
    for name, m in comp["metrics"].items():
        lo, hi = (m.get("delta_ci") or [None, None])[:2]
        ci = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if isinstance(lo, float) and isinstance(hi, float) else "-"
        delta = f"{100 * m['delta']:+.1f}" if isinstance(m.get("delta"), float) else "-"
        rows.append([name, _fmt(m.get("base")), _fmt(m.get("student")), delta, ci, m.get("verdict", "")])
    return {"base": comp.get("base"), "n_paired": comp.get("n_paired"), "learned": bool(comp.get("learned")),
            "summary": comp.get("summary", ""), "rows": rows}


_GATE_TEXT = {"passed": ("ok", "PASSED"), "failed": ("bad", "FAILED"), "not_measured": ("bad", "NOT MEASURED"),
              "not_configured": ("muted", "not configured"), "skipped": ("muted", "skipped")}


def _forgetting(run: RunDir) -> Markup:
    from stepwise.evals.runner import recorded_gate

    report = _read_json(run.layout.forgetting_report)
    if not run.stage_info("eval"):
        return _missing("forgetting evaluation")
    gate = recorded_gate(run)  # the verdict the last eval recorded, as `stepwise run` reads it
    verdict_key = gate["verdict"]
    cls, text = _GATE_TEXT.get(verdict_key, ("warn", verdict_key))
    benches = (report or {}).get("benchmarks") or {}
    items = list(benches.items() if isinstance(benches, dict) else ((b.get("name"), b) for b in benches))
    why = _too_little(run, benchmark_items={n: int(b.get("n") or 0) for n, b in items}) if verdict_key in (
        "passed", "failed") else []
    max_drop = gate.get("max_drop", ((report or {}).get("gate") or {}).get("max_drop"))
    rows, names, before, after = [], [], [], []
    for name, b in items:
        bf, af = b.get("before", {}), b.get("after", {})
        bv = bf.get("value", bf) if isinstance(bf, dict) else bf
        av = af.get("value", af) if isinstance(af, dict) else af
        names.append(name)
        before.append(float(bv or 0))
        after.append(float(av or 0))
        flag = " (in-domain: mixed into training)" if b.get("in_domain") else ""
        rows.append({"name": f"{name}{flag}", "n": b.get("n", ""), "before": _fmt(bv), "after": _fmt(av),
                     "change": _fmt(b.get("abs_change", b.get("delta"))), "relative": _fmt(b.get("rel_change")),
                     "failed": bool(b.get("failed"))})
    svg: Markup | str = ""
    if report and names:
        plt = _plt()
        import numpy as np

        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 2.6))
        ax.bar(x - 0.2, before, 0.4, label="base model", color="#90a4ae")
        ax.bar(x + 0.2, after, 0.4, label="fine-tuned", color="#1565c0")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("general benchmarks before / after fine-tuning")
        svg = _svg(fig)
    return _render(
        "sections/forgetting.html.j2", too_little_pass=bool(why) and verdict_key == "passed", why=why, cls=cls,
        verdict=text, max_drop=max_drop,
        reason=gate.get("reason") if not gate.get("not_measured") else None,  # those are listed one per line
        not_measured=list((gate.get("not_measured") or {}).items()), has_report=bool(report),
        earlier=verdict_key in ("skipped", "not_configured"), svg=svg, rows=rows,
        mitigations=gate.get("mitigations") or (report or {}).get("mitigations") or [])


def _notes(run: RunDir) -> Markup:
    """Every note a stage recorded (the same list `stepwise run` prints under its table)."""
    stages = run.read_manifest().get("stages", {})
    notes = [(name, str(n)) for name in STAGES for n in (stages.get(name) or {}).get("notes") or []]
    return _render("sections/notes.html.j2", notes=notes)


def _artifacts(run: RunDir) -> Markup:
    lay = run.layout
    files = [lay.manifest, lay.recipe_copy, lay.responses, lay.funnel, lay.curated("train"), lay.curated("val"),
             lay.curated("test"), lay.curate_rejected, lay.reviewed, lay.agreement, lay.chat("train"),
             lay.chat("val"), lay.task_report, lay.forgetting_report]
    links = [(_rel(run, p), "") for p in files if p.exists()]
    configs = lay.configs_dir
    links += [(_rel(run, cfg), "Axolotl config") for cfg in (sorted(configs.glob("*.yaml")) if configs.exists() else [])]
    return _render("sections/artifacts.html.j2", links=links)


SECTIONS = [
    ("Student vs teacher", _student_vs_teacher), ("Stages", _stages), ("Teacher", _teacher), ("Curation funnel", _funnel),
    ("Label distribution", _balance), ("Deduplication", _dedup), ("Review", _review),
    ("Training", _training), ("Task metrics", _task), ("Forgetting", _forgetting), ("Notes", _notes),
    ("Artifacts", _artifacts),
]


def render_report(recipe: Recipe, run: RunDir) -> str:
    m = run.read_manifest()
    sections = []
    for title, fn in SECTIONS:
        try:
            content = fn(run)
        except Exception as exc:  # noqa: BLE001 - a broken section must not hide the others
            content = _render("sections/error.html.j2", error_type=type(exc).__name__, error=str(exc))
        sections.append({"title": title, "anchor": title.lower().replace(" ", "-"), "html": content})
    return _env().get_template("page.html.j2").render(
        name=recipe.name, run_id=m.get("run_id"), created=m.get("created"), updated=m.get("updated"),
        description=recipe.description or "", sections=sections)


def write_report(recipe: Recipe, run: RunDir) -> Path:
    path = run.layout.report_html
    with run.stage("report", inputs=[run.manifest_path]) as st:
        atomic_write_text(path, render_report(recipe, run))
        st.outputs(path)
    return path


def refresh_report(recipe: Recipe, run: RunDir) -> Path:
    """Render report.html again in place once the stages after it in `stepwise run` (package) have
    ended, so the page a run leaves shows how they did. Not a new attempt of the report stage: its
    record keeps its timing and gets the page's new hash."""
    path = run.layout.report_html
    atomic_write_text(path, render_report(recipe, run))

    def put(m: dict[str, Any]) -> None:
        m.setdefault("stages", {}).setdefault("report", {})["outputs"] = [file_entry(path, run.path)]

    run.update_manifest(put)
    return path
