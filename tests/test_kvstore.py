"""KVStore: paged == unpaged under random workloads, budgets, dtype error bounds, save/load, CUDA path."""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkit import CapacityError, CorruptFileError, IncompatibleMemoryError, InvalidInputError
from memkit.config import KVStoreConfig
from memkit.kvstore import KVStore, PageCodec

SHAPE = (2, 2, 2, 8, 4)  # (L, 2, H, C, D)


def kv_like(n: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """N(0, 1) pages with a few outlier channels, like real attention keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    x[..., : max(1, shape[-1] // 4)] *= 20
    return x


def check_budgets(store: KVStore) -> None:
    for name, t in store.stats()["tiers"].items():
        assert t["resident_bytes"] <= t["budget_bytes"], name
        assert t["peak_bytes"] <= t["budget_bytes"], name
        assert t["pages"] * store.page_bytes == t["resident_bytes"]
    assert sum(t["pages"] for t in store.stats()["tiers"].values()) == len(store)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(["fp32", "fp16", "bf16", "int8"]),
       scale=st.sampled_from(["page", "channel"]), dev_pages=st.integers(0, 4), host_pages=st.integers(0, 5))
def test_paged_equals_unpaged_under_random_workloads(data, dtype, scale, dev_pages, host_pages):
    codec = PageCodec(SHAPE, dtype, scale)
    pb = codec.page_bytes
    with tempfile.TemporaryDirectory() as tmp:
        paged = KVStore(KVStoreConfig(device_bytes=dev_pages * pb + pb // 2, host_bytes=host_pages * pb,
                                      disk_dir=tmp, disk_bytes=12 * pb, dtype=dtype, int8_scale=scale),
                        page_shape=SHAPE)
        flat = KVStore(KVStoreConfig(device_bytes=1 << 30, dtype=dtype, int8_scale=scale), page_shape=SHAPE)
        capacity = dev_pages + host_pages + 12
        ref: dict[int, torch.Tensor] = {}
        for step in range(data.draw(st.integers(5, 25), label="steps")):
            op = data.draw(st.sampled_from(["put", "put", "get", "get", "prefetch", "remove"]), label="op")
            if op == "put":
                ids = data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=6, unique=True), label="ids")
                pages = kv_like(len(ids), seed=step) * data.draw(st.sampled_from([1.0, 1e-3, 50.0]))
                new = sum(1 for i in ids if i not in ref)
                if len(ref) + new > capacity:
                    with pytest.raises(CapacityError, match="disk"):
                        paged.put(ids, pages)
                    continue
                if step % 3 == 0:  # any float dtype is accepted
                    pages = pages.to(torch.bfloat16)
                paged.put(ids, pages)
                flat.put(ids, pages)
                for i, p in zip(ids, pages.float()):
                    ref[i] = p
            elif op == "get" and ref:
                ids = data.draw(st.lists(st.sampled_from(sorted(ref)), min_size=1, max_size=8), label="get")
                out = paged.get(ids)
                torch.testing.assert_close(out, flat.get(ids), rtol=0, atol=0)
                if dtype == "fp32":
                    want = torch.stack([ref[i] for i in ids])
                    torch.testing.assert_close(out, want, rtol=0, atol=0)
            elif op == "prefetch" and ref:
                paged.prefetch(data.draw(st.lists(st.integers(0, 40), max_size=5), label="prefetch"))
            elif op == "remove":
                ids = data.draw(st.lists(st.integers(0, 30), max_size=5, unique=True), label="rm")
                assert paged.remove(ids) == flat.remove(ids) == sum(i in ref for i in ids)
                for i in ids:
                    ref.pop(i, None)
            check_budgets(paged)
            assert len(paged) == len(flat) == len(ref) and set(paged.ids().tolist()) == set(ref)
        if ref:
            ids = sorted(ref)
            torch.testing.assert_close(paged.get(ids), flat.get(ids), rtol=0, atol=0)


def test_tiers_spill_to_disk_and_come_back_lru():
    pb = PageCodec(SHAPE, "fp16").page_bytes
    with tempfile.TemporaryDirectory() as tmp:
        s = KVStore(KVStoreConfig(device_bytes=2 * pb, host_bytes=3 * pb, disk_dir=tmp, disk_bytes=20 * pb),
                    page_shape=SHAPE)
        x = kv_like(10)
        s.put(np.arange(10), x)
        assert [s.tier_of(i) for i in range(10)] == ["disk"] * 5 + ["host"] * 3 + ["device"] * 2
        assert s.stats()["tiers"]["disk"]["file_bytes"] <= 20 * pb
        torch.testing.assert_close(s.get([0]), x[:1].half().float(), rtol=0, atol=0)
        st_ = s.stats()
        assert s.tier_of(0) == "device" and st_["tiers"]["disk"]["hits"] == 1
        assert st_["tiers"]["device"]["misses"] == 1 and st_["tiers"]["host"]["misses"] == 1
        assert st_["bytes_moved"]["disk_to_host"] == pb and st_["bytes_moved"]["host_to_device"] == pb
        s.get([0])
        assert s.stats()["tiers"]["device"]["hits"] == 1
        assert s.prefetch([1, 2, 99]) == 2 and s.tier_of(1) == "device" and s.tier_of(2) == "device"
        out = s.get(list(range(10)))  # more than the device holds: served, budgets kept
        torch.testing.assert_close(out, x.half().float(), rtol=0, atol=0)
        check_budgets(s)
        s.reset()
        assert len(s) == 0 and not list(Path(tmp).iterdir())


def test_offload_moves_device_pages_down():
    pb = PageCodec(SHAPE, "fp16").page_bytes
    s = KVStore(KVStoreConfig(device_bytes=4 * pb, host_bytes=4 * pb), page_shape=SHAPE)
    x = kv_like(4)
    s.put([0, 1, 2, 3], x)
    assert s.offload([1, 9]) == 1 and s.tier_of(1) == "host"
    assert s.offload() == 3 and s.stats()["tiers"]["device"]["pages"] == 0
    assert s.prefetch([0, 1]) == 2 and s.tier_of(0) == "device"
    torch.testing.assert_close(s.get([3, 0]), x[[3, 0]].half().float(), rtol=0, atol=0)
    check_budgets(s)


def test_bench_kv_quick_writes_results(tmp_path: Path):
    import argparse

    from memkit.bench import kv

    p = argparse.ArgumentParser()
    kv.add_arguments(p)
    args = p.parse_args(["--quick", "--synthetic", "--chunks", "12", "--layers", "1", "--blocks", "4",
                         "--dtypes", "fp16,int8", "--budgets", "0,1/4", "--out", str(tmp_path)])
    assert kv.run(args) == 0
    data = json.loads((tmp_path / "kv.json").read_text())
    assert len(data["rows"]) == 4 and (tmp_path / "kv.png").stat().st_size > 0
    assert "| dtype |" in (tmp_path / "kv.md").read_text()
    assert torch.cuda.is_available() or "skipped" in data["gpu"]


def test_zero_device_budget_and_no_disk():
    pb = PageCodec(SHAPE, "fp32").page_bytes
    s = KVStore(KVStoreConfig(device_bytes=0, host_bytes=4 * pb, dtype="fp32"), page_shape=SHAPE)
    x = kv_like(4)
    s.put([1, 2, 3, 4], x)
    torch.testing.assert_close(s.get([4, 1]), x[[3, 0]], rtol=0, atol=0)
    with pytest.raises(CapacityError, match="disk_dir"):
        s.put([5], x[:1])
    assert len(s) == 4
    check_budgets(s)


@pytest.mark.parametrize(("dtype", "scale", "bound"), [
    ("fp32", "page", 0.0), ("fp16", "page", 2.0**-11), ("bf16", "page", 2.0**-8),
    ("int8", "page", 1 / 254 + 1e-6), ("int8", "channel", 1 / 254 + 1e-6)])
def test_dtype_error_bounds(dtype, scale, bound):
    shape = (2, 2, 4, 32, 16)
    x = kv_like(64, shape, seed=3)
    c = PageCodec(shape, dtype, scale)
    err = (c.decode(c.encode(x)) - x).abs()
    page_rel = err.flatten(1).amax(1) / x.abs().flatten(1).amax(1)
    assert page_rel.max().item() <= bound
    if scale == "channel" and dtype == "int8":
        assert (err / x.abs().amax(dim=-2, keepdim=True)).max().item() <= bound
        per_page = PageCodec(shape, "int8", "page")
        assert (per_page.decode(per_page.encode(x)) - x).abs().mean() > 3 * err.mean()
    assert c.page_bytes <= PageCodec(shape, "fp32").page_bytes


def test_bad_input_changes_nothing():
    s = KVStore(KVStoreConfig(dtype="fp32"), page_shape=SHAPE)
    x = kv_like(3)
    s.put([0, 1, 2], x)
    with pytest.raises(InvalidInputError, match="shape"):
        s.put([3], x[:, :1])
    bad = x.clone()
    bad[1, 0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        s.put([0, 1, 2], bad)
    with pytest.raises(InvalidInputError, match="floating"):
        s.put([0], torch.ones(1, *SHAPE, dtype=torch.int32))
    with pytest.raises(InvalidInputError, match="duplicates"):
        s.put([5, 5], x[:2])
    with pytest.raises(InvalidInputError, match="not in the K/V store"):
        s.get([0, 7])
    torch.testing.assert_close(s.get([0, 1, 2]), x, rtol=0, atol=0)
    assert s.get([]).shape == (0, *SHAPE)
    assert s.get([1], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_save_load_round_trip_and_errors(tmp_path: Path):
    pb = PageCodec(SHAPE, "int8", "channel").page_bytes
    s = KVStore(KVStoreConfig(device_bytes=2 * pb, host_bytes=2 * pb, disk_dir=str(tmp_path / "spill"),
                              dtype="int8"), page_shape=SHAPE)
    x = kv_like(9)
    s.put(np.arange(9) * 3, x)
    s.get([0])
    before = s.get(np.arange(9) * 3)
    s.save(tmp_path / "kv")
    assert not list((tmp_path / "kv").glob("*.pkl"))
    t = KVStore(KVStoreConfig(device_bytes=3 * pb, host_bytes=1 << 20, dtype="int8"), page_shape=SHAPE)
    t.load(tmp_path / "kv")
    torch.testing.assert_close(t.get(np.arange(9) * 3), before, rtol=0, atol=0)
    assert t.tier_of(0) == "device"  # most recently used pages go back on the device tier
    # loading into another storage dtype re-encodes
    u = KVStore(KVStoreConfig(dtype="fp32"), page_shape=SHAPE)
    u.load(tmp_path / "kv")
    torch.testing.assert_close(u.get(np.arange(9) * 3), before, rtol=0, atol=0)
    other = KVStore(KVStoreConfig(dtype="int8"), page_shape=(2, 2, 2, 16, 4))
    with pytest.raises(IncompatibleMemoryError, match="shape"):
        other.load(tmp_path / "kv")
    small = KVStore(KVStoreConfig(device_bytes=pb, host_bytes=pb, dtype="int8"), page_shape=SHAPE)
    small.put([100], x[:1])
    with pytest.raises(CapacityError):
        small.load(tmp_path / "kv")
    shard = next((tmp_path / "kv").glob("pages-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptFileError):
        small.load(tmp_path / "kv")
    with pytest.raises(CorruptFileError):
        small.load(tmp_path / "missing")
    assert len(small) == 1 and 100 in small
    empty = KVStore(KVStoreConfig(), page_shape=SHAPE)
    empty.save(tmp_path / "empty")
    empty.load(tmp_path / "empty")
    assert len(empty) == 0


def test_concurrent_put_get_remove():
    pb = PageCodec(SHAPE, "fp16").page_bytes
    with tempfile.TemporaryDirectory() as tmp:
        s = KVStore(KVStoreConfig(device_bytes=3 * pb, host_bytes=5 * pb, disk_dir=tmp, disk_bytes=200 * pb),
                    page_shape=SHAPE)
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for step in range(20):
                    ids = [t * 1000 + step * 2, t * 1000 + step * 2 + 1]
                    x = kv_like(2, seed=t * 100 + step)
                    s.put(ids, x)
                    torch.testing.assert_close(s.get(ids[::-1]), x.half().float().flip(0), rtol=0, atol=0)
                    if step % 3 == 0:
                        assert s.remove([ids[0]]) == 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert len(s) == 4 * (40 - 7)
        check_budgets(s)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paging_with_side_stream_and_prefetch():
    pb = PageCodec(SHAPE, "bf16").page_bytes
    with tempfile.TemporaryDirectory() as tmp:
        s = KVStore(KVStoreConfig(device="cuda", device_bytes=4 * pb, host_bytes=6 * pb, disk_dir=tmp,
                                  disk_bytes=40 * pb, dtype="bf16"), page_shape=SHAPE)
        ref = KVStore(KVStoreConfig(device_bytes=1 << 30, dtype="bf16"), page_shape=SHAPE)
        x = kv_like(30)
        s.put(np.arange(15), x[:15].cuda())  # from the device
        s.put(np.arange(15, 30), x[15:])  # from the host
        ref.put(np.arange(30), x)
        assert s.stats()["tiers"]["host"]["pages"] == 6
        for ids in ([0, 29, 3], [5, 6, 7, 8, 9, 10], list(range(30))):
            s.prefetch(ids[:3])
            out = s.get(ids)
            assert out.is_cuda
            torch.testing.assert_close(out.cpu(), ref.get(ids), rtol=0, atol=0)
            check_budgets(s)
        torch.cuda.synchronize()


def test_small_host_budget_spills_to_disk_bit_exact_and_never_mapped(tmp_path: Path):
    """Pages beyond a 2-page host budget go to disk files (read with pread, never memory-mapped, so RSS does not
    grow with them) and come back bit-exact."""
    pb = PageCodec(SHAPE, "fp32").page_bytes
    s = KVStore(KVStoreConfig(device_bytes=0, host_bytes=2 * pb, disk_dir=str(tmp_path), dtype="fp32"),
                page_shape=SHAPE)
    x = kv_like(40)
    s.put(np.arange(40), x)
    assert sum(s.tier_of(i) == "disk" for i in range(40)) == 38
    assert s.stats()["tiers"]["disk"]["file_bytes"] >= 38 * pb
    mapped = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert str(tmp_path) not in mapped
    order = np.random.default_rng(0).permutation(40)
    torch.testing.assert_close(s.get(order), x[order], rtol=0, atol=0)
    s.close()
    assert not any(tmp_path.iterdir())  # the spill directory is removed on close


def test_wrapped_model_with_pages_on_disk_equals_pages_in_memory(tmp_path: Path):
    import memkit
    from memkit.testing.tiny_models import tiny_model

    cfg = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    ram = memkit.wrap(model, **cfg, kvstore={"dtype": "fp32"})
    with torch.no_grad():
        ref = ram(ids).logits
    memkit.unwrap(ram)
    disk = memkit.wrap(model, **cfg, kvstore={"dtype": "fp32", "device_bytes": 0, "host_bytes": 4096,
                                              "disk_dir": str(tmp_path)})
    with torch.no_grad():
        out = disk(ids).logits
    stats = disk.memory.stats()["kvstore"]["tiers"]
    assert stats["disk"]["pages"] > 20 and stats["host"]["pages"] <= 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
