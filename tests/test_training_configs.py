"""Config generation, Axolotl's loader on every generated config, our strict checks, committed examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stepwise.training.backends import check_config, generate_configs
from stepwise.training.bundled import bundled_configs
from stepwise.training.configgen import apply_cpu_profile, epochs_for, sweep_points, write_configs
from stepwise.training.testing import make_run

REPO = Path(__file__).resolve().parent.parent


def _generate(tmp_path: Path, extra: str = "", **kw):
    recipe, run_dir = make_run(tmp_path, extra, **kw)
    configs = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    paths = write_configs(configs, tmp_path / "axolotl_configs" / recipe.name)
    return recipe, run_dir, configs, paths


def test_auto_writes_every_modality_with_seed_defaults(tmp_path):
    _, _, configs, paths = _generate(tmp_path, "micro_batch_size: 2\ngradient_accumulation_steps: 2\n")
    assert [p.name for p in paths] == ["tiny-train-full.yaml", "tiny-train-lora.yaml", "tiny-train-qlora.yaml"]
    full, lora, qlora = (c.config for c in configs)
    assert "adapter" not in full and full["learning_rate"] == 2e-5 and full["weight_decay"] == 0.01
    assert lora["adapter"] == "lora" and lora["lora_r"] == 16 and lora["lora_alpha"] == 64
    assert lora["lora_target_linear"] is True and lora["learning_rate"] == 2e-4 and lora["lora_dropout"] == 0.05
    assert qlora["adapter"] == "qlora" and qlora["load_in_4bit"] is True
    assert qlora["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    assert qlora["optimizer"] == "paged_adamw_8bit"
    for cfg in (full, lora, qlora):
        assert cfg["lr_scheduler"] == "cosine" and cfg["warmup_ratio"] == 0.1
        assert cfg["num_epochs"] == 3  # 12 rows < 1,000
        assert cfg["gradient_checkpointing"] is True
        assert cfg["datasets"][0]["type"] == "chat_template"
        assert cfg["datasets"][0]["path"] == "runs/tiny-train/r1/export/train.chat.jsonl"
        assert cfg["test_datasets"][0]["path"] == "runs/tiny-train/r1/export/val.chat.jsonl"
        assert cfg["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # launchable on a GPU box
        assert cfg["bf16"] == "auto" and cfg["attn_implementation"] == "flash_attention_2"
        assert 256 <= cfg["sequence_len"] <= 512  # from the data: longest example, rounded up to 256
    # the header: how to launch, data hashes, planner estimate, auto pick
    text = paths[1].read_text()
    assert "stepwise train" in text and "accelerate launch" in text
    train_sha = __import__("hashlib").sha256((tmp_path / "runs/tiny-train/r1/export/train.chat.jsonl").read_bytes())
    assert f"sha256 {train_sha.hexdigest()}" in text
    assert "Planner: peak ~" in text and "modality auto picks full" in text
    assert configs[0].auto_pick == "full"


def test_every_generated_config_passes_axolotl_and_our_checks(tmp_path):
    _, _, _, paths = _generate(tmp_path, "micro_batch_size: 2\ngradient_accumulation_steps: 2\n")
    for path in paths:
        report = check_config(path, base_dir=tmp_path)
        assert report.ok, report.messages()
        assert report.axolotl_validated and report.axolotl_normalized
        assert report.train_rows == 12


@pytest.mark.parametrize(("extra", "gpus"), [
    ("num_gpus: 2\ndeepspeed: zero2\nmodality: full\n", 2),
    ("num_gpus: 4\ndeepspeed: zero3\nmodality: lora\n", 4),
    ("num_gpus: 2\nfsdp: true\nmodality: full\n", 2),
])
def test_multi_gpu_variants_pass_axolotl(tmp_path, extra, gpus):
    _, _, configs, paths = _generate(tmp_path, extra + "micro_batch_size: 1\ngradient_accumulation_steps: 1\n")
    assert len(paths) == 1
    cfg = configs[0].config
    if "deepspeed" in extra:
        assert cfg["deepspeed"]["zero_optimization"]["stage"] == (3 if "zero3" in extra else 2)
    else:
        assert cfg["fsdp_version"] == 2 and cfg["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    report = check_config(paths[0], base_dir=tmp_path, num_gpus=gpus)
    assert report.ok, report.messages()
    assert report.axolotl_validated


def test_sweep_expands_with_stable_names(tmp_path):
    extra = """\
    modality: lora
    micro_batch_size: 1
    gradient_accumulation_steps: 1
    sweep:
      lora_r: [8, 16]
      alpha_ratio: [2, 4]
      learning_rate: [0.0001, 0.0002]
      modality: [full, lora]
    """
    recipe, _, configs, paths = _generate(tmp_path, extra)
    names = [p.stem for p in paths]
    assert names[:2] == ["tiny-train-full-lr1e-4", "tiny-train-full-lr2e-4"]  # full ignores rank/alpha
    assert "tiny-train-lora-r8-a2-lr1e-4" in names and "tiny-train-lora-r16-a4-lr2e-4" in names
    assert len(names) == 2 + 8 and len(set(names)) == len(names)
    by = {c.name: c.config for c in configs}
    assert by["tiny-train-lora-r8-a2-lr1e-4"]["lora_alpha"] == 16
    assert by["tiny-train-lora-r16-a4-lr2e-4"]["lora_alpha"] == 64
    assert [p.tags for p in sweep_points(recipe.training)] == [p.tags for p in sweep_points(recipe.training)]
    for path in paths[:3]:
        assert check_config(path, base_dir=tmp_path).ok


def test_epochs_by_data_size():
    assert epochs_for(None) == 3 and epochs_for(999) == 3 and epochs_for(5000) == 2 and epochs_for(20000) == 1


def test_cpu_profile_overrides(tmp_path):
    _, _, configs, _ = _generate(tmp_path)
    cpu = apply_cpu_profile(configs[2].config, "/models/local")
    assert cpu["bf16"] is False and cpu["fp16"] is False and cpu["tf32"] is False
    assert cpu["attn_implementation"] == "sdpa" and cpu["sample_packing"] is False
    assert all(cpu[f"lora_{k}_kernel"] is False for k in ("mlp", "qkv", "o", "embedding"))
    assert cpu["optimizer"] == "adamw_torch"
    assert cpu["base_model"] == "/models/local" and cpu["load_in_4bit"] is True
    # and the GPU config is untouched
    assert configs[2].config["bf16"] == "auto"


def test_recipe_profile_cpu_generates_cpu_configs(tmp_path):
    _, _, configs, paths = _generate(tmp_path, "profile: cpu\nmodality: qlora\nmicro_batch_size: 2\n"
                                               "gradient_accumulation_steps: 2\n")
    assert configs[0].config["bf16"] is False
    report = check_config(paths[0], base_dir=tmp_path)
    assert report.ok, report.messages()


def _cfg(tmp_path: Path, **changes) -> dict:
    _, _, configs, _ = _generate(tmp_path, "micro_batch_size: 2\ngradient_accumulation_steps: 2\n")
    cfg = json.loads(json.dumps(configs[1].config))  # lora
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


BAD_CONFIGS = [
    ({"lora_rr": 8}, "lora_rr: unknown key: Axolotl would silently ignore it (did you mean 'lora_r'?)"),
    ({"adapter": "qlora"}, "adapter: qlora needs load_in_4bit: true"),
    ({"load_in_4bit": True}, "load_in_4bit with adapter: lora; a 4-bit base is QLoRA"),
    ({"adapter": None}, "lora_r without `adapter`: full fine-tuning ignores it"),
    ({"load_in_8bit": True, "load_in_4bit": True, "adapter": "qlora"}, "load_in_4bit and load_in_8bit are both set"),
    ({"lora_target_linear": None}, "LoRA without targets"),
    ({"gradient_accumulation_steps": 16, "sample_packing": False},
     "micro_batch_size 2 x gradient_accumulation_steps 16 x 1 GPU = 32 examples per optimizer step, "
     "but the training data has 12 rows"),
    ({"sequence_len": 100000}, "sequence_len: 100000 exceeds the model's 8192 positions"),
    ({"learning_rate": 0.01}, "0.01 is outside the seeds' 0.0001-0.0005 for LoRA/QLoRA"),
    ({"lora_alpha": 16}, "lora_alpha/lora_r = 1; the DSS paper found 4:1 best"),
]


@pytest.mark.parametrize(("changes", "expected"), BAD_CONFIGS)
def test_bad_configs_get_clear_messages(tmp_path, changes, expected):
    cfg = _cfg(tmp_path, **changes)
    report = check_config(cfg, base_dir=tmp_path, run_axolotl=False)
    assert any(expected in m for m in report.messages()), report.messages()


def test_bad_dataset_files(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["datasets"][0]["path"] = "runs/missing.jsonl"
    msgs = check_config(cfg, base_dir=tmp_path, run_axolotl=False).messages()
    assert any("datasets[0].path: file not found: runs/missing.jsonl" in m for m in msgs)
    (tmp_path / "alpaca.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    cfg["datasets"][0]["path"] = "alpaca.jsonl"
    msgs = check_config(cfg, base_dir=tmp_path, run_axolotl=False).messages()
    assert any("alpaca.jsonl:1: no `messages` list: not a chat_template row" in m for m in msgs)
    (tmp_path / "roles.jsonl").write_text('{"messages": [{"role": "human", "content": "x"}]}\n')
    cfg["datasets"][0]["path"] = "roles.jsonl"
    msgs = check_config(cfg, base_dir=tmp_path, run_axolotl=False).messages()
    assert any("lacks a valid `role`" in m for m in msgs)
    (tmp_path / "data.csv").write_text("a,b\n")
    cfg["datasets"][0]["path"] = "data.csv"
    msgs = check_config(cfg, base_dir=tmp_path, run_axolotl=False).messages()
    assert any("ds_type json does not match 'data.csv'" in m for m in msgs)


def test_cpu_check_flags_gpu_only_settings(tmp_path):
    cfg = _cfg(tmp_path)
    msgs = check_config(cfg, base_dir=tmp_path, profile="cpu", run_axolotl=False).messages()
    for key in ("bf16", "tf32", "attn_implementation", "sample_packing"):
        assert any(f"{key}: " in m and "cannot run on CPU" in m for m in msgs), (key, msgs)
    assert any("lora_mlp_kernel unset" in m for m in msgs)


def test_axolotl_schema_errors_are_reported(tmp_path):
    report = check_config(_cfg(tmp_path, micro_batch_size="many"), base_dir=tmp_path)
    assert not report.ok
    assert any("micro_batch_size" in m and "axolotl" in m for m in report.messages())


@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_check_cli_on_hand_edited_file(tmp_path):
    _, _, _, paths = _generate(tmp_path, "micro_batch_size: 2\ngradient_accumulation_steps: 2\n")
    text = paths[1].read_text().replace("lora_dropout: 0.05", "lora_dropout: 0.05\nlora_dropuot: 0.1")
    bad = tmp_path / "edited.yaml"
    bad.write_text(text)
    cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "configs", "--check"]
    proc = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = text.splitlines().index("lora_dropuot: 0.1") + 1
    assert f"edited.yaml:{line} lora_dropuot: unknown key" in proc.stderr
    assert "did you mean 'lora_dropout'" in proc.stderr
    ok = subprocess.run([*cmd, str(paths[1])], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "ok" in ok.stderr


def test_committed_example_configs_are_current_and_valid():
    """Regenerate the bundled examples' configs; fail if they differ from the committed files."""
    generated = bundled_configs(REPO)
    # nl2dsl says `modality: auto` (all three written); support-tickets pins LoRA
    assert len(generated) == 4
    committed = sorted(p.relative_to(REPO) for p in (REPO / "axolotl_configs").glob("*/*.yaml"))
    assert committed == sorted(generated), "stale or extra files in axolotl_configs/: run python -m stepwise.training.bundled"
    for rel, text in generated.items():
        assert (REPO / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: run python -m stepwise.training.bundled"
    for rel in generated:
        report = check_config(REPO / rel, base_dir=REPO, allow_missing_data=True)
        assert report.ok, report.messages()
        assert report.axolotl_validated and report.axolotl_normalized
        cfg = yaml.safe_load((REPO / rel).read_text())
        assert "not yet generated" in (REPO / rel).read_text()
        assert cfg["datasets"][0]["path"].startswith("examples/") and "/latest/export/" in cfg["datasets"][0]["path"]


@pytest.mark.parametrize("backend", ["axolotl", "trl"])
def test_empty_val_split_trains_without_an_eval_set(tmp_path, backend):
    """Tiny data can leave the val split empty; Axolotl and TRL both stop on an empty dataset, so
    the config leaves the eval set out, says why, and passes the checks."""
    extra = "micro_batch_size: 2\nmodality: lora\n" + ("backend: trl\n" if backend == "trl" else "")
    recipe, run_dir = make_run(tmp_path, extra, n_val=0)
    assert (run_dir / "export" / "val.chat.jsonl").read_text() == ""
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    assert "No validation rows in val.chat.jsonl" in gc.text()
    if backend == "trl":
        assert "val_file" not in gc.config
    else:
        assert not {"test_datasets", "evals_per_epoch", "eval_sample_packing"} & set(gc.config)
    [path] = write_configs([gc], tmp_path / "configs")
    report = check_config(path, base_dir=tmp_path)
    assert report.ok, report.messages()
    # with validation rows the eval set is there
    (tmp_path / "with-val").mkdir()
    recipe, run_dir = make_run(tmp_path / "with-val", extra, n_val=3)
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path / "with-val")
    assert ("val_file" in gc.config) if backend == "trl" else ("test_datasets" in gc.config)
    assert "No validation rows" not in gc.text()


