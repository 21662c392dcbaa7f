"""`stepwise experiment`: the DSS paper's experiments as one grid (hand-written).

The grid is `training.sweep`: target (training.dss_output) x data_fraction x modality x lora_r x
alpha_ratio x learning_rate x general_mix; an axis left empty takes the recipe's own value. The
stages before training (everything up to and including `review` in stepwise.pipeline.PIPELINE)
run once, in `<exp>/shared/`, a normal run directory; every point is a sub-run in
`<exp>/points/<id>/` that starts from a copy of the shared stages' files (the training rows cut
to the point's data fraction, general data mixed at its fraction) and runs the pipeline's
remaining stages, the same functions `stepwise run` calls (export, configs, train, eval, report:
whatever PIPELINE lists after review, up to the report), so its outputs and manifest look like a
normal run's. Nothing here copies the stage sequence.

- Data fractions are nested: rows are ordered per label by the curation seed's hash of their id
  (stepwise.curation.splits, the order the splits use) and a fraction keeps the first
  ceil(fraction x n) of each label, so every smaller fraction is a subset of every larger one.
- Resumable: `points/<id>/point.json` says `done` once the point's pipeline finished (exit 0, or 4
  when only the forgetting gate failed); a done point is skipped; any other point runs again, and
  the pipeline's own fingerprints skip the stages it had already finished (a killed training run
  resumes from its last checkpoint).
- The planner (stepwise.training.vram) decides which points fit `training.gpu_memory_gb` (the
  others are listed "does not fit (planner: X GB)" and never launched) and how many run at once
  under `--parallel` (per visible GPU, as many as fit in its memory; each worker is a
  `stepwise experiment --points <id>` process pinned to one GPU through CUDA_VISIBLE_DEVICES).
- One curation version per grid: each point records in point.json the fingerprint of the shared
  curated data it trained on (`shared_data`: a content hash of the curated splits and reviewed rows),
  experiment.json the one its points started on. When the shared curate re-ran and wrote other rows
  under finished points, the experiment stops (exit 2, SharedDataChanged) naming them: `--force`
  runs them again on the new data, a fresh `--dir` keeps this one. The report draws points trained
  on older data on curves of their own and compares them with nothing.
- Bad input exits 2 before anything runs, naming the point: a point the recipe's validation or the
  training backend refuses (e.g. `qlora` with `backend: trl`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stepwise.io import atomic_write_json, atomic_write_jsonl, canonical_json, iter_jsonl, sha256_text
from stepwise.layout import ExperimentLayout
from stepwise.pipeline import PIPELINE, RunOptions, RunSummary, run_pipeline
from stepwise.recipe import Recipe, SweepSpec, TrainingSpec
from stepwise.rundir import RunDir, create_run

AXES = ("target", "data_fraction", "modality", "lora_r", "alpha_ratio", "learning_rate", "general_mix")
SHARED_UNTIL = "review"  # the last stage every point shares
POINTS_UNTIL = "report"  # a point stops after its report (packaging is for the chosen model)


class ExperimentError(ValueError):
    """Bad input (exit 2): the message names the point or the axis."""


class SharedDataChanged(ExperimentError):
    """The shared curated data changed under finished points (exit 2): mixing would put two
    curation versions in one grid. `stale` names the points trained on the old data."""

    def __init__(self, message: str, stale: list[str]):
        super().__init__(message)
        self.stale = stale


@dataclass
class Point:
    index: int
    id: str
    values: dict[str, Any]  # every axis's effective value
    recipe: Recipe  # the point's recipe: sweep emptied, the axes' values set
    estimate_gb: float | None = None  # the planner's per-GPU estimate (None: not estimable)
    fits: bool = True

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items() if v is not None)


# -- the grid ----------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}"


def _point_id(values: dict[str, Any], swept: set[str]) -> str:
    tags = []
    for axis, fmt in (("target", str), ("data_fraction", lambda v: f"f{_fmt(v)}"), ("modality", str),
                      ("lora_r", lambda v: f"r{v}"), ("alpha_ratio", lambda v: f"a{_fmt(v)}"),
                      ("learning_rate", lambda v: f"lr{v:.0e}".replace("e-0", "e-")),
                      ("general_mix", lambda v: f"g{_fmt(v)}")):
        if axis in ("lora_r", "alpha_ratio") and values.get("modality") == "full":
            continue  # no adapter: rank and alpha do not name anything
        if axis in swept and values.get(axis) is not None:
            tags.append(fmt(values[axis]))
    return "-".join(tags) or "base"


def plan_points(recipe: Recipe, *, check_backend: bool = True) -> list[Point]:
    """Every point of the recipe's grid, validated; raises ExperimentError naming a bad point."""
    spec = recipe.training
    sw = spec.sweep
    swept = set(sw.experiment_axes)
    if "general_mix" in swept and recipe.curation.general_mix is None:
        raise ExperimentError("training.sweep.general_mix: needs curation.general_mix.file (the general data to mix)")
    base_mix = recipe.curation.general_mix.fraction if recipe.curation.general_mix else None
    ratios = sw.alpha_ratio or [spec.effective_lora_alpha / spec.lora_r]
    grid = itertools.product(sw.target or [spec.dss_output], sw.data_fraction or [1.0], sw.modality or [spec.modality],
                             sw.lora_r or [spec.lora_r], ratios, sw.learning_rate or [spec.learning_rate],
                             sw.general_mix or [base_mix])
    points: list[Point] = []
    seen: set[str] = set()
    for target, frac, modality, r, ratio, lr, mix in grid:
        if modality == "full":  # rank and alpha mean nothing without an adapter (as stepwise configs)
            r, ratio = None, None
        values = {"target": target, "data_fraction": frac, "modality": modality, "lora_r": r,
                  "alpha_ratio": ratio, "learning_rate": lr, "general_mix": mix}
        pid = _point_id(values, swept)
        if pid in seen:
            continue
        seen.add(pid)
        points.append(Point(len(points), pid, values, _point_recipe(recipe, values, pid)))
    if check_backend:
        for pt in points:
            _check_backend(pt)
    _plan_memory(points)
    return points


