"""Step 7: decontamination: drop training rows whose input overlaps the test set or a forgetting
benchmark, and say which reference row they overlapped.

Two tests, first match wins (by text, not by id: ids are only unique within one file): a shared word n-gram
(`contamination.ngram`, 13 by default, as in the GPT-3 / Llama decontamination reports; inputs
shorter than n words must equal a reference text); and MinHash similarity >= `minhash_threshold`
(signatures from `stepwise.curation.minhash`, references in a `datasketch.MinHashLSH` index that every
training row queries, candidates verified by exact Jaccard).

Benchmark texts are read from the repo's bundled subsets (`evals/data/<benchmark>/*.jsonl`); when a
benchmark is not bundled we fall back to `../shared/data/benchmarks/` with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stepwise.curation.funnel import Rejection, StepOutcome
from stepwise.curation.text import normalize, split_input

from stepwise.io import iter_jsonl
from stepwise.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "evals" / "data"
SHARED = REPO.parent / "shared" / "data" / "benchmarks"
_TEXT_FIELDS = ("question", "ctx", "text", "input", "prompt", "query")


@dataclass
class Reference:
    name: str  # "test" or a benchmark name
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    source: str = ""


def benchmark_reference(name: str) -> Reference | None:
    folder = BUNDLED / _folder_of(name)
    source = "bundled"
    if not folder.is_dir() or not list(folder.glob("*.jsonl")):
        folder = SHARED / _folder_of(name)
        source = "shared"
        if not folder.is_dir():
            warnings.warn(f"contamination: benchmark '{name}' not found under {BUNDLED} or {SHARED}; not checked",
                          stacklevel=2)
            return None
        warnings.warn(f"contamination: benchmark '{name}' is not bundled under evals/data/; "
                      f"using {folder}", stacklevel=2)
    ref = Reference(name, source=f"{source}:{folder}")
    for path in sorted(folder.glob("*.jsonl")):
        for line, row in iter_jsonl(path):
            text = next((row[f] for f in _TEXT_FIELDS if isinstance(row.get(f), str)), None)
            if text:
                ref.ids.append(f"{name}:{path.stem}:{line}")
                ref.texts.append(text)
    return ref


def _folder_of(name: str) -> str:
    """A benchmark's data folder: the recipe may name it as the forgetting eval does
    (`truthfulqa_mc1`, aliases), and its texts live under the folder (`truthfulqa_mc`)."""
    from stepwise.evals.benchmarks import bundled_folder

    try:
        return bundled_folder(name)
    except KeyError:
        return name


class Decontaminator:
    def __init__(self, refs: list[Reference], recipe: Recipe):
        spec = recipe.curation.contamination
        self.n = spec.ngram
        self.threshold = spec.minhash_threshold
        self.mh = recipe.curation.dedup.minhash
        self.seed = recipe.curation.seed
        self.refs = refs
        self.flat_ids: list[str] = []
        self.flat_names: list[str] = []
        self.flat_texts: list[str] = []
        for ref in refs:
            self.flat_ids.extend(ref.ids)
            self.flat_names.extend([ref.name] * len(ref.ids))
            self.flat_texts.extend(ref.texts)
        self.grams: dict[int, int] = {}
        self.exact: dict[str, int] = {}
        for k, text in enumerate(self.flat_texts):
            toks = normalize(text).split()
            self.exact.setdefault(" ".join(toks), k)
            for g in self._ngrams(toks):
                self.grams.setdefault(g, k)

    def _ngrams(self, toks: list[str]) -> list[int]:
        n = self.n
        return [hash(" ".join(toks[i : i + n])) for i in range(len(toks) - n + 1)]

    def check(self, texts: list[str]) -> list[tuple[str, str, int] | None]:
        """Per text: (reason, detail, reference index) or None."""
        out: list[tuple[str, str, int] | None] = [None] * len(texts)
        for i, text in enumerate(texts):
            toks = normalize(text).split()
            if not toks:
                continue
            if len(toks) < self.n:
                k = self.exact.get(" ".join(toks))
                if k is not None:
                    out[i] = ("contaminated_exact", "same normalised text", k)
                continue
            for g in self._ngrams(toks):
                k = self.grams.get(g)
                if k is not None:
                    out[i] = ("contaminated_ngram", f"shares a {self.n}-gram", k)
                    break
        todo = [i for i, o in enumerate(out) if o is None and texts[i].strip()]
        if todo and self.flat_texts:
            for i, k, sim in self._minhash([texts[i] for i in todo]):
                if out[todo[i]] is None:
                    out[todo[i]] = ("contaminated_minhash", f"jaccard {sim:.3f}", k)
        return out

    def _minhash(self, texts: list[str]) -> list[tuple[int, int, float]]:
        from stepwise.curation.minhash import MinHasher, datasketch_index, recall_bands, verify_pairs

        hasher = MinHasher(self.mh.num_perm, self.mh.ngram, self.mh.shingle, self.seed)
        sig, sh = hasher.signatures(self.flat_texts + texts, keep_shingles=True)
        n_ref = len(self.flat_texts)
        bands, rows = recall_bands(self.threshold, hasher.num_perm)
        lsh = datasketch_index(hasher, sig[:n_ref], bands, rows, redis_url=self.mh.redis_url)
        pairs = []
        for i in range(len(texts)):
            row_sig = sig[n_ref + i]
            if (row_sig == np.uint32(0xFFFFFFFF)).all():
                continue
            pairs.extend((k, n_ref + i) for k in lsh.query(hasher.datasketch_minhash(row_sig)))
        if not pairs:
            return []
        found, sims = verify_pairs(sig, sh, np.array(pairs, dtype=np.int64), self.threshold)
        best: dict[int, tuple[int, float]] = {}
        for (k, j), s in zip(found.tolist(), sims.tolist(), strict=True):
            if j - n_ref not in best or s > best[j - n_ref][1]:
                best[j - n_ref] = (k, s)
        return [(i, k, s) for i, (k, s) in sorted(best.items())]


def load_references(recipe: Recipe, test_rows: list[dict[str, Any]]) -> list[Reference]:
    spec = recipe.curation.contamination
    refs = []
    if spec.test_set and test_rows:
        ref = Reference("test", source="test split")
        for row in test_rows:
            ref.ids.append(str(row["id"]))
            ref.texts.append(split_input(row.get("input"), recipe.task.input_fields)[0])
        refs.append(ref)
    for name in spec.benchmarks:
        ref = benchmark_reference(name)
        if ref is not None:
            refs.append(ref)
    return refs


def contamination_step(rows: list[dict[str, Any]], recipe: Recipe, test_rows: list[dict[str, Any]]) -> StepOutcome:
    refs = load_references(recipe, test_rows)
    info: dict[str, Any] = {"references": {r.name: {"rows": len(r.ids), "source": r.source} for r in refs}}
    if not refs or not rows:
        return StepOutcome(rows, info=info)
    dec = Decontaminator(refs, recipe)
    texts = [split_input(r.get("input"), recipe.task.input_fields)[0] for r in rows]
    results = dec.check(texts)
    kept, rejected = [], []
    against: dict[str, int] = {}
    for row, res in zip(rows, results, strict=True):
        if res is not None:
            reason, detail, k = res
            name = dec.flat_names[k]
            snippet = dec.flat_texts[k][:120].replace("\n", " ")
            rejected.append(Rejection(row, reason, f"{detail} with {name}: '{snippet}'", dec.flat_ids[k]))
            against[name] = against.get(name, 0) + 1
        else:
            kept.append(row)
    info["dropped_against"] = dict(sorted(against.items()))
    return StepOutcome(kept, rejected, info=info)
