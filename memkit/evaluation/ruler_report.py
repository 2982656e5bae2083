"""The report of ``memkit eval ruler``: the score table, where the answers were, and the plot.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", 2024) scores each
task x length; memkit adds, per sample, where the gold answers were when the model started answering (window,
sinks, a retrieved chunk, split, missed: :data:`LOCATIONS`). This module renders the samples
(:func:`memkit.evaluation.ruler.evaluate_sample` records) as markdown tables and one PNG; it runs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memkit.evaluation.common import format_table

__all__ = ["LOCATIONS", "fmt_len", "score_table", "location_table", "plot"]

LOCATIONS = ("window", "sinks", "retrieved", "partial", "missed")


def _cells(results: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["task"], r["length"], r["mode"]), []).append(r)
    return cells


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def score_table(results: list[dict[str, Any]], summary: dict[str, Any], tasks: list[str], lengths: list[int],
                modes: list[str]) -> str:
    cols = [(m, n) for m in modes for n in lengths]
    rows = []
    for t in tasks:
        row: list[Any] = [t]
        for m, n in cols:
            s = summary.get(f"{t}|{n}|{m}")
            if s is None:
                row.append("—")
            elif s.get("skipped"):
                row.append("skip")
            else:
                row.append(f"{s['score']:.2f} ({s['samples']})")
        rows.append(row)
    return format_table(["task", *[f"{m} {fmt_len(n)}" for m, n in cols]], rows)


def _ordered(results: list[dict[str, Any]]) -> list[tuple[tuple[str, int, str], list[dict[str, Any]]]]:
    """Cells by task (in the order tasks first appear), then length, then mode (order of appearance)."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    return sorted(_cells(results).items(), key=lambda kv: (tasks.index(kv[0][0]), kv[0][1], modes.index(kv[0][2])))


def location_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for (t, n, m), recs in _ordered(results):
        recs = [r for r in recs if "locations" in r]
        if not recs:
            continue
        items = [it for r in recs for it in r["locations"]]
        counts = {k: sum(it["location"] == k for it in items) for k in (*LOCATIONS, "not found")}
        ranks = sorted(it["chunk_rank"] for it in items if "chunk_rank" in it and it["location"] != "window")
        visible = [r for r in recs if all(it["location"] in ("window", "sinks", "retrieved") for it in r["locations"])]
        hidden = [r for r in recs if r not in visible]

        def mean(rs: list[dict[str, Any]]) -> str:
            return f"{sum(r['score'] for r in rs) / len(rs):.2f} ({len(rs)})" if rs else "—"

        occ = sum(it["occurrences"] for it in items)
        vis = sum(it["visible_occurrences"] for it in items)
        rows.append([t, fmt_len(n), m, len(items), *[counts[k] for k in LOCATIONS], counts["not found"],
                     f"{vis}/{occ}", f"{ranks[len(ranks) // 2]}" if ranks else "—", mean(visible), mean(hidden)])
    return format_table(["task", "length", "mode", "answers", *LOCATIONS, "not found", "occurrences visible",
                         "median chunk rank", "score, all answers visible", "score, some not visible"], rows)


def plot(results: list[dict[str, Any]], summary: dict[str, Any], tasks: list[str], lengths: list[int],
         modes: list[str], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = [(m, n) for m in modes for n in lengths
              if any(f"{t}|{n}|{m}" in summary and not summary[f"{t}|{n}|{m}"].get("skipped") for t in tasks)]
    loc_cells = [(t, n, m) for (t, n, m), rs in _ordered(results) if any("locations" in r for r in rs)]
    wide = 7 + max(6.0, 0.45 * len(loc_cells)) if loc_cells else 7
    fig, axes = plt.subplots(1, 2 if loc_cells else 1, figsize=(wide, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [7, wide - 7]} if loc_cells else None)
    ax = axes[0][0]
    width = 0.8 / max(1, len(series))
    for i, (m, n) in enumerate(series):
        vals = [summary.get(f"{t}|{n}|{m}", {}).get("score") or 0.0 for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], vals, width, label=f"{m} {fmt_len(n)}")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("RULER score (share of gold strings in the answer)")
    ax.set_title("RULER score per task")
    ax.legend(fontsize=8)
    if loc_cells:
        ax2 = axes[0][1]
        bottoms = [0.0] * len(loc_cells)
        colors = {"window": "#4c72b0", "sinks": "#8172b3", "retrieved": "#55a868", "partial": "#dd8452",
                  "missed": "#c44e52"}
        for k in LOCATIONS:
            vals = []
            for t, n, m in loc_cells:
                items = [it for r in _cells(results)[(t, n, m)] for it in r.get("locations", [])]
                vals.append(sum(it["location"] == k for it in items) / max(1, len(items)))
            ax2.bar(range(len(loc_cells)), vals, bottom=bottoms, label=k, color=colors[k])
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax2.set_xticks(range(len(loc_cells)))
        ax2.set_xticklabels([f"{t} {m} {fmt_len(n)}" for t, n, m in loc_cells], rotation=45, ha="right", fontsize=7)
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("share of gold answers")
        ax2.set_title("where the answer was when the model answered")
        ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
