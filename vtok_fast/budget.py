"""``vtok_fast.budget`` is ``vtok_fast.measure.budget``: the same module object, so
``import vtok_fast.budget`` and ``from vtok_fast.budget import ...`` work as documented."""
import sys

from vtok_fast.measure import budget as _module

sys.modules[__name__] = _module
