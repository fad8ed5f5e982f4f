"""The documented names of the measurement package: ``vtok_fast.measure.viz`` etc. as attributes
after ``import vtok_fast``, and ``vtok_fast.metrics`` / ``.budget`` / ``.viz`` as importable modules
that are the very same module objects as ``vtok_fast.measure.*``. The checks run in a fresh
interpreter, where nothing has imported the submodules yet."""
import subprocess
import sys
import textwrap

import pytest

SUBMODULES = ("viz", "metrics", "budget", "demo", "budget_cli")
ALIASES = {"metrics": "psnr", "budget": "count_tokens", "viz": "merge_map"}


def _python(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_measure_exposes_its_submodules_after_import_vtok_fast():
    """The README's ``vtok_fast.measure.viz.merge_map(...)`` after ``import vtok_fast``."""
    _python(f"""
        import sys, vtok_fast
        names = {SUBMODULES!r}
        assert not [n for n in names if "vtok_fast.measure." + n in sys.modules]
        assert callable(vtok_fast.measure.viz.merge_map)
        for name in names:
            assert getattr(vtok_fast.measure, name) is sys.modules["vtok_fast.measure." + name]
            assert name in dir(vtok_fast.measure)
        """)


def test_measure_has_no_other_attribute():
    import vtok_fast.measure

    with pytest.raises(AttributeError, match="module 'vtok_fast.measure' has no attribute 'nope'"):
        vtok_fast.measure.nope


def test_documented_modules_are_importable_and_the_same_objects():
    """``import vtok_fast.metrics`` and ``from vtok_fast.metrics import psnr`` (and budget, viz):
    the same module object whichever way it is reached first."""
    _python(f"""
        import importlib, sys
        for name, attribute in {ALIASES!r}.items():
            module = importlib.import_module("vtok_fast." + name)
            real = importlib.import_module("vtok_fast.measure." + name)
            import vtok_fast
            assert module is real is sys.modules["vtok_fast." + name] is getattr(vtok_fast, name), name
            assert getattr(module, attribute) is getattr(real, attribute)
        from vtok_fast.metrics import psnr
        from vtok_fast.budget import count_tokens
        from vtok_fast.viz import merge_map
        """)
    _python("""
        import vtok_fast
        first = vtok_fast.metrics  # attribute access first, the import statement after
        import vtok_fast.metrics
        from vtok_fast import budget
        import vtok_fast.budget
        assert vtok_fast.metrics is first and vtok_fast.budget is budget
        """)
