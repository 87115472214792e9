"""Triton kernels for the CUDA decode/prefill path, each next to a pure-torch reference of the same
signature (the reference is the spec; tests compare the two on random inputs).

Importing a kernel module needs triton (CUDA installs only; CI has none), so this package imports
nothing eagerly: use `from model.kernels.paged_attention import paged_decode_attention`, etc.

  paged_attention  paged decode attention (GQA-grouped, split-K flash-decoding, sliding window, fp8 K/V)
  lora             grouped LoRA shrink/expand: one launch each per fused projection group, tokens
                   grouped by adapter (plans built on the device for decode, from segments in prefill)
  rmsnorm          fused residual-add + RMSNorm
  rotary           rotary embedding fused with the paged K/V cache write
  gemm             dense x @ W^T for small M (tl.dot tiles / GEMV, in-kernel split-K) and a dispatch table
"""
