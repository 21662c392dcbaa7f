"""`stepwise package`: the trained student as something to ship.

Writes `package/` in the run (paths from stepwise.layout.RunLayout):
  model/                merged weights (LoRA/QLoRA/IA3 adapters merged into the base with peft's
                        `merge_and_unload`; full fine-tunes copied), tokenizer + chat template,
                        generation_config, system_prompt.txt, README.md (Hugging Face model card)
  student-f16.gguf, student-q8_0.gguf   llama.cpp's converter (stepwise.training.gguf); the formats
                        are the recipe's `package.gguf` (default f16 + q8_0; `[]`: none)
  Modelfile             Ollama, on the q8_0 GGUF (else f16, else the first one written; none without a GGUF)
  SERVE.md              the vLLM / Ollama / llama.cpp commands and the prompt the student expects
The data's card (`export/README.md` + parquet) is the export stage's (stepwise.curation.dataset_card);
the model card repeats its sources, licences and lineage hash.

Library: peft (merge), transformers (load/save), jinja2 (templates in stepwise/templates/package).
Hand-written: choosing what to merge, the base model's licence look-up (the bundled registry
stepwise.models, else the base model's own card front matter or config; never guessed: "unknown"),
and the tables the model card shows (eval, forgetting, student vs teacher from
eval/student_vs_teacher.json, "not measured" when a file is missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from stepwise.curation.dataset_card import (
    data_sources,
    front_matter,
    lineage_hash,
    rationale_sources,
    render,
)

from stepwise.layout import RunLayout
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

# files of a full fine-tune's output folder that make up the model (checkpoints, logs stay behind)
_MODEL_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                          r"model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|"
                          r"chat_template\.(jinja|json)|vocab\.json|merges\.txt)$")


class NoTrainedModel(ValueError):
    """Nothing to package: the train stage has not produced a model (bad input: exit 2)."""


@dataclass
class PackageResult:
    model_dir: Path
    gguf: dict[str, Path] = field(default_factory=dict)
    merged_from: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    base_license: str = "unknown"
    dataset_card: Path | None = None


# -- what was trained ---------------------------------------------------------------------------


def trained_model(recipe: Recipe, run: RunDir):
    """The run's student (a stepwise.evals.modelref.ModelRef); NoTrainedModel naming the train stage."""
    from stepwise.evals.modelref import newest_trained_model, resolve_model

    if recipe.training.backend == "openai":
        raise NoTrainedModel("training.backend is openai: the student is a hosted fine-tuned model, its weights "
                             "stay with the provider; there is nothing to package")
    found = newest_trained_model(run.path)
    if found is None:
        info = run.stage_info("train") or {}
        raise NoTrainedModel(
            f"{run.layout.train_dir}: no trained model; the train stage has not finished (status "
            f"{info.get('status', 'not run')}): run `stepwise run {recipe.source_path} --from train` "
            f"(or `stepwise train`) first")
    return resolve_model(str(found))


