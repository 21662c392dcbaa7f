"""Steps 3-5: exact, near-duplicate (MinHash LSH) and optional semantic deduplication.

One representative is kept per group by a stated rule (`dedup.keep`):
- `best`: best parse status, then highest self-consistency (`agreement`), then earliest row;
- `earliest`: input order only.
Rows are visited best first; a row is removed when it duplicates a row already kept, and its
`collided_with` names that kept row, so every removed row points at a row it really duplicates
(no chaining through removed rows). Kept rows get `dedup_cluster` (their own id) and
`dedup_cluster_size` (1 + the rows removed against them).

Rows whose inputs have structured context fields (e.g. an index mapping) are duplicates only when
that context is identical (see `stepwise.curation.text.split_input`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from stepwise.curation.funnel import Rejection, StepOutcome
from stepwise.curation.text import answer_text, normalize, split_input, text_hash
from stepwise.pipelines.parsing import status_rank

from stepwise.recipe import Recipe, RecipeError


def rank_key(keep: str) -> Callable[[tuple[int, dict[str, Any]]], tuple]:
    def key(item: tuple[int, dict[str, Any]]) -> tuple:
        order, row = item
        if keep == "earliest":
            return (order,)
        agreement = row.get("agreement")
        return (status_rank(row.get("parse_status")), -(agreement if agreement is not None else 0.0), order)

    return key


def dedup_text(row: dict[str, Any], recipe: Recipe, over: str) -> tuple[str, str]:
    text, context = split_input(row.get("input"), recipe.task.input_fields)
    if over == "input_answer":
        text = f"{text}\n{answer_text(row.get('label'))}"
    return text, context


def _greedy(
    rows: list[dict[str, Any]], neighbours: dict[int, dict[int, float]], keep: str, reason: str, what: str
) -> StepOutcome:
    order = sorted(enumerate(rows), key=rank_key(keep))
    kept_idx: set[int] = set()
    rejected: list[Rejection] = []
    sizes: dict[int, int] = defaultdict(int)
    for i, row in order:
        hits = [(sim, j) for j, sim in neighbours.get(i, {}).items() if j in kept_idx]
        if hits:
            sim, j = max(hits, key=lambda t: (t[0], -t[1]))
            sizes[j] += row.get("dedup_cluster_size", 1)  # a removed row brings the rows it absorbed
            rejected.append(Rejection(row, reason, f"{what} {sim:.3f} with {rows[j]['id']}", rows[j]["id"]))
        else:
            kept_idx.add(i)
    kept = []
    for i in sorted(kept_idx):
        row = rows[i]
        row["dedup_cluster"] = row["id"]
        row["dedup_cluster_size"] = row.get("dedup_cluster_size", 1) + sizes.get(i, 0)
        kept.append(row)
    return StepOutcome(kept, rejected)


def exact_step(rows: list[dict[str, Any]], recipe: Recipe) -> StepOutcome:
    spec = recipe.curation.dedup
    if not spec.exact:
        return StepOutcome(rows, info={"skipped": True})
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        text, context = dedup_text(row, recipe, spec.minhash.over)
        groups[text_hash(normalize(text) + "\x1f" + context)].append(i)
    neighbours: dict[int, dict[int, float]] = defaultdict(dict)
    for members in groups.values():
        for a in members:
            for b in members:
                if a != b:
                    neighbours[a][b] = 1.0
    out = _greedy(rows, neighbours, spec.keep, "exact_duplicate", "same normalised text, similarity")
    for r in out.rejected:
        r.detail = f"same normalised text as {r.collided_with}"
    return out


def near_step(rows: list[dict[str, Any]], recipe: Recipe, processes: int = 1) -> StepOutcome:
    from stepwise.curation.minhash import near_duplicate_pairs

    spec = recipe.curation.dedup
    mh = spec.minhash
    if not mh.enabled or len(rows) < 2:
        return StepOutcome(rows, info={"skipped": not mh.enabled})
    texts, contexts = zip(*(dedup_text(r, recipe, mh.over) for r in rows), strict=True)
    pairs, sims = near_duplicate_pairs(
        list(texts), mh.threshold, num_perm=mh.num_perm, ngram=mh.ngram, shingle=mh.shingle,
        backend=mh.index, redis_url=mh.redis_url, processes=processes, seed=recipe.curation.seed,
    )
    neighbours = _neighbours(pairs, sims, contexts)
    out = _greedy(rows, neighbours, spec.keep, "near_duplicate", "jaccard")
    out.info = {"threshold": mh.threshold, "num_perm": mh.num_perm, "ngram": mh.ngram, "shingle": mh.shingle,
                "over": mh.over, "pairs": int(len(pairs))}
    return out


def semantic_step(rows: list[dict[str, Any]], recipe: Recipe) -> StepOutcome:
    from stepwise.curation.semantic import similar_pairs

    spec = recipe.curation.dedup
    sem = spec.semantic
    if not sem.enabled or len(rows) < 2:
        return StepOutcome(rows, info={"skipped": True})
    texts, contexts = zip(*(dedup_text(r, recipe, spec.minhash.over) for r in rows), strict=True)
    found = similar_pairs(list(texts), sem.threshold, sem.model)
    if found is None:  # enabled but not installed: an error, never a step skipped in silence
        from stepwise.curation.semantic import missing_model_problem

        raise RecipeError([f"curation.dedup.semantic.model: {missing_model_problem(sem.model)}"])
    pairs, sims = found
    out = _greedy(rows, _neighbours(pairs, sims, contexts), spec.keep, "semantic_duplicate", "cosine")
    out.info = {"threshold": sem.threshold, "model": sem.model, "pairs": int(len(pairs))}
    return out


def _neighbours(pairs: np.ndarray, sims: np.ndarray, contexts) -> dict[int, dict[int, float]]:
    neighbours: dict[int, dict[int, float]] = defaultdict(dict)
    for (a, b), s in zip(pairs.tolist(), sims.tolist(), strict=True):
        if contexts[a] != contexts[b]:
            continue
        neighbours[a][b] = s
        neighbours[b][a] = s
    return neighbours
