"""The checkout's layout: nothing in it shadows an installed package, Hugging Face models build
from the checkout root, and the package's imports point one way (no cycles).

``python -m pytest`` (the README's command) and ``python -m vtok_fast`` put the checkout root first
on ``sys.path``, so a top-level folder holding Python code is importable under its own name and
wins over an installed distribution of that name (transformers 5.25 imports Hugging Face's
``kernels`` package at model construction; a top-level ``kernels/`` folder broke every model).
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vtok_fast"
# installed import name -> folder of the checkout that setup.py maps to it
MAPPED_FOLDERS = {f"{PACKAGE}.bench": ROOT / "bench"}


def _holds_python(folder: Path) -> bool:
    """A folder shadows an installed package of its name if it is a regular package; a namespace
    folder (Python files, no ``__init__``) still merges into one. A folder without Python source
    (data, docs) adds nothing importable."""
    return any(folder.glob("*.py"))


def _top_level_import_names(root: Path) -> set[str]:
    """Every name ``import NAME`` resolves inside ``root`` when ``root`` is on ``sys.path``."""
    names = set()
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier() and _holds_python(entry):
            names.add(entry.name)
    return names


def _own_distribution_names() -> set[str]:
    return {"vtok-fast", "vtok_fast"}


def test_no_checkout_folder_shadows_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()
    names = _top_level_import_names(ROOT)
    assert PACKAGE in names and "kernels" not in names, sorted(names)
    clashes = {name: sorted(set(provided[name]) - _own_distribution_names())
               for name in names if set(provided.get(name, ())) - _own_distribution_names()}
    assert not clashes, (f"top-level names of the checkout that other installed distributions also "
                         f"provide (python -m from the root would shadow them): {clashes}")


def test_device_code_is_vtok_fast_kernels_in_the_checkout_and_the_install():
    import vtok_fast.kernels

    assert Path(vtok_fast.kernels.__file__).resolve().parent == ROOT / PACKAGE / "kernels"


def test_hf_clip_vision_model_builds_from_the_checkout_root():
    """A user's ``python -c`` from the checkout root builds a Hugging Face model (transformers
    imports the ``kernels`` distribution while constructing one)."""
    code = (
        "import torch, transformers\n"
        "cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, image_size=32, patch_size=16)\n"
        "model = transformers.CLIPVisionModel(cfg).eval()\n"
        "import vtok_fast\n"
        "vtok_fast.patch.hf(model)\n"
        "out = model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state\n"
        "print(tuple(out.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 5, 32)"


# --- import graph ------------------------------------------------------------------------------

def _module_files() -> dict[str, Path]:
    """Installed module name -> source file, for the package and the folders mapped into it."""
    files = {}
    folders = {PACKAGE: ROOT / PACKAGE, **MAPPED_FOLDERS}
    for prefix, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (function bodies
    included, ``if TYPE_CHECKING:`` blocks excluded): ``from a.b import c`` names ``a.b.c`` when that
    is a module, else ``a.b``."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()

    def visit(node: ast.AST):
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
            target = ".".join(filter(None, [parent, node.module or ""]))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {module for module in found if module in modules and module != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def test_no_import_cycles():
    files = _module_files()
    graph = {name: _imports(name, path, set(files)) for name, path in files.items()}
    assert len(graph) > 50
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# The floors of the package, in the order an image travels; an import may point to its own floor
# or below, never up. Private root modules (``vtok_fast._checks`` ...) and the device code are the
# ground floor; the public root (``vtok_fast``, the CLI) is the top. ``measure.quality`` measures
# answers of models compressed by ``patch``, so it sits above it (the rest of ``measure`` below:
# ``patch`` reads ``measure.budget``).
FLOORS = ("kernels", "encode", "reduce", "project", "measure", ("patch", "compat"), "measure.quality", "bench")


def _floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return len(FLOORS)
    if len(parts) == 2 and parts[1].startswith("_"):
        return 0
    for depth in (2, 1):  # the longest name first: measure.quality before measure
        for floor, names in enumerate(FLOORS):
            if ".".join(parts[1:1 + depth]) in ((names,) if isinstance(names, str) else names):
                return floor
    return len(FLOORS)  # a public root module (an alias such as vtok_fast.metrics)


def test_imports_point_down_the_floors():
    files = _module_files()
    upward = sorted((name, target) for name, path in files.items()
                    for target in _imports(name, path, set(files)) if _floor(target) > _floor(name))
    assert upward == []


def test_every_smoke_entry_names_a_test():
    """The fast subset (``-m smoke``, listed in conftest.SMOKE) never silently shrinks by a rename."""
    from conftest import SMOKE

    for file, functions in SMOKE.items():
        tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert set(functions) <= defined, (file, sorted(set(functions) - defined))