@pytest.mark.parametrize("backend", ["axolotl", "trl"])
def test_default_batch_fits_tiny_training_data(tmp_path, backend):
    """With fewer examples than one default step takes (4 x 4), the generated config lowers the
    batch the recipe did not set, says so, and passes the checks; a batch the recipe sets is kept
    and the check names it."""
    extra = "modality: lora\n" + ("backend: trl\n" if backend == "trl" else "")
    recipe, run_dir = make_run(tmp_path, extra, n_train=3, n_val=1)
    rows = len((run_dir / "export" / "train.chat.jsonl").read_text().splitlines())
    assert rows < 16
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    micro, accum = gc.config["micro_batch_size"], gc.config["gradient_accumulation_steps"]
    assert micro * accum <= rows and (micro, accum) != (4, 4)
    assert f"4 x 4 -> {micro} x {accum}: the training file has only {rows} examples" in gc.text()
    [path] = write_configs([gc], tmp_path / "configs")
    report = check_config(path, base_dir=tmp_path)
    assert report.ok, report.messages()

    pinned = tmp_path / "pinned"
    pinned.mkdir()
    # (packing off: with packing on, our check does not count rows per step)
    recipe, run_dir = make_run(pinned, extra + "micro_batch_size: 4\ngradient_accumulation_steps: 4\nsample_packing: false\n",
                               n_train=3, n_val=1)
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=pinned)
    assert (gc.config["micro_batch_size"], gc.config["gradient_accumulation_steps"]) == (4, 4)
    assert "Batch:" not in gc.text()
    [path] = write_configs([gc], pinned / "configs")
    errors = " ".join(check_config(path, base_dir=pinned).messages("error"))
    assert "16 examples per optimizer step" in errors

    # only gradient_accumulation_steps set: it is kept, the micro batch is lowered around it
    partly = tmp_path / "partly"
    partly.mkdir()
    recipe, run_dir = make_run(partly, extra + "gradient_accumulation_steps: 2\n", n_train=3, n_val=1)
    [gc] = generate_configs(recipe, run_dir=run_dir, relative_to=partly)
    assert gc.config["gradient_accumulation_steps"] == 2
    assert gc.config["micro_batch_size"] * 2 <= rows and gc.config["micro_batch_size"] < 4


