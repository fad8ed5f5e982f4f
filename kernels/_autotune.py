"""``autotune``: ``triton.autotune`` that degrades to one fixed config under the interpreter.

The interpreter cannot benchmark configs, so it gets ``configs[0]``. The full list stays on
the returned object as ``.all_configs`` so ahead-of-time compile tests can check every one.
"""
from __future__ import annotations

import triton

from vtok_fast._launch import interpreting


def autotune(configs: list, key: list[str], **kwargs):
    def decorate(fn):
        chosen = configs[:1] if interpreting() else configs
        tuned = triton.autotune(configs=chosen, key=key, **kwargs)(fn)
        tuned.all_configs = list(configs)
        return tuned

    return decorate
