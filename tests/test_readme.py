"""The README says only what the code does: every python block runs as written, every command line in it parses,
its YAML loads as a memkit config, the `memkit plan` output it shows is what `memkit plan` prints, and the headline
table names a date, a commit, a command and a result for every row.

The python blocks continue each other (the README says so): they run in order in one namespace, in a temporary
directory, with one torch thread. Shell blocks are not run (they take minutes to hours); each `memkit ...` line is
parsed by memkit's own argparse parser, each `memkit-lm-eval ...` line by lm-evaluation-harness's, and each
`make X` names a Makefile target.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DISK_BANK = Path("/tmp/memkit-readme-bank")  # the absolute disk:/// path the MemoryBank block uses


def blocks(lang: str, text: str | None = None) -> list[str]:
    """The bodies of the README's fenced blocks in ``lang``, in order."""
    text = README.read_text() if text is None else text
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


def _block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    return blocks("python", text[start:])[0]


def command_lines(block: str) -> list[str]:
    """Shell lines of a bash block, continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def _run_blocks(codes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    monkeypatch.chdir(tmp_path)
    if DISK_BANK.exists():  # a leftover of an earlier run: the block creates a new bank there
        shutil.rmtree(DISK_BANK)
    scope: dict[str, object] = {"__name__": "readme"}
    try:
        for code in codes:
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        if DISK_BANK.exists():
            shutil.rmtree(DISK_BANK)
    return scope


def test_readme_is_a_user_guide_of_at_most_300_lines() -> None:
    assert len(README.read_text().splitlines()) <= 300


def test_memorybank_block_runs_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MemoryBank block needs nothing from the blocks before it (no model, no torch)."""
    scope = _run_blocks([_block_after("## Backends")], tmp_path, monkeypatch)
    assert len(scope["bank2"]) == 997 and (tmp_path / "mem" / "manifest.json").is_file()  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """All python blocks, in order, in one namespace: the wrap, a long prompt through generate and forward, a chat
    with memory saved and loaded, the MemoryBank. What they print is what the README promises."""
    import torch

    codes = blocks("python")
    assert len(codes) >= 4, "the README lost a python block"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope = _run_blocks(codes, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    hay = scope["hay"]
    assert f"- expected {hay.key}" in printed  # type: ignore[attr-defined]
    assert hay.key in printed.split("- expected")[0], printed  # type: ignore[attr-defined]  # the key was answered
    assert torch.isfinite(scope["loss"]).item() and 1.0 < scope["loss"].exp().item() < 1e4  # type: ignore[attr-defined]
    assert "Your locker code is 4729" in printed, printed  # the chat recalled the code after save and load
    assert (tmp_path / "chat-memory").is_dir() and (tmp_path / "mem").is_dir()
    assert len(scope["bank2"]) == 997  # type: ignore[arg-type]


def test_yaml_blocks_load_as_memkit_configs(tmp_path: Path) -> None:
    import memkit

    ymls = blocks("yaml")
    assert ymls
    for y in ymls:
        path = tmp_path / "memkit.yaml"
        path.write_text(y)
        cfg = memkit.load_config(path)
        assert cfg.to_dict()


def test_memkit_command_lines_parse() -> None:
    """Every `memkit ...` line of a bash block parses with memkit's own parser (nothing runs); every `make X` names
    a Makefile target."""
    from memkit.cli import build_parser

    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    seen = 0
    for block in blocks("bash"):
        for line in command_lines(block):
            argv = shlex.split(line, comments=True)
            if argv[0] == "memkit":
                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit as exc:  # argparse exits 2 on an unknown flag or a missing argument
                    raise AssertionError(f"README command does not parse: {line}") from exc
                seen += 1
            elif argv[0] == "make":
                assert set(argv[1:]) <= targets, f"README names a make target that does not exist: {line}"
            else:
                assert argv[0] == "memkit-lm-eval", f"a command line test_readme.py does not check: {line}"
    assert seen >= 8


def test_memkit_lm_eval_lines_parse() -> None:
    """`memkit-lm-eval` is lm-eval's own command line: its parser reads the README's lines, and the `memkit` model
    they name is registered."""
    pytest.importorskip("lm_eval")
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.api.registry import get_model

    import memkit.evaluation.lm_eval_model  # noqa: F401  (registers "memkit")

    lines = [ln for b in blocks("bash") for ln in command_lines(b) if ln.startswith("memkit-lm-eval")]
    assert lines
    for line in lines:
        args = HarnessCLI()._parser.parse_args(["run", *shlex.split(line, comments=True)[1:]])
        assert args.model == "memkit" and args.tasks
        assert get_model(args.model) is not None


def test_plan_output_is_what_memkit_plan_prints() -> None:
    """Each `$ memkit plan ...` of the text block: the lines shown under it are what the command prints, in order
    (`...` skips lines), and its exit status is 0 for FITS and 1 for DOES NOT FIT."""
    from memkit.cli import main

    text = next(b for b in blocks("text") if "$ memkit plan" in b)
    runs = re.split(r"^\$ ", text, flags=re.M)[1:]
    assert len(runs) == 3
    for run in runs:
        cmd, *shown = run.rstrip("\n").split("\n")
        shown = [s for s in shown if s.strip()]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(shlex.split(cmd)[1:])
        printed = buf.getvalue().rstrip("\n").split("\n")
        assert rc == (0 if "=> FITS" in run else 1), cmd
        if "..." not in shown:
            assert shown == printed, cmd
            continue
        it = iter(printed)
        for line in shown:
            if line != "...":
                assert any(p == line for p in it), f"{cmd}: {line!r} is not in its output, in order"


def test_headline_table_names_date_commit_command_and_result() -> None:
    """Every row of the Results table: a task, memkit's figure, the baseline, a date, a commit this repository
    has, a command and a link to the full result (which exists)."""
    text = README.read_text()
    section = text[text.index("## Results"):]
    section = section[: section.index("\n## ", 5)]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| task")]
    assert len(rows) >= 8
    git = shutil.which("git") and (ROOT / ".git").exists()
    previous = None
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 7, row
        task, mine, base, date, commit, command, link = cells
        assert task and mine and base, row
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", date), row
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), row
        if command == "the same":  # the command of the row above
            assert previous, row
            command = previous
        assert re.match(r"`(memkit|python|make) ", command), row
        previous = command
        if command.startswith("`memkit "):
            from memkit.cli import build_parser

            build_parser().parse_args(shlex.split(command.strip("`").split("` (")[0])[1:])
        target = re.search(r"\]\(([^)#]+)", link)
        assert target and (ROOT / target.group(1)).exists(), row
        if git:
            r = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
            assert r.returncode == 0, f"commit {commit} is not in this repository: {row}"
