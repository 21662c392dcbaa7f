"""Test inputs held out before generation: the teacher is never paid for a test row (hand-written).

When the input rows carry gold labels (`data.label_field`) and there is no `data.test_file`, the
test split is cut from the INPUT rows before any teacher request, with the same allocator and
ordering as curation's split (`stepwise.curation.splits.stratified_split`: seeded by
`curation.seed`, `curation.split` ratios, stratified by the gold class for classification tasks).
Generate writes those rows to the run's held-out test file (`RunLayout.held_out_test`) and asks the
teacher only for the rest; curate takes them as the test split, as it takes `data.test_file`. So no
test answer is bought and thrown away, and a teacher failure never shrinks the test split.

Rows without a gold label are never held out (the teacher's label is the only one they have):
when no row has one, curate cuts the test split from teacher-validated rows, as before. With
`data.test_file`, its rows are the test split and nothing is held out from the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stepwise.curation.splits import stratified_split

from stepwise.io import DataFileError, iter_jsonl
from stepwise.recipe import Recipe

T = TypeVar("T")

# funnel.json's `test_source` for a test split held out of the inputs before generation
HELD_OUT = "held out before generation"


def has_gold(gold: Any) -> bool:
    """A row carries a gold label (None or a blank string is none, as for stepwise.curation.labels)."""
    return gold is not None and not (isinstance(gold, str) and not gold.strip())


def holds_out(recipe: Recipe) -> bool:
    """Whether the recipe's test split comes from its own gold inputs (no test file, a label field)."""
    return recipe.data.test_file is None and recipe.data.label_field is not None


def _stratum(recipe: Recipe) -> Callable[[dict[str, Any]], Any] | None:
    """The gold class (an alias counts as its class) for classification; one stratum otherwise
    (a structured answer is unique per row: strata of one would all go to train)."""
    if not (recipe.curation.split.stratify and recipe.task.is_classification):
        return None
    aliases = recipe.task.label_aliases
    return lambda r: aliases.get(str(r["gold"]), str(r["gold"]))


def hold_out_test(recipe: Recipe, rows: Sequence[T], id_of: Callable[[T], str],
                  gold_of: Callable[[T], Any]) -> tuple[list[T], list[T]]:
    """(rows to ask the teacher about, test rows held out), both in input order. Deterministic in
    the row ids, `curation.seed` and `curation.split`; independent of the order of `rows`."""
    if not holds_out(recipe):
        return list(rows), []
    pool = [{"id": id_of(r), "gold": gold_of(r), "row": r} for r in rows if has_gold(gold_of(r))]
    if not pool:
        return list(rows), []
    sp = recipe.curation.split
    parts = stratified_split(pool, {"train": sp.train, "val": sp.val, "test": sp.test},
                             recipe.curation.seed, _stratum(recipe))
    test = {id(p["row"]) for p in parts["test"]}
    return [r for r in rows if id(r) not in test], [r for r in rows if id(r) in test]


# a test row's own keys (and those curate gives meaning to on any row): an input row's field of the
# same name is not copied onto its test row, so it cannot pose as a teacher answer or a mix row
ROW_KEYS = frozenset({"id", "source_id", "input", "gold", "source", "split", "format", "rationale", "label",
                      "answer_text", "rationale_source", "parse_status", "general"})


def row_fields(recipe: Recipe, raw: dict[str, Any]) -> dict[str, Any]:
    """The input row's other fields, kept on its test row: eval reads some of them (`dsl_alternatives`,
    `gold_alternatives`: accepted alternative gold answers, evals.task_eval), and a test row keeps
    what its source row said rather than a hand-picked list. The input, label and id fields are
    already on the row as `input`, `gold` and `id`."""
    used = {*recipe.task.input_fields, recipe.data.label_field, recipe.data.id_field}
    return {k: v for k, v in raw.items() if k not in used and k not in ROW_KEYS}


def held_out_info(recipe: Recipe, n: int) -> dict[str, Any]:
    """What holding the test split out saved: its rows were never requested (k samples each)."""
    return {"rows": n, "requests_saved": n * recipe.teacher.num_rationales}


def read_held_out(path: Path) -> list[dict[str, Any]]:
    """The held-out test rows generate wrote; a row without `id` or `input` names file:line."""
    rows = []
    for line, row in iter_jsonl(path):
        for f in ("id", "input"):
            if f not in row:
                raise DataFileError(f"{path}:{line}: field '{f}' is missing (a held-out test row)")
        rows.append({**row, "split": "test"})
    return rows


def check_held_out(recipe: Recipe, path: Path, responses: Sequence[dict[str, Any]],
                   held: Sequence[dict[str, Any]]) -> str | None:
    """Why the held-out rows are not the split the recipe asks for now (None when they are): the
    split is a function of the row ids and gold labels, so curate re-derives it from the responses
    plus the held-out rows. A `stepwise curate` run after `curation.seed` or `curation.split`
    changed, without the generate that re-splits, is caught here instead of mixing two splits."""
    every = [*responses, *held]
    _, want = hold_out_test(recipe, every, lambda r: str(r["id"]), lambda r: r.get("gold"))
    if {str(r["id"]) for r in want} == {str(r["id"]) for r in held}:
        return None
    return (f"{path}: the test split generate held out ({len(held)} rows) is not the one curation.seed / "
            f"curation.split give now ({len(want)} rows); run `stepwise generate` again (it re-splits; "
            "answers already paid for come from the cache), or `stepwise run`, which does")


def applies(recipe: Recipe, rows: Sequence[dict[str, Any]]) -> bool:
    """Whether generate held the test split out of these rows (responses + held-out rows): the
    recipe asks for it and at least one row has a gold label. Curate asks this to decide where its
    test split comes from, with the same answer generate had."""
    return holds_out(recipe) and any(has_gold(r.get("gold")) for r in rows)
