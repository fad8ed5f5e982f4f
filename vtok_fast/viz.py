"""``vtok_fast.viz`` is ``vtok_fast.measure.viz``: the same module object, so
``import vtok_fast.viz`` and ``from vtok_fast.viz import ...`` work as documented."""
import sys

from vtok_fast.measure import viz as _module

sys.modules[__name__] = _module
