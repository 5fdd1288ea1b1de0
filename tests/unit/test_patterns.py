"""No validating pattern in proxy/ ends in ``$``: Python's ``$`` also matches before a final newline.

``re.match(r"^[a-z]+$", "api\\n")`` matches, and msgspec searches with a field's ``pattern`` the
same way, so a rule written that way lets ``"api\\n"`` through.  Patterns end in ``\\Z`` or are
used with ``fullmatch``.  This reads the source, so a pattern written later is held to it too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "proxy"
_RE_CALLS = {"compile", "match", "search", "fullmatch"}


def _tail(node: ast.expr) -> str | None:
    """The literal text a pattern expression ends with (f-strings included), None when not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
        value = node.value
        return value.decode("latin-1") if isinstance(value, bytes) else value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _tail(node.values[-1])
    return None


def _patterns(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        candidates: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in _RE_CALLS and isinstance(func.value, ast.Name) \
                    and func.value.id == "re" and node.args:
                candidates.append(node.args[0])
            candidates += [kw.value for kw in node.keywords if kw.arg == "pattern"]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("PATTERN")
                                                  for t in node.targets):
            candidates.append(node.value)
        for candidate in candidates:
            text = _tail(candidate)
            if text is not None:
                found.append((candidate.lineno, text))
    return sorted(found)


def _ends_in_dollar(text: str) -> bool:
    stripped = text.rstrip("$")
    escapes = len(stripped) - len(stripped.rstrip("\\"))
    return text.endswith("$") and escapes % 2 == 0  # r"\$" is a literal dollar sign


def test_the_scan_sees_the_patterns_it_guards() -> None:
    tree = ast.parse('import re\nP = re.compile(r"^a+$")\nNAME_PATTERN = f"^{x}+$"\nT = M(pattern=r"^b\\$")\n')
    assert [(line, _ends_in_dollar(text)) for line, text in _patterns(tree)] == [(2, True), (3, True), (4, False)]


def test_no_pattern_in_proxy_ends_in_a_dollar_sign() -> None:
    offenders = [f"{path.relative_to(PROXY.parent)}:{line}: {text!r}"
                 for path in sorted(PROXY.rglob("*.py"))
                 for line, text in _patterns(ast.parse(path.read_text(), str(path)))
                 if _ends_in_dollar(text)]
    assert offenders == [], "use \\Z (or fullmatch) instead of $:\n" + "\n".join(offenders)
