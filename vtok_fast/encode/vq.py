"""Vector quantization layers built on ``codebook_search``: ``VectorQuantizer`` and ``ResidualVQ``.

Conventions follow vector-quantize-pytorch (argument names, EMA with Laplace smoothing, commitment
loss, straight-through and rotation-trick gradients, k-means init, dead-code expiry), with:

- the search done by ``vtok_fast.codebook_search`` (no N x K matrix, no one-hot matrices: EMA
  statistics come from ``index_add``), in fp32 unless ``search_dtype`` says
  otherwise, also under autocast;
- the codes returned by a training step come from the codebook *before* that step's update;
- distributed training (torch.distributed): with ``sync_codebook`` (default: on when a process
  group of more than one rank is initialized) the EMA statistics are all-reduced, and k-means init
  and dead-code replacement pick their samples at global positions drawn from a generator every
  rank seeds identically, so all ranks hold a bitwise-identical codebook, equal (up to fp32
  summation order) to one process training on the concatenated batches.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vtok_fast._checks import FLOAT_DTYPES, check_tensor
from vtok_fast.codebook import MAX_K, METRICS, codebook_search

GRADIENTS = ("ste", "rotation")
MAX_BEAM = MAX_K  # beams extend by codebook_search(k=beam_size)
_NORM_EPS = 1e-6  # vector-quantize-pytorch's safe_div / l2norm eps in the rotation trick
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --- argument checks ---------------------------------------------------------------------------------

def _check_int(name: str, value, *, positive: bool = True, optional: bool = False) -> int | None:
    """``value`` as an int (> 0, or >= 0 with ``positive=False``; ``None`` too when ``optional``).
    A bool is not an int here."""
    want = ("a positive int" if positive else "a non-negative int") + (" or None" if optional else "")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {want}, got {value!r} of type {type(value).__name__}")
    if value < (1 if positive else 0):
        raise ValueError(f"{name} must be {want}, got {value}")
    return int(value)


def _check_number(name: str, value, *, open_low: bool = False, high: float | None = None,
                  optional: bool = False) -> float | None:
    """``value`` as a finite float in ``[0, high)`` (``(0, high)`` with ``open_low``; no upper bound
    when ``high`` is None); ``None`` too when ``optional``. A bool is not a number here."""
    want = f"a number in {'(' if open_low else '['}0, {'inf' if high is None else f'{high:g}'})"
    want += " or None" if optional else ""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {want}, got {value!r} of type {type(value).__name__}")
    v = float(value)
    if not (0.0 < v if open_low else 0.0 <= v) or not (math.isfinite(v) if high is None else v < high):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def _check_flag(name: str, value, *, optional: bool = False) -> bool | None:
    if not (isinstance(value, bool) or (optional and value is None)):
        want = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {want}, got {value!r} of type {type(value).__name__}")
    return value


def _check_input(x, dim: int, channel_last: bool) -> torch.Tensor:
    """``x`` in channel-last layout, after checking it is a float tensor with ``dim`` features."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if channel_last:
        if x.dim() < 1 or x.shape[-1] != dim:
            raise ValueError(f"x must have shape (..., dim) with dim = {dim}, got shape {tuple(x.shape)}")
        return x
    if x.dim() < 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (B, dim, ...) with dim = {dim} (channel_last=False), "
                         f"got shape {tuple(x.shape)}")
    return x.movedim(1, -1)


