"""``memkit eval styles``: end to end in a subprocess on a tiny model, and untrained LongMem vs window-only on
the real SmolLM2 (LongMem: Wang et al. 2023; MemLong: Liu et al. 2024)."""

from __future__ import annotations

import json

import pytest

from memkit.testing.cli import memkit_cli


def test_eval_styles_end_to_end(tiny, tmp_path, capsys):
    model, text, _cfg = tiny
    out = tmp_path / "res"
    r = memkit_cli("eval", "styles", "--model", str(model), "--text", str(text), "--start", "256", "--end", "512",
                   "--train-steps", "2", "--save-trained", str(tmp_path / "trained"), "--passkey-length", "512",
                   "--depths", "0.5", "--threads", "1", "--out-dir", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "styles.json").read_text())
    rows = {row["style"]: row for row in data["rows"]}
    assert list(rows) == ["window-only", "memlong", "longmem untrained", "longmem trained",
                          "longmem trained, memory off"]
    for name, row in rows.items():
        assert row["loss"] > 0 and row["ppl"] > 1
        if name.endswith("memory off"):
            assert row["top_k"] == 0 and row["passkey_accuracy"] is None
            continue
        assert len(row["passkey"]) == 1 and isinstance(row["passkey"][0]["correct"], bool)
        assert row["passkey_accuracy"] in (0.0, 1.0)
    assert rows["window-only"]["memory"] == "none" and rows["longmem trained"]["memory"] == "longmem"
    assert data["train"]["steps"] == 2 and data["longmem_untrained_minus_window"] <= 1e-3
    md = (out / "styles.md").read_text()
    assert "| longmem trained |" in md and "styles.png" in md
    assert (out / "styles.png").stat().st_size > 5000
    # the saved model is read back with --trained and scores the same loss (in-process: cli.main)
    from memkit.cli import main
    from memkit.testing.tiny_models import one_thread

    with one_thread():
        assert main(["eval", "styles", "--model", str(model), "--text", str(text), "--start", "256", "--end", "512",
                     "--trained", str(tmp_path / "trained"), "--passkey-length", "0", "--out-dir",
                     str(tmp_path / "res2"), "--no-progress"]) == 0
    again = {row["style"]: row for row in json.loads((tmp_path / "res2" / "styles.json").read_text())["rows"]}
    assert again["longmem trained"]["loss"] == pytest.approx(rows["longmem trained"]["loss"], abs=1e-5)
    assert again["longmem trained"]["passkey_accuracy"] is None
    assert main(["eval", "styles", "--model", str(model), "--trained", str(tmp_path)]) == 2
    assert "save_pretrained" in capsys.readouterr().err


@pytest.mark.slow
def test_untrained_longmem_is_not_worse_than_window_only_on_real_text():
    """The gate starts at sigmoid(-8): memory is read but silent, so LongMem equals window-only up to ~1e-4 nats
    on 384 scored tokens of a held-out play (SmolLM2-135M, window 128, memory filled from token 160 on)."""
    import torch

    import memkit
    from memkit.corpora import play_text
    from memkit.evaluation.styles import BASE, score_row, style_configs
    from memkit.models import load_smollm2
    from memkit.testing.tiny_models import one_thread

    model, tok = load_smollm2()
    ids = torch.tensor([tok(play_text("julius_caesar"), add_special_tokens=False)["input_ids"][:768]])
    cfgs = style_configs(memkit.MemoryConfig(**BASE, progress=False))
    losses = {}
    with one_thread(), torch.no_grad():
        for name in ("window-only", "longmem untrained"):
            wrapped = memkit.wrap(model, cfgs[name])
            losses[name] = score_row(name, wrapped, tok, ids, 384, log=lambda _m: None)["loss"]
            memkit.unwrap(wrapped)
    assert losses["longmem untrained"] <= losses["window-only"] + 1e-3
    assert abs(losses["longmem untrained"] - losses["window-only"]) < 5e-3


def test_styles_options_have_help():
    import argparse

    from memkit.cli import build_parser

    parser = build_parser()
    for name in ("eval", "styles"):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    opts = {o for a in parser._actions for o in a.option_strings}
    for opt in ("--model", "--text", "--start", "--end", "--trained", "--train-steps", "--passkey-length", "--depths",
                "--out-dir"):
        assert opt in opts
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
