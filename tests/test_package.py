"""`stepwise package` (issue 17 item 2) and GGUF students evaluated through llama.cpp (issue 21).

A tiny LoRA student (peft on the bundled SmolLM2-135M, its B matrices set to small random values so
the merge changes the weights) is packaged once per module: merged weights + card + f16/q8_0 GGUF.
The GGUF round trip loads the f16 file back with transformers (`gguf_file=`) and with llama.cpp, and
both must give the merged model's greedy answers on 5 test prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stepwise.training.testing import TICKETS, TRAINING_RECIPE, write_export

from stepwise.io import atomic_write_jsonl
from stepwise.layout import RunLayout
from stepwise.recipe import load_recipe
from stepwise.rundir import RunDir

EVAL = "eval:\n  task:\n    max_new_tokens: 10\n    bootstrap: 0\n  forgetting:\n    enabled: false\n"
N_PROMPTS = 5


def _recipe(tmp: Path):
    (tmp / "inputs.jsonl").write_text('{"text": "x", "label": "billing"}\n', encoding="utf-8")
    (tmp / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, ...\n", encoding="utf-8")
    path = tmp / "recipe.yaml"
    path.write_text(TRAINING_RECIPE.format(extra="") + EVAL, encoding="utf-8")
    return load_recipe(path)


def _test_rows() -> list[dict]:
    return [{"id": f"t{i}", "input": {"text": text}, "gold": label} for i, (text, label, _) in enumerate(TICKETS)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A run with an exported dataset, a test split and a LoRA adapter under train/ (as training leaves it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from stepwise.curation.dataset_card import write_dataset_card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepwise.models import resolve_model_dir

    tmp = tmp_path_factory.mktemp("package")
    recipe = _recipe(tmp)
    run_dir = tmp / "runs" / recipe.name / "r1"
    write_export(recipe, run_dir, n_train=6, n_val=2)
    lay = RunLayout(run_dir)
    lay.stage_dir("curate").mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(lay.curated("test"), _test_rows())
    run = RunDir(run_dir)
    write_dataset_card(recipe, run)
    base_dir = resolve_model_dir("smollm2-135m-instruct")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    out = lay.train_output("tiny-lora")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(out)
    return recipe, run, tmp


@pytest.fixture(scope="module")
def packaged(lora_run):
    from stepwise.training.package import run_package

    recipe, run, tmp = lora_run
    return recipe, run, run_package(recipe, run)


def _greedy(model, tok, prompts: list[list[dict]], max_new_tokens: int = 10) -> list[str]:
    import torch

    out = []
    for messages in prompts:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def _prompts(recipe) -> list[list[dict]]:
    from stepwise.pipelines.student import inference_messages

    return [inference_messages(recipe.task, r["input"], recipe.training.dss_output) for r in _test_rows()[:N_PROMPTS]]


@pytest.mark.slow
def test_package_lora_student(packaged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepwise.models import resolve_model_dir

    recipe, run, res = packaged
    lay = run.layout
    model_dir = lay.package_model
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "system_prompt.txt", "README.md"):
        assert (model_dir / name).exists(), name
    assert (model_dir / "system_prompt.txt").read_text().strip() == recipe.task.system_prompt.strip()
    # merged = base + adapter: the same logits as the PeftModel, different from the base's
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok.apply_chat_template(_prompts(recipe)[0], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("smollm2-135m-instruct")), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**enc).logits
        peft_logits = PeftModel.from_pretrained(base, str(lay.train_output("tiny-lora"))).eval()(**enc).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()(**enc).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-3), (peft_logits - merged_logits).abs().max()
    assert (base_logits - merged_logits).abs().max() > 1e-2
    # the model card: HF front matter with the bundled base and its licence, the lineage hash, the tables
    card = lay.model_card.read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert front["pipeline_tag"] == "text-generation"
    from stepwise.curation.dataset_card import lineage_hash

    assert lineage_hash(lay)[0] in card
    assert "| input | `inputs.jsonl` | 1 | mit |" in card  # the data file's licence, from the LICENSE beside it
    assert "Not measured (no `eval/student_vs_teacher.json`" in card and "Not measured (no `eval/task.json`" in card
    assert "```yaml\nname: tiny-train" in card  # the recipe
    # serving files
    modelfile = lay.modelfile.read_text()
    assert "FROM ./student-q8_0.gguf" in modelfile and recipe.task.system_prompt.strip() in modelfile
    serve = lay.serve_commands.read_text()
    assert "vllm serve ./model" in serve and "ollama create" in serve
    for kind in ("f16", "q8_0"):
        path = lay.package_gguf(kind)
        assert res.gguf[kind] == path and path.read_bytes()[:4] == b"GGUF"
    assert not list(lay.package_dir.rglob("*.partial"))
    info = run.stage_info("package")
    assert info["status"] == "done" and info["lineage_hash"] == lineage_hash(lay)[0]


@pytest.mark.slow
def test_gguf_round_trip_transformers_and_llamacpp(packaged):
    """The f16 GGUF loaded back with transformers (`gguf_file=`) gives the merged model's greedy answers on
    5 test prompts; so does llama.cpp (the eval backend). q8_0: loads, and how many answers match is printed."""
    import torch
    from stepwise.evals.gguf_generate import generate_gguf
    from stepwise.evals.modelref import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, run, res = packaged
    lay = run.layout
    prompts = _prompts(recipe)
    tok = AutoTokenizer.from_pretrained(str(lay.package_model))
    merged = AutoModelForCausalLM.from_pretrained(str(lay.package_model), dtype=torch.float32).eval()
    want = _greedy(merged, tok, prompts)
    gguf_dir, f16 = str(lay.package_dir), lay.package_gguf("f16").name
    g_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=f16)
    g_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=f16, dtype=torch.float32).eval()
    assert _greedy(g_model, g_tok, prompts) == want
    llama = generate_gguf(resolve_model(str(lay.package_gguf("f16"))), prompts, max_new_tokens=10)
    assert llama.texts == want
    q8 = generate_gguf(resolve_model(str(lay.package_gguf("q8_0"))), prompts, max_new_tokens=10)
    print(f"q8_0 answers equal to the merged model's: {sum(a == b for a, b in zip(q8.texts, want, strict=True))} of {len(want)}")
    assert all(t is not None for t in q8.texts)


@pytest.mark.slow
def test_gguf_eval_scores_match_transformers(packaged):
    """`stepwise eval --model <gguf>`'s path: the same prompts through llama.cpp give the same answers as
    transformers on the merged weights, and identical answers score identically."""
    from stepwise.evals.modelref import resolve_model
    from stepwise.evals.task_eval import evaluate_task

    recipe, run, _ = packaged
    rows = _test_rows()[:N_PROMPTS]
    hf_report, hf_preds = evaluate_task(recipe, resolve_model(str(run.layout.package_model)), rows)
    gg_ref = resolve_model(str(run.layout.package_gguf("f16")))
    assert gg_ref.kind == "gguf"
    gg_report, gg_preds = evaluate_task(recipe, gg_ref, rows)
    assert [p["raw"] for p in gg_preds] == [p["raw"] for p in hf_preds]
    assert [(p["pred"], p["correct"], p["parse_status"]) for p in gg_preds] == \
        [(p["pred"], p["correct"], p["parse_status"]) for p in hf_preds]
    assert gg_report["metrics"] == hf_report["metrics"] and gg_report["parse_status"] == hf_report["parse_status"]
    assert gg_report["generation"]["backend"] == "llama.cpp"


def test_gguf_model_ref_rejects_a_file_that_is_not_gguf(tmp_path):
    from stepwise.evals.modelref import resolve_model

    bad = tmp_path / "student.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(FileNotFoundError, match="not a GGUF"):
        resolve_model(str(bad))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from stepwise.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd)


def test_package_without_trained_model_exits_2_naming_the_train_stage(tmp_path):
    recipe = _recipe(tmp_path)
    run_dir = tmp_path / "runs" / recipe.name / "r1"
    write_export(recipe, run_dir, n_train=4, n_val=2)
    proc = _cli("package", str(recipe.source_path), "--run-dir", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train stage has not finished" in proc.stderr and "--from train" in proc.stderr
    assert not (run_dir / "package").exists()


@pytest.mark.slow  # the converter's own start (torch, transformers) takes ~10-20 s here
def test_failed_conversion_leaves_no_gguf(tmp_path):
    """A model the converter cannot read: ConversionError, and neither the GGUF nor its temp file exists;
    an earlier good file at the target is left as it was."""
    from stepwise.training.gguf import ConversionError, convert

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchArchForCausalLM"]}), encoding="utf-8")
    out = tmp_path / "student-f16.gguf"
    with pytest.raises(ConversionError, match="failed"):
        convert(model, out, "f16")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    out.write_bytes(b"GGUF earlier package")
    with pytest.raises(ConversionError):
        convert(model, out, "f16")
    assert out.read_bytes() == b"GGUF earlier package" and not list(tmp_path.glob("*.partial"))


def test_dataset_card_and_parquet_load_with_datasets(tmp_path):
    from datasets import load_dataset
    from stepwise.curation.dataset_card import write_dataset_card

    recipe = _recipe(tmp_path)
    run_dir = tmp_path / "runs" / recipe.name / "r1"
    train, val = write_export(recipe, run_dir, n_train=6, n_val=2)
    lay = RunLayout(run_dir)
    atomic_write_jsonl(lay.lineage("train"), [{"id": f"r{i}", "kind": "label", "rationale_source": src}
                                              for i, src in enumerate(["teacher"] * 4 + ["rationalized", "reviewer"])])
    written = write_dataset_card(recipe, RunDir(run_dir))
    assert lay.dataset_card in written and lay.dataset_parquet("train") in written
    ds = load_dataset(str(lay.stage_dir("export")), cache_dir=str(tmp_path / "hf-cache"))
    assert ds["train"].num_rows == 6 and ds["val"].num_rows == 2
    assert ds["train"][0]["messages"] == json.loads(train.read_text().splitlines()[0])["messages"]
    assert ds["train"]["rationale_source"][4:] == ["rationalized", "reviewer"]
    card = lay.dataset_card.read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "mit"  # from the LICENSE beside inputs.jsonl
    assert "| train | rationalized | 1 |" in card and "| train | teacher | 4 |" in card


def test_data_licence_unknown_when_no_licence_file_says_so(tmp_path):
    from stepwise.curation.dataset_card import data_sources

    recipe = _recipe(tmp_path)
    (tmp_path / "LICENSE").write_text("All rights reserved by someone.\n", encoding="utf-8")
    assert [s["license"] for s in data_sources(recipe)] == ["unknown"]
    (tmp_path / "LICENSE").unlink()
    assert data_sources(recipe)[0]["license_files"] == [] and data_sources(recipe)[0]["license"] == "unknown"


def test_base_licence_unknown_is_never_guessed(tmp_path):
    from stepwise.training.package import base_model_info

    recipe = _recipe(tmp_path)
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "config.json").write_text("{}", encoding="utf-8")
    recipe.training.base_model = str(base)
    assert base_model_info(recipe, base)["license"] == "unknown"
    (base / "README.md").write_text("---\nlicense: llama3.2\n---\n# card\n", encoding="utf-8")
    assert base_model_info(recipe, base)["license"] == "llama3.2"


def test_package_is_the_last_stage_with_its_own_exit_code():
    from stepwise.pipeline import PIPELINE, STAGE_EXIT

    assert PIPELINE[-1].name == "package" and STAGE_EXIT["package"] == 19
    assert PIPELINE[-1].outputs(RunLayout(Path("/r"))) == [Path("/r/package")]


def test_model_card_teacher_table_from_the_eval_record(tmp_path):
    """The card's student-vs-teacher table is eval/student_vs_teacher.json as stepwise.evals.teacher_compare
    renders it; without the file: None (the card says "not measured")."""
    from stepwise.training.package import teacher_table

    lay = RunLayout(tmp_path)
    assert teacher_table(lay) is None
    lay.eval_dir.mkdir()
    metric = {"value": 0.75, "ci_low": 0.6, "ci_high": 0.9}
    lat = {"measured": True, "note": None, "batch1": {"batch_size": 1, "n": 4, "p50_s": 0.5, "p95_s": 0.9,
                                                       "tokens_per_s": 20.0, "s_per_request": 0.6}, "batched": None}
    lay.student_vs_teacher.write_text(json.dumps({
        "version": 1, "main_metric": "accuracy", "n": 4, "student_cost_per_hour": 1.0, "notes": [],
        "models": [{"role": "teacher", "model": "big-teacher", "n": 4, "metrics": {"accuracy": {**metric, "value": 0.5}},
                    "vs_student": {"accuracy": {"other": 0.5, "student": 0.75, "delta": 0.25, "delta_ci": [0.0, 0.5]}},
                    "latency": {"measured": False, "note": "cached, latency not measured"}, "cost_per_1k": 2.5,
                    "cost_basis": "price x tokens"},
                   {"role": "student", "model": "tiny-lora", "n": 4, "metrics": {"accuracy": metric}, "vs_student": None,
                    "latency": lat, "cost_per_1k": 0.1667, "cost_basis": "measured"}],
        "break_even": {"requests": 1000, "text": "1,000 requests", "upfront_usd": 2.0, "data_spend_usd": 1.5,
                       "training_cost_usd": 0.5, "saving_per_request_usd": 0.002}}), encoding="utf-8")
    md = teacher_table(lay)
    assert "| big-teacher | teacher | 50.0 [60.0, 90.0] | +25.0 [+0.0, +50.0] |" in md
    assert "| tiny-lora | student | 75.0 [60.0, 90.0] | - | 0.500 / 0.900 |" in md and "Break-even: 1,000 requests" in md


def test_run_package_stage_with_a_hosted_student_says_there_is_nothing_to_package(tmp_path):
    """training.backend openai: the student's weights stay with the provider; `stepwise run` must not end
    with the package stage's exit 19 for that."""
    from stepwise.training.testing import make_run

    from stepwise.pipeline import PIPELINE, RunOptions

    recipe, run_dir = make_run(tmp_path, "backend: openai")
    assert "nothing to package" in PIPELINE[-1].run(recipe, RunDir(run_dir), RunOptions())
    assert not RunLayout(run_dir).package_dir.exists()


