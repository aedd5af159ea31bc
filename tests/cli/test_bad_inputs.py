"""Every case of the bad-input table: exit 2, one line on stderr that names what was wrong, no
traceback, nothing written, nothing lost; plus the faults that need a real process or a patched write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the table lives beside this file
from bad_inputs import CASES, run_case, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path):
    r = run_case(case, tmp_path / "case")
    assert not r["traceback"], r["stderr"]
    assert r["exit_code"] == case.code, r["stderr"]
    assert r["one_line"], r["stderr"]
    assert r["matched"], f"{case.match!r} not in {r['stderr']!r}"
    assert not r["files_lost"] and not r["stray_files"]


def test_table_covers_every_subcommand():
    from efficientml.cli.main import SUBCOMMANDS

    assert len(CASES) >= 150
    firsts = {c.argv[0] for c in CASES} | {c.argv[1] for c in CASES if c.argv[0] == "llm" and len(c.argv) > 1}
    assert set(SUBCOMMANDS) <= firsts
    assert {"info", "ppl", "generate", "chat", "convert", "quantize", "prune"} <= firsts


def test_summary_counts_a_subset():
    s = summary(CASES[:6])
    assert s["bad_input_cases"] == 6
    assert s["bad_input_tracebacks"] == 0 and s["bad_input_files_lost"] == 0 and s["failing"] == []


# --- faults while writing ------------------------------------------------------------------------

def _small_model():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(4, 3))


def test_enospc_mid_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from efficientml.cli.main import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "c.safetensors"
    rc = main(["train", "small_cnn", "--epochs", "1", "--train-subset", "64", "--out", str(out), "--json"])
    cap = capsys.readouterr()
    assert rc == 2
    assert cap.err.strip().count("\n") == 0 and "no space left on the device" in cap.err
    assert json.loads(cap.out)["error"].startswith("cannot write")  # --json: the error as JSON too
    assert list(tmp_path.iterdir()) == []  # atomic_path removed its temporary file


def test_readonly_folder_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    from efficientml.cli.main import main

    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **k):  # root ignores modes: refuse as a read-only mount would
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    started = time.monotonic()
    rc = main(["prune", "small_cnn", "--out", str(ro / "p.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "read-only file system" in err and time.monotonic() - started < 20
    assert list(ro.iterdir()) == []


_KILLED_WRITER = r"""
import os, sys, time
import torch
from efficientml.core.serialization import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 1_000_000)
        f.flush()
        print(tmp, flush=True)
        time.sleep(60)  # killed here, mid-write
