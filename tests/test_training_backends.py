"""The training backends behind one interface (stepwise.training.backends) and `training.num_gpus`.

Fast: configs are generated without Axolotl runs (the stand-in trainer of stepwise.training.testing
plays Axolotl's train process)."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import pytest
from stepwise.training import backends, launcher
from stepwise.training.common import TrainError, TrainResult
from stepwise.training.configgen import write_configs
from stepwise.training.configs_stage import write_checked_configs
from stepwise.training.testing import make_run, use_fake_trainer

from stepwise.recipe import TrainingSpec
from stepwise.rundir import RunDir

EXTRA = "modality: lora\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\n"


def test_registry_names_every_recipe_backend_with_the_same_functions():
    names = typing.get_args(TrainingSpec.model_fields["backend"].annotation)
    assert set(backends.BACKENDS) == set(names)
    for name, backend in backends.BACKENDS.items():
        assert backend.name == name and callable(backend.configs)
        if backend.hosted:  # openai: the provider's job trains from the recipe; no config to check or launch
            assert not backend.writes_configs
        else:
            assert callable(backend.check) and callable(backend.train)


@pytest.mark.parametrize("extra, backend, key", [
    (EXTRA, "axolotl", "adapter"),
    ("modality: ia3\nbackend: trl\n", "trl", "backend"),
])
def test_configs_check_and_train_dispatch_by_the_config(tmp_path, extra, backend, key):
    recipe, run_dir = make_run(tmp_path, extra)
    [gc] = backends.generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    assert key in gc.config
    [path] = write_configs([gc], tmp_path / "configs")
    assert backends.config_backend(backends.read_config(path)).name == backend
    report = backends.check_config(path, base_dir=tmp_path, run_axolotl=False)
    assert report.ok, report.messages()


def test_a_config_naming_an_unknown_or_hosted_backend_is_bad_input(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base_model: x\nbackend: openai\n", encoding="utf-8")
    report = backends.check_config(path)
    assert not report.ok and "trains from the recipe" in report.messages()[0] and f"{path}:2" in report.messages()[0]
    path.write_text("backend: nope\n", encoding="utf-8")
    assert "one of axolotl, trl, openai" in backends.check_config(path).messages()[0]
    with pytest.raises(ValueError, match="training.backend 'nope'"):
        backends.train(path)


def test_openai_writes_no_configs(tmp_path):
    recipe, run_dir = make_run(tmp_path, "backend: openai\n")
    assert backends.generate_configs(recipe, run_dir=run_dir) == []
    outcome = write_checked_configs(recipe, run=RunDir(run_dir), relative_to=tmp_path)
    assert outcome.paths == [] and not (run_dir / "configs").exists()


def _recording_fake(monkeypatch, tmp_path) -> list[int]:
    use_fake_trainer(monkeypatch, tmp_path)
    fake, seen = launcher.train_command, []

    def record(config, gpus):
        seen.append(gpus)
        return fake(config, gpus)

    monkeypatch.setattr(launcher, "train_command", record)
    return seen


def test_num_gpus_sets_the_process_count_not_the_visible_gpus(tmp_path, monkeypatch):
    seen = _recording_fake(monkeypatch, tmp_path)
    recipe, run_dir = make_run(tmp_path, EXTRA, n_train=8, n_val=0)
    [path] = write_configs(backends.generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path), tmp_path / "c")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    result = backends.train(path, run_dir=run_dir, base_dir=tmp_path, num_gpus=2)
    assert seen == [2] and result.train_losses
    # more than are visible: an error naming the field, not a smaller run
    with pytest.raises(TrainError, match="training.num_gpus is 8 but 4 GPU"):
        backends.train(path, run_dir=run_dir, base_dir=tmp_path, num_gpus=8)
    backends.train(path, run_dir=run_dir, base_dir=tmp_path)  # no recipe at hand: every visible GPU
    assert seen[-1] == 4
    backends.train(path, run_dir=run_dir, base_dir=tmp_path, num_gpus=4, cpu=True)
    assert seen[-1] == 0


def test_the_pipeline_trains_with_the_recipes_num_gpus(tmp_path, monkeypatch):
    from stepwise import pipeline

    recipe, run_dir = make_run(tmp_path, EXTRA + "num_gpus: 2\n", n_train=8, n_val=0)
    run = RunDir(run_dir)
    write_checked_configs(recipe, run=run, relative_to=tmp_path, allow_missing_data=True)
    calls: list[dict] = []

    def fake_train(config, **kw):
        calls.append(kw)
        return TrainResult(name=Path(config).stem, out_dir=tmp_path, config_path=Path(config),
                           losses=[{"kind": "train", "loss": 1.0}])

    monkeypatch.setattr(backends, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    pipeline._train(recipe, run, pipeline.RunOptions())
    assert calls[0]["num_gpus"] == 2


def test_multi_gpu_launches_the_axolotl_train_entry_point_through_accelerate(tmp_path):
    cfg = tmp_path / "c.yaml"
    cmd = launcher.train_command(cfg, 3)
    assert cmd[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "3"]
    # the console script `axolotl train`, each process training in place (not accelerate again, not -m)
    assert cmd[5:] == [str(Path(sys.executable).parent / "axolotl"), "train", str(cfg), "--launcher", "python"]
    assert "axolotl.cli.train" not in cmd


def test_config_headers_give_the_multi_gpu_command_stepwise_runs(tmp_path):
    recipe, run_dir = make_run(tmp_path, EXTRA)
    [gc] = backends.generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    assert "--num-gpus N   (accelerate launch of `axolotl train`)" in gc.text()
    assert "-m axolotl.cli.train" not in gc.text()
