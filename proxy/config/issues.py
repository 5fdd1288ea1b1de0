"""Config problems: each a ``ConfigIssue`` with the exact path of the bad value; ``ConfigError`` lists them.

Shared by every step of loading (``source``, ``loader``), so that a single
run reports every problem with its path (``listeners[0].routes[1].retry``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue", "join_path", "path_key"]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The config is invalid; ``issues`` lists every problem with its path."""

    def __init__(self, issues: list[ConfigIssue], source: str = "<config>") -> None:
        self.issues = issues
        self.source = source
        super().__init__("\n".join(str(i) for i in issues))


def join_path(base: str, sub: str) -> str:
    if not sub:
        return base
    if not base:
        return sub
    return base + sub if sub.startswith("[") else f"{base}.{sub}"


def path_key(key: object) -> str:
    """A mapping key as a path shows it: as written, but with control characters escaped
    (``api\\n``), so that an issue about a key ending in a newline stays on one line."""
    text = str(key)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
