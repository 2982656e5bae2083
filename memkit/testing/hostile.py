"""Corrupted and hostile save directories, tried one by one in a child process.

``python -m memkit.testing.hostile bank <backend> <workdir> <marker> [skip...]`` or
``python -m memkit.testing.hostile memory faiss-flat <workdir> <marker> [skip...]`` saves a real bank (or
MemoryManager), then for each case copies the save, damages or crafts it, and loads it. One JSON line per
case goes to stdout: ``{"case", "outcome"}`` where outcome is ``error:<MemkitError subclass>``,
``loaded`` (the file was a valid save after all, then searched/retrieved to prove it is usable), or
``BAD:<exception>``. A line ``{"start": case}`` precedes each case, so when native code kills the process
the parent knows which case did it and can rerun the rest with that case skipped.

Crafted cases *re-hash* the manifests after the damage, so checksums do not stop them: they test what
reaches the JSON/safetensors/native loaders. The pickle payload creates the ``marker`` directory if it
is ever unpickled.

Hostile *arguments* (paths, URIs, K/V budgets) are property-tested with the strategies of
:mod:`memkit.testing.hostile_inputs` (``tests/test_hostile_inputs.py``).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memkit.errors import MemkitError
from memkit.files import MANIFEST, file_digests, seal

Case = tuple[str, Callable[[Path], None], Any]  # (name, mutate(dir), must_fail: True, False or "class-load")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def pickle_bytes(marker: str) -> bytes:
    """A pickle that, if ever loaded, creates directory ``marker`` (proof of code execution)."""
    return pickle.dumps({"index": _Payload(marker)}, protocol=2)


# ---------------------------------------------------------------------- re-hashing crafted saves
def _rehash_bank(d: Path) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m["files"] = file_digests(d)
    (d / MANIFEST).write_text(json.dumps(seal(m)))


def rehash(root: Path) -> None:
    """Recompute every manifest under ``root`` (bank manifests, kvstore.json, the memory manifest)."""
    for mpath in sorted(root.rglob(MANIFEST), key=lambda p: -len(p.parts)):
        try:
            m = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(m, dict):
            continue
        if mpath.parent != root and m.get("format") == "memkit-bank":
            _rehash_bank(mpath.parent)
    for kv in root.rglob("kvstore.json"):
        try:
            m = json.loads(kv.read_text())
            m["files"] = file_digests(kv.parent, skip=("kvstore.json",))
            kv.write_text(json.dumps(seal(m)))
        except (ValueError, UnicodeDecodeError, TypeError):
            pass
    top = root / MANIFEST
    try:
        m = json.loads(top.read_text())
        if isinstance(m, dict):
            m["files"] = file_digests(root)
            top.write_text(json.dumps(seal(m)))
    except (ValueError, UnicodeDecodeError, OSError):
        pass


def _edit_json(rel: str, fn: Callable[[Any], Any], re_hash: bool = True) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        p = d / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
        if re_hash:
            rehash(d)
    return mutate


def _set(key_path: list[Any], value: Any) -> Callable[[Any], Any]:
    def fn(obj: Any) -> Any:
        cur = obj
        for k in key_path[:-1]:
            cur = cur[k]
        cur[key_path[-1]] = value
        return obj
    return fn


# ---------------------------------------------------------------------- generic file damage
def file_cases(base: Path, marker: str, outside: Path) -> Iterator[Case]:
    """Damage every data file of a save: truncation, bit flips, garbage, pickle, links, removal."""
    files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                   if p.is_file() and (p.name != MANIFEST or p.parent != base))
    for rel in files:
        size = (base / rel).stat().st_size

        def write(data_fn: Callable[[bytes], bytes], re_hash: bool, rel: str = rel) -> Callable[[Path], None]:
            def mutate(d: Path) -> None:
                p = d / rel
                p.write_bytes(data_fn(p.read_bytes()))
                if re_hash:
                    rehash(d)
            return mutate

        def flip(data: bytes, at: float) -> bytes:
            b = bytearray(data)
            if b:
                b[int(at * (len(b) - 1))] ^= 0x5A
            return bytes(b)

        for re_hash in (False, True):
            tag = "crafted" if re_hash else "damaged"
            yield f"{rel}:{tag}:empty", write(_empty, re_hash), True
            yield f"{rel}:{tag}:truncated-half", write(_half, re_hash), True
            yield f"{rel}:{tag}:truncated-16", write(lambda b: b[:16], re_hash), size > 16
            for at in (0.0, 0.01, 0.5, 0.99):
                yield f"{rel}:{tag}:bitflip@{at}", write(functools.partial(flip, at=at), re_hash), not re_hash
            yield f"{rel}:{tag}:appended", write(lambda b: b + b"\x00garbage" * 8, re_hash), not re_hash
        rng = np.random.default_rng(len(rel))
        noise = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        yield f"{rel}:crafted:random-bytes", write(_const(noise), True), True
        yield f"{rel}:crafted:all-ff", write(lambda b: b"\xff" * len(b), True), True
        yield f"{rel}:crafted:pickle", write(lambda b: pickle_bytes(marker), True), True
        yield f"{rel}:crafted:npy-object-array", write(lambda b: _npy_object(marker), True), True

        def link_out(d: Path, rel: str = rel) -> None:
            shutil.copyfile(d / rel, outside)
            (d / rel).unlink()
            (d / rel).symlink_to(outside)
            rehash(d)  # the digest is computed through the link: only the link itself is wrong
        yield f"{rel}:crafted:symlink-out", link_out, True

        def removed(d: Path, rel: str = rel) -> None:
            (d / rel).unlink()
        yield f"{rel}:damaged:missing", removed, True

        def removed_unlisted(d: Path, rel: str = rel) -> None:
            (d / rel).unlink()
            rehash(d)
        yield f"{rel}:crafted:missing-unlisted", removed_unlisted, True

        def made_dir(d: Path, rel: str = rel) -> None:
            (d / rel).unlink()
            (d / rel).mkdir()
        yield f"{rel}:damaged:directory", made_dir, True


def _npy_object(marker: str) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def manifest_cases(rel: str, outside: Path) -> Iterator[Case]:
    """Hostile contents of a JSON manifest at ``rel`` (bank or memory)."""
    def raw(data: bytes) -> Callable[[Path], None]:
        def mutate(d: Path) -> None:
            (d / rel).write_bytes(data)
        return mutate

    yield f"{rel}:not-json", raw(b"{not json"), True
    yield f"{rel}:empty", raw(b""), True
    yield f"{rel}:binary", raw(bytes(range(256)) * 4), True
    yield f"{rel}:null", raw(b"null"), True
    yield f"{rel}:list", raw(b"[1, 2, 3]"), True
    yield f"{rel}:json-bomb-nesting", raw(b"[" * 200_000 + b"]" * 200_000), True
    yield f"{rel}:json-bomb-dict-nesting", raw(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), True
    yield f"{rel}:huge-int", raw(b'{"format": ' + b"9" * 100_000 + b"}"), True
    yield f"{rel}:nan", raw(b'{"format": NaN, "dim": Infinity}'), True

    def sparse_huge(d: Path) -> None:
        with (d / rel).open("r+b") as fh:
            fh.truncate(80 << 20)  # sparse: a 80 MiB manifest costs no disk
    yield f"{rel}:huge-file", sparse_huge, True

    def link(target: str) -> Callable[[Path], None]:
        def mutate(d: Path) -> None:
            (d / rel).unlink()
            (d / rel).symlink_to(target)
        return mutate
    yield f"{rel}:symlink-dev-zero", link("/dev/zero"), True
    yield f"{rel}:symlink-dev-urandom", link("/dev/urandom"), True

    def link_copy(d: Path) -> None:
        shutil.copyfile(d / rel, outside)
        (d / rel).unlink()
        (d / rel).symlink_to(outside)
    yield f"{rel}:symlink-out", link_copy, True

    def fifo(d: Path) -> None:
        (d / rel).unlink()
        os.mkfifo(d / rel)
    yield f"{rel}:fifo", fifo, True

    def as_dir(d: Path) -> None:
        (d / rel).unlink()
        (d / rel).mkdir()
    yield f"{rel}:directory", as_dir, True

    def missing(d: Path) -> None:
        (d / rel).unlink()
    yield f"{rel}:missing", missing, True


def _files_cases(rel: str) -> Iterator[Case]:
    """Crafted ``files`` tables: paths outside, absolute, reserved, mistyped; unlisted extra files."""
    def add_entry(name: str, info: Any) -> Callable[[Any], Any]:
        def fn(m: Any) -> Any:
            m["files"][name] = info
            return m
        return fn

    good = {"size": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
    for name in ("../outside.bin", "../../etc/passwd", "/etc/passwd", "a/../../x", "", "manifest.json", "x\x00y"):
        yield f"{rel}:files-entry:{name!r}", _edit_json(rel, add_entry(name, good), re_hash=False), True
    yield f"{rel}:files-not-dict", _edit_json(rel, _set(["files"], [1, 2]), re_hash=False), True
    yield f"{rel}:files-info-not-dict", _edit_json(rel, lambda m: {**m, "files": {k: 7 for k in m["files"]}},
                                                   re_hash=False), True

    def extra_file(d: Path) -> None:
        (d / rel).parent.joinpath("extra.bin").write_bytes(b"not listed")
    yield f"{rel}:unlisted-extra-file", extra_file, True

    def extra_link(d: Path) -> None:
        (d / rel).parent.joinpath("escape").symlink_to("/etc")
    yield f"{rel}:unlisted-symlink-dir", extra_link, True


def bank_manifest_cases(backend: str) -> Iterator[Case]:
    m = MANIFEST
    for key, value, must in [
        ("version", 3, True), ("version", 1, True), ("version", "2", True), ("version", None, True),
        ("format", "memkit-memory", True), ("backend", "nope", True), ("backend", "../../etc/passwd", True),
        ("backend", "os:system", True), ("backend", 7, True),
        ("dim", 0, True), ("dim", -1, True), ("dim", 2**40, True), ("dim", "16", True), ("dim", True, True),
        ("dim", 1.5, True), ("dim", 8, True), ("dim", 32, True), ("metric", "cosine-ish", True),
        ("count", 10**12, True), ("count", -1, True), ("count", "x", True), ("next_id", -5, True),
        ("next_id", 2**70, True), ("next_id", "x", True), ("params", [], True), ("params", None, True),
    ]:
        yield f"manifest:{key}={value!r}", _edit_json(m, _set([key], value), re_hash=False), must
    hostile_params: list[dict[str, Any]] = [
        {"path": "/tmp/memkit-hostile-elsewhere"}, {"url": "http://127.0.0.1:9"}, {"api_key": "x"},
        {"bogus": 1}, {"__class__": "x"},
    ]
    per_backend: dict[str, list[dict[str, Any]]] = {
        "faiss-hnsw": [{"m": 10**6}, {"m": -1}, {"ef_search": 0}, {"rebuild_fraction": 5}],
        "faiss-ivf": [{"train_size": 0}, {"nlist": 10**9}, {"nlist": -3}, {"nprobe": -1}],
        "hnswlib": [{"initial_capacity": 2**40}, {"m": 10**6}, {"ef_construction": 2**31}, {"growth": 0.5},
                    {"num_threads": 10**6}, {"ef_search": -1}],
        "usearch": [{"dtype": "f64x"}, {"connectivity": 10**6}, {"expansion_search": -1}, {"threads": 10**6}],
        "disk": [{"block_rows": -1}, {"block_rows": 10**12}],
        "qdrant": [{"collection": "../../x"}, {"batch_size": -1}, {"collection": ""}],
    }
    params: list[dict[str, Any]] = hostile_params + per_backend.get(backend, [])
    for p in params:
        def add(m: Any, p: dict[str, Any] = p) -> Any:
            m["params"] = {**m["params"], **p}
            return m
        # harmless values: a collection name is just a name; native libraries cap their thread pools
        must = p not in ({"collection": "../../x"}, {"num_threads": 10**6}, {"threads": 10**6})
        yield f"manifest:params+{json.dumps(p)}", _edit_json(m, add, re_hash=False), must
    yield from _files_cases(m)


def memory_manifest_cases() -> Iterator[Case]:
    m = MANIFEST
    edits: list[tuple[list[Any], Any, bool]] = [
        (["version"], 3, True), (["version"], 1, True), (["format"], "memkit-bank", True), (["dims", "num_layers"], 3, True),
        (["dims", "kv_heads"], 1, True), (["dims", "head_dim"], 2**40, True), (["dims", "embed_dim"], -4, True),
        (["dims", "chunk_size"], "8", True), (["dims"], {}, True), (["dims"], [], True), (["next_id"], -1, True),
        (["next_id"], 0, False), (["namespaces"], "x", True), (["namespaces", 0, "dir"], "../ns-00000", True),
        (["namespaces", 0, "dir"], "ns-00009", True), (["namespaces", 0, "dir"], "/etc", True),
        (["namespaces", 0, "name"], 5, True), (["namespaces", 1, "name"], "alpha", True),
        (["namespaces", 1, "dir"], "ns-00000", True), (["config"], None, True), (["counters"], "x", False),
    ]
    for path, value, must in edits:
        yield f"manifest:{'.'.join(map(str, path))}={value!r}", _edit_json(m, _set(path, value), re_hash=False), must
    for path, value in [  # only MemoryManager.load(dir) reads the saved config; mm.load(dir) keeps its own
        (["config", "chunk_size"], -1), (["config", "kvstore", "dtype"], "fp64"), (["config", "policy"], "os.system"),
        (["config", "top_k"], 0),
    ]:
        yield (f"manifest:{'.'.join(map(str, path))}={value!r}", _edit_json(m, _set(path, value), re_hash=False),
               "class-load")
    yield from _files_cases(m)
    # crafted consistently (re-hashed): inner files whose contents disagree with each other
    yield "meta:policy-other-ids", _edit_json("ns-00000/meta.json", _set(["policy", "order"], [999999])), True
    yield "meta:policy-bad-param", _edit_json("ns-00000/meta.json",
                                              _set(["policy", "params"], {"protect_recent": "x"})), False
    yield "meta:texts-short", _edit_json("ns-00000/meta.json", _set(["texts"], [])), True
    yield "meta:name-other", _edit_json("ns-00000/meta.json", _set(["name"], "beta")), True
    yield "meta:policy-not-dict", _edit_json("ns-00000/meta.json", _set(["policy"], 3)), True
    yield "kvstore:page_shape", _edit_json("pages/kvstore.json", _set(["page_shape"], [1, 2, 3])), True
    yield "kvstore:count-huge", _edit_json("pages/kvstore.json", _set(["count"], 10**15)), True
    # fp16 and int8/channel pages of this shape have the same byte size: a consistent (if wrong) crafted file
    yield "kvstore:dtype-other", _edit_json("pages/kvstore.json", _set(["dtype"], "int8")), False
    yield "kvstore:shard-outside", _edit_json("pages/kvstore.json", _set(["shards", 0, "file"], "../manifest.json")), True
    yield "kvstore:page_bytes", _edit_json("pages/kvstore.json", _set(["page_bytes"], 1)), True
    for name, tensors in _safetensors_variants():
        yield f"meta.safetensors:{name}", _write_safetensors("ns-00000/meta.safetensors", tensors), True
    for name, tensors in _page_variants():
        yield f"pages-00000:{name}", _write_safetensors("pages/pages-00000.safetensors", tensors), True
    yield "meta.safetensors:header-length-huge", _write_raw("ns-00000/meta.safetensors",
                                                          struct.pack("<Q", 2**62) + b"{}"), True
    yield "meta.safetensors:header-bomb", _write_raw("ns-00000/meta.safetensors", _st_header(b"[" * 100_000)), True
    yield "meta.safetensors:offsets-out", _write_raw("ns-00000/meta.safetensors", _st_header(json.dumps(
        {"ids": {"dtype": "I64", "shape": [10**9], "data_offsets": [0, 8 * 10**9]}}).encode())), True


def _st_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _write_raw(rel: str, data: bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / rel).write_bytes(data)
        rehash(d)
    return mutate


def _const(data: bytes) -> Callable[[bytes], bytes]:
    return lambda b: data


def _empty(b: bytes) -> bytes:
    return b""


def _half(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _write_safetensors(rel: str, tensors: Callable[[dict[str, np.ndarray], str], dict[str, np.ndarray]]
                       ) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        from safetensors.numpy import load_file, save_file

        p = d / rel
        save_file(tensors(load_file(str(p)), rel), str(p))
        rehash(d)
    return mutate


def _safetensors_variants() -> Iterator[tuple[str, Callable[[Any, str], dict[str, np.ndarray]]]]:
    yield "ids-float", lambda t, _: {"ids": t["ids"].astype(np.float64) + 0.5, "spans": t["spans"]}
    yield "ids-2d", lambda t, _: {"ids": t["ids"].reshape(-1, 1).repeat(2, 1), "spans": t["spans"]}
    yield "ids-missing", lambda t, _: {"spans": t["spans"]}
    yield "spans-int32", lambda t, _: {"ids": t["ids"], "spans": t["spans"].astype(np.int32)}
    yield "spans-wrong-shape", lambda t, _: {"ids": t["ids"], "spans": t["spans"][:, :1].copy()}
    yield "ids-negative", lambda t, _: {"ids": -t["ids"] - 1, "spans": t["spans"]}
    yield "ids-other-namespace", lambda t, _: {"ids": t["ids"] + 10_000, "spans": t["spans"]}
    yield "extra-tensor", lambda t, _: {**t, "payload": np.zeros(3, np.uint8)}
    yield "ids-repeated", lambda t, _: {"ids": np.zeros_like(t["ids"]), "spans": t["spans"]}


def _page_variants() -> Iterator[tuple[str, Callable[[Any, str], dict[str, np.ndarray]]]]:
    yield "pages-float", lambda t, _: {"ids": t["ids"], "pages": t["pages"].astype(np.float32)}
    yield "pages-short-rows", lambda t, _: {"ids": t["ids"], "pages": t["pages"][:, :-1].copy()}
    yield "pages-fewer", lambda t, _: {"ids": t["ids"], "pages": t["pages"][:-1].copy()}
    yield "ids-float", lambda t, _: {"ids": t["ids"].astype(np.float32), "pages": t["pages"]}
    yield "ids-duplicated", lambda t, _: {"ids": np.zeros_like(t["ids"]), "pages": t["pages"]}
    yield "ids-negative", lambda t, _: {"ids": -t["ids"] - 1, "pages": t["pages"]}
    yield "ids-shifted", lambda t, _: {"ids": t["ids"] + 10_000, "pages": t["pages"]}
    yield "no-ids", lambda t, _: {"pages": t["pages"]}


# ---------------------------------------------------------------------- running the cases
class _Hang(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _Hang("no answer within 60 s")


def _classify(fn: Callable[[], Any]) -> str:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        fn()
        return "loaded"
    except MemkitError as exc:
        return f"error:{type(exc).__name__}"
    except _Hang:
        return "BAD:hang"
    except BaseException as exc:  # anything else is a bug: report it, keep going
        return f"BAD:{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_bank(backend: str, work: Path, marker: str, skip: set[str]) -> None:
    import memkit
    from memkit.testing.reliability import backend_params

    rng = np.random.default_rng(0)
    base = work / "base"
    if not base.exists():
        bank = memkit.create_bank(backend, dim=16, metric="cosine", **backend_params(backend, work / "live"))
        bank.add(rng.standard_normal((120, 16)).astype(np.float32))
        bank.remove(list(range(0, 120, 7)))
        bank.save(base)
        bank.close()
    outside = work / "outside.bin"
    cases = list(file_cases(base, marker, outside)) + list(manifest_cases(MANIFEST, outside)) + list(
        bank_manifest_cases(backend))
    modes = [False, True] if backend in ("faiss-flat", "usearch", "disk") else [False]
    q = rng.standard_normal((3, 16)).astype(np.float32)

    def use(d: Path, mmap: bool) -> None:
        b = memkit.load_bank(d, mmap=mmap)
        try:
            b.search(q, 5)
            len(b)
            b.ids()
            if not mmap:
                b.add(q)
        finally:
            b.close()

    _run_cases(cases, modes, base, work, skip, use)


def run_memory(backend: str, work: Path, marker: str, skip: set[str]) -> None:
    import torch

    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager

    L, H, C, D, E = 2, 2, 4, 4, 8
    cfg = MemoryConfig.from_dict(dict(chunk_size=C, top_k=3, policy="fifo", bank={"backend": backend},
                                      kvstore={"dtype": "fp16", "host_bytes": 1 << 20}))
    g = torch.Generator().manual_seed(0)
    base = work / "base"

    def fresh() -> MemoryManager:
        mm = MemoryManager(cfg, num_layers=L, kv_heads=H, head_dim=D, embed_dim=E)
        for j, ns in enumerate(("alpha", "beta")):
            n = 6
            spans = torch.tensor([[i * C, (i + 1) * C] for i in range(j * n, (j + 1) * n)])
            mm.add_chunks(torch.randn(n, L, H, C, D, generator=g), torch.randn(n, L, H, C, D, generator=g),
                          torch.randn(n, E, generator=g), spans, namespace=ns, texts=[f"{ns}{i}" for i in range(n)])
        return mm

    if not base.exists():
        fresh().save(base)
    outside = work / "outside.bin"
    cases = list(file_cases(base, marker, outside)) + list(manifest_cases(MANIFEST, outside)) + list(
        memory_manifest_cases())
    cases = [c for c in cases if not c[0].startswith("ns-00001/")]  # the same files as ns-00000
    holder = fresh()
    before = holder.num_chunks(), holder.chunk_ids("alpha").tolist()
    q = torch.randn(E, generator=g)

    def use(d: Path, in_place: bool) -> None:
        if in_place:  # load into a manager that already holds memory: on failure it must keep it
            try:
                holder.load(d)
            except MemkitError:
                if (holder.num_chunks(), holder.chunk_ids("alpha").tolist()) != before:
                    raise AssertionError("a failed in-place load changed the current memory") from None
                raise
            holder.load(base)  # restore for the next case
            return
        mm = MemoryManager.load(d)
        for ns in mm.namespaces():
            mm.retrieve(q, namespace=ns)
        mm.add_chunks(torch.zeros(1, L, H, C, D), torch.zeros(1, L, H, C, D), torch.ones(1, E),
                      torch.tensor([[0, C]]), namespace="alpha")
        every = [i for ns in mm.namespaces() for i in mm.chunk_ids(ns).tolist()]
        if len(every) != len(set(every)):
            raise AssertionError("after loading, a new chunk took the id of a stored one")
        mm.reset()

    def use_kv(d: Path, _: bool) -> None:
        from memkit.kvstore import KVStore

        store = KVStore(cfg.kvstore, page_shape=(L, 2, H, C, D))
        store.load(d / "pages")
        store.get(store.ids())
        store.close()

    _run_cases(cases, [False, True], base, work, skip, use)
    kv_cases = [c for c in cases if c[0].startswith(("pages/", "kvstore:", "pages-00000"))]
    kv_cases = [(f"kvstore-direct:{n}", f, m and not n.endswith("ids-shifted")) for n, f, m in kv_cases]
    _run_cases(kv_cases, [False], base, work, skip, use_kv)


def _run_cases(cases: list[Case], modes: list[bool], base: Path, work: Path, skip: set[str],
               use: Callable[[Path, bool], None]) -> None:
    for name, mutate, must_fail in cases:
        for mode in modes:
            case = f"{name}|mode={int(mode)}"
            if case in skip:
                continue
            d = work / "case"
            if d.exists() or d.is_symlink():
                shutil.rmtree(d)
            shutil.copytree(base, d, symlinks=True)
            _emit({"start": case})
            prep = _classify(lambda: mutate(d))  # noqa: B023 - called immediately
            if prep != "loaded":
                _emit({"case": case, "outcome": f"BAD:could not build the case ({prep})", "must_fail": must_fail})
                continue
            outcome = _classify(lambda: use(d, mode))  # noqa: B023 - called immediately
            must = bool(must_fail) and not (must_fail == "class-load" and mode)
            _emit({"case": case, "outcome": outcome, "must_fail": must})


def main(argv: list[str]) -> None:
    kind, backend, work, marker, *skip = argv
    try:  # a crafted size field must not take the (shared) machine's memory: cap this process at 4 GiB
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-Linux
        pass
    Path(work).mkdir(parents=True, exist_ok=True)
    (run_bank if kind == "bank" else run_memory)(backend, Path(work), marker, set(skip))
    _emit({"done": True})


if __name__ == "__main__":
    main(sys.argv[1:])
