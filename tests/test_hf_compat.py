"""The transformers/peft ranges memkit admits are the ranges it tests, at both ends."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from memkit.integrations.hf_compat import TESTED_PEFT, TESTED_TRANSFORMERS, library_version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_specs(name: str) -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    return set(re.findall(rf'"{name}([<>=!~][^"]*)"', text))


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1)


def test_pyproject_admits_exactly_the_tested_ranges() -> None:
    assert _pyproject_specs("transformers") == {TESTED_TRANSFORMERS}
    assert _pyproject_specs("peft") == {TESTED_PEFT}


def test_compat_run_uses_the_oldest_admitted_versions() -> None:
    assert TESTED_TRANSFORMERS.startswith(">=" + _makefile_var("TF_OLDEST") + ",")
    assert TESTED_PEFT.startswith(">=" + _makefile_var("PEFT_OLDEST") + ",")


def test_installed_versions_are_inside_the_range() -> None:
    from packaging.specifiers import SpecifierSet

    assert library_version("transformers") in SpecifierSet(TESTED_TRANSFORMERS)
    peft = library_version("peft")
    if peft is not None:
        assert peft in SpecifierSet(TESTED_PEFT)
    for var, name in (("MEMKIT_EXPECT_TRANSFORMERS", "transformers"), ("MEMKIT_EXPECT_PEFT", "peft")):
        if os.environ.get(var):  # set by `make test-compat`: prove the run really used the oldest version
            assert library_version(name) == os.environ[var]


def test_versions_outside_the_range_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    from memkit.integrations import hf_compat

    assert hf_compat.outside_range("transformers", TESTED_TRANSFORMERS) is None
    assert hf_compat.outside_range("transformers", ">=99") == library_version("transformers")
    monkeypatch.setattr(hf_compat, "TESTED_TRANSFORMERS", ">=99")
    with pytest.warns(UserWarning, match="transformers>=99"):
        hf_compat.check_versions()
