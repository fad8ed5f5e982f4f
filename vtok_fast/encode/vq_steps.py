"""One forward step of one ``VectorQuantizer`` on one batch, as named parts the caller runs in order::

    step = LayerStep(layer, x, mask=mask, ...)       # input layout (vq_layout) and the step's options
    idx = step.search()                              # k-means init when due (vq_update), then codes
                                                     # (vq_search); or step.take(codes): given ones
    step.learn(idx)                                  # loss terms (vq_loss), statistics (vq_update.track)
    if step.tracked:                                 # new codes and dead codes (vq_update.finish_step);
        finish_step(layer, step.seen, step.sync)     # a shared codebook: once, after all its layers
    quantized, indices, loss, breakdown = step.output()  # orthogonal loss, estimator (vq_grad), layout

``VectorQuantizer.forward`` runs exactly that; ``ResidualVQ`` runs it per layer with a beam-searched
path's codes (``take``) and, for a shared codebook, one ``finish_step`` on every layer's rows. The
random draws come in that order: k-means and dead-code samples from the layer's own generator,
stochastic codes, the orthogonal loss's code subset and DiVeQ's noise from torch's global one.
"""
from __future__ import annotations

import torch
from torch import nn

from vtok_fast.encode._vq_common import LossBreakdown, _check_flag, _check_input, _check_number
from vtok_fast.encode.vq_grad import estimate
from vtok_fast.encode.vq_layout import from_rows, real_rows, to_rows
from vtok_fast.encode.vq_loss import quantization_loss, total_loss
from vtok_fast.encode.vq_search import lookup, pick_codes
from vtok_fast.encode.vq_sync import sync_active
from vtok_fast.encode.vq_update import kmeans_due, kmeans_init, rows_to_learn, track


class LayerStep:
    """One step of ``layer`` on ``x`` (``forward``'s arguments; see ``VectorQuantizer``), its parts
    in the order the module docstring shows. Attributes: ``rows`` (``vq_layout.Rows``), ``freeze``,
    ``temperature``, ``sync`` (statistics all-reduced), ``updating`` (a training step that updates the
    codebook), ``seen``; after ``learn``: ``idx``, ``live`` / ``codes`` (``vq_search.lookup``),
    ``zf`` (the rows in fp32), ``terms`` (``vq_loss.quantization_loss``) and ``tracked`` (the
    statistics were updated: the codebook's ``finish_step`` is due)."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                 lens: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                 freeze_codebook: bool | None = None):
        """Check ``x`` and the per-call options (TypeError / ValueError naming them) and lay ``x`` out
        as rows (``vq_layout.to_rows``); nothing is changed or drawn yet."""
        x = _check_input(x, layer.dim, layer.channel_last)
        self.layer = layer
        self.freeze = layer.freeze_codebook if freeze_codebook is None else _check_flag(
            "freeze_codebook", freeze_codebook)
        self.temperature = layer.sample_codebook_temp if sample_codebook_temp is None else _check_number(
            "sample_codebook_temp", sample_codebook_temp)
        self.rows = to_rows(layer, x, mask, lens)
        self.sync = layer.training and sync_active(layer)
        self.updating = layer.training and not self.freeze
        self.tracked = False
        self._learned = None

    @property
    def seen(self) -> torch.Tensor:
        """``(books, rows, d)``: the rows the statistics, k-means and dead-code samples see (detached,
        no NaN or inf)."""
        return self._rows_to_learn()[0]

    def _rows_to_learn(self):
        if self._learned is None:
            self._learned = rows_to_learn(self.rows.z)
        return self._learned

    def search(self) -> torch.Tensor:
        """Codes ``(books, rows)``: k-means-initialize the codebook first when due, then the nearest
        (or, stochastic training, sampled) codes."""
        if kmeans_due(self.layer):
            kmeans_init(self.layer, self.seen, sync_active(self.layer))
        return pick_codes(self.layer, self.rows.z, self.temperature)

    def take(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(1, rows)`` from given ones, one per position of ``x`` (its shape without the
        feature dim; ``heads=1``), for an initialized codebook: nothing is searched or initialized."""
        return real_rows(codes, self.rows.keep).reshape(1, -1)

    def learn(self, idx: torch.Tensor) -> None:
        """Quantize the rows with the codes ``idx`` ``(books, rows)``: the codes as they are before
        any update, the loss terms and, in an updating step, the statistics (``tracked``)."""
        self.idx = idx
        self.live, self.codes = lookup(self.layer, idx)
        self.zf = self.rows.z.float()
        self.terms = quantization_loss(self.layer, self.zf, self.live, self.codes, self.freeze)
        if self.updating:  # no rows on any rank: no step at all
            seen, finite = self._rows_to_learn()
            self.tracked = track(self.layer, seen, idx if finite is None else idx[:, finite], self.sync)

    def output(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LossBreakdown]:
        """``(quantized, indices, loss, breakdown)`` as ``forward`` returns them, after ``learn`` (and
        the codebook update): the loss with the orthogonality term of the updated codebook, the
        quantized rows by the gradient estimator, laid out like ``x``."""
        loss, breakdown = total_loss(self.layer, *self.terms, self.idx)
        q = estimate(self.layer, self.zf, self.live, self.codes)
        quantized, indices = from_rows(self.layer, self.rows, q, self.idx)
        return quantized, indices, loss, breakdown
