"""vector-quantize-pytorch's ``VectorQuantize``, ``ResidualVQ`` and ``GroupedResidualVQ`` over
vtok_fast's layers: replace ``from vector_quantize_pytorch import ...`` by
``from vtok_fast.compat.vector_quantize_pytorch import ...`` and keep the code and the checkpoints.

The classes are subclasses of ``vtok_fast.VectorQuantizer`` / ``ResidualVQ`` / ``GroupedResidualVQ``
configured to vector-quantize-pytorch 1.32's constructor arguments, defaults and conventions
(decay 0.8, the rotation trick when ``dim > 1``, eval loss 0 with no gradient path to the input, a
learnable codebook's loss ``commitment_weight * mse(q, z)`` with gradients to both, beams ranked by
summed commitment losses, k-means init also in eval); they add no computation of their own.

- An argument the original does not take raises ``TypeError`` naming it (Python's own message).
- An argument whose feature is not implemented here raises ``NotImplementedError`` naming it as
  soon as it is given a value other than its default (whether or not the original would use it),
  so no argument is ever silently ignored.
- The original's assertions on argument combinations raise ``ValueError`` naming the arguments.
- Every other bad value raises ``TypeError`` / ``ValueError`` naming the argument as the user passed
  it (``decay``, not the native ``ema_decay``).

Deviations, all on purpose: search ties and near-ties go to the lowest index / the truly nearest
code (exact fp32 search); dead codes are replaced from samples drawn by the layer's own synced
generator (with replacement when a batch has fewer rows than dead codes); with a mask, the
commitment loss compares the codes with the projected and normalized inputs in every configuration
(theirs uses the raw input, which is only right without projection, heads or cosine similarity);
``ResidualVQ(accept_image_fmap=True)`` / ``channel_last=False`` work (they fail there); a
``diveq`` residual quantizer's eval output is the codes (theirs adds noise in eval too); shared
codebooks replace dead codes once per step from all layers' residuals; a beam-search training step
trains every layer on the winning path (theirs updates only the first layer's codebook: it takes
``[..., 0, :]`` of a (rows, beams, layers, dim) tensor); a learnable codebook's cluster sizes are
tracked on every step (theirs only with dead-code replacement); ``_codebook`` is not an
attribute (the codebook buffers are ``embed`` / ``embed_sum`` / ``cluster_size`` / ``initted`` on
the layer, and ``load_state_dict`` maps their keys). As there, ``ResidualVQ.forward``'s
``freeze_codebook=False`` overrides a ``freeze_codebook=True`` given to the constructor.
"""
from __future__ import annotations

import inspect
from collections import namedtuple

from torch import nn

from vtok_fast.encode import residual_vq as _rvq
from vtok_fast.encode import vq as _vq
from vtok_fast.encode._vq_common import _check_int, _check_number

__all__ = ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "LossBreakdown"]

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# their arguments whose feature vtok_fast lacks -> their default
_UNSUPPORTED_VQ = {
    "layernorm_after_project_in": False, "commitment_use_cross_entropy_loss": False,
    "codebook_diversity_loss_weight": 0.0, "codebook_diversity_temperature": 100.0,
    "straight_through": False, "sync_affine_param": False, "vq_bridge": None, "manual_ema_update": False,
    "in_place_codebook_optimizer": None, "manual_in_place_optimizer_update": False, "affine_param": False,
    "affine_param_batch_decay": 0.99, "affine_param_codebook_decay": 0.9, "sync_update_v": 0.0,
}
_UNSUPPORTED_RVQ = {"implicit_neural_codebook": False, "mlp_kwargs": {}}
_UNSUPPORTED_VQ_FORWARD = {"indices": None, "topk": None, "codebook_transform_fn": None,
                           "ema_update_weight": None, "accum_ema_update": False}


def _reject(args: dict, unsupported: dict, where: str):
    for name, default in unsupported.items():
        value = args.get(name, default)
        if value is not default and value != default:
            raise NotImplementedError(f"{where}: {name}={value!r} is not implemented in vtok_fast "
                                      f"(only the default, {default!r})")