"""


def test_sigkill_mid_write_then_rerun_is_clean(tmp_path):
    target = tmp_path / "model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    tmp_name = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert Path(tmp_name).exists() and not target.exists()  # the leftover a kill leaves
    assert Path(tmp_name).name.startswith(f".{target.name}.{proc.pid}.")

    from efficientml.core.serialization import save_state_dict, load_state_dict
    import torch

    save_state_dict(target, {"w": torch.arange(6.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # the stale temp file is gone
    assert torch.equal(load_state_dict(target)["w"], torch.arange(6.0))
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_killed_folder_replace_restores_the_old_output(tmp_path):
    """A replace killed between its two renames leaves the old folder aside; the next run puts it back
    before deciding anything."""
    from efficientml.core.outputs import clean_stale
    from efficientml.core.serialization import atomic_dir

    out = tmp_path / "out"
    aside = tmp_path / ".out.999999.abcdefgh.old.tmp"  # pid 999999 is not running
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    half = tmp_path / ".out.999999.abcdefgh.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    clean_stale(out)
    assert (out / "config.json").read_text() == "{}" and not half.exists() and not aside.exists()
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert json.loads((out / "config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_overwrite_replaces_our_folder_but_never_a_users(tmp_path):
    from efficientml.core.errors import ConfigError
    from efficientml.core.serialization import atomic_dir

    ours = tmp_path / "ours"
    with atomic_dir(ours) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"1")
    with atomic_dir(ours, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
    assert sorted(p.name for p in ours.iterdir()) == ["config.json"]
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not write"):
        with atomic_dir(ours / ".", overwrite=True):
            pass
    assert (ours / "notes.txt").read_text() == "mine"


def test_long_name_temp_fits(tmp_path):
    from efficientml.core.serialization import write_json

    name = "r" * 250 + ".json"  # 255 bytes: the temporary name must not add to it
    write_json(tmp_path / name, {"a": 1})
    assert json.loads((tmp_path / name).read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [name]


# --- process-level behaviour ---------------------------------------------------------------------

def test_broken_pipe_is_quiet():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(f"{sys.executable} -m efficientml formats --json | head -c1", shell=True, env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout == "[" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


def test_chat_with_stdin_closed_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(f"{sys.executable} -m efficientml llm chat smollm2-135m <&-", shell=True, env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "stdin, which is closed" in p.stderr


def test_json_nan_is_null_with_a_warning(capsys):
    from efficientml.cli.common import print_json

    print_json({"accuracy": float("nan"), "rows": [1.0, float("inf")], "ok": 2})
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"accuracy": None, "rows": [1.0, None], "ok": 2}
    assert "2 value(s) are not finite" in cap.err and "'accuracy'" in cap.err


def test_nan_weights_warn(tmp_path, capsys):
    import torch

    from efficientml.cli.main import main
    from efficientml.models import build_model
    from efficientml.train import save_checkpoint

    m = build_model("small_cnn", num_classes=10, in_channels=1)
    with torch.no_grad():
        next(m.parameters())[0] = float("nan")
    ck = tmp_path / "nan.safetensors"
    save_checkpoint(ck, m, {"model": "small_cnn", "model_kwargs": {"num_classes": 10, "in_channels": 1}})
    assert main(["profile", "--checkpoint", str(ck), "--json", "--no-layers"]) == 0
    cap = capsys.readouterr()
    assert "warning: the model has non-finite values (NaN or inf) in 1 tensor(s)" in cap.err
    assert json.loads(cap.out)["params"] == sum(p.numel() for p in m.parameters())


def test_chat_template_is_bounded(monkeypatch):
    from efficientml.core.errors import ConfigError
    from efficientml.llm.io import chat_template as ct

    monkeypatch.setattr(ct, "MAX_SECONDS", 1.0)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match="took more than 1 s"):
        ct.render(ct.compile_template(loops), {})
    assert time.monotonic() - started < 5
    with pytest.raises(ConfigError, match="output passed"):
        ct.render(ct.compile_template("{% for i in range(100000) %}" + "x" * 100 + "{% endfor %}"), {})
    for bad, why in (("{{ 'x' * 10**10 }}", "too large"), ("{{ ''.__class__.__mro__ }}", "SecurityError"),
                     ("{% for %}", "does not compile"), ("{{ 1/0 }}", "ZeroDivisionError")):
        with pytest.raises(ConfigError, match=why):
            ct.render(ct.compile_template(bad), {})
    ok = ct.compile_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert ct.render(ok, {"messages": [{"role": "user", "content": "hi"}]}) == "<user>hi"


def test_llm_quantize_default_group_size_fits_smollm2(tmp_path, capsys):
    """576 is not divisible by 128: the default (auto) picks 64; an explicit 128 names what fits."""
    from efficientml.cli.llm_compress import AUTO_GROUP, _auto_group
    from efficientml.llm.io.load import load_config
    import argparse

    cfg = load_config("smollm2-135m")
    assert _auto_group(argparse.Namespace(group_size=AUTO_GROUP, method="awq"), cfg) == 64
    assert _auto_group(argparse.Namespace(group_size=None, method="awq"), cfg) is None


def test_text_files_utf8_bom_and_utf16_read_the_same(tmp_path):
    from efficientml.data.text import load_text

    text = "naïve café\r\nline two\n"
    for enc, name in (("utf-8", "a.txt"), ("utf-8-sig", "b.txt"), ("utf-16", "c.txt")):
        (tmp_path / name).write_bytes(text.encode(enc))
        assert load_text(tmp_path / name) == text  # line endings kept, BOM dropped


def test_legacy_temp_names_are_cleaned_when_an_hour_old(tmp_path):
    from efficientml.core.serialization import write_json

    old, fresh = tmp_path / ".x.json.abcd_123.tmp", tmp_path / ".x.json.efgh_456.tmp"
    old.write_bytes(b"0" * 1000)
    fresh.write_bytes(b"1")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    write_json(tmp_path / "x.json", [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "x.json"]  # a live writer's may be fresh


def test_json_errors_are_json_on_stdout(capsys):
    from efficientml.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["profile", "resnet20", "--runs", "0", "--json"])
    cap = capsys.readouterr()
    assert e.value.code == 2 and "expected a positive integer" in json.loads(cap.out)["error"]
    assert main(["profile", "resnet21", "--json"]) == 2
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"error": cap.err.strip().removeprefix("efficientml: error: "), "exit_code": 2}
