"""Checks for Axolotl configs: Axolotl's own schema first, then what it does not check.

1. Axolotl: `axolotl.utils.config.validate_config` (its pydantic schema and validators, with the
   target's capabilities: a bf16/tf32 GPU for GPU configs, none for the CPU profile), then
   `normalize_config` + `normalize_cfg_datasets` (as `axolotl.cli.config.load_cfg` does; it loads
   the model's config, so known models are pointed at their local copy to stay offline). We call
   these two rather than `load_cfg` because `load_cfg` also writes a debug log into `output_dir`
   and probes the local GPU.
2. Ours, because Axolotl lacks them (its schema ignores unknown keys and never opens the data):
   unknown keys (top level, dataset entries, fsdp_config, special_tokens) with "did you mean";
   dataset files that are missing, whose extension disagrees with `ds_type`, or whose rows are
   not the declared `chat_template` messages; adapter / quantisation combinations that make no
   sense; micro batch x gradient accumulation x GPUs against the number of training rows;
   settings the CPU profile cannot run; sequence_len beyond the model's positions; the seeds'
   LR ranges and 4:1 alpha:rank as warnings.
Every message names the file, line and key: `cfg.yaml:12 lora_r: ...`.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stepwise.training.common import CheckReport, Level, Problem

from stepwise.recipe import _line_for

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear", "lora_target_modules")
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
_EXT_FOR_TYPE = {"json": {".json", ".jsonl"}, "csv": {".csv"}, "parquet": {".parquet"}, "arrow": {".arrow"},
                 "text": {".txt"}}
MAX_ROW_ERRORS = 5


# --------------------------------------------------------------------------------------------
# Axolotl's schema


def _known_keys() -> tuple[set[str], set[str], set[str], set[str]]:
    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities, AxolotlInputConfig
    from axolotl.utils.schemas.datasets import DPODataset, SFTDataset
    from axolotl.utils.schemas.fsdp import FSDPConfig
    from axolotl.utils.schemas.model import SpecialTokensConfig

    def names(model: Any) -> set[str]:
        out = set(model.model_fields)
        for f in model.model_fields.values():
            for alias in (f.alias, f.validation_alias):
                if isinstance(alias, str):
                    out.add(alias)
                elif alias is not None and hasattr(alias, "choices"):
                    out.update(c for c in alias.choices if isinstance(c, str))
        return out

    return (names(AxolotlInputConfig) | names(AxolotlConfigWCapabilities), names(SFTDataset) | names(DPODataset),
            names(FSDPConfig), names(SpecialTokensConfig))


def target_capabilities(profile: str, num_gpus: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What Axolotl's capability validators should assume: the GPU a config is meant for."""
    import torch

    env = {"torch_version": torch.__version__.split("+", 1)[0]}
    if profile == "cpu":
        return {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}, env
    return {"bf16": True, "fp8": False, "tf32": True, "n_gpu": num_gpus, "compute_capability": "sm_90"}, env


def local_model_config_dir(base_model: str) -> str | None:
    """A local directory holding the model's config.json, without going online."""
    from stepwise.models import KNOWN_MODELS, known_name, resolve_model_dir

    p = Path(base_model).expanduser()
    if (p / "config.json").exists():
        return str(p)
    key = known_name(base_model)
    if key is None:
        for name, info in KNOWN_MODELS.items():
            if info["hf_name"].lower() == base_model.lower():
                key = name
    if key is None:
        return None
    try:
        return str(resolve_model_dir(key))
    except FileNotFoundError:
        return None


def axolotl_check(cfg: dict[str, Any], profile: str, num_gpus: int) -> tuple[list[Problem], bool, bool]:
    """Run Axolotl's validate_config + normalize_config; (problems, validated, normalized)."""
    from axolotl.utils.config import normalize_cfg_datasets, normalize_config, validate_config
    from axolotl.utils.dict import DictDefault
    from pydantic import ValidationError

    problems: list[Problem] = []
    caps, env = target_capabilities(profile, num_gpus)
    try:
        validated = validate_config(DictDefault(copy.deepcopy(cfg)), capabilities=caps, env_capabilities=env)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<config>"
            problems.append(Problem("error", loc, f"axolotl: {err['msg']}"))
        return problems, False, False
    except (ValueError, TypeError, KeyError) as exc:
        problems.append(Problem("error", "<config>", f"axolotl: {exc}"))
        return problems, False, False
    local = local_model_config_dir(str(cfg.get("base_model_config") or cfg.get("base_model") or ""))
    if local is None:
        problems.append(Problem("warning", "base_model", "model config not available offline: Axolotl's "
                                "normalize_config step (model type, tokenizer) was skipped"))
        return problems, True, False
    validated.base_model_config = local
    if not cfg.get("tokenizer_config"):
        validated.tokenizer_config = local
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_RANK")}
    try:
        normalize_config(validated)
        normalize_cfg_datasets(validated)
    except Exception as exc:  # Axolotl raises many kinds here; report them all as its verdict
        problems.append(Problem("error", "<config>", f"axolotl normalize_config: {type(exc).__name__}: {exc}"))
        return problems, True, False
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return problems, True, True


