"""Channel ops registered by a user before the first trace (issue #15, item 6).

The old registry filled in PyTorch's modules lazily on the first trace, and only if the registry was
empty: a ``register_channel_op`` call made first left Conv/BatchNorm/Linear unknown, so channel pruning
failed on every model. The script runs in a fresh interpreter so nothing has been traced before.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import copy, json
import torch, torch.nn as nn
from efficientml.core.channels import CHANNEL_OPS
from efficientml.prune import Member, PruneConfig, prune, register_channel_op

builtin_at_import = all(t in CHANNEL_OPS for t in (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU))

class ChannelScale(nn.Module):            # y[:, c] = x[:, c] * weight[c]
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)

def trace(ctx, module, ids):              # passes channels through and owns them as outputs
    for i, c in enumerate(ids):
        ctx.ids.add(c, Member(ctx.name, "out", i))
    return ids

def shrink(module, keep_in, keep_out):
    keep = keep_out if keep_out is not None else keep_in
    new = ChannelScale(len(keep))
    new.weight.data = module.weight.data[torch.as_tensor(keep)].clone()
    return new

register_channel_op(ChannelScale, trace, shrink)   # before any trace

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelScale(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 4)).eval()
x = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    ref = model(x)
    same = prune(model, PruneConfig(method="channel", sparsity=0.0), example_inputs=x).model.eval()
    half = prune(model, PruneConfig(method="channel", sparsity=0.5), example_inputs=x)
    small = half.model.eval()
    masked = half.plan.zero_out(copy.deepcopy(model)).eval()
    out = {
        "builtin_at_import": builtin_at_import,
        "ratio0_max_diff": (same(x) - ref).abs().max().item(),
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in small.parameters()),
        "shapes": [small[0].out_channels, small[1].weight.numel(), small[3].in_channels,
                   small[3].out_channels, small[7].in_features],
        "scale_type": type(small[1]).__name__,
        "masked_max_diff": (small(x) - masked(x)).abs().max().item(),
    }
print(json.dumps(out))
'''


def test_register_channel_op_before_first_trace_prunes_with_builtins():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["builtin_at_import"] is True
    assert r["ratio0_max_diff"] == 0.0
    # 8 → 4 channels in both convs and the scale; the head keeps its 4 outputs
    assert r["shapes"] == [4, 4, 4, 4, 4]
    assert r["scale_type"] == "ChannelScale"
    before = (8 * 3 * 9 + 8) + 8 + (8 * 8 * 9 + 8) + (8 * 4 + 4)
    after = (4 * 3 * 9 + 4) + 4 + (4 * 4 * 9 + 4) + (4 * 4 + 4)
    assert (r["params_before"], r["params_after"]) == (before, after)
    assert r["masked_max_diff"] < 1e-5   # physically smaller == the same channels zeroed in place


def test_zoo_describes_its_shortcut_through_the_registry():
    from efficientml.core.channels import CHANNEL_OPS
    from efficientml.models.resnet_cifar import CifarResNet, PadShortcut
    from efficientml.prune import channel_attrs

    assert CHANNEL_OPS[PadShortcut].attrs == ("in_channels", "out_channels")
    attrs = channel_attrs(CifarResNet(20))
    # two option-A shortcuts (16→32, 32→64), in stage 2 and 3's first blocks
    assert attrs == {"layer2.0.shortcut": [16, 32], "layer3.0.shortcut": [32, 64]}
