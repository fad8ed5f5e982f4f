"""Vector quantization layers built on ``codebook_search``: ``VectorQuantizer`` here,
``ResidualVQ`` and ``GroupedResidualVQ`` in ``residual_vq.py`` (which imports this module, never the
reverse; helpers both use live in ``_vq_common.py``).

``VectorQuantizer`` holds the configuration and the state (codebook, statistics, generator); one
forward step is ``vq_steps.LayerStep``, which runs the named steps, each in its own module taking the
layer as its first argument: ``vq_layout`` (input layout: rows in, output out), ``vq_search``
(nearest or sampled codes), ``vq_update`` (k-means init, EMA statistics and codes, dead codes, with
``vq_sync`` for the rank-identical sampling), ``vq_loss`` (commitment, codebook and orthogonality
terms) and ``vq_grad`` (the gradient estimator). ``ResidualVQ`` runs the same steps per layer.

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

import torch
import torch.nn.functional as F
from torch import nn

from vtok_fast._checks import FLOAT_DTYPES, check_choice
from vtok_fast.encode.codebook_search import METRICS
from vtok_fast.encode._vq_common import (
    INDEX_DTYPES, MASKED_OUTPUTS, LossBreakdown, _check_flag, _check_indices, _check_int, _check_number,
    directional_reparam, gumbel_sample_codes, load_vqp_keys, orthogonal_loss, rotation_trick, straight_through)
from vtok_fast.encode.vq_grad import GRADIENTS
from vtok_fast.encode.vq_loss import CODEBOOK_LOSSES
from vtok_fast.encode.vq_steps import LayerStep
from vtok_fast.encode.vq_update import dead_codes, finish_step, smoothed_cluster_size

__all__ = [  # with the helpers this module has always exported
    "VectorQuantizer", "LossBreakdown", "GRADIENTS", "CODEBOOK_LOSSES", "INDEX_DTYPES", "MASKED_OUTPUTS",
    "straight_through", "rotation_trick", "directional_reparam", "orthogonal_loss", "gumbel_sample_codes",
    "load_vqp_keys"]


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
        self.codebook_size = _check_int("codebook_size", codebook_size)
        self.codebook_dim = _check_int("codebook_dim", codebook_dim, optional=True) or dim
        self.heads = heads = _check_int("heads", heads)
        self.kmeans_iters = _check_int("kmeans_iters", kmeans_iters, positive=False)
        self.commitment_weight = _check_number("commitment_weight", commitment_weight)
        self.ema_decay = _check_number("ema_decay", ema_decay, high=1.0, optional=True)
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

        self._init_state(kmeans_init)
        self.register_load_state_dict_pre_hook(load_vqp_keys)

    def _init_state(self, kmeans_init: bool) -> None:
        """The constructor's modules and state, registered in this order (their state_dict order; the
        random inits draw from torch's global generator in this order too): ``project_in`` /
        ``project_out``, the codebook ``embed`` (zeros awaiting k-means init, else Kaiming-uniform,
        unit rows for cosine; a parameter when a loss reaches it), ``embed_sum`` (EMA codebooks),
        ``cluster_size``, ``initted``, ``perplexity`` / ``usage`` (not saved) and ``rng_state``."""
        inner = self.codebook_dim * self.heads
        self.project_in = nn.Linear(self.dim, inner) if inner != self.dim else nn.Identity()
        self.project_out = nn.Linear(inner, self.dim) if inner != self.dim else nn.Identity()

        n_books = self.heads if self.separate_codebook_per_head else 1
        if kmeans_init:
            embed = torch.zeros(n_books, self.codebook_size, self.codebook_dim)
        else:
            embed = torch.empty(n_books, self.codebook_size, self.codebook_dim)
            nn.init.kaiming_uniform_(embed)
            if self.metric == "cosine":
                embed = F.normalize(embed, dim=-1)
        if self.ema_decay is None or self.orthogonal_reg_weight > 0:  # a loss reaches the codebook
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        if self.ema_decay is not None:
            self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(n_books, self.codebook_size))
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
                self.embed_sum.copy_(self.embed * smoothed_cluster_size(self)[..., None])

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

    # -- statistics and sampling (see vq_update, vq_sync) ---------------------------------------------
    def dead_codes(self) -> torch.Tensor:
        """Bool ``(books, K)``: codes whose EMA cluster size is below ``dead_code_threshold``."""
        return dead_codes(self)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, lens: torch.Tensor | None = None,
                sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                return_loss_breakdown: bool = False):
        """One step on ``x`` (the class docstring says what it returns): the parts of ``vq_steps``."""
        step = LayerStep(self, x, mask=mask, lens=lens, sample_codebook_temp=sample_codebook_temp,
                         freeze_codebook=freeze_codebook)
        step.learn(step.search())
        if step.tracked:
            finish_step(self, step.seen, step.sync)
        quantized, indices, loss, breakdown = step.output()
        if _check_flag("return_loss_breakdown", return_loss_breakdown):
            return quantized, indices, loss, breakdown
        return quantized, indices, loss

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"metric={self.metric!r}, gradient={self.gradient!r}, ema_decay={self.ema_decay}, "
                f"heads={self.heads}")