# --------------------------------------------------------------------------------------------
# Ours


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_keys(cfg: dict[str, Any], line: Any) -> list[Problem]:
    top, ds_keys, fsdp_keys, tok_keys = _known_keys()
    out = []
    for key in cfg:
        if key not in top:
            out.append(Problem("error", key, f"unknown key: Axolotl would silently ignore it{_suggest(key, top)}",
                               line((key,))))
    for section in ("datasets", "test_datasets"):
        for i, ds in enumerate(cfg.get(section) or []):
            if not isinstance(ds, dict):
                continue
            for key in ds:
                if key not in ds_keys:
                    out.append(Problem("error", f"{section}[{i}].{key}",
                                       f"unknown dataset key{_suggest(key, ds_keys)}", line((section, i, key))))
    for section, known in (("fsdp_config", fsdp_keys), ("special_tokens", tok_keys)):
        value = cfg.get(section)
        if isinstance(value, dict):
            for key in value:
                if key not in known:
                    out.append(Problem("error", f"{section}.{key}", f"unknown key{_suggest(key, known)}",
                                       line((section, key))))
    return out


def _is_local_path(path: str, ds: dict[str, Any]) -> bool:
    return bool(ds.get("ds_type")) or Path(path).suffix in {".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt"} \
        or path.startswith((".", "/", "~"))


def _check_jsonl_rows(path: Path, key: str, line: int | None,
                      check_row: Callable[[str, Any], str | None]) -> tuple[list[Problem], int]:
    """Count the non-blank rows of a JSONL file and check each (up to MAX_ROW_ERRORS problems):
    bad JSON is reported here, anything else by `check_row(where, row)` returning a message."""
    problems: list[Problem] = []
    rows = 0
    with path.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            rows += 1
            if len(problems) >= MAX_ROW_ERRORS:
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(Problem("error", key, f"{where}: invalid JSON ({exc.msg})", line))
                continue
            message = check_row(where, row)
            if message:
                problems.append(Problem("error", key, message, line))
    return problems, rows


def check_chat_rows(path: Path, ds: dict[str, Any], key: str, line: int | None) -> tuple[list[Problem], int]:
    """Every row is `{field_messages: [{role, content}, ...]}` with a role to train on."""
    field_messages = ds.get("field_messages") or "messages"
    mapping = ds.get("message_property_mappings") or {}
    role_key = mapping.get("role", ds.get("message_field_role") or "role")
    content_key = mapping.get("content", ds.get("message_field_content") or "content")
    roles_map = ds.get("roles") or {}
    valid_roles = CHAT_ROLES | {alias for aliases in roles_map.values() for alias in (aliases or [])}
    to_train = set(ds.get("roles_to_train") or ["assistant"])

    def check_row(where: str, row: Any) -> str | None:
        msgs = row.get(field_messages) if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            return (f"{where}: no `{field_messages}` list: not a chat_template row "
                    "(expected {\"messages\": [{\"role\", \"content\"}, ...]})")
        bad = [m for m in msgs if not isinstance(m, dict) or not isinstance(m.get(content_key), str)
               or m.get(role_key) not in valid_roles]
        if bad:
            return (f"{where}: message {json.dumps(bad[0])[:120]} lacks a valid "
                    f"`{role_key}` ({', '.join(sorted(CHAT_ROLES))}) or string `{content_key}`")
        if not any(m.get(role_key) in to_train for m in msgs):
            return f"{where}: no {'/'.join(sorted(to_train))} turn to train on"
        return None

    problems, rows = _check_jsonl_rows(path, key, line, check_row)
    if rows == 0:
        problems.append(Problem("error", key, f"{path}: empty dataset", line))
    return problems, rows


