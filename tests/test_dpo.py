"""Preference tuning from review: pairs from reviewers' corrections, DPO configs that start from the
SFT checkpoint and pass Axolotl's schema + our checks, and a real CPU DPO run on SmolLM2-135M.

Fixture (stated as such): a `review/reviewed.jsonl` built from the support-tickets example's input
rows, where the "teacher" answer is a constructed wrong intent and the "reviewer" corrected it to
the row's gold Banking77 label. Only the rows marked corrected become pairs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stepwise.curation.export import export_rows
from stepwise.review.preferences import NoCorrections, preference_pairs, run_export_preferences
from stepwise.training.backends import check_config, generate_configs
from stepwise.training.configgen import write_configs

from stepwise.io import atomic_write_jsonl, iter_jsonl
from stepwise.recipe import load_recipe
from stepwise.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "support-tickets"
LABELS = json.loads((EXAMPLE / "data" / "labels.json").read_text())

RECIPE = f"""\
name: tickets-dpo
task:
  name: ticket-intent
  classes: {json.dumps(LABELS)}
  system_prompt: You are a senior support agent at an online bank who routes customer messages.
  instructions: Read the customer's message and decide which intent it expresses.
data:
  inputs: {EXAMPLE / "data" / "tickets.jsonl"}
  id_field: id
  label_field: label
teacher:
  provider: openai
  model: stub
  base_url: http://127.0.0.1:1/v1
