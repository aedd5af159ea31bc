"""Kernels the LLM runs on, swapped in as modules at load time (the model itself has no kernel
dispatch): the fp32 CPU matrix-vector kernel (``cpu_gemv``, C source in ``csrc/``, compiled on first
use), the Triton matrix-vector kernel for CUDA (``triton_gemv``), what they share (``gemv_op``), the
packed weight-only and W8A8 linears (``qlinear``) and their fused Triton kernel (``triton_wq``).
Submodules are imported on use."""