def check_preference_rows(path: Path, ds: dict[str, Any], key: str, line: int | None) -> tuple[list[Problem], int]:
    """DPO rows for `chat_template.*`: a prompt message list and one assistant message (or string) per side."""
    fields = {f: ds.get(f"field_{f}") or f for f in ("messages", "chosen", "rejected")}

    def check_row(where: str, row: Any) -> str | None:
        msgs = row.get(fields["messages"]) if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs or any(
                not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str)
                for m in msgs):
            return f"{where}: `{fields['messages']}` must be the prompt as a list of {{role, content}} messages"
        sides = {side: row.get(fields[side]) for side in ("chosen", "rejected")}
        bad = [side for side, v in sides.items() if not (isinstance(v, str) or (
            isinstance(v, dict) and v.get("role") == "assistant" and isinstance(v.get("content"), str)))]
        if bad:
            return f"{where}: `{fields[bad[0]]}` must be an assistant message {{role: assistant, content}} or a string"
        if sides["chosen"] == sides["rejected"]:
            return f"{where}: chosen and rejected are identical: no preference"
        return None

    problems, rows = _check_jsonl_rows(path, key, line, check_row)
    if rows == 0:
        problems.append(Problem("error", key, f"{path}: no preference pairs (`stepwise export --preferences` found no "
                                "reviewer corrections)", line))
    return problems, rows


