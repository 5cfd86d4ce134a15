"""Mixed precision (HAWQ-V3 style): which GEMM/conv layers take 4-bit weights (W4A8), stay at W8A8,
or get 16-bit input activations (W8A16), chosen by an ILP over forward-pass sensitivities and
learned-cost-model latencies.  ``docs/mixed_precision.md`` describes the whole path.

Modules: ``ilp`` (the ILP, TVM-free), ``gptq`` (4-bit weight rounding with error feedback),
``sensitivity`` (per-layer Omega, cached), ``latency`` (per-layer latency of every choice),
``plan`` (choices, pins, ties, the plan a compile consumes), ``pareto`` (the frontier and its
baselines), ``cli`` (the compile flags and ``qc mixed-precision``).
"""
