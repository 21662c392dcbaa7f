"""`stepwise experiment` (stepwise.experiment): the grid, nested data fractions, bad input, the
planner in the loop, tracking keys; the real 2 x 2 grid on support-tickets is the slow test at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from stepwise.training.backends import generate_configs
from stepwise.training.configgen import sweep_points
from stepwise.training.testing import make_run, write_recipe
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.experiment import (
    ExperimentError,
    nested_subset,
    parallel_slots,
    plan_points,
    select_points,
)
from stepwise.recipe import load_recipe
from tests.conftest import REPO

runner = CliRunner()


def _recipe(tmp_path: Path, extra: str):
    return load_recipe(write_recipe(tmp_path, extra))


def test_grid_points_values_and_ids(tmp_path):
    recipe = _recipe(tmp_path, """\
    modality: lora
    lora_r: 8
    sweep:
      target: [multitask, label_only]
      data_fraction: [0.5, 1.0]
      modality: [full, lora]
      alpha_ratio: [2, 4]
    """)
    points = plan_points(recipe)
    ids = [p.id for p in points]
    # full ignores the alpha ratio: 2 targets x 2 fractions x (1 full + 2 lora)
    assert len(points) == 12 and len(set(ids)) == 12
    assert ids[0] == "multitask-f0.5-full" and "label_only-f1-lora-a2" in ids
    by = {p.id: p for p in points}
    pt = by["label_only-f1-lora-a2"]
    assert pt.recipe.training.dss_output == "label_only" and pt.recipe.training.lora_alpha == 16
    assert pt.recipe.training.sweep.experiment_axes == {}  # one config per point
    assert pt.recipe.source_path == recipe.source_path
    # the planner's estimate is there for every full/lora point and a 135M model fits 24 GB
    assert all(p.estimate_gb and p.fits for p in points)
    assert [p.index for p in points] == list(range(12))


def test_existing_sweep_still_writes_one_config_per_point(tmp_path):
    """The new axes are the experiment's; `stepwise configs` still sweeps modality/rank/alpha/LR."""
    recipe, run_dir = make_run(tmp_path, """\
    modality: lora
    micro_batch_size: 1
    gradient_accumulation_steps: 1
    sweep:
      lora_r: [8, 16]
      target: [multitask, label_only]
      data_fraction: [0.5, 1.0]
    """)
    configs = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path, use_data=False)
    assert [c.name for c in configs] == ["tiny-train-lora-r8", "tiny-train-lora-r16"]
    assert len(sweep_points(recipe.training)) == 2


def test_nested_fractions_are_subsets_and_stratified():
    rows = [{"id": f"r{i}", "label": "a" if i % 3 else "b"} for i in range(60)]

    def strat(r):
        return r["label"]

    subsets = {f: {r["id"] for r in nested_subset(rows, f, 42, strat)} for f in (0.125, 0.25, 0.5, 1.0)}
    assert subsets[0.125] < subsets[0.25] < subsets[0.5] < subsets[1.0]
    half = nested_subset(rows, 0.5, 42, strat)
    assert sum(r["label"] == "b" for r in half) == 10 and sum(r["label"] == "a" for r in half) == 20
    assert [r["id"] for r in half] == [r["id"] for r in rows if r["id"] in subsets[0.5]]  # input order kept
    assert {r["id"] for r in nested_subset(rows, 0.5, 7, strat)} != subsets[0.5]  # the seed decides
    assert nested_subset(rows, 0.5, 42, strat) == half  # and only the seed


def test_point_the_backend_cannot_train_exits_2_naming_it(tmp_path):
    recipe_path = write_recipe(tmp_path, """\
    backend: trl
    modality: ia3
    sweep:
      modality: [lora, qlora]
    """)
    with pytest.raises(ExperimentError, match="point qlora"):
        plan_points(load_recipe(recipe_path))
    res = runner.invoke(app, ["experiment", str(recipe_path), "--dry-run"])
    assert res.exit_code == 2 and "point qlora" in res.output


def test_general_mix_axis_needs_a_general_file(tmp_path):
    recipe = _recipe(tmp_path, "sweep:\n  general_mix: [0.0, 0.1]\n")
    with pytest.raises(ExperimentError, match="curation.general_mix"):
        plan_points(recipe)