def merge_student(ref: Any, out_dir: Path) -> str:
    """Write the student's full weights + tokenizer to `out_dir` (via `<out_dir>.partial`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if ref.kind == "adapter":
        from peft import PeftModel

        tok_src = ref.path if (ref.path / "tokenizer_config.json").exists() else ref.base
        base_cfg = json.loads((ref.base / "config.json").read_text(encoding="utf-8"))
        # merged in float32 (an adapter's delta added in bf16 loses its small updates), saved in the base's dtype
        lm = AutoModelForCausalLM.from_pretrained(str(ref.base), dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(lm, str(ref.path))
        if peft_model.peft_config[peft_model.active_adapter].is_prompt_learning:
            raise NoTrainedModel(f"{ref.path}: a prompt-learning adapter (virtual tokens) cannot be merged into "
                                 "the base weights; serve it with peft instead")
        merged = peft_model.merge_and_unload()
        dtype = base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"
        if dtype in ("bfloat16", "float16"):
            merged = merged.to(getattr(torch, dtype))
        merged.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(partial)
        how = f"LoRA adapter {ref.path.name} (r={ref.info.get('r')}, alpha={ref.info.get('lora_alpha')}) merged into {ref.base}"
    else:
        for f in sorted(ref.path.iterdir()):
            if f.is_file() and _MODEL_FILES.match(f.name):
                shutil.copy2(f, partial / f.name)
        if not (partial / "tokenizer_config.json").exists():
            raise NoTrainedModel(f"{ref.path}: the trained model has no tokenizer files to package")
        how = f"full fine-tune copied from {ref.path}"
    _byte_level_without_byte_fallback(partial)
    _align_eos(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    return how


def _byte_level_without_byte_fallback(model_dir: Path) -> None:
    """A byte-level BPE (GPT-2 style) has a token for every byte, so `byte_fallback` never fires and
    the tokenizer encodes the same without it. transformers' GGUF import (our bundled model's HF copy)
    sets it anyway, and llama.cpp's converter then takes the tokenizer for a SentencePiece-style one
    and writes a GGUF whose tokenizer aborts llama.cpp; switched off here, the converter writes the
    GPT-2 vocabulary with its pre-tokenizer, as for the released model."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers") or [pre] if isinstance(pre, dict) else []
    if model.get("type") == "BPE" and model.get("byte_fallback") and any(
            isinstance(p, dict) and p.get("type") == "ByteLevel" for p in pres):
        model["byte_fallback"] = False
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _align_eos(model_dir: Path) -> None:
    """generation_config.json's eos = the tokenizer's (end of turn), so vLLM and GGUF stop where training did."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.eos_token_id is None:
        return
    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        gen = GenerationConfig()
    gen.eos_token_id = tok.eos_token_id
    gen.save_pretrained(str(model_dir))


# -- licences -----------------------------------------------------------------------------------


def base_model_info(recipe: Recipe, base_dir: Path | None) -> dict[str, str]:
    """{"id", "license", "license_source"} of the base: the bundled registry, else the base's own model
    card front matter (README.md `license:`), else its config; "unknown" otherwise, never guessed."""
    from stepwise.models import KNOWN_MODELS, known_name

    name = recipe.training.base_model
    key = known_name(name)
    if key is not None:
        info = KNOWN_MODELS[key]
        return {"id": info["hf_name"], "license": info["license"].lower(),
                "license_source": "stepwise's bundled-model registry (stepwise.models)"}
    out = {"id": name, "license": "unknown", "license_source": "not stated by the base model"}
    if base_dir is not None:
        card = base_dir / "README.md"
        front = _front_matter(card.read_text(encoding="utf-8")) if card.exists() else {}
        if isinstance(front.get("license"), str) and front["license"].strip():
            return {**out, "license": front["license"].strip(), "license_source": f"{card} (front matter)"}
        cfg = base_dir / "config.json"
        if cfg.exists():
            lic = json.loads(cfg.read_text(encoding="utf-8")).get("license")
            if isinstance(lic, str) and lic.strip():
                return {**out, "license": lic.strip(), "license_source": f"{cfg}"}
    return out


def _front_matter(text: str) -> dict[str, Any]:
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    with contextlib.suppress(yaml.YAMLError):
        data = yaml.safe_load(m.group(1))
        return data if isinstance(data, dict) else {}
    return {}


# -- tables -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "n/a" if v is None else str(v)


def eval_table(lay: RunLayout) -> list[dict[str, str]]:
    """Task metrics of the student (and the untrained base): value and 95% CI per headline metric."""
    rows = []
    for who, path in (("student", lay.task_report), ("base", lay.eval_dir / "base_task.json")):
        rep = _read_json(path)
        if not rep:
            continue
        for metric, v in (rep.get("headline") or {}).items():
            if isinstance(v, dict) and "value" in v:
                rows.append({"model": who, "metric": metric, "value": _fmt(v["value"]),
                             "ci": f"[{_fmt(v.get('ci_low'))}, {_fmt(v.get('ci_high'))}]", "n": _fmt(v.get("n"))})
    return rows


def forgetting_table(lay: RunLayout) -> tuple[list[dict[str, str]], str | None]:
    rep = _read_json(lay.forgetting_report)
    if not rep:
        return [], None
    rows = []
    for name, b in (rep.get("benchmarks") or {}).items():
        if not isinstance(b, dict):
            continue
        rows.append({"benchmark": name, "metric": str(b.get("metric", "")),
                     "before": _fmt((b.get("before") or {}).get("value")),
                     "after": _fmt((b.get("after") or {}).get("value")),
                     "delta": _fmt(b.get("delta")), "n": _fmt(b.get("n"))})
    gate = rep.get("gate") or {}
    return rows, gate.get("verdict")


def teacher_table(lay: RunLayout) -> str | None:
    """Student vs teacher (and base) as Markdown, from eval/student_vs_teacher.json through
    stepwise.evals.teacher_compare's own table (the one the report and `stepwise compare` show)."""
    from stepwise.evals.teacher_compare import markdown

    table = _read_json(lay.student_vs_teacher)
    return markdown(table) if table and table.get("models") else None


# -- the package --------------------------------------------------------------------------------


def _example_prompt(recipe: Recipe, lay: RunLayout) -> list[dict[str, str]]:
    from stepwise.pipelines.student import inference_messages

    test = lay.curated("test")
    row_input: Any = None
    if test.exists():
        with test.open(encoding="utf-8") as fh:
            first = fh.readline()
        row_input = json.loads(first).get("input") if first.strip() else None
    if row_input is None:
        row_input = {f: f"<{f}>" for f in recipe.task.input_fields}
    return inference_messages(recipe.task, row_input, recipe.training.dss_output)