def test_full_finetune_is_copied_without_checkpoints(tmp_path):
    """A full fine-tune's weights go into package/model unchanged (no merge), its checkpoints and logs stay
    behind; with no GGUF asked for, none is written and the Modelfile is left out."""
    from stepwise.training.package import run_package

    from stepwise.io import sha256_file

    recipe = _recipe(tmp_path)
    run_dir = tmp_path / "runs" / recipe.name / "r1"
    write_export(recipe, run_dir, n_train=4, n_val=2)
    out = _stand_in_full_finetune(RunLayout(run_dir).train_output("tiny-full"))
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (out / "loss.csv").write_text("step,loss\n", encoding="utf-8")
    run = RunDir(run_dir)
    res = run_package(recipe, run, gguf=[])
    lay = run.layout
    assert sha256_file(lay.package_model / "model.safetensors") == sha256_file(out / "model.safetensors")
    assert not (lay.package_model / "checkpoint-2").exists() and not (lay.package_model / "loss.csv").exists()
    assert res.gguf == {} and not list(lay.package_dir.glob("*.gguf")) and not lay.modelfile.exists()
    assert "full fine-tune copied" in res.merged_from and "full fine-tune copied" in lay.model_card.read_text()
    assert json.loads((lay.package_model / "generation_config.json").read_text())["eos_token_id"] == 2


