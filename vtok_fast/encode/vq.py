"""Vector quantization layers built on ``codebook_search``: ``VectorQuantizer`` here,
``ResidualVQ`` and ``GroupedResidualVQ`` in ``residual_vq.py`` (which imports this module, never the
reverse; helpers both use live in ``_vq_common.py``).

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

``vtok_fast.compat.vector_quantize_pytorch`` configures these layers with vector-quantize-pytorch's
argument names, defaults and conventions; both load its checkpoints (a load_state_dict pre-hook).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vtok_fast._checks import FLOAT_DTYPES, check_choice
from vtok_fast.encode.codebook_search import METRICS, codebook_search
from vtok_fast.encode._vq_common import (  # noqa: F401  (re-exported: public helpers and test imports)
    INDEX_DTYPES, MASKED_OUTPUTS, LossBreakdown, _all_reduce_, _check_flag, _check_indices,
    _check_input, _check_int, _check_number, _finite_rows, _mse, _row_mask, _world, directional_reparam,
    gumbel_sample_codes, load_vqp_keys, orthogonal_loss, rotation_trick, straight_through)

GRADIENTS = ("ste", "rotation", "diveq", "none")
CODEBOOK_LOSSES = ("separate", "joint")


class _Step(NamedTuple):
    """What one ``VectorQuantizer._quantize`` call gives ``ResidualVQ``."""
    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    breakdown: LossBreakdown
    rows: torch.Tensor      # (books, rows, codebook_dim): the (unmasked, finite) vectors the statistics saw
    tracked: bool           # a training step that updated the statistics


class VectorQuantizer(nn.Module):
    """Vector quantizer: ``forward(x) -> (quantized, indices, loss)``.

    Args:
        dim: feature size of ``x``.
        codebook_size: number of codes K.
        codebook_dim: size of each code (default ``dim``); ``x`` is projected in/out by linear
            layers when ``heads * codebook_dim != dim``.
        metric: ``"l2"`` or ``"cosine"`` (inputs and codes l2-normalized).
        commitment_weight: weight of ``mse(sg[q], z)``.
        gradient: ``"ste"`` (straight-through), ``"rotation"`` (rotation trick), ``"diveq"``
            (directional reparameterization: ``z + dir * |q - z|``, ``dir`` the detached direction of
            ``q - z`` plus Gaussian noise of variance ``diveq_variance``; a learnable codebook gets
            gradients through ``|q - z|``) or ``"none"`` (the output is the codes: no gradient to
            ``x``; a learnable codebook still gets one).
        ema_decay: EMA decay of the codebook statistics; ``None`` makes the codebook a learnable
            parameter trained by the codebook loss (see ``codebook_loss``).
        codebook_loss: learnable codebooks: ``"separate"`` adds ``mse(q, sg[z])`` to the loss;
            ``"joint"`` makes the commitment term ``commitment_weight * mse(q, z)`` with gradients to
            both (vector-quantize-pytorch's).
        eps: Laplace smoothing of the EMA cluster sizes (> 0).
        dead_code_threshold: codes whose EMA cluster size falls below this are replaced by random
            vectors of the current batch (0 disables).
        usage_decay: EMA decay of the cluster sizes of a learnable codebook (an EMA codebook uses
            ``ema_decay``); they drive dead-code expiry.
        kmeans_init, kmeans_iters: initialize the codebook by k-means on the first training batch
            (``kmeans_init_in_eval``: on the first batch in eval mode too).
        heads, separate_codebook_per_head: split features into ``heads`` groups quantized
            independently (one shared codebook, or one per head).
        sync_codebook: synchronize statistics over torch.distributed ranks (``None``: when a
            process group of more than one rank is initialized).
        channel_last: ``x`` is ``(..., dim)``; ``False``: ``(B, dim, *spatial)``.
        search_dtype: dtype of the nearest-code search (default fp32; ``None``: the input's dtype).
        eval_loss, eval_gradient: in eval mode, return the training loss (``False``: a constant 0)
            and apply the gradient estimator (``False``: the output is the codes, no gradient to
            ``x``). vector-quantize-pytorch's eval is ``eval_loss=False, eval_gradient=False``.
        orthogonal_reg_weight: weight of the codebook orthogonality loss (``orthogonal_loss``; the
            codebook becomes a parameter, still EMA-updated when ``ema_decay`` is set);
            ``orthogonal_reg_active_codes_only``: over this batch's codes only;
            ``orthogonal_reg_max_codes``: over at most this many random codes.
        freeze_codebook: training steps neither update the codebook nor expire codes, and a
            learnable codebook gets no loss gradient (``forward(freeze_codebook=)`` overrides).
        stochastic_sample_codes, sample_codebook_temp: in training, draw codes with probabilities
            ``softmax(-|z - c| / temp)`` (cosine: ``softmax(z.c / temp)``) instead of the nearest
            one (temp 0: nearest); ``forward(sample_codebook_temp=)`` overrides the temperature.
        masked_output: what padded positions (``forward(mask=)`` / ``lens``) get: ``"zeros"`` or
            ``"input"`` (``x`` itself).

    ``forward(x, *, mask=None, lens=None, sample_codebook_temp=None, freeze_codebook=None,
    return_loss_breakdown=False)`` returns ``quantized`` (same shape and dtype as ``x``, gradients by
    the chosen estimator when ``x`` requires grad), int64 ``indices`` (``x``'s shape without the
    feature dim, plus a trailing ``heads`` dim when ``heads > 1``), the scalar ``loss`` and, with
    ``return_loss_breakdown``, a ``LossBreakdown``. ``mask`` (bool, ``x``'s shape without the
    feature dim, True = real) or ``lens`` (``(B,)`` lengths of a ``(B, N, dim)`` input) leave padded
    positions out of everything: search, loss, statistics, k-means and dead-code samples; their
    indices are -1. In training mode it also updates the EMA codebook, expires dead codes and
    refreshes ``perplexity`` / ``usage``.
    A vector holding a NaN or inf (after ``project_in``) is quantized like the others (its output
    and the loss are then whatever NaN gives) but never reaches the EMA statistics, k-means init or
    dead-code samples (with ``separate_codebook_per_head``, its whole row stays out of every head's):
    the step changes the layer exactly as the same step without it, and a batch of only such
    vectors is an empty batch.
    An empty batch gives a zero loss (still in the autograd graph) and, when no rank has any rows,
    changes no state at all (no EMA step, k-means init or sampler draw); a rank with no rows while
    others have some still joins every all-reduce.

    ``load_state_dict`` also takes vector-quantize-pytorch ``VectorQuantize`` states
    (``_codebook.embed`` ...), strictly.
    """

    def __init__(self, dim: int, codebook_size: int, *, codebook_dim: int | None = None,
                 metric: str = "l2", commitment_weight: float = 1.0, gradient: str = "ste",
                 ema_decay: float | None = 0.99, eps: float = 1e-5, dead_code_threshold: float = 0.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, heads: int = 1,
                 separate_codebook_per_head: bool = False, sync_codebook: bool | None = None,
                 channel_last: bool = True, search_dtype: torch.dtype | None = torch.float32,
                 codebook_loss: str = "separate", usage_decay: float = 0.99, diveq_variance: float = 5e-3,
                 eval_loss: bool = True, eval_gradient: bool = True, kmeans_init_in_eval: bool = False,
                 orthogonal_reg_weight: float = 0.0, orthogonal_reg_active_codes_only: bool = False,
                 orthogonal_reg_max_codes: int | None = None, freeze_codebook: bool = False,
                 stochastic_sample_codes: bool = False, sample_codebook_temp: float = 1.0,
                 masked_output: str = "zeros"):
        super().__init__()
        self.metric = check_choice("metric", metric, METRICS)
        self.gradient = check_choice("gradient", gradient, GRADIENTS)
        self.codebook_loss = check_choice("codebook_loss", codebook_loss, CODEBOOK_LOSSES)
        self.masked_output = check_choice("masked_output", masked_output, MASKED_OUTPUTS)
        if search_dtype is not None and search_dtype not in FLOAT_DTYPES:
            raise TypeError(f"search_dtype must be one of {FLOAT_DTYPES} or None, got {search_dtype!r}")
        self.dim = dim = _check_int("dim", dim)
        self.codebook_size = codebook_size = _check_int("codebook_size", codebook_size)
        self.codebook_dim = _check_int("codebook_dim", codebook_dim, optional=True) or dim
        self.heads = heads = _check_int("heads", heads)
        self.kmeans_iters = _check_int("kmeans_iters", kmeans_iters, positive=False)
        self.commitment_weight = _check_number("commitment_weight", commitment_weight)
        self.ema_decay = ema_decay = _check_number("ema_decay", ema_decay, high=1.0, optional=True)
        self.usage_decay = _check_number("usage_decay", usage_decay, high=1.0)
        self.eps = _check_number("eps", eps, open_low=True)  # > 0: an unused code divides by it
        self.dead_code_threshold = _check_number("dead_code_threshold", dead_code_threshold)
        self.diveq_variance = _check_number("diveq_variance", diveq_variance)
        kmeans_init = _check_flag("kmeans_init", kmeans_init)
        self.kmeans_init_in_eval = _check_flag("kmeans_init_in_eval", kmeans_init_in_eval)
        self.separate_codebook_per_head = _check_flag("separate_codebook_per_head",
                                                      separate_codebook_per_head)
        self.sync_codebook = _check_flag("sync_codebook", sync_codebook, optional=True)
        self.channel_last = _check_flag("channel_last", channel_last)
        self.eval_loss = _check_flag("eval_loss", eval_loss)
        self.eval_gradient = _check_flag("eval_gradient", eval_gradient)
        self.orthogonal_reg_weight = _check_number("orthogonal_reg_weight", orthogonal_reg_weight)
        self.orthogonal_reg_active_codes_only = _check_flag("orthogonal_reg_active_codes_only",
                                                            orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = _check_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes,
                                                   optional=True)
        if orthogonal_reg_active_codes_only and separate_codebook_per_head and heads > 1:
            raise ValueError("orthogonal_reg_active_codes_only=True needs one codebook for all heads "
                             "(separate_codebook_per_head=False)")
        self.freeze_codebook = _check_flag("freeze_codebook", freeze_codebook)
        self.stochastic_sample_codes = _check_flag("stochastic_sample_codes", stochastic_sample_codes)
        self.sample_codebook_temp = _check_number("sample_codebook_temp", sample_codebook_temp)
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
        if ema_decay is None or self.orthogonal_reg_weight > 0:  # a loss reaches the codebook
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        if ema_decay is not None:
            self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(n_books, codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("perplexity", torch.tensor(float("nan")), persistent=False)
        self.register_buffer("usage", torch.tensor(float("nan")), persistent=False)
        # (seed, draws) of the sampling generator; every rank uses rank 0's seed
        seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64))
        self._rng_synced = False
        self.register_load_state_dict_pre_hook(load_vqp_keys)

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
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.sync_codebook and not ready:
            raise RuntimeError("sync_codebook=True needs an initialized torch.distributed process group")
        return ready and torch.distributed.get_world_size() > 1

    def _generator(self, sync: bool) -> torch.Generator:
        """A CPU generator seeded identically on every rank, advanced once per use."""
        if sync and not self._rng_synced:
            state = self.rng_state.clone()
            torch.distributed.broadcast(state, src=0)
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
    def _track(self, z: torch.Tensor, idx: torch.Tensor, sync: bool) -> bool:
        """The statistics half of an EMA step (cluster sizes, vector sums, perplexity, usage); False,
        with nothing changed, when no rank has any rows."""
        counts, sums = self._cluster_stats(z, idx, sync)  # a rank without rows joins the all-reduce too
        # A rank with rows knows the global batch is not empty; one without reads the global counts,
        # so every rank decides alike (and only those ranks wait for the host read).
        if z.shape[1] == 0 and not bool(counts.sum() > 0):
            return False
        decay = self.usage_decay if self.learnable_codebook else self.ema_decay
        self.cluster_size.lerp_(counts, 1.0 - decay)
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)
        self.perplexity.copy_(entropy.exp().mean())
        self.usage.copy_((counts > 0).float().mean())
        if not self.learnable_codebook:
            self.embed_sum.lerp_(sums, 1.0 - self.ema_decay)
        return True

    @torch.no_grad()
    def _refresh(self):
        """The codes half of an EMA step: ``embed = embed_sum / smoothed cluster sizes``."""
        if self.learnable_codebook:
            return
        codes = self.embed_sum / self._smoothed_cluster_size()[..., None]
        if self.metric == "cosine":
            codes = F.normalize(codes, dim=-1)
        self.embed.data.copy_(codes)

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

    def _finish_step(self, z: torch.Tensor, sync: bool):
        """After the statistics of a step (or of every layer sharing this codebook): new codes, then
        dead-code replacement from the rows ``z`` ``(books, rows, d)``."""
        self._refresh()
        self._expire_codes(z, sync)

    def _orthogonal_loss(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.embed
        if self.orthogonal_reg_active_codes_only:
            codes = codes[:, torch.unique(idx)]
        n = codes.shape[1]
        if self.orthogonal_reg_max_codes is not None and n > self.orthogonal_reg_max_codes:
            codes = codes[:, torch.randperm(n, device=codes.device)[:self.orthogonal_reg_max_codes]]
        return orthogonal_loss(codes)

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

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, lens: torch.Tensor | None = None,
                sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                return_loss_breakdown: bool = False):
        step = self._quantize(x, mask=mask, lens=lens, sample_codebook_temp=sample_codebook_temp,
                              freeze_codebook=freeze_codebook)
        if _check_flag("return_loss_breakdown", return_loss_breakdown):
            return step.quantized, step.indices, step.loss, step.breakdown
        return step.quantized, step.indices, step.loss

    def _codes(self, z: torch.Tensor, temperature: float) -> torch.Tensor:
        """``(books, rows)`` indices: nearest codes, or sampled ones in a stochastic training step."""
        if self.training and self.stochastic_sample_codes and temperature > 0:
            return torch.stack([gumbel_sample_codes(z[b], self.embed[b], self.metric, temperature)
                                for b in range(z.shape[0])])
        return torch.stack([self._search(z[b], self.embed[b]) for b in range(z.shape[0])])

    def _quantize(self, x: torch.Tensor, indices: torch.Tensor | None = None, *, mask=None, lens=None,
                  sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                  defer_refresh: bool = False) -> _Step:
        """``forward`` as a ``_Step``, or with ``indices`` (``heads=1``, shape of ``x`` without the
        feature dim, codebook already initialized) the same step with those codes instead of the
        nearest ones: ``ResidualVQ``'s beam search picks the codes, this layer applies them and
        trains on them. ``defer_refresh``: update the statistics only (codebooks shared by the
        layers of a ``ResidualVQ`` get their new codes and dead-code replacement after the last
        layer)."""
        x = _check_input(x, self.dim, self.channel_last)
        freeze = self.freeze_codebook if freeze_codebook is None else _check_flag("freeze_codebook",
                                                                                   freeze_codebook)
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else _check_number(
            "sample_codebook_temp", sample_codebook_temp)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = flat.shape[0]
        keep = _row_mask(mask, lens, lead, x.device)
        rows = flat if keep is None else flat[keep]
        n = rows.shape[0]
        z = self._split_heads(self.project_in(rows))
        if self.metric == "cosine":
            z = F.normalize(z, dim=-1)
        sync = self.training and self._sync_active()
        zd = z.detach()
        initting = indices is None and (self.training or self.kmeans_init_in_eval) and not bool(self.initted)
        updating = self.training and not freeze
        # a row with a NaN or inf is quantized, but never reaches the statistics, k-means or dead codes
        finite = _finite_rows(zd) if initting or updating else None
        seen = zd if finite is None else zd[:, finite]

        if indices is not None:
            idx = indices.reshape(-1) if keep is None else indices.reshape(-1)[keep]
            idx = idx.reshape(1, -1)
        else:
            if initting:
                self._kmeans_init(seen, self._sync_active())
            idx = self._codes(z, temperature)
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        live = torch.stack([embed[b][idx[b]] for b in range(z.shape[0])])  # before any update
        codes = live.detach()

        zf = z.float()
        if self.training or self.eval_loss:
            to_codebook = self.learnable_codebook and not freeze
            zero = zf.new_zeros(())
            if to_codebook and self.codebook_loss == "joint":
                commitment, codebook_term = _mse(live, zf), zero
            else:
                commitment = _mse(codes, zf)
                codebook_term = _mse(live, zf.detach()) if to_codebook else zero
            loss = self.commitment_weight * commitment + codebook_term
        else:
            loss = commitment = codebook_term = torch.zeros((), device=x.device)

        tracked = False
        if updating:  # no rows anywhere: no step at all
            tracked = self._track(seen, idx if finite is None else idx[:, finite], sync)
            if tracked and not defer_refresh:
                self._finish_step(seen, sync)

        ortho = loss.new_zeros(())
        if self.orthogonal_reg_weight > 0 and (self.training or self.eval_loss):
            ortho = self._orthogonal_loss(idx)  # on the codes after this step's update, as theirs
            loss = loss + self.orthogonal_reg_weight * ortho
        breakdown = LossBreakdown(commitment, codebook_term, ortho)

        estimating = torch.is_grad_enabled() and z.requires_grad and (self.training or self.eval_gradient)
        if estimating and self.gradient == "ste":
            q = straight_through(zf, codes)
        elif estimating and self.gradient == "rotation":
            q = rotation_trick(zf, codes)
        elif estimating and self.gradient == "diveq":
            q = directional_reparam(zf, live, self.diveq_variance)
        else:
            q = live
        q = self.project_out(self._merge_heads(q.to(z.dtype), n)).to(x.dtype)
        if self.separate_codebook_per_head:
            idx_rows = idx.transpose(0, 1)
        else:
            idx_rows = idx.reshape(n, self.heads)
        if keep is not None:
            where = keep.nonzero().squeeze(1)
            base = flat if self.masked_output == "input" else flat.new_zeros(m, self.dim)
            q = base.index_put((where,), q)
            idx_rows = idx_rows.new_full((m, self.heads), -1).index_put((where,), idx_rows)
        quantized = q.reshape(*lead, self.dim)
        if not self.channel_last:
            quantized = quantized.movedim(-1, 1)
        out_idx = idx_rows.reshape(*lead, self.heads) if self.heads > 1 else idx_rows.reshape(lead)
        return _Step(quantized, out_idx, loss, breakdown, seen, tracked)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"metric={self.metric!r}, gradient={self.gradient!r}, ema_decay={self.ema_decay}, "
                f"heads={self.heads}")
