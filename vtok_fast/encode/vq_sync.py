"""Distributed training of a ``VectorQuantizer`` (``layer`` below): whether its statistics are synced
over torch.distributed ranks, and the one source of randomness of its codebook updates, rows drawn at
global positions by a generator every rank seeds alike (k-means init and dead-code samples), so all
ranks hold a bitwise-identical codebook.

The generator's state is the layer's ``rng_state`` buffer ``[seed, draws]`` (every rank takes rank
0's seed on first use) and its ``_rng_synced`` flag.
"""
from __future__ import annotations

import torch
from torch import nn

from vtok_fast.encode._vq_common import _all_reduce_, _world


def sync_active(layer: nn.Module) -> bool:
    """Whether ``layer``'s statistics are all-reduced: ``sync_codebook`` True, or None with a process
    group of more than one rank initialized. RuntimeError for ``sync_codebook=True`` without one."""
    if layer.sync_codebook is False:
        return False
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if layer.sync_codebook and not ready:
        raise RuntimeError("sync_codebook=True needs an initialized torch.distributed process group")
    return ready and torch.distributed.get_world_size() > 1


def generator(layer: nn.Module, sync: bool) -> torch.Generator:
    """A CPU generator seeded identically on every rank (with ``sync``: rank 0's seed, broadcast once),
    advanced once per use: each call counts one draw in ``layer.rng_state``."""
    if sync and not layer._rng_synced:
        state = layer.rng_state.clone()
        torch.distributed.broadcast(state, src=0)
        layer.rng_state.copy_(state)
        layer._rng_synced = True
    seed, draws = (int(v) for v in layer.rng_state.tolist())
    layer.rng_state[1] += 1
    return torch.Generator().manual_seed((seed + 7919 * draws) % (2**63))


def sample_rows(layer: nn.Module, rows: torch.Tensor, n: int, sync: bool) -> torch.Tensor | None:
    """``n`` fp32 rows drawn at global positions over all ranks' ``rows`` ``(r, d)`` (rank order),
    without replacement when there are enough; every rank gets the same bitwise result. ``None``, with
    the generator left as it was, when no rank has a row."""
    local = rows.shape[0]
    offset, total = 0, local
    if sync:
        rank, world = _world()
        sizes = torch.zeros(world, dtype=torch.int64, device=rows.device)
        sizes[rank] = local
        _all_reduce_(sizes)
        sizes = sizes.tolist()
        offset, total = sum(sizes[:rank]), sum(sizes)
    if total == 0:  # the same on every rank (an all-reduced size)
        return None
    gen = generator(layer, sync)
    if total >= n:
        pos = torch.randperm(total, generator=gen)[:n]
    else:
        pos = torch.randint(0, total, (n,), generator=gen)
    pos = pos.to(rows.device)
    if not sync:
        return rows[pos].float()
    out = torch.zeros(n, rows.shape[1], device=rows.device, dtype=torch.float32)
    mine = (pos >= offset) & (pos < offset + local)
    out[mine] = rows[pos[mine] - offset].float()
    return _all_reduce_(out)  # each row comes from exactly one rank: x + 0 == x