def _stand_in_full_finetune(out: Path) -> Path:
    """The bundled model's config and tokenizer with 1 MB of stand-in weights: packaging a full fine-tune copies
    the weights file without reading it, and these tests never load it (the 540 MB copy cost ~10 s each)."""
    import os
    import shutil

    from stepwise.models import resolve_model_dir

    shutil.copytree(resolve_model_dir("smollm2-135m-instruct"), out, ignore=shutil.ignore_patterns("*.safetensors"))
    (out / "model.safetensors").write_bytes(os.urandom(1 << 20))
    return out


def _full_finetune_run(tmp_path: Path, extra: str = ""):
    """A run whose train stage left a full fine-tune: packaging it merges nothing."""
    (tmp_path / "inputs.jsonl").write_text('{"text": "x", "label": "billing"}\n', encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(TRAINING_RECIPE.format(extra="") + EVAL + extra, encoding="utf-8")
    recipe = load_recipe(path)
    run_dir = tmp_path / "runs" / recipe.name / "r1"
    write_export(recipe, run_dir, n_train=4, n_val=2)
    _stand_in_full_finetune(RunLayout(run_dir).train_output("tiny-full"))
    return path, RunDir(run_dir)


@pytest.fixture
def fake_convert(monkeypatch):
    """llama.cpp's converter stood in for (the real one runs in the module's LoRA package and the end-to-end
    runs): writes a GGUF-headed file and records which formats were asked for."""
    import stepwise.training.gguf as gguf

    asked: list[str] = []

    def convert(model_dir: Path, out_path: Path, outtype: str, *, log_path: Path | None = None) -> Path:
        assert outtype in gguf.OUTTYPES and (model_dir / "config.json").exists()
        asked.append(outtype)
        out_path.write_bytes(b"GGUF " + outtype.encode())
        return out_path

    monkeypatch.setattr(gguf, "convert", convert)
    return asked


def test_recipe_package_gguf_is_what_the_package_stage_writes(tmp_path, fake_convert):
    """`package: {gguf: [f16]}` through `stepwise run`'s package stage: only the f16 file, the Modelfile on it;
    then `gguf: []`: no GGUF (the earlier one removed), no Modelfile, the merged model and cards still
    written and saying why; the stage's fingerprint changes with the field, so `stepwise run` re-packages."""
    from stepwise.pipeline import PIPELINE, RunOptions, fingerprint

    path, run = _full_finetune_run(tmp_path, "package:\n  gguf: [f16]\n")
    lay, stage = run.layout, PIPELINE[-1]
    recipe = load_recipe(path)
    detail = stage.run(recipe, run, RunOptions())
    assert fake_convert == ["f16"] and "student-f16.gguf" in detail
    assert [p.name for p in lay.package_dir.glob("*.gguf")] == ["student-f16.gguf"]
    assert "FROM ./student-f16.gguf" in lay.modelfile.read_text()
    assert "llama-server -m ./student-f16.gguf" in lay.serve_commands.read_text()
    assert "ollama create" in lay.serve_commands.read_text()
    before = fingerprint(stage, recipe, run, RunOptions())

    path.write_text(path.read_text(encoding="utf-8").replace("gguf: [f16]", "gguf: []"), encoding="utf-8")
    recipe = load_recipe(path)
    assert fingerprint(stage, recipe, run, RunOptions()) != before
    detail = stage.run(recipe, run, RunOptions())
    assert fake_convert == ["f16"], "no conversion asked for with package.gguf: []"
    assert "no GGUF" in detail and "no Ollama Modelfile" in detail
    assert not list(lay.package_dir.glob("*.gguf")) and not lay.modelfile.exists()
    assert (lay.package_model / "model.safetensors").exists() and lay.model_card.exists()
    serve, card = lay.serve_commands.read_text(), lay.model_card.read_text()
    assert "no Ollama Modelfile" in serve and "ollama create" not in serve and "llama-server" not in serve
    assert "No GGUF file was asked for" in card and ".gguf`: GGUF" not in card
    assert run.stage_info("package")["status"] == "done"


def test_package_cli_gguf_overrides_the_recipe(tmp_path, fake_convert):
    """`stepwise package` writes the recipe's package.gguf; `--gguf` (repeated values once) and `--no-gguf`
    override it; an unknown `--gguf` exits 2 naming the formats."""
    from typer.testing import CliRunner

    from stepwise.cli import app

    path, run = _full_finetune_run(tmp_path, "package:\n  gguf: [q8_0]\n")
    runner = CliRunner()

    def package(*args: str):
        return runner.invoke(app, ["package", str(path), "--run-dir", str(run.path), *args])

    assert package().exit_code == 0 and fake_convert == ["q8_0"]
    res = package("--gguf", "bf16", "--gguf", "f16", "--gguf", "bf16")
    assert res.exit_code == 0, res.output
    assert fake_convert == ["q8_0", "bf16", "f16"]
    assert sorted(p.name for p in run.layout.package_dir.glob("*.gguf")) == ["student-bf16.gguf", "student-f16.gguf"]
    res = package("--no-gguf")
    assert res.exit_code == 0 and "no Ollama Modelfile" in res.output and fake_convert == ["q8_0", "bf16", "f16"]
    assert not list(run.layout.package_dir.glob("*.gguf")) and not run.layout.modelfile.exists()
    res = package("--gguf", "q4_k_m")
    assert res.exit_code == 2 and "q4_k_m" in res.output and "f16, q8_0, bf16, f32" in res.output
