"""Shared pytest fixtures: real MiniLM vectors (cached), tiny models, seeds, a real Milvus server."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def real_vectors() -> np.ndarray:
    """20,200 MiniLM embeddings of distinct real paragraphs (first run embeds them, ~3 min on 2 cores)."""
    from memkit.testing.data import real_embeddings

    return real_embeddings(20_200)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with a tiny random Llama + a BPE tokenizer trained on Hamlet, text file, memkit config file)."""
    from memkit.testing.cli import TINY_CONFIG
    from memkit.testing.tiny_models import tiny_hf_folder

    root = tmp_path_factory.mktemp("tiny")
    folder, text = tiny_hf_folder(root)
    (root / "memkit.yaml").write_text(TINY_CONFIG)
    return folder, text, root / "memkit.yaml"


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone server (the ``milvus`` package, memkit.testing.milvus_server) for the whole
    session: free loopback ports, a temporary base directory, authorization on (``server.token``). It is
    stopped and its directory removed at the end, also when tests fail. A server that cannot start fails the
    tests that use it, with the tail of its logs: it is not skipped."""
    import gc
    import shutil

    from memkit.testing.milvus_server import MilvusServerProcess, ServerStartError

    server = MilvusServerProcess(base_dir=tmp_path_factory.mktemp("milvus-server"))
    try:
        server.start()
    except ServerStartError as exc:
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)
        pytest.fail(f"the Milvus server did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        gc.collect()  # banks nobody closed release their owner records now, while the server still answers
        server.stop(grace=5)  # its data is thrown away: a clean shutdown buys nothing
        shutil.rmtree(server.base_dir, ignore_errors=True)
