"""Group and block formats on layers they do not divide (issue #16, part 2 item 4): a TF-style stem conv
has 3·3·3 = 27 inputs per output channel; int4 group 32, NF4 block 64 and MXFP4 block 32 fall back per
layer (recorded in the result) instead of raising."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ShapeError
from efficientml.models.tf_style import tf_style_mobilenet
from efficientml.quant import WeightOnlyConfig, quantize
from efficientml.quant.apply import fit_group
from efficientml.quant.formats import FORMATS, NF4Format, quantize_to_format


def test_fit_group_picks_the_group_that_divides():
    assert fit_group(256, 32) == 32                   # divides: unchanged
    assert fit_group(27, 32) == 27                    # shorter row: one group per channel
    assert fit_group(27, 64) == 27
    assert fit_group(1000, 128) == 125                # largest divisor below, still ≥ 128/4
    assert fit_group(96, 64) == 48
    assert fit_group(1151, 128) == 1151               # prime: per channel, not 1151 groups of 1


@pytest.mark.parametrize("cfg", [WeightOnlyConfig(format="int4", granularity="group", group_size=32),
                                 WeightOnlyConfig(format="nf4"), WeightOnlyConfig(format="mxfp4")])
def test_stem_conv_falls_back_per_layer_and_the_rest_keeps_the_group(cfg):
    model = tf_style_mobilenet()
    stem = model.stem[1].weight.detach().clone()                       # (16, 3, 3, 3): 27 inputs
    res = quantize(model, cfg)
    fb = res.report["fallbacks"]
    assert "stem.1" in fb and "27 inputs" in fb["stem.1"] and "per channel" in fb["stem.1"]
    assert res.layers["stem.1"].startswith(cfg.format + " (")
    for name, note in fb.items():                                      # only layers the size does not divide
        w = dict(model.named_modules())[name].weight
        assert w[0].numel() % (cfg.group_size if cfg.format == "int4" else FORMATS.get(cfg.format).block)
    assert res.layers["blocks.1.project.0"] == cfg.format and "blocks.1.project.0" not in fb   # 64 inputs
    # the fallback is exactly the per-channel (one block per row) quantization of the stem
    fmt = FORMATS.get(cfg.format)
    if cfg.format == "int4":
        expect = quantize_to_format(stem, fmt, granularity="channel")
    else:
        expect = quantize_to_format(stem, dataclasses.replace(fmt, block=27))
    assert torch.equal(res.model.stem[1].weight, expect)
    err = (res.model.stem[1].weight.detach() - stem).pow(2).sum() / stem.pow(2).sum()
    assert float(10 * torch.log10(1 / err)) > 10                       # a 4-bit grid: > 10 dB


def test_strict_groups_keeps_the_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ShapeError, match="layer '0'"):
        quantize(model, WeightOnlyConfig(format="nf4", strict_groups=True))
    res = quantize(model, WeightOnlyConfig(format="nf4"))
    assert res.report["fallbacks"] == {"0": "block 64 does not divide the 27 inputs per output channel; per channel"}
    assert isinstance(FORMATS.get("nf4"), NF4Format)
