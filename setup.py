"""Build hook: compile the request path with mypyc, when a C compiler is at hand.

Everything else about the package is in ``pyproject.toml``.  The modules in
``proxy/compiled.py``'s ``COMPILED`` are the per-request path (edge -> policies -> upstream).  mypyc
turns their type-annotated Python into C extension modules, which run the
same code with markedly less CPU per proxied request
(docs/benchmarks.md).  The source stays the only truth: the ``.py`` files are
what is read, reviewed, type-checked and tested, and a machine without a C
compiler (or ``OUTRIGGER_PURE_PYTHON=1``) installs and runs them as they are.

What mypyc asks of these modules (ARCHITECTURE.md, "Compiled modules"):
no async generators, no ``__slots__`` base shared with interpreted classes,
no subclass in an interpreted module, exceptions with a second built-in base
kept in interpreted modules (``proxy/upstream/failures.py``), and argument
types that hold at run time: compiled functions check them.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import pathlib
import runpy
import sys

from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))
# The one list, in proxy/compiled.py (read as a file: the package cannot be imported before it is built).
_COMPILED = runpy.run_path(os.path.join(_HERE, "proxy", "compiled.py"))
COMPILED = list(_COMPILED["COMPILED"])


def _remove_in_place_build() -> None:
    """An earlier in-place build's extension modules would shadow the sources: remove them."""
    here = pathlib.Path(_HERE)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    group = [p for p in here.glob("*__mypyc.*") if p.name.endswith(suffixes)]  # mypyc's shared library
    for built in [p for source in COMPILED for p in _COMPILED["in_place_build"](here, source)] + group:
        built.unlink()
    (here / _COMPILED["STAMP"]).unlink(missing_ok=True)


def _ext_modules() -> list[object]:
    if sys.argv[1:2] in (["egg_info"], ["dist_info"]):
        return []  # pip asking for metadata only: no need to type-check and generate C for it
    reason = _COMPILED["cannot_compile"]()
    if reason is not None:
        print(f"outrigger: installing pure Python, not compiling the request path: {reason}", file=sys.stderr)
        _remove_in_place_build()
        return []
    from mypyc.build import mypycify

    flags = [
        # The build environment holds only the build requirements, not the runtime libraries:
        # their types are Any here.  The project's own mypy run (strict, with them installed)
        # is the type check; this one only has to let mypyc compile, so it reports errors in
        # the compiled modules alone and not the ones strictness finds in an Any-typed world.
        "--ignore-missing-imports", "--follow-imports=silent", "--allow-subclassing-any",
        "--no-warn-return-any", "--no-warn-unused-ignores", "--allow-untyped-calls",
        # The same in every build: a fresh venv builds before its libraries are installed, while
        # a checkout's venv (or its .mypy_cache) has them, and mypyc compiled a class with library
        # bases differently in the two (it crashed only in the fresh build).  So never look.
        "--no-site-packages", f"--cache-dir={os.devnull}",
    ]
    extensions = list(mypycify([*flags, *COMPILED], opt_level="3"))
    # What was compiled, so that tests can tell when an in-place build has gone stale (proxy/compiled.py).
    with open(os.path.join(_HERE, _COMPILED["STAMP"]), "w") as stamp:
        json.dump(_COMPILED["source_digests"](pathlib.Path(_HERE)), stamp, indent=1, sort_keys=True)
    return extensions


setup(ext_modules=_ext_modules())
