"""One source per default and per derivation (issue 15 item 5): the row id, the status ranking,
the token estimate, the generation kwargs and TrainingSpec's defaults each live in one place, and
every user of them agrees with it."""

from __future__ import annotations

import json

from stepwise.curation.curate import read_test_file
from stepwise.curation.fixtures import simulated_responses
from stepwise.pipelines.generate import load_inputs

from stepwise.recipe import load_recipe

_RECIPE = """\
name: ids
task:
  name: tickets
  classes: [billing, technical]
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  label_field: label
  test_file: test.jsonl
teacher:
  provider: openai
  model: stub-teacher
"""


def _recipe(tmp_path, rows, test_rows):
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    (tmp_path / "recipe.yaml").write_text(_RECIPE)
    return load_recipe(tmp_path / "recipe.yaml")


def test_rows_without_an_id_field_get_the_same_id_in_generate_curate_and_fixtures(tmp_path):
    rows = [{"text": "my card was charged twice", "label": "billing"}, {"text": "app crashes", "label": "technical"}]
    recipe = _recipe(tmp_path, rows, [{"text": "app crashes", "label": "technical"}])
    generated = [r.id for r in load_inputs(recipe)]
    # generate's form, kept so cached runs keep their ids: r- and 12 hex characters
    assert all(rid.startswith("r-") and len(rid) == 14 for rid in generated)
    assert read_test_file(recipe)[0]["id"] == generated[1]
    assert [r["id"] for r in simulated_responses(recipe)] == generated


def test_dedup_keeps_the_answer_generate_would_keep():
    """One status ranking: between two answers, curation's dedup (keep: best) and generate's choice
    among samples pick the same parse status, whichever comes first."""
    from itertools import permutations

    from stepwise.curation.dedup import rank_key
    from stepwise.pipelines.generate import _self_consistency
    from stepwise.pipelines.parsing import PARSE_STATUSES

    for a, b in permutations(PARSE_STATUSES, 2):
        rows = [(0, {"parse_status": a}), (1, {"parse_status": b})]
        kept_by_dedup = min(rows, key=rank_key("best"))[1]["parse_status"]
        samples = [{"parse_status": a, "label": None}, {"parse_status": b, "label": None}]
        kept_by_generate = _self_consistency(samples)[0]["parse_status"]
        assert kept_by_dedup == kept_by_generate, (a, b)
