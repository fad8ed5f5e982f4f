"""``vtok_fast.metrics`` is ``vtok_fast.measure.metrics``: the same module object, so
``import vtok_fast.metrics`` and ``from vtok_fast.metrics import ...`` work as documented."""
import sys

from vtok_fast.measure import metrics as _module

sys.modules[__name__] = _module
