"""The Hugging Face export's code, generated from HistoTx's own model source (one source of truth).

``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` must work where HistoTx is not installed, so
the folder carries the model's code. Rather than a second implementation that could drift from
:class:`~histotx.model.FusedViT`, the modules that define it are copied verbatim with two mechanical
rewrites, and the result is what the HF model runs:

- ``from histotx.<module> import ...`` → ``from .histotx_<name> import ...`` (the Hub copies relative
  imports along); only :data:`SOURCES` may be imported, anything else fails the export;
- an optional dependency imported inside a function (xformers) → ``importlib.import_module``, since
  transformers refuses remote code whose plain import statements name a package that is not installed.

From :mod:`histotx.tokens` (numpy only, data side) and :mod:`histotx.batch` just the names the model and
the token helper need are taken. The hand-written HF wrapper (config, ``HistoTxModel``,
``pack_transcripts``) lives in ``hf_code/`` beside this module and is copied as is.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # histotx/
TEMPLATES = Path(__file__).resolve().parent / "hf_code"
TEMPLATE_FILES = ("configuration_histotx.py", "modeling_histotx.py")

SOURCES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    # HistoTx module: (file in the export, top-level names to take; None: the whole module)
    "histotx.batch": ("histotx_batch.py", ("TranscriptBatch",)),
    "histotx.model.attention": ("histotx_attention.py", None),
    "histotx.model.vit": ("histotx_vit.py", None),
    "histotx.model.transcripts": ("histotx_transcripts.py", None),
    "histotx.model.fused": ("histotx_fused.py", None),
    "histotx.tokens": ("histotx_tokens.py", ("NORMALISED_TOTAL", "TranscriptCells", "_normalise")),
}
ALWAYS_AVAILABLE = frozenset(sys.stdlib_module_names) | {"torch", "numpy", "transformers"}
"""Top-level packages the exported code may import with a plain statement (transformers needs them)."""


class RemoteCodeError(RuntimeError):
    pass


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RemoteCodeError(f"cannot locate the source of {module}")
    return Path(spec.origin)


def _statement_lines(node: ast.stmt) -> tuple[int, int]:
    """0-based first line (decorators included) and end line (exclusive) of a statement."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first - 1, node.end_lineno


def _rewrite_import(node: ast.ImportFrom | ast.Import, indent: str, where: str) -> str | None:
    """The replacement of one import statement, or None to keep it."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        top = node.module.split(".")[0]
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        if top == "histotx":
            if node.module not in SOURCES:
                raise RemoteCodeError(
                    f"{where}: imports {node.module}, which the export does not ship; add it to "
                    "histotx.export.remote_code.SOURCES"
                )
            return f"{indent}from .{SOURCES[node.module][0][:-3]} import {names}"
        if top not in ALWAYS_AVAILABLE:
            if indent == "":
                raise RemoteCodeError(f"{where}: a module-level import of the optional package {top}")
            return "\n".join(
                f'{indent}{a.asname or a.name} = importlib.import_module("{node.module}").{a.name}' for a in node.names
            )
    elif isinstance(node, ast.Import):
        bad = [
            a.name
            for a in node.names
            if a.name.split(".")[0] == "histotx" or a.name.split(".")[0] not in ALWAYS_AVAILABLE
        ]
        if bad:
            raise RemoteCodeError(f"{where}: 'import {', '.join(bad)}' cannot be shipped; use 'from ... import'")
    return None


def generate_module(module: str) -> str:
    """The exported text of one HistoTx module (see the module docstring)."""
    target, names = SOURCES[module]
    path = _source_path(module)
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    keep = list(tree.body) if names is None else _kept_nodes(tree, names, path)

    replace: dict[int, tuple[int, str]] = {}  # first line → (end line, new text)
    for node in (n for top in keep for n in ast.walk(top)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            indent = lines[node.lineno - 1][: node.col_offset]
            new = _rewrite_import(node, indent, f"{path.name}:{node.lineno}")
            if new is not None:
                replace[node.lineno - 1] = (node.end_lineno, new)

    def render(first: int, end: int) -> list[str]:
        out, i = [], first
        while i < end:
            if i in replace:
                stop, new = replace[i]
                out.extend(new.splitlines())
                i = stop
            else:
                out.append(lines[i])
                i += 1
        return out

    if names is None:
        body = render(0, len(lines))
    else:
        body = []
        for node, after in zip(keep, keep[1:] + [None], strict=True):
            body.extend(render(*_statement_lines(node)))
            simple = isinstance(node, (ast.Import, ast.ImportFrom)) and isinstance(after, (ast.Import, ast.ImportFrom))
            body.extend([] if simple else ["", ""] if isinstance(after, (ast.ClassDef, ast.FunctionDef)) else [""])
    if any("importlib.import_module" in new for _, new in replace.values()) and "import importlib" not in body:
        future = next((i for i, line in enumerate(body) if line.startswith("from __future__")), -1)
        body.insert(future + 1, "import importlib")
    header = [
        f"# Generated by `histotx export` from histotx/{path.relative_to(PACKAGE).as_posix()}; HistoTx's",
        "# source is the one definition of this model: edit it there, not here.",
    ]
    return "\n".join(header + body).rstrip() + "\n"


def _kept_nodes(tree: ast.Module, names: tuple[str, ...], path: Path) -> list[ast.stmt]:
    """The docstring, the imports (HistoTx's only of shipped modules) and the named definitions, in order."""
    defined = {name: node for node in tree.body for name in _defined_names(node)}
    missing = [n for n in names if n not in defined]
    if missing:
        raise RemoteCodeError(f"{path}: defines no {missing}")
    preamble = [  # a HistoTx import only of a module the export ships (it is rewritten to a relative one)
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and ((getattr(node, "module", None) or "").split(".")[0] != "histotx" or node.module in SOURCES)
    ]
    docstring = tree.body[:1] if isinstance(tree.body[0], ast.Expr) else []
    return docstring + preamble + sorted({defined[n] for n in names}, key=lambda n: n.lineno)


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def remote_code_files() -> dict[str, str]:
    """Every code file of the Hugging Face export: name → text."""
    files = {target: generate_module(module) for module, (target, _) in SOURCES.items()}
    for name in TEMPLATE_FILES:
        files[name] = (TEMPLATES / name).read_text()
    return files
