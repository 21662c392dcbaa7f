"""Near-duplicate detection benchmark: datasketch used naively vs rensa vs stepwise.

Corpus: real text (Banking77 utterances, MMLU / ARC / GSM8K questions, HellaSwag contexts from
../shared/data) spliced into base documents (two real texts each, so 1M documents do not repeat),
then families of 1-4 documents made with controlled edits (word substitutions, deletions,
insertions, swaps; some exact copies with case/punctuation changes). Ground truth: every pair with
exact Jaccard >= threshold over word-5-shingle sets, found by prefix filtering over all documents
(AllPairs: two sets with J >= t share a token in their prefixes under a global rarity order) and
verified exactly, so it does not depend on MinHash or LSH.

Each method runs in its own process (so peak RSS is its own) on the same texts and the same
shingles (normalised words, 5-grams), 128 permutations, threshold 0.8:
- datasketch-naive: `MinHash.update` per shingle, `MinHashLSH(threshold)` insert + query;
- rensa: `RMinHash.from_token_sets` (bulk, Rust), `RMinHashLSH(threshold, 128, 16 bands)`,
  candidates filtered by `RMinHash.jaccard >= threshold`;
- stepwise: `stepwise.curation.minhash.near_duplicate_pairs` (vectorised signatures, 2 processes, numpy
  banding tuned for recall, verification by estimate/exact Jaccard);
- stepwise-datasketch-lsh: the same signatures fed to `datasketch.MinHashLSH` (only up to 200k).

    python benchmarks/bench_dedup.py --sizes 100000 1000000 --out benchmarks/results/dedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


# ---------------------------------------------------------------------------------------------
# corpus


def real_texts() -> list[str]:
    sources = [
        (SHARED / "banking77" / "train.jsonl", "text"), (SHARED / "banking77" / "test.jsonl", "text"),
        (SHARED / "benchmarks" / "mmlu" / "test.jsonl", "question"),
        (SHARED / "benchmarks" / "arc_easy" / "test.jsonl", "question"),
        (SHARED / "benchmarks" / "arc_challenge" / "test.jsonl", "question"),
        (SHARED / "benchmarks" / "gsm8k" / "test.jsonl", "question"),
        (SHARED / "general" / "gsm8k_train" / "train.jsonl", "question"),
        (SHARED / "benchmarks" / "hellaswag" / "validation.jsonl", "ctx"),
    ]
    out, seen = [], set()
    for path, field in sources:
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                t = json.loads(line).get(field)
                key = " ".join(str(t).lower().split())
                if t and key not in seen:
                    seen.add(key)
                    out.append(str(t))
    return out


def build_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    base = real_texts()
    vocab = sorted({w for t in base[:20000] for w in t.split()})
    docs: list[str] = []
    while len(docs) < n:
        a, b = rng.choice(base), rng.choice(base)
        words = (a + " " + b).split()
        docs.append(" ".join(words))
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            w = list(words)
            if rng.random() < 0.15:
                docs.append(" ".join(w).upper() if rng.random() < 0.5 else " ".join(w) + " !")
                continue
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                i = rng.randrange(len(w))
                if op < 0.4:
                    w[i] = rng.choice(vocab)
                elif op < 0.6 and len(w) > 3:
                    del w[i]
                elif op < 0.8:
                    w.insert(i, rng.choice(vocab))
                elif i + 1 < len(w):
                    w[i], w[i + 1] = w[i + 1], w[i]
            docs.append(" ".join(w))
    return docs[:n]


def shingle_strings(texts: list[str], batch: int = 20000) -> list[list[str]]:
    """Every method's shingles: normalised words (stepwise's batch tokenizer, the same for all), 5-grams."""
    from stepwise.curation.minhash import word_tokens

    out: list[list[str]] = []
    for s in range(0, len(texts), batch):
        doc: list[str] = []
        for tok in word_tokens(texts[s : s + batch]):
            if tok != "\x00":
                doc.append(tok)
                continue
            if len(doc) < NGRAM:
                out.append([" ".join(doc)] if doc else [])
            else:
                out.append([" ".join(doc[i : i + NGRAM]) for i in range(len(doc) - NGRAM + 1)])
            doc = []
    return out


# ---------------------------------------------------------------------------------------------
# ground truth


def ground_truth(texts: list[str], threshold: float) -> np.ndarray:
    from stepwise.curation.minhash import _group_pairs, exact_jaccard, shingle_batch

    sb = shingle_batch(texts, NGRAM)
    off, h = sb.offsets, sb.hashes
    lens = np.diff(off)
    uniq, inv, counts = np.unique(h, return_inverse=True, return_counts=True)
    rank = np.argsort(np.argsort(counts, kind="stable"), kind="stable")[inv]  # rarer first
    doc = np.repeat(np.arange(len(texts)), lens)
    order = np.lexsort((rank, doc))
    pos_in_doc = np.arange(h.size) - np.repeat(off[:-1], lens)
    prefix = lens - np.ceil(threshold * lens).astype(np.int64) + 1
    sel = order[pos_in_doc < np.repeat(prefix, lens)]  # positions of prefix tokens (in sorted order)
    tok, d = inv[sel], doc[sel]
    o = np.argsort(tok, kind="stable")
    tok, d = tok[o], d[o]
    brk = np.flatnonzero(tok[1:] != tok[:-1]) + 1
    starts = np.concatenate([[0], brk])
    sizes = np.diff(np.concatenate([starts, [tok.size]]))
    import stepwise.curation.minhash as mh

    saved, mh.GROUP_ALL_PAIRS = mh.GROUP_ALL_PAIRS, 1 << 30  # truth needs every pair
    try:
        parts = _group_pairs(d, starts, sizes)
    finally:
        mh.GROUP_ALL_PAIRS = saved
    if not parts:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(parts)
    code = np.unique(pairs[:, 0] * len(texts) + pairs[:, 1])
    pairs = np.stack([code // len(texts), code % len(texts)], axis=1)
    j = exact_jaccard(sb, pairs)
    return pairs[j >= threshold]


# ---------------------------------------------------------------------------------------------
# methods (each runs in a child process)


def m_datasketch_naive(texts: list[str]) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sigs = []
    for i, shingles in enumerate(shingle_strings(texts)):
        m = MinHash(num_perm=NUM_PERM)
        for s in shingles:
            m.update(s.encode("utf-8"))
        sigs.append(m)
        lsh.insert(i, m, check_duplication=False)
    pairs = {(min(i, j), max(i, j)) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def m_rensa(texts: list[str]) -> np.ndarray:
    from rensa import RMinHash, RMinHashLSH

    shingles = shingle_strings(texts)
    mhs = RMinHash.from_token_sets(shingles, NUM_PERM, 42)
    lsh = RMinHashLSH(THRESHOLD, NUM_PERM, 16)
    lsh.insert_many(mhs)
    pairs = set()
    for i, cands in enumerate(lsh.query_all(mhs)):
        if not shingles[i]:
            continue
        for j in cands:
            if j != i and shingles[j] and mhs[i].jaccard(mhs[j]) >= THRESHOLD:
                pairs.add((min(i, j), max(i, j)))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def m_stepwise(texts: list[str], backend: str = "numpy") -> np.ndarray:
    from stepwise.curation.minhash import near_duplicate_pairs

    pairs, _ = near_duplicate_pairs(texts, THRESHOLD, num_perm=NUM_PERM, ngram=NGRAM, backend=backend,
                                    processes=2)
    return pairs


METHODS = {
    "datasketch-naive": m_datasketch_naive,
    "rensa": m_rensa,
    "stepwise": m_stepwise,
    "stepwise-datasketch-lsh": lambda texts: m_stepwise(texts, backend="datasketch"),
}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, corpus: Path, out: Path) -> None:
    import datasketch  # noqa: F401 - imports are not part of the timing
    import rensa  # noqa: F401
    import stepwise.curation.minhash  # noqa: F401
    import stepwise.curation.text  # noqa: F401

    texts = json.loads(corpus.read_text(encoding="utf-8"))
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    pairs = METHODS[method](texts)
    wall = time.perf_counter() - t0
    # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's, kept across
    # exec); worker processes (stepwise's 2 signature workers) are counted through RUSAGE_CHILDREN.
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    np.save(out, pairs)
    out.with_suffix(".json").write_text(json.dumps({"wall_s": wall, "peak_rss_mb": _status_mb("VmHWM"),
                                                    "baseline_rss_mb": base, "worker_peak_mb": workers}))


# ---------------------------------------------------------------------------------------------


def score(found: np.ndarray, truth: np.ndarray, n: int) -> tuple[float, float]:
    f = set((found[:, 0] * n + found[:, 1]).tolist()) if len(found) else set()
    t = set((truth[:, 0] * n + truth[:, 1]).tolist())
    tp = len(f & t)
    return (tp / len(f) if f else 1.0), (tp / len(t) if t else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            texts = build_corpus(n)
            corpus = Path(tmp) / f"corpus_{n}.json"
            corpus.write_text(json.dumps(texts), encoding="utf-8")
            t0 = time.perf_counter()
            truth = ground_truth(texts, THRESHOLD)
            print(f"n={n}: {len(truth)} true pairs with Jaccard >= {THRESHOLD} (ground truth in "
                  f"{time.perf_counter() - t0:.1f}s)", flush=True)
            for method in args.methods:
                if method == "stepwise-datasketch-lsh" and n > 200_000:
                    continue
                out = Path(tmp) / f"{method}_{n}.npy"
                env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "2", "RAYON_NUM_THREADS": "2"}
                proc = subprocess.run([sys.executable, __file__, "--child", method, str(corpus), str(out)], env=env)
                if proc.returncode != 0:
                    print(f"  {method}: failed ({proc.returncode})", flush=True)
                    continue
                stats = json.loads(out.with_suffix(".json").read_text())
                precision, recall = score(np.load(out), truth, n)
                row = {"n": n, "method": method, "docs_per_s": n / stats["wall_s"], "wall_s": stats["wall_s"],
                       "peak_rss_mb": stats["peak_rss_mb"], "worker_peak_mb": stats["worker_peak_mb"], "rss_over_corpus_mb": stats["peak_rss_mb"] - stats["baseline_rss_mb"],
                       "precision": precision, "recall": recall, "true_pairs": int(len(truth))}
                results.append(row)
                print(f"  {method:24s} {row['docs_per_s']:>10,.0f} docs/s  {row['wall_s']:7.1f}s  "
                      f"peak {row['peak_rss_mb']:7.0f} MB (+{row['rss_over_corpus_mb']:.0f} over corpus, workers "
                      f"{row['worker_peak_mb']:.0f})  "
                      f"P {precision:.4f}  R {recall:.4f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpus": os.cpu_count(), "threshold": THRESHOLD, "num_perm": NUM_PERM,
                                        "ngram": NGRAM, "results": results}, indent=2))


if __name__ == "__main__":
    main()
