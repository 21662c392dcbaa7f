"""Vectorised MinHash signatures and LSH candidate pairs, verified by exact Jaccard.

What is hand-written and why: datasketch computes a signature one `MinHash.update` per shingle
(about 1.8k docs/s here). This module computes the same kind of signature for a whole batch of
documents with a handful of numpy operations, and is bit-compatible with datasketch's `affine32`
scheme: the shingle hash is pre-mixed with datasketch's MurmurHash3 finaliser and permuted with
datasketch's own permutation parameters (taken from `datasketch.MinHash(num_perm, seed)`), so a
signature row equals `datasketch.MinHash(hashfunc=shingle_hash32)` updated shingle by shingle
(the tests check this), and can be fed to `datasketch.MinHashLSH` as precomputed `hashvalues`.

Candidate pairs come from LSH banding, either through datasketch's `MinHashLSH` (dict or Redis
storage: for indexes shared between workers or larger than memory) or through an equivalent numpy
banding pass (sort band hashes, pair equal runs) that avoids one Python call per band per row on
large corpora. Both use the same (bands, rows) so they find the same candidates. The bands are
chosen for recall (P(candidate | J = threshold) >= 0.99) because every candidate is then verified:
by the signature estimate when it is far from the threshold, by exact Jaccard of the shingle-hash
sets otherwise. So reported pairs have a known Jaccard, not just a shared bucket.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from stepwise.curation.text import normalize

_U64 = np.uint64
_MIX = _U64(0x9E3779B97F4A7C15)  # golden-ratio odd constant for combining tokens into shingles
_FM1, _FM2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_MAX32 = np.uint32(0xFFFFFFFF)
GROUP_ALL_PAIRS = 2048  # buckets larger than this emit star pairs (to the first member) only


def _fmix32(h: np.ndarray) -> np.ndarray:
    """datasketch's `_fmix(hv, 32)` (MurmurHash3 finaliser), in place on a uint32 array."""
    h ^= h >> np.uint32(16)
    h *= _FM1
    h ^= h >> np.uint32(13)
    h *= _FM2
    h ^= h >> np.uint32(16)
    return h


def _fmix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> _U64(33)
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


_M64 = 0xFFFFFFFFFFFFFFFF


