"""`stepwise export --preferences`: reviewers' corrections -> DPO preference pairs.

Every row a reviewer corrected in Argilla (`review.corrected` in `review/reviewed.jsonl`, with the
teacher's answer kept as `review.teacher_label`) becomes a pair on the same prompt: the
reviewer's answer is `chosen`, the teacher's is `rejected`. Neither Argilla nor Axolotl turns a
review round into preference data, so this module does.

Rendering goes through `stepwise.pipelines.student.training_examples`, the one definition of the student
format, for both answers, so the prompt (system prompt + user turn, `[label]` prefix in
`multitask`) and the assistant texts are exactly what the SFT export trains on. The teacher's
rationale argues for the teacher's answer, so it is never on the `chosen` side: when the reviewer
left it as it was, the row trains label-only (`stepwise.review.stage.settle_rationale`) and both sides
are rendered without a rationale (a `[label]` pair in `multitask`, a label-only pair in `cot`);
when the reviewer rewrote it, `chosen` carries the reviewer's rationale and `rejected` the
teacher's (in `multitask` also a `[rationale]` pair, in `cot` one pair with both). Examples that
come out identical for both answers are dropped.

Rows: `{"messages": [system, user], "chosen": {"role": "assistant", ...}, "rejected": {...}}`,
the layout Axolotl 0.19 reads with `rl: dpo` and `type: chat_template.default`
(`axolotl/prompt_strategies/dpo/chat_template.py`: `field_messages` is the prompt, `field_chosen`
/ `field_rejected` a single assistant message each). Lineage (row id, kind, both labels) goes to
the line-aligned `preferences.lineage.jsonl`, never into the training rows (extra columns would
reach TRL's collator). Train-split corrections go to `preferences.jsonl`; val-split corrections to
`preferences.val.jsonl` (held out, like the SFT val file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepwise.pipelines.student import training_examples
from stepwise.review.agreement import canonical
from stepwise.review.stage import rationale_source, training_rationale

from stepwise.io import DataFileError, atomic_write_jsonl, iter_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

DPO_DATASET_TYPE = "chat_template.default"
PREFERENCE_FIELDS = {"field_messages": "messages", "field_chosen": "chosen", "field_rejected": "rejected"}


class NoCorrections(Exception):
    """The review has no corrected rows: there is nothing to prefer."""


def preference_pairs(row: dict[str, Any], recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """(kind, pair) for one reviewed row; empty unless a reviewer changed the teacher's answer."""
    review = row.get("review") or {}
    if not review.get("corrected") or row.get("general"):
        return []
    if "teacher_label" not in review:
        raise DataFileError(f"reviewed row {row.get('id')}: corrected but no review.teacher_label")
    chosen_answer, rejected_answer = row["label"], review["teacher_label"]
    if canonical(chosen_answer) == canonical(rejected_answer):
        return []
    fmt = recipe.training.dss_output
    # `chosen` carries only a rationale written for the reviewer's answer (none when the reviewer
    # left the teacher's, see `stepwise.review.stage.settle_rationale`); `rejected` then carries the
    # teacher's own, so both sides render the same kinds and pair up.
    chosen_rationale = training_rationale(row)
    rejected_rationale = review.get("teacher_rationale", row.get("rationale")) if chosen_rationale else None
    chosen = dict(training_examples(recipe.task, row["input"], chosen_rationale, chosen_answer, fmt))
    rejected = dict(training_examples(recipe.task, row["input"], rejected_rationale, rejected_answer, fmt))
    out = []
    for kind, messages in chosen.items():
        other = rejected.get(kind)
        if other is None or other == messages or other[:-1] != messages[:-1]:
            continue
        out.append((kind, {"messages": messages[:-1], "chosen": messages[-1], "rejected": other[-1]}))
    return out


def run_export_preferences(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    """Write export/preferences{,.val}.jsonl (+ lineage) and record the `preferences` stage.

    Raises DataFileError when the review has not run, NoCorrections (after writing empty files and
    recording zero pairs) when no reviewer corrected anything."""
    reviewed = run.layout.reviewed
    if run.stage_status("review") != "done" or not reviewed.exists():
        raise DataFileError(f"{reviewed}: no finished review (run `stepwise review pull` first); preference pairs "
                            "come from rows reviewers corrected")
    rows = [r for _, r in iter_jsonl(reviewed)]
    params = {"dss_output": recipe.training.dss_output, "system_prompt": recipe.task.system_prompt,
              "format": DPO_DATASET_TYPE}
    run.stage_dir("export")
    summary: dict[str, Any] = {"reviewed_rows": len(rows), "dss_output": recipe.training.dss_output,
                               "format": DPO_DATASET_TYPE}
    with run.stage("preferences", inputs=[reviewed], params=params) as st:
        written: list[Path] = []
        corrected = 0
        for split, name in (("train", "preferences"), ("val", "preferences.val")):
            pairs, lineage = [], []
            for row in rows:
                if row.get("split", "train") != split:
                    continue
                found = preference_pairs(row, recipe)
                corrected += bool(found)
                for kind, pair in found:
                    pairs.append(pair)
                    lineage.append({"id": row["id"], "kind": kind, "chosen": row["label"],
                                    "rejected": row["review"]["teacher_label"],
                                    "rationale_source": rationale_source(row)})
            path, lin = run.layout.preferences(split), run.layout.lineage(name)
            atomic_write_jsonl(path, pairs)
            atomic_write_jsonl(lin, lineage)
            written += [path, lin]
            summary[split] = len(pairs)
        summary["corrected_rows"] = corrected
        st.outputs(*written)
        st.counts(preference_pairs=summary["train"], val_preference_pairs=summary["val"], corrected_rows=corrected)
        st.extra(preferences=summary)
    if summary["train"] == 0:
        raise NoCorrections(
            f"no preference pairs in the train split: {corrected} of {len(rows)} reviewed rows carry a reviewer's "
            f"correction ({summary['val']} val pairs). DPO learns from rows whose answer a reviewer changed in "
            "Argilla (`review.mode: argilla`, then `stepwise review pull`); wrote an empty "
            f"{run.layout.preferences('train')}")
    return summary
