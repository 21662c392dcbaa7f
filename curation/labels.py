"""Gold labels must be spelled as the task spells them (hand-written).

A gold label in an input file or in `data.test_file` that is not exactly one of `task.classes`
(a typo, another case) would be quietly normalised or scored as a miss, so `stepwise validate`
and `stepwise curate` refuse it (exit 2), naming the file, the line and the label, with the class
it was probably meant to be. `task.label_aliases` stays the explicit way to accept a spelling.
The teacher's answers are matched leniently elsewhere (`stepwise.pipelines.parsing.LabelMatcher`); this
check is for the data the user owns.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stepwise.pipelines.parsing import normalize_label

from stepwise.io import iter_records
from stepwise.recipe import Recipe

_SHOWN_LINES = 5


@dataclass
class _BadLabel:
    file: str
    label: Any
    lines: list[int] = field(default_factory=list)


def _spelled(gold: Any) -> str | None:
    """The label as text, or None when the row has no gold label."""
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        return None
    if isinstance(gold, bool) or not isinstance(gold, str | int):
        return repr(gold)  # a list or an object is never a class name
    return str(gold)


def suggestion(label: str, classes: list[str], aliases: dict[str, str]) -> str | None:
    """The class a misspelt label most likely means: the same after case / separator
    normalisation, else the closest spelling."""
    norm = normalize_label(label)
    for c in classes:
        if normalize_label(c) == norm:
            return c
    for alias, target in aliases.items():
        if normalize_label(alias) == norm:
            return target
    close = difflib.get_close_matches(label, classes, n=1, cutoff=0.6)
    if not close:  # case differences hide closeness from difflib
        lowered = {c.lower(): c for c in classes}
        close = [lowered[m] for m in difflib.get_close_matches(label.lower(), list(lowered), n=1, cutoff=0.6)]
    return close[0] if close else None


def gold_label_problems(recipe: Recipe, rows: Iterable[tuple[str, int, Any]], what: str) -> list[str]:
    """One message per (file, unknown label): `file:line: <what> 'X' is not one of task.classes
    (did you mean 'x'?)` with how many rows carry it. `rows` yields (file, line, gold)."""
    task = recipe.task
    if not task.is_classification:
        return []
    known = set(task.label_set) | set(task.label_aliases)
    bad: dict[tuple[str, str], _BadLabel] = {}
    for file, line, gold in rows:
        label = _spelled(gold)
        if label is None or label in known:
            continue
        bad.setdefault((file, label), _BadLabel(file, label)).lines.append(line)
    problems = []
    for (file, label), entry in bad.items():
        lines = sorted(entry.lines)
        guess = suggestion(label, task.label_set, task.label_aliases)
        hint = f"did you mean '{guess}'? " if guess else ""
        more = ""
        if len(lines) > 1:
            shown = ", ".join(str(n) for n in lines[:_SHOWN_LINES]) + (", ..." if len(lines) > _SHOWN_LINES else "")
            more = f"; {len(lines)} rows carry it (lines {shown})"
        problems.append(f"{file}:{lines[0]}: {what} '{label}' is not one of task.classes ({hint}a different "
                        f"spelling is accepted only through task.label_aliases){more}")
    return problems


def data_file_gold_labels(recipe: Recipe) -> list[str]:
    """Check the gold labels of every input file and of `data.test_file` (what `stepwise validate`
    runs; reads the files once)."""
    field_name = recipe.data.label_field
    if not recipe.task.is_classification or not field_name:
        return []
    files = [recipe.resolve(f) for f in recipe.data.input_files]
    test = recipe.resolve(recipe.data.test_file)
    if test is not None:
        files.append(test)

    def rows():
        for path in files:
            if path is None or not path.exists():
                continue
            for line, raw in iter_records(path):
                yield str(path), line, raw.get(field_name)

    return gold_label_problems(recipe, rows(), f"label ({field_name})")


def curated_gold_labels(recipe: Recipe, responses: list[dict[str, Any]], test_rows: list[dict[str, Any]]) -> list[str]:
    """The same check on what curate reads: the gold each response row carries (its input file
    and line from `source`) and the rows of `data.test_file`."""
    field_name = recipe.data.label_field or "gold"

    def rows():
        for r in [*responses, *test_rows]:
            src = r.get("source") or {}
            yield str(src.get("file", "generate/responses.jsonl")), int(src.get("line") or 0), r.get("gold")

    return gold_label_problems(recipe, rows(), f"label ({field_name})")
