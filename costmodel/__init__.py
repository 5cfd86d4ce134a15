"""Learned latency model of the integer kernels: features, XGBoost training, prediction, roofline.

Design
------
* Data.  Two kinds of measured samples, both JSON lines under ``autotune_logs/<device>/``:

  - tuning records (``records.jsonl``, schema ``qc-tune/1``, written by ``qc tune``): one VNNI /
    tensor-core conv or dense kernel (a *workload*) with one config of its search space and its
    median latency measured alone;
  - profile records (``profiles.jsonl``, schema ``qc-profile/1``, written by
    ``python -m costmodel.profile``): every kernel call of a compiled library -- the zoo models
    and the synthetic transformer encoders and CNNs of ``synth_models.py`` (random weights: latency
    depends on shapes only) -- (elementwise /
    requant chains, reductions, softmax, layernorm, layout moves, the GEMMs) found through the
    Relax VM instrument hook, timed inside the running model (the callback's own cost, measured on
    the VM's near-empty builtin calls, removed) and alone on its own arguments with
    ``time_evaluator``, with its scheduled TIR (gzip+base64) and its model; plus one
    ``type: "model"`` line per library with the whole-model latency of ``qc bench``'s timer.
    Profiled kernels are learned with their in-model time (feature ``t_in_model`` = 1), tuning
    records with their time alone (0); ``qc predict`` asks for in-model times.  A compiled conv /
    dense kernel carries its tuning workload and config as PrimFunc attributes (``qc.workload``,
    ``qc.config``: ``qcompiler.tune.apply.tag``), so a profiled or predicted in-model GEMM gets the
    ``cfg`` features and the GEMM roofline baseline like a tuning record, and shares its split
    group (the workload key) with that workload's tuning records.

* Features (schema :data:`FEATURE_SCHEMA`, ``features.py``), four families, one fixed-width vector:

  - ``target``: kind, core or SM count, clock, peak int8 ops/s, memory bandwidth (a table of
    nominal figures per arch, the record's own core / SM count when it has one) so one model can
    serve several devices, and the timing context (``t_in_model``);
  - ``cfg``: the GEMM's analytic description when the sample has a workload (kind, M/N/K or
    conv geometry, operand and output bit widths, MACs, bytes of A/W/out, arithmetic intensity,
    the config fields -- VNNI ``mr/nr/kc/n_outer`` or MMA ``bm/bn/bk/warps/stages`` -- tile counts,
    padding waste, accumulator registers, per-core imbalance, roofline time), and (v2) the VNNI
    kernel's analytic model: modelled cycles of the register tile, absolute and relative to the
    model's best tile, operand loads per ``vpdpbusd``, registers used, A/W traffic by loop order,
    panel/block bytes, last-wave idle share.  Missing (NaN) for kernels that have no config space;
  - ``tir``: read from the scheduled TIR of any kernel: loop kinds and extents (parallel extent,
    vector widths, unroll factors, nest depth), dynamic op counts (every op on a store's right-hand
    side weighted by the iterations of its enclosing loops, split by kind: mul, add, shift, cast,
    min/max, select, division, VNNI intrinsic), bytes read and written, parameter and scratch
    bytes by dtype (v3: also of Relax-lowered kernels, whose shapes print as ``T.int64(n)`` and
    read as no parameter before), per-core work; plus MetaSchedule's ``PerStoreFeature`` (164 per store) summed
    and maxed over the stores when the PrimFunc is available;
  - ``text``: the TIR read as language (after "ML-driven Hardware Cost Model for MLIR"): tokens of
    the TVMScript (op names, dtypes, loop kinds, intrinsic names, block names, extents normalised to
    small integers or powers of two) hashed into 1..3-gram counts with scikit-learn's
    ``HashingVectorizer`` (2^11 columns, stateless, so no vocabulary is stored).

  "structural" = target + cfg + tir; the ablation compares structural / text / both.

* Models (``train.py``): XGBoost on log(latency) over a baseline (v2: the GEMM roofline of the
  TIR for GEMM kernels with a workload (tuning candidates, tagged compiled kernels), an
  NNLS-fitted linear time model of op counts and bytes read + written for any other kernel, fitted
  on those kernels (v3); the boosters learn the
  log residual, so shapes beyond the training range keep the baseline's scale) -- a squared-error
  regressor (the point estimate),
  a quantile regressor (``reg:quantileerror``, alphas 0.1/0.9: the uncertainty band, capped at
  x/÷20 and widened by a conformal margin fitted by group 3-fold on the training data so that 80%
  of unseen workloads fall inside) -- an ``XGBRanker`` (``rank:pairwise``, query = workload) for
  search, and a config-only regressor (target + cfg families) for the compile-time picker.  Saved as ONE JSON file:
  ``{"schema": MODEL_SCHEMA, "feature_schema": FEATURE_SCHEMA, "target": {...}, "features": [...],
  "boosters": {"reg" | "q" | "rank" | "cfg": <XGBoost JSON model>}, "baseline": {"terms",
  "coef_s"}, "band": {"quantiles",
  "margin_log"}, "calibration": {"per_call_ms"}}`` -- XGBoost's own JSON format embedded, no pickle
  anywhere.  Another model schema, feature schema or target is refused (``CostModelError``).

* Prediction (``predict.py``): ``CostModel.load`` checks the model schema, the feature schema and
  the target (another one: ``CostModelError``, exit 2 at the CLI); ``predict`` returns the point
  estimate and the band; a target without a model gets :func:`predict.roofline`, labelled
  ``source: "roofline"``.  ``CostModel`` keeps MetaSchedule's small interface (load / save /
  update / predict) so the tuner does not know which model is behind it.

* Whole model (``qc predict``): the model is quantized and lowered exactly as ``qc compile`` does
  (tuned configs applied) but not code-generated; the kernels of the Relax ``main`` are predicted in
  execution order and summed, plus a per-call runtime overhead fitted on the profiled libraries
  (VM dispatch and allocation, stored in the model file's ``calibration``).

* Inside the compiler (``qcompiler/tune/apply.py``): a conv/dense kernel without a tuned record
  gets the candidate the model predicts fastest over its whole config space (``cfg`` family
  only: no TIR is built for the candidates it rejects); ``$QC_COSTMODEL=off`` disables it.  The
  tuner (``qcompiler/tune/tuner.py``) walks each task's config space in the model's predicted
  order after the default config (warm start; ``qc tune --cost-model FILE|off``, by default
  ``$QC_TUNE_COSTMODEL`` or ``costmodels/<device>.json``).
"""

FEATURE_SCHEMA = "qc-cost-features/3"
MODEL_SCHEMA = "qc-costmodel/3"
PROFILE_SCHEMA = "qc-profile/1"

__all__ = ["FEATURE_SCHEMA", "MODEL_SCHEMA", "PROFILE_SCHEMA"]
