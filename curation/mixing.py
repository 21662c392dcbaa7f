"""Step 9: general-data mixing against forgetting (the seeds: 5-10% general-domain examples).

`curation.general_mix: {file, fraction}` adds rows from a general instruction file (JSONL with
`question`/`answer`, `instruction`/`output`, `prompt`/`response` or chat `messages`) so they make up
`fraction` of the final train set. Rows are sampled with the curation seed and carry their
provenance (file, line). When the pool is GSM8K (its train split, e.g. shared/data/general/
gsm8k_train), GSM8K becomes in-domain: `in_domain_benchmarks` tells the forgetting report not to
count GSM8K as retained general skill.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from stepwise.curation.funnel import StepOutcome

from stepwise.io import DataFileError, iter_records
from stepwise.recipe import Recipe

_PAIRS = [("question", "answer"), ("instruction", "output"), ("prompt", "response"), ("input", "output")]
_KNOWN_POOLS = {"gsm8k": "gsm8k"}


def general_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        return [{"role": m["role"], "content": str(m["content"])} for m in msgs]
    for q, a in _PAIRS:
        if isinstance(row.get(q), str) and isinstance(row.get(a), str):
            return [{"role": "user", "content": row[q]}, {"role": "assistant", "content": row[a]}]
    raise DataFileError(f"{where}: a general row needs `messages` or one of "
                        + ", ".join(f"{q}/{a}" for q, a in _PAIRS))


def in_domain_benchmarks(path: Path) -> list[str]:
    text = str(path).lower()
    return sorted({bench for key, bench in _KNOWN_POOLS.items() if key in text})


def mix_step(train: list[dict[str, Any]], recipe: Recipe) -> StepOutcome:
    spec = recipe.curation.general_mix
    if spec is None or spec.fraction <= 0 or not train:
        return StepOutcome(train, info={"skipped": True})
    path = recipe.resolve(spec.file)
    assert path is not None
    if path.is_dir() and not (path / "dataset_info.json").exists():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataFileError(f"{path}: no .jsonl file in the general_mix folder")
        path = files[0]
    pool = list(iter_records(path))
    want = round(spec.fraction * len(train) / (1 - spec.fraction))
    rng = random.Random(recipe.curation.seed)
    picked = sorted(rng.sample(range(len(pool)), min(want, len(pool))))
    added = []
    for k in picked:
        line, row = pool[k]
        where = f"{path}:{line}"
        added.append({
            "id": f"general:{path.parent.name}/{path.name}:{line}",
            "input": None,
            "label": None,
            "rationale": None,
            "messages": general_messages(row, where),
            "general": {"file": str(path), "line": line},
            "split": "train",
        })
    domains = in_domain_benchmarks(path)
    info = {"file": str(path), "fraction": spec.fraction, "rows": len(added), "pool": len(pool),
            "in_domain_benchmarks": domains}
    return StepOutcome(train + added, added=len(added), info=info)
