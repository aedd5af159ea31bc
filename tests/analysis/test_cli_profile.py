import json

from efficientml.cli.main import main


def test_profile_json(capsys):
    assert main(["profile", "resnet20", "--input-shape", "1,3,32,32", "--json", "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["model"], d["params"], d["macs"]) == ("resnet20", 269_722, 40_551_040)
    assert d["input_shapes"] == [[1, 3, 32, 32]]


def test_profile_default_shape_and_model_args(capsys):
    assert main(["profile", "vgg", "--model-arg", "num_classes=100", "--json", "--no-layers",
                 "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["input_shapes"] == [[1, 3, 32, 32]]
    assert d["params"] == 9_228_362 + 90 * 513      # the head grows from 10 to 100 classes
    assert "layers" not in d


def test_profile_markdown(capsys):
    assert main(["profile", "resnet20", "--markdown", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## resnet20") and "| parameters | 269.72K (269,722) |" in out


def test_profile_table(capsys):
    assert main(["profile", "resnet20", "--no-layers", "--threads", "1"]) == 0
    assert "40.55M" in capsys.readouterr().out


def test_wrong_shape_exits_with_one_sentence(capsys):
    assert main(["profile", "vgg", "--input-shape", "1,1,32,32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efficientml: error: ") and "(N, 3, H, W)" in err
    assert "(1, 1, 32, 32)" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_model(capsys):
    assert main(["profile", "resnet2"]) == 2
    assert "unknown model 'resnet2'" in capsys.readouterr().err


def test_bad_shape_text(capsys):
    assert main(["profile", "vgg", "--input-shape", "1,three"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_list(capsys):
    assert main(["profile", "--list"]) == 0
    assert "resnet20" in capsys.readouterr().out.split()


def test_profile_checkpoint_counts_nonzeros(tmp_path, capsys):
    import torch

    from efficientml.models import build_model
    from efficientml.train import save_checkpoint

    model = build_model("resnet20")
    with torch.no_grad():
        model.conv1.weight.zero_()                       # 16·3·3·3 = 432 weights
    path = tmp_path / "r20.safetensors"
    save_checkpoint(path, model, {"model": "resnet20", "model_kwargs": {}})
    assert main(["profile", "--checkpoint", str(path), "--json", "--no-layers",
                 "--sparse-format", "bitmask", "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "resnet20" and d["params"] == 269_722
    assert d["nonzero_params"] == count_nonzero(model)
    # weights: 8 bits per nonzero + a 1-bit mask per element; 1-D parameters stay dense
    expect = sum((int((p != 0).sum()) * 8 + p.numel()) / 8 if p.dim() >= 2 else p.numel()
                 for p in model.parameters())
    assert d["size_bytes"]["int8_bitmask"] == expect


def count_nonzero(model):
    return sum(int((p != 0).sum()) for p in model.parameters())
