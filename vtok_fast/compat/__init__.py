"""Drop-in front ends with other libraries' names, defaults and conventions over vtok_fast's layers.

- ``vtok_fast.compat.vector_quantize_pytorch``: ``VectorQuantize``, ``ResidualVQ``,
  ``GroupedResidualVQ`` of vector-quantize-pytorch (change the import, keep the code and checkpoints).
"""
