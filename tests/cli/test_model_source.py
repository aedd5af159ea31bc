"""The CLI on models we did not write: path/to/file.py:Name (class or factory, --model-arg), a
torch.export program (.pt2), and plain state dicts (.pt, .safetensors) for a zoo or user architecture.
The user model is built like a TF-ported MobileNet: "SAME" padding as nn.ZeroPad2d, a depthwise conv,
ReLU6."""

import json
import textwrap

import pytest
import torch
import torch.nn as nn

from efficientml.cli.main import main

USER_MODEL = textwrap.dedent('''
    import torch.nn as nn


    class TinyTF(nn.Module):
        def __init__(self, width: int = 8, num_classes: int = 10, pad: bool = True):
            super().__init__()
            # TF "SAME" for a stride-2 3x3 conv on an even input: one extra row/column at the end
            self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if pad else nn.Identity()
            self.stem = nn.Conv2d(1, width, 3, stride=2, padding=0 if pad else 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.pw = nn.Conv2d(width, 2 * width, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(2 * width)
            self.act1, self.act2, self.act3 = nn.ReLU6(), nn.ReLU6(), nn.ReLU6()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            x = self.act1(self.bn1(self.stem(self.pad(x))))
            x = self.act2(self.bn2(self.dw(x)))
            x = self.act3(self.bn3(self.pw(x)))
            return self.fc(self.pool(x).flatten(1))


    def make(width: int = 8, pad: bool = True):
        return TinyTF(width, pad=pad)
''')


def _macs(width: int) -> int:
    """Conv/linear MACs at 1×1×28×28: the 29×29 padded input gives 14×14 after the stride-2 stem."""
    hw = 14 * 14
    return hw * width * 9 + hw * width * 9 + hw * 2 * width * width + 2 * width * 10


def _json(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "user_model.py"
    p.write_text(USER_MODEL)
    return p


def _build(user_file, **kw):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_model_ref", user_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TinyTF(**kw)


def test_profile_user_class_and_factory(user_file, capsys):
    p = _json(["profile", f"{user_file}:TinyTF", "--input-shape", "1,1,28,28", "--json", "--no-layers"], capsys)
    ref = _build(user_file)
    assert p["macs"] == _macs(8)
    assert p["params"] == sum(t.numel() for t in ref.parameters())
    f = _json(["profile", f"{user_file}:make", "--model-arg", "width=4", "--input-shape", "1,1,28,28", "--json",
               "--no-layers"], capsys)
    assert f["macs"] == _macs(4)
    assert f["params"] == sum(t.numel() for t in _build(user_file, width=4).parameters())


def test_profile_exported_program_matches_the_module(user_file, tmp_path, capsys):
    m = _build(user_file).eval()
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(1, 1, 28, 28),)), str(pt2))
    p = _json(["profile", str(pt2), "--json", "--no-layers"], capsys)  # input shape: the exported one
    assert p["macs"] == _macs(8)
    assert p["params"] == sum(t.numel() for t in m.parameters())
    rc = main(["prune", str(pt2), "--out", str(tmp_path / "p.safetensors")])
    assert rc == 2 and "a .pt2 program cannot be pruned" in capsys.readouterr().err


def test_plain_state_dicts_with_a_zoo_architecture(tmp_path, capsys):
    from safetensors.torch import save_file

    from efficientml.models import build_model
    from efficientml.train import save_checkpoint

    torch.manual_seed(3)
    m = build_model("small_cnn", num_classes=10, in_channels=1)
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "sd.pt")  # a common wrapper
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "sd.safetensors"))
    save_checkpoint(tmp_path / "ours.safetensors", m, {"model": "small_cnn",
                                                       "model_kwargs": {"num_classes": 10, "in_channels": 1}})
    ours = _json(["eval", str(tmp_path / "ours.safetensors"), "--json"], capsys)
    for sd in ("sd.pt", "sd.safetensors"):
        ev = _json(["eval", str(tmp_path / sd), "--model", "small_cnn", "--json"], capsys)
        assert ev["accuracy"] == ours["accuracy"] and ev["loss"] == pytest.approx(ours["loss"], rel=1e-6)
    prof = _json(["profile", "small_cnn", "--checkpoint", str(tmp_path / "sd.pt"), "--json", "--no-layers"], capsys)
    assert prof["params"] == sum(t.numel() for t in m.parameters())
    q = _json(["quantize", str(tmp_path / "sd.pt"), "--model", "small_cnn", "--method", "weight", "--format",
               "int8", "--eval-batches", "2", "--json", "--out", str(tmp_path / "q.safetensors")], capsys)
    assert q["written"] == str(tmp_path / "q.safetensors")
    assert _json(["eval", str(tmp_path / "q.safetensors"), "--json"], capsys)["examples"] == 10000


def test_prune_user_model_then_every_command_reads_it(user_file, tmp_path, capsys):
    spec = f"{user_file}:make"
    torch.manual_seed(0)
    ref = _build(user_file, pad=False)
    torch.save(ref.state_dict(), tmp_path / "user.pt")
    out = tmp_path / "pruned.safetensors"
    rep = _json(["prune", spec, "--model-arg", "pad=false", "--checkpoint", str(tmp_path / "user.pt"),
                 "--method", "channel", "--ratio", "0.5", "--test-subset", "64", "--train-subset", "64",
                 "--no-latency", "--json", "--out", str(out)], capsys)
    before, after = rep["table"]["before"], rep["table"]["after"]
    assert before["params"] == sum(t.numel() for t in ref.parameters())
    assert after["params"] < before["params"]
    prof = _json(["profile", "--checkpoint", str(out), "--input-shape", "1,1,28,28", "--json", "--no-layers"], capsys)
    assert prof["params"] == after["params"]
    ev = _json(["eval", str(out), "--json"], capsys)
    assert ev["examples"] == 10000


def test_prune_ratio_zero_keeps_the_outputs(user_file, tmp_path, capsys):
    from efficientml.cli import model_source as ms

    spec = f"{user_file}:TinyTF"
    torch.manual_seed(1)
    ref = _build(user_file, pad=False).eval()
    torch.save(ref.state_dict(), tmp_path / "user.pt")
    out = tmp_path / "same.safetensors"
    _json(["prune", spec, "--model-arg", "pad=false", "--checkpoint", str(tmp_path / "user.pt"), "--ratio", "0",
           "--test-subset", "64", "--no-latency", "--json", "--out", str(out)], capsys)
    loaded = ms.load_checkpoint(str(out)).model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x))


def test_model_source_messages(user_file):
    from efficientml.cli import model_source as ms
    from efficientml.core.errors import ConfigError

    assert isinstance(ms.build(f"{user_file}:TinyTF").model, nn.Module)
    with pytest.raises(ConfigError, match="does not accept --model-arg"):
        ms.build(f"{user_file}:TinyTF", {"depth": 3})