def test_rationale_targets_need_a_dss_teacher(tmp_path):
    path = write_recipe(tmp_path, "sweep:\n  target: [cot]\n")
    text = path.read_text().replace("  base_url: http://127.0.0.1:1/v1\n",
                                    "  base_url: http://127.0.0.1:1/v1\n  format: label_only\n")
    path.write_text(text)
    with pytest.raises(ExperimentError, match="point cot: target cot trains on rationales"):
        plan_points(load_recipe(path))


def test_repeated_axis_values_are_bad_input(tmp_path):
    path = write_recipe(tmp_path, "sweep:\n  data_fraction: [0.5, 0.5]\n")
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "data_fraction" in res.output


def test_points_selection_and_max_points_confirmation(tmp_path):
    recipe_path = write_recipe(tmp_path, "modality: lora\nsweep:\n  data_fraction: [0.25, 0.5, 1.0]\n"
                               "  target: [multitask, label_only]\n")
    points = plan_points(load_recipe(recipe_path))
    assert [p.id for p in select_points(points, "0,label_only-f1")] == ["multitask-f0.25", "label_only-f1"]
    assert [p.index for p in select_points(points, "1-3")] == [1, 2, 3]
    with pytest.raises(ExperimentError, match="--points 9"):
        select_points(points, "9")
    # larger than --max-points: asks; declining starts nothing (exit 2)
    res = runner.invoke(app, ["experiment", str(recipe_path), "--max-points", "4", "--dir", str(tmp_path / "exp")],
                        input="n\n")
    assert res.exit_code == 2 and "more than --max-points 4" in res.output
    assert not (tmp_path / "exp" / "shared").exists()


