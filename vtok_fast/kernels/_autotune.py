"""``autotune``: ``triton.autotune`` that degrades to one fixed config under the interpreter;
``fitting_configs`` for the kernels' shared-memory ``early_config_prune``.

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


def fitting_configs(configs: list, size_of, limit: int) -> list:
    """The configs whose ``size_of(config)`` (bytes of shared memory) fits ``limit``; at least the
    smallest one, so a launch always has a config."""
    sized = [(size_of(c), c) for c in configs]
    return [c for size, c in sized if size <= limit] or [min(sized, key=lambda t: t[0])[1]]
