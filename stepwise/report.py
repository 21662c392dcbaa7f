"""report.html: one self-contained page per run (inline SVG plots, no external assets).

Sections: stage status and timings, teacher cost and tokens, the curation funnel, label
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
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from stepwise.io import atomic_write_text, read_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import STAGES, RunDir, effective_status

# "Too little data to judge" below these (see the module doc): with 20 items a 95% interval on an
# accuracy is still about +-20 points, so anything smaller cannot back a pass.
MIN_TRAIN_ROWS = 20
MIN_TEST_ITEMS = 20
MIN_BENCHMARK_ITEMS = 20
MAX_CLASS_ROWS = 20  # per-class rows shown before the rest fold behind a toggle

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2733;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #e3e8ee;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #d8dee6;padding:.3rem .6rem;text-align:left;font-size:.92rem}
th{background:#f3f6f9}.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}.muted{color:#6b7785}
.warn{color:#b26a00;font-weight:600}.grid{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}
.card{background:#f8fafc;border:1px solid #e3e8ee;border-radius:8px;padding:.8rem 1rem}
code{background:#f3f6f9;padding:.1rem .3rem;border-radius:4px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _missing(what: str) -> str:
    return f'<p class="muted">{_e(what)} has not run yet in this run.</p>'


# -- sections ------------------------------------------------------------------------------------


def _stages(run: RunDir) -> str:
    """Status, seconds and detail as `stepwise run` printed them (the manifest's `pipeline` record),
    else the stage's own record; the report's row is this page, still being written."""
    m = run.read_manifest()
    rows = []
    for name in STAGES:
        info = m.get("stages", {}).get(name) or {}
        if name == "report":
            rows.append([_e(name), '<span class="muted">this page</span>', "", ""])
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
        rows.append([_e(name), f'<span class="{cls}">{_e(status)}</span>', _e(secs), _e(detail[:300])])
    return _table(["stage", "status", "seconds", "detail"], rows)


def _replay_note(info: dict[str, Any]) -> str:
    """Generate's time is the teacher's only when it asked the teacher: say when it was a replay."""
    cache = info.get("cache") or {}
    hits, sent = int(cache.get("hits") or 0), int(cache.get("requests_sent") or 0)
    if hits and not sent:
        return f" (replayed from cache: {hits} responses; the teacher's original time is not recorded)"
    if hits:
        return f" ({sent} requests to the teacher, {hits} responses from cache)"
    return ""


def _teacher(run: RunDir) -> str:
    info = run.stage_info("generate")
    path = run.path / "generate" / "responses.jsonl"
    if not info or not path.exists():
        return _missing("generate")
    rows = read_jsonl(path)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["parse_status"]] = statuses.get(r["parse_status"], 0) + 1
    t, c, tok = info.get("teacher", {}), info.get("cost", {}), info.get("tokens", {})
    cache = info.get("cache", {})
    facts = _table(["", ""], [
        ["teacher", _e(f"{t.get('provider')}:{t.get('model')}" + (f" @ {t['base_url']}" if t.get("base_url") else ""))],
        ["format / samples per input", _e(f"{t.get('format')} / {t.get('num_rationales')}")],
        ["rows", len(rows)],
        ["prompt / completion tokens", _e(f"{tok.get('input', 0):,} / {tok.get('output', 0):,}")],
        ["cost (all responses / paid this run)", _e(f"${c.get('total_usd', 0):.4f} / ${c.get('this_run_usd', 0):.4f}")],
        ["cache hits / requests sent / failed", _e(f"{cache.get('hits', 0)} / {cache.get('requests_sent', 0)} / "
                                                   f"{cache.get('failed', 0)}")],
    ])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    names = sorted(statuses, key=lambda k: -statuses[k])
    ax.barh(names, [statuses[n] for n in names], color=["#2e7d32" if n == "ok" else "#c77700" for n in names])
    ax.invert_yaxis()
    ax.set_title("parse status of teacher responses")
    return f'<div class="grid"><div class="card">{facts}</div><div>{_svg(fig)}</div></div>'


def _funnel(run: RunDir) -> str:
    funnel = _read_json(run.path / "curate" / "funnel.json")
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
    rows = [[_e(s["step"]), s["in"], s["out"],
             _e(", ".join(f"{k}: {v}" for k, v in s.get("removed", {}).items()) or "-")
             + "".join(f"; kept after repair ({_e(k)}): {_e(v)}" for k, v in (s.get("repaired") or {}).items())]
            for s in steps]
    acc = funnel.get("teacher_accuracy") or {}
    extra = (f"<p>Teacher accuracy against gold labels: <b>{acc['accuracy']:.1%}</b> "
             f"({acc.get('agree')}/{acc.get('rows_with_gold')}).</p>" if acc.get("accuracy") is not None else "")
    decon = next((s for s in steps if s["step"] == "decontaminate"), None)
    if decon and decon.get("references"):
        refs = ", ".join(f"{k} ({v.get('rows')} rows)" for k, v in decon["references"].items())
        extra += f"<p>Decontaminated against: {_e(refs)}; dropped: {_e(decon.get('dropped_against') or 'none')}.</p>"
    return _svg(fig) + _table(["step", "in", "out", "removed (reason: rows)"], rows) + extra + \
        '<p>Every removed row is in <a href="curate/rejected.jsonl">curate/rejected.jsonl</a> with its reason.</p>'


def _balance(run: RunDir) -> str:
    funnel = _read_json(run.path / "curate" / "funnel.json") or {}
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
    return _svg(fig) + f"<p>Largest / smallest class after balance: {ratio:.2f} (the seeds warn at 10:1).</p>"


def _dedup(run: RunDir) -> str:
    funnel = _read_json(run.path / "curate" / "funnel.json") or {}
    steps = [s for s in funnel.get("steps", []) if s["step"].startswith("dedup")]
    if not steps:
        return _missing("dedup")
    rows = []
    for s in steps:
        params = {k: v for k, v in s.items() if k not in ("step", "in", "out", "removed")}
        rows.append([_e(s["step"]), s["in"], s["out"], sum(s.get("removed", {}).values()), _e(json.dumps(params))[:160]])
    sizes: dict[int, int] = {}
    train = run.path / "curate" / "train.jsonl"
    if train.exists():
        for r in read_jsonl(train):
            n = int(r.get("dedup_cluster_size") or 1)
            sizes[n] = sizes.get(n, 0) + 1
    extra = ""
    if sizes:
        extra = "<p>Kept rows by cluster size: " + _e(", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))) + "</p>"
    return _table(["step", "in", "out", "removed", "settings"], rows) + extra


def _review(run: RunDir) -> str:
    agreement = _read_json(run.path / "review" / "agreement.json")
    if not agreement:
        return _missing("review")
    counts = agreement.get("counts", {})
    rows = [[_e(k), _e(v)] for k, v in counts.items()]
    out = f"<p>Mode: <b>{_e(agreement.get('mode'))}</b></p>" + _table(["", "rows"], rows)
    questions = agreement.get("questions") or {}
    if questions:
        qrows = []
        for q, stats in questions.items():
            if isinstance(stats, dict):
                qrows.append([_e(q)] + [_e(_fmt(stats.get(k))) for k in ("agreement", "cohen_kappa", "fleiss_kappa")])
        out += _table(["question", "agreement", "Cohen's kappa", "Fleiss' kappa"], qrows)
    if agreement.get("teacher_accuracy") is not None:
        out += f"<p>Teacher accuracy against reviewers: <b>{_fmt(agreement['teacher_accuracy'])}</b></p>"
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict) and "value" in v:
        return _fmt(v["value"])
    return "-" if v is None else str(v)


def _training(run: RunDir) -> str:
    train_dir = run.path / "train"
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
        rows.append([_e(path.parent.name), len(train), f"{train[-1][1]:.4f}" if train else "-",
                     f"{evals[-1][1]:.4f}" if evals else "-",
                     f'<a href="train/{_e(path.parent.name)}/train.log">log</a>, '
                     f'<a href="train/{_e(path.parent.name)}/loss.csv">loss.csv</a>'])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("training loss")
    return _svg(fig) + _table(["config", "steps", "last train loss", "last eval loss", "files"], rows)


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


def _too_little_html(why: list[str]) -> str:
    return f'<span class="warn">too little data to judge</span> ({_e("; ".join(why))})'


def _task(run: RunDir) -> str:
    task = _read_json(run.path / "eval" / "task.json")
    if not task:
        return _missing("task evaluation")
    headline = task.get("headline") or {}
    rows = []
    for name, v in headline.items():
        if isinstance(v, dict):
            lo, hi = v.get("ci_low", v.get("low")), v.get("ci_high", v.get("high"))
            ci = f"[{lo:.3f}, {hi:.3f}]" if isinstance(lo, float) and isinstance(hi, float) else "-"
            rows.append([_e(name), _fmt(v.get("value")), ci])
        else:
            rows.append([_e(name), _fmt(v), "-"])
    n = task.get("n", task.get("items"))
    out = f"<p>Model: <code>{_e(task.get('model', {}).get('label') if isinstance(task.get('model'), dict) else task.get('model'))}</code>, "
    out += f"{_e(n if n is not None else '?')} test items.</p>"
    why = _too_little(run, test_items=n if isinstance(n, int) else None)
    if why:
        out += f"<p>{_too_little_html(why)}: the intervals below are too wide to rank models.</p>"
    out += _table(["metric", "value", "95% CI (bootstrap)"], rows)
    for fix, count in (task.get("repairs") or {}).items():
        if count:
            out += f"<p>Repaired before scoring: {_e(fix)} on {_e(count)} of {_e(n)} answers.</p>"
    out += _base_comparison(task.get("base_comparison"), why)
    per_class = (task.get("metrics") or {}).get("per_class") or task.get("per_class")
    if isinstance(per_class, dict):
        out += _per_class(per_class)
    return out


def _per_class(per_class: dict[str, Any]) -> str:
    """Per-class table; beyond MAX_CLASS_ROWS classes, the worst (lowest F1, then most support)
    first and the rest behind a toggle, so 150 classes do not push the other sections away."""
    items = [(c, m) for c, m in per_class.items() if isinstance(m, dict)]
    headers = ["class", "precision", "recall", "F1", "support"]

    def row(c: str, m: dict[str, Any]) -> list[str]:
        return [_e(c), _fmt(m.get("precision")), _fmt(m.get("recall")), _fmt(m.get("f1")), _e(m.get("support", ""))]

    if len(items) <= MAX_CLASS_ROWS:
        return _table(headers, [row(c, m) for c, m in items])
    items.sort(key=lambda cm: (float(cm[1].get("f1") or 0.0), -int(cm[1].get("support") or 0), cm[0]))
    head, rest = items[:MAX_CLASS_ROWS], items[MAX_CLASS_ROWS:]
    return (f"<p>{len(items)} classes; the {MAX_CLASS_ROWS} with the lowest F1 first.</p>"
            + _table(headers, [row(c, m) for c, m in head])
            + f"<details><summary>the other {len(rest)} classes</summary>"
            + _table(headers, [row(c, m) for c, m in rest]) + "</details>")


def _base_comparison(comp: dict | None, too_little: list[str] | None = None) -> str:
    """Student vs base on the same test items (eval.task.compare_base)."""
    if not isinstance(comp, dict) or not comp.get("metrics"):
        return ""
    rows = []
    for name, m in comp["metrics"].items():
        lo, hi = (m.get("delta_ci") or [None, None])[:2]
        ci = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if isinstance(lo, float) and isinstance(hi, float) else "-"
        delta = f"{100 * m['delta']:+.1f}" if isinstance(m.get("delta"), float) else "-"
        rows.append([_e(name), _fmt(m.get("base")), _fmt(m.get("student")), delta, ci, _e(m.get("verdict", ""))])
    if too_little:
        verdict = f"{_too_little_html(too_little)}; the comparison says: <span class='muted'>"
    else:
        verdict = '<span class="ok">' if comp.get("learned") else '<span class="bad">'
    out = (f"<p>Student vs base model <code>{_e(comp.get('base'))}</code> on the same {_e(comp.get('n_paired'))} "
           f"test items: {verdict}{_e(comp.get('summary', ''))}</span></p>")
    return out + _table(["metric", "base", "student", "student - base (pts)", "95% CI (paired bootstrap)", "verdict"],
                        rows)


_GATE_TEXT = {"passed": ("ok", "PASSED"), "failed": ("bad", "FAILED"), "not_measured": ("bad", "NOT MEASURED"),
              "not_configured": ("muted", "not configured"), "skipped": ("muted", "skipped")}


def _forgetting(run: RunDir) -> str:
    from stepwise.evals.runner import recorded_gate

    report = _read_json(run.path / "eval" / "forgetting.json")
    if not run.stage_info("eval"):
        return _missing("forgetting evaluation")
    gate = recorded_gate(run)  # the verdict the last eval recorded, as `stepwise run` reads it
    verdict_key = gate["verdict"]
    cls, text = _GATE_TEXT.get(verdict_key, ("warn", verdict_key))
    benches = (report or {}).get("benchmarks") or {}
    items = list(benches.items() if isinstance(benches, dict) else ((b.get("name"), b) for b in benches))
    why = _too_little(run, benchmark_items={n: int(b.get("n") or 0) for n, b in items}) if verdict_key in (
        "passed", "failed") else []
    if why and verdict_key == "passed":
        verdict = f"{_too_little_html(why)}; the gate's own verdict: <span class='muted'>passed</span>"
    else:
        verdict = f'<span class="{cls}">{_e(text)}</span>'
        if why:
            verdict += f" ({_e('; '.join(why))})"
    max_drop = gate.get("max_drop", ((report or {}).get("gate") or {}).get("max_drop"))
    out = f"<p>Gate: {verdict}" + (f" (max drop {_e(max_drop)})" if max_drop is not None else "")
    if gate.get("reason") and not gate.get("not_measured"):  # those are listed one per line below
        out += f": {_e(gate['reason'])}"
    out += "</p>"
    for name, reason in (gate.get("not_measured") or {}).items():
        out += f"<p class='bad'>{_e(name)}: not measured ({_e(reason)})</p>"
    if not report:
        return out
    if verdict_key in ("skipped", "not_configured"):
        out += "<p class='muted'>The table below is from an earlier forgetting eval of this run.</p>"
    rows, names, before, after = [], [], [], []
    for name, b in items:
        bf, af = b.get("before", {}), b.get("after", {})
        bv = bf.get("value", bf) if isinstance(bf, dict) else bf
        av = af.get("value", af) if isinstance(af, dict) else af
        names.append(name)
        before.append(float(bv or 0))
        after.append(float(av or 0))
        flag = " (in-domain: mixed into training)" if b.get("in_domain") else ""
        rows.append([_e(name) + _e(flag), _e(b.get("n", "")), _fmt(bv), _fmt(av),
                     _fmt(b.get("abs_change", b.get("delta"))), _fmt(b.get("rel_change")),
                     '<span class="bad">drop</span>' if b.get("failed") else "ok"])
    if names:
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
        out += _svg(fig)
    out += _table(["benchmark", "questions", "before", "after", "change", "relative", "gate"], rows)
    for tip in gate.get("mitigations") or report.get("mitigations") or []:
        out += f"<p class='muted'>- {_e(tip)}</p>"
    return out


def _notes(run: RunDir) -> str:
    """Every note a stage recorded (the same list `stepwise run` prints under its table)."""
    stages = run.read_manifest().get("stages", {})
    notes = [(name, str(n)) for name in STAGES for n in (stages.get(name) or {}).get("notes") or []]
    if not notes:
        return '<p class="muted">No stage recorded a note.</p>'
    return "<ul>" + "".join(f"<li><b>{_e(stage)}</b>: {_e(n)}</li>" for stage, n in notes) + "</ul>"


def _artifacts(run: RunDir) -> str:
    links = []
    for rel in ["manifest.json", "recipe.yaml", "generate/responses.jsonl", "curate/funnel.json", "curate/train.jsonl",
                "curate/val.jsonl", "curate/test.jsonl", "curate/rejected.jsonl", "review/reviewed.jsonl",
                "review/agreement.json", "export/train.chat.jsonl", "export/val.chat.jsonl", "eval/task.json",
                "eval/forgetting.json"]:
        if (run.path / rel).exists():
            links.append(f'<li><a href="{_e(rel)}">{_e(rel)}</a></li>')
    for cfg in sorted((run.path / "configs").glob("*.yaml")) if (run.path / "configs").exists() else []:
        rel = cfg.relative_to(run.path)
        links.append(f'<li><a href="{_e(rel)}">{_e(rel)}</a> (Axolotl config)</li>')
    return "<ul>" + "".join(links) + "</ul>"


SECTIONS = [
    ("Stages", _stages), ("Teacher", _teacher), ("Curation funnel", _funnel),
    ("Label distribution", _balance), ("Deduplication", _dedup), ("Review", _review),
    ("Training", _training), ("Task metrics", _task), ("Forgetting", _forgetting), ("Notes", _notes),
    ("Artifacts", _artifacts),
]


def render_report(recipe: Recipe, run: RunDir) -> str:
    m = run.read_manifest()
    body = []
    for title, fn in SECTIONS:
        try:
            content = fn(run)
        except Exception as exc:  # noqa: BLE001 - a broken section must not hide the others
            content = f'<p class="bad">could not render: {_e(type(exc).__name__)}: {_e(exc)}</p>'
        anchor = title.lower().replace(" ", "-")
        body.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{content}</section>')
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>stepwise: {_e(recipe.name)}</title>"
        f"<style>{CSS}</style></head><body><h1>stepwise run: {_e(recipe.name)}</h1>"
        f"<p class='muted'>run {_e(m.get('run_id'))}, created {_e(m.get('created'))}, updated {_e(m.get('updated'))}. "
        f"{_e(recipe.description or '')}</p>" + "".join(body) + "</body></html>"
    )


def write_report(recipe: Recipe, run: RunDir) -> Path:
    path = run.path / "report.html"
    with run.stage("report", inputs=[run.manifest_path]) as st:
        atomic_write_text(path, render_report(recipe, run))
        st.outputs(path)
    return path