def _check_indices(indices, codebook_size: int, *, min_dim: int, last: int | None,
                   shape_doc: str) -> torch.Tensor:
    """``indices`` as int64, after checking its dtype, its shape (at least ``min_dim`` dims, the last
    of size ``last`` when given) and that every value is in ``[0, codebook_size)``."""
    check_tensor("indices", indices, dtypes=INDEX_DTYPES)
    want = f"indices must have shape {shape_doc} and values in [0, codebook_size) = [0, {codebook_size})"
    if indices.dim() < min_dim or (last is not None and indices.shape[-1] != last):
        raise ValueError(f"{want}, got shape {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(f"{want}, got values from {int(indices.min())} to {int(indices.max())} "
                         f"(shape {tuple(indices.shape)})")
    return indices.long()


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(a, b)``, but 0 for empty inputs (a sum over no terms, still in the autograd graph)
    where the mean would be NaN."""
    return F.mse_loss(a, b) if a.numel() else (a - b).square().sum()


# --- gradient estimators -----------------------------------------------------------------------------

def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q``, gradient of the identity w.r.t. ``z``."""
    return z + (q - z).detach()


def rotation_trick(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, sec. 4.2): value ``q``; the gradient reaching ``z`` is the
    upstream gradient rotated by the (detached) rotation taking ``z``'s direction to ``q``'s and
    scaled by ``|q| / |z|``.

    With ``u = z/|z|``, ``v = q/|q|``, ``w = (u + v)/|u + v|`` (all detached):
    ``out = (z - 2 (z.w) w + 2 (z.u) v) * |q| / |z|``.
    """
    z_norm = z.norm(dim=-1, keepdim=True)
    q_norm = q.norm(dim=-1, keepdim=True)
    u = (z / z_norm.clamp_min(_NORM_EPS)).detach()
    v = (q / q_norm.clamp_min(_NORM_EPS)).detach()
    w = F.normalize(u + v, dim=-1, eps=_NORM_EPS).detach()
    rotated = z - 2.0 * (z * w).sum(-1, keepdim=True) * w + 2.0 * (z * u).sum(-1, keepdim=True) * v
    return rotated * (q_norm / z_norm.clamp_min(_NORM_EPS)).detach()


# --- distributed helpers -----------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (``t`` must be contiguous: reducing a copy syncs nothing)."""
    if not t.is_contiguous():
        raise RuntimeError("all_reduce needs a contiguous tensor; reducing a temporary copy syncs nothing")
    dist.all_reduce(t)
    return t


# --- the layer -------------------------------------------------------------------------------------

