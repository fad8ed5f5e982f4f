"""``autotune``: ``triton.autotune`` that degrades to one fixed config under the interpreter and,
given a kernel's shared-memory estimate, prunes the configs that do not fit the launching device.

The interpreter cannot benchmark configs, so it gets ``configs[0]``. The full list stays on
the returned object as ``.all_configs`` so ahead-of-time compile tests can check every one.

Shared memory, one way for every kernel: a kernel file states what one program of a config
needs (``shared_memory=``: a function of the config, of the launch's arguments by name, such as a
tensor's element size or a ``BLOCK_D`` constexpr, and of the target's compute capability, since
Triton's pipeline buffers one more stage on sm_90 than on sm_80). At launch, before any config is
compiled, :func:`shared_memory_prune` keeps the configs that fit the device's opt-in shared
memory per block (``vtok_fast._launch``, read at call time), at least the smallest. A config
whose estimate fits but whose compiled kernel does not would still fail only its own benchmark
(Triton's ``OutOfResources``), never the launch; the AOT tests keep the estimates honest.
"""
from __future__ import annotations

import triton

from vtok_fast import _launch


def autotune(configs: list, key: list[str], *, shared_memory=None, **kwargs):
    """``triton.autotune(configs, key, **kwargs)``; ``shared_memory``: ``size_of(config, args,
    arch)`` bytes of one program (``args``: the launch's arguments by name), pruned as above."""
    if shared_memory is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": shared_memory_prune(shared_memory)}

    def decorate(fn):
        chosen = configs[:1] if _launch.interpreting() else configs
        tuned = triton.autotune(configs=chosen, key=key, **kwargs)(fn)
        tuned.all_configs = list(configs)
        return tuned

    return decorate


def fitting_configs(configs: list, size_of, limit: int) -> list:
    """The configs whose ``size_of(config)`` (bytes of shared memory) fits ``limit``; at least the
    smallest one, so a launch always has a config."""
    sized = [(size_of(c), c) for c in configs]
    return [c for size, c in sized if size <= limit] or [min(sized, key=lambda t: t[0])[1]]


def shared_memory_prune(size_of, limit: int | None = None, arch: int | None = None):
    """An ``early_config_prune``: the configs whose ``size_of(config, args, arch)`` fits ``limit``
    bytes. Default ``limit`` and ``arch`` (``10 * major + minor``): those of the device of the
    launch's tensors (unlimited off-GPU, where ``arch`` is 0); a fixed target (the AOT tests)
    passes both. Triton passes the positional arguments as ``named_args`` and the keyword ones as
    ``kwargs``; ``args`` holds both."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        budget, target = limit, arch
        if budget is None or target is None:
            device = next((v.device for v in args.values() if hasattr(v, "device")), None)
            if device is None:
                raise ValueError("shared_memory_prune: no tensor argument tells the device; "
                                 "pass limit and arch")
            budget = _launch.shared_memory_per_block(device) if budget is None else budget
            target = _launch.compute_capability(device) if target is None else target
        return fitting_configs(configs, lambda config: size_of(config, args, target), budget)

    return prune
