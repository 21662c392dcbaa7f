"""Training runs survive a kill and are never overwritten; losses come from the trainer's own state.

Fast tests drive the real launcher (`stepwise.training.launcher.train`, the real run directory and
manifest) with a stand-in trainer process that writes what HF's Trainer writes
(`checkpoint-<step>/trainer_state.json`, weights); the slow tests train SmolLM2-135M for real on
CPU, through Axolotl and through the TRL backend, SIGKILL the run after its first checkpoint and
re-run it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from stepwise.training import launcher
from stepwise.training.backends import generate_configs
from stepwise.training.checkpoints import complete_checkpoints, rows_from_log_history
from stepwise.training.configgen import write_configs
from stepwise.training.testing import make_run, use_fake_trainer, write_recipe

EXTRA = "modality: lora\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\n"  # the stand-in checkpoints every 2 steps


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    return use_fake_trainer(monkeypatch, tmp_path)


def _config(tmp: Path, extra: str = EXTRA) -> tuple[Path, Path]:
    recipe, run_dir = make_run(tmp, extra, n_train=8, n_val=0)
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp)
    [path] = write_configs([gc], tmp / "configs")
    return path, run_dir


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_generated_configs_checkpoint_at_a_bounded_interval(tmp_path):
    recipe, run_dir = make_run(tmp_path, "modality: lora\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\n")
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    cfg = gc.config
    assert cfg["save_strategy"] == "steps" and cfg["save_steps"] == 200 and cfg["save_total_limit"] == 2
    assert "saves_per_epoch" not in cfg
    assert "Checkpoints every 200 steps" in gc.text()
    trl = tmp_path / "trl"
    trl.mkdir()
    recipe, run_dir = make_run(trl, "modality: ia3\nbackend: trl\nsave_every_steps: 50\nsave_total_limit: 3\n")
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=trl)
    assert gc.config["save_steps"] == 50 and gc.config["save_total_limit"] == 3


def test_losses_come_from_the_trainer_state_not_stdout(tmp_path, fake_trainer):
    path, run_dir = _config(tmp_path)
    result = launcher.train(path, run_dir=run_dir, base_dir=tmp_path)
    # the stand-in prints nothing: every row comes from checkpoint-4/trainer_state.json
    assert [r["step"] for r in result.losses] == [1, 2, 3, 4]
    assert result.train_losses[0] == pytest.approx(2.0 + 2e-4)
    with (result.out_dir / "loss.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "done" and stage["counts"]["steps"] == 4 and stage["global_step"] == 4


@pytest.mark.parametrize("mode,message", [("stdout_only", "left no trainer_state.json"),
                                          ("no_loss", "recorded no training loss")])
def test_a_run_with_no_recorded_loss_fails_the_stage(tmp_path, fake_trainer, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_TRAIN_MODE", mode)
    path, run_dir = _config(tmp_path)
    with pytest.raises(launcher.TrainError, match=message):
        launcher.train(path, run_dir=run_dir, base_dir=tmp_path)
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "failed" and message in stage["error"]


def test_same_config_resumes_changed_config_moves_the_earlier_model_aside(tmp_path, fake_trainer, monkeypatch):
    path, run_dir = _config(tmp_path)
    out_dir = run_dir / "train" / path.stem
    monkeypatch.setenv("FAKE_DIE_AFTER", "3")  # killed after checkpoint-2, mid step 4
    with pytest.raises(launcher.TrainError, match="exit 137"):
        launcher.train(path, run_dir=run_dir, base_dir=tmp_path)
    (out_dir / "checkpoint-4").mkdir()  # a checkpoint the kill left half-written (weights, no trainer state)
    (out_dir / "checkpoint-4" / "adapter_model.safetensors").write_text("partial")
    monkeypatch.delenv("FAKE_DIE_AFTER")
    notes: list[str] = []
    result = launcher.train(path, run_dir=run_dir, base_dir=tmp_path,
                            on_event=lambda kind, payload: notes.append(payload) if kind == "note" else None)
    assert result.resumed_from_step == 2 and result.global_step == 4
    assert any("resuming from checkpoint-2" in n for n in notes)
    assert any("removed checkpoint-4" in n for n in notes)
    calls = [json.loads(x) for x in (out_dir / "fake_calls.jsonl").read_text().splitlines()]
    assert calls[-1]["resume"] == str((out_dir / "checkpoint-2").resolve())
    assert yaml.safe_load((out_dir / "axolotl.yaml").read_text())["auto_resume_from_checkpoints"] is False
    assert [r["step"] for r in result.losses] == [1, 2, 3, 4]
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["resumed_from_step"] == 2
    first_model = hashlib.sha256((out_dir / "adapter_model.safetensors").read_bytes()).hexdigest()

    # a changed learning rate: same config name, different content -> the first model moves aside intact
    path, _ = _config(tmp_path, EXTRA + "learning_rate: 0.0003\n")
    notes.clear()
    result = launcher.train(path, run_dir=run_dir, base_dir=tmp_path,
                            on_event=lambda kind, payload: notes.append(payload) if kind == "note" else None)
    assert result.resumed_from_step is None and result.moved_aside is not None
    assert any("the config changed" in n for n in notes)
    moved = result.moved_aside
    assert moved.parent == run_dir / "train" / "superseded" and moved.name.startswith(path.stem + "-")
    assert hashlib.sha256((moved / "adapter_model.safetensors").read_bytes()).hexdigest() == first_model
    assert json.loads((out_dir / "fake_calls.jsonl").read_text())["resume"] is None  # a fresh start, new dir
    assert (out_dir / "adapter_model.safetensors").read_text() == "weights lr=0.0003 final"
    entry = json.loads((moved / "manifest_entry.json").read_text())
    [recorded] = _manifest(run_dir)["superseded_training"]
    assert recorded["path"] == str(moved.relative_to(run_dir)) == entry["path"]
    assert recorded["manifest_entry"]["resumed_from_step"] == 2  # the earlier stage entry goes with it


def test_trainer_state_rows():
    rows, summary = rows_from_log_history([
        {"loss": 3.9, "grad_norm": 36.7, "learning_rate": 2e-05, "epoch": 0.1, "step": 1,
         "memory/max_allocated (GiB)": 1.5},
        {"eval_loss": 4.2, "eval_runtime": 1, "epoch": 0.1, "step": 1},
        {"loss": 3.1, "epoch": 0.2, "step": 2, "memory/max_allocated (GiB)": 2.5},
        {"train_runtime": 7.1, "train_loss": 3.3, "step": 2},
    ])
    assert rows[0] == {"step": 1, "epoch": 0.1, "loss": 3.9, "eval_loss": None, "grad_norm": 36.7,
                       "learning_rate": 2e-05, "kind": "train"}
    assert rows[1]["kind"] == "eval" and rows[1]["eval_loss"] == 4.2 and rows[2]["step"] == 2
    assert summary["train_loss"] == 3.3 and summary["memory/max_allocated (GiB)"] == 2.5


# --------------------------------------------------------------------------------------------
# Real CPU training: SIGKILL after the first checkpoint, re-run, resume


def _last_complete_step(out_dir: Path) -> int | None:
    """Read independently of the code under test: the newest checkpoint whose trainer state is whole."""
    steps = []
    for p in out_dir.glob("checkpoint-*"):
        try:
            state = json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("global_step") == int(p.name.split("-")[1]):
            steps.append(state["global_step"])
    return max(steps, default=None)


def _train_and_kill(config: Path, run_dir: Path, cwd: Path, timeout: float = 420) -> int:
    """`stepwise train --cpu` in its own process group; SIGKILL the group once a checkpoint is complete."""
    out_dir = run_dir / "train" / config.stem
    cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "train", str(config), "--run-dir",
           str(run_dir), "--cpu"]
    with (cwd / "killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        try:
            while _last_complete_step(out_dir) is None:
                assert proc.poll() is None, (cwd / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint in time"
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its trainer child, as a preemption would
            proc.wait()
    step = _last_complete_step(out_dir)
    assert step is not None
    assert not (out_dir / "summary.json").exists(), "the run finished before the kill"
    return step


def _stepwise_train(config: Path, run_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "train", str(config), "--run-dir",
           str(run_dir), "--cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    return proc


TINY = """\
modality: {modality}
backend: {backend}
sequence_len: 128
micro_batch_size: 1
gradient_accumulation_steps: 1
gradient_checkpointing: false
lora_r: 8
num_epochs: 1
save_every_steps: 2
"""


@pytest.mark.slow
def test_axolotl_run_killed_after_a_checkpoint_resumes_and_a_retrain_never_overwrites(tmp_path):
    recipe, run_dir = make_run(tmp_path, TINY.format(modality="lora", backend="axolotl"), n_train=4, n_val=0)
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    [config] = write_configs([gc], tmp_path / "configs")
    out_dir = run_dir / "train" / config.stem

    killed_at = _train_and_kill(config, run_dir, tmp_path)
    proc = _stepwise_train(config, run_dir, tmp_path)
    assert f"resuming from checkpoint-{killed_at} (step {killed_at}" in proc.stderr
    assert f"resumed at step {killed_at}" in proc.stderr
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "done" and stage["resumed_from_step"] == killed_at
    # the re-run trained only the steps after the checkpoint (HF prints one loss dict per step it runs)
    resumed_log = (out_dir / "train.log").read_text()
    assert resumed_log.count("{'loss'") == 4 - killed_at
    final = json.loads((out_dir / f"checkpoint-{stage['global_step']}" / "trainer_state.json").read_text())
    assert final["global_step"] == stage["global_step"]
    with (out_dir / "loss.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh) if r["kind"] == "train"] == list(range(1, 5))
    assert len([p for p in out_dir.glob("checkpoint-*")]) <= 2  # save_total_limit
    first_model = hashlib.sha256((out_dir / "adapter_model.safetensors").read_bytes()).hexdigest()

    # the same config name with a changed learning rate: an uninterrupted run into a fresh directory
    write_recipe(tmp_path, TINY.format(modality="lora", backend="axolotl") + "learning_rate: 0.0003\n")
    from stepwise.recipe import load_recipe

    [gc2] = generate_configs(load_recipe(tmp_path / "recipe.yaml"), run_dir=run_dir, relative_to=tmp_path)
    assert gc2.name == config.stem
    [config] = write_configs([gc2], tmp_path / "configs")
    proc = _stepwise_train(config, run_dir, tmp_path)
    assert "the config changed" in proc.stderr and "resuming" not in proc.stderr
    uninterrupted = _manifest(run_dir)["stages"]["train"]
    assert uninterrupted["resumed_from_step"] is None
    assert uninterrupted["global_step"] == stage["global_step"] == 4  # same total as the resumed run
    [moved] = (run_dir / "train" / "superseded").iterdir()
    assert hashlib.sha256((moved / "adapter_model.safetensors").read_bytes()).hexdigest() == first_model
    assert yaml.safe_load((out_dir / "axolotl.yaml").read_text())["learning_rate"] == 0.0003
    assert yaml.safe_load((moved / "axolotl.yaml").read_text())["learning_rate"] == 0.0002
    assert _manifest(run_dir)["superseded_training"][0]["manifest_entry"]["resumed_from_step"] == killed_at


@pytest.mark.slow
def test_trl_run_killed_after_a_checkpoint_resumes(tmp_path):
    recipe, run_dir = make_run(tmp_path, TINY.format(modality="ia3", backend="trl"), n_train=4, n_val=0)
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    [config] = write_configs([gc], tmp_path / "configs")
    out_dir = run_dir / "train" / config.stem

    killed_at = _train_and_kill(config, run_dir, tmp_path)
    proc = _stepwise_train(config, run_dir, tmp_path)
    assert f"resuming from checkpoint-{killed_at} (step {killed_at}" in proc.stderr
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "done" and stage["resumed_from_step"] == killed_at and stage["global_step"] == 4
    state = json.loads((out_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [c[0] for c in complete_checkpoints(out_dir)][-1] == 4
    assert (out_dir / "train.log").read_text().count("{'loss'") == 4 - killed_at  # only the steps after it
    assert f"resuming from {out_dir.resolve() / f'checkpoint-{killed_at}'}" in (out_dir / "train.log").read_text()
    with (out_dir / "loss.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh) if r["kind"] == "train"] == list(range(1, 5))


def test_stepwise_run_resumes_the_train_stage_after_a_kill(tmp_path, fake_trainer, monkeypatch):
    """`stepwise run` trains through the same launcher: a killed train stage (exit 16) resumes on the
    next run from the last complete checkpoint and says so in the stage's detail."""
    from stepwise.training.configs_stage import write_checked_configs

    from stepwise.pipeline import STAGE_EXIT, RunOptions, run_pipeline
    from stepwise.recipe import load_recipe
    from stepwise.rundir import RunDir

    recipe, run_dir = make_run(tmp_path, EXTRA, n_train=8, n_val=0)
    monkeypatch.chdir(tmp_path)
    write_checked_configs(recipe, run=RunDir(run_dir))
    opts = RunOptions(from_stage="train", until_stage="train", progress=False)
    monkeypatch.setenv("FAKE_DIE_AFTER", "3")
    first = run_pipeline(load_recipe(tmp_path / "recipe.yaml"), RunDir(run_dir), opts)
    assert first.exit_code == STAGE_EXIT["train"]
    monkeypatch.delenv("FAKE_DIE_AFTER")
    again = run_pipeline(load_recipe(tmp_path / "recipe.yaml"), RunDir(run_dir), opts)
    [train] = [o for o in again.outcomes if o.stage == "train"]
    assert again.exit_code == 0 and train.status == "done", train.detail
    assert "4 steps (resumed at step 2)" in train.detail
