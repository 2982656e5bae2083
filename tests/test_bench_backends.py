"""End-to-end check of ``memkit bench backends`` on a tiny real dataset: files written, fields sane.

Timings are not asserted (the machine is shared); only that every output exists and holds
plausible values: recall in [0, 1], exact backends at recall 1, positive sizes and ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")


def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    from memkit.cli import main

    out = tmp_path / "results"
    rc = main(["bench", "backends", "--quick", "--sizes", "2000", "--queries", "64", "--backends",
               "faiss-flat,faiss-hnsw,disk", "--seconds", "0.3", "--rounds", "30", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "backends.json").read_text())
    assert doc["name"] == "backends" and doc["machine"]["cores"] >= 1 and doc["machine"]["date"]
    assert "minilm" in doc["datasets"]
    rows = {r["backend"]: r for r in doc["rows"]}
    assert set(rows) == {"faiss-flat", "faiss-hnsw", "disk"}
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["dataset"] == "minilm" and r["n"] == 2000 and r["dim"] == 384
        assert 0.0 <= r["recall"] <= 1.0
        assert r["build_s"] > 0 and r["qps"] > 0 and r["add_vps"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["disk_bytes"] >= 2000 * 384 * 4  # at least the raw float32 vectors
        assert r["ratio_1"] > 0 and r["ratio_64"] > 0, name
    assert rows["faiss-flat"]["recall"] == 1.0 and rows["disk"]["recall"] == 1.0
    md = (out / "backends.md").read_text()
    assert "| data | n | backend |" in md and "faiss-hnsw" in md and "cores" in md
    for plot in ("recall_qps", "latency", "overhead"):
        png = out / f"backends_{plot}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impossible_sizes_are_reported_not_substituted_silently() -> None:
    from memkit.bench.backends import _plan_sizes
    from memkit.bench.vectors import minilm_available

    cap = minilm_available() - 100
    plan = _plan_sizes("minilm", [1_000, 1_000_000], 100)
    assert (1_000, None) in plan
    reasons = {n: r for n, r in plan}
    assert reasons[1_000_000] and "impossible" in reasons[1_000_000]
    assert all(n <= cap for n, r in plan if r is None)
    assert _plan_sizes("smollm2-keys", [1_000_000], 100) == [(1_000_000, None)]


def test_a_server_uri_is_benchmarked_without_its_password(tmp_path: Path, milvus_server,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--backends milvus://user:password@host:port/name`: one cell on the session's real Milvus server, labelled
    milvus-server, its collection dropped afterwards, and the password in no output file."""
    from pymilvus import MilvusClient

    from memkit.bench.backends import label, scrub_uri
    from memkit.cli import main

    assert label("milvus://u:p@h:1/c") == "milvus-server" and label("milvus") == "milvus"
    assert scrub_uri("milvus://u:p@h:1/c") == "milvus://***@h:1/c" and scrub_uri("faiss-flat") == "faiss-flat"
    user, password = milvus_server.token.split(":")  # root and Milvus's default password, on a server of our own
    admin = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    out = tmp_path / "results"
    uri = f"milvus://{user}:{password}@127.0.0.1:{milvus_server.port}/bench_cell"
    argv = ["bench", "backends", "--quick", "--sizes", "1000", "--queries", "64", "--backends", f"faiss-flat,{uri}",
            "--seconds", "0.2", "--rounds", "10", "--out", str(out), "--name", "srv"]
    monkeypatch.setattr(sys, "argv", ["memkit", *argv])  # the command line is recorded in the results
    rc = main(argv)
    assert rc == 0
    doc = json.loads((out / "srv.json").read_text())
    rows = {r["backend"]: r for r in doc["rows"]}
    assert set(rows) == {"faiss-flat", "milvus-server"}, rows
    r = rows["milvus-server"]
    assert r["status"] == "ok" and r["recall"] == 1.0 and r["flush_s"] is not None and r["ratio_64"] > 0, r
    for p in out.iterdir():
        text = p.read_bytes().decode("latin-1")
        assert f"{user}:{password}" not in text and f":{password}@" not in text, f"the password is in {p.name}"
    try:
        assert "bench_cell" not in admin.list_collections(), "the cell left its collection on the server"
    finally:
        admin.close()