def _cli(*args: str):
    from typer.testing import CliRunner

    from stepwise.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_configs_cli_records_the_train_config_so_run_from_train_finds_it(tmp_path, monkeypatch):
    """`stepwise configs --run-dir` and `stepwise run`'s configs stage are one function: the CLI
    records `train_config`, so `stepwise run --from train` trains what it wrote."""
    from stepwise.training.testing import use_fake_trainer

    _, run_dir = make_run(tmp_path, "modality: lora\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\n",
                          n_train=8, n_val=0)
    monkeypatch.chdir(tmp_path)
    res = _cli("configs", tmp_path / "recipe.yaml", "--run-dir", run_dir)
    assert res.exit_code == 0, res.output
    info = json.loads((run_dir / "manifest.json").read_text())["stages"]["configs"]
    assert info["status"] == "done" and info["train_config"] == "tiny-train-lora"
    assert info["train_config_path"] == "configs/tiny-train-lora.yaml" and (run_dir / info["train_config_path"]).exists()

    use_fake_trainer(monkeypatch, tmp_path)  # the training itself is test_training_cpu's; here: which config
    res = _cli("run", tmp_path / "recipe.yaml", "--run-dir", run_dir, "--from", "train", "--until", "train",
               "--no-progress")
    assert res.exit_code == 0, res.output
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]
    assert stage["status"] == "done" and stage["config"] == "tiny-train-lora"
    assert any(i["path"] == "configs/tiny-train-lora.yaml" for i in stage["inputs"])


