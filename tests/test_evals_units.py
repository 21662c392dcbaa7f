"""Fast evals tests: gate logic, model resolution, task prep, contamination guard, schema
adapter, compare on synthetic runs, and the OpenAI-compatible backend against a stub server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from stepwise.evals.benchmarks import BENCHMARKS, BUNDLED_DATA, get_benchmark, prepare_tasks
from stepwise.evals.forgetting import MITIGATIONS, forgetting_report
from stepwise.evals.modelref import resolve_model
from stepwise.evals.schema import adapt
from stepwise.evals.task_eval import ContaminationError, check_contamination

from stepwise.recipe import ForgettingSpec


def _res(items, name="mmlu"):
    return {name: {"metric": "acc", "value": sum(items) / len(items), "items": items}}


def test_gate_passes_within_max_drop():
    before = _res([1] * 10 + [0] * 10)  # 0.50
    after = _res([1] * 9 + [0] * 11)  # 0.45: a 5-point drop is not "more than" 5
    rep = forgetting_report(before, after, max_drop=0.05, n_boot=100)
    assert rep["gate"]["passed"] and rep["gate"]["mitigations"] == []
    r = rep["benchmarks"]["mmlu"]
    assert r["delta"] == pytest.approx(-0.05) and r["relative"] == pytest.approx(-0.1)
    assert r["before"]["value"] == 0.5 and r["after"]["value"] == 0.45


def test_gate_fails_on_constructed_drop_and_lists_mitigations():
    before = {**_res([1] * 10 + [0] * 10), **_res([1] * 10, "arc_easy")}
    after = {**_res([1] * 10 + [0] * 10), **_res([1] * 8 + [0] * 2, "arc_easy")}
    rep = forgetting_report(before, after, max_drop=0.05, n_boot=200)
    assert not rep["gate"]["passed"] and rep["gate"]["failed"] == ["arc_easy"]
    assert rep["gate"]["mitigations"] == MITIGATIONS
    assert any("5-10% general" in m for m in MITIGATIONS) and any("LoRA" in m for m in MITIGATIONS)
    assert rep["benchmarks"]["arc_easy"]["exceeds_max_drop"] and rep["benchmarks"]["arc_easy"]["lost"] == 2


def test_gate_relative_mode_and_in_domain_flag():
    before, after = _res([1] * 4 + [0] * 16, "gsm8k"), _res([1] * 3 + [0] * 17, "gsm8k")  # 0.20 -> 0.15
    assert forgetting_report(before, after, max_drop=0.10, n_boot=0)["gate"]["passed"]  # 5 points
    rel = forgetting_report(before, after, max_drop=0.10, relative=True, in_domain={"gsm8k"}, n_boot=0)
    assert not rel["gate"]["passed"]  # -25% relative
    assert rel["benchmarks"]["gsm8k"]["in_domain"] and rel["in_domain"] == ["gsm8k"]


def test_gate_rejects_unpaired_items():
    with pytest.raises(ValueError):
        forgetting_report(_res([1, 0]), _res([1, 0, 1]))


def test_recipe_benchmarks_match_bundled():
    from typing import get_args

    item = get_args(ForgettingSpec.model_fields["benchmarks"].annotation)[0]  # Annotated[Literal[...], check]
    allowed = set(get_args(get_args(item)[0]))
    assert allowed == set(BENCHMARKS)
    for b in BENCHMARKS.values():
        assert (BUNDLED_DATA / b.folder / b.split_file).exists()
        assert (BUNDLED_DATA / b.folder / "LICENSE").exists() and b.template.exists()
    assert get_benchmark("TruthfulQA").name == "truthfulqa_mc1"
    with pytest.raises(KeyError):
        get_benchmark("nope")


def test_prepare_tasks_subset_and_fewshot(tmp_path):
    tasks = prepare_tasks(["mmlu", "truthfulqa_mc1"], 7, 2, tmp_path)
    mmlu, tqa = tasks
    assert mmlu.n == 7 and mmlu.available == 500
    assert len(mmlu.data_file.read_text().strip().split("\n")) == 7
    text = mmlu.yaml_path.read_text()
    assert "@DATA@" not in text and "num_fewshot: 2" in text and "dataset_path: json" in text
    assert (tmp_path / "data" / "mmlu" / "dev.jsonl").exists()
    assert "num_fewshot: 2" not in tqa.yaml_path.read_text()  # fixed 0-shot prompt
    again = prepare_tasks(["mmlu"], 7, 2, tmp_path)[0]
    assert again.fingerprint == mmlu.fingerprint
    assert prepare_tasks(["mmlu"], 8, 2, tmp_path)[0].fingerprint != mmlu.fingerprint


def test_bundled_subset_is_prefix_of_seeded_shuffle():
    first = json.loads((BUNDLED_DATA / "arc_easy" / "test.jsonl").read_text().split("\n")[0])
    assert {"question", "choices", "answer_index", "source_index"} <= set(first)


def test_resolve_model_kinds(tmp_path):
    ep = resolve_model("openai:student@http://127.0.0.1:8000/v1")
    assert ep.kind == "openai" and ep.model_name == "student" and ep.base_url == "http://127.0.0.1:8000/v1"
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    assert resolve_model(str(base)).kind == "hf"
    adapter = tmp_path / "train" / "lora"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 8,
                                                              "peft_type": "LORA"}))
    ref = resolve_model(str(adapter))
    assert ref.kind == "adapter" and ref.base == base and ref.info["r"] == 8
    assert "peft=" in ref.lm_eval_args()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/model"}))
    with pytest.raises(FileNotFoundError, match="--base"):
        resolve_model(str(adapter))
    assert resolve_model(str(adapter), base_override=str(base)).base == base
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing"))


def test_contamination_guard(tmp_path):
    (tmp_path / "curate").mkdir()
    train = [{"id": "a", "input": {"text": "My card was charged twice"}}, {"id": "b", "input": {"text": "hello"}}]
    (tmp_path / "curate" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    clean = [{"id": "t1", "input": {"text": "Something else"}, "gold": "x"}]
    assert check_contamination(tmp_path, clean)["overlaps"] == 0
    dirty = clean + [{"id": "t2", "input": {"text": "  my card was CHARGED   twice"}, "gold": "x"}]
    with pytest.raises(ContaminationError, match="1 of 2 test inputs") as err:
        check_contamination(tmp_path, dirty)
    assert err.value.overlaps[0] == {"test_id": "t2", "train_id": "a", "file": "train.jsonl"}


def test_schema_adapter_shapes():
    assert adapt(lambda o: [])({}) == []
    assert adapt(lambda o: ["bad"])({}) == ["bad"]
    assert adapt(lambda o: True)({}) == [] and adapt(lambda o: False)({}) == ["schema validation failed"]
    assert adapt(lambda o: (False, ["e1"]))({}) == ["e1"]

    def boom(o):
        raise ValueError("nope")

    assert adapt(boom)({})[0].startswith("ValueError")


class _Stub(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        label = "billing" if "charged" in text else "technical"
        if "OpenSearch" in body["messages"][0]["content"]:
            label = '{"query": {"term": {"status": "pending"}}}' if "pending" in text else '{"query": {"bogus": 1}}'
            label = label if "broken" not in text else "{not json"
            if "bare clause" in text:  # a bare query clause, as students and teachers write them
                label = '{"bool": {"filter": [{"term": {"status": "pending"}}]}}'
        resp = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"<answer>{label}"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
        data = json.dumps(resp).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_task_eval_against_openai_compatible_stub(write_recipe, tmp_path):
    from stepwise.evals.task_eval import evaluate_task

    from stepwise.recipe import load_recipe

    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = load_recipe(write_recipe())
        recipe.eval.task.bootstrap = 50
        rows = [{"id": "1", "input": {"text": "I was charged twice"}, "gold": "billing"},
                {"id": "2", "input": {"text": "App crashes"}, "gold": "technical"},
                {"id": "3", "input": {"text": "Where is the office?"}, "gold": "general"}]
        model = resolve_model(f"openai:student@http://127.0.0.1:{server.server_port}/v1")
        report, preds = evaluate_task(recipe, model, rows)
    finally:
        server.shutdown()
    assert report["metrics"]["accuracy"]["value"] == pytest.approx(2 / 3)
    assert report["parse_status"] == {"ok": 3}
    assert [p["pred"] for p in preds] == ["billing", "technical", "technical"]
    assert report["generation"]["backend"] == "openai" and report["generation"]["output_tokens"] == 9


def test_compare_synthetic_runs(tmp_path):
    from stepwise.evals.compare import compare_runs, compare_svg, markdown, write_compare

    def make(name, correct, delta):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        task = {"task_type": "classification", "dss_output": "multitask", "n": len(correct),
                "metrics": {"accuracy": {"value": sum(correct) / len(correct), "ci_low": 0.1, "ci_high": 0.9},
                            "macro_f1": {"value": 0.5, "ci_low": 0.2, "ci_high": 0.7}},
                "model_info": {"label": name, "kind": "adapter", "peft_type": "LORA", "r": 8,
                               "parameters": {"trainable": 1000, "total": 100000}}}
        forg = {"benchmarks": {"mmlu": {"before": {"value": 0.3}, "after": {"value": 0.3 + delta}, "delta": delta,
                                        "delta_ci": [delta - 0.1, delta + 0.1], "relative": delta / 0.3,
                                        "exceeds_max_drop": delta < -0.05, "in_domain": False}},
                "gate": {"passed": delta >= -0.05}}
        (run / "eval" / "task.json").write_text(json.dumps(task))
        (run / "eval" / "forgetting.json").write_text(json.dumps(forg))
        (run / "eval" / "task_predictions.jsonl").write_text(
            "".join(json.dumps({"id": str(i), "correct": c}) + "\n" for i, c in enumerate(correct)))
        (run / "manifest.json").write_text(json.dumps({"stages": {"train": {"wall_s": 12.5, "peak_memory_mb": 900},
                                                                 "eval": {"wall_s": 3.0}}}))
        return run

    a = make("dss", [1, 1, 1, 0, 1, 1], 0.0)
    b = make("label-only", [1, 0, 0, 0, 1, 0], -0.1)
    result = compare_runs([a, b])
    assert result["columns"][4] == "accuracy"
    assert result["runs"][1]["vs_first"]["delta"] == pytest.approx(-0.5)
    assert result["runs"][0]["peak_memory_mb"] == 900 and result["runs"][0]["trainable_params"] == 1000
    row_b = result["table"][1]
    assert "FAIL" in row_b and any("-10.0 !" in str(c) for c in row_b)
    assert "| run |" in markdown(result)
    assert compare_svg(result).startswith("<svg")
    paths = write_compare(result, tmp_path / "out")
    assert all(p.exists() for p in paths)


def test_structured_task_eval_with_opensearch_schema(tmp_path):
    """nl2dsl through the stub endpoint: JSON validity, schema validity (curation's validator),
    exact match after DSL canonicalisation, partial credit."""
    from stepwise.evals.task_eval import evaluate_task

    from stepwise.recipe import load_recipe
    from tests.conftest import REPO

    recipe = load_recipe(REPO / "examples" / "nl2dsl" / "recipe.yaml")
    recipe.eval.task.bootstrap = 50
    mapping = {"properties": {"status": {"type": "keyword"}}}
    rows = [
        {"id": "1", "input": {"question": "pending ones", "mapping": mapping},
         "gold": {"query": {"term": {"status": {"value": "pending"}}}}},
        {"id": "2", "input": {"question": "active ones", "mapping": mapping},
         "gold": {"query": {"term": {"status": "active"}}}},
        {"id": "3", "input": {"question": "broken", "mapping": mapping}, "gold": {"query": {"match_all": {}}}},
    ]
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report, preds = evaluate_task(recipe, resolve_model(f"openai:s@http://127.0.0.1:{server.server_port}/v1"), rows)
    finally:
        server.shutdown()
    m = report["metrics"]
    assert report["task_type"] == "structured" and report["canonicalisation"] == "dsl"
    assert m["json_valid"]["value"] == pytest.approx(2 / 3)
    if report["schema_validator"].startswith("stepwise.curation."):
        assert m["schema_valid"]["value"] == pytest.approx(1 / 3)
        assert preds[1]["schema_errors"] and "bogus" in preds[1]["schema_errors"][0]
    assert m["exact_match"]["value"] == pytest.approx(1 / 3)  # shorthand term == long-form term
    assert preds[2]["parse_status"] == "invalid_json" and preds[2]["partial_f1"] == 0.0


def test_in_domain_from_general_rows(write_recipe, tmp_path):
    from stepwise.evals.runner import in_domain_benchmarks

    from stepwise.recipe import load_recipe
    from stepwise.rundir import create_run

    recipe = load_recipe(write_recipe())
    run = create_run(recipe, tmp_path / "run")
    (run.path / "curate").mkdir()
    rows = [{"id": "a", "input": {"text": "x"}, "split": "train"},
            {"id": "general:gsm8k_train/train.jsonl:3", "input": None, "split": "train",
             "general": {"file": "/data/general/gsm8k_train/train.jsonl", "line": 3}}]
    (run.path / "curate" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert in_domain_benchmarks(recipe, run) == {"gsm8k"}
    (run.path / "curate" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert in_domain_benchmarks(recipe, run) == set()


def test_all_task_yamls_load_in_lm_eval(tmp_path):
    """Every bundled task builds in lm-eval (no model): docs, prompts, targets and choices."""
    from lm_eval.tasks import TaskManager, get_task_dict

    prepared = prepare_tasks(list(BENCHMARKS), 3, 0, tmp_path)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    tasks = get_task_dict([t.benchmark.task for t in prepared], manager)
    for t in prepared:
        task = tasks[t.benchmark.task]
        docs = list(task.eval_docs)
        assert len(docs) == 3, t.benchmark.name
        doc = docs[0]
        assert task.doc_to_text(doc).strip()
        target = task.doc_to_target(doc)
        if t.benchmark.generative:
            assert "####" in str(target)
        else:
            choices = task.doc_to_choice(doc)
            assert len(choices) >= 2 and 0 <= int(target) < len(choices), t.benchmark.name


def test_full_benchmark_data_dir(tmp_path):
    from tests.conftest import SHARED_DATA

    full = SHARED_DATA / "benchmarks"
    if not full.exists():
        pytest.skip("shared/data not present")
    t = prepare_tasks(["arc_challenge"], None, 0, tmp_path, data_dir=full)[0]
    assert t.n == t.available == 1172


def test_compare_to_base_hand_checked():
    """Student vs base on 4 shared items (a 5th only the student answered is not paired)."""
    from stepwise.evals.base_compare import compare_to_base, verdict
    from stepwise.evals.classification import macro_f1

    gold = ["a", "a", "b", "b"]
    base_pred = ["a", None, None, "a"]  # 1/4 correct, 2 invalid
    student_pred = ["a", "a", "b", "a"]  # 3/4 correct, 0 invalid
    def rows(preds):
        return [{"id": i, "gold": g, "pred": p, "correct": float(g == p)} for i, (g, p) in enumerate(zip(gold, preds, strict=True))]
    student_rows = rows(student_pred) + [{"id": 99, "gold": "a", "pred": "a", "correct": 1.0}]
    comp = compare_to_base({"task_type": "classification"}, student_rows, {"model": "base", "headline": {}},
                           rows(base_pred), n_boot=300, labels=["a", "b"])
    assert comp["n_paired"] == 4 and comp["base"] == "base"
    acc = comp["metrics"]["accuracy"]
    assert (acc["base"], acc["student"], acc["delta"]) == (0.25, 0.75, 0.5)
    assert (acc["gained"], acc["lost"]) == (2, 0) and acc["mcnemar_p"] == 0.5  # exact binomial, 2 discordant
    inv = comp["metrics"]["invalid_rate"]
    assert (inv["base"], inv["student"]) == (0.5, 0.0)
    f1 = comp["metrics"]["macro_f1"]
    assert f1["delta"] == pytest.approx(macro_f1(gold, student_pred, ["a", "b"]) - macro_f1(gold, base_pred, ["a", "b"]))
    assert f1["delta_ci"][0] <= f1["delta"] <= f1["delta_ci"][1]
    assert comp["main_metric"] == "accuracy" and "0.25" not in comp["summary"] and "25.0%" in comp["summary"]
    # verdicts: a CI excluding 0 decides; lower is better for invalid_rate
    assert verdict(0.2, [0.05, 0.3]) == "better" and verdict(-0.2, [-0.3, -0.1]) == "worse"
    assert verdict(0.1, [-0.1, 0.3]) == "no clear difference"
    assert verdict(-0.5, [-0.8, -0.2], lower_is_better=True) == "better"


def test_bare_clause_is_repaired_counted_and_scored_like_curation(tmp_path):
    """A bare `{"bool": ...}` answer: eval wraps it with curation's own repair, counts it in the
    report, and scores it schema-valid and exact against the wrapped gold, as curation accepts it."""
    from stepwise.curation.dsl_schema import BARE_QUERY_REPAIR
    from stepwise.evals.task_eval import evaluate_task

    from stepwise.recipe import load_recipe
    from tests.conftest import REPO

    recipe = load_recipe(REPO / "examples" / "nl2dsl" / "recipe.yaml")
    recipe.eval.task.bootstrap = 0
    mapping = {"properties": {"status": {"type": "keyword"}}}
    gold = {"query": {"bool": {"filter": [{"term": {"status": {"value": "pending"}}}]}}}
    rows = [{"id": "1", "input": {"question": "a bare clause please", "mapping": mapping}, "gold": gold},
            {"id": "2", "input": {"question": "pending ones", "mapping": mapping},
             "gold": {"query": {"term": {"status": "pending"}}}}]
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report, preds = evaluate_task(recipe, resolve_model(f"openai:s@http://127.0.0.1:{server.server_port}/v1"), rows)
    finally:
        server.shutdown()
    assert report["repairs"] == {BARE_QUERY_REPAIR: 1}
    assert preds[0]["repaired"] == BARE_QUERY_REPAIR and preds[1]["repaired"] is None
    assert preds[0]["pred"] == {"query": {"bool": {"filter": [{"term": {"status": "pending"}}]}}}
    assert preds[0]["schema_valid"] == 1.0 and preds[0]["exact_match"] == 1.0


def test_local_eval_runs_on_eval_task_n_threads_and_gives_torch_its_threads_back(monkeypatch):
    """eval.task.n_threads caps torch's intra-op threads while the student answers (OpenMP threads
    spin on a shared CPU), and only then: training or lm-eval in the same process keep theirs."""
    import torch
    from stepwise.evals import generate as gen_mod

    seen: list[int] = []

    class Tok:
        pad_token_id = 0

        def apply_chat_template(self, m, tokenize=False, add_generation_prompt=True):
            return m[-1]["content"]

        def __call__(self, texts, **kw):
            class Enc(dict):
                def to(self, device):
                    return self
            return Enc(input_ids=torch.zeros((len(texts), 1), dtype=torch.long))

        def decode(self, ids, skip_special_tokens=True):
            return "<answer>a</answer>"

    class Lm:
        def generate(self, input_ids, **kw):
            seen.append(torch.get_num_threads())
            return torch.ones((input_ids.shape[0], 3), dtype=torch.long)

    monkeypatch.setattr(gen_mod, "load_local", lambda *a, **k: (Lm(), Tok()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompts = [[{"role": "user", "content": "q"}]] * 3
        out = gen_mod.generate_local(None, prompts, batch_size=2, device="cpu", n_threads=1)
        assert seen == [1, 1] and out.info["n_threads"] == 1 and out.texts == ["<answer>a</answer>"] * 3
        assert torch.get_num_threads() == 2
        seen.clear()
        out = gen_mod.generate_local(None, prompts, batch_size=3, device="cpu")  # unset: torch's own
        assert seen == [2] and out.info["n_threads"] == 2
    finally:
        torch.set_num_threads(before)
