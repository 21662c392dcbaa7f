"""Text helpers shared by the curation steps: normalisation, the text a row is compared on.

Hand-written because they are a few lines each and every step must agree on them exactly:
exact dedup hashes `normalize(text)`, MinHash shingles `words(text)`, contamination n-grams the same.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

from stepwise.io import canonical_json

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalize(text: str) -> str:
    """Case-folded, NFKC, punctuation dropped, whitespace collapsed: 'Where's my card?!' -> 'where s my card'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def split_input(row_input: Any, fields: list[str] | None = None) -> tuple[str, str]:
    """(text, context) of a row's input.

    String-valued fields are the text that dedup, filters and contamination compare. Structured
    fields (dicts/lists, e.g. an index mapping) are context: two rows can only be duplicates when
    their context is identical, so two different questions against one mapping stay distinct.
    """
    if isinstance(row_input, str):
        return row_input, ""
    if not isinstance(row_input, dict):
        return str(row_input), ""
    keys = [k for k in (fields or list(row_input)) if k in row_input] or list(row_input)
    texts = [row_input[k] for k in keys if isinstance(row_input[k], str)]
    context = {k: row_input[k] for k in keys if not isinstance(row_input[k], str) and row_input[k] is not None}
    return "\n".join(texts), (canonical_json(context) if context else "")


def answer_text(label: Any) -> str:
    if label is None:
        return ""
    return label if isinstance(label, str) else canonical_json(label)
