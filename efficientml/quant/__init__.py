"""Quantization: number formats, linear and k-means quantization, Deep Compression, calibration,
AdaRound, QAT, binary/ternary, mixed precision, integer-only int8 inference and ONNX export.

    from efficientml.quant import quantize, IntegerConfig
    int8 = quantize(model, IntegerConfig(observer="kl"), calibration=loader).model
    int8.with_mode("fast")(x)                # PyTorch's int8 kernels on the same integers

Importing this package loads no optional dependency (onnx, matplotlib are imported where used).
"""

from efficientml.quant.adaround import AdaRoundConfig, adaround, adaround_layer
from efficientml.quant.apply import BinaryConfig, QuantizeResult, WeightOnlyConfig, quantize
from efficientml.quant.binary import binarize, binarize_model, pack_signs, xnor_popcount_matmul
from efficientml.quant.deep_compression import (DeepCompressionConfig, load_compressed, magnitude_prune,
                                                round_to_float16, save_compressed, size_breakdown)
from efficientml.quant.formats import FORMATS, get_format
from efficientml.quant.integer import IntegerConfig, IntegerModel, convert_integer, fold_bn
from efficientml.quant.kmeans import KMeansConfig, kmeans_1d, kmeans_quantize, strip_kmeans
from efficientml.quant.grid import GridSpec, QTensor, fake_quantize
from efficientml.quant.linear import vsquant
from efficientml.quant.mixed import MixedPrecisionConfig, layer_sensitivity, search_bits
from efficientml.quant.observers import OBSERVERS
from efficientml.quant.qat import QATConfig, export_qat, prepare_qat

__all__ = [
    "AdaRoundConfig", "BinaryConfig", "DeepCompressionConfig", "FORMATS", "IntegerConfig", "IntegerModel",
    "GridSpec", "KMeansConfig", "MixedPrecisionConfig", "OBSERVERS", "QATConfig", "QTensor", "QuantizeResult",
    "WeightOnlyConfig", "adaround", "adaround_layer", "binarize", "binarize_model", "convert_integer",
    "fake_quantize", "export_qat", "fold_bn", "get_format", "kmeans_1d", "kmeans_quantize",
    "layer_sensitivity", "load_compressed", "magnitude_prune", "pack_signs", "prepare_qat", "quantize",
    "round_to_float16", "save_compressed", "search_bits", "size_breakdown", "strip_kmeans", "vsquant",
    "xnor_popcount_matmul",
]