def _fmix64_int(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


_P = 0x100000001B3  # odd multiplier of the token polynomial hash
_Q = pow(_P, -1, 1 << 64)  # its inverse mod 2^64 (P is odd)


def token_hash64(token: str) -> int:
    """Stable 64-bit hash of a word: polynomial over its UTF-8 bytes (+1) mod 2^64, then fmix64.

    The vectorised tokenizer computes the same value for every token of a batch at once from
    prefix sums (see `_token_hashes`); this scalar form is the reference.
    """
    h = 0
    for byte in token.encode("utf-8"):
        h = (h * _P + byte + 1) & _M64
    return _fmix64_int(h)


def _combine(codes: Sequence[int]) -> int:
    """Scalar reference of the shingle hash (the vectorised path must equal it)."""
    h = 0
    for c in codes:
        h = ((h ^ c) * int(_MIX)) & _M64
    h = _fmix64_int(h)
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def shingle_codes(text: str, shingle: str) -> list[int]:
    if shingle == "char":
        return [ord(c) for c in normalize(text)]
    return [token_hash64(w) for w in normalize(text).split()]


def reference_shingles(text: str, ngram: int, shingle: str = "word") -> list[int]:
    """The 32-bit shingle hashes of one text, computed one at a time (for tests and datasketch parity)."""
    codes = shingle_codes(text, shingle)
    if not codes:
        return []
    if len(codes) < ngram:
        return [_combine(codes)]
    return [_combine(codes[i : i + ngram]) for i in range(len(codes) - ngram + 1)]


@dataclass
class ShingleBatch:
    hashes: np.ndarray  # uint32, per doc sorted and unique, concatenated
    offsets: np.ndarray  # int64, len n_docs + 1

    def doc(self, i: int) -> np.ndarray:
        return self.hashes[self.offsets[i] : self.offsets[i + 1]]


_SEP = "\x00"
_NON_WORD_KEEP_SEP = re.compile(r"[^\w\x00]+", re.UNICODE)
_AROUND_SEP = re.compile(r" ?\x00 ?")


def _normalize_joined(texts: Sequence[str]) -> str:
    """`normalize` applied to every text at once; texts end with a NUL separator each."""
    big = _SEP.join(t.replace(_SEP, " ") for t in texts) + _SEP
    if not big.isascii():
        big = unicodedata.normalize("NFKC", big)
    big = _NON_WORD_KEEP_SEP.sub(" ", big.casefold())
    return _AROUND_SEP.sub(_SEP, big).lstrip(" ")


# ASCII fast path for word tokens: lower-case letters, keep digits, '_' and the separator,
# everything else becomes a space (equal to `normalize` on ASCII text).
# Bytes >= 128 (inside UTF-8 sequences of texts already normalised) are kept as they are.
_ASCII_TABLE = bytes(
    c + 32 if 65 <= c <= 90 else c if (97 <= c <= 122 or 48 <= c <= 57 or c in (95, 0) or c >= 128) else 32
    for c in range(256)
)


def word_tokens(texts: Sequence[str]) -> list[str]:
    """All texts' `words`, each text followed by a separator token; non-ASCII texts take `normalize`."""
    parts = (t.replace(_SEP, " ") if t.isascii() else normalize(t) for t in texts)
    big = " \x00 ".join(parts) + " \x00"
    return big.encode("utf-8").translate(_ASCII_TABLE).decode("utf-8").split()


_POW: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and Q^i mod 2^64 for i < n (cached, grown on demand)."""
    if "p" not in _POW or _POW["p"].size < n:
        size = max(n, 1 << 16)
        with np.errstate(over="ignore"):
            p = np.full(size, _P, dtype=_U64)
            p[0] = 1
            q = np.full(size, _Q, dtype=_U64)
            q[0] = 1
            _POW["p"], _POW["q"] = np.cumprod(p, dtype=_U64), np.cumprod(q, dtype=_U64)
    return _POW["p"], _POW["q"]


def _token_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token hashes, tokens per text) for word shingles, without a Python step per token.

    Normalised bytes are split at spaces with numpy; each token's polynomial hash is
    (C[end] - C[start]) * P^(end-1) with C the prefix sums of (byte + 1) * Q^i, Q = P^-1.
    """
    parts = (t.replace(_SEP, " ") if t.isascii() else normalize(t) for t in texts)
    data = (" \x00 ".join(parts) + " \x00 ").encode("utf-8").translate(_ASCII_TABLE)
    buf = np.frombuffer(data, dtype=np.uint8)
    is_tok = buf != 32
    edge = np.diff(np.concatenate([[False], is_tok, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    pw, qw = _powers(buf.size + 1)
    with np.errstate(over="ignore"):
        c = np.zeros(buf.size + 1, dtype=_U64)
        np.cumsum((buf.astype(_U64) + _U64(1)) * qw[: buf.size], out=c[1:])
        h = (c[ends] - c[starts]) * pw[ends - 1]
    h = _fmix64(h)
    sep = (buf[starts] == 0) & (ends - starts == 1)
    seps = np.flatnonzero(sep)
    lens = np.diff(np.concatenate([[-1], seps])) - 1
    return h[~sep], lens.astype(np.int64)


def _codes_and_lengths(texts: Sequence[str], shingle: str) -> tuple[np.ndarray, np.ndarray]:
    if shingle == "char":
        big = _normalize_joined(texts)
        cps = np.frombuffer(big.encode("utf-32-le"), dtype=np.uint32)
        seps = np.flatnonzero(cps == 0)
        codes = cps[cps != 0].astype(_U64)
        lens = np.diff(np.concatenate([[-1], seps])) - 1
        return codes, lens.astype(np.int64)
    return _token_hashes(texts)


def shingle_batch(texts: Sequence[str], ngram: int, shingle: str = "word") -> ShingleBatch:
    """Shingle hashes of many texts at once (batch normalisation, vectorised n-gram combination)."""
    w, lens = _codes_and_lengths(texts, shingle)
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    if w.size == 0:
        return ShingleBatch(np.zeros(0, np.uint32), np.zeros(len(texts) + 1, np.int64))
    n = w.size
    doc_idx = np.repeat(np.arange(len(texts), dtype=np.int64), lens)
    pos = np.arange(n, dtype=np.int64)
    padded = np.concatenate([w, np.zeros(ngram, dtype=_U64)])
    h = np.zeros(n, dtype=_U64)
    with np.errstate(over="ignore"):
        for i in range(ngram):  # every position combines the next `ngram` codes
            h ^= padded[i : i + n]
            h *= _MIX
        # documents shorter than `ngram` get one shingle made of all their codes
        short = np.flatnonzero((lens > 0) & (lens < ngram))
        if short.size:
            hs = np.zeros(short.size, dtype=_U64)
            first = starts[short]
            for i in range(ngram - 1):
                valid = i < lens[short]
                hs = np.where(valid, (hs ^ w[np.minimum(first + i, n - 1)]) * _MIX, hs)
            h[first] = hs
    h = _fmix64(h)
    h32 = (h ^ (h >> _U64(32))).astype(np.uint32)
    keep = pos + ngram <= starts[1:][doc_idx]
    if short.size:
        keep[starts[short]] = True
    # sort each doc's shingles and drop repeats (sets, as MinHash sees them)
    key = np.sort((doc_idx[keep].astype(_U64) << _U64(32)) | h32[keep].astype(_U64))
    if key.size:
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    doc_of = (key >> _U64(32)).astype(np.int64)
    h32 = (key & _U64(0xFFFFFFFF)).astype(np.uint32)
    counts = np.bincount(doc_of, minlength=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return ShingleBatch(h32, offsets)


class MinHasher:
    """Signatures for many texts; permutations are datasketch's for (num_perm, seed)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, shingle: str = "word", seed: int = 1):
        from datasketch import MinHash

        self.num_perm, self.ngram, self.shingle, self.seed = num_perm, ngram, shingle, seed
        self.permutations = MinHash(num_perm=num_perm, seed=seed).permutations  # (2, P) uint32, affine32
        self._a = self.permutations[0].astype(np.uint32)[:, None]
        self._b = self.permutations[1].astype(np.uint32)[:, None]

    def signatures_of(self, batch: ShingleBatch, chunk: int = 1 << 15) -> np.ndarray:
        """(n_docs, num_perm) uint32; a doc with no shingles gets all-max values (never a duplicate)."""
        n = len(batch.offsets) - 1
        out = np.full((n, self.num_perm), _MAX32, dtype=np.uint32)
        counts = np.diff(batch.offsets)
        nonempty = np.flatnonzero(counts > 0)
        if nonempty.size == 0:
            return out
        hv = _fmix32(batch.hashes.copy())
        # process whole docs in chunks of about `chunk` shingles to bound memory (P x chunk)
        i = 0
        while i < nonempty.size:
            lo = batch.offsets[nonempty[i]]
            j = int(np.searchsorted(batch.offsets[nonempty + 1], lo + chunk, side="right"))
            j = max(j, i + 1)
            docs = nonempty[i:j]
            hi = batch.offsets[docs[-1] + 1]
            phv = self._a * hv[lo:hi][None, :]
            phv += self._b
            out[docs] = np.minimum.reduceat(phv, batch.offsets[docs] - lo, axis=1).T
            i = j
        return out

    def signatures(
        self, texts: Sequence[str], batch_size: int = 20000, processes: int = 1, keep_shingles: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, ShingleBatch | None]:
        """Signatures of all texts, in batches, optionally across worker processes."""
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        sigs: list[np.ndarray] = []
        shingles: list[ShingleBatch] = []
        args = [(self.num_perm, self.ngram, self.shingle, self.seed, list(c), keep_shingles) for c in chunks]
        if processes > 1 and len(chunks) > 1:
            ctx = mp.get_context("fork")
            with ctx.Pool(processes) as pool:
                results: Iterator = pool.imap(_worker, args)
                for sig, sb in results:
                    sigs.append(sig)
                    if sb is not None:
                        shingles.append(sb)
                    if progress:
                        progress(len(sig))
        else:
            for a in args:
                sig, sb = _worker(a, hasher=self)
                sigs.append(sig)
                if sb is not None:
                    shingles.append(sb)
                if progress:
                    progress(len(sig))
        sig = np.concatenate(sigs) if sigs else np.zeros((0, self.num_perm), np.uint32)
        return sig, (_concat_batches(shingles) if keep_shingles else None)

    def datasketch_minhash(self, row: np.ndarray):
        """A `datasketch.MinHash` holding a precomputed signature row."""
        from datasketch import MinHash

        return MinHash(seed=self.seed, hashvalues=row, permutations=self.permutations, scheme="affine32")


_WORKER_HASHER: dict[tuple, MinHasher] = {}


def _worker(args, hasher: MinHasher | None = None):
    num_perm, ngram, shingle, seed, texts, keep = args
    if hasher is None:
        key = (num_perm, ngram, shingle, seed)
        hasher = _WORKER_HASHER.get(key) or _WORKER_HASHER.setdefault(key, MinHasher(num_perm, ngram, shingle, seed))
    sb = shingle_batch(texts, ngram, shingle)
    return hasher.signatures_of(sb), (sb if keep else None)


def _concat_batches(batches: list[ShingleBatch]) -> ShingleBatch:
    if not batches:
        return ShingleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64))
    hashes = np.concatenate([b.hashes for b in batches])
    parts = [np.zeros(1, np.int64)]
    base = 0
    for b in batches:
        parts.append(b.offsets[1:] + base)
        base += int(b.offsets[-1])
    return ShingleBatch(hashes, np.concatenate(parts))


# ---------------------------------------------------------------------------------------------
# LSH banding


def recall_bands(threshold: float, num_perm: int, target: float = 0.99) -> tuple[int, int]:
    """(bands, rows) with the most rows per band whose P(candidate | J = threshold) >= target."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if b < 2:
            break
        if 1 - (1 - threshold**r) ** b >= target:
            best = (b, r)
    return best


def band_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Candidate pairs (i < j) sharing at least one band, as an (m, 2) int64 array (numpy banding).

    Every pair inside a bucket is emitted up to GROUP_ALL_PAIRS members; a larger bucket (mass
    duplication) emits star pairs to its first member, which keeps memory bounded and still
    connects every member to a representative.
    """
    n = sig.shape[0]
    idx = np.flatnonzero(~(sig == _MAX32).all(axis=1))
    chunks: list[np.ndarray] = []
    with np.errstate(over="ignore"):
        for k in range(bands):
            block = sig[idx, k * rows : (k + 1) * rows].astype(_U64)
            h = np.zeros(idx.size, dtype=_U64)
            for c in range(rows):
                h ^= block[:, c]
                h *= _MIX
            h = _fmix64(h)
            order = np.argsort(h, kind="stable")
            hs, ids = h[order], idx[order]
            if hs.size < 2:
                continue
            brk = np.flatnonzero(hs[1:] != hs[:-1]) + 1
            starts = np.concatenate([[0], brk])
            sizes = np.diff(np.concatenate([starts, [hs.size]]))
            found = _group_pairs(ids, starts, sizes)
            if found:
                pairs = np.concatenate(found).astype(np.int64)
                chunks.append(pairs[:, 0] * n + pairs[:, 1])
            if sum(c.size for c in chunks) > 50_000_000:  # bound memory on huge corpora
                chunks = [np.unique(np.concatenate(chunks))]
    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(chunks))
    return np.stack([codes // n, codes % n], axis=1)


def _group_pairs(ids: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """All pairs inside each bucket of equal band hashes, vectorised per bucket size."""
    out: list[np.ndarray] = []
    multi = np.flatnonzero(sizes > 1)
    if multi.size == 0:
        return out
    order = multi[np.argsort(sizes[multi], kind="stable")]
    sz = sizes[order]
    bounds = np.flatnonzero(np.diff(sz)) + 1
    for grp in np.split(order, bounds):
        z = int(sizes[grp[0]])
        members = ids[starts[grp][:, None] + np.arange(z)[None, :]]
        if z <= GROUP_ALL_PAIRS:
            a, b = np.triu_indices(z, 1)
            left, right = members[:, a].ravel(), members[:, b].ravel()
        else:
            left = np.repeat(members.min(axis=1), z)
            right = members.ravel()
        lo, hi = np.minimum(left, right), np.maximum(left, right)
        keep = lo != hi
        out.append(np.stack([lo[keep], hi[keep]], axis=1))
    return out


def datasketch_index(
    hasher: MinHasher, sig: np.ndarray, bands: int, rows: int, redis_url: str | None = None, basename: str | None = None
):
    """A `datasketch.MinHashLSH` holding every non-empty signature row under its index as key.

    With `redis_url`, the index lives in Redis (datasketch's storage layer): larger than memory,
    shared between workers. Insertion goes through datasketch's buffered insertion session.
    """
    from datasketch import MinHashLSH

    storage = None
    if redis_url:
        storage = {"type": "redis", "redis": _redis_params(redis_url)}
        if basename:
            storage["basename"] = basename.encode()
    lsh = MinHashLSH(num_perm=hasher.num_perm, params=(bands, rows), storage_config=storage)
    with lsh.insertion_session() as session:
        for i in np.flatnonzero(~(sig == _MAX32).all(axis=1)).tolist():
            session.insert(i, hasher.datasketch_minhash(sig[i]), check_duplication=False)
    return lsh


def datasketch_pairs(
    hasher: MinHasher, sig: np.ndarray, bands: int, rows: int, redis_url: str | None = None, basename: str | None = None
) -> np.ndarray:
    """Candidate pairs through `datasketch.MinHashLSH` (dict storage, or Redis when `redis_url`)."""
    lsh = datasketch_index(hasher, sig, bands, rows, redis_url=redis_url, basename=basename)
    pairs = set()
    for i in np.flatnonzero(~(sig == _MAX32).all(axis=1)).tolist():
        for j in lsh.query(hasher.datasketch_minhash(sig[i])):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
    if redis_url:
        drop_redis_index(lsh)
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.array(sorted(pairs), dtype=np.int64)


def _redis_params(url: str) -> dict:
    from urllib.parse import urlparse

    u = urlparse(url)
    params: dict = {"host": u.hostname or "localhost", "port": u.port or 6379}
    if u.path and u.path.strip("/").isdigit():
        params["db"] = int(u.path.strip("/"))
    if u.password:
        params["password"] = u.password
    return params


def drop_redis_index(lsh) -> None:
    try:
        keys = [lsh.keys._name] + [t._name for t in lsh.hashtables]
        client = lsh.keys._redis
        # datasketch stores each bucket under name + key; drop everything with the index prefix
        for name in keys:
            for k in client.scan_iter(match=name + b"*"):
                client.delete(k)
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass


# ---------------------------------------------------------------------------------------------
# verification


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.zeros(0)
    out = np.empty(len(pairs))
    step = 1 << 16
    for s in range(0, len(pairs), step):
        p = pairs[s : s + step]
        out[s : s + step] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def exact_jaccard(shingles: ShingleBatch, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of each pair's shingle-hash sets (vectorised: sort the pooled sets per pair)."""
    if len(pairs) == 0:
        return np.zeros(0)
    off = shingles.offsets
    out = np.empty(len(pairs))
    step = 1 << 15
    for s in range(0, len(pairs), step):
        p = pairs[s : s + step]
        la = off[p[:, 0] + 1] - off[p[:, 0]]
        lb = off[p[:, 1] + 1] - off[p[:, 1]]
        # (pair << 32 | hash) is already sorted per side: pairs ascend and each doc's hashes are sorted
        ka = (np.repeat(np.arange(len(p), dtype=_U64), la) << _U64(32)) | _gather(shingles.hashes, off[p[:, 0]], la).astype(_U64)
        kb = (np.repeat(np.arange(len(p), dtype=_U64), lb) << _U64(32)) | _gather(shingles.hashes, off[p[:, 1]], lb).astype(_U64)
        if kb.size:
            pos = np.minimum(np.searchsorted(kb, ka), kb.size - 1)
            shared = kb[pos] == ka
        else:
            shared = np.zeros(ka.size, dtype=bool)
        inter = np.bincount((ka[shared] >> _U64(32)).astype(np.int64), minlength=len(p))
        union = la + lb - inter
        out[s : s + step] = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return out


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    if lens.sum() == 0:
        return np.zeros(0, flat.dtype)
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return flat[base + np.arange(int(lens.sum()))]


def verify_pairs(
    sig: np.ndarray, shingles: ShingleBatch | None, pairs: np.ndarray, threshold: float, margin: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with Jaccard >= threshold and their Jaccard.

    Pairs whose signature estimate is more than `margin` from the threshold are decided by the
    estimate; the rest by exact Jaccard. The default margin is 3.5 standard errors of the
    estimate at the threshold (0.124 for 0.8 and 128 permutations): a pair on the wrong side of it
    has odds of about 1 in 4000.
    """
    if len(pairs) == 0:
        return pairs, np.zeros(0)
    if margin is None:
        margin = 3.5 * float(np.sqrt(threshold * (1 - threshold) / sig.shape[1]))
    est = estimated_jaccard(sig, pairs)
    sim = est.copy()
    if shingles is not None:
        near = np.flatnonzero(np.abs(est - threshold) <= margin)
        if near.size:
            sim[near] = exact_jaccard(shingles, pairs[near])
    keep = sim >= threshold
    return pairs[keep], sim[keep]


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float, num_perm: int = 128, ngram: int = 5, shingle: str = "word",
    backend: str = "auto", redis_url: str | None = None, processes: int = 1, seed: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of texts with Jaccard >= threshold, with their similarity."""
    hasher = MinHasher(num_perm, ngram, shingle, seed)
    sig, sh = hasher.signatures(list(texts), processes=processes, keep_shingles=True)
    bands, rows = recall_bands(threshold, num_perm)
    if backend == "auto":
        backend = "datasketch" if (redis_url or len(texts) <= 50_000) else "numpy"
    if backend == "datasketch":
        pairs = datasketch_pairs(hasher, sig, bands, rows, redis_url=redis_url)
    else:
        pairs = band_pairs(sig, bands, rows)
    return verify_pairs(sig, sh, pairs, threshold)
