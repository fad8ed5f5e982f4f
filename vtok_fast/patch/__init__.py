"""Drop-in patchers for timm and Hugging Face vision models.

``timm(model, ...)`` and ``hf(model, ...)`` patch in place and return the model; each feature
(fused patch embedding, ToMe merging, fused token mergers / projectors, LLaVA token compression)
can be used alone, and a call that raises changes nothing. ``unpatch(model)`` restores the
original forward methods. Parameters and ``state_dict`` are never changed. ``tome_state(model)``
reads the ToMe settings and last-forward results of a patched model; ``image_token_count(model)``
(also under its former name ``llava_image_token_count``) gives the ``<image>`` tokens per image a
patched LLaVA prompt needs, and ``configure_processor(processor, model)`` sets a
``LlavaProcessor`` to insert them.
"""
from vtok_fast.patch._entry import hf, timm, unpatch
from vtok_fast.patch.hf_compress import configure_processor, image_token_count
from vtok_fast.patch.tome_common import ToMeResult, ToMeState, tome_state

llava_image_token_count = image_token_count  # the former name: one count for every patch

__all__ = ["timm", "hf", "unpatch", "tome_state", "ToMeState", "ToMeResult", "image_token_count",
           "llava_image_token_count", "configure_processor"]
