"""Answer-level quality of token compression.

- ``dataset``: a procedural visual-question dataset (deterministic from a seed, numpy/PIL);
- ``reference``: the tiny LLaVA reference model, tokenizer and processor, built offline, and the
  dispatch to ``reference_qwen``, the tiny Qwen2-VL one (M-RoPE);
- ``train``: their deterministic training, the cache and the committed checkpoints;
- ``drop``: random token drop between projector and decoder (training and the random floor; LLaVA
  and Qwen2-VL's M-RoPE ids);
- ``evaluate``: ``evaluate`` / ``compare`` any supported VLM under any ``compress=`` spec;
- ``curves``: every method at 1x..16x; ``plot``: the accuracy-against-tokens panels;
- ``accuracy``: the held-out set; ``eval_cli``: ``vtok-fast eval``.
"""
