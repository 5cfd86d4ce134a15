"""Autotuning of the conv/dense kernels: ``qc tune``, ``qc measure``, and their use by ``qc compile``.

Design
------
* Search space.  Our GEMM/conv kernels are hand-scheduled TensorIR with explicit parameter
  dataclasses (``cpu_vnni.VnniConfig``, ``cuda_mma.MmaConfig``); they are not produced by
  MetaSchedule's sketch rules, so the tuner searches each task's *config space* (the dataclass
  fields) instead of MetaSchedule's design space.  A point is valid when the dataclass accepts it
  and the kernel generator does not raise ``ValueError`` / ``KernelUnsupported``
  (``workload.Workload.config_space`` / ``make_func``).
* Measurement is TVM's engine: MetaSchedule's ``LocalBuilder`` (our ``f_build``/``f_export``) and
  ``LocalRunner`` or ``RPCRunner`` (``--rpc-tracker HOST:PORT --rpc-key KEY``: TVM's tracker and
  ``tvm.exec.rpc_server`` processes), timing with ``time_evaluator`` (``measure.py``).
* Tasks are the distinct conv/dense kernels of the quantized graphs of the given models (workload
  key: backend, kind, shapes, dtypes, strides/pads/dilations, out dtype/lo/hi, target),
  deduplicated across models by key.  Weights and scales do not change kernel speed, so without
  ``--calib`` the models are quantized with random calibration data of their input shapes.
* Trials are spread over tasks by expected gain (``tuner.py``): round robin until each task has
  ``WARMUP`` trials (the default config first), then the task maximizing
  ``best latency x uses x (improvements + 1) / (trials + 2)``.  Progress: a bar over trials plus a
  line per batch (task, trials, best so far vs default, ETA) through ``qcompiler.progress``.
  Within a task: the default config, then alternately a neighbour of a best point and the next
  proposal -- in the cost model's predicted order of the task's space when a model is available
  (``--cost-model``, default ``costmodels/<device>.json``: warm start), at random otherwise.
* Records (``records.py``): ``autotune_logs/<device-name>/records.jsonl``, JSON lines appended one
  at a time with a single ``os.write`` + ``fsync``; corrupt or partial lines are skipped and
  counted, records of another target/device or TVM version are warned about and skipped.
  Resumable: configs already in the log are never measured again and ``--trials`` counts the old
  records, so a killed run (SIGKILL included) continues where it stopped.
* Offline cycle for machines without the compiler (``offline.py``): ``qc tune --export-candidates
  DIR`` builds a batch here (CPU ``.so``; CUDA cross-compiled, the libraries carrying the CUDA
  source as TVM 0.27 builds them) with ``manifest.json``; ``qc measure DIR`` times them with the TVM
  runtime alone and writes ``DIR/results.jsonl``; ``qc tune --import DIR`` appends the results to
  the log; exporting again proposes the next batch.
* Use (``apply.py``): ``qc compile`` looks up the best record of each kernel's workload in the log
  of ``CompileOptions.tune_log`` / ``$QC_TUNE_LOG`` / ``autotune_logs/<device-name>/`` and records in
  the metadata (``tuning``) which layers run a tuned config.

Not here: a MetaSchedule full search for the non-GEMM kernels (those keep the default schedules;
``costmodel.ms_adapter`` makes our model usable as MetaSchedule's cost model for such a search).
"""
