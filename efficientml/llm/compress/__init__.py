"""LLM compression: calibration one block at a time, scaling groups as data, RTN / AWQ / GPTQ /
SmoothQuant quantization, magnitude / Wanda / SparseGPT pruning, a quantized KV cache, and real
storage (packed int4/int3 weights in the compressed-tensors layout, W4A16 and W8A8 linears).
Every technique is a config applied by :func:`efficientml.apply` (handlers registered on import):

    apply(model, AWQConfig(w_bits=4, group_size=128), calib=calib, inplace=True)
    apply(model, LLMPruneConfig("wanda", n_m=(2, 4)), calib=calib, inplace=True)
    apply(model, KVCacheQuantConfig(bits=8), inplace=True)
"""

from efficientml.llm.compress.apply import sparsity_of
from efficientml.llm.compress.awq import AWQConfig
from efficientml.llm.compress.calib import CalibConfig, calibration_tokens, run_blockwise
from efficientml.llm.io.compressed import load_compressed, save_compressed
from efficientml.llm.compress.gptq import GPTQConfig
from efficientml.llm.compress.kv_quant import KVCacheQuantConfig, QuantizedKVCache
from efficientml.llm.compress.magnitude import LLMPruneConfig
from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear
from efficientml.llm.compress.rtn import RTNConfig
from efficientml.llm.compress.smoothquant import SmoothQuantConfig

__all__ = ["AWQConfig", "CalibConfig", "GPTQConfig", "KVCacheQuantConfig", "LLMPruneConfig", "QuantLinear",
           "QuantizedKVCache", "RTNConfig", "SmoothQuantConfig", "W8A8Linear",
           "calibration_tokens", "load_compressed", "run_blockwise", "save_compressed", "sparsity_of"]
