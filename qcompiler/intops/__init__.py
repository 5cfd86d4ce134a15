"""Integer ops, one module per op family (see ``registry`` for the contract every op fulfils).

Families: ``boundary`` (quantize / dequantize), ``gemm`` (conv, dense, matmul), ``elementwise``
(requantization, add, mul, clip, PReLU, hard activations, lookup tables), ``pool`` (pooling and
reductions), ``softmax``, ``nonlinear`` (LayerNorm, GELU), ``transformer`` (attention mask,
embedding, integer division, integer casts), ``shape`` (data movement).  Importing this package
registers all of them.
"""

from .registry import CHECKS, REGISTRY, RULES, Example, IntOp, get, register, rule  # noqa: F401

from . import boundary, elementwise, gemm, nonlinear, pool, shape, softmax, transformer  # noqa: E402,F401