def _point_recipe(recipe: Recipe, values: dict[str, Any], pid: str) -> Recipe:
    """The recipe a point trains with: its axis values set, no sweep (one config per point)."""
    dump = recipe.training.model_dump()
    dump.update(dss_output=values["target"], modality=values["modality"], learning_rate=values["learning_rate"],
                sweep=SweepSpec().model_dump())
    if values["lora_r"] is not None:  # None: full fine-tuning, no adapter
        dump.update(lora_r=values["lora_r"], lora_alpha=max(1, round(values["alpha_ratio"] * values["lora_r"])))
    try:
        training = TrainingSpec.model_validate(dump)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'training'}: {e['msg']}" for e in exc.errors())
        raise ExperimentError(f"point {pid}: training cannot take these values: {msgs}") from None
    if values["target"] in ("multitask", "cot") and recipe.teacher.format == "label_only":
        raise ExperimentError(f"point {pid}: target {values['target']} trains on rationales, but teacher.format is "
                              "label_only (no rationales are generated)")
    update: dict[str, Any] = {"training": training}
    if values["general_mix"] is not None and recipe.curation.general_mix is not None:
        mix = recipe.curation.general_mix.model_copy(update={"fraction": values["general_mix"]})
        update["curation"] = recipe.curation.model_copy(update={"general_mix": mix})
    point = recipe.model_copy(update=update)
    point.source_path = recipe.source_path
    return point


def _check_backend(pt: Point) -> None:
    """The training backend's own refusal (e.g. the TRL backend does not train qlora), at plan time."""
    from stepwise.training.backends import generate_configs, get_backend

    if not get_backend(pt.recipe.training.backend).writes_configs:
        return
    try:
        generate_configs(pt.recipe, run_dir=None, use_data=False)
    except ValueError as exc:
        raise ExperimentError(f"point {pt.id} ({pt.describe()}): {exc}") from None


def _plan_memory(points: list[Point]) -> None:
    """The planner's per-GPU estimate of each point, and whether it fits training.gpu_memory_gb."""
    from stepwise.training.configgen import DEFAULT_OPTIMIZER, DEFAULT_SEQUENCE_LEN, plan_input
    from stepwise.training.shapes import resolve_shape
    from stepwise.training.vram import estimate

    for pt in points:
        spec = pt.recipe.training
        if spec.modality not in DEFAULT_OPTIMIZER:  # auto picks what fits; TRL's PEFT methods: not planned
            continue
        try:
            shape = resolve_shape(spec.base_model)
        except (ValueError, FileNotFoundError):
            continue
        seq = spec.sequence_len or DEFAULT_SEQUENCE_LEN
        est = estimate(shape, plan_input(spec, spec.modality, spec.lora_r, seq,
                                         spec.optimizer or DEFAULT_OPTIMIZER[spec.modality]))
        pt.estimate_gb = round(est.total_gb, 2)
        pt.fits = est.fits(spec.gpu_memory_gb)


