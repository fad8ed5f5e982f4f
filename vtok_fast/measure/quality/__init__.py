"""Answer-level quality of token compression.

- ``dataset``: a procedural visual-question dataset (deterministic from a seed, numpy/PIL);
- ``reference``: the tiny LLaVA-architecture reference model, tokenizer and processor, built offline;
- ``train``: its deterministic training, the cache and the committed checkpoint;
- ``drop``: random token drop between projector and decoder (training and the random floor);
- ``evaluate``: ``evaluate`` / ``compare`` any LLaVA model under any ``compress=`` spec;
- ``curves``: every method at 1x..16x; ``plot``: the accuracy-against-tokens panels;
- ``accuracy``: the held-out set; ``eval_cli``: ``vtok-fast eval``.
"""
