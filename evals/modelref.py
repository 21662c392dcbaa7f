"""What `--model` names, resolved offline: a known name, an HF dir, a LoRA adapter dir, a run's
trained model, a GGUF file (evaluated through llama.cpp, e.g. `package/student-f16.gguf`), or an
OpenAI-compatible endpoint (`openai:<model>@<base_url>`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stepwise.models import known_name, resolve_model_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class ModelRef:
    kind: Literal["hf", "adapter", "openai", "gguf"]
    label: str  # what reports call it
    path: Path | None = None  # hf: the model dir; adapter: the adapter dir; gguf: the file
    base: Path | None = None  # adapter: the base model dir
    model_name: str | None = None  # openai: the served model name
    base_url: str | None = None
    spec: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.kind != "openai"

    def identity(self) -> dict[str, Any]:
        """Stable description for cache keys: paths plus size/mtime of weight files."""
        out: dict[str, Any] = {"kind": self.kind, "model": self.model_name, "base_url": self.base_url}
        for key, p in (("path", self.path), ("base", self.base)):
            if p is not None:
                out[key] = str(p.resolve())
                out[key + "_weights"] = _weights_stamp(p)
        return out

    def lm_eval_args(self, dtype: str = "auto") -> str:
        """`model_args` for lm-eval's `hf` model: base + `peft=` for adapters (device goes separately)."""
        if self.kind == "adapter":
            return f"pretrained={self.base},peft={self.path},dtype={dtype}"
        if self.kind == "hf":
            return f"pretrained={self.path},dtype={dtype}"
        if self.kind == "gguf":
            raise ValueError(f"{self.path}: lm-eval forgetting runs need the HF weights (e.g. package/model/), "
                             "not a GGUF file")
        raise ValueError("lm-eval forgetting runs need a local model (HF dir or adapter), not an endpoint")


def _weights_stamp(p: Path) -> list[Any]:
    if p.is_file():  # a GGUF
        st = p.stat()
        return [[p.name, st.st_size, int(st.st_mtime)]]
    out = []
    for name in ("config.json", "adapter_config.json", *WEIGHT_FILES):
        f = p / name
        if f.exists():
            st = f.stat()
            out.append([name, st.st_size, int(st.st_mtime)])
    return out


def resolve_base(name_or_path: str, hint_dir: Path | None = None) -> Path:
    """An adapter's base model (`base_model_name_or_path`): known name, local dir, or a path
    relative to the adapter dir. Never goes to the Hub."""
    if known_name(name_or_path):
        return resolve_model_dir(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    if hint_dir is not None and (hint_dir / name_or_path).exists():
        return hint_dir / name_or_path
    # A hub id whose last part is a known model (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).
    tail = name_or_path.rstrip("/").split("/")[-1]
    if known_name(tail):
        return resolve_model_dir(tail)
    raise FileNotFoundError(
        f"base model '{name_or_path}' (from adapter_config.json) is not a known name or local directory; "
        "offline evaluation needs it locally: pass `--base <dir>`"
    )


def resolve_model(spec: str, base_override: str | None = None) -> ModelRef:
    spec = str(spec)
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        model, _, url = rest.partition("@")
        if not model:
            raise ValueError(f"'{spec}': expected openai:<model>@<base_url>")
        return ModelRef("openai", label=f"{model}@{url or 'api.openai.com'}", model_name=model,
                        base_url=url or None, spec=spec)
    if known_name(spec):
        path = resolve_model_dir(spec)
        return ModelRef("hf", label=known_name(spec) or spec, path=path, spec=spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model '{spec}': not a known name, directory or openai:<model>@<url>")
    if p.is_file():
        with p.open("rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise FileNotFoundError(f"{p}: a file but not a GGUF (starts with {magic!r}); --model takes a model "
                                    "directory, a GGUF file, a known name or openai:<model>@<url>")
        return ModelRef("gguf", label=p.name, path=p, spec=spec)
    if (p / "merged" / "config.json").exists():
        p = p / "merged"
    if (p / "adapter_config.json").exists():
        cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        base_name = base_override or cfg.get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{p}/adapter_config.json has no base_model_name_or_path: pass `--base`")
        base = resolve_base(base_name, hint_dir=p)
        return ModelRef("adapter", label=_label(p), path=p, base=base, spec=spec,
                        info={"peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                              "lora_alpha": cfg.get("lora_alpha"), "base_model": base_name})
    if (p / "config.json").exists():
        return ModelRef("hf", label=_label(p), path=p, spec=spec)
    raise FileNotFoundError(f"{p}: neither an HF model dir (config.json) nor a LoRA adapter (adapter_config.json)")


def _label(p: Path) -> str:
    parts = p.resolve().parts
    return "/".join(parts[-2:]) if p.name in ("merged", "final") else p.name


def newest_trained_model(run_path: Path) -> Path | None:
    """The newest model under `<run>/train/*/` (adapter, full weights or `merged/`)."""
    train = run_path / "train"
    if not train.is_dir():
        return None
    found: list[tuple[float, Path]] = []
    for d in train.iterdir():
        if not d.is_dir():
            continue
        for cand in (d / "merged", d):
            if (cand / "adapter_config.json").exists() or (cand / "config.json").exists():
                stamp = max((f.stat().st_mtime for f in cand.iterdir() if f.name in WEIGHT_FILES), default=0.0)
                found.append((stamp or os.path.getmtime(cand), d))
                break
    return max(found)[1] if found else None


def count_parameters(ref: ModelRef) -> dict[str, int | None]:
    """Trainable (adapter) and total parameter counts from the safetensors headers, without loading."""
    def st_count(path: Path) -> int | None:
        f = path / "model.safetensors" if (path / "model.safetensors").exists() else path / "adapter_model.safetensors"
        if not f.exists():
            return None
        import struct

        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total = 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            count = 1
            for s in v["shape"]:
                count *= s
            total += count
        return total

    if ref.kind == "adapter":
        return {"trainable": st_count(ref.path), "total": st_count(ref.base)}
    if ref.kind == "hf":
        n = st_count(ref.path)
        parent = ref.path.parent
        if ref.path.name == "merged" and (parent / "adapter_config.json").exists():
            return {"trainable": st_count(parent), "total": n}
        return {"trainable": n, "total": n}
    return {"trainable": None, "total": None}