def select_points(points: list[Point], selection: str | None) -> list[Point]:
    """`--points`: comma-separated indices, ranges (`0-3`) or point ids; None = all."""
    if not selection:
        return list(points)
    by_id = {p.id: p for p in points}
    chosen: list[Point] = []
    for part in (s.strip() for s in selection.split(",")):
        if not part:
            continue
        if part in by_id:
            picked = [by_id[part]]
        elif part.isdigit() and int(part) < len(points):
            picked = [points[int(part)]]
        elif "-" in part and all(x.isdigit() for x in part.split("-", 1)):
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi >= len(points) or lo > hi:
                raise ExperimentError(f"--points {part}: the grid has points 0-{len(points) - 1}")
            picked = points[lo: hi + 1]
        else:
            raise ExperimentError(f"--points {part}: not a point index (0-{len(points) - 1}) or id "
                                  f"({', '.join(p.id for p in points[:6])}{', ...' if len(points) > 6 else ''})")
        chosen += [p for p in picked if p not in chosen]
    return chosen


def parallel_slots(points: list[Point], wanted: int, gpus: int) -> tuple[int, str]:
    """How many points may run at once: one process per slot, slots per GPU as many as fit its
    memory by the planner's largest estimate among `points` (a CPU machine counts as one device)."""
    if wanted <= 1 or not points:
        return 1, ""
    budget = points[0].recipe.training.gpu_memory_gb
    biggest = max((p.estimate_gb or 0.0) for p in points)
    per_device = max(1, int(budget // biggest)) if biggest > 0 else wanted
    cap = per_device * max(gpus, 1)
    if wanted > cap:
        return cap, (f"--parallel {wanted}: {cap} at once ({max(gpus, 1)} device(s) x {per_device} per "
                     f"{budget:g} GB, planner: {biggest:.1f} GB per point)")
    return wanted, ""


# -- one point's data ----------------------------------------------------------------------------


def nested_subset(rows: list[dict[str, Any]], fraction: float, seed: int,
                  stratum: Callable[[dict[str, Any]], Any] | None) -> list[dict[str, Any]]:
    """The first ceil(fraction x n) rows of each stratum in the seed's hash order of their ids:
    nested across fractions (a smaller fraction's rows are a subset of a larger one's). Input order kept."""
    from stepwise.curation.splits import _order_key

    if fraction >= 1.0:
        return list(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = stratum(r) if stratum else None
        groups.setdefault("" if key is None else str(key), []).append(r)
    keep: set[int] = set()
    for members in groups.values():
        ordered = sorted(members, key=lambda r: _order_key(seed, str(r["id"])))
        keep.update(id(r) for r in ordered[: math.ceil(fraction * len(ordered))])
    return [r for r in rows if id(r) in keep]


def _stratum(recipe: Recipe) -> Callable[[dict[str, Any]], Any] | None:
    return (lambda r: r.get("label")) if recipe.task.is_classification else None


def _point_train(rows: list[dict[str, Any]], recipe: Recipe, fraction: float) -> list[dict[str, Any]]:
    """A point's training rows: the in-domain rows cut to its fraction, general data mixed again at
    its own general_mix fraction (of the smaller set), as curate mixes it (stepwise.curation.mixing)."""
    from stepwise.curation.mixing import mix_step

    domain = [r for r in rows if not r.get("general")]
    subset = nested_subset(domain, fraction, recipe.curation.seed, _stratum(recipe))
    mixed = mix_step(subset, recipe).kept
    for r in mixed:
        r.setdefault("split", "train")
    return mixed


def prepare_point(recipe: Recipe, pt: Point, shared: RunDir, run: RunDir) -> dict[str, Any]:
    """Lay the shared stages' files into the point's run (hard links; the train split cut to the
    point's fraction) and their manifest entries, so the remaining stages run as in any run."""
    names = [s.name for s in PIPELINE]
    shared_stages = names[: names.index(SHARED_UNTIL) + 1]
    for stage in shared_stages:
        src = shared.layout.stage_dir(stage)
        if not src.is_dir():
            continue
        dst = run.layout.stage_dir(stage)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    fraction = pt.values["data_fraction"]
    counts: dict[str, Any] = {"fraction": fraction}
    train_path = run.layout.curated("train")
    if train_path.exists():
        shared_train = [r for _, r in iter_jsonl(shared.layout.curated("train"))]
        mine = _point_train(shared_train, pt.recipe, fraction)
        _replace_jsonl(train_path, mine)
        counts.update(curated_train=len(mine), shared_curated_train=len(shared_train))
    if run.layout.reviewed.exists():  # export reads the reviewed rows when the review is done
        rows = [r for _, r in iter_jsonl(shared.layout.reviewed)]
        train = [r for r in rows if r.get("split", "train") == "train"]
        mine = _point_train(train, pt.recipe, fraction)
        _replace_jsonl(run.layout.reviewed, mine + [r for r in rows if r.get("split", "train") != "train"])
        counts.update(reviewed_train=len(mine), shared_reviewed_train=len(train))
    shared_manifest = shared.read_manifest()

    def put(m: dict[str, Any]) -> None:
        stages = m.setdefault("stages", {})
        for stage in shared_stages:
            info = (shared_manifest.get("stages") or {}).get(stage)
            if info:
                stages[stage] = {**info, "shared_from": str(shared.path)}
        m["experiment"] = {"point": pt.id, "index": pt.index, "values": pt.values, "shared_run": str(shared.path),
                           "data": counts, "shared_data": shared_data_fingerprint(shared)}

    run.update_manifest(put)
    return counts


def shared_data_fingerprint(shared: RunDir) -> str | None:
    """A content hash of what the points take from the shared run: the curated splits and the
    reviewed rows (None before curate wrote anything). The stage fingerprints cannot serve: they
    hash a stage's inputs, and a point must know whether the rows themselves changed."""
    from stepwise.io import sha256_file
    from stepwise.layout import SPLITS

    files = [shared.layout.curated(s) for s in SPLITS] + [shared.layout.reviewed]
    present = [(p.relative_to(shared.path).as_posix(), sha256_file(p)) for p in files if p.exists()]
    if not present:
        return None
    return sha256_text(canonical_json(present))


def _recorded(layout: ExperimentLayout) -> dict[str, Any]:
    try:
        plan = json.loads(layout.plan.read_text(encoding="utf-8")) if layout.plan.exists() else {}
    except (OSError, ValueError):
        return {}
    return plan.get("shared_data") or {}


def recorded_data_fingerprint(layout: ExperimentLayout) -> str | None:
    """The shared data's fingerprint the experiment recorded when its points started (experiment.json)."""
    return _recorded(layout).get("fingerprint")


def point_data_fingerprint(layout: ExperimentLayout, pid: str) -> str | None:
    """The shared data's fingerprint a point trained on: its point.json's, else (a point finished
    before fingerprints were recorded) the experiment's."""
    return read_status(layout, pid).get("shared_data") or recorded_data_fingerprint(layout)


def stale_points(layout: ExperimentLayout, points: list[Point], current: str | None) -> list[str]:
    """Finished points trained on shared data other than `current`."""
    if current is None:
        return []
    return [p.id for p in points if read_status(layout, p.id).get("status") == "done"
            and point_data_fingerprint(layout, p.id) not in (None, current)]


def _record_data_fingerprint(layout: ExperimentLayout, points: list[Point], fingerprint: str | None) -> None:
    previous = recorded_data_fingerprint(layout)
    if previous:  # a finished point without its own fingerprint trained on the one recorded until now
        for p in points:
            rec = read_status(layout, p.id)
            if rec.get("status") == "done" and not rec.get("shared_data"):
                atomic_write_json(layout.point_status(p.id), {**rec, "shared_data": previous})
    plan = json.loads(layout.plan.read_text(encoding="utf-8")) if layout.plan.exists() else {}
    plan["shared_data"] = {"fingerprint": fingerprint, "recorded": _now()}
    atomic_write_json(layout.plan, plan)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.unlink(missing_ok=True)  # a hard link to the shared file: never write through it
    atomic_write_jsonl(path, rows)


def point_recipe_yaml(pt: Point) -> str:
    """The point's effective recipe as YAML (written as the sub-run's recipe.yaml)."""
    import yaml

    head = (f"# point {pt.id} of an experiment: the recipe {pt.recipe.source_path} with {pt.describe()}\n"
            f"# (relative paths are relative to {pt.recipe.base_dir})\n")
    return head + yaml.safe_dump(pt.recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


# -- running ---------------------------------------------------------------------------------------


@dataclass
class PointOutcome:
    point: Point
    status: str  # done | skipped | failed | stopped | does_not_fit | not_selected
    exit_code: int = 0
    detail: str = ""
    wall_s: float = 0.0


@dataclass
class ExperimentSummary:
    layout: ExperimentLayout
    points: list[Point]
    shared: RunSummary | None = None
    outcomes: list[PointOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exit_code: int = 0


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def default_dir(recipe: Recipe) -> Path:
    return recipe.resolve(recipe.runs_dir) / recipe.name / "experiment"  # type: ignore[operator]


def read_status(layout: ExperimentLayout, pid: str) -> dict[str, Any]:
    path = layout.point_status(pid)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def write_plan(recipe: Recipe, layout: ExperimentLayout, points: list[Point], flags: list[str]) -> None:
    """experiment.json; `flags` are the run options a point is reproduced with (--cpu, --max-steps ...).
    The shared data's recorded fingerprint (`shared_data`) is kept: it is what the finished points trained on."""
    kept = _recorded(layout)
    atomic_write_json(layout.plan, {
        **({"shared_data": kept} if kept else {}),
        "recipe": str(recipe.source_path), "name": recipe.name, "axes": recipe.training.sweep.experiment_axes,
        "shared_until": SHARED_UNTIL, "updated": _now(), "flags": flags,
        "points": [{"index": p.index, "id": p.id, "values": p.values, "estimate_gb": p.estimate_gb, "fits": p.fits,
                    "run": str(layout.point(p.id).relative_to(layout.root))} for p in points],
    })


def run_shared(recipe: Recipe, layout: ExperimentLayout, opts: RunOptions,
               on_stage: Callable[[Any], None] | None = None) -> RunSummary:
    run = create_run(recipe, layout.shared, point_latest=False)
    return run_pipeline(recipe, run, replace(opts, from_stage=None, until_stage=SHARED_UNTIL), on_stage=on_stage)


def point_stages() -> tuple[str, str]:
    """(first, last) stage a point runs: the one after the shared ones .. the report (or the end)."""
    names = [s.name for s in PIPELINE]
    last = POINTS_UNTIL if POINTS_UNTIL in names else names[-1]
    return names[names.index(SHARED_UNTIL) + 1], last


def run_point(recipe: Recipe, layout: ExperimentLayout, pt: Point, opts: RunOptions, *,
              on_stage: Callable[[Any], None] | None = None) -> PointOutcome:
    """One point as a sub-run (in this process). Records point.json; logs to the tracker."""
    t0 = time.time()
    shared = RunDir(layout.shared)
    run = create_run(pt.recipe, layout.point(pt.id), point_latest=False)
    run.layout.recipe_copy.write_text(point_recipe_yaml(pt), encoding="utf-8")
    prev = read_status(layout, pt.id)
    data_fp = shared_data_fingerprint(shared)  # what prepare_point is about to copy: recorded as trained on
    atomic_write_json(layout.point_status(pt.id), {**prev, "status": "running", "pid": os.getpid(), "started": _now(),
                                                   "values": pt.values, "shared_data": data_fp})
    tracking = pt.recipe.training.tracking
    run_id = prev.get("tracking_run_id")
    env_before = dict(os.environ)
    try:
        if tracking.mlflow or tracking.wandb:
            from stepwise.training.tracking import open_mlflow_run, run_env, wandb_run_id

            # the run is opened (MLflow) or its id chosen (W&B) now: the trainer's callback resumes it and
            # log_point adds the point's metrics to it
            run_id = open_mlflow_run(tracking, pt.id, run_id) if tracking.mlflow else wandb_run_id(run_id)
            os.environ.update(run_env(tracking, run_id))
            # recorded now, so a point killed mid-way logs to the same run when it restarts
            atomic_write_json(layout.point_status(pt.id), {**read_status(layout, pt.id), "tracking_run_id": run_id})
        prepare_point(recipe, pt, shared, run)
        first, last = point_stages()
        summary = run_pipeline(pt.recipe, run, replace(opts, from_stage=first, until_stage=last), on_stage=on_stage)
    except Exception as exc:  # noqa: BLE001 - recorded on the point; the other points still run
        detail = f"{type(exc).__name__}: {exc}"
        atomic_write_json(layout.point_status(pt.id), {"status": "failed", "exit_code": 1, "finished": _now(),
                                                       "values": pt.values, "detail": detail,
                                                       "tracking_run_id": run_id, "shared_data": data_fp})
        return PointOutcome(pt, "failed", 1, detail, time.time() - t0)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    code = summary.exit_code
    status = "done" if code in (0, 4) else "stopped" if code == 3 else "failed"
    failed = next((o for o in summary.outcomes if o.status in ("failed", "stopped")), None)
    detail = f"{failed.stage}: {failed.detail}" if failed else ""
    record = {"status": status, "exit_code": code, "finished": _now(), "wall_s": round(time.time() - t0, 1),
              "values": pt.values, "detail": detail, "shared_data": data_fp}
    if status == "done" and (tracking.mlflow or tracking.wandb):
        from stepwise.experiment_report import point_result
        from stepwise.training.tracking import log_point

        res = point_result(layout, pt.id)
        metrics = {k: v for k, v in (res.get("metrics") or {}).items()}
        metrics.update(teacher_cost_usd=res.get("teacher_cost") or 0.0, data_fraction=pt.values["data_fraction"],
                       train_rows=res.get("train_rows") or 0)
        params = {k: v for k, v in pt.values.items() if v is not None}
        record["tracking_run_id"] = log_point(tracking, pt.id, run_id, metrics, params)
    elif run_id:
        record["tracking_run_id"] = run_id
    atomic_write_json(layout.point_status(pt.id), record)
    return PointOutcome(pt, status, code, detail, time.time() - t0)


def _worker_cmd(recipe: Recipe, layout: ExperimentLayout, pt: Point, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "stepwise", "experiment", str(recipe.source_path), "--dir", str(layout.root),
            "--points", pt.id, "--yes", "--worker", *flags]


def run_parallel(recipe: Recipe, layout: ExperimentLayout, points: list[Point], slots: int, flags: list[str],
                 gpus: int, log: Callable[[str], None]) -> list[PointOutcome]:
    """Each point in its own `stepwise experiment --worker` process, `slots` at a time; with GPUs,
    worker k sees GPU k mod gpus only (CUDA_VISIBLE_DEVICES)."""
    queue = list(points)
    running: dict[int, tuple[subprocess.Popen, Point, float, Any]] = {}
    outcomes: list[PointOutcome] = []
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill` of this process: stop the workers too
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        _drain(recipe, layout, queue, running, outcomes, slots, flags, gpus, log)
    finally:  # interrupted (Ctrl-C, kill, an error): no worker outlives this process to train on unattended
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for proc, _pt, _, logf in running.values():
            if proc.poll() is None:  # the worker's process group: it and its trainer process
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            logf.close()
    return outcomes


def _drain(recipe: Recipe, layout: ExperimentLayout, queue: list[Point],
           running: dict[int, tuple[subprocess.Popen, Point, float, Any]], outcomes: list[PointOutcome], slots: int,
           flags: list[str], gpus: int, log: Callable[[str], None]) -> None:
    while queue or running:
        while queue and len(running) < slots:
            slot = next(i for i in range(slots) if i not in running)
            pt = queue.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            layout.point(pt.id).mkdir(parents=True, exist_ok=True)
            logf = (layout.point(pt.id) / "experiment.log").open("a", encoding="utf-8")
            # its own process group, so stopping it stops its trainer process too
            proc = subprocess.Popen(_worker_cmd(recipe, layout, pt, flags), env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            running[slot] = (proc, pt, time.time(), logf)
            log(f"started {pt.id} (slot {slot}, log {layout.point(pt.id) / 'experiment.log'})")
        time.sleep(0.5)
        for slot, (proc, pt, t0, logf) in list(running.items()):
            if proc.poll() is None:
                continue
            logf.close()
            del running[slot]
            rec = read_status(layout, pt.id)
            status = rec.get("status") if rec.get("status") in ("done", "failed", "stopped") else "failed"
            detail = rec.get("detail") or ("" if status == "done" else f"worker exit {proc.returncode}")
            outcomes.append(PointOutcome(pt, status, int(rec.get("exit_code", proc.returncode)), detail,
                                         time.time() - t0))
            log(f"{status} {pt.id}")


def _guard_shared_data(layout: ExperimentLayout, points: list[Point], force: bool, log: Callable[[str], None],
                       notes: list[str]) -> None:
    """One grid, one curation version: stop (SharedDataChanged) when the shared curated data is no
    longer what finished points trained on, unless --force re-runs them; else record the current
    data as the experiment's (experiment.json `shared_data`)."""
    current = shared_data_fingerprint(RunDir(layout.shared))
    recorded = recorded_data_fingerprint(layout)
    stale = stale_points(layout, points, current)
    if stale and not force:
        raise SharedDataChanged(
            f"the shared curated data in {layout.shared} changed (the recipe or its inputs changed since the "
            f"finished points ran): {len(stale)} finished point(s) trained on the old data: {', '.join(stale)}. "
            "One grid must not mix curation versions. Pass --force to run every point again on the new data, "
            "or --dir with a fresh directory to keep this experiment as it is.", stale)
    if stale:  # --force: the selected points run again on the new data; the others stay marked as older
        log(f"shared curated data changed: --force re-runs the selected points on it (trained on the old: {', '.join(stale)})")
    if recorded is None and current is not None:
        legacy = [p.id for p in points if read_status(layout, p.id).get("status") == "done"]
        if legacy:  # finished before fingerprints were recorded: nothing tells which data they saw
            notes.append(f"points {', '.join(legacy)} finished before the shared data's fingerprint was recorded; "
                         "taken as trained on the current shared data")
    if current != recorded:
        _record_data_fingerprint(layout, points, current)


def run_experiment(recipe: Recipe, layout: ExperimentLayout, points: list[Point], selected: list[Point],
                   opts: RunOptions, *, parallel: int = 1, force: bool = False, worker: bool = False,
                   worker_flags: list[str] | None = None, log: Callable[[str], None] = lambda m: None,
                   on_stage: Callable[[Any], None] | None = None) -> ExperimentSummary:
    """The shared stages, then each selected point; then results.json and experiment.html."""
    from stepwise.training.launcher import visible_gpus

    summary = ExperimentSummary(layout, points)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not worker:
        write_plan(recipe, layout, points, worker_flags or [])
        summary.shared = run_shared(recipe, layout, opts, on_stage=on_stage)
        if summary.shared.exit_code not in (0, 4):
            summary.exit_code = summary.shared.exit_code
            return summary
        _guard_shared_data(layout, points, force, log, summary.notes)
    todo: list[Point] = []
    chosen = {p.id for p in selected}
    summary.outcomes += [PointOutcome(pt, "not_selected") for pt in points if pt.id not in chosen]
    for pt in selected:  # in the order --points named them
        if not pt.fits:
            summary.outcomes.append(PointOutcome(pt, "does_not_fit", detail=f"does not fit (planner: {pt.estimate_gb:.1f} "
                                                 f"GB > training.gpu_memory_gb {pt.recipe.training.gpu_memory_gb:g})"))
        elif read_status(layout, pt.id).get("status") == "done" and not force:
            summary.outcomes.append(PointOutcome(pt, "skipped", detail="finished earlier"))
        else:
            todo.append(pt)
    gpus = visible_gpus()
    slots, why = parallel_slots(todo, parallel, gpus)
    if why:
        summary.notes.append(why)
        log(why)
    if slots > 1 and len(todo) > 1:
        summary.outcomes += run_parallel(recipe, layout, todo, slots, [*(worker_flags or []), *(["--force"] if force else [])],
                                         gpus, log)
    else:
        for pt in todo:
            log(f"point {pt.index} {pt.id}: {pt.describe()}")
            # --force: every stage of the point again (as `stepwise run --force`), not only the changed ones
            summary.outcomes.append(run_point(recipe, layout, pt, replace(opts, force=opts.force or force),
                                              on_stage=on_stage))
    order = {p.id: p.index for p in points}
    summary.outcomes.sort(key=lambda o: order[o.point.id])
    if any(o.status == "failed" for o in summary.outcomes):
        summary.exit_code = 1
    elif any(o.status == "stopped" for o in summary.outcomes):
        summary.exit_code = 3
    if not worker:
        from stepwise.experiment_report import write_experiment_report

        write_experiment_report(recipe, layout, points)
    return summary
