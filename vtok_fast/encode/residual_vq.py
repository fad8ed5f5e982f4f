"""Residual vector quantization: ``ResidualVQ`` (SoundStream, Algorithm 1) with beam search,
quantizer dropout, padding masks, per-layer codebook sizes and shared codebooks, and
``GroupedResidualVQ`` (one ``ResidualVQ`` per slice of the features)."""
from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from torch import nn

from vtok_fast._checks import check_choice
from vtok_fast.encode._vq_common import (
    MASKED_OUTPUTS, _all_reduce_, _check_flag, _check_indices, _check_input, _check_int, _check_number,
    _mse, _row_mask, directional_reparam, frac_gradient)
from vtok_fast.encode.codebook_search import MAX_K
from vtok_fast.encode.vq import VectorQuantizer
from vtok_fast.encode.vq_search import search
from vtok_fast.encode.vq_steps import LayerStep
from vtok_fast.encode.vq_sync import sync_active
from vtok_fast.encode.vq_update import finish_step

BEAM_RANKS = ("error", "vqp")
MAX_BEAM = MAX_K  # beams extend by codebook_search(k=beam_size)


def _layer_weights(name: str, weights: Sequence[float] | None, num_quantizers: int) -> tuple[float, ...]:
    """``weights`` (one number >= 0 per layer; None: all 1) as a tuple, checked under ``name``."""
    if weights is None:
        return (1.0,) * num_quantizers
    weights = tuple(_check_number(f"{name}[{i}]", w) for i, w in enumerate(weights))
    if len(weights) != num_quantizers:
        raise ValueError(f"{name} must have one weight per layer (num_quantizers = {num_quantizers}), "
                         f"got {len(weights)}")
    return weights


