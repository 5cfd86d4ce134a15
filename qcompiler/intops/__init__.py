"""Integer ops, one module per op family (see ``registry`` for the contract every op fulfils).

Families: ``boundary`` (quantize / dequantize), ``gemm`` (conv, dense, matmul), ``elementwise``
(requantization, add/sub, mul, clip, PReLU, hard activations, lookup tables), ``compare``
(max/min of two activations, comparisons, logic, where), ``resample`` (linear / cubic Resize,
ConvTranspose's zero insertion), ``pool`` (pooling and
reductions), ``softmax``, ``nonlinear`` (LayerNorm, GELU), ``transformer`` (attention mask,
embedding, integer division, integer casts), ``shape`` (data movement), ``indexed`` (gathers and scatters at run-time indices, ScatterND, IsNaN), ``tables`` (per-channel lookup tables of a folded Affine), ``interp_table`` (interpolated tables of
16-bit inputs: recurrent gates), ``island`` (float islands of
``--allow-float``: one ONNX op kept in float).  Importing this package
registers all of them.
"""

from .registry import CHECKS, FLOAT_REFS, REGISTRY, RULES, Example, IntOp, float_ref, get, register, rule  # noqa: F401

from . import boundary, compare, elementwise, gemm, indexed, intdata, interp_table, island, nonlinear, pool, recurrent, resample, shape, softmax, tables, transformer  # noqa: E402,F401
