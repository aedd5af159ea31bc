import json

import pytest
import torch.nn as nn

from efficientml.analysis import ModelProfile, profile
from efficientml.core.errors import ShapeError


def test_profile_vgg_figures(zoo):
    p = profile(zoo("vgg"), (1, 3, 32, 32), name="vgg")
    assert isinstance(p, ModelProfile)
    assert (p.params, p.macs) == (9_228_362, 605_754_368)
    assert p.size_bytes == {"fp32": 9_228_362 * 4, "int8": 9_228_362}
    # peak: bn1 reads conv1's 128×32×32 output and writes a new one
    assert p.peak_activation_elements == 2 * 128 * 32 * 32
    assert p.peak_activation_step == "backbone.bn1"
    assert p.peak_activation_bytes(32) == 4 * 2 * 128 * 32 * 32
    assert p.latency is None
    conv0 = p.layers[0]
    assert (conv0.name, conv0.kind, conv0.output_shape, conv0.params, conv0.macs) == \
        ("backbone.conv0", "Conv2d", (1, 64, 32, 32), 1728, 32 * 32 * 64 * 27)
    relu0 = p.layers[2]                                  # in place: no new buffer, same size
    assert (relu0.name, relu0.output_elements, relu0.input_elements) == \
        ("backbone.relu0", 64 * 32 * 32, 64 * 32 * 32)
    assert sum(l.macs for l in p.layers) == p.macs
    assert sum(l.params for l in p.layers) == p.params
    assert [w.receptive_field for w in p.windows][:3] == [(3, 3), (5, 5), (6, 6)]


def test_profile_dict_json_and_markdown(zoo):
    p = profile(zoo("resnet20"), (1, 3, 32, 32), name="resnet20")
    d = json.loads(json.dumps(p.to_dict()))
    assert d["params"] == 269_722 and d["macs"] == 40_551_040
    assert d["peak_activation"] == {"elements": 49152, "fp32_bytes": 196608.0,
                                    "int8_bytes": 49152.0, "at": "layer1.0.bn1"}
    assert d["layers"][0]["name"] == "conv1" and d["layers"][0]["output_shape"] == [1, 16, 32, 32]
    assert len(d["receptive_fields"]) == 19            # 19 convs; option-A shortcuts have none
    md = p.to_markdown()
    assert "| MACs | 40.55M (40,551,040) |" in md and "| layer1.0.conv1 | Conv2d |" in md


def test_profile_sparse_sizes():
    m = nn.Linear(8, 4, bias=False)
    nn.init.zeros_(m.weight)
    m.weight.data[0, 0] = 1.0
    p = profile(m, (1, 8), sparse_format="bitmask")
    assert p.nonzero_params == 1
    assert p.size_bytes["int8_bitmask"] == (8 + 32) / 8
    assert p.size_bytes["fp32_bitmask"] == (32 + 32) / 8


def test_profile_latency_record(zoo):
    p = profile(nn.Sequential(nn.Linear(4, 4)), (1, 4), latency=True, warmup=1, runs=3, threads=1)
    assert (p.latency.runs, p.latency.threads, p.latency.device) == (3, 1, "cpu")
    assert p.to_dict()["latency"]["median_ms"] > 0


def test_wrong_channel_count_is_a_shape_error(zoo):
    with pytest.raises(ShapeError) as e:
        profile(zoo("vgg"), (1, 1, 32, 32))
    msg = str(e.value)
    assert "(1, 1, 32, 32)" in msg and "(N, 3, H, W)" in msg
    assert "\n" not in msg


def test_non_positive_shape_rejected():
    with pytest.raises(ShapeError, match="positive"):
        profile(nn.Linear(2, 2), (1, 0))


def test_plot_layers_is_lazy_and_writes_a_file(tmp_path, zoo):
    pytest.importorskip("matplotlib")
    from efficientml.analysis import plot_layers

    p = profile(zoo("resnet20"), (1, 3, 32, 32), name="resnet20")
    out = tmp_path / "macs.png"
    plot_layers(p, out)
    assert out.stat().st_size > 1000


def test_layer_params_add_up_with_functional_weights():
    import torch

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.scale = nn.Parameter(torch.ones(16, 16))     # used in a functional matmul
            self.head = nn.Linear(16, 100, bias=False)
            self.head.weight = self.emb.weight                # tied: counted once

        def forward(self, ids):
            h = self.enc(self.emb(ids)) @ self.scale
            return self.head(h)

    p = profile(LM(), inputs=torch.randint(0, 100, (1, 12)))
    assert p.params == 1600 + 16 * 16 + (4 * 16 * 16 + 4 * 16) + (16 * 32 + 32 + 32 * 16 + 16) + 4 * 16
    assert sum(l.params for l in p.layers) == p.params
    mha = next(l for l in p.layers if l.kind == "multi_head_attention_forward")
    assert mha.params == 4 * 16 * 16 + 4 * 16
    assert mha.macs == 12 * 4 * 16 * 16 + 2 * 12 * 12 * 16
    assert p.peak_activation_step == "head"
    assert p.peak_activation_elements == 12 * 16 + 12 * 100
