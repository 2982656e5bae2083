"""memkit.plan: byte arithmetic checked against real tensors, the README's OpenLLaMA-3B verdicts, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import memkit
from memkit.config import MemoryConfig
from memkit.errors import ConfigError
from memkit.planner import ModelShape, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
OPENLLAMA = ROOT / "examples" / "configs" / "openllama-3b.json"


def test_param_count_matches_a_real_llama() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(cfg.to_dict()).params == real


def test_kv_bytes_match_a_real_cache() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 100, (1, 37)), use_cache=True)
    cache = out.past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert ModelShape.from_config(cfg.to_dict()).kv_bytes_per_token(2, 4) * 37 == real


def test_openllama_3b_at_80k_fits_with_memkit_not_with_full_attention() -> None:
    with_memkit = memkit.plan(OPENLLAMA, 80_000, "24GB", MemoryConfig(kvstore={"disk_dir": "/data/pages"}))
    full = memkit.plan(OPENLLAMA, 80_000, "24GB", None)
    assert with_memkit.fits and not full.fits
    assert 3.3e9 < ModelShape.from_config(json.loads(OPENLLAMA.read_text())).params < 3.6e9
    full_kv = next(b for _, w, b in full.lines if w.startswith("K/V cache"))
    assert full_kv == 80_000 * 26 * 2 * 32 * 100 * 2  # tokens x layers x K,V x heads x head_dim x fp16
    assert with_memkit.total("host") > 9 * 2**30  # the pages moved off the device live on the host
    assert "FITS" in str(with_memkit) and "DOES NOT FIT" in str(full)


def test_memkit_device_total_flat_in_context_length() -> None:
    small = memkit.plan(OPENLLAMA, 8_000, "24GB", MemoryConfig())
    big = memkit.plan(OPENLLAMA, 800_000, "24GB", MemoryConfig(kvstore={"disk_dir": "/tmp/x"}))
    assert big.total("device") == small.total("device") or big.total("device") - small.total("device") <= 2 << 30
    assert big.total("disk") > 0


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        memkit.plan({"hidden_size": 8}, 1000)
    for bad_context in (0, -5, 1.5, True):
        with pytest.raises(ConfigError):
            memkit.plan(OPENLLAMA, bad_context)
    for bad_batch in (0, -1, 1.0):
        with pytest.raises(ConfigError):
            memkit.plan(OPENLLAMA, 1000, batch=bad_batch)
    for bad_size in ("lots", "24", "0GB", -3, 0, True, "-1GB"):
        with pytest.raises(memkit.MemkitError):
            parse_bytes(bad_size)
    assert parse_bytes("24GB") == 24 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(7) == 7


def test_fits_only_when_the_run_would_start_and_finish() -> None:
    no_disk = memkit.plan(OPENLLAMA, 80_000, "24GB", MemoryConfig())
    assert not no_disk.fits and "CapacityError" in str(no_disk) and "DOES NOT FIT" in str(no_disk)
    small_disk = memkit.plan(OPENLLAMA, 80_000, "24GB", MemoryConfig(kvstore={"disk_dir": "/d", "disk_bytes": 1 << 30}))
    assert not small_disk.fits and "disk_bytes" in str(small_disk)
    cpu = memkit.plan(OPENLLAMA, 80_000, None, MemoryConfig(kvstore={"disk_dir": "/d"}), host_bytes="24GB")
    assert not cpu.fits and "host memory needs" in str(cpu)  # 18 GiB of tiers + 6.4 GiB weights > 24 GiB
    cpu_ok = memkit.plan(OPENLLAMA, 80_000, None, MemoryConfig(kvstore={"disk_dir": "/d", "host_bytes": 8 << 30}),
                         host_bytes="24GB", disk_bytes="100GB")
    assert cpu_ok.fits and cpu_ok.host_total() < 24 << 30 and cpu_ok.total("disk") > 0


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    cfg = tmp_path / "pages.yaml"
    cfg.write_text(f"kvstore: {{disk_dir: {tmp_path / 'pages'}}}\n")
    run = subprocess.run([sys.executable, "-m", "memkit.cli", "plan", "--model", str(OPENLLAMA), "--context", "80k",
                          "--config", str(cfg), "--json", str(out)], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "FITS" in run.stdout and "81,920 tokens" in run.stdout
    assert json.loads(out.read_text())["fits"] is True
    run = subprocess.run([sys.executable, "-m", "memkit.cli", "plan", "--model", str(OPENLLAMA), "--context", "80k"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1 and "DOES NOT FIT" in run.stdout and "disk_dir" in run.stdout
    for bad in (["--batch", "0"], ["--batch", "-1"], ["--gpu-memory", "24"], ["--context", "lots"]):
        run = subprocess.run([sys.executable, "-m", "memkit.cli", "plan", "--model", str(OPENLLAMA), "--context",
                              "80k", *bad], capture_output=True, text=True, check=False)
        assert run.returncode == 2 and run.stderr.startswith("memkit: error:"), (bad, run.stderr)
    run = subprocess.run([sys.executable, "-m", "memkit.cli", "plan", "--model", str(OPENLLAMA), "--context", "80000",
                          "--full-attention", "--check"], capture_output=True, text=True, check=False)
    assert run.returncode == 1 and "DOES NOT FIT" in run.stdout
    run = subprocess.run([sys.executable, "-m", "memkit.cli", "plan", "--model", str(tmp_path / "none"), "--context", "5"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "no model config" in run.stderr


def test_plan_takes_threads_like_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from memkit.cli import COMMANDS, main

    cfg = tmp_path / "pages.yaml"
    cfg.write_text(f"kvstore: {{disk_dir: {tmp_path / 'pages'}}}\n")
    assert main(["plan", "--model", str(OPENLLAMA), "--context", "80k", "--config", str(cfg), "--threads", "1"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert main(["plan", "--model", str(OPENLLAMA), "--context", "80k", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    for command, sub in COMMANDS:  # every command and subcommand of `memkit`
        with pytest.raises(SystemExit) as done:
            main([command, *([sub] if sub else []), "--help"])
        assert done.value.code == 0 and "--threads" in capsys.readouterr().out, (command, sub)


def test_page_bytes_match_the_codec() -> None:
    pytest.importorskip("torch")
    from memkit.pages import PageCodec
    from memkit.planner import page_nbytes

    for shape in [(30, 2, 3, 128, 64), (1, 2, 2, 4, 16), (7, 2, 5, 33, 48)]:
        for dtype in ("fp32", "fp16", "bf16", "int8"):
            for scale in ("channel", "page"):
                assert page_nbytes(shape, dtype, scale) == PageCodec(shape, dtype, scale).page_bytes


def test_cpu_plan_counts_every_byte_on_the_host() -> None:
    smol = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
            "max_position_embeddings": 8192}
    cfg = MemoryConfig.from_dict({"kvstore": {"device_bytes": "512MB", "host_bytes": "1GB", "disk_dir": "/d"}})
    p = memkit.plan(smol, 1 << 20, None, cfg, weight_dtype="fp32", host_bytes="24GB", runtime_bytes="1GB")
    assert p.fits and p.gpu_bytes is None
    assert p.total("disk") > 20 * 2**30  # 1M tokens x 30 layers of fp16 pages: ~22 GiB, all but 1.5 GiB on disk
    assert 3 * 2**30 < p.host_total() < 4 * 2**30  # weights 0.5 + tiers 1.5 + runtime 1 + activations, vectors