def test_planner_caps_parallel_and_lists_points_that_do_not_fit(tmp_path):
    recipe_path = write_recipe(tmp_path, """\
    base_model: llama-7b
    gpu_memory_gb: 24
    sequence_len: 2048
    sweep:
      modality: [full, lora, qlora]
    """)
    points = plan_points(load_recipe(recipe_path), check_backend=False)
    by = {p.id: p for p in points}
    assert not by["full"].fits and by["full"].estimate_gb > 24
    assert by["qlora"].fits and by["lora"].fits
    res = runner.invoke(app, ["experiment", str(recipe_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "does not fit (planner:" in res.output
    # qlora ~ 10 GB fits twice in 24 GB on one GPU; the lora estimate decides when both run
    fitting = [by["qlora"]]
    slots, why = parallel_slots(fitting, 8, gpus=1)
    assert slots == int(24 // by["qlora"].estimate_gb) and "planner" in why
    assert parallel_slots(fitting, 8, gpus=2)[0] == 2 * slots
    assert parallel_slots(fitting, 1, gpus=2) == (1, "")


def test_tracking_sets_axolotl_and_trl_keys(tmp_path):
    recipe, run_dir = make_run(tmp_path, """\
    modality: lora
    micro_batch_size: 1
    gradient_accumulation_steps: 1
    tracking:
      mlflow: {tracking_uri: "file:./mlruns", experiment: dss-grid}
    """)
    configs = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path, use_data=False)
    cfg = configs[0].config
    assert cfg["mlflow_tracking_uri"] == "file:./mlruns" and cfg["mlflow_experiment_name"] == "dss-grid"
    assert cfg["mlflow_run_name"] == "tiny-train-lora"

    (tmp_path / "w").mkdir()
    recipe2, run2 = make_run(tmp_path / "w", """\
    backend: trl
    modality: lora
    micro_batch_size: 1
    gradient_accumulation_steps: 1
    tracking:
      wandb: {project: dss, entity: team}
    """)
    trl = generate_configs(recipe2, run_dir=run2, relative_to=tmp_path, use_data=False)[0].config
    assert trl["report_to"] == ["wandb"] and trl["tracking_env"] == {"WANDB_PROJECT": "dss", "WANDB_ENTITY": "team"}


@pytest.mark.slow  # loads Axolotl (20-100 s on the shared box)
def test_axolotl_accepts_the_tracking_keys(tmp_path):
    from stepwise.training.backends import check_config
    from stepwise.training.configgen import write_configs

    recipe, run_dir = make_run(tmp_path, """\
    modality: lora
    tracking:
      wandb: {project: dss}
    """)
    path = write_configs(generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path, use_data=False),
                         tmp_path / "cfg")[0]
    assert "wandb_project: dss" in path.read_text()
    report = check_config(path, base_dir=tmp_path, allow_missing_data=True)
    assert report.ok and report.axolotl_validated, report.messages()


def test_mlflow_logging_to_a_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from stepwise.training.tracking import log_point, open_mlflow_run

    from stepwise.recipe import TrackingSpec

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec = TrackingSpec.model_validate({"mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri(), "experiment": "g"}})
    run_id = open_mlflow_run(spec, "multitask-f0.5")
    assert open_mlflow_run(spec, "multitask-f0.5", run_id) == run_id  # a restarted point: the same run
    assert log_point(spec, "multitask-f0.5", run_id, {"accuracy": 0.5, "teacher_cost_usd": 0.01},
                     {"data_fraction": 0.5, "target": "multitask"}) == run_id
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=spec.mlflow.tracking_uri).get_run(run_id)
    assert run.data.metrics["accuracy"] == 0.5 and run.data.params["data_fraction"] == "0.5"
    assert run.info.run_name == "multitask-f0.5"


def test_the_shipped_experiment_recipe_plans_the_papers_grid():
    recipe = load_recipe(REPO / "examples" / "support-tickets" / "recipe.experiment.yaml")
    points = plan_points(recipe)
    assert len(points) == 8
    assert {p.values["target"] for p in points} == {"multitask", "label_only"}
    assert sorted({p.values["data_fraction"] for p in points}) == [0.125, 0.25, 0.5, 1.0]


def test_better_only_when_the_paired_ci_excludes_zero():
    from stepwise.experiment_report import paired, pareto, verdict

    items = [f"t{i}" for i in range(40)]
    a = {"scores": {i: 0.0 for i in items}}
    b = {"scores": {i: 1.0 if k < 30 else 0.0 for k, i in enumerate(items)}}
    c = {"scores": {i: 1.0 if k in (3, 17) else 0.0 for k, i in enumerate(items)}}
    assert verdict("label_only", "multitask", paired(a, b)).startswith("multitask is better than label_only")
    assert verdict("multitask", "label_only", paired(b, a)).startswith("multitask is better than label_only")
    tie = verdict("label_only", "multitask", paired(a, c))
    assert "no detectable difference at n = 40" in tie and "better" not in tie
    assert "no common test items" in verdict("x", "y", paired(a, {"scores": {"other": 1.0}}))
    # Pareto: higher metric, lower memory, lower time; a point beaten on all three drops out
    pts = [{"id": "big", "metric": {"value": 0.9}, "peak_memory_mb": 9000, "train_wall_s": 90, "estimate_gb": None},
           {"id": "small", "metric": {"value": 0.8}, "peak_memory_mb": 3000, "train_wall_s": 30, "estimate_gb": None},
           {"id": "worse", "metric": {"value": 0.7}, "peak_memory_mb": 9500, "train_wall_s": 95, "estimate_gb": None},
           {"id": "none", "metric": None, "peak_memory_mb": None, "train_wall_s": None, "estimate_gb": None}]
    assert [p["id"] for p in pareto(pts)] == ["big", "small"]


# -- the stubbed pipeline: every stage a stand-in (seconds, no model) -----------------------------


def _stub_stages(monkeypatch, data: dict, train_env: dict | None = None) -> list[str]:
    """Replace every stage's body in stepwise.pipeline.PIPELINE with a stand-in: curate writes
    `data`'s rows as the curated splits, eval scores each test item, the rest record a done stage.
    Returns the list the stand-ins append "<stage> <run dir name>" to."""
    from dataclasses import replace

    from stepwise import pipeline
    from stepwise.io import atomic_write_json, atomic_write_jsonl
    from stepwise.layout import SPLITS

    calls: list[str] = []

    def body(name):
        def run(recipe, rd, opts):
            calls.append(f"{name} {rd.path.name}")
            if name == "train" and train_env is not None:  # what a trainer process would inherit
                train_env.update({k: v for k, v in os.environ.items() if k.startswith("WANDB_")})
            with rd.stage(name):
                lay = rd.layout
                if name == "generate":
                    atomic_write_jsonl(lay.responses, [{"id": r["id"], "cost": 0.001, "usage": {"input_tokens": 10}}
                                                       for s in SPLITS for r in data[s]])
                elif name == "curate":
                    for s in SPLITS:
                        atomic_write_jsonl(lay.curated(s), [{**r, "split": s} for r in data[s]])
                elif name == "review":
                    atomic_write_jsonl(lay.reviewed, [{**r, "split": s} for s in ("train", "val") for r in data[s]])
                elif name == "eval":
                    n_train = sum(1 for _ in lay.curated("train").open())
                    preds = [{"id": r["id"], "correct": float(i < n_train)} for i, r in enumerate(data["test"])]
                    atomic_write_jsonl(lay.task_predictions, preds)
                    acc = sum(p["correct"] for p in preds) / len(preds)
                    atomic_write_json(lay.task_report, {"task_type": "classification", "headline": {
                        "accuracy": {"value": acc, "ci_low": max(0.0, acc - 0.1), "ci_high": min(1.0, acc + 0.1),
                                     "n": len(preds)}}})
            return "stub"
        return run

    monkeypatch.setattr(pipeline, "PIPELINE", [replace(s, run=body(s.name)) for s in pipeline.PIPELINE])
    return calls


def _tickets(n: int, prefix: str = "r", label_of=lambda i: ("billing", "technical")[i % 2]) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"ticket {i}", "label": label_of(i), "rationale": "because"}
            for i in range(n)]


def _stub_experiment(tmp_path: Path, extra: str = "") -> Path:
    return write_recipe(tmp_path, "modality: lora\nsweep:\n  data_fraction: [0.5, 1.0]\n" + extra)


def test_changed_shared_data_under_finished_points_stops_with_exit_2(tmp_path, monkeypatch):
    """The shared curate re-runs between invocations (the recipe changed) and writes other rows:
    the finished points trained on the old rows, so the grid would mix curation versions. It stops
    (exit 2) naming them; --force runs them again on the new data; the report never draws an old
    point on a curve with new ones."""
    data = {"train": _tickets(8), "val": _tickets(2, "v"), "test": _tickets(6, "t")}
    calls = _stub_stages(monkeypatch, data)
    recipe_path = _stub_experiment(tmp_path)
    exp = tmp_path / "exp"
    common = ["experiment", str(recipe_path), "--dir", str(exp), "--no-progress", "--yes"]
    res = runner.invoke(app, common)
    assert res.exit_code == 0, res.output
    first = {pid: json.loads((exp / "points" / pid / "point.json").read_text()) for pid in ("f0.5", "f1")}
    assert all(r["status"] == "done" for r in first.values())

    # the recipe's curation changes, so curate runs again and writes relabelled rows
    recipe_path.write_text(recipe_path.read_text() + "curation:\n  min_train_rows: 2\n")
    data["train"] = _tickets(8, label_of=lambda i: "general")
    calls.clear()
    res = runner.invoke(app, common)
    assert "curate shared" in calls  # the shared stage did run again
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "f0.5" in out and "f1" in out and "--force" in out and "--dir" in out and "changed" in out
    assert not any(c.startswith(("export", "train")) for c in calls)  # no point started on the new rows
    for pid in ("f0.5", "f1"):  # the finished points' records are untouched
        assert json.loads((exp / "points" / pid / "point.json").read_text()) == first[pid]
    # each point recorded the data it trained on, and the experiment the data its points started on
    assert first["f0.5"]["shared_data"] and first["f0.5"]["shared_data"] == first["f1"]["shared_data"]
    new_fp = json.loads((exp / "experiment.json").read_text())["shared_data"]["fingerprint"]
    assert new_fp == first["f1"]["shared_data"]  # still what the finished points trained on

    # --force on one point: it runs on the new data; the other stays on the old, on its own curve
    res = runner.invoke(app, [*common, "--force", "--points", "f0.5"])
    assert res.exit_code == 0, res.output
    moved = json.loads((exp / "points" / "f0.5" / "point.json").read_text())
    assert moved["status"] == "done" and moved["shared_data"] != first["f0.5"]["shared_data"]
    labels = {json.loads(line)["label"] for line in (exp / "points" / "f0.5" / "curate" / "train.jsonl").open()}
    assert labels == {"general"}  # trained on the new rows
    assert json.loads((exp / "experiment.json").read_text())["shared_data"]["fingerprint"] == moved["shared_data"]
    results = {p["id"]: p for p in json.loads((exp / "results.json").read_text())["points"]}
    assert results["f1"]["shared_data"] == first["f1"]["shared_data"] != results["f0.5"]["shared_data"]
    html = (exp / "experiment.html").read_text()
    assert html.count("<svg") == 2  # two curves: the current data's (f0.5) and the older data's (f1)
    assert "done on older curated data" in html and "older curated data" in html
    # the stale point is still named on the next plain invocation; --force (all points) clears it
    res = runner.invoke(app, common)
    assert res.exit_code == 2 and "f1" in res.output and "f0.5" not in " ".join(res.output.split()).split("old data:")[1]
    res = runner.invoke(app, [*common, "--force"])
    assert res.exit_code == 0, res.output
    fps = {json.loads((exp / "points" / pid / "point.json").read_text())["shared_data"] for pid in ("f0.5", "f1")}
    assert fps == {moved["shared_data"]}
    assert (exp / "experiment.html").read_text().count("<svg") == 1


def _wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run (run-<id>.wandb: W&B's LevelDB-style log, 32 KiB blocks of
    [crc32, length, type] chunks after a 7-byte header), parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def _wandb_logged(run_dir: Path) -> tuple[dict, dict, str]:
    """(history values, summary values, run name) of an offline run."""
    def items(entries) -> dict:  # a key is `key`, or `nested_key` path parts (as wandb writes history)
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in entries}

    history, summary, name = {}, {}, ""
    for rec in _wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.update(items(rec.history.item))
        elif kind == "summary":
            summary.update(items(rec.summary.update))
        elif kind == "run":
            name = rec.run.display_name
    return history, summary, name