training:
  base_model: smollm2-135m-instruct
  dss_output: {{dss}}
  sequence_len: 256
  micro_batch_size: 1
  gradient_accumulation_steps: 1
  gradient_checkpointing: false
  lora_r: 8
  dpo: {{dpo}}
{{extra}}
"""


def _reviewed_rows(n: int, corrected_every: int = 2) -> list[dict]:
    """Support-tickets rows; every `corrected_every`-th had a wrong teacher answer a reviewer fixed."""
    rows = []
    for i, (_, src) in enumerate(iter_jsonl(EXAMPLE / "data" / "tickets.jsonl")):
        if i >= n:
            break
        gold = src["label"]
        corrected = i % corrected_every == 0
        teacher = LABELS[(LABELS.index(gold) + 1) % len(LABELS)] if corrected else gold
        rows.append({
            "id": src["id"], "input": {"text": src["text"]}, "rationale": f"The customer writes: {src['text'][:40]}",
            "label": gold, "split": "val" if i == n - 1 else "train",
            "review": {"status": "submitted" if corrected else "auto_accepted", "corrected": corrected,
                       "teacher_label": teacher, "responses": []},
        })
    return rows


def _run(tmp: Path, rows: list[dict], dss: str = "multitask", extra: str = "",
         dpo: str = "{enabled: true, beta: 0.2}"):
    path = tmp / "recipe.yaml"
    path.write_text(RECIPE.format(dss=dss, extra=extra, dpo=dpo), encoding="utf-8")
    recipe = load_recipe(path)
    run = RunDir(tmp / "runs" / recipe.name / "r1")
    with run.stage("review") as st:
        atomic_write_jsonl(run.stage_dir("review") / "reviewed.jsonl", rows)
        st.outputs(run.path / "review" / "reviewed.jsonl")
    return recipe, run


@pytest.mark.parametrize("dss", ["multitask", "cot", "label_only"])
def test_pairs_render_like_the_sft_export(tmp_path, dss):
    recipe, run = _run(tmp_path, _reviewed_rows(6), dss)
    row = _reviewed_rows(6)[0]
    pairs = preference_pairs(row, recipe)
    # The row's rationale is the teacher's, written for the teacher's answer: a corrected row trains
    # label-only (SFT export and both sides of the pair), so there is one pair, on the label.
    assert len(pairs) == 1
    kind, pair = pairs[0]
    sft = dict(export_rows(row, recipe))[kind]
    assert pair["messages"] == sft[:-1]  # same system prompt + user turn as SFT
    assert pair["chosen"] == sft[-1] and pair["chosen"]["content"].endswith(f"<answer>{row['label']}</answer>")
    assert pair["rejected"]["content"].endswith(f"<answer>{row['review']['teacher_label']}</answer>")
    assert pair["chosen"] != pair["rejected"]
    assert "<rationale>" not in pair["chosen"]["content"] and row["rationale"] not in pair["chosen"]["content"]
    assert preference_pairs(_reviewed_rows(6)[1], recipe) == []  # not corrected: no pair


def test_export_preferences_cli_writes_pairs_and_manifest(tmp_path):
    rows = _reviewed_rows(9)
    recipe, run = _run(tmp_path, rows)
    cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "export", str(tmp_path / "recipe.yaml"),
           "--run-dir", str(run.path), "--preferences"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [r for _, r in iter_jsonl(run.path / "export" / "preferences.jsonl")]
    lineage = [r for _, r in iter_jsonl(run.path / "export" / "preferences.lineage.jsonl")]
    expected = [r["id"] for r in rows if r["review"]["corrected"] and r["split"] == "train"]
    assert [x["id"] for x in lineage] == expected and len(out) == len(expected)
    # the fixture's rationale is the teacher's (for the rejected answer): no pair trains with it
    assert all(x["rationale_source"] is None for x in lineage)
    assert not any("The customer writes" in r["chosen"]["content"] for r in out)
    assert all(set(r) == {"messages", "chosen", "rejected"} for r in out)
    val = [r for _, r in iter_jsonl(run.path / "export" / "preferences.val.jsonl")]
    assert len(val) == (1 if rows[-1]["review"]["corrected"] else 0)
    stage = json.loads((run.path / "manifest.json").read_text())["stages"]["preferences"]
    assert stage["status"] == "done" and stage["counts"]["preference_pairs"] == len(expected)
    assert f"{len(expected)} pairs" in proc.stderr


def test_zero_corrections_is_a_clear_message(tmp_path):
    rows = _reviewed_rows(5, corrected_every=10**6)
    for r in rows:
        r["review"]["corrected"] = False
    recipe, run = _run(tmp_path, rows)
    with pytest.raises(NoCorrections, match="no preference pairs"):
        run_export_preferences(recipe, run)
    stage = json.loads((run.path / "manifest.json").read_text())["stages"]["preferences"]
    assert stage["counts"]["preference_pairs"] == 0
    cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "export", str(tmp_path / "recipe.yaml"),
           "--run-dir", str(run.path), "--preferences"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "no preference pairs" in proc.stderr and "reviewer" in proc.stderr


def test_no_review_is_bad_input(tmp_path):
    recipe, run = _run(tmp_path, _reviewed_rows(3))
    (run.path / "manifest.json").unlink()
    from stepwise.io import DataFileError

    with pytest.raises(DataFileError, match="review"):
        run_export_preferences(recipe, run)


def _dpo_configs(tmp_path: Path, extra: str = "", dpo: str = "{enabled: true, beta: 0.2}"):
    recipe, run = _run(tmp_path, _reviewed_rows(9), extra=extra, dpo=dpo)
    run_export_preferences(recipe, run)
    configs = generate_configs(recipe, run_dir=run.path, use_data=False, relative_to=tmp_path)
    return recipe, run, configs


def test_dpo_configs_start_from_the_sft_checkpoint(tmp_path):
    recipe, run, configs = _dpo_configs(tmp_path)
    names = [c.name for c in configs]
    assert names == ["tickets-dpo-full", "tickets-dpo-lora", "tickets-dpo-qlora",
                     "tickets-dpo-full-dpo", "tickets-dpo-lora-dpo", "tickets-dpo-qlora-dpo"]
    dpo = {c.modality: c.config for c in configs if c.name.endswith("-dpo")}
    for cfg in dpo.values():
        assert cfg["rl"] == "dpo" and cfg["rl_beta"] == 0.2 and "dpo_beta" not in cfg
        assert cfg["datasets"] == [{"path": "runs/tickets-dpo/r1/export/preferences.jsonl",
                                    "type": "chat_template.default", "field_messages": "messages",
                                    "field_chosen": "chosen", "field_rejected": "rejected"}]
        assert "test_datasets" not in cfg and cfg["sample_packing"] is False
    assert dpo["full"]["base_model"] == "runs/tickets-dpo/r1/train/tickets-dpo-full" and "adapter" not in dpo["full"]
    assert dpo["full"]["learning_rate"] == 5e-7
    assert dpo["lora"]["base_model"] == "runs/tickets-dpo/r1/train/tickets-dpo-lora/merged"
    assert dpo["lora"]["adapter"] == "lora" and dpo["lora"]["learning_rate"] == 5e-6
    assert dpo["qlora"]["adapter"] == "qlora" and dpo["qlora"]["load_in_4bit"] is True
    header = next(c for c in configs if c.name == "tickets-dpo-lora-dpo").text()
    assert "adapter disabled" in header and "--merge" in header
    assert "second frozen copy" in next(c for c in configs if c.name == "tickets-dpo-full-dpo").text()


def test_dpo_config_passes_axolotl_and_our_checks(tmp_path):
    from stepwise.models import resolve_model_dir

    sft = resolve_model_dir("smollm2-135m-instruct")  # stands in for a merged SFT model dir
    recipe, run, configs = _dpo_configs(tmp_path, "  modality: lora", f"{{enabled: true, beta: 0.2, sft_checkpoint: {sft}}}")
    [gc] = [c for c in configs if c.name.endswith("-dpo")]
    [path] = write_configs([gc], tmp_path / "configs")
    for profile in ("gpu", "cpu"):
        cfg = gc.config if profile == "gpu" else __import__("stepwise.training.configgen").training.configgen.apply_cpu_profile(gc.config)
        report = check_config(cfg, profile=profile, base_dir=tmp_path)
        assert report.ok, report.messages()
        assert report.axolotl_validated and report.axolotl_normalized, report.messages()
        assert report.train_rows == 4
    assert check_config(path, base_dir=tmp_path).ok


def test_dpo_checks_catch_what_axolotl_ignores(tmp_path):
    recipe, run, configs = _dpo_configs(tmp_path, "  modality: lora")
    [gc] = [c for c in configs if c.name.endswith("-dpo")]
    adapter_dir = tmp_path / "sft-adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    bad = {**gc.config, "base_model": str(adapter_dir)}
    msgs = " ".join(check_config(bad, base_dir=tmp_path, run_axolotl=False).messages("error"))
    assert "is a LoRA adapter, not a model" in msgs and "--merge" in msgs
    bad = {**gc.config, "lora_model_dir": str(adapter_dir)}
    msgs = " ".join(check_config(bad, base_dir=tmp_path, run_axolotl=False).messages("error"))
    assert "lora_model_dir" in msgs and "fresh adapter" in msgs
    # missing SFT checkpoint: a warning at configs time (not trained yet)
    report = check_config(gc.config, base_dir=tmp_path, run_axolotl=False)
    assert any("does not exist yet" in m for m in report.messages("warning"))
    # pairs not exported yet: a warning at configs time (`stepwise run` writes configs before any review)
    prefs = run.path / "export" / "preferences.jsonl"
    saved = prefs.read_text()
    prefs.unlink()
    report = check_config(gc.config, base_dir=tmp_path, run_axolotl=False)
    assert report.ok and any("stepwise export --preferences" in m for m in report.messages("warning"))
    prefs.write_text(saved)
    # rows that are not preference pairs
    prefs.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "a"}) + "\n"
                     + json.dumps({"messages": "x", "chosen": "a"}) + "\n")
    msgs = " ".join(check_config(gc.config, base_dir=tmp_path, run_axolotl=False).messages("error"))
    assert "identical" in msgs and "prompt as a list" in msgs


@pytest.mark.slow
def test_sft_merge_dpo_chain_on_cpu(tmp_path):
    """The chain as a user runs it, with no override: `stepwise train <sft lora> --merge`, then the
    generated DPO config (whose base_model is `<run>/train/<sft>/merged`) trains from that merged
    SFT model. The DPO reference is the SFT model (fresh adapter disabled), so the first DPO loss is
    ln 2 (-log sigmoid(0)), measured against the SFT weights.

    The suite's one real DPO run (the tiny model trained once): a DPO config from the
    `training.dpo.sft_checkpoint` override differs only in its base_model, and
    test_dpo_config_passes_axolotl_and_our_checks checks that config with Axolotl."""
    from stepwise.curation.export import run_export
    from stepwise.training.backends import train

    recipe, run = _run(tmp_path, _reviewed_rows(9), extra="  modality: lora\n  learning_rate: 5.0e-4")
    run_export(recipe, run)
    run_export_preferences(recipe, run)
    configs = generate_configs(recipe, run_dir=run.path, relative_to=tmp_path)
    paths = dict(zip([c.name for c in configs], write_configs(configs, tmp_path / "configs"), strict=True))
    assert set(paths) == {"tickets-dpo-lora", "tickets-dpo-lora-dpo"}
    proc = subprocess.run([sys.executable, "-c", "from stepwise.cli import app; app()", "train",
                           str(paths["tickets-dpo-lora"]), "--run-dir", str(run.path), "--cpu", "--max-steps", "2",
                           "--merge"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = run.path / "train" / "tickets-dpo-lora" / "merged"
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))

    result = train(paths["tickets-dpo-lora-dpo"], run_dir=run.path, cpu=True, max_steps=2, base_dir=tmp_path)
    resolved = yaml.safe_load((result.out_dir / "axolotl.yaml").read_text())
    assert resolved["rl"] == "dpo" and Path(resolved["base_model"]).resolve() == merged.resolve()
    with (result.out_dir / "loss.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "train"]
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert abs(float(rows[0]["loss"]) - math.log(2)) < 1e-3, rows
    assert (result.out_dir / "adapter_model.safetensors").exists()
    adapter_cfg = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 8
    stages = json.loads((run.path / "manifest.json").read_text())["stages"]
    assert stages["train"]["status"] == "done" and stages["train_dpo"]["status"] == "done"
    assert stages["train_dpo"]["counts"]["steps"] == 2
