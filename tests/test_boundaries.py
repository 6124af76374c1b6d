"""Import contracts: the package's dependency rules, checked on its source.

Every import statement counts: at module level and inside a function (a lazy import is still a dependency);
one under ``if TYPE_CHECKING:`` (for annotations only, it never runs) counts for the layer rules only. The rules:

- the offline stage never needs torch: ``histotx.sharding``, ``histotx.format``, ``histotx.tokens`` and
  ``histotx.vocab`` reach no torch import through any chain of HistoTx imports (type-level ones aside,
  they do not run), and importing every one of their modules leaves torch out of ``sys.modules``;
- ``histotx.model`` imports nothing from ``histotx.data``, ``histotx.ssl`` or ``histotx.train``, and
  ``histotx.ssl`` nothing from ``histotx.data`` (the batch types both sides use live in ``histotx.batch``);
- no import cycles between HistoTx modules (type-level imports aside: annotations may name a type of a
  module that imports this one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "histotx"
TORCH_FREE = ("histotx.sharding", "histotx.format", "histotx.tokens", "histotx.vocab")
FORBIDDEN = {
    "histotx.model": ("histotx.data", "histotx.ssl", "histotx.train"),
    "histotx.ssl": ("histotx.data",),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module, or for `from m import name` m.name when that is a module
    line: int
    typing_only: bool  # under `if TYPE_CHECKING:`


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _owner(name: str) -> str | None:
    """The HistoTx module that ``name`` (a module or a name in one) belongs to."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        else:
            continue
        out += [Import(module, t, node.lineno, id(node) in typing_only) for t in targets]
    return out


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ((prefixes,) if isinstance(prefixes, str) else prefixes))


def _runtime_edges(module: str) -> list[Import]:
    """What importing ``module`` may run: its own imports (type-level ones aside) and its packages'."""
    edges = [i for i in IMPORTS[module] if not i.typing_only]
    parent = module.rpartition(".")[0]
    if parent:
        edges.append(Import(module, parent, 0, False))
    return edges


def _chain_to(start: str, bad) -> list[Import] | None:
    """The first chain of runtime imports from ``start`` to a target for which ``bad(target)`` holds."""
    seen, stack = {start}, [(start, [])]
    while stack:
        module, path = stack.pop()
        for imp in _runtime_edges(module):
            if bad(imp.target):
                return path + [imp]
            nxt = _owner(imp.target)
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [imp]))
    return None


def _show(chain: list[Import]) -> str:
    return " → ".join(f"{i.source} (line {i.line}) imports {i.target}" for i in chain)


def test_the_source_is_parsed():
    """The checks below see the package: its modules and their imports (a rule over nothing passes)."""
    assert {"histotx.sharding.pipeline", "histotx.model.fused", "histotx.ssl.meta", "histotx.batch"} <= set(MODULES)
    assert any(i.target == "torch" for i in IMPORTS["histotx.model.fused"])
    assert _chain_to("histotx.train.loop", lambda t: _within(t, "torch")) is not None


@pytest.mark.parametrize("module", [m for m in MODULES if _within(m, TORCH_FREE)])
def test_the_offline_stage_reaches_no_torch(module):
    chain = _chain_to(module, lambda t: _within(t, ("torch", "torchvision", "deepspeed", "timm")))
    assert chain is None, f"{module} needs torch: {_show(chain)}"


def test_importing_the_offline_stage_loads_no_torch():
    """The same, as Python sees it: every module of the torch-free packages imported in a fresh process."""
    names = sorted(m for m in MODULES if _within(m, TORCH_FREE))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'deepspeed', 'timm'}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_nothing_above_them(layer):
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for m in MODULES
        if _within(m, layer)
        for i in IMPORTS[m]
        if _within(i.target, FORBIDDEN[layer])
    ]
    assert not bad, f"{layer} must not import {FORBIDDEN[layer]}: " + "; ".join(bad)
    for m in (m for m in MODULES if _within(m, layer)):  # nor through another module
        chain = _chain_to(m, lambda t: _within(t, FORBIDDEN[layer]))
        assert chain is None, _show(chain)


def _cycles() -> list[list[str]]:
    """Strongly connected groups of HistoTx modules over the imports that run (type-level ones aside)."""
    graph = {
        m: sorted({o for i in IMPORTS[m] if not i.typing_only and (o := _owner(i.target)) and o != m}) for m in MODULES
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

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
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                groups.append(sorted(group + [v]))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles():
    found = [
        "; ".join(
            f"{i.source}:{i.line} imports {i.target}"
            for m in g
            for i in IMPORTS[m]
            if not i.typing_only and _owner(i.target) in g
        )
        for g in _cycles()
    ]
    assert not found, "import cycles: " + " | ".join(found)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check can fail: a made-up import back from histotx.vocab to a module that imports it."""
    extra = Import("histotx.vocab", "histotx.sharding.pipeline", 1, False)
    monkeypatch.setitem(IMPORTS, "histotx.vocab", IMPORTS["histotx.vocab"] + [extra])
    assert any("histotx.vocab" in g and "histotx.sharding.pipeline" in g for g in _cycles())


HEAVY = ("torch", "torchvision", "deepspeed", "timm", "transformers", "pandas", "anndata", "scipy", "sklearn", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["synth", "--help"], ["train", "--help"], ["eval", "--help"]])
def test_the_cli_help_imports_nothing_heavy(argv):
    """``histotx --help`` (every subcommand's parser is built) stays light: the stages' heavy imports happen
    in their handlers. Checked on what Python imported (``-X importtime``), not on a clock."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "histotx.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage: histotx" in run.stdout
    imported = {line.rpartition("|")[2].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert {"histotx.synth.cli", "histotx.train.cli"} <= imported  # the trace is there: every parser was built
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, f"`histotx {' '.join(argv)}` imports {heavy[:10]}"