class VectorQuantizer(nn.Module):
    """Vector quantizer: ``forward(x) -> (quantized, indices, loss)``.

    Args:
        dim: feature size of ``x``.
        codebook_size: number of codes K.
        codebook_dim: size of each code (default ``dim``); ``x`` is projected in/out by linear
            layers when ``heads * codebook_dim != dim``.
        metric: ``"l2"`` or ``"cosine"`` (inputs and codes l2-normalized).
        commitment_weight: weight of ``mse(sg[q], z)``.
        gradient: ``"ste"`` (straight-through) or ``"rotation"`` (rotation trick).
        ema_decay: EMA decay of the codebook statistics; ``None`` makes the codebook a learnable
            parameter trained by the codebook loss ``mse(q, sg[z])`` (added to ``loss``).
        eps: Laplace smoothing of the EMA cluster sizes (> 0).
        dead_code_threshold: codes whose EMA cluster size falls below this are replaced by random
            vectors of the current batch (0 disables).
        kmeans_init, kmeans_iters: initialize the codebook by k-means on the first training batch.
        heads, separate_codebook_per_head: split features into ``heads`` groups quantized
            independently (one shared codebook, or one per head).
        sync_codebook: synchronize statistics over torch.distributed ranks (``None``: when a
            process group of more than one rank is initialized).
        channel_last: ``x`` is ``(..., dim)``; ``False``: ``(B, dim, *spatial)``.
        search_dtype: dtype of the nearest-code search (default fp32; ``None``: the input's dtype).

    ``forward`` returns ``quantized`` (same shape and dtype as ``x``, gradients by the chosen
    estimator when ``x`` requires grad), int64 ``indices`` (``x``'s shape without the feature dim,
    plus a trailing ``heads`` dim when ``heads > 1``) and the scalar ``loss``. In training mode it
    also updates the EMA codebook, expires dead codes and refreshes ``perplexity`` / ``usage``.
    An empty batch gives a zero loss (still in the autograd graph) and, when no rank has any rows,
    changes no state at all (no EMA step, k-means init or sampler draw); a rank with no rows while
    others have some still joins every all-reduce.
    """

    def __init__(self, dim: int, codebook_size: int, *, codebook_dim: int | None = None,
                 metric: str = "l2", commitment_weight: float = 1.0, gradient: str = "ste",
                 ema_decay: float | None = 0.99, eps: float = 1e-5, dead_code_threshold: float = 0.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, heads: int = 1,
                 separate_codebook_per_head: bool = False, sync_codebook: bool | None = None,
                 channel_last: bool = True, search_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        if search_dtype is not None and search_dtype not in FLOAT_DTYPES:
            raise TypeError(f"search_dtype must be one of {FLOAT_DTYPES} or None, got {search_dtype!r}")
        self.dim = dim = _check_int("dim", dim)
        self.codebook_size = codebook_size = _check_int("codebook_size", codebook_size)
        self.codebook_dim = _check_int("codebook_dim", codebook_dim, optional=True) or dim
        self.heads = heads = _check_int("heads", heads)
        self.kmeans_iters = _check_int("kmeans_iters", kmeans_iters, positive=False)
        self.metric = metric
        self.gradient = gradient
        self.commitment_weight = _check_number("commitment_weight", commitment_weight)
        self.ema_decay = ema_decay = _check_number("ema_decay", ema_decay, high=1.0, optional=True)
        self.eps = _check_number("eps", eps, open_low=True)  # > 0: an unused code divides by it
        self.dead_code_threshold = _check_number("dead_code_threshold", dead_code_threshold)
        kmeans_init = _check_flag("kmeans_init", kmeans_init)
        self.separate_codebook_per_head = _check_flag("separate_codebook_per_head",
                                                      separate_codebook_per_head)
        self.sync_codebook = _check_flag("sync_codebook", sync_codebook, optional=True)
        self.channel_last = _check_flag("channel_last", channel_last)
        self.search_dtype = search_dtype

        inner = self.codebook_dim * heads
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()

        n_books = heads if separate_codebook_per_head else 1
        if kmeans_init:
            embed = torch.zeros(n_books, codebook_size, self.codebook_dim)
        else:
            embed = torch.empty(n_books, codebook_size, self.codebook_dim)
            nn.init.kaiming_uniform_(embed)
            if metric == "cosine":
                embed = F.normalize(embed, dim=-1)
        if ema_decay is None:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(n_books, codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("perplexity", torch.tensor(float("nan")), persistent=False)
        self.register_buffer("usage", torch.tensor(float("nan")), persistent=False)
        # (seed, draws) of the sampling generator; every rank uses rank 0's seed
        seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64))
        self._rng_synced = False

    # -- codebook access ------------------------------------------------------------------------
    @property
    def learnable_codebook(self) -> bool:
        return self.ema_decay is None

    @property
    def codebook(self) -> torch.Tensor:
        """``(K, codebook_dim)``, or ``(heads, K, codebook_dim)`` with separate codebooks."""
        return self.embed if self.separate_codebook_per_head else self.embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor):
        with torch.no_grad():
            self.embed.copy_(codes.reshape(self.embed.shape))
            if not self.learnable_codebook:
                self.embed_sum.copy_(self.embed * self._smoothed_cluster_size()[..., None])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` (as returned by ``forward``), before ``project_out``: channel-last
        ``(..., heads * codebook_dim)``, or ``(B, heads * codebook_dim, ...)`` when
        ``channel_last=False``. ``indices`` must be integers in ``[0, codebook_size)`` with a trailing
        ``heads`` dim when ``heads > 1`` (ValueError / TypeError otherwise)."""
        lead = "..." if self.channel_last else "B, ..."
        if self.heads > 1:
            shape_doc = f"({lead}, heads) with heads = {self.heads}"
        else:
            shape_doc = f"({lead})"
        indices = _check_indices(indices, self.codebook_size, shape_doc=shape_doc,
                                 min_dim=(self.heads > 1) + (not self.channel_last),
                                 last=self.heads if self.heads > 1 else None)
        if self.heads > 1 and self.separate_codebook_per_head:
            codes = torch.stack([self.embed[h][indices[..., h]] for h in range(self.heads)], dim=-2)
        else:
            codes = self.embed[0][indices]
        if self.heads > 1:
            codes = codes.flatten(-2)
        return codes if self.channel_last else codes.movedim(-1, 1)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.get_codes_from_indices(indices)
        if not self.channel_last:
            codes = codes.movedim(1, -1)
        out = self.project_out(codes)
        return out if self.channel_last else out.movedim(-1, 1)

    # -- statistics -----------------------------------------------------------------------------
    def _smoothed_cluster_size(self) -> torch.Tensor:
        cs = self.cluster_size
        n = cs.sum(-1, keepdim=True)
        return (cs + self.eps) / (n + self.codebook_size * self.eps) * n

    def dead_codes(self) -> torch.Tensor:
        """Bool ``(books, K)``: codes whose EMA cluster size is below ``dead_code_threshold``."""
        return self.cluster_size < self.dead_code_threshold

    # -- distributed and sampling -----------------------------------------------------------------
    def _sync_active(self) -> bool:
        if self.sync_codebook is False:
            return False
        ready = dist.is_available() and dist.is_initialized()
        if self.sync_codebook and not ready:
            raise RuntimeError("sync_codebook=True needs an initialized torch.distributed process group")
        return ready and dist.get_world_size() > 1

    def _generator(self, sync: bool) -> torch.Generator:
        """A CPU generator seeded identically on every rank, advanced once per use."""
        if sync and not self._rng_synced:
            state = self.rng_state.clone()
            dist.broadcast(state, src=0)
            self.rng_state.copy_(state)
            self._rng_synced = True
        seed, draws = (int(v) for v in self.rng_state.tolist())
        self.rng_state[1] += 1
        return torch.Generator().manual_seed((seed + 7919 * draws) % (2**63))

    def _sample_rows(self, rows: torch.Tensor, n: int, sync: bool) -> torch.Tensor:
        """``n`` rows drawn at global positions over all ranks' ``rows`` (rank order), without
        replacement when there are enough; every rank gets the same bitwise result. ``None``, with
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
        gen = self._generator(sync)
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

    def _cluster_stats(self, z: torch.Tensor, idx: torch.Tensor, sync: bool):
        """Per-code counts ``(books, K)`` and vector sums ``(books, K, d)`` (fp32, all ranks)."""
        books, _, d = z.shape
        stats = torch.zeros(books, self.codebook_size, d + 1, device=z.device, dtype=torch.float32)
        for b in range(books):
            stats[b, :, :d].index_add_(0, idx[b], z[b].float())
            stats[b, :, d].index_add_(0, idx[b], torch.ones_like(idx[b], dtype=torch.float32))
        if sync:
            _all_reduce_(stats)
        return stats[..., d], stats[..., :d]

    # -- training updates ---------------------------------------------------------------------------
    def _search(self, z: torch.Tensor, codebook: torch.Tensor, **search_kwargs):
        """``codebook_search`` in ``search_dtype`` (autocast off); ``search_kwargs``: k, return_distances."""
        dtype = self.search_dtype or z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            return codebook_search(z.detach().to(dtype), codebook.detach().to(dtype), metric=self.metric,
                                   **search_kwargs)

    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor, sync: bool):
        for b in range(z.shape[0]):
            means = self._sample_rows(z[b], self.codebook_size, sync)
            if means is None:
                return
            counts = torch.zeros(self.codebook_size, device=z.device)
            for _ in range(self.kmeans_iters):
                idx = self._search(z[b], means)
                counts, sums = self._cluster_stats(z[b:b + 1], idx[None], sync)
                counts, sums = counts[0], sums[0]
                new = sums / counts.clamp_min(1.0)[:, None]
                if self.metric == "cosine":
                    new = F.normalize(new, dim=-1)
                means = torch.where(counts[:, None] > 0, new, means)
            self.embed.data[b] = means
            self.cluster_size[b] = counts
            if not self.learnable_codebook:
                self.embed_sum[b] = means * self._smoothed_cluster_size()[b][:, None]
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, idx: torch.Tensor, sync: bool) -> bool:
        """One EMA step; False, with nothing changed, when no rank has any rows."""
        counts, sums = self._cluster_stats(z, idx, sync)  # a rank without rows joins the all-reduce too
        # A rank with rows knows the global batch is not empty; one without reads the global counts,
        # so every rank decides alike (and only those ranks wait for the host read).
        if z.shape[1] == 0 and not bool(counts.sum() > 0):
            return False
        decay = 0.99 if self.learnable_codebook else self.ema_decay
        self.cluster_size.lerp_(counts, 1.0 - decay)
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)
        self.perplexity.copy_(entropy.exp().mean())
        self.usage.copy_((counts > 0).float().mean())
        if self.learnable_codebook:
            return True
        self.embed_sum.lerp_(sums, 1.0 - self.ema_decay)
        codes = self.embed_sum / self._smoothed_cluster_size()[..., None]
        if self.metric == "cosine":
            codes = F.normalize(codes, dim=-1)
        self.embed.copy_(codes)
        return True

    @torch.no_grad()
    def _expire_codes(self, z: torch.Tensor, sync: bool):
        if self.dead_code_threshold <= 0:
            return
        dead = self.dead_codes()  # identical on every rank, so every rank takes the same branch
        if not bool(dead.any()):
            return
        for b in range(dead.shape[0]):
            slots = dead[b].nonzero().squeeze(1)
            if slots.numel() == 0:
                continue
            samples = self._sample_rows(z[b], slots.numel(), sync)
            if samples is None:
                return
            self.embed.data[b, slots] = samples
            self.cluster_size[b, slots] = self.dead_code_threshold
            if not self.learnable_codebook:
                self.embed_sum[b, slots] = samples * self.dead_code_threshold

    # -- forward ----------------------------------------------------------------------------------
    def _split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """(M, heads * d) -> (books, rows, d)."""
        m = z.shape[0]
        if self.separate_codebook_per_head:
            return z.reshape(m, self.heads, self.codebook_dim).transpose(0, 1)
        return z.reshape(1, m * self.heads, self.codebook_dim)

    def _merge_heads(self, q: torch.Tensor, m: int) -> torch.Tensor:
        if self.separate_codebook_per_head:
            return q.transpose(0, 1).reshape(m, self.heads * self.codebook_dim)
        return q.reshape(m, self.heads * self.codebook_dim)

    def forward(self, x: torch.Tensor):
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor, indices: torch.Tensor | None = None):
        """``forward``, or with ``indices`` (``heads=1``, shape of ``x`` without the feature dim,
        codebook already initialized) the same step with those codes instead of the nearest ones:
        ``ResidualVQ``'s beam search picks the codes, this layer applies them and trains on them."""
        x = _check_input(x, self.dim, self.channel_last)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = flat.shape[0]
        z = self._split_heads(self.project_in(flat))
        if self.metric == "cosine":
            z = F.normalize(z, dim=-1)
        sync = self.training and self._sync_active()

        if indices is not None:
            idx = indices.reshape(1, -1)
        else:
            if self.training and not bool(self.initted):
                self._kmeans_init(z.detach(), sync)
            idx = torch.stack([self._search(z[b], self.embed[b]) for b in range(z.shape[0])])
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        codes = torch.stack([embed[b][idx[b]] for b in range(z.shape[0])])  # before any update

        zf = z.float()
        loss = self.commitment_weight * _mse(codes.detach(), zf)
        if self.learnable_codebook:
            loss = loss + _mse(codes, zf.detach())

        if self.training and self._update(z.detach(), idx, sync):  # no rows anywhere: no step at all
            self._expire_codes(z.detach(), sync)

        if torch.is_grad_enabled() and z.requires_grad:
            estimate = rotation_trick if self.gradient == "rotation" else straight_through
            q = estimate(zf, codes.detach())
        else:
            q = codes
        q = self.project_out(self._merge_heads(q.to(z.dtype), m))
        quantized = q.reshape(*lead, self.dim).to(x.dtype)
        if not self.channel_last:
            quantized = quantized.movedim(-1, 1)
        if self.separate_codebook_per_head:
            indices = idx.transpose(0, 1)
        else:
            indices = idx.reshape(m, self.heads)
        indices = indices.reshape(*lead, self.heads) if self.heads > 1 else indices.reshape(lead)
        return quantized, indices, loss

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"metric={self.metric!r}, gradient={self.gradient!r}, ema_decay={self.ema_decay}, "
                f"heads={self.heads}")


class ResidualVQ(nn.Module):
    """Residual vector quantization (SoundStream, Algorithm 1): ``num_quantizers`` ``VectorQuantizer``
    layers, each quantizing what the previous ones left.

    ``forward(x, beam_size=None) -> (quantized, indices, losses)`` with ``indices``
    ``(..., num_quantizers)`` and ``losses`` ``(num_quantizers,)``. Keyword arguments other than
    the ones below go to every layer.

    Beam search (``beam_size`` > 1, the default in training; ``eval_beam_size`` in eval, default
    ``beam_size``): instead of each layer taking its nearest code, ``beam_size`` partial code paths
    are kept per vector, ranked by the squared error still left (``|z - sum of their codes|^2``);
    each layer extends every path with its ``beam_size`` nearest codes (``codebook_search(k=...)``)
    and keeps the best ``beam_size`` extensions (ties: earlier path, then nearer code); the path
    with the smallest final error wins. With enough beams (``beam_size >= K**(L-1)``) this is the
    exact optimum over all ``K**L`` paths; ``beam_size=1`` is the greedy quantizer. The layers
    then run on the winning path's codes exactly as in the greedy case (losses, gradients, EMA,
    dead codes). Needs ``metric="l2"`` and ``beam_size <= 64``. A training step that still has to
    k-means-initialize a codebook quantizes greedily (each codebook is initialized on the greedy
    residuals its layer sees).
    Unlike vector-quantize-pytorch, whose beams are ranked by a weighted sum of per-layer
    commitment losses, the rank here is the reconstruction error itself.
    """

    def __init__(self, num_quantizers: int, dim: int, codebook_size: int, *,
                 codebook_dim: int | None = None, channel_last: bool = True,
                 beam_size: int | None = None, eval_beam_size: int | None = None, **vq_kwargs):
        super().__init__()
        if vq_kwargs.get("heads", 1) != 1:
            raise ValueError(f"ResidualVQ supports heads=1 only, got heads={vq_kwargs['heads']!r}")
        self.num_quantizers = num_quantizers = _check_int("num_quantizers", num_quantizers)
        self.dim = dim = _check_int("dim", dim)
        self.codebook_dim = _check_int("codebook_dim", codebook_dim, optional=True) or dim
        self.channel_last = _check_flag("channel_last", channel_last)
        inner = self.codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.layers = nn.ModuleList(
            VectorQuantizer(inner, codebook_size, **vq_kwargs) for _ in range(num_quantizers))
        self.beam_size = self._check_beam(beam_size, "beam_size")
        self.eval_beam_size = self._check_beam(beam_size if eval_beam_size is None else eval_beam_size,
                                               "eval_beam_size")

    def _check_beam(self, beam: int | None, name: str) -> int | None:
        if beam is None:
            return None
        if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
            raise ValueError(f"{name} must be an int in [1, {MAX_BEAM}] or None, got {beam!r}")
        metric = self.layers[0].metric
        if beam > 1 and metric != "l2":
            raise ValueError(f"{name} > 1 needs metric='l2' (beams are ranked by squared error), "
                             f"got metric={metric!r}")
        return beam

    @property
    def codebooks(self) -> torch.Tensor:
        """``(num_quantizers, K, codebook_dim)``."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(num_quantizers, ..., codebook_dim)`` codes of ``indices`` ``(..., num_quantizers)``
        (``(B, ..., num_quantizers)`` when ``channel_last=False``), integers in
        ``[0, codebook_size)`` (ValueError / TypeError otherwise)."""
        lead = "..." if self.channel_last else "B, ..."
        indices = _check_indices(indices, self.layers[0].codebook_size, min_dim=1 + (not self.channel_last),
                                 last=self.num_quantizers,
                                 shape_doc=f"({lead}, num_quantizers) with num_quantizers = {self.num_quantizers}")
        return torch.stack([layer.codebook[indices[..., i]] for i, layer in enumerate(self.layers)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        out = self.project_out(self.get_codes_from_indices(indices).sum(0))
        return out if self.channel_last else out.movedim(-1, 1)

    def forward(self, x: torch.Tensor, beam_size: int | None = None):
        beam = self._check_beam(beam_size, "beam_size")
        if beam is None:
            beam = self.beam_size if self.training else self.eval_beam_size
        z = self.project_in(_check_input(x, self.dim, self.channel_last))
        initializing = self.training and not all(bool(layer.initted) for layer in self.layers)
        path = self.beam_search(z, beam) if beam is not None and beam > 1 and not initializing else None
        residual = z
        quantized = torch.zeros_like(z)
        all_indices, all_losses = [], []
        for i, layer in enumerate(self.layers):
            q, idx, loss = layer._quantize(residual, None if path is None else path[..., i])
            residual = residual - q.detach()
            quantized = quantized + q
            all_indices.append(idx)
            all_losses.append(loss)
        out = self.project_out(quantized)
        if not self.channel_last:
            out = out.movedim(-1, 1)
        return out, torch.stack(all_indices, dim=-1), torch.stack(all_losses)

    @torch.no_grad()
    def beam_search(self, z: torch.Tensor, beam_size: int) -> torch.Tensor:
        """Code paths ``(..., num_quantizers)`` for ``z`` ``(..., codebook_dim)`` by beam search over
        the current codebooks (see the class docstring); nothing is updated."""
        lead, d = z.shape[:-1], z.shape[-1]
        search_dtype = self.layers[0].search_dtype or z.dtype
        residual = z.detach().reshape(-1, 1, d).to(search_dtype)  # (M, beams, d)
        m = residual.shape[0]
        paths = torch.zeros(m, 1, 0, dtype=torch.long, device=z.device)
        rows = torch.arange(m, device=z.device)[:, None]
        for layer in self.layers:
            codebook = layer.codebook.detach().to(search_dtype)
            k = min(beam_size, codebook.shape[0])
            cand, err = layer._search(residual.reshape(-1, d), codebook, k=k, return_distances=True)
            width = residual.shape[1] * k
            cand, err = cand.reshape(m, width), err.reshape(m, width)  # path-major
            keep = torch.sort(err, dim=1, stable=True).indices[:, :beam_size]
            parent, code = keep // k, cand.gather(1, keep)
            residual = residual[rows, parent] - codebook[code]
            paths = torch.cat([paths[rows, parent], code[..., None]], dim=-1)
        return paths[:, 0].reshape(*lead, self.num_quantizers)
