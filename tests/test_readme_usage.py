"""The README's Usage block runs as a user pastes it (ViT-B/16 swapped for ViT-Ti/16, the same
code path at a fraction of the time), and the module paths the README names resolve."""
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _usage_block() -> str:
    text = README.read_text(encoding="utf-8")
    usage = text[text.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_usage_block_runs():
    code = _usage_block().replace('"vit_base_patch16_224"', '"vit_tiny_patch16_224"')
    assert "vit_tiny_patch16_224" in code
    exec(compile(code, "README.md (Usage)", "exec"), {})


def _resolves(name: str) -> bool:
    """``name`` is a module, or an attribute path from the longest importable module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                value = getattr(value, part)
        except AttributeError:
            return False
        return True
    return False


def test_dotted_names_in_the_readme_resolve():
    """Every ``vtok_fast.a.b`` path the README writes in backticks exists."""
    names = set(re.findall(r"`(vtok_fast(?:\.[A-Za-z_]\w*)+)", README.read_text(encoding="utf-8")))
    assert len(names) > 10
    assert [name for name in sorted(names) if not _resolves(name)] == []