class ResidualVQ(nn.Module):
    """Residual vector quantization (SoundStream, Algorithm 1): ``num_quantizers`` ``VectorQuantizer``
    layers, each quantizing what the previous ones left.

    ``forward(x, beam_size=None, *, mask=None, lens=None, return_all_codes=False,
    sample_codebook_temp=None, freeze_codebook=None, rand_quantize_dropout_fixed_seed=None)
    -> (quantized, indices, losses[, all_codes])`` with ``indices`` ``(..., num_quantizers)``,
    ``losses`` ``(num_quantizers,)`` and, with ``return_all_codes``, ``all_codes``
    ``(num_quantizers, ..., codebook_dim)`` (the codes of every layer before ``project_out``).
    Keyword arguments other than the ones below go to every layer (``VectorQuantizer``).

    Args:
        codebook_size: an int, or one per layer (a tuple; ``num_quantizers`` may then be None).
        shared_codebook: every layer uses one codebook (the same ``VectorQuantizer``); a training
            step accumulates every layer's statistics, then updates the codes once and replaces dead
            codes from all layers' residuals.
        quantize_dropout: in training, each step quantizes with the first ``n`` layers only, ``n``
            drawn uniformly from ``quantize_dropout_cutoff_index + 1 .. num_quantizers`` (rounded up to
            a multiple of ``quantize_dropout_multiple_of``); the dropped layers give indices -1, loss 0
            and no update. The draw is ``random.Random(seed).randrange(...)`` with ``seed`` from
            ``forward(rand_quantize_dropout_fixed_seed=)`` or drawn from torch's generator (summed over
            ranks when the codebooks are synced, so every rank drops the same layers), as in
            vector-quantize-pytorch.
        quant_grad_frac: the fraction of the gradient of each layer's output that flows back through
            the residual into the previous layers (0: detached residuals).
        diveq: the summed codes get the DiVeQ estimator (``directional_reparam``) and the layers'
            own estimator is off (their ``gradient`` must be ``"none"``, the default then).
        masked_output: padded positions (``mask`` / ``lens``) of the output: ``"zeros"`` or
            ``"input"`` (``x``).
        beam_size, eval_beam_size, beam_rank, beam_score_weights: beam search, below.

    Beam search (``beam_size`` > 1, the default in training; ``eval_beam_size`` in eval, default
    ``beam_size``): instead of each layer taking its nearest code, ``beam_size`` partial code paths
    are kept per vector; each layer extends every path with its ``beam_size`` nearest codes
    (``codebook_search(k=...)``) and keeps the best ``beam_size`` extensions. ``beam_rank="error"``
    (default) ranks paths by the squared error still left (``|z - sum of their codes|^2``; ties:
    earlier path, then nearer code) and the path with the smallest final error wins: with enough
    beams (``beam_size >= K**(L-1)``) this is the exact optimum over all ``K**L`` paths.
    ``beam_rank="vqp"`` ranks them as vector-quantize-pytorch does, by the sum over layers of
    ``-beam_score_weights[l] * commitment_weight * mse(code, residual)`` (``torch.topk``, the last
    layer keeping one path), which reproduces its tokens. ``beam_size=1`` is the greedy quantizer.
    The layers then run on the winning path's codes exactly as in the greedy case (losses,
    gradients, EMA, dead codes). Needs ``metric="l2"`` and ``beam_size <= 64``, and no stochastic
    sampling in training. A training step that still has to k-means-initialize a codebook quantizes
    greedily (each codebook is initialized on the greedy residuals its layer sees).

    ``mask`` / ``lens`` leave padded positions out of every layer (see ``VectorQuantizer``); their
    indices are -1. A vector holding a NaN or inf stays out of every layer's statistics, k-means
    init and dead-code samples (as in ``VectorQuantizer``). ``get_codes_from_indices`` maps -1
    ("no code") to zeros when ``quantize_dropout`` is on (``missing_ok=True`` always), and then also
    accepts fewer columns than layers.
    """

    def __init__(self, num_quantizers: int | None, dim: int, codebook_size: int | Sequence[int], *,
                 codebook_dim: int | None = None, channel_last: bool = True,
                 beam_size: int | None = None, eval_beam_size: int | None = None, beam_rank: str = "error",
                 beam_score_weights: Sequence[float] | None = None, shared_codebook: bool = False,
                 quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, quant_grad_frac: float = 0.0, diveq: bool = False,
                 masked_output: str = "zeros", **vq_kwargs):
        super().__init__()
        if vq_kwargs.get("heads", 1) != 1:
            raise ValueError(f"ResidualVQ supports heads=1 only, got heads={vq_kwargs['heads']!r}")
        if isinstance(codebook_size, (tuple, list)):
            sizes = tuple(_check_int(f"codebook_size[{i}]", s) for i, s in enumerate(codebook_size))
            num_quantizers = _check_int("num_quantizers", len(sizes) if num_quantizers is None else num_quantizers)
            if len(sizes) != num_quantizers:
                raise ValueError(f"codebook_size must have one size per layer (num_quantizers = "
                                 f"{num_quantizers}), got {len(sizes)} sizes")
        else:
            num_quantizers = _check_int("num_quantizers", num_quantizers)
            sizes = (_check_int("codebook_size", codebook_size),) * num_quantizers
        self.num_quantizers = num_quantizers
        self.codebook_sizes = sizes
        self.dim = dim = _check_int("dim", dim)
        self.codebook_dim = _check_int("codebook_dim", codebook_dim, optional=True) or dim
        self.channel_last = _check_flag("channel_last", channel_last)
        self.shared_codebook = _check_flag("shared_codebook", shared_codebook)
        self.diveq = _check_flag("diveq", diveq)
        self.masked_output = check_choice("masked_output", masked_output, MASKED_OUTPUTS)
        self.quant_grad_frac = _check_number("quant_grad_frac", quant_grad_frac, high=1.0, closed_high=True)
        self.quantize_dropout = _check_flag("quantize_dropout", quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = _check_int("quantize_dropout_cutoff_index",
                                                        quantize_dropout_cutoff_index, positive=False)
        self.quantize_dropout_multiple_of = _check_int("quantize_dropout_multiple_of",
                                                       quantize_dropout_multiple_of)
        if self.quantize_dropout and self.quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be below num_quantizers = {num_quantizers}, "
                             f"got {quantize_dropout_cutoff_index}")
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook=True needs one codebook size, got codebook_size={sizes}")
        if diveq:
            if vq_kwargs.setdefault("gradient", "none") != "none":
                raise ValueError(f"diveq=True applies the estimator to the summed codes: the layers need "
                                 f"gradient='none', got gradient={vq_kwargs['gradient']!r}")
        inner = self.codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        if shared_codebook:
            self.layers = nn.ModuleList([VectorQuantizer(inner, sizes[0], **vq_kwargs)] * num_quantizers)
        else:
            self.layers = nn.ModuleList(VectorQuantizer(inner, size, **vq_kwargs) for size in sizes)
        self.beam_rank = check_choice("beam_rank", beam_rank, BEAM_RANKS)
        if beam_score_weights is not None and beam_rank != "vqp":
            raise ValueError("beam_score_weights weigh beam_rank='vqp' scores; got beam_rank='error'")
        self.beam_score_weights = _layer_weights("beam_score_weights", beam_score_weights, num_quantizers)
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
    def codebook_size(self) -> int:
        """The first layer's codebook size (``codebook_sizes`` has every layer's)."""
        return self.codebook_sizes[0]

    @property
    def codebooks(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``(num_quantizers, K, codebook_dim)``; a tuple of ``(K_l, codebook_dim)`` when the sizes differ."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    def get_codes_from_indices(self, indices: torch.Tensor, *, missing_ok: bool | None = None) -> torch.Tensor:
        """``(num_quantizers, ..., codebook_dim)`` codes of ``indices`` ``(..., num_quantizers)``
        (``(B, ..., num_quantizers)`` when ``channel_last=False``), integers in ``[0, codebook_size)``
        (ValueError / TypeError otherwise). With ``missing_ok`` (default: ``quantize_dropout``) -1 means
        "no code" (zeros) and fewer columns than layers are padded with -1."""
        missing = self.quantize_dropout if missing_ok is None else _check_flag("missing_ok", missing_ok)
        lead = "..." if self.channel_last else "B, ..."
        cols = f"at most num_quantizers = {self.num_quantizers} columns" if missing else \
            f"num_quantizers = {self.num_quantizers}"
        shape_doc = f"({lead}, num_quantizers) with {cols}"
        indices = _check_indices(indices, max(self.codebook_sizes), min_dim=1 + (not self.channel_last),
                                 last=None if missing else self.num_quantizers, shape_doc=shape_doc,
                                 missing_ok=missing)
        if missing and not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(f"indices must have shape {shape_doc}, got shape {tuple(indices.shape)}")
        codes = []
        for i, layer in enumerate(self.layers):
            if i >= indices.shape[-1]:
                codes.append(layer.codebook.new_zeros(*indices.shape[:-1], self.codebook_dim))
                continue
            col = indices[..., i]
            if col.numel() and int(col.max()) >= layer.codebook_size:
                raise ValueError(f"indices[..., {i}] must be in [{-int(missing)}, {layer.codebook_size}) "
                                 f"(layer {i}'s codebook size), got values up to {int(col.max())}")
            codes.append(layer.codebook[col.clamp_min(0)].masked_fill((col < 0)[..., None], 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor, *, missing_ok: bool | None = None) -> torch.Tensor:
        out = self.project_out(self.get_codes_from_indices(indices, missing_ok=missing_ok).sum(0))
        return out if self.channel_last else out.movedim(-1, 1)

    # -- quantizer dropout ----------------------------------------------------------------------
    def _dropout_seed(self, device) -> int:
        """vector-quantize-pytorch's draw: an int in [0, 10000) from torch's generator, summed over
        ranks when the codebooks are synced."""
        seed = torch.randint(0, 10_000, (), device=device)
        if sync_active(self.layers[0]):
            _all_reduce_(seed)
        return int(seed)

    def _active_layers(self, seed: int | None, device) -> int:
        """How many layers this step runs."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers
        seed = self._dropout_seed(device) if seed is None else _check_int(
            "rand_quantize_dropout_fixed_seed", seed, positive=False)
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        step = self.quantize_dropout_multiple_of
        last = math.ceil((last + 1) / step) * step - 1
        return min(last, self.num_quantizers - 1) + 1

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, beam_size: int | None = None, *, mask: torch.Tensor | None = None,
                lens: torch.Tensor | None = None, return_all_codes: bool = False,
                sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                rand_quantize_dropout_fixed_seed: int | None = None):
        beam = self._check_beam(beam_size, "beam_size")
        if beam is None:
            beam = self.beam_size if self.training else self.eval_beam_size
        x_last = _check_input(x, self.dim, self.channel_last)
        z = self.project_in(x_last)
        lead = z.shape[:-1]
        keep = _row_mask(mask, lens, lead, z.device)
        layer_mask = None if keep is None else keep.reshape(lead)
        active = self._active_layers(rand_quantize_dropout_fixed_seed, z.device)
        layers = self.layers[:active]
        initializing = self.training and not all(bool(layer.initted) for layer in layers)
        searching = beam is not None and beam > 1 and not initializing
        if searching and self.training and any(layer.stochastic_sample_codes for layer in layers):
            raise ValueError("beam search does not sample codes: stochastic_sample_codes=True needs "
                             "beam_size None or 1 in training")
        path = self.beam_search(z, beam, num_layers=active) if searching else None
        residual = z
        quantized = torch.zeros_like(z)
        all_indices, all_losses, shared_rows = [], [], []
        for i, layer in enumerate(layers):  # each layer's step (vq_steps), on the winning path's codes
            step = LayerStep(layer, residual, mask=layer_mask, sample_codebook_temp=sample_codebook_temp,
                             freeze_codebook=freeze_codebook)
            step.learn(step.search() if path is None else step.take(path[..., i]))
            if step.tracked and self.shared_codebook:
                shared_rows.append(step.seen)  # the shared codebook's update waits for every layer
            elif step.tracked:
                finish_step(layer, step.seen, step.sync)
            layer_q, layer_idx, loss, _ = step.output()
            if searching and self.beam_rank == "vqp" and not self.training and not layer.eval_loss:
                loss = self._vqp_beam_loss(layer, layer_q, residual, layer_mask)
            residual = residual - frac_gradient(layer_q, self.quant_grad_frac)
            quantized = quantized + layer_q
            all_indices.append(layer_idx)
            all_losses.append(loss)
        for _ in range(active, self.num_quantizers):  # dropped layers
            all_indices.append(torch.full(lead, -1, dtype=torch.long, device=z.device))
            all_losses.append(torch.zeros((), device=z.device))
        if shared_rows:  # one update of the shared codebook, from every layer's rows
            shared = self.layers[0]
            finish_step(shared, torch.cat(shared_rows, dim=1), self.training and sync_active(shared))
        if self.diveq and torch.is_grad_enabled() and z.requires_grad and (
                self.training or self.layers[0].eval_gradient):
            quantized = directional_reparam(z, quantized)
        out = self.project_out(quantized)
        if keep is not None:
            fill = x_last if self.masked_output == "input" else torch.zeros_like(out)
            out = torch.where(layer_mask[..., None], out, fill)
        if not self.channel_last:
            out = out.movedim(-1, 1)
        indices = torch.stack(all_indices, dim=-1)
        result = (out, indices, torch.stack(all_losses))
        if _check_flag("return_all_codes", return_all_codes):
            result += (self.get_codes_from_indices(indices, missing_ok=True),)
        return result

    @staticmethod
    def _vqp_beam_loss(layer, q, residual, mask):
        """vector-quantize-pytorch's eval loss of a beam-searched layer: its beam score, the
        commitment loss (unweighted when ``commitment_weight`` is 0), over the unmasked rows."""
        if mask is not None:
            q, residual = q[mask], residual[mask]
        cw = layer.commitment_weight
        return (cw if cw > 0 else 1.0) * _mse(q, residual)

    @torch.no_grad()
    def beam_search(self, z: torch.Tensor, beam_size: int, num_layers: int | None = None) -> torch.Tensor:
        """Code paths ``(..., num_layers)`` (default: all layers) for ``z`` ``(..., codebook_dim)`` by
        beam search over the current codebooks, ranked by ``beam_rank`` (see the class docstring);
        nothing is updated."""
        layers = self.layers[:num_layers or self.num_quantizers]
        lead, d = z.shape[:-1], z.shape[-1]
        search_dtype = self.layers[0].search_dtype or z.dtype
        residual = z.detach().reshape(-1, 1, d).to(search_dtype)  # (M, beams, d)
        m = residual.shape[0]
        paths = torch.zeros(m, 1, 0, dtype=torch.long, device=z.device)
        rows = torch.arange(m, device=z.device)[:, None]
        scores = torch.zeros(m, 1, device=z.device, dtype=search_dtype)  # beam_rank="vqp"
        weights = torch.tensor(self.beam_score_weights, dtype=search_dtype)
        for i, layer in enumerate(layers):
            codebook = layer.codebook.detach().to(search_dtype)
            k = min(beam_size, codebook.shape[0])
            cand, err = search(layer, residual.reshape(-1, d), codebook, k=k, return_distances=True)
            width = residual.shape[1] * k
            cand, err = cand.reshape(m, width), err.reshape(m, width)  # path-major
            if self.beam_rank == "error":
                keep = torch.sort(err, dim=1, stable=True).indices[:, :beam_size]
            else:  # their per-layer loss: commitment_weight * mean((code - residual)^2), 1 in eval when 0
                cw = layer.commitment_weight
                loss = (err / d) * (cw if cw > 0 else float(not self.training))
                extended = (scores[:, :, None] + -loss.reshape(m, -1, k) * weights[i]).reshape(m, width)
                target = 1 if i == len(layers) - 1 else beam_size
                if width > target:
                    scores, keep = extended.topk(target, dim=1)
                else:
                    scores, keep = extended, torch.arange(width, device=z.device).expand(m, width)
            parent, code = keep // k, cand.gather(1, keep)
            residual = residual[rows, parent] - codebook[code]
            paths = torch.cat([paths[rows, parent], code[..., None]], dim=-1)
        return paths[:, 0].reshape(*lead, len(layers))


class GroupedResidualVQ(nn.Module):
    """``groups`` ``ResidualVQ`` quantizers, each on one slice of the features (Yang et al. 2023,
    HiFi-Codec): ``forward(x, ...) -> (quantized, indices, losses[, all_codes])`` with ``indices``
    ``(groups, ..., num_quantizers)``, ``losses`` ``(groups, num_quantizers)`` and ``all_codes``
    ``(groups, num_quantizers, ..., codebook_dim)``. Keyword arguments go to every ``ResidualVQ``;
    ``forward``'s to each group's forward (one quantizer-dropout draw for all groups)."""

    def __init__(self, num_quantizers: int | None, dim: int, codebook_size: int | Sequence[int], *,
                 groups: int = 1, channel_last: bool = True, **rvq_kwargs):
        super().__init__()
        self._build(dim, groups, channel_last, lambda group_dim: ResidualVQ(
            num_quantizers, group_dim, codebook_size, channel_last=channel_last, **rvq_kwargs))

    def _build(self, dim, groups, channel_last, make_group):
        """The constructor's body; ``make_group(group_dim)`` builds one group's quantizer."""
        self.dim = dim = _check_int("dim", dim)
        self.groups = groups = _check_int("groups", groups)
        if dim % groups:
            raise ValueError(f"dim must be divisible by groups, got dim={dim}, groups={groups}")
        self.channel_last = _check_flag("channel_last", channel_last)
        self.rvqs = nn.ModuleList(make_group(dim // groups) for _ in range(groups))

    @property
    def _split_dim(self) -> int:
        return -1 if self.channel_last else 1

    @property
    def codebooks(self) -> torch.Tensor:
        """``(groups, num_quantizers, K, codebook_dim)``."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def _check_groups(self, indices) -> None:
        """One index block per group (each group's ResidualVQ checks its own block)."""
        if not isinstance(indices, torch.Tensor) or indices.dim() < 1 or indices.shape[0] != self.groups:
            raise ValueError(f"indices must have shape (groups, ..., num_quantizers) with groups = {self.groups}, "
                             f"got {getattr(indices, 'shape', type(indices).__name__)}")

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(groups, num_quantizers, ..., codebook_dim)`` codes of ``indices`` ``(groups, ..., num_quantizers)``."""
        self._check_groups(indices)
        return torch.stack([rvq.get_codes_from_indices(part) for rvq, part in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        self._check_groups(indices)
        return torch.cat([rvq.get_output_from_indices(part) for rvq, part in zip(self.rvqs, indices)],
                         dim=self._split_dim)

    def forward(self, x: torch.Tensor, beam_size: int | None = None, *, mask=None, lens=None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool | None = None, rand_quantize_dropout_fixed_seed: int | None = None):
        _check_input(x, self.dim, self.channel_last)
        seed = rand_quantize_dropout_fixed_seed
        if seed is None and self.training and any(rvq.quantize_dropout for rvq in self.rvqs):
            seed = self.rvqs[0]._dropout_seed(x.device)
        kwargs = dict(mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                      freeze_codebook=freeze_codebook, rand_quantize_dropout_fixed_seed=seed)
        if beam_size is not None:  # by keyword, and only when given: subclasses' forwards differ in order
            kwargs["beam_size"] = beam_size
        if lens is not None:
            kwargs["lens"] = lens
        outs = [rvq(part, **kwargs) for rvq, part in zip(self.rvqs, x.chunk(self.groups, dim=self._split_dim))]
        quantized = torch.cat([o[0] for o in outs], dim=self._split_dim)
        return (quantized, *(torch.stack([o[j] for o in outs]) for j in range(1, len(outs[0]))))
