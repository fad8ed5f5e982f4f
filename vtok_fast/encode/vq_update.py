"""Codebook update of a ``VectorQuantizer`` (``layer`` below): k-means init, the EMA step and dead-code
expiry, all in place on the layer's buffers ``embed`` / ``embed_sum`` / ``cluster_size`` /
``initted`` / ``perplexity`` / ``usage``.

An EMA step has two halves so layers sharing one codebook can pool their statistics: ``track`` (the
statistics of one batch of rows: cluster sizes, vector sums, perplexity, usage), then, once,
``finish_step`` (the codes from those statistics, then dead-code replacement). A learnable codebook
(``ema_decay=None``) keeps cluster sizes only (they drive dead-code expiry); its codes come from the
optimizer. With ``sync`` the statistics are all-reduced and samples drawn at global positions
(``vq_sync``), so every rank updates alike; a rank with no rows still joins every all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtok_fast.encode._vq_common import _all_reduce_, _finite_rows
from vtok_fast.encode.vq_search import search
from vtok_fast.encode.vq_sync import sample_rows


def smoothed_cluster_size(layer: nn.Module) -> torch.Tensor:
    """``(books, K)`` cluster sizes with Laplace smoothing ``eps``, summing to the raw total."""
    cs = layer.cluster_size
    n = cs.sum(-1, keepdim=True)
    return (cs + layer.eps) / (n + layer.codebook_size * layer.eps) * n


def dead_codes(layer: nn.Module) -> torch.Tensor:
    """Bool ``(books, K)``: codes whose cluster size is below ``dead_code_threshold``."""
    return layer.cluster_size < layer.dead_code_threshold


def rows_to_learn(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(seen, finite)``: the rows of ``z`` ``(books, rows, d)`` the statistics may see, detached
    (those with no NaN or inf in any book), and the bool ``(rows,)`` mask that picks them (None: all;
    one host sync)."""
    z = z.detach()
    finite = _finite_rows(z)
    return (z if finite is None else z[:, finite]), finite


def cluster_stats(z: torch.Tensor, idx: torch.Tensor, codebook_size: int, sync: bool):
    """Per-code counts ``(books, K)`` and vector sums ``(books, K, d)`` of rows ``z`` ``(books, rows,
    d)`` with codes ``idx`` ``(books, rows)``, fp32, summed over ranks with ``sync``."""
    books, _, d = z.shape
    stats = torch.zeros(books, codebook_size, d + 1, device=z.device, dtype=torch.float32)
    for b in range(books):
        stats[b, :, :d].index_add_(0, idx[b], z[b].float())
        stats[b, :, d].index_add_(0, idx[b], torch.ones_like(idx[b], dtype=torch.float32))
    if sync:
        _all_reduce_(stats)
    return stats[..., d], stats[..., :d]


def kmeans_due(layer: nn.Module) -> bool:
    """Whether a step must k-means-initialize the codebook first (training, or eval with
    ``kmeans_init_in_eval``, and not initialized yet)."""
    return (layer.training or layer.kmeans_init_in_eval) and not bool(layer.initted)


@torch.no_grad()
def kmeans_init(layer: nn.Module, z: torch.Tensor, sync: bool) -> None:
    """Each book's codes by ``kmeans_iters`` Lloyd iterations on its rows ``z`` ``(books, rows, d)``,
    from ``codebook_size`` sampled rows; the cluster sizes (and EMA sums) from the last iteration,
    then ``initted``. Nothing changes (and no sample is drawn) when no rank has any rows."""
    for b in range(z.shape[0]):
        means = sample_rows(layer, z[b], layer.codebook_size, sync)
        if means is None:
            return
        counts = torch.zeros(layer.codebook_size, device=z.device)
        for _ in range(layer.kmeans_iters):
            idx = search(layer, z[b], means)
            counts, sums = cluster_stats(z[b:b + 1], idx[None], layer.codebook_size, sync)
            counts, sums = counts[0], sums[0]
            new = sums / counts.clamp_min(1.0)[:, None]
            if layer.metric == "cosine":
                new = F.normalize(new, dim=-1)
            means = torch.where(counts[:, None] > 0, new, means)
        layer.embed.data[b] = means
        layer.cluster_size[b] = counts
        if not layer.learnable_codebook:
            layer.embed_sum[b] = means * smoothed_cluster_size(layer)[b][:, None]
    layer.initted.fill_(True)


@torch.no_grad()
def track(layer: nn.Module, z: torch.Tensor, idx: torch.Tensor, sync: bool) -> bool:
    """The statistics half of an EMA step, from rows ``z`` ``(books, rows, d)`` with codes ``idx``:
    cluster sizes (``ema_decay``, or ``usage_decay`` for a learnable codebook), vector sums (EMA
    codebooks), ``perplexity`` and ``usage``. False, with nothing changed, when no rank has any
    rows."""
    counts, sums = cluster_stats(z, idx, layer.codebook_size, sync)  # a rank without rows joins too
    # A rank with rows knows the global batch is not empty; one without reads the global counts,
    # so every rank decides alike (and only those ranks wait for the host read).
    if z.shape[1] == 0 and not bool(counts.sum() > 0):
        return False
    decay = layer.usage_decay if layer.learnable_codebook else layer.ema_decay
    layer.cluster_size.lerp_(counts, 1.0 - decay)
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)
    layer.perplexity.copy_(entropy.exp().mean())
    layer.usage.copy_((counts > 0).float().mean())
    if not layer.learnable_codebook:
        layer.embed_sum.lerp_(sums, 1.0 - layer.ema_decay)
    return True


@torch.no_grad()
def refresh(layer: nn.Module) -> None:
    """The codes half of an EMA step: ``embed = embed_sum / smoothed cluster sizes`` (unit-normalized
    for cosine); nothing for a learnable codebook."""
    if layer.learnable_codebook:
        return
    codes = layer.embed_sum / smoothed_cluster_size(layer)[..., None]
    if layer.metric == "cosine":
        codes = F.normalize(codes, dim=-1)
    layer.embed.data.copy_(codes)


@torch.no_grad()
def expire_codes(layer: nn.Module, z: torch.Tensor, sync: bool) -> None:
    """Dead codes (cluster size below ``dead_code_threshold``; off at 0) become rows sampled from
    ``z`` ``(books, rows, d)``, with cluster size ``dead_code_threshold`` (and the matching EMA sums).
    Every rank sees the same dead codes, so every rank takes the same branches."""
    if layer.dead_code_threshold <= 0:
        return
    dead = dead_codes(layer)
    if not bool(dead.any()):
        return
    for b in range(dead.shape[0]):
        slots = dead[b].nonzero().squeeze(1)
        if slots.numel() == 0:
            continue
        samples = sample_rows(layer, z[b], slots.numel(), sync)
        if samples is None:
            return
        layer.embed.data[b, slots] = samples
        layer.cluster_size[b, slots] = layer.dead_code_threshold
        if not layer.learnable_codebook:
            layer.embed_sum[b, slots] = samples * layer.dead_code_threshold


def finish_step(layer: nn.Module, z: torch.Tensor, sync: bool) -> None:
    """After the ``track`` of a step (or of every layer sharing this codebook): new codes, then
    dead-code replacement from the rows ``z`` ``(books, rows, d)`` the statistics saw."""
    refresh(layer)
    expire_codes(layer, z, sync)
