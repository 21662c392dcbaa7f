"""Step 2: quality filters: input length, empty or degenerate (repeated) text, language, answer present.

Language detection uses `langdetect` (seeded, so results are deterministic) when installed and
`filters.language` is set; texts under 20 characters are not judged (detectors guess on them).
The repetition test is hand-written: a teacher stuck in a loop produces the same word trigrams
again and again, which a share of distinct trigrams below 50% catches.
"""

from __future__ import annotations

import warnings
from typing import Any

from stepwise.curation.funnel import Rejection, StepOutcome
from stepwise.curation.text import split_input, words

from stepwise.recipe import Recipe


def is_repetitive(text: str, min_words: int = 12, min_distinct: float = 0.5) -> bool:
    toks = words(text)
    if len(toks) < min_words:
        return False
    grams = [tuple(toks[i : i + 3]) for i in range(len(toks) - 2)]
    return len(set(grams)) / len(grams) < min_distinct


class LanguageDetector:
    def __init__(self) -> None:
        try:
            from langdetect import DetectorFactory, detect_langs

            DetectorFactory.seed = 0
            self._detect = detect_langs
        except ImportError:
            self._detect = None
            warnings.warn("filters.language is set but langdetect is not installed: language filter skipped", stacklevel=2)

    @property
    def available(self) -> bool:
        return self._detect is not None

    def detect(self, text: str) -> tuple[str, float] | None:
        if self._detect is None or len(text.strip()) < 20:
            return None
        try:
            best = self._detect(text)[0]
        except Exception:  # noqa: BLE001 - langdetect raises on texts without features
            return None
        return best.lang, best.prob


def filter_step(rows: list[dict[str, Any]], recipe: Recipe) -> StepOutcome:
    spec = recipe.curation.filters
    lang = LanguageDetector() if spec.language else None
    kept: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    for row in rows:
        text, context = split_input(row.get("input"), recipe.task.input_fields)
        n = len(text.strip())
        reason = detail = None
        if n == 0 and not context:
            reason, detail = "empty_input", "input has no text"
        elif n < spec.min_input_chars:
            reason, detail = "input_too_short", f"{n} chars < {spec.min_input_chars}"
        elif n > spec.max_input_chars:
            reason, detail = "input_too_long", f"{n} chars > {spec.max_input_chars}"
        elif row.get("label") is None:
            reason, detail = "missing_answer", "no answer after validation"
        elif spec.drop_repeated_text and is_repetitive(text):
            reason, detail = "repeated_text", "input repeats itself (distinct word trigrams < 50%)"
        elif spec.drop_repeated_text and isinstance(row.get("rationale"), str) and is_repetitive(row["rationale"]):
            reason, detail = "repeated_text", "rationale repeats itself (distinct word trigrams < 50%)"
        elif lang is not None and lang.available:
            found = lang.detect(text)
            if found and found[0] != spec.language:
                reason, detail = "wrong_language", f"detected '{found[0]}' (p={found[1]:.2f}), want '{spec.language}'"
        if reason:
            rejected.append(Rejection(row, reason, detail))
        else:
            kept.append(row)
    return StepOutcome(kept, rejected)
