"""End to end: both example recipes through every stage, offline, small sizes.

The teacher is the OpenAI-compatible stub on 127.0.0.1 (the real SmolLM2 teacher is covered in
test_generate); everything after it is the real thing: curation, auto review, export, Axolotl
configs checked by Axolotl, a real CPU training step, task + lm-eval forgetting evals, report.html
(rendered in headless Chromium when it is installed, as `make setup` does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stepwise.io import read_jsonl
from stepwise.pipeline import RunOptions, run_pipeline
from stepwise.recipe import load_recipe
from stepwise.rundir import create_run
from stepwise.testing.openai_stub import OpenAIStub
from tests.conftest import REPO

SECTIONS = ["Stages", "Teacher", "Curation funnel", "Label distribution", "Deduplication", "Review", "Training",
            "Task metrics", "Forgetting", "Artifacts"]


def small_copy(example: str, tmp_path: Path, base_url: str, limit: int) -> Path:
    src = REPO / "examples" / example
    dst = tmp_path / example
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "*.sqlite", "*.sqlite-*"))
    recipe = yaml.safe_load((dst / "recipe.yaml").read_text())
    recipe["teacher"] = {"provider": "openai", "model": "stub-teacher", "base_url": base_url, "concurrency": 4,
                         "format": recipe["teacher"].get("format", "dss")}
    recipe["data"]["limit"] = limit
    recipe.setdefault("training", {}).update(micro_batch_size=2, gradient_accumulation_steps=1, sequence_len=512)
    recipe.setdefault("curation", {})["min_train_rows"] = 4  # tiny on purpose: 24-36 inputs
    # latency_rows 2: the batch-1 latency pass still runs (student and base), on 2 prompts instead of 8
    recipe["eval"] = {"task": {"max_new_tokens": 48, "batch_size": 8, "bootstrap": 200, "limit": 8, "latency_rows": 2},
                      "forgetting": {"benchmarks": ["arc_easy"], "subset_size": 4, "max_drop": 0.05}}
    (dst / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return dst / "recipe.yaml"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
# package.gguf: one real GGUF conversion here, none in the other (each took 60-70 s on the shared 2 cores; the default
# f16 + q8_0 pair and the GGUF round trip are test_package's)
@pytest.mark.parametrize("example,limit,gguf", [("support-tickets", 36, ["f16"]), ("nl2dsl", 30, [])])
def test_example_end_to_end(tmp_path, example, limit, gguf):
    with OpenAIStub() as stub:
        recipe_path = small_copy(example, tmp_path, stub.base_url, limit)
        data = yaml.safe_load(recipe_path.read_text())
        data["package"] = {"gguf": gguf}
        recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
        recipe = load_recipe(recipe_path)
        run = create_run(recipe)
        summary = run_pipeline(recipe, run, RunOptions(cpu=True, max_steps=1, progress=False))
    statuses = {o.stage: o.status for o in summary.outcomes}
    details = {o.stage: o.detail for o in summary.outcomes}
    errors = {f.name: f.read_text()[-3000:] for f in run.path.glob("*.error.txt")}
    assert summary.exit_code in (0, 4), (statuses, details, errors)
    assert all(s == "done" for k, s in statuses.items() if k != "eval"), (statuses, details)
    assert statuses["eval"] in ("done", "gate_failed"), details["eval"]

    p = run.path
    for rel in ["generate/responses.jsonl", "curate/funnel.json", "curate/train.jsonl", "curate/test.jsonl",
                "review/reviewed.jsonl", "export/train.chat.jsonl", "eval/task.json", "eval/forgetting.json",
                "report.html", "manifest.json"]:
        assert (p / rel).exists(), rel
    assert list((p / "configs").glob("*.yaml")) and list((p / "train").glob("*/loss.csv"))
    # the package stage wrote the recipe's package.gguf formats, and a Modelfile only with a GGUF
    lay = run.layout
    assert (lay.package_model / "model.safetensors").exists() and lay.model_card.exists()
    assert sorted(f.name for f in lay.package_dir.glob("*.gguf")) == [f"student-{g}.gguf" for g in gguf]
    for g in gguf:
        with lay.package_gguf(g).open("rb") as fh:
            assert fh.read(4) == b"GGUF", g
    assert lay.modelfile.exists() == bool(gguf)

    # lineage: every training example -> a curated row -> a teacher response -> an input file line
    responses = {r["id"]: r for r in read_jsonl(p / "generate" / "responses.jsonl")}
    curated = {r["id"]: r for split in ("train", "val") for r in read_jsonl(p / "curate" / f"{split}.jsonl")}
    lineage = read_jsonl(p / "export" / "train.lineage.jsonl")
    chat = read_jsonl(p / "export" / "train.chat.jsonl")
    assert len(lineage) == len(chat) > 0
    data_lines = {}
    for rel in {r["source"]["file"] for r in responses.values()}:
        data_lines[rel] = (recipe.resolve(rel)).read_text().splitlines()
    for entry in lineage:
        if entry.get("kind") == "general":
            continue
        row = curated[entry["id"]]
        resp = responses[entry["id"]]
        assert resp["parse_status"] in ("ok", "missing_rationale") and resp["raw"]
        assert row["input"] == resp["input"]
        src_line = data_lines[resp["source"]["file"]][resp["source"]["line"] - 1]
        assert all(str(v)[:20] in src_line or isinstance(v, dict) for v in resp["input"].values())
    test_ids = {r["id"] for r in read_jsonl(p / "curate" / "test.jsonl")}
    assert not test_ids & {e["id"] for e in lineage}, "test rows leaked into training"

    manifest = run.read_manifest()
    for stage in ["generate", "curate", "review", "export", "configs", "train", "eval", "report"]:
        assert stage in manifest["stages"], stage
    gen = manifest["stages"]["generate"]
    # every input is asked once, except the gold test split held out before generation (nl2dsl)
    assert gen["cache"]["requests_sent"] + gen["counts"]["held_out"] == limit
    assert (gen["counts"]["held_out"] > 0) == (recipe.data.test_file is None)
    if recipe.data.test_file is None:  # the test split is the held-out file, never sent
        assert test_ids == {r["id"] for r in read_jsonl(run.layout.held_out_test)}

    html = (p / "report.html").read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html, title
    assert "has not run yet" not in html.split("<h2>Task metrics</h2>")[0].split("<h2>Label distribution</h2>")[0]
    assert html.count("<svg") >= 3 and "could not render" not in html

    browser = chromium()
    if browser:
        shot = REPO / "test-artifacts" / f"report-{example}.png"
        shot.parent.mkdir(exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,2400",
                        f"--screenshot={shot}", (p / "report.html").as_uri()],
                       check=True, timeout=120, capture_output=True)
        assert shot.exists() and shot.stat().st_size > 20_000  # a blank page is a few KB

    # a second run skips every stage whose inputs did not change
    again = run_pipeline(load_recipe(recipe_path), run, RunOptions(cpu=True, max_steps=1, progress=False,
                                                                    offline=True))
    assert {o.stage: o.status for o in again.outcomes if o.stage not in ("report",)} == {
        k: "skipped" for k in statuses if k != "report"}


@pytest.mark.slow
def test_trl_backend_through_stepwise_run(tmp_path):
    """`training.backend: trl` through the whole pipeline: the configs stage writes a TRL config,
    the train stage trains an IA3 adapter with it, and the eval stage scores that adapter. The data
    is small enough to leave the val split empty, which must not stop training."""
    with OpenAIStub() as stub:
        recipe_path = small_copy("support-tickets", tmp_path, stub.base_url, 24)
        data = yaml.safe_load(recipe_path.read_text())
        data["training"].update(backend="trl", modality="ia3")
        data["eval"]["task"]["limit"] = 4
        data["eval"]["forgetting"]["enabled"] = False
        recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
        recipe = load_recipe(recipe_path)
        run = create_run(recipe)
        summary = run_pipeline(recipe, run, RunOptions(cpu=True, max_steps=2, progress=False, until_stage="eval"))
    statuses = {o.stage: o.status for o in summary.outcomes}
    errors = {f.name: f.read_text()[-3000:] for f in run.path.glob("*.error.txt")}
    assert summary.exit_code == 0, (statuses, errors)
    assert all(statuses[s] == "done" for s in ("generate", "curate", "review", "export", "configs", "train", "eval"))
    [config] = (run.path / "configs").glob("*.yaml")
    cfg = yaml.safe_load(config.read_text())
    assert cfg["backend"] == "trl"
    # 24 inputs leave the val split empty: the config trains without an eval set instead of failing
    assert (run.path / "export" / "val.chat.jsonl").read_text() == "" and "val_file" not in cfg
    adapter = run.path / "train" / config.stem
    assert len((adapter / "loss.csv").read_text().splitlines()) == 1 + 2  # header + 2 steps
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    task = json.loads((run.path / "eval" / "task.json").read_text())
    assert task["n"] == 4
    assert task["model_info"]["kind"] == "adapter" and task["model_info"]["peft_type"] == "IA3"
    assert task["model_info"]["path"] == str(adapter)
