"""The config's source text: YAML (1.2 booleans, no duplicate keys) and ``${VAR}`` interpolation.

First step of ``load_config``: text in, plain Python data out, every problem a
``ConfigIssue``.  Environment variables are substituted inside the parsed
string values only, as Docker Compose does ("interpolation applies only to
YAML values, not to keys"): a variable's value can never add keys, end a
scalar early or be cut at a ``#``, whatever it contains.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from proxy.config.issues import ConfigIssue, join_path

__all__ = ["parse_document"]

# ${VAR}, ${VAR:-default}, and $${...} for a literal ${...} (as in Docker Compose).
_ENV_REF = re.compile(r"(\$?)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STR = "tag:yaml.org,2002:str"
# A plain scalar that was one whole ${...} takes the type its value spells (`${PORT:-8080}` is a
# number, `${TRACING:-false}` a boolean); only these scalar types, never a mapping or a list.
_SCALAR_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
                          "tag:yaml.org,2002:null", _STR})


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.1 traps removed.

    Only ``true``/``false`` are booleans (YAML 1.2): in YAML 1.1 a bare ``on``,
    ``off``, ``yes`` or ``no`` is a boolean too, which would turn the key
    ``fallback.on`` into ``True``.  And a key given twice in one mapping is an
    error instead of the last one silently winning.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Checked as written, before merge keys (`<<: *base`) are flattened in: a key that
        # overrides a merged one is the point of a merge, not a duplicate.
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)\Z"), list("tTfF"))


def parse_document(text: str, env: Mapping[str, str], issues: list[ConfigIssue]) -> Any:
    """The YAML document with ``${VAR}`` substituted in its string values; raises ``yaml.YAMLError``."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _interpolate(node, "", env, issues, loader, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _interpolate(node: yaml.Node, path: str, env: Mapping[str, str], issues: list[ConfigIssue],
                 loader: _StrictLoader, done: set[int]) -> None:
    if id(node) in done:  # an alias of a node already substituted (`*anchor`): once only
        return
    done.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:  # keys are never substituted
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            _interpolate(value_node, path if key == "<<" else join_path(path, str(key)), env, issues, loader, done)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _interpolate(item, f"{path}[{index}]", env, issues, loader, done)
    elif isinstance(node, yaml.ScalarNode) and node.tag == _STR and "${" in node.value:
        whole = _ENV_REF.fullmatch(node.value) is not None and not node.value.startswith("$$")
        node.value = _substitute(node.value, path, env, issues)
        if whole and node.style is None:  # plain, unquoted: typed as if written in place
            tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]
            node.tag = tag if tag in _SCALAR_TAGS else _STR


def _substitute(value: str, path: str, env: Mapping[str, str], issues: list[ConfigIssue]) -> str:
    """``${VAR:-default}`` takes the default when VAR is unset or empty, as the shell does;
    ``${VAR}`` takes VAR as it is, and an unset VAR with no default is an error;
    ``$${VAR}`` stands for the literal text ``${VAR}``."""

    def repl(match: re.Match[str]) -> str:
        escaped, name, default = match[1], match[2], match[3]
        if escaped:
            return match[0][1:]
        found = env.get(name)
        if default is not None:
            return found if found else default
        if found is not None:
            return found
        issues.append(ConfigIssue(path, f"environment variable {name} is not set (use ${{{name}:-default}})"))
        return ""

    return _ENV_REF.sub(repl, value)
