"""Benchmarks for vtok_fast (installed as ``vtok_fast.bench``): one module per op.

Each module exposes ``OP``, ``cases(quick, device)``, ``providers()`` and ``MODES``; the
harness runs every provider on every case side by side and writes one JSON file per run.
"""

OPS = {
    "patch-embed": "vtok_fast.bench.patch_embed",
    "codebook": "vtok_fast.bench.codebook",
    "tome": "vtok_fast.bench.tome",
    "attention": "vtok_fast.bench.attention",
    "merge": "vtok_fast.bench.merge",
    "compress": "vtok_fast.bench.compress",
    "fastv": "vtok_fast.bench.fastv",
    "adaptive": "vtok_fast.bench.adaptive",
}
# Benchmarks that are not timing ops on the harness: ``vtok-fast bench NAME`` calls the module's
# ``run(args)``; ``bench all`` leaves them out (the quality curves take minutes, not a timing).
SUITES = {
    "quality": "vtok_fast.bench.quality",
    "vlm": "vtok_fast.bench.vlm",
}