def test_a_failed_config_check_is_not_recorded_done(tmp_path, monkeypatch):
    """A batch the recipe pins larger than the data fails the check: the CLI exits 2 and the stage is
    recorded `failed` with no train_config; the pipeline's configs stage (the same function) fails too."""
    from stepwise.pipeline import STAGE_EXIT, RunOptions, run_pipeline
    from stepwise.recipe import load_recipe
    from stepwise.rundir import RunDir

    extra = "modality: lora\nmicro_batch_size: 4\ngradient_accumulation_steps: 4\nsample_packing: false\n"
    _, run_dir = make_run(tmp_path, extra, n_train=3, n_val=1)
    monkeypatch.chdir(tmp_path)
    res = _cli("configs", tmp_path / "recipe.yaml", "--run-dir", run_dir)
    assert res.exit_code == 2, res.output
    info = json.loads((run_dir / "manifest.json").read_text())["stages"]["configs"]
    assert info["status"] == "failed" and "train_config" not in info
    assert "16 examples per optimizer step" in info["error"]

    summary = run_pipeline(load_recipe(tmp_path / "recipe.yaml"), RunDir(run_dir),
                           RunOptions(from_stage="configs", until_stage="train", progress=False))
    outcomes = {o.stage: o for o in summary.outcomes}
    assert outcomes["configs"].status == "failed" and "16 examples per optimizer step" in outcomes["configs"].detail
    assert outcomes["train"].status == "not_run" and summary.exit_code == STAGE_EXIT["configs"]


