"""The curated data's card (`export/README.md`, Hugging Face dataset card format) and its
`datasets`-loadable copy (`export/data/<split>.parquet`), written by the export stage beside the
chat files they describe; `stepwise package` links them from the model card.

Library: pyarrow (parquet), jinja2 (stepwise/templates/package/dataset_card.md.j2), PyYAML (front
matter). Hand-written: the data licence look-up (a LICENSE / ATTRIBUTION.md / SOURCE.md beside each
data file, named by its SPDX id only when its text says which; otherwise "unknown", never guessed),
the lineage hash over the exact training files, and the rationale-source counts from the lineage
files (`teacher` / `rationalized` / `reviewer`).

`datasets.load_dataset(<run>/export)` reads the card's `configs:` and loads the parquet splits.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from stepwise.io import atomic_write_text, canonical_json, read_jsonl, sha256_file, sha256_text
from stepwise.layout import RunLayout
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

_LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "ATTRIBUTION.md", "SOURCE.md", "NOTICE")
# licence texts named by their SPDX id (lower case, as Hugging Face cards write them)
_LICENSE_PATTERNS = [
    (r"\bCC[ -]BY[ -]SA[ -]4\.0\b|Attribution-ShareAlike 4\.0", "cc-by-sa-4.0"),
    (r"\bCC[ -]BY[ -]4\.0\b|Creative Commons Attribution 4\.0", "cc-by-4.0"),
    (r"Apache License,? Version 2\.0|\bApache-2\.0\b", "apache-2.0"),
    (r"\bMIT License\b|Permission is hereby granted, free of charge", "mit"),
    (r"\bCC0\b", "cc0-1.0"),
]


def render(name: str, **ctx: Any) -> str:
    """A template from stepwise/templates/package (Markdown/Modelfile: no HTML escaping)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("stepwise", "templates/package"), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                             lstrip_blocks=True)
    return env.get_template(name).render(**ctx)


def front_matter(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).strip()


def data_sources(recipe: Recipe) -> list[dict[str, Any]]:
    """Each data file of the recipe: path, sha256, rows, and the licence found beside it."""
    files = [("input", f) for f in recipe.data.input_files]
    if recipe.data.test_file:
        files.append(("test", recipe.data.test_file))
    if recipe.curation.general_mix and recipe.curation.general_mix.file:
        files.append(("general mix", recipe.curation.general_mix.file))
    base = recipe.source_path.parent if recipe.source_path else None
    out = []
    for role, rel in files:
        path = recipe.resolve(rel)
        if path is None or not path.exists():
            out.append({"role": role, "file": rel, "sha256": None, "rows": None, "license": "unknown",
                        "license_files": []})
            continue
        found = [p for p in (path.parent / n for n in _LICENSE_FILES) if p.exists()]
        spdx = "unknown"
        for p in found:
            text = p.read_text(encoding="utf-8", errors="replace")[:20000]
            hit = next((sid for pat, sid in _LICENSE_PATTERNS if re.search(pat, text, re.I)), None)
            if hit:
                spdx = hit
                break
        rows = None
        if path.suffix == ".jsonl":
            with path.open("rb") as fh:
                rows = sum(1 for line in fh if line.strip())
        out.append({"role": role, "file": rel, "sha256": sha256_file(path), "rows": rows, "license": spdx,
                    "license_files": [_rel(p, base) for p in found]})
    return out


def _rel(p: Path, base: Path | None) -> str:
    if base is not None and p.resolve().is_relative_to(base.resolve()):
        return str(p.resolve().relative_to(base.resolve()))
    return str(p)


def lineage_hash(lay: RunLayout) -> tuple[str, list[dict[str, str]]]:
    """One hash over the exact training files (chat + lineage, per split), and the files it covers."""
    files = [p for s in ("train", "val") for p in (lay.chat(s), lay.lineage(s)) if p.exists()]
    entries = [{"file": str(p.relative_to(lay.root)), "sha256": sha256_file(p)} for p in files]
    return sha256_text(canonical_json(entries)), entries


def rationale_sources(lay: RunLayout) -> dict[str, dict[str, int]]:
    """Per split: training examples by the source of their rationale (teacher / rationalized / reviewer)."""
    out: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        path = lay.lineage(split)
        if path.exists():
            counts = Counter(str(r.get("rationale_source") or "none (label only)") for r in read_jsonl(path))
            out[split] = dict(sorted(counts.items()))
    return out


def write_dataset_card(recipe: Recipe, run: RunDir) -> list[Path]:
    """export/README.md and export/data/<split>.parquet (the chat examples with their lineage); returns them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lay = run.layout
    written: list[Path] = []
    splits: dict[str, int] = {}
    for split in ("train", "val"):
        chat = lay.chat(split)
        if not chat.exists():
            continue
        rows = read_jsonl(chat)
        lineage = read_jsonl(lay.lineage(split)) if lay.lineage(split).exists() else [{}] * len(rows)
        if len(lineage) != len(rows):
            raise ValueError(f"{lay.lineage(split)}: {len(lineage)} rows for {len(rows)} examples in {chat}")
        table = pa.Table.from_pylist(
            [{"messages": r["messages"], "id": lin.get("id"), "kind": lin.get("kind"),
              "rationale_source": lin.get("rationale_source")} for r, lin in zip(rows, lineage, strict=True)],
            schema=pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                              ("id", pa.string()), ("kind", pa.string()), ("rationale_source", pa.string())]))
        target = lay.dataset_parquet(split)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        pq.write_table(table, tmp)
        os.replace(tmp, target)  # a reader never sees half a file
        splits[split] = len(rows)
        written.append(target)
    sources = data_sources(recipe)
    funnel_path = lay.funnel
    funnel = json.loads(funnel_path.read_text(encoding="utf-8")) if funnel_path.exists() else {}
    licences = sorted({s["license"] for s in sources})
    front = {
        "license": licences[0] if len(licences) == 1 else "other",
        "task_categories": ["text-classification" if recipe.task.is_classification else "text-generation"],
        "tags": ["stepwise", "distilling-step-by-step", "synthetic", "rationales"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}.parquet"} for s in splits]}],
    }
    test = lay.curated("test")
    text = render("dataset_card.md.j2", front_matter=front_matter(front), recipe=recipe, teacher=recipe.teacher,
                  sources=sources, funnel=funnel, splits=splits, rationale_sources=rationale_sources(lay),
                  lineage=lineage_hash(lay), curated_test=len(read_jsonl(test)) if test.exists() else None)
    atomic_write_text(lay.dataset_card, text)
    written.append(lay.dataset_card)
    return written
