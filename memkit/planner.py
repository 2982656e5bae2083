"""Memory planner: will this model, at this context length, with this memkit config, fit the GPU?

``memkit.plan(model_config, context_tokens, gpu_bytes, config)`` and ``memkit plan`` print the
budget line by line: weights, local-window K/V, device-tier pages, host tier, disk tier, bank
vectors and activations at the block size, then whether the accelerator holds it. With
``config=None`` it plans full attention with a plain K/V cache, for comparison.

The arithmetic is exact for the tensors memkit allocates (K/V per token =
layers x 2 x kv_heads x head_dim x bytes) and a documented upper bound for activations
(the attention-score matrix of one block against its whole context is counted in full,
as an eager implementation would materialise it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memkit.config import MemoryConfig, load_config, resolve_layers
from memkit.errors import ConfigError, InvalidInputError
from memkit.units import human_bytes, parse_bytes, parse_length

__all__ = ["ModelShape", "Plan", "plan", "parse_bytes", "page_nbytes"]  # parse_bytes: re-exported from memkit.units

# interpreter + torch + transformers + tokenizers + faiss + MiniLM (468 MiB RSS before any K/V) plus the allocator's
# working set during a run: with 1GB the plan was 6-8% above the peak RSS of the 256k and 1M runs (benchmarks/RESULTS.md)
RUNTIME_CPU = "1GB"
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder config that decide its memory."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    max_positions: int | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        def pick(*names: str, default: Any = None) -> Any:
            for n in names:
                if cfg.get(n) is not None:
                    return cfg[n]
            return default

        hidden = pick("hidden_size", "n_embd", "d_model")
        layers = pick("num_hidden_layers", "n_layer", "num_layers")
        heads = pick("num_attention_heads", "n_head")
        vocab = pick("vocab_size")
        if cfg.get("text_config"):  # multimodal wrappers (Gemma3) keep the decoder here
            return cls.from_config({**cfg["text_config"], "vocab_size": vocab or cfg["text_config"].get("vocab_size")})
        missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                                  ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
        if missing:
            raise ConfigError(f"model config lacks {missing}; pass a decoder's config.json")
        kv_heads = pick("num_key_value_heads", default=heads)
        head_dim = pick("head_dim", default=hidden // heads)
        intermediate = pick("intermediate_size", "n_inner", default=4 * hidden)
        return cls(hidden=int(hidden), layers=int(layers), heads=int(heads), kv_heads=int(kv_heads),
                   head_dim=int(head_dim), intermediate=int(intermediate), vocab=int(vocab),
                   tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   max_positions=pick("max_position_embeddings", "n_positions"))

    @property
    def params(self) -> int:
        """Parameter count of a gated-MLP decoder (Llama family); a close bound for others."""
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embed + self.hidden

    def kv_bytes_per_token(self, layers: int, dtype_bytes: int) -> int:
        return layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


@dataclass
class Plan:
    """Result of :func:`plan`: byte lines per place, notes, and the problems that would stop the run.

    Places are ``device`` (the accelerator; on a CPU-only machine its lines count against host memory),
    ``host`` and ``disk``. :attr:`fits` is True only for a run that would start and finish: every place
    within its budget and no problem (such as pages beyond every tier, which the K/V store refuses).
    """

    context_tokens: int
    gpu_bytes: int | None  # None: no accelerator, the "device" lines live in host memory
    host_bytes: int | None = None  # None: host memory not checked
    runtime_bytes: int = 0  # the process itself (interpreter, libraries, retriever model), counted on the host
    disk_bytes: int | None = None  # None: disk not checked
    lines: list[tuple[str, str, int]] = field(default_factory=list)  # (place, what, bytes)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def total(self, place: str) -> int:
        return sum(b for p, _, b in self.lines if p == place)

    def host_total(self) -> int:
        """Host memory used: the host lines, plus the device lines when there is no accelerator."""
        return self.total("host") + (self.total("device") if self.gpu_bytes is None else 0)

    def over_budget(self) -> list[str]:
        out = []
        if self.gpu_bytes is not None and self.total("device") > self.gpu_bytes:
            out.append(f"the accelerator needs {human(self.total('device'))} of {human(self.gpu_bytes)}")
        if self.host_bytes is not None and self.host_total() > self.host_bytes:
            out.append(f"host memory needs {human(self.host_total())} of {human(self.host_bytes)}")
        if self.disk_bytes is not None and self.total("disk") > self.disk_bytes:
            out.append(f"disk needs {human(self.total('disk'))} of {human(self.disk_bytes)}")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems and not self.over_budget()

    def to_dict(self) -> dict[str, Any]:
        return {"context_tokens": self.context_tokens, "gpu_bytes": self.gpu_bytes, "host_budget": self.host_bytes,
                "disk_budget": self.disk_bytes, "fits": self.fits, "device_bytes": self.total("device"),
                "host_bytes": self.host_total(), "disk_bytes": self.total("disk"),
                "lines": [{"place": p, "what": w, "bytes": b} for p, w, b in self.lines], "notes": self.notes,
                "problems": self.problems + self.over_budget()}

    def __str__(self) -> str:
        rows = [f"{'place':<7} {'what':<66} {'bytes':>12}"]
        rows += [f"{p:<7} {w:<66} {human(b):>12}" for p, w, b in self.lines]
        if self.gpu_bytes is not None:
            rows.append(f"{'device':<7} {'TOTAL on the accelerator':<66} {human(self.total('device')):>12}")
        if self.host_total() or self.gpu_bytes is None:
            rows.append(f"{'host':<7} {'TOTAL in host memory':<66} {human(self.host_total()):>12}")
        if self.total("disk"):
            rows.append(f"{'disk':<7} {'TOTAL on disk':<66} {human(self.total('disk')):>12}")
        budgets = [f"{human(b)} {name}" for name, b in (("accelerator", self.gpu_bytes), ("host", self.host_bytes),
                                                         ("disk", self.disk_bytes)) if b is not None]
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        rows.append(f"=> {verdict} in {' + '.join(budgets) or 'unchecked budgets'} at {self.context_tokens:,} tokens")
        rows += [f"   problem: {p}" for p in self.problems + self.over_budget()]
        rows += [f"   note: {n}" for n in self.notes]
        return "\n".join(rows)


def human(n: float) -> str:
    return human_bytes(n)


def read_model_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no model config at {str(source)!r}; pass a model folder or its config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def plan(model_config: str | Path | dict[str, Any], context_tokens: int, gpu_bytes: int | str | None = "24GB",
         config: MemoryConfig | str | Path | dict[str, Any] | None = None, *, weight_dtype: str = "fp16",
         batch: int = 1, host_bytes: int | str | None = None, disk_bytes: int | str | None = None,
         runtime_bytes: int | str = 0) -> Plan:
    """Budget of ``context_tokens`` through a model; ``config=None`` plans full attention + plain cache.

    ``gpu_bytes=None`` plans a machine without an accelerator (everything but the disk tier in host memory);
    ``host_bytes`` / ``disk_bytes`` (e.g. "24GB") are checked when given; ``runtime_bytes`` adds the process's own
    memory (interpreter, torch, tokenizers, the retriever model) to the host.
    """
    shape = ModelShape.from_config(read_model_config(model_config))
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens <= 0:
        raise ConfigError(f"context_tokens must be a positive integer, got {context_tokens!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ConfigError(f"batch must be a positive integer (rows, each with its own memory), got {batch!r}")
    if weight_dtype not in DTYPE_BYTES:
        raise ConfigError(f"weight_dtype must be one of {sorted(DTYPE_BYTES)}")
    wb = DTYPE_BYTES[weight_dtype]
    out = Plan(context_tokens=context_tokens, gpu_bytes=None if gpu_bytes is None else parse_bytes(gpu_bytes),
               host_bytes=None if host_bytes is None else parse_bytes(host_bytes),
               disk_bytes=None if disk_bytes is None else parse_bytes(disk_bytes),
               runtime_bytes=parse_bytes(runtime_bytes) if runtime_bytes else 0)
    out.lines.append(("device", f"weights ({shape.params / 1e9:.2f}B params, {weight_dtype})", shape.params * wb))
    if config is None:
        _plan_full(out, shape, context_tokens, wb, batch)
    else:
        cfg = config if isinstance(config, MemoryConfig) else load_config(config)
        _plan_memkit(out, shape, context_tokens, wb, batch, cfg)
    return out


def page_nbytes(page_shape: tuple[int, ...], dtype: str, int8_scale: str = "channel") -> int:
    """Bytes of one stored K/V page (L, 2, H, C, D) as memkit.pages.PageCodec lays it out: the data in the storage
    dtype padded to 16 bytes, then (int8) float32 scales per channel or per page, padded to 16."""
    numel = math.prod(page_shape)
    data = -(-numel * DTYPE_BYTES[dtype] // 16) * 16
    if dtype != "int8":
        return data
    scales = 4 * (math.prod(page_shape[:-2]) * page_shape[-1] if int8_scale == "channel" else 1)
    return data + -(-scales // 16) * 16


def _activations(shape: ModelShape, block: int, ctx: int, wb: int, batch: int) -> int:
    hidden = batch * block * (4 * shape.hidden + 2 * shape.intermediate) * wb  # residual, q/k/v/o, MLP
    scores = batch * shape.heads * block * ctx * 4  # fp32 attention scores of one layer, upper bound
    logits = batch * block * shape.vocab * 4  # loss path; generate needs only the last row
    return hidden + scores + logits


def _plan_full(out: Plan, shape: ModelShape, ctx: int, wb: int, batch: int) -> None:
    kv = batch * ctx * shape.kv_bytes_per_token(shape.layers, wb)
    out.lines.append(("device", f"K/V cache, all {shape.layers} layers x {ctx:,} tokens", kv))
    block = min(ctx, 2048)
    out.lines.append(("device", f"activations, prefill in blocks of {block} vs {ctx:,} keys", _activations(shape, block, ctx, wb, batch)))
    out.notes.append("full attention with a plain cache keeps every layer's K/V for every token on the device")
    if shape.max_positions and ctx > shape.max_positions:
        out.notes.append(f"the model was trained on {shape.max_positions:,} positions: quality collapses beyond")


def _plan_memkit(out: Plan, shape: ModelShape, ctx: int, wb: int, batch: int, cfg: MemoryConfig) -> None:
    block = cfg.style_block()
    stored = getattr(block, "memory_layers", None)  # MemLong: its memory layers; LongMem: one layer
    mem_layers = (resolve_layers(stored, shape.layers) if stored is not None else [0]) if cfg.top_k else []
    local = cfg.sink_tokens + cfg.window + cfg.block_size
    out.lines.append(("device", f"local K/V: {cfg.sink_tokens} sinks + {cfg.window} window + {cfg.block_size} block, "
                                f"{shape.layers} layers", batch * local * shape.kv_bytes_per_token(shape.layers, wb)))
    retrieved = cfg.top_k * cfg.chunk_size
    if mem_layers:
        working = batch * 2 * retrieved * shape.kv_bytes_per_token(len(mem_layers), wb)  # current + prefetched
        out.lines.append(("device", f"retrieved memory K/V: {cfg.top_k} x {cfg.chunk_size} tokens, {len(mem_layers)} "
                                    "layers, double-buffered", working))
    # With flush_window every token read ends up in memory; otherwise the last window stays out of it.
    held = ctx if cfg.flush_window else max(0, ctx - local)
    stored_tokens = held if cfg.capacity_tokens is None else min(cfg.capacity_tokens, held)
    chunks = math.ceil(stored_tokens / cfg.chunk_size) * batch
    pb = page_nbytes((len(mem_layers), 2, shape.kv_heads, cfg.chunk_size, shape.head_dim), cfg.kvstore.dtype,
                     cfg.kvstore.int8_scale) if mem_layers else 0
    pages = chunks * pb
    dev_slots = cfg.kvstore.device_bytes // pb if pb else 0
    host_slots = cfg.kvstore.host_bytes // pb if pb else 0
    device_pages = min(chunks, dev_slots) * pb
    host_pages = min(chunks - min(chunks, dev_slots), host_slots) * pb
    disk_pages = pages - device_pages - host_pages
    out.lines.append(("device", f"device-tier pages (budget {human(cfg.kvstore.device_bytes)}, {cfg.kvstore.dtype}, "
                                f"{human(pb)} per {cfg.chunk_size}-token chunk)", device_pages))
    out.lines.append(("host", f"host-tier pages (budget {human(cfg.kvstore.host_bytes)}; {chunks:,} chunks x "
                              f"{len(mem_layers)} layers in all)", host_pages))
    if disk_pages:
        if cfg.kvstore.disk_dir is None:
            out.problems.append(f"pages need {human(pages)} but the device and host tiers hold "
                                f"{human(device_pages + host_pages)} and no disk tier is set: the K/V store would raise "
                                "CapacityError. Set kvstore.disk_dir (or raise kvstore.host_bytes)")
        elif disk_pages > cfg.kvstore.disk_bytes:
            out.problems.append(f"disk-tier pages need {human(disk_pages)} but kvstore.disk_bytes is "
                                f"{human(cfg.kvstore.disk_bytes)}: raise it")
        out.lines.append(("disk", "disk-tier pages (page files)", disk_pages))
    dim = cfg.bank.dim or 384
    out.lines.append(("host", f"bank vectors: {chunks:,} chunks x {dim}-d float32", chunks * dim * 4))
    # token ids kept per chunk (the reread stage, BM25 in the fusion stage): int64; the BM25 index holds ~2 terms per token
    # (the token and its pair with the next), each int64 with an int64 owner row
    out.lines.append(("host", f"token ids: {batch * ctx:,} tokens x 8 bytes, and the question's BM25 index (x 4)",
                      batch * ctx * 8 * 5))
    out.lines.append(("device", f"activations, block of {cfg.block_size} vs {local + retrieved:,} keys",
                      _activations(shape, cfg.block_size, local + retrieved, wb, batch)))
    if out.runtime_bytes:
        out.lines.append(("host", "Python, torch, tokenizers and the retriever model (--runtime-memory)",
                          out.runtime_bytes))
    out.notes.append(f"positions stay below {cfg.sink_tokens + retrieved + cfg.window + cfg.block_size:,} whatever the length")


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or config.json (only the config is read)")
    p.add_argument("--context", required=True, help="context length in tokens, e.g. 80000, 80k or 1M")
    p.add_argument("--gpu-memory", default="24GB",
                   help="accelerator memory with a unit, e.g. 24GB (default) or 80GB; 'none' for a CPU-only machine")
    p.add_argument("--host-memory", default=None, help="host RAM to check against, e.g. 24GB (default: not checked)")
    p.add_argument("--disk", default=None, help="disk space to check against, e.g. 200GB (default: not checked)")
    p.add_argument("--runtime-memory", default=None,
                   help="host memory of the process itself: Python, torch, tokenizers, the MiniLM retriever "
                        f"(default with --gpu-memory none: {RUNTIME_CPU}, measured here with SmolLM2; else 0)")
    p.add_argument("--config", default=None, help="memkit YAML/JSON config; default: MemoryConfig() defaults")
    p.add_argument("--full-attention", action="store_true", help="plan full attention with a plain K/V cache instead")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPE_BYTES), help="weight and local K/V dtype")
    p.add_argument("--batch", type=int, default=1, help="batch size >= 1 (rows each with their own memory)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this path")
    p.add_argument("--check", action="store_true",
                   help="kept for scripts: the exit status is 1 whenever the plan does not fit")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads, like every memkit command (planning itself computes nothing heavy)")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidInputError(f"--threads must be >= 1, got {args.threads}")
        torch = sys.modules.get("torch")  # planning needs no torch; a caller's imported torch gets the setting
        if torch is not None:
            torch.set_num_threads(args.threads)
    context = parse_length(args.context)
    gpu = None if str(args.gpu_memory).strip().lower() in ("none", "cpu") else args.gpu_memory
    if args.batch <= 0:
        raise InvalidInputError(f"--batch must be at least 1, got {args.batch}")
    cfg = None if args.full_attention else load_config(args.config)
    runtime = args.runtime_memory if args.runtime_memory is not None else (RUNTIME_CPU if gpu is None else 0)
    result = plan(args.model, context, gpu, cfg, weight_dtype=args.dtype, batch=args.batch,
                  host_bytes=args.host_memory, disk_bytes=args.disk, runtime_bytes=runtime)
    label = "full attention, plain cache" if args.full_attention else f"memkit {cfg.style if cfg else ''}"
    print(f"# {args.model} at {context:,} tokens ({label})")
    print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0 if result.fits else 1
