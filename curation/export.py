"""The export stage: curated (or reviewed) rows -> OpenAI chat `messages` JSONL for training.

Reads `review/reviewed.jsonl` when the review stage is `done` in the manifest, else curate's
train/val. Task rows become chat examples through `stepwise.pipelines.student.training_examples` (the one
definition of the student format, shared with evaluation: `multitask`, `cot` or `label_only`, with
the task's system prompt the model will see at inference); general-mix rows keep their own
messages. `{split}.lineage.jsonl` is line-aligned with `{split}.chat.jsonl` and records each
row's `rationale_source` (`teacher`, `rationalized` (the teacher explaining a gold or corrected
answer, `stepwise.pipelines.rationalize`), `reviewer`, or null when the row trains label-only, e.g.
a reviewer changed the answer but not the teacher's rationale, see `stepwise.review.stage`); the
manifest counts rows per source and split (`rationale_sources`).

Every example is measured with the student's tokenizer and chat template. With
`training.sequence_len` set, examples that do not fit are left out and listed in
`export/overlong.jsonl` (never silently truncated by the trainer); either way the manifest records
the longest example and a suggested `sequence_len` (the longest, rounded up to 64).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stepwise.curation.dataset_card import write_dataset_card
from stepwise.pipelines.student import training_examples
from stepwise.pipelines.tokens import CHARS_PER_TOKEN, approx_tokens
from stepwise.review.stage import rationale_source, training_rationale

from stepwise.io import DataFileError, atomic_write_jsonl, iter_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

TokenCounter = Callable[[list[dict[str, str]]], int]


def student_token_counter(recipe: Recipe) -> tuple[TokenCounter, str]:
    """Count tokens of a chat under the student's tokenizer + chat template."""
    try:
        from transformers import AutoTokenizer

        from stepwise.models import resolve_model_dir

        tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(recipe.training.base_model)))
    except Exception as exc:  # noqa: BLE001 - any failure to load falls back to an estimate, loudly
        warnings.warn(f"export: could not load the student tokenizer ({exc}); estimating ~{CHARS_PER_TOKEN} "
                      "characters per token", stacklevel=2)
        return approx_tokens, "estimate"

    def count(msgs: list[dict[str, str]]) -> int:
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(msgs, tokenize=True)
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            return len(ids)
        return len(tok("\n".join(m["content"] for m in msgs))["input_ids"])

    return count, recipe.training.base_model


def export_rows(row: dict[str, Any], recipe: Recipe) -> list[tuple[str, list[dict[str, str]]]]:
    if row.get("general"):
        return [("general", row["messages"])]
    # A reviewer-corrected row never trains with the rationale written for the teacher's answer.
    return training_examples(recipe.task, row["input"], training_rationale(row), row["label"],
                             recipe.training.dss_output)


def _source_rows(run: RunDir) -> tuple[dict[str, list[dict[str, Any]]], list[Path], str]:
    reviewed = run.layout.reviewed
    if run.stage_status("review") == "waiting":
        raise DataFileError(f"{run.layout.review_progress}: the review is waiting for reviewers; pull "
                            "again when they are done (`stepwise review pull`, or `--accept-pending`)")
    if run.stage_status("review") == "done" and reviewed.exists():
        rows = [r for _, r in iter_jsonl(reviewed)]
        return {"train": [r for r in rows if r.get("split", "train") == "train"],
                "val": [r for r in rows if r.get("split") == "val"]}, [reviewed], "review"
    paths = [run.layout.curated("train"), run.layout.curated("val")]
    for p in paths:
        if not p.exists():
            raise DataFileError(f"{p}: file not found (run `stepwise curate` first)")
    return {"train": [r for _, r in iter_jsonl(paths[0])], "val": [r for _, r in iter_jsonl(paths[1])]}, paths, "curate"


def run_export(recipe: Recipe, run: RunDir, counter: TokenCounter | None = None) -> dict[str, Any]:
    splits, inputs, source = _source_rows(run)
    tokenizer_name = "given"
    if counter is None:
        counter, tokenizer_name = student_token_counter(recipe)
    seq_len = recipe.training.sequence_len
    params = {"dss_output": recipe.training.dss_output, "sequence_len": seq_len,
              "system_prompt": recipe.task.system_prompt, "tokenizer": tokenizer_name}
    with run.stage("export", inputs=inputs, params=params) as st:
        run.stage_dir("export")
        overlong: list[dict[str, Any]] = []
        summary: dict[str, Any] = {"source": source, "dss_output": recipe.training.dss_output,
                                   "tokenizer": tokenizer_name, "sequence_len": seq_len}
        longest = 0
        written = []
        for name, rows in splits.items():
            chat, lineage = [], []
            kinds: dict[str, int] = {}
            sources: dict[str, int] = {}  # rows by whose rationale they train with (teacher/rationalized/reviewer)
            for line, row in enumerate(rows, start=1):
                if "id" not in row or (not row.get("general") and ("input" not in row or "label" not in row)):
                    raise DataFileError(f"{source} {name} row {line}: needs 'id', 'input' and 'label'")
                if not row.get("general"):
                    src = rationale_source(row) or "none"
                    sources[src] = sources.get(src, 0) + 1
                for kind, messages in export_rows(row, recipe):
                    n_tok = counter(messages)
                    longest = max(longest, n_tok)
                    if seq_len is not None and n_tok > seq_len:
                        overlong.append({"id": row["id"], "kind": kind, "split": name, "tokens": n_tok,
                                         "sequence_len": seq_len})
                        continue
                    chat.append({"messages": messages})
                    lineage.append({"id": row["id"], "kind": kind, "rationale_source": rationale_source(row)})
                    kinds[kind] = kinds.get(kind, 0) + 1
            chat_path, lin_path = run.layout.chat(name), run.layout.lineage(name)
            atomic_write_jsonl(chat_path, chat)
            atomic_write_jsonl(lin_path, lineage)
            written += [chat_path, lin_path]
            summary[name] = {"rows": len(rows), "examples": len(chat), "kinds": kinds,
                             "rationale_sources": dict(sorted(sources.items()))}
        over_path = run.layout.overlong
        atomic_write_jsonl(over_path, overlong)
        written.append(over_path)
        summary.update(max_tokens=longest, suggested_sequence_len=max(64, math.ceil(longest / 64) * 64),
                       overlong=len(overlong))
        # the data's card and a `datasets`-loadable parquet copy, beside the files they describe
        written += write_dataset_card(recipe, run)
        st.outputs(*written)
        st.counts(train_examples=summary["train"]["examples"], val_examples=summary["val"]["examples"],
                  overlong=len(overlong), max_tokens=longest)
        st.extra(export=summary)
    return summary