def _require(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def _native_vq_kwargs(a: dict) -> dict:
    """vtok_fast ``VectorQuantizer`` arguments for vector-quantize-pytorch ``VectorQuantize`` ones
    (all of them, defaults applied)."""
    _reject(a, _UNSUPPORTED_VQ, "VectorQuantize")
    # arguments the native layer knows under another name (or not at all), checked under theirs
    _check_int("dim", a["dim"])
    _check_number("decay", a["decay"], high=1.0)
    _check_number("threshold_ema_dead_code", a["threshold_ema_dead_code"])
    _check_number("directional_reparam_variance", a["directional_reparam_variance"])
    directional = a["directional_reparam"]
    ema_update = not directional if a["ema_update"] is None else a["ema_update"]
    learnable = directional if a["learnable_codebook"] is None else a["learnable_codebook"]
    rotation = (not directional and a["dim"] > 1) if a["rotation_trick"] is None else a["rotation_trick"]
    # the original's assertions
    _require(not (a["use_cosine_sim"] and learnable),
             "use_cosine_sim=True is not compatible with learnable_codebook=True")
    _require(int(bool(rotation)) + int(bool(directional)) <= 1,
             "at most one of rotation_trick and directional_reparam may be True")
    _require(not (directional and a["threshold_ema_dead_code"] == 0),
             "directional_reparam=True needs dead-code replacement: threshold_ema_dead_code > 0")
    _require(not (ema_update and learnable), "learnable_codebook=True needs ema_update=False")
    if not ema_update and not learnable:
        raise NotImplementedError("ema_update=False without learnable_codebook=True (a codebook that is "
                                  "neither EMA-updated nor learned) is not implemented in vtok_fast")
    if not a["sync_kmeans"] and a["sync_codebook"] is not False:
        raise NotImplementedError("sync_kmeans=False is not implemented in vtok_fast: with synced codebooks "
                                  "k-means init and dead-code replacement are always synced "
                                  "(pass sync_codebook=False to train every rank on its own)")
    if not a["route_gradients_to_input"]:
        gradient = "none"
    else:
        gradient = "diveq" if directional else "rotation" if rotation else "ste"
    return dict(
        dim=a["dim"], codebook_size=a["codebook_size"], codebook_dim=a["codebook_dim"], heads=a["heads"],
        separate_codebook_per_head=a["separate_codebook_per_head"],
        metric="cosine" if a["use_cosine_sim"] else "l2",
        commitment_weight=0.0 if directional else a["commitment_weight"],  # theirs: no commitment loss then
        gradient=gradient, diveq_variance=a["directional_reparam_variance"],
        ema_decay=None if learnable else a["decay"], usage_decay=a["decay"], eps=a["eps"],
        dead_code_threshold=a["threshold_ema_dead_code"], kmeans_init=a["kmeans_init"],
        kmeans_iters=a["kmeans_iters"], kmeans_init_in_eval=True, sync_codebook=a["sync_codebook"],
        channel_last=a["channel_last"] and not a["accept_image_fmap"] and not a["accept_3d_fmap"],
        codebook_loss="joint", eval_loss=False, eval_gradient=False,
        orthogonal_reg_weight=a["orthogonal_reg_weight"],
        orthogonal_reg_active_codes_only=a["orthogonal_reg_active_codes_only"],
        orthogonal_reg_max_codes=a["orthogonal_reg_max_codes"], freeze_codebook=a["freeze_codebook"],
        stochastic_sample_codes=a["stochastic_sample_codes"], sample_codebook_temp=a["sample_codebook_temp"],
        masked_output="zeros" if a["return_zeros_for_masked_padding"] else "input",
    )


def _arguments(frame_locals: dict) -> dict:
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class VectorQuantize(_vq.VectorQuantizer):
    """vector-quantize-pytorch's ``VectorQuantize`` (same arguments, defaults, outputs and
    checkpoints) on ``vtok_fast.VectorQuantizer``; see the module docstring."""

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False,
                 decay=0.8, eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10,
                 sync_kmeans=True, use_cosine_sim=False, layernorm_after_project_in=False,
                 threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False, accept_3d_fmap=False,
                 commitment_weight=1.0, commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.0,
                 orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
                 stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False,
                 rotation_trick=None, directional_reparam=False, directional_reparam_variance=5e-3,
                 sync_codebook=None, sync_affine_param=False, ema_update=None, vq_bridge=None,
                 manual_ema_update=False, learnable_codebook=None, in_place_codebook_optimizer=None,
                 manual_in_place_optimizer_update=False, affine_param=False, affine_param_batch_decay=0.99,
                 affine_param_codebook_decay=0.9, sync_update_v=0.0, return_zeros_for_masked_padding=True,
                 route_gradients_to_input=True):
        super().__init__(**_native_vq_kwargs(_arguments(locals())))

    def forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        _reject(_arguments(locals()), _UNSUPPORTED_VQ_FORWARD, "VectorQuantize.forward")
        if ema_update is not None and ema_update != (not self.learnable_codebook):
            raise NotImplementedError(f"VectorQuantize.forward: ema_update={ema_update!r} (overriding the "
                                      f"layer's EMA mode for one call) is not implemented in vtok_fast")
        out = super().forward(x, mask=mask, lens=lens, sample_codebook_temp=sample_codebook_temp,
                              freeze_codebook=freeze_codebook, return_loss_breakdown=return_loss_breakdown)
        if not return_loss_breakdown:
            return out
        quantized, idx, loss, parts = out
        zero = parts.codebook.new_zeros(())
        return quantized, idx, loss, LossBreakdown(parts.commitment, zero, parts.orthogonal_reg, zero)


_VQ_SIGNATURE = inspect.signature(VectorQuantize.__init__)


