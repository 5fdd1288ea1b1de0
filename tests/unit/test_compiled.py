"""The compiled request path (setup.py, proxy/compiled.py): the list, the staleness check, and that tests run it."""

from __future__ import annotations

import importlib.machinery
import json
from pathlib import Path

import pytest

from proxy.compiled import COMPILED, STAMP, cannot_compile, running_compiled, source_digests, stale

REPO = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_every_listed_module_exists_once() -> None:
    for path in COMPILED:
        assert path.startswith("proxy/") and path.endswith(".py") and (REPO / path).is_file(), path
    assert len(set(COMPILED)) == len(COMPILED)


def _tree(tmp_path: Path) -> Path:
    for path in COMPILED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(f"# {path}\n")
    return tmp_path


def test_nothing_built_is_never_stale(tmp_path: Path) -> None:
    assert stale(_tree(tmp_path)) == []


def test_a_build_with_no_record_is_stale(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    built = root / COMPILED[0]
    built.with_name(built.stem + SUFFIX).write_bytes(b"")
    assert stale(root) == [COMPILED[0]]


def test_a_source_edited_after_the_build_is_stale_and_only_that_one(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    for path in COMPILED[:2]:
        (root / path).with_name(Path(path).stem + SUFFIX).write_bytes(b"")
    (root / STAMP).write_text(json.dumps(source_digests(root)))
    assert stale(root) == []
    (root / COMPILED[1]).write_text("# edited\n")
    assert stale(root) == [COMPILED[1]]


def test_the_suite_runs_the_compiled_request_path_where_it_can_be_built() -> None:
    # pip install (./dev test, .ci/run) compiles when it can (the same rule setup.py applies):
    # then the tests must exercise those extension modules, as the image runs them.
    import proxy.app  # noqa: F401  (imports the whole request path)

    if cannot_compile() is None:
        assert running_compiled() == len(COMPILED), "run ./dev test, which builds the compiled modules"
    else:
        assert running_compiled() == 0


def test_pure_python_is_chosen_by_the_environment_or_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIGGER_PURE_PYTHON", "1")
    assert cannot_compile() == "OUTRIGGER_PURE_PYTHON is set"
    monkeypatch.setenv("OUTRIGGER_PURE_PYTHON", "0")
    monkeypatch.setenv("CC", "no-such-compiler-here --flag")
    assert cannot_compile() == "no C compiler (no-such-compiler-here) on PATH"
