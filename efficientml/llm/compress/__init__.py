"""LLM compression: calibration one block at a time, scaling groups as data, RTN / AWQ / GPTQ /
SmoothQuant quantization, magnitude / Wanda / SparseGPT pruning, a quantized KV cache, and real
storage (packed int4/int3 weights in the compressed-tensors layout, W4A16 and W8A8 linears).

    quantize(model, AWQConfig(w_bits=4, group_size=128), calib)
    prune(model, PruneConfig("wanda", n_m=(2, 4)), calib)
"""

from efficientml.llm.compress.apply import prune, quantize, sparsity_of
from efficientml.llm.compress.awq import AWQConfig
from efficientml.llm.compress.calib import CalibConfig, calibration_tokens, run_blockwise
from efficientml.llm.io.compressed import load_compressed, save_compressed
from efficientml.llm.compress.gptq import GPTQConfig
from efficientml.llm.compress.kv_quant import QuantizedKVCache
from efficientml.llm.compress.magnitude import PruneConfig
from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear
from efficientml.llm.compress.rtn import RTNConfig
from efficientml.llm.compress.smoothquant import SmoothQuantConfig

__all__ = ["AWQConfig", "CalibConfig", "GPTQConfig", "PruneConfig", "QuantLinear", "QuantizedKVCache", "RTNConfig",
           "SmoothQuantConfig", "W8A8Linear", "calibration_tokens", "load_compressed", "prune",
           "quantize", "run_blockwise", "save_compressed", "sparsity_of"]