def test_a_yaml_syntax_error_names_the_same_line_in_a_recipe_and_a_training_config(tmp_path):
    """One YAML-with-line-marks loader (stepwise.io.load_yaml_with_lines) under recipes and training
    configs: a syntax error is reported at the same line with the same words by both, each in its own
    error type (RecipeError / a CheckReport problem)."""
    from stepwise.io import YamlSyntaxError, load_yaml_with_lines
    from stepwise.recipe import RecipeError, load_recipe

    text = "name: x\ntask:\n  classes: [a, b\n  name: t\n"
    with pytest.raises(YamlSyntaxError) as exc:
        load_yaml_with_lines(text)
    line, problem = exc.value.line, exc.value.problem
    assert line == 4 and problem
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as bad:
        load_recipe(recipe)
    assert bad.value.problems == [f"{recipe}:{line} <yaml>: {problem}"]
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    assert check_config(cfg, base_dir=tmp_path, run_axolotl=False).messages() == [f"{cfg}:{line} <yaml>: {problem}"]
    data, index = load_yaml_with_lines("a: 1\nb:\n  c: [1, 2]\n  d:\n    - e: 3\n")
    assert data == {"a": 1, "b": {"c": [1, 2], "d": [{"e": 3}]}}
    assert (index[("a",)], index[("b", "c")], index[("b", "c", 1)], index[("b", "d", 0, "e")]) == (1, 3, 3, 5)
    assert load_yaml_with_lines("") == (None, {})
