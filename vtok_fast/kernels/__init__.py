"""Triton device code for vtok_fast: ``@triton.jit`` kernels and their launch configurations.

Host code (references, launchers, autograd Functions) lives in ``vtok_fast/``. A kernel file
imports no torch and sizes no launch: it holds the kernels, their ``triton.Config`` lists and
what follows from a config alone (tile caps, the constants a kernel is launched with, shared-memory
estimates); grids, block sizes chosen from a shape and split counts are computed by the host
(``vtok_fast/_launch.py``: ``tile_grid``, ``strides``), which passes every argument by name.

Shared modules: ``_autotune.py`` (``autotune``: one config under the interpreter, and the one
shared-memory pruning every kernel uses), ``_tiles.py`` (the GEMM tile order, the accumulate step
and ``GEMM_CONFIGS``, the tile list of the GEMM kernels).

Tile sizes: constexprs named ``BLOCK_<X>`` (never ``BM``), the number of elements a program covers
or steps over along dimension ``X``; the letters are the roles of the Triton matmul tutorial, read
in the forward problem (a backward kernel keeps its forward's letters):

- ``BLOCK_M``: rows, the output rows a program owns (tokens, query rows, A tokens, codebook queries);
- ``BLOCK_N``: columns, the output columns or the other operand's rows that a loop walks (output
  features, keys, codes, B tokens);
- ``BLOCK_K``: one step along a reduced dimension (a ``tl.dot``'s K, a histogram's pixels);
- ``BLOCK_D``: a feature or head dimension held whole (padded to a power of two) or in chunks;
- ``BLOCK_C``: channels of a row-wise pass (statistics, a weighted copy);
- ``GROUP_M``: row tiles that walk the column tiles together (``_tiles.grouped_tile``).

A grid reads these names from the launch's config (``tile_grid(rows, cols, row_block="BLOCK_M",
col_block="BLOCK_N")``), so a kernel and its grid cannot disagree about a tile.
"""
