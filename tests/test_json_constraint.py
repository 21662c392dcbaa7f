"""Schema-valid JSON from local teachers (issue 16 item 3) and the GGUF content identity (issue 21).

The answer schema (`constraints.answer_schema`: the bounded OpenSearch subset, field names from the
row's mapping) against the vendored spec; the same schema in a server's `response_format` and vLLM's
`guided_json`; a schema too large to compile stops `stepwise generate` with exit 2; generation under
it with both local backends parses and validates (slow: the real SmolLM2); the llamacpp cache key is
the GGUF's content, not its path.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
from stepwise.curation.dsl_schema import validate_search_body
from stepwise.pipelines.constraints import (
    answer_schema,
    dss_lark,
    generation_kwargs,
    mapping_fields,
    opensearch_subset_schema,
)
from stepwise.pipelines.generate import load_inputs, plan_requests
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.recipe import load_recipe
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "nl2dsl"
MAPPING = {"properties": {"order_id": {"type": "keyword"}, "total": {"type": "double"},
                          "placed": {"type": "date"}, "note": {"type": "text"},
                          "customer": {"properties": {"city": {"type": "keyword"}}}}}


def nl2dsl(tmp_path: Path, rows: int = 2, **teacher: str) -> Path:
    """The nl2dsl example recipe on its first `rows` rows, a private cache, teacher settings replaced."""
    lines = (EXAMPLE / "data" / "pairs.jsonl").read_text().splitlines()[:rows]
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    text = (EXAMPLE / "recipe.yaml").read_text().replace("cache: teacher_cache.sqlite", "cache: cache.sqlite")
    head, sep, rest = text.partition("teacher:\n")
    for key, value in teacher.items():
        m = re.search(rf"^  {key}: .*$", rest, flags=re.M)
        rest = (rest[:m.start()] + f"  {key}: {value}" + rest[m.end():]) if m else f"  {key}: {value}\n" + rest
    text = head + sep + rest
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_mapping_fields_flatten_objects_and_accept_json_text():
    assert mapping_fields(MAPPING) == {"order_id": "keyword", "total": "double", "placed": "date", "note": "text",
                                       "customer.city": "keyword"}
    assert mapping_fields(json.dumps({"mappings": MAPPING})) == mapping_fields(MAPPING)
    assert mapping_fields("not json") is None and mapping_fields({"properties": {}}) is None


@pytest.mark.parametrize("body", [
    {"query": {"term": {"order_id": "42"}}},
    {"query": {"match": {"note": "late delivery"}}, "size": 5},
    {"query": {"range": {"total": {"gte": 10, "lt": 99.5}}}, "sort": [{"placed": {"order": "desc"}}]},
    {"query": {"bool": {"must": [{"term": {"customer.city": "Oslo"}}],
                        "filter": [{"range": {"placed": {"gte": "2024-01-01"}}}]}}},
    {"query": {"exists": {"field": "note"}}},
    {"query": {"match_all": {}}},
])
def test_subset_instances_are_valid_search_bodies(body):
    """What the constraint allows is what curation accepts: instances of the subset (with and without
    a mapping) validate against the vendored OpenSearch spec."""
    for fields in (mapping_fields(MAPPING), None):
        jsonschema.validate(body, opensearch_subset_schema(fields, depth=1))
    assert validate_search_body(body) is None


def test_subset_limits_field_names_types_and_depth():
    schema = opensearch_subset_schema(mapping_fields(MAPPING), depth=1)
    bad = [
        {"query": {"term": {"customer_id": "42"}}},  # not a field of the mapping
        {"query": {"range": {"note": {"gte": 1}}}},  # range on full text
        {"query": {"term": {"total": "many"}}},  # a double field gets a number
        {"query": {"term": {"order_id": "1", "total": 2}}},  # one field per leaf
        {"query": {"bool": {"must": [{"bool": {"must": [{"match_all": {}}]}}]}}},  # deeper than depth 1
        {"query": {"match_all": {}}, "aggs": {}},  # outside the subset
    ]
    for body in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
    deeper = bad[4]
    jsonschema.validate(deeper, opensearch_subset_schema(mapping_fields(MAPPING), depth=2))


def test_answer_schema_takes_fields_from_the_declared_mapping_field(tmp_path):
    recipe = load_recipe(nl2dsl(tmp_path))
    row = load_inputs(recipe)[0]
    fields = set(mapping_fields(row.input["mapping"]))
    schema = answer_schema(recipe.task, recipe.teacher.json_depth, row.input)
    text = json.dumps(schema)
    assert all(f'"{f}"' in text for f in fields)
    # no mapping field declared: any field name (said so in the recipe reference)
    free = answer_schema(recipe.task.model_copy(update={"mapping_field": None}), 1, row.input)
    jsonschema.validate({"query": {"term": {"anything": "x"}}}, free)


def test_servers_get_the_answer_schema_as_response_format_and_guided_json(tmp_path):
    recipe = load_recipe(nl2dsl(tmp_path, provider="openai", base_url="http://127.0.0.1:9"))
    t = recipe.teacher
    expected = answer_schema(recipe.task, t.json_depth)
    rf = generation_kwargs(recipe.task, t)["extra_body"]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["properties"]["answer"] == expected
    vllm = generation_kwargs(recipe.task, t.model_copy(update={"guided_decoding": "vllm"}))["extra_body"]
    assert vllm["guided_json"]["properties"]["answer"] == expected and "guided_regex" not in vllm


def test_openai_request_carries_the_json_schema(tmp_path):
    """Through the stub server: the request body's response_format is the schema, and the answer parses."""
    from stepwise.pipelines.generate import run_generate

    from stepwise.rundir import create_run
    from stepwise.testing.openai_stub import OpenAIStub

    with OpenAIStub() as stub:
        recipe = load_recipe(nl2dsl(tmp_path, provider="openai", base_url=stub.base_url))
        result = run_generate(recipe, create_run(recipe, tmp_path / "run"), progress=False)
        sent = [e["response_format"] for e in stub.log if e["outcome"] == "ok"]
    assert sent and all(rf["type"] == "json_schema" for rf in sent)
    assert sent[0]["json_schema"]["schema"]["properties"]["answer"] == answer_schema(recipe.task, 1)
    assert result.status_counts == {"ok": len(sent)}


