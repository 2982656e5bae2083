"""`memkit bench context` against the baselines a user runs: one-shot full attention (the plain model called once),
chunked prefill, and the wrapped model's forward path beside `memory.ingest`; ratios as the median and range of
per-repeat pairs."""

from __future__ import annotations

import json

import pytest

from memkit.bench.context import PAIRS, pair_ratios, setups_for, split_setup, summarize_run
from memkit.errors import InvalidInputError
from memkit.testing.cli import memkit_cli


def test_setups_for_modes_styles_and_paths() -> None:
    assert setups_for(["memkit", "window", "full"], ["memlong"]) == ["memkit", "window", "full"]
    assert setups_for(["memkit", "window", "full", "oneshot"], ["memlong"], ["ingest", "forward"]) == [
        "memkit", "memkit_forward", "window", "window_forward", "full", "oneshot"]
    assert setups_for(["memkit"], ["memlong", "longmem"], ["forward"]) == ["memkit_forward", "longmem_forward"]
    assert split_setup("memkit_forward") == ("memkit", "forward")
    assert split_setup("window") == ("window", "ingest")
    assert split_setup("oneshot") == ("oneshot", "")


def _run(mode: str, seconds: float, fresh: bool) -> dict:
    """A worker result reading 1,024 tokens in ``seconds`` (wall clock), in 4 blocks for a segment read."""
    blocks = [] if fresh else [{"end": 256 * (i + 1), "seconds": seconds / 4, "rss": 1} for i in range(4)]
    return {"mode": mode, "fresh": fresh, "blocks": blocks,
            "checkpoints": [{"length": 1024, "read_seconds": seconds, "peak_rss": 1, "load_avg": [1.0, 2.0]}]}


def test_pair_ratios_are_per_repeat_speed_ratios() -> None:
    runs = {"memkit_forward": [_run("memkit_forward", s, True) for s in (2.0, 2.0, 4.0)],
            "oneshot": [_run("oneshot", s, True) for s in (1.0, 4.0, 2.0)],
            "memkit": [_run("memkit", s, False) for s in (4.0, 4.0, 4.0)]}
    r = pair_ratios(runs, 1024)
    # tok/s ratio = time(b) / time(a): repeats give 0.5, 2.0, 0.5
    assert r["memkit_forward_over_oneshot"] == {"median": 0.5, "min": 0.5, "max": 2.0, "n": 3}
    assert r["memkit_forward_over_memkit"]["median"] == 2.0
    assert r["memkit_over_oneshot"]["median"] == 0.5
    assert set(r) == {f"{a}_over_{b}" for a, b in PAIRS if a in runs and b in runs}
    assert set(r) == {"memkit_over_oneshot", "memkit_forward_over_oneshot", "memkit_forward_over_memkit"}
    # a one-call read is timed by its wall clock; a segment read by the sum of its reads' wall clocks
    assert summarize_run(runs["oneshot"][0], [1024])[1024]["tps"] == 1024.0
    assert summarize_run(runs["memkit"][0], [1024])[1024]["tps"] == 256.0


@pytest.mark.parametrize(("argv", "message"), [
    (["--modes", "memkit,oneshots"], "unknown mode(s) ['oneshots']"),
    (["--paths", "ingest,backward"], "unknown path(s) ['backward']"),
    (["--paths", ","], "unknown path(s) []"),
])
def test_bad_modes_and_paths_exit_2_with_the_choices(argv: list[str], message: str, tmp_path) -> None:
    r = memkit_cli("bench", "context", *argv, "--lengths", "1k", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "choose from" in r.stderr


def test_parse_choices_names_the_flag() -> None:
    from memkit.evaluation.common import parse_choices

    assert parse_choices("--paths", " forward , ingest", ("ingest", "forward"), "path") == ["forward", "ingest"]
    with pytest.raises(InvalidInputError, match="--paths 'sideways'"):
        parse_choices("--paths", "sideways", ("ingest", "forward"), "path")


@pytest.mark.slow
def test_oneshot_and_forward_set_ups_on_a_tiny_model(tiny, tmp_path) -> None:
    """The wrapped model's forward path and the plain model called once, two repeats in alternating order: tok/s
    from one wall-clocked call, ratios with their range, the load average of every read."""
    model, _text, cfg = tiny
    out = tmp_path / "res"
    r = memkit_cli("bench", "context", "--model", str(model), "--config", str(cfg), "--lengths", "512",
                   "--modes", "memkit,oneshot", "--paths", "forward", "--repeats", "2", "--decode-tokens", "2",
                   "--threads", "1", "--no-progress", "--out-dir", str(out), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    order = [line.split(": ")[1].split(" over")[0] for line in r.stdout.splitlines() if "over 512 tokens" in line]
    assert order == ["memkit_forward", "oneshot", "oneshot", "memkit_forward"]  # repeat 2 runs in reverse
    data = json.loads((out / "context.json").read_text())
    row = data["rows"][0]
    assert data["setups"] == ["memkit_forward", "oneshot"] and data["repeats"] == 2
    assert row["tps_memkit_forward"] > 0 and row["tps_oneshot"] > 0 and row["decode_oneshot"] > 0
    lo, hi = row["memkit_forward_over_oneshot_range"]
    assert lo <= row["memkit_forward_over_oneshot"] <= hi
    for runs in data["runs"].values():
        for run in runs:
            cp = run["checkpoints"][0]
            assert run["fresh"] and cp["read_seconds"] > 0 and len(cp["load_avg"]) == 2
    assert data["runs"]["oneshot"][0]["checkpoints"][0]["kv_cache_bytes"] > 0  # the one call's cache, decoded from
    assert data["runs"]["memkit_forward"][0]["checkpoints"][0]["chunks"] > 0  # the forward call stored its chunks
    assert data["load_avg_range"] and "one-shot full attention" in (out / "context.md").read_text()
