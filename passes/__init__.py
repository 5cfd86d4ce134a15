"""Graph passes over the named-tensor IR (``qcompiler.graph.Graph``), one file each.

Float passes (semantics preserving, tensor names of surviving tensors preserved so that
calibration ranges keyed by ONNX names stay valid):
  canonicalize      op normal forms (Gemm/MatMul+Add -> Dense, Sub/Div by constants, Relu -> Clip,
                    pools' ceil_mode -> explicit pads, Resize(nearest) -> Gather, Split -> Slice ...)
  fold_batchnorm    BatchNormalization folded into the preceding Conv (else a per-channel affine)
  fuse_patterns     decomposed HardSwish / HardSigmoid recognised
  fuse_activation   Clip/Relu after Conv, Dense or Add folded into the producer's clamp
  sign              which tensors are provably non-negative (for unsigned activations)
Integer passes:
  quantize          float graph + calibration ranges -> integer graph (rules in quantize_*.py)
  overflow          compile-time interval bounds for every integer op
"""
