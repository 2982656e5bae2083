"""Draw docs/architecture.svg: the data flow of one long input through memkit (the README's and
docs/architecture.md's picture).

    python docs/architecture_figure.py                  # rewrites docs/architecture.svg
    python docs/architecture_figure.py --out /tmp/a.svg
    make docs                                            # the same

The SVG is deterministic for a given matplotlib (no date, fixed ids, text kept as text), so a regenerated file
differs from the committed one only when this script or matplotlib changed; ``tests/test_docs.py`` regenerates it
and checks that the committed picture shows the same boxes and labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path(__file__).resolve().parent / "architecture.svg"

# (key, x, y, width, height, title, detail lines, colour); coordinates in figure units (0-100 x 0-56)
BOXES = [
    ("input", 1, 38, 17, 13, "long input ids", ["any length (80k, 1M tokens)", "model(ids), generate(ids),",
                                                 "memory.ingest(text)"], "#eeeeee"),
    ("blocks", 22, 38, 19, 13, "blocks of block_size", ["256 tokens per forward;", "each block retrieves once,",
                                                         "from text before it"], "#eeeeee"),
    ("decoder", 45, 36, 28, 15, "HF decoder, unchanged", ["attention through transformers'",
                                                           "AttentionInterface \"memkit\":",
                                                           "[sinks | memory | window | block]", "under one causal mask"],
     "#dbe9f6"),
    ("out", 77, 38, 21, 13, "logits, loss, tokens", ["like the HF model: .logits,", ".loss block by block,",
                                                      "generate() of transformers"], "#eeeeee"),
    ("retriever", 2, 12, 19, 14, "retriever", ["text: MiniLM of the chunk", "keys: mean of a layer's keys",
                                               "question step: + BM25", "of the last tokens"], "#fdebd0"),
    ("bank", 24, 12, 20, 14, "MemoryBank", ["one vector per chunk", "faiss, hnswlib, usearch,",
                                            "disk, qdrant, milvus", "(a name or a URI)"], "#fdebd0"),
    ("kvstore", 48, 12, 23, 14, "K/V store", ["pages (layers, K/V, heads, 128, dim)", "device <-> host <-> disk",
                                              "byte budgets, fp16/bf16/int8", "prefetch of the next block"], "#fdebd0"),
    ("policy", 77, 12, 20, 14, "policy", ["recency_frequency, lru, fifo:", "what goes when", "capacity_tokens",
                                          "is reached"], "#fdebd0"),
]

# The box that holds the memory's parts: (x, y, width, height, label)
MANAGER = (0.5, 3, 98.5, 26.5, "MemoryManager (memkit/memory.py): one namespace per batch row or session; "
                               "reset(), save(dir), load(dir), stats(), trace()")

# (from (x, y), to (x, y), label, label (x, y))
ARROWS = [
    ((18.4, 44.5), (21.6, 44.5), "", None),
    ((41.4, 44.5), (44.6, 44.5), "", None),
    ((73.4, 44.5), (76.6, 44.5), "", None),
    ((28.0, 37.6), (14.0, 26.4), "1. query from text the\nblock may see (causal)", (1.5, 33.0)),
    ((21.4, 19.0), (23.6, 19.0), "", None),
    ((44.4, 19.0), (47.6, 19.0), "", None),
    ((54.0, 26.4), (54.0, 35.6), "2. top_k chunks' K/V,\nre-rotated to contiguous\npositions", (41.0, 31.2)),
    ((66.0, 35.6), (66.0, 26.4), "3. chunks leaving the window:\nK/V -> pages, embedding -> bank", (67.0, 32.0)),
    ((76.6, 19.0), (71.4, 19.0), "", None),
]
LABELS_AT = {"ids": (46.0, 19.6)}


def draw(out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    plt.rcParams.update({"svg.hashsalt": "memkit-architecture", "svg.fonttype": "none", "font.family": "DejaVu Sans"})
    fig = plt.figure(figsize=(12, 6.7))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 56)
    ax.axis("off")
    mx, my, mw, mh, mlabel = MANAGER
    ax.add_patch(FancyBboxPatch((mx, my), mw, mh, boxstyle="round,pad=0.2,rounding_size=1.5", linewidth=1.0,
                                linestyle="--", edgecolor="#888888", facecolor="#fafafa", gid="box-manager"))
    ax.text(mx + mw / 2, my + 3.6, mlabel, ha="center", va="center", fontsize=9.5)
    for key, x, y, w, h, title, lines, colour in BOXES:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=1.2", linewidth=1.2,
                                    edgecolor="#555555", facecolor=colour, gid=f"box-{key}"))
        ax.text(x + w / 2, y + h - 2.0, title, ha="center", va="center", fontsize=11, fontweight="bold")
        for i, line in enumerate(lines):
            ax.text(x + w / 2, y + h - 4.6 - 2.3 * i, line, ha="center", va="center", fontsize=8.6)
    for p, q, label, at in ARROWS:
        ax.annotate("", xy=q, xytext=p, arrowprops={"arrowstyle": "-|>", "color": "#333333", "lw": 1.4,
                                                    "shrinkA": 0, "shrinkB": 0})
        if label and at is not None:
            ax.text(*at, label, ha="left", va="center", fontsize=8.4, color="#1f4e79", style="italic")
    for label, at in LABELS_AT.items():
        ax.text(*at, label, ha="center", va="bottom", fontsize=8.4, color="#1f4e79", style="italic")
    ax.text(50, 54.6, "memkit: the data flow of one long input (integrations/ drives it, memkit/ keeps the memory)",
            ha="center", va="center", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="svg", metadata={"Date": None,
                                             "Creator": f"docs/architecture_figure.py, Matplotlib v{matplotlib.__version__}"})
    plt.close(fig)
    return out


def labels(svg_text: str) -> list[str]:
    """The text of every label in an SVG this script wrote (svg.fonttype none keeps it as <text>)."""
    import html
    import re

    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg_text)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"where the SVG goes (default: {OUT})")
    args = p.parse_args(argv)
    print(draw(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
