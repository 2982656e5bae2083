"""Hostile paths, URIs and byte budgets for property-based tests (hypothesis): what a careless or hostile user
types, built so nothing can reach outside a sandbox directory.

:mod:`memkit.testing.hostile` crafts damaged *saves*; this module crafts the *arguments* that name where memkit
reads and writes, and how much it may hold:

* :func:`paths` — a path as a user might type it: ``~``, ``~user``, ``$HOME``, ``${VAR}``, an unset variable,
  ``./``, ``../cwd/``, the sandbox's absolute path, then segments such as a user's file (``notes.txt``, so the path
  runs under a file), a user's non-empty directory (``project``), ``~`` and ``$`` in the middle, spaces, ``?`` and
  ``#``, non-ASCII. ``..`` appears only as one fixed prefix, so a path never leaves the sandbox.
* :func:`uris` — ``disk:``, ``qdrant:`` and ``milvus:`` URIs over those paths (``scheme:///<sandbox>/...``,
  ``scheme://~/...``, ``scheme://$VAR/...``), sometimes with a query or a fragment. Only local forms inside the
  sandbox: nothing tries to reach a server or the filesystem root.
* :func:`budgets` — K/V store budgets: zeros, one byte under or over a page, huge values, strings with and
  without units, wrong types.

:class:`Sandbox` lays out the directory (``home/`` as ``$HOME``, ``cwd/`` as the working directory, a user's
``notes.txt`` and ``project/``) and :meth:`Sandbox.check` asserts the invariants after each example: the user's
files are byte-identical, nothing was written beside them (a new subdirectory the path names is fine), and no
file or directory named ``~`` or with a ``$VARIABLE`` in its name was created anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

__all__ = ["Sandbox", "paths", "uris", "budgets", "UNSET", "VARIABLE"]

UNSET = "MEMKIT_HOSTILE_UNSET"  # never set: a path using it must be refused
VARIABLE = "MEMKIT_HOSTILE_DIR"  # set to the sandbox's data/ directory
_NAME_WITH_VARIABLE = re.compile(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")

PREFIXES = ("", "./", "../cwd/", "~", "~/", "$HOME/", "${HOME}/", f"${VARIABLE}/", f"${{{VARIABLE}}}/", f"${UNSET}/",
            "~memkit_no_such_user/", "{abs}/")
SEGMENTS = ("a", "mem", "notes.txt", "project", "~", "$", f"${UNSET}", "${}", "é", "a b", "x?y", "x#y", ".", "",
            "memkit-kv-x", "%20", "data", "b", "c")


class Sandbox:
    """A directory with ``home/`` (``$HOME``), ``cwd/`` (the working directory), ``data/`` (``$MEMKIT_HOSTILE_DIR``)
    and a user's ``notes.txt`` and ``project/`` that must never change."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        for name in ("home", "cwd", "data", "project"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / "notes.txt").write_text("the user's notes")
        (self.root / "project" / "main.py").write_text("print('mine')")
        self.user_files = self._user_files()

    def _user_files(self) -> dict[str, bytes]:
        return {rel: (self.root / rel).read_bytes() for rel in ("notes.txt", "project/main.py")}

    def resolve(self, text: str) -> str:
        return text.replace("{abs}", str(self.root))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """``$HOME``, ``$MEMKIT_HOSTILE_DIR`` and the working directory point into the sandbox."""
        saved = {k: os.environ.get(k) for k in ("HOME", VARIABLE, UNSET)}
        os.environ["HOME"] = str(self.root / "home")
        os.environ[VARIABLE] = str(self.root / "data")
        os.environ.pop(UNSET, None)
        cwd = os.getcwd()
        os.chdir(self.root / "cwd")
        try:
            yield
        finally:
            os.chdir(cwd)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def check(self) -> None:
        """The invariants every hostile path must leave intact."""
        assert self._user_files() == self.user_files, "a file of the user's was changed"
        beside = [p.name for p in (self.root / "project").iterdir() if p.name != "main.py" and not p.is_dir()]
        assert not beside, f"memkit wrote {beside} beside the user's files in project/ (a new subdirectory is fine)"
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                assert name != "~", f"{dirpath}/~ was created: a directory named ~ invites rm -rf ~"
                assert not _NAME_WITH_VARIABLE.search(name), f"{dirpath}/{name}: a variable taken literally"


def paths() -> st.SearchStrategy[str]:
    """A path string as typed by a user (``{abs}`` stands for the sandbox, see :meth:`Sandbox.resolve`)."""
    return st.builds(lambda prefix, parts, slash: prefix + "/".join(parts) + slash,
                     st.sampled_from(PREFIXES), st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3),
                     st.sampled_from(["", "/"]))


def uris(schemes: tuple[str, ...] = ("disk", "qdrant")) -> st.SearchStrategy[str]:
    """A local-store URI over :func:`paths`, sometimes with a query or fragment (never a server's address)."""
    segments = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map("/".join)
    # scheme:///sandbox/..., scheme://~/..., scheme://$VAR/... (scheme:///~/... is checked by parsing alone in
    # tests/test_paths.py: should its expansion ever break, it would name a directory at the filesystem root)
    local = st.one_of(st.builds(lambda p: "{abs}/" + p, segments),
                      st.builds(lambda p: p if p.startswith(("~", "$")) else "~/" + p, paths()))
    return st.builds(lambda scheme, where, tail: f"{scheme}://{where}{tail}", st.sampled_from(schemes), local,
                     st.sampled_from(["", "", "", "", "", "?x=1", "#frag", "?", "?path=/etc"]))


def budgets(page_bytes: int) -> st.SearchStrategy[dict[str, Any]]:
    """K/V store settings around one page of ``page_bytes``: each budget and ``disk_dir`` present or not."""
    size = st.one_of(st.sampled_from([0, 1, page_bytes - 1, page_bytes, page_bytes + 1, 3 * page_bytes, 2**62]),
                     st.integers(-3, 4 * page_bytes), st.sampled_from(["0", "1KB", "2GB", "lots", "-1", "", "1.5MB"]),
                     st.booleans(), st.floats(allow_nan=True), st.none())
    keys = {"device_bytes": size, "host_bytes": size, "disk_bytes": size,
            "disk_dir": st.one_of(st.none(), paths())}
    return st.fixed_dictionaries({}, optional=keys)  # type: ignore[arg-type]