def _layer_kwargs(**kwargs) -> dict:
    """Native layer arguments for ``VectorQuantize`` arguments given to a ``ResidualVQ`` (a TypeError
    names an argument ``VectorQuantize`` does not take)."""
    try:
        bound = _VQ_SIGNATURE.bind(None, **kwargs)
    except TypeError as e:
        raise TypeError(f"ResidualVQ: {e} (arguments other than ResidualVQ's go to VectorQuantize)") from None
    bound.apply_defaults()
    return _native_vq_kwargs(_arguments(bound.arguments))


class ResidualVQ(_rvq.ResidualVQ):
    """vector-quantize-pytorch's ``ResidualVQ`` (same arguments, defaults, outputs and checkpoints)
    on ``vtok_fast.ResidualVQ``; beams are ranked their way (``beam_rank="vqp"``)."""

    def __init__(self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None, shared_codebook=False,
                 diveq=False, heads=1, quantize_dropout=False, quantize_dropout_cutoff_index=0,
                 quantize_dropout_multiple_of=1, accept_image_fmap=False, implicit_neural_codebook=False,
                 mlp_kwargs: dict = {}, beam_size=None, eval_beam_size=None,  # noqa: B006 (their default)
                 beam_score_quantizer_weights=None, quant_grad_frac=0.0, return_zeros_for_masked_padding=True,
                 **vq_kwargs):
        _reject(dict(implicit_neural_codebook=implicit_neural_codebook, mlp_kwargs=mlp_kwargs),
                _UNSUPPORTED_RVQ, "ResidualVQ")
        _require(heads == 1, f"ResidualVQ is not compatible with multi-headed codes: heads must be 1, got {heads!r}")
        _require(eval_beam_size is None or beam_size is not None, "eval_beam_size needs beam_size")
        if diveq:
            vq_kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                             commitment_weight=0.0)
        _check_int("dim", dim)  # the layers' dim is codebook_dim: check both under their own names
        codebook_dim = dim if codebook_dim is None else _check_int("codebook_dim", codebook_dim)
        sizes = codebook_size if isinstance(codebook_size, tuple) else (codebook_size,)
        layer = _layer_kwargs(dim=codebook_dim, codebook_size=sizes[0], codebook_dim=codebook_dim,
                              accept_image_fmap=accept_image_fmap,
                              return_zeros_for_masked_padding=return_zeros_for_masked_padding, **vq_kwargs)
        channel_last = layer.pop("channel_last")
        for name in ("dim", "codebook_size", "codebook_dim", "masked_output"):  # the residual VQ's own
            del layer[name]
        stochastic = layer["stochastic_sample_codes"]
        if stochastic and isinstance(beam_size, int) and beam_size > 1:
            raise NotImplementedError("ResidualVQ: stochastic_sample_codes=True with beam_size > 1 (beams "
                                      "perturbed by Gumbel noise) is not implemented in vtok_fast")
        super().__init__(num_quantizers, dim, codebook_size, codebook_dim=codebook_dim, channel_last=channel_last,
                         beam_size=beam_size, eval_beam_size=eval_beam_size, beam_rank="vqp",
                         shared_codebook=shared_codebook,
                         quantize_dropout=quantize_dropout,
                         quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of=quantize_dropout_multiple_of,
                         quant_grad_frac=1.0 if diveq else quant_grad_frac, diveq=diveq,
                         masked_output="zeros" if return_zeros_for_masked_padding else "input", **layer)
        self.beam_score_weights = _rvq._layer_weights(  # checked under their name
            "beam_score_quantizer_weights", beam_score_quantizer_weights, self.num_quantizers)

    def forward(self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        _reject(dict(indices=indices), {"indices": None}, "ResidualVQ.forward")
        return super().forward(x, beam_size, mask=mask, return_all_codes=return_all_codes,
                               sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                               rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed)

    def get_codes_from_indices(self, indices, *, missing_ok=True):  # theirs: -1 is always "no code"
        return super().get_codes_from_indices(indices, missing_ok=missing_ok)

    def get_output_from_indices(self, indices, *, missing_ok=True):
        return super().get_output_from_indices(indices, missing_ok=missing_ok)


class GroupedResidualVQ(_rvq.GroupedResidualVQ):
    """vector-quantize-pytorch's ``GroupedResidualVQ`` on ``vtok_fast.GroupedResidualVQ``: ``groups``
    compat ``ResidualVQ`` quantizers, one per slice of the features."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        nn.Module.__init__(self)
        self._build(dim, groups, not accept_image_fmap, lambda group_dim: ResidualVQ(
            dim=group_dim, accept_image_fmap=accept_image_fmap, **kwargs))

    def forward(self, x, indices=None, return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False,
                mask=None):
        _reject(dict(indices=indices), {"indices": None}, "GroupedResidualVQ.forward")
        out = super().forward(x, mask=mask, return_all_codes=return_all_codes,
                              sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook)
        return (*out[:3], tuple(out[3].unbind(0))) if return_all_codes else out  # theirs: one tensor per group