def dpo_problems(cfg: dict[str, Any], line: Any, base_dir: Path) -> list[Problem]:
    """What Axolotl's DPO path does not check: where the policy starts from."""
    if not cfg.get("rl"):
        return []
    out: list[Problem] = []
    if cfg.get("adapter") and cfg.get("lora_model_dir"):
        out.append(Problem("error", "lora_model_dir", "ignored with rl + adapter: Axolotl gives TRL a fresh adapter "
                           "config (loaders/model.py _load_adapters), so DPO would start from the base; set base_model "
                           "to the merged SFT model instead (`stepwise train <sft config> --merge`)",
                           line(("lora_model_dir",))))
    base = str(cfg.get("base_model") or "")
    p = Path(base).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if base and (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        out.append(Problem("error", "base_model", f"{base} is a LoRA adapter, not a model: merge it into its base "
                           "first (`stepwise train <sft config> --merge` writes <output_dir>/merged)",
                           line(("base_model",))))
    elif base and (base.startswith((".", "/", "~")) or "/train/" in base) and not p.exists():
        out.append(Problem("warning", "base_model", f"SFT checkpoint {base} does not exist yet: train (and merge) "
                           "the SFT config first", line(("base_model",))))
    return out


def dataset_problems(cfg: dict[str, Any], line: Any, base_dir: Path, allow_missing: bool) -> tuple[list[Problem], int | None]:
    problems: list[Problem] = []
    train_rows: int | None = None
    for section in ("datasets", "test_datasets"):
        entries = cfg.get(section) or []
        if section == "datasets" and not entries:
            problems.append(Problem("error", "datasets", "no training datasets", line(("datasets",))))
        for i, ds in enumerate(entries):
            if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
                problems.append(Problem("error", f"{section}[{i}]", "each dataset needs a `path`", line((section, i))))
                continue
            key = f"{section}[{i}].path"
            where = line((section, i, "path"))
            raw = ds["path"]
            if not _is_local_path(raw, ds):
                problems.append(Problem("warning", key, f"'{raw}' is not a local file; assumed a hub dataset "
                                        "(not checked)", where))
                continue
            path = Path(raw).expanduser()
            path = path if path.is_absolute() else base_dir / path
            ds_type = ds.get("ds_type")
            allowed = _EXT_FOR_TYPE.get(str(ds_type)) if ds_type else None
            if allowed and path.suffix not in allowed:
                problems.append(Problem("error", f"{section}[{i}].ds_type", f"ds_type {ds_type} does not match "
                                        f"'{path.name}' (expected {', '.join(sorted(allowed))})",
                                        line((section, i, "ds_type"))))
            if not path.exists():
                # DPO's pairs come after review (`stepwise export --preferences`); `stepwise train` stops without them
                level: Level = "warning" if allow_missing or cfg.get("rl") else "error"
                hint = " (not yet exported: run `stepwise export`)" if allow_missing else ""
                hint = " (not yet exported: run `stepwise export --preferences`)" if cfg.get("rl") else hint
                problems.append(Problem(level, key, f"file not found: {raw}{hint}", where))
                continue
            if path.is_file() and ds.get("type") == "chat_template" and path.suffix in {".jsonl", ".json"}:
                found, rows = check_chat_rows(path, ds, key, where)
                problems.extend(found)
                if section == "datasets":
                    train_rows = (train_rows or 0) + rows
            elif path.is_file() and cfg.get("rl") and str(ds.get("type", "")).startswith("chat_template.") \
                    and path.suffix in {".jsonl", ".json"}:
                found, rows = check_preference_rows(path, ds, key, where)
                problems.extend(found)
                if section == "datasets":
                    train_rows = (train_rows or 0) + rows
    return problems, train_rows


def combination_problems(cfg: dict[str, Any], line: Any, profile: str) -> list[Problem]:
    P = Problem
    out: list[Problem] = []
    adapter = cfg.get("adapter")
    q4, q8 = bool(cfg.get("load_in_4bit")), bool(cfg.get("load_in_8bit"))
    if q4 and q8:
        out.append(P("error", "load_in_8bit", "load_in_4bit and load_in_8bit are both set; pick one", line(("load_in_8bit",))))
    if adapter is None:
        if q4 or q8:
            k = "load_in_4bit" if q4 else "load_in_8bit"
            out.append(P("error", k, f"{k} without an adapter: quantised base weights cannot be fully fine-tuned "
                         "(set adapter: qlora, or remove it for full fine-tuning)", line((k,))))
        for k in LORA_KEYS:
            if k in cfg:
                out.append(P("error", k, f"{k} without `adapter`: full fine-tuning ignores it "
                             "(set adapter: lora/qlora or remove it)", line((k,))))
    elif adapter in ("lora", "qlora"):
        if adapter == "qlora" and not q4:
            out.append(P("error", "adapter", "adapter: qlora needs load_in_4bit: true (NF4 base weights)", line(("adapter",))))
        if adapter == "lora" and q4:
            out.append(P("error", "load_in_4bit", "load_in_4bit with adapter: lora; a 4-bit base is QLoRA "
                         "(set adapter: qlora)", line(("load_in_4bit",))))
        if not cfg.get("lora_target_linear") and not cfg.get("lora_target_modules"):
            out.append(P("error", "adapter", "LoRA without targets: set lora_target_linear: true or "
                         "lora_target_modules", line(("adapter",))))
        r, alpha = cfg.get("lora_r"), cfg.get("lora_alpha")
        if not r:
            out.append(P("error", "lora_r", "adapter needs lora_r", line(("adapter",))))
        elif alpha and alpha / r != 4:
            out.append(P("warning", "lora_alpha", f"lora_alpha/lora_r = {alpha / r:g}; the DSS paper found 4:1 best",
                         line(("lora_alpha",))))
        kw = cfg.get("bnb_config_kwargs") or {}
        if adapter == "qlora" and kw.get("bnb_4bit_quant_type", "nf4") != "nf4":
            out.append(P("warning", "bnb_config_kwargs", "QLoRA is NF4; another quant type departs from the paper",
                         line(("bnb_config_kwargs",))))
    if cfg.get("deepspeed") and (cfg.get("fsdp") or cfg.get("fsdp_config")):
        out.append(P("error", "deepspeed", "deepspeed and fsdp are both set; pick one", line(("deepspeed",))))
    lr = cfg.get("learning_rate")
    if isinstance(lr, (int, float)) and not cfg.get("rl"):  # the seeds' ranges are for SFT
        lo, hi = (1e-4, 5e-4) if adapter else (1e-5, 5e-5)
        if not lo <= lr <= hi:
            kind = "LoRA/QLoRA" if adapter else "full fine-tuning"
            out.append(P("warning", "learning_rate", f"{lr:g} is outside the seeds' {lo:g}-{hi:g} for {kind}",
                         line(("learning_rate",))))
    if profile == "cpu":
        for key, bad in (("bf16", lambda v: v not in (False, None)), ("fp16", bool), ("tf32", bool),
                         ("flash_attention", bool), ("sample_packing", bool),
                         ("attn_implementation", lambda v: v is not None and "flash" in str(v)),
                         ("optimizer", lambda v: v is not None and ("paged" in str(v) or "8bit" in str(v))),
                         ("lora_mlp_kernel", bool), ("lora_qkv_kernel", bool), ("lora_o_kernel", bool),
                         ("lora_embedding_kernel", bool), ("activation_offloading", bool),
                         ("deepspeed", bool), ("fsdp_config", bool)):
            if key in cfg and bad(cfg[key]):
                out.append(P("error", key, f"{key}: {cfg[key]!r} cannot run on CPU (the cpu profile sets it off)",
                             line((key,))))
        for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"):
            if adapter and key not in cfg:
                out.append(P("error", key, f"{key} unset: Axolotl auto-enables the fused Triton kernels, "
                             "which need a GPU; set it to false", line(("adapter",))))
    elif cfg.get("bf16") is False and not cfg.get("fp16"):
        out.append(P("warning", "bf16", "bf16 and fp16 off on a GPU config: trains in fp32 (2x memory)", line(("bf16",))))
    return out


def batch_problems(cfg: dict[str, Any], line: Any, rows: int, num_gpus: int) -> list[Problem]:
    mb, ga = cfg.get("micro_batch_size") or 1, cfg.get("gradient_accumulation_steps") or 1
    if not (isinstance(mb, int) and isinstance(ga, int)):
        return []  # Axolotl's schema reports the type
    per_step = mb * ga * num_gpus
    desc = f"micro_batch_size {mb} x gradient_accumulation_steps {ga} x {num_gpus} GPU{'s' if num_gpus > 1 else ''}"
    if cfg.get("sample_packing"):
        return []  # packed sequences hold several rows: the row count says little about steps
    if per_step > rows:
        return [Problem("error", "gradient_accumulation_steps",
                        f"{desc} = {per_step} examples per optimizer step, but the training data has {rows} rows: "
                        "not one full step; lower gradient_accumulation_steps or micro_batch_size",
                        line(("gradient_accumulation_steps",)))]
    steps = (rows // per_step) * float(cfg.get("num_epochs") or 1)
    if cfg.get("max_steps"):
        steps = min(steps, int(cfg["max_steps"]))
    if steps < 10 and not cfg.get("max_steps"):
        return [Problem("warning", "gradient_accumulation_steps",
                        f"{desc} = {per_step} per step over {rows} rows gives {steps:g} optimizer steps in all; "
                        "warmup and the cosine schedule barely act", line(("gradient_accumulation_steps",)))]
    return []


def sequence_problems(cfg: dict[str, Any], line: Any) -> list[Problem]:
    seq = cfg.get("sequence_len")
    local = local_model_config_dir(str(cfg.get("base_model") or ""))
    if not seq or local is None:
        return []
    config = json.loads((Path(local) / "config.json").read_text(encoding="utf-8"))
    max_pos = (config.get("text_config") or config).get("max_position_embeddings")
    if max_pos and seq > max_pos:
        return [Problem("error", "sequence_len", f"{seq} exceeds the model's {max_pos} positions", line(("sequence_len",)))]
    return []


def check_axolotl_config(
    cfg: dict[str, Any],
    label: str = "<config>",
    index: dict[tuple[Any, ...], int] | None = None,
    *,
    profile: str | None = None,
    num_gpus: int | None = None,
    allow_missing_data: bool = False,
    base_dir: Path | None = None,
    run_axolotl: bool = True,
) -> CheckReport:
    """All checks on an Axolotl config (a mapping; stepwise.training.backends.check_config reads the
    file and picks the backend); `profile` cpu/gpu (default: cpu when bf16 is false and no flash
    attention is requested), `num_gpus` default from deepspeed/fsdp (2) else 1."""
    report = CheckReport(label)

    def line(loc: tuple[Any, ...]) -> int | None:
        return _line_for(index, loc) if index else None

    if profile is None:
        profile = "cpu" if cfg.get("bf16") is False and "flash" not in str(cfg.get("attn_implementation", "")) else "gpu"
    if num_gpus is None:
        num_gpus = 2 if (cfg.get("deepspeed") or cfg.get("fsdp_config")) else 1
    base_dir = base_dir or Path.cwd()

    report.problems += unknown_keys(cfg, line)
    data_problems, rows = dataset_problems(cfg, line, base_dir, allow_missing_data)
    report.problems += data_problems
    report.train_rows = rows
    report.problems += combination_problems(cfg, line, profile)
    report.problems += dpo_problems(cfg, line, base_dir)
    if rows:
        report.problems += batch_problems(cfg, line, rows, num_gpus)
    report.problems += sequence_problems(cfg, line)
    if run_axolotl:
        found, report.axolotl_validated, report.axolotl_normalized = axolotl_check(cfg, profile, num_gpus)
        for p in found:
            if p.line is None and p.key.split(".")[0] in cfg:
                p.line = line((p.key.split(".")[0],))
        report.problems += found
    return report