@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_schema_too_large_to_compile_exits_2_naming_schema_and_fallback(tmp_path):
    """A row whose mapping has a huge number of fields: stopped before the model loads, exit 2."""
    path = nl2dsl(tmp_path, rows=1)
    path.write_text(path.read_text().replace("  label_field: dsl\n", ""))  # no gold: the row is asked
    row = json.loads((tmp_path / "data" / "pairs.jsonl").read_text())
    row["mapping"] = {"properties": {f"field_{i:05d}": {"type": "keyword"} for i in range(40000)}}
    (tmp_path / "data" / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    result = CliRunner().invoke(app, ["generate", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "curation/schemas/opensearch" in result.output and "teacher.constrained_decoding: false" in result.output
    assert "teacher.json_depth" in result.output and "unset task.mapping_field" in result.output


def test_gbnf_too_large_names_schema_and_fallback(tmp_path):
    """The llama.cpp grammar of a mapping with thousands of fields: GrammarError (exit 2 through the
    llamacpp teacher) with the schema, the field count and the fallback."""
    from stepwise.pipelines.grammar import GrammarError, dss_gbnf

    recipe = load_recipe(nl2dsl(tmp_path))
    row = {"question": "q", "mapping": {"properties": {f"f{i:05d}": {"type": "keyword"} for i in range(1500)}}}
    with pytest.raises(GrammarError) as exc:
        dss_gbnf(recipe.task, "dss", 160, depth=1, row_input=row)
    msg = str(exc.value)
    assert "curation/schemas/opensearch" in msg and "1,500 fields" in msg
    assert "teacher.constrained_decoding: false" in msg and "unset task.mapping_field" in msg


@pytest.mark.slow
def test_lark_wraps_the_json_in_the_dss_tags(tmp_path):
    """The llguidance grammar accepts a DSS answer whose body names the row's fields, and rejects the
    same answer on a field the mapping lacks (the SmolLM2 tokenizer, no model)."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    from stepwise.models import resolve_model_dir

    recipe = load_recipe(nl2dsl(tmp_path))
    row = load_inputs(recipe)[0]
    t = recipe.teacher
    hf = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m-instruct"))
    tok = llguidance.hf.from_tokenizer(hf)
    grammar = llguidance.LLMatcher.grammar_from_lark(dss_lark(recipe.task, t.format, t.max_new_tokens, 1, row.input))

    def accepts(answer: dict) -> bool:
        m = llguidance.LLMatcher(tok, grammar)
        text = f"<rationale>The order id is exact.</rationale><answer>{json.dumps(answer, separators=(',', ':'))}</answer>"  # llguidance: compact JSON
        ids = hf(text, add_special_tokens=False)["input_ids"]
        return m.consume_tokens(ids) and m.is_accepting()

    field = sorted(mapping_fields(row.input["mapping"]))[0]
    assert accepts({"query": {"exists": {"field": field}}})
    assert not accepts({"query": {"exists": {"field": "no_such_field"}}})


# -- generation through the real local backends (SmolLM2-135M) -----------------------------------


def _assert_schema_valid(recipe, run) -> None:
    from stepwise.io import read_jsonl

    rows = {r.id: r.input for r in load_inputs(recipe)}
    out = read_jsonl(run.path / "generate" / "responses.jsonl")
    assert out and all(r["parse_status"] == "ok" for r in out), [r["raw"] for r in out]
    for r in out:
        body = json.loads(r["answer_text"])
        assert validate_search_body(body) is None, r["raw"]
        jsonschema.validate(body, answer_schema(recipe.task, recipe.teacher.json_depth, rows[r["id"]]))


@pytest.mark.slow
def test_transformers_teacher_answers_schema_valid_json(tmp_path):
    """outlines + llguidance: every answer parses, is a valid search body and names only mapped fields."""
    from stepwise.pipelines.generate import run_generate

    from stepwise.rundir import create_run

    recipe = load_recipe(nl2dsl(tmp_path, n_threads="1", max_attempts="1"))
    run = create_run(recipe, tmp_path / "run")
    run_generate(recipe, run, progress=False, retry_unparsed=False)
    _assert_schema_valid(recipe, run)


@pytest.mark.slow
def test_llamacpp_teacher_answers_schema_valid_json(tmp_path):
    from stepwise.pipelines.generate import run_generate

    from stepwise.rundir import create_run

    recipe = load_recipe(nl2dsl(tmp_path, provider="llamacpp", n_threads="1", max_attempts="1"))
    run = create_run(recipe, tmp_path / "run")
    run_generate(recipe, run, progress=False, retry_unparsed=False)
    _assert_schema_valid(recipe, run)


# -- issue 21: the llamacpp cache key names the GGUF's content -------------------------------------


def test_llamacpp_cache_key_is_the_gguf_content(tmp_path):
    """The same file at another path: the same keys (a cache hit); one byte changed: other keys."""
    from stepwise.models import gguf_path

    src = gguf_path("smollm2-135m-instruct")
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "renamed.gguf"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copyfile(src, p)

    def keys(model: Path) -> list[str]:
        from stepwise.pipelines.rationalize import Ask
        from stepwise.pipelines.rationalize import plan as plan_rationalize

        recipe = load_recipe(nl2dsl(tmp_path, rows=2, provider="llamacpp", model=str(model)))
        assert recipe.teacher.model == str(model)
        rows = load_inputs(recipe)
        # rationalization requests are keyed by the same identity as generation's
        asks = [Ask(r.id, r.input, {"query": {"match_all": {}}}, None) for r in rows]
        return plan_requests(recipe, rows).base_keys() + [p.chain[0] for p in plan_rationalize(recipe, asks)]

    named = keys(Path("smollm2-135m-instruct"))
    assert keys(a) == keys(b) == named
    with b.open("r+b") as fh:  # change one byte in the middle of the file
        fh.seek(b.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    changed = keys(b)
    assert set(changed).isdisjoint(named)