def run_package(recipe: Recipe, run: RunDir, *, gguf: Sequence[str] | None = None,
                log: Callable[[str], None] = lambda m: None) -> PackageResult:
    """`gguf`: the GGUF formats to write; None = the recipe's `package.gguf` (`stepwise package --gguf` overrides)."""
    from stepwise.training.gguf import LLAMACPP_VERSION, OUTTYPES, convert

    from stepwise.io import atomic_write_text

    gguf = list(recipe.package.gguf if gguf is None else gguf)
    lay = run.layout
    ref = trained_model(recipe, run)  # before the stage is opened: nothing to package is bad input, not a failure
    inputs = [p for p in (lay.chat("train"), lay.chat("val"), lay.task_report) if p.exists()]
    with run.stage("package", inputs=inputs, params={"gguf": list(gguf)}) as st:
        lay.package_dir.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        log(f"package: merging {ref.path}")
        how = merge_student(ref, lay.package_model)
        timings["merge_s"] = round(time.perf_counter() - t0, 2)
        messages = _example_prompt(recipe, lay)
        system_prompt = recipe.task.system_prompt.strip()
        atomic_write_text(lay.package_model / "system_prompt.txt", system_prompt + "\n")
        ggufs: dict[str, Path] = {}
        for outtype in gguf:
            t1 = time.perf_counter()
            log(f"package: GGUF {outtype}")
            target = lay.package_gguf(outtype)
            ggufs[outtype] = convert(lay.package_model, target, outtype,
                                     log_path=lay.package_dir / f"convert-{outtype}.log")
            timings[f"gguf_{outtype}_s"] = round(time.perf_counter() - t1, 2)
        for outtype in OUTTYPES:  # a GGUF from an earlier, wider packaging is stale now
            if outtype not in gguf:
                lay.package_gguf(outtype).unlink(missing_ok=True)
        sources = data_sources(recipe)
        base = base_model_info(recipe, ref.base if ref.kind == "adapter" else None)
        lhash, lfiles = lineage_hash(lay)
        forget_rows, gate = forgetting_table(lay)
        serve_name = re.sub(r"[^a-z0-9._-]+", "-", f"{recipe.name}-student".lower())
        template = _chat_template(lay.package_model)
        ollama_gguf = ggufs.get("q8_0") or ggufs.get("f16") or next(iter(ggufs.values()), None)
        ctx = dict(
            recipe=recipe, base=base, how=how, serve_name=serve_name, system_prompt=system_prompt,
            messages=messages, example_user=messages[-1]["content"], lineage_hash=lhash, lineage_files=lfiles,
            sources=sources, data_licences=sorted({s["license"] for s in sources}),
            eval_rows=eval_table(lay), forget_rows=forget_rows, gate=gate, teacher_rows=teacher_table(lay),
            ggufs={k: v.name for k, v in ggufs.items()}, ollama_gguf=ollama_gguf.name if ollama_gguf else None,
            chatml="<|im_start|>" in template, stop_token=_eos_text(lay.package_model),
            converter=f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python {LLAMACPP_VERSION}",
            recipe_yaml=(recipe.source_path.read_text(encoding="utf-8") if recipe.source_path else
                         yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)),
            rationale_sources=rationale_sources(lay),
        )
        front = {"base_model": base["id"], "license": base["license"], "library_name": "transformers",
                 "pipeline_tag": "text-generation",
                 "tags": ["stepwise", "distilling-step-by-step", "distillation", "gguf", recipe.task.name],
                 "datasets": [f"{recipe.name} (curated by stepwise; export/README.md)"]}
        atomic_write_text(lay.model_card, render("model_card.md.j2", front_matter=front_matter(front), **ctx))
        if ollama_gguf is not None:
            atomic_write_text(lay.modelfile, render("Modelfile.j2", **ctx))
        else:
            lay.modelfile.unlink(missing_ok=True)
        atomic_write_text(lay.serve_commands, render("SERVE.md.j2", **ctx))
        timings["total_s"] = round(time.perf_counter() - t0, 2)
        st.outputs(lay.model_card, *ggufs.values(), lay.serve_commands,
                   *(p for p in (lay.modelfile,) if p.exists()))
        st.extra(merged_from=how, base_model=base, lineage_hash=lhash, timings=timings)
    return PackageResult(lay.package_model, ggufs, how, timings, base["license"],
                         lay.dataset_card if lay.dataset_card.exists() else None)


def _chat_template(model_dir: Path) -> str:
    f = model_dir / "chat_template.jinja"
    if f.exists():
        return f.read_text(encoding="utf-8")
    cfg = _read_json(model_dir / "tokenizer_config.json") or {}
    return str(cfg.get("chat_template") or "")


def _eos_text(model_dir: Path) -> str | None:
    cfg = _read_json(model_dir / "tokenizer_config.json") or {}
    eos = cfg.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
