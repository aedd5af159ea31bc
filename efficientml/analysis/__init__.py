"""Cost analysis: parameters, size, MACs, activation memory, receptive field, latency, metrics.

    from efficientml.analysis import profile
    p = profile(model, (1, 3, 32, 32))          # one traced forward pass
    p.print(); p.to_dict(); p.to_markdown()

matplotlib is imported only by :func:`plot_layers`.
"""

from efficientml.analysis.latency import LatencyResult, measure_latency, num_threads
from efficientml.analysis.macs import (MacReport, OpCost, attention_macs, conv_macs, count_macs,
                                       linear_macs, matmul_macs)
from efficientml.analysis.memory import (ActivationMemory, activation_memory,
                                         peak_activation_memory)
from efficientml.analysis.metrics import (OutputComparison, accuracy, compare_models,
                                          compare_outputs, mean_nll, perplexity, sqnr,
                                          top1_agreement)
from efficientml.analysis.params import (SPARSE_FORMATS, count_parameters, model_size_bits,
                                         model_size_bytes, tensor_bits)
from efficientml.analysis.profile import LayerStats, ModelProfile, profile
from efficientml.analysis.receptive_field import (WindowLayer, conv_output_size, receptive_field,
                                                  receptive_fields)
from efficientml.analysis.roofline import (LayerRoofline, Roofline, arithmetic_intensity,
                                           layer_rooflines)
from efficientml.analysis.report import format_bytes, format_count, markdown_table, plot_layers
from efficientml.analysis.trace import Trace, trace_model

__all__ = [
    "ActivationMemory", "LatencyResult", "LayerRoofline", "LayerStats", "Roofline",
    "arithmetic_intensity", "layer_rooflines", "MacReport", "ModelProfile", "OpCost",
    "OutputComparison", "SPARSE_FORMATS", "Trace", "WindowLayer", "accuracy", "activation_memory",
    "attention_macs", "compare_models", "compare_outputs", "conv_macs", "conv_output_size",
    "count_macs", "count_parameters", "format_bytes", "format_count", "linear_macs",
    "markdown_table", "matmul_macs", "mean_nll", "measure_latency", "model_size_bits",
    "model_size_bytes", "num_threads", "peak_activation_memory", "perplexity", "plot_layers",
    "profile", "receptive_field", "receptive_fields", "sqnr", "tensor_bits", "top1_agreement",
    "trace_model",
]
