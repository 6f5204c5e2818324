"""Static checks the project holds itself to: ruff everywhere, mypy --strict on the domain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", "."],
        ["mypy", "--strict", "postback_worker/domain"],
        ["mypy", "postback_worker"],
    ],
    ids=["ruff", "mypy-strict-domain", "mypy"],
)
def test_static_checks(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_domain_imports_no_infrastructure() -> None:
    banned = ("celery", "sqlalchemy", "requests", "redis", "urllib3", "kombu")
    for path in (ROOT / "postback_worker" / "domain").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in banned, f"{path.name}: {line}"


def test_only_the_store_touches_the_database() -> None:
    """Outside store/ no module uses the engine or imports SQLAlchemy (only its exception
    classes, `sqlalchemy.exc`, which the API, CLI and tasks map to errors): queries live in
    the store's aggregate modules. Function-local imports count too."""
    import ast

    problems = []
    for path in sorted((ROOT / "postback_worker").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("postback_worker/store/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Attribute) and node.attr == "engine":
                problems.append(f"{rel}:{node.lineno}: .engine")
                continue
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "sqlalchemy" and name != "sqlalchemy.exc":
                    problems.append(f"{rel}:{node.lineno}: import {name}")
    assert problems == []


def test_intake_leaves_sql_to_the_store() -> None:
    """Intake, the lifecycle steps and the producer reach the database through store/."""
    paths = [ROOT / "postback_worker" / "pipeline" / name
             for name in ("intake.py", "lifecycle.py", "processing.py")]
    for path in [*paths, ROOT / "postback_worker" / "producer.py"]:
        text = path.read_text()
        for line in text.splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] != "sqlalchemy", f"{path.name}: {line}"
        assert ".engine" not in text, path.name


def test_every_setting_is_in_the_example_env() -> None:
    from postback_worker.settings import Settings

    text = (ROOT / "config" / "example.env").read_text()
    missing = [k for k in Settings().to_env() if f"{k}=" not in text]
    assert missing == []


def _import_graph() -> dict[str, set[str]]:
    """Every import between postback_worker modules, function-local and TYPE_CHECKING ones too."""
    import ast

    package = ROOT / "postback_worker"
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif node.module in modules:
                        graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_import_graph()) == []


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("script", sorted(
    p.name for p in (ROOT / "bench").glob("*.py") if "argparse" in p.read_text()))
def test_every_benchmark_answers_help(script: str) -> None:
    """Each bench script with options imports and prints its usage from a plain checkout."""
    out = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:"), out.stdout[:500]
