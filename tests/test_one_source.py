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


def test_every_token_guess_is_the_same_guess():
    """Where no tokenizer is at hand, the teacher prompt estimate, export's sequence_len check and
    the OpenAI fine-tuning file check guess alike (they used 4 chars floored, 3 chars + 8 and 4
    chars rounded up)."""
    import warnings
    from types import SimpleNamespace

    from stepwise.curation.export import student_token_counter
    from stepwise.pipelines.tokens import approx_tokens, guess_tokens
    from stepwise.training.openai_ft import TokenCounter

    chat = [{"role": "system", "content": "s" * 41}, {"role": "user", "content": "u" * 402}]
    no_tokenizer = SimpleNamespace(training=SimpleNamespace(base_model="/nonexistent/student"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_count, name = student_token_counter(no_tokenizer)
    assert name == "estimate" and caught
    assert export_count(chat) == approx_tokens(chat) == guess_tokens("s" * 41) + guess_tokens("u" * 402) + 11
    openai = TokenCounter("gpt-4o-mini")
    openai._enc = None  # as offline, without tiktoken's encoding file
    assert openai.text("u" * 402) == guess_tokens("u" * 402) == 101


def test_generation_kwargs_are_built_once_and_keyed_in_the_cache(tmp_path):
    """The teacher's kwargs come from pipelines.constraints.generation_kwargs (in process and on Ray);
    every sampling setting in them is also in the request's cache key, so a changed setting is a
    new request, never a stale cached answer."""
    from stepwise.pipelines.constraints import generation_kwargs
    from stepwise.pipelines.generate import generation_params

    recipe = _recipe(tmp_path, [{"text": "a", "label": "billing"}], [])
    server = recipe.teacher.model_copy(update={"constrained_decoding": True, "guided_decoding": "vllm"})
    kwargs = generation_kwargs(recipe.task, server)
    assert kwargs["extra_body"]["guided_regex"]
    assert {k: v for k, v in kwargs.items() if k != "extra_body"} == \
        {"max_new_tokens": server.max_new_tokens, "temperature": server.temperature, "top_p": server.top_p}
    local = server.model_copy(update={"provider": "transformers"})
    assert "extra_body" not in generation_kwargs(recipe.task, local)  # constrained by its logits processor
    cached = generation_params(recipe.model_copy(update={"teacher": server}))
    assert {k: cached[k] for k in ("max_new_tokens", "temperature", "top_p")} == \
        {k: kwargs[k] for k in ("max_new_tokens", "temperature", "top_p")}


def test_planner_trl_and_plan_command_take_the_recipes_training_defaults():
    """lora_r & co. have one default and one set of bounds: TrainingSpec's (the planner, the TRL run
    config and `stepwise plan` had their own copies, e.g. a planner lora_r without the upper bound)."""
    import inspect

    from stepwise.training.cli import plan_cmd
    from stepwise.training.trl_backend import TRLRunConfig
    from stepwise.training.vram import PlanInput

    from stepwise.recipe import TrainingSpec

    spec = TrainingSpec.model_fields
    shared = {"PlanInput": (PlanInput, ("lora_r", "lora_dropout", "num_gpus", "gradient_checkpointing")),
              "TRLRunConfig": (TRLRunConfig, ("lora_r", "lora_dropout"))}
    for owner, (model, names) in shared.items():
        for name in names:
            theirs = model.model_fields[name]
            assert (theirs.default, theirs.metadata) == (spec[name].default, spec[name].metadata), (owner, name)
    assert PlanInput().lora_target == TRLRunConfig.model_fields["lora_target"].default == spec["lora_target"].default
    assert TRLRunConfig.model_fields["lora_alpha"].default == TrainingSpec().effective_lora_alpha
    options = inspect.signature(plan_cmd).parameters
    for option, name in (("lora_r", "lora_r"), ("target", "lora_target"), ("num_gpus", "num_gpus"),
                         ("gpu_memory", "gpu_memory_gb")):
        assert options[option].default.default == spec[name].default, option


def test_eval_takes_the_schema_validator_from_curations_table(monkeypatch):
    """evals looks `task.validator` up in curation's SCHEMA_VALIDATORS (it found one by regex-scanning
    function names in the curation package)."""
    from stepwise.curation import validate
    from stepwise.evals.schema import validator_for

    seen = []
    monkeypatch.setitem(validate.SCHEMA_VALIDATORS, "opensearch_query_dsl", lambda a: seen.append(a) or "bad body")
    check, _ = validator_for("opensearch_query_dsl")
    assert check({"x": 1}) == ["bad body"] and seen == [{"x": 1}]
    monkeypatch.undo()
    check, _ = validator_for("opensearch_query_dsl")
    assert check({"match": {"title": "x"}}) == []  # a bare query, wrapped as curation does
    assert check({"query": {"no_such_query": {}}})
    assert validator_for("json") == (None, "json (no schema)")