def test_trainer_keeps_wandb_on_only_when_the_recipe_tracks_with_it(monkeypatch):
    from stepwise.training.common import trainer_env

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trainer_env(wandb=True)["WANDB_MODE"] == "offline"
    assert trainer_env(wandb=False)["WANDB_MODE"] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert "WANDB_MODE" not in trainer_env(wandb=True)  # W&B's own default (online)
    monkeypatch.setenv("WANDB_SERVICE", "2-123-tcp-localhost-4567")  # this process's W&B service
    assert "WANDB_SERVICE" not in trainer_env(wandb=True)  # the trainer starts its own


@pytest.mark.slow  # two W&B runs, each starting wandb-core: 30-60 s on the shared box
def test_wandb_offline_run_holds_each_points_metrics(tmp_path, monkeypatch):
    """training.tracking.wandb: the trainer is handed the point's run id (WANDB_RUN_ID, resume),
    stepwise logs the point's eval metric, teacher cost and data fraction to that run, and a run
    already active in the process is neither logged to nor closed."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the Makefile and conftest say disabled; no network here
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    data = {"train": _tickets(8), "val": _tickets(2, "v"), "test": _tickets(6, "t")}
    train_env: dict = {}
    _stub_stages(monkeypatch, data, train_env)
    recipe_path = _stub_experiment(tmp_path, "tracking:\n  wandb: {project: dss}\n")
    recipe_path.write_text(recipe_path.read_text().replace("data_fraction: [0.5, 1.0]", "data_fraction: [0.5]"))
    exp = tmp_path / "exp"
    outer = wandb.init(project="mine", name="outer")  # the caller's own run: wandb.run
    try:
        res = runner.invoke(app, ["experiment", str(recipe_path), "--dir", str(exp), "--no-progress", "--yes"])
        assert res.exit_code == 0, res.output
        assert wandb.run is outer  # still the caller's, still open
    finally:
        outer.finish()
    rec = json.loads((exp / "points" / "f0.5" / "point.json").read_text())
    run_id = rec["tracking_run_id"]
    assert run_id and train_env["WANDB_RUN_ID"] == run_id and train_env["WANDB_RESUME"] == "allow"
    assert train_env["WANDB_MODE"] == "offline"
    assert "WANDB_RUN_ID" not in os.environ  # the point's run id does not leak into the next point
    runs = {p.name.rsplit("-", 1)[1]: p for p in (tmp_path / "wb" / "wandb").glob("offline-run-*")}
    assert set(runs) == {run_id, outer.id}
    history, summary, name = _wandb_logged(runs[run_id])
    result = json.loads((exp / "results.json").read_text())["points"][0]
    assert name == "f0.5"
    for logged in (history, summary):
        assert logged["accuracy"] == result["metrics"]["accuracy"]
        assert logged["data_fraction"] == 0.5
        assert logged["teacher_cost_usd"] == pytest.approx(result["teacher_cost"]) and result["teacher_cost"] > 0
        assert logged["train_rows"] == result["train_rows"] == 4
    outer_history, _, _ = _wandb_logged(runs[outer.id])
    assert "accuracy" not in outer_history


def test_parallel_runs_no_more_points_at_once_than_the_planner_allows(tmp_path, monkeypatch):
    """--parallel 2 where the planner says one point fills the GPU: the points run one after another
    in this process (no workers); where two fit, both go to the workers at once."""
    from stepwise.training import launcher

    from stepwise import experiment
    from stepwise.layout import ExperimentLayout
    from stepwise.pipeline import RunOptions

    data = {"train": _tickets(8), "val": _tickets(2, "v"), "test": _tickets(6, "t")}
    _stub_stages(monkeypatch, data)
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    recipe = load_recipe(_stub_experiment(tmp_path))
    points = plan_points(recipe)
    for p in points:  # the fake memory plan: 20 GB per point on a 24 GB GPU
        p.estimate_gb = 20.0
    launched: list[tuple[list[str], int]] = []

    def fake_parallel(recipe, layout, todo, slots, flags, gpus, log):
        launched.append(([p.id for p in todo], slots))
        return [experiment.PointOutcome(p, "done") for p in todo]

    monkeypatch.setattr(experiment, "run_parallel", fake_parallel)
    layout = ExperimentLayout(tmp_path / "exp")
    summary = experiment.run_experiment(recipe, layout, points, points, RunOptions(progress=False), parallel=2)
    assert launched == []  # one at a time, here
    assert [o.status for o in summary.outcomes] == ["done", "done"]
    assert any("--parallel 2: 1 at once" in n and "planner: 20.0 GB" in n for n in summary.notes), summary.notes
    for p in points:  # two that fit side by side: both to the workers at once
        p.estimate_gb = 10.0
    summary = experiment.run_experiment(recipe, layout, points, points, RunOptions(progress=False), parallel=2,
                                        force=True)
    assert launched == [(["f0.5", "f1"], 2)] and not summary.notes


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended (only its parent has not reaped it)


def test_an_interrupted_parallel_run_leaves_no_worker_or_trainer_behind(tmp_path, monkeypatch):
    """Ctrl-C or `kill` in `--parallel`: the workers and the trainer processes they started stop with it (they
    used to train on, unattended, writing into the points while a re-run wrote there too)."""
    import sys

    from stepwise import experiment

    recipe = load_recipe(_stub_experiment(tmp_path))
    points = plan_points(recipe)
    pids = tmp_path / "pids"
    pids.mkdir()
    # a stand-in worker: starts a "trainer" child, records both pids, then works for a long time
    code = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(300)']); open(os.path.join(sys.argv[1], str(os.getpid())), 'w').write(str(c.pid)); "
            "time.sleep(300)")
    monkeypatch.setattr(experiment, "_worker_cmd", lambda *a: [sys.executable, "-c", code, str(pids)])

    def interrupt_with(signum: int):
        def log(msg: str) -> None:
            if msg.startswith("started f1"):
                deadline = time.time() + 60
                while len(list(pids.iterdir())) < 2 and time.time() < deadline:
                    time.sleep(0.2)
                os.kill(os.getpid(), signum)  # Ctrl-C, or `kill` of the experiment's process
                time.sleep(5)
        return log

    # a test runner started in the background (`make test &`) inherits SIGINT ignored, and Python then
    # never turns it into KeyboardInterrupt: give this process the handler an interactive one has
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_twice(recipe, points, pids, interrupt_with, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was only the run's


def _interrupt_twice(recipe, points, pids, interrupt_with, tmp_path) -> None:
    from stepwise import experiment
    from stepwise.layout import ExperimentLayout

    for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)):
        for f in pids.iterdir():
            f.unlink()
        with pytest.raises(raised):
            experiment.run_parallel(recipe, ExperimentLayout(tmp_path / "exp"), points, 2, [], 0, interrupt_with(signum))
        started = [(int(f.name), int(f.read_text())) for f in pids.iterdir()]
        assert len(started) == 2
        deadline = time.time() + 30
        while any(_alive(p) for pair in started for p in pair) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for pair in started for p in pair if _alive(p)], signum


# -- the real grid -------------------------------------------------------------------------------

# what a finished point's point.json holds, however it ran (serially or in a --parallel worker)
SERIAL_POINT_KEYS = {"status", "exit_code", "finished", "wall_s", "values", "detail", "shared_data"}


def _small_experiment(tmp_path: Path) -> Path:
    """support-tickets (the recorded teacher cache, offline), 2 x 2, tiny eval, no forgetting."""
    src = REPO / "examples" / "support-tickets"
    dst = tmp_path / "support-tickets"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "*.sqlite-*"))
    recipe = yaml.safe_load((src / "recipe.yaml").read_text())
    recipe["data"]["limit"] = 48
    # the TRL backend trains in process (no Axolotl start-up per point): the grid's structure is under
    # test here; Axolotl's acceptance of the tracking keys is test_axolotl_accepts_the_tracking_keys
    recipe["training"].update(backend="trl", micro_batch_size=2, gradient_accumulation_steps=1, sequence_len=256,
                              sweep={"target": ["multitask", "label_only"], "data_fraction": [0.5, 1.0]},
                              tracking={"mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri(), "experiment": "grid"}})
    recipe["curation"]["min_train_rows"] = 4
    recipe["eval"] = {"task": {"max_new_tokens": 16, "batch_size": 8, "bootstrap": 200, "limit": 6,
                               "compare_base": False, "compare_teacher": False, "latency_rows": 0},
                      "forgetting": {"enabled": False}}
    path = dst / "recipe.grid.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_two_by_two_grid_resumes_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe_path = _small_experiment(tmp_path)
    exp = tmp_path / "exp"
    common = [str(recipe_path), "--dir", str(exp), "--cpu", "--max-steps", "2", "--offline", "--no-progress"]
    # a slice first (as if killed after two points)
    res = runner.invoke(app, ["experiment", *common, "--points", "0,label_only-f0.5"])
    assert res.exit_code == 0, res.output
    status = {p.name: json.loads((p / "point.json").read_text())["status"] for p in (exp / "points").iterdir()}
    assert status == {"multitask-f0.5": "done", "label_only-f0.5": "done"}

    # a point killed mid-way (its point.json says running) restarts alone; finished ones are skipped;
    # the three left run two at a time, each in its own worker process (--parallel), like serial ones
    killed = exp / "points" / "label_only-f0.5" / "point.json"
    killed.write_text(json.dumps({**json.loads(killed.read_text()), "status": "running", "pid": 1}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU box: one device, the planner's cap per 24 GB
    res = runner.invoke(app, ["experiment", *common, "--parallel", "2"])
    assert res.exit_code == 0, res.output
    plan = json.loads((exp / "experiment.json").read_text())
    ids = [p["id"] for p in plan["points"]]
    assert ids == ["multitask-f0.5", "multitask-f1", "label_only-f0.5", "label_only-f1"]
    assert "skipped" in res.output and "multitask-f0.5" in res.output
    out = " ".join(res.output.split())
    assert "(slot 0" in out and "(slot 1" in out, out  # two workers at once
    fp = plan["shared_data"]["fingerprint"]
    for pid in ids:
        rec = json.loads((exp / "points" / pid / "point.json").read_text())
        assert rec["status"] == "done" and rec["exit_code"] == 0 and rec["detail"] == "", (pid, rec)
        assert set(rec) == SERIAL_POINT_KEYS | {"tracking_run_id"} and rec["shared_data"] == fp, (pid, rec)
    for pid in ("multitask-f1", "label_only-f0.5", "label_only-f1"):  # the worker's own log
        assert "experiment directory" in (exp / "points" / pid / "experiment.log").read_text()

    shared = json.loads((exp / "shared" / "manifest.json").read_text())["stages"]
    assert {s for s, i in shared.items() if i.get("status") == "done"} >= {"generate", "curate", "review"}
    assert "export" not in shared  # training stages run only in the points
    rows = {}
    for pid in ids:
        run = exp / "points" / pid
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["experiment"]["point"] == pid
        for stage in ("export", "configs", "train", "eval", "report"):
            assert manifest["stages"][stage]["status"] == "done", (pid, stage, manifest["stages"][stage])
        assert (run / "report.html").exists() and (run / "eval" / "task.json").exists()
        assert len(list((run / "configs").glob("*.yaml"))) == 1
        rows[pid] = {json.loads(line)["id"] for line in (run / "review" / "reviewed.jsonl").read_text().splitlines()
                     if json.loads(line).get("split") == "train"}
        chat = (run / "export" / "train.chat.jsonl").read_text().splitlines()
        kinds = manifest["stages"]["export"]["export"]["train"]["kinds"]
        assert ("rationale" in kinds) == pid.startswith("multitask"), kinds
        assert len(chat) == sum(kinds.values())
    # nested, and the same rows for both targets at the same fraction
    assert rows["multitask-f0.5"] == rows["label_only-f0.5"] < rows["multitask-f1"] == rows["label_only-f1"]
    # the restarted point's earlier stages were not redone (its pipeline skipped them)
    relaunched = json.loads((exp / "points" / "label_only-f0.5" / "manifest.json").read_text())["stages"]
    assert relaunched["train"]["pipeline"]["status"] == "skipped"

    html = (exp / "experiment.html").read_text()
    for section in ("Grid", "Learning curves", "Modality: metric vs memory vs time", "alpha:rank", "Forgetting",
                    "Teacher cost", "Pareto-best points"):
        assert f"<h2>{section}</h2>" in html, section
    assert html.count("<svg") >= 1
    assert "no detectable difference at n = " in html or "is better than" in html
    assert "stepwise experiment" in html and "--points" in html
    results = json.loads((exp / "results.json").read_text())
    assert all(p["status"] == "done" and p["metric"]["n"] == 6 for p in results["points"])

    # tracking: each point's metrics, teacher cost and data fraction in its MLflow run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(ids) <= set(by_name)
    r = by_name["label_only-f1"]
    assert "accuracy" in r.data.metrics and r.data.metrics["data_fraction"] == 1.0 and "teacher_cost_usd" in r.data.metrics
    assert "loss" in r.data.metrics  # the trainer's own logging went to the same run
    restarted = by_name["label_only-f0.5"]  # the killed point logged to the run it started
    assert restarted.info.run_id == json.loads(killed.read_text())["tracking_run_id"] and "loss" in restarted.data.metrics

    # stepwise compare reads the experiment directory: one row per point
    res = runner.invoke(app, ["compare", str(exp), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [Path(r["path"]).name for r in compared["runs"]] == ids



@pytest.mark.slow  # one real TRL training step on CPU and two W&B runs: 1-3 min on the shared box
def test_trl_trainer_logs_to_the_points_wandb_run(tmp_path, monkeypatch):
    """The trainer half of W&B tracking: the TRL trainer process (its WandbCallback) logs its loss to
    the run id run_point hands it, offline; log_point then adds the point's metrics under that id."""
    pytest.importorskip("wandb")
    from stepwise.training.backends import train
    from stepwise.training.configgen import write_configs
    from stepwise.training.tracking import log_point, run_env, wandb_run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    import wandb

    wandb.teardown()  # a W&B service an earlier test left in this process writes to that test's WANDB_DIR
    # as after an earlier point's log_point: this process runs a W&B service and names it in WANDB_SERVICE;
    # a trainer that shared it left its run open there, and log_point below failed with "run ID is in use"
    wandb.init(project="dss", name="previous-point").finish()
    assert "WANDB_SERVICE" in os.environ
    recipe, run_dir = make_run(tmp_path, """\
    backend: trl
    modality: lora
    lora_r: 8
    sequence_len: 128
    micro_batch_size: 2
    gradient_accumulation_steps: 1
    tracking:
      wandb: {project: dss}
    """, n_train=4, n_val=2)
    [path] = write_configs(generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path), tmp_path / "configs")
    run_id = wandb_run_id()
    for k, v in run_env(recipe.training.tracking, run_id).items():  # as run_point sets them
        monkeypatch.setenv(k, v)
    train(path, run_dir=run_dir, cpu=True, max_steps=1, base_dir=tmp_path)
    trainer_runs = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(trainer_runs) == 1, list((tmp_path / "wb").rglob("*"))[:20]
    history, _, _ = _wandb_logged(trainer_runs[0])  # written when the trainer exited (its own W&B service)
    assert history.get("train/loss", 0) > 0, history
    assert log_point(recipe.training.tracking, "p", run_id, {"accuracy": 0.5}, {"data_fraction": 1.0}) == run_id
    runs = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # offline, each process writes its own part under the one run id
    assert {_wandb_logged(r)[1].get("accuracy") for r in runs} == {None, 0.5}
