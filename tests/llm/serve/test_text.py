"""Text, stop strings, stop tokens and EOS through the engine, against generate(..., tokenizer=tok)."""

from __future__ import annotations

import torch

from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams

from ..conftest import tiny_model


class _Stream:
    def __init__(self, tok):
        self.tok = tok

    def put(self, i: int) -> str:
        return self.tok.decode([i])


class CharTokenizer:
    """One letter per id (ids 0-2 special, no text): enough for the engine's text paths."""

    def __init__(self, eos: int = 2):
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i >= 3)

    def stream(self, skip_special_tokens: bool = True) -> _Stream:
        return _Stream(self)


def test_text_and_stop_strings_match_generate():
    model = tiny_model(max_position_embeddings=256)
    tok = CharTokenizer()
    prompt = "thequickbrownfox"
    plain = generate(model, tok.encode(prompt), SamplingConfig(max_new_tokens=20), tokenizer=tok)
    stop = plain.texts[0][6:8]  # a string the greedy text does contain
    ref = generate(model, tok.encode(prompt), SamplingConfig(max_new_tokens=20, stop_strings=(stop,)), tokenizer=tok)
    eng = LLMEngine(model, tok, EngineConfig(num_blocks=32, cpu_kernels=False))
    out = eng.generate([prompt, prompt], [SamplingParams(max_tokens=20, stop=stop, ignore_eos=True),
                                          SamplingParams(max_tokens=20, ignore_eos=True)])
    assert out[0].outputs[0].text == ref.texts[0] and stop not in out[0].outputs[0].text
    assert list(out[0].outputs[0].token_ids) == ref.tokens[0] and out[0].outputs[0].finish_reason == "stop"
    assert out[1].outputs[0].text == plain.texts[0] and out[1].outputs[0].finish_reason == "length"


def test_stop_token_ids_and_eos_end_a_sequence():
    model = tiny_model(max_position_embeddings=256)
    ids = torch.arange(3, 20).tolist()
    ref = generate(model, ids, SamplingConfig(max_new_tokens=16)).tokens[0]
    k = 5
    eng = LLMEngine(model, CharTokenizer(eos=ref[k]), EngineConfig(num_blocks=32, cpu_kernels=False))
    eos_out, stop_out, ignore = eng.generate([ids] * 3, [SamplingParams(max_tokens=16),
                                                         SamplingParams(max_tokens=16, ignore_eos=True,
                                                                        stop_token_ids=(ref[k + 2],)),
                                                         SamplingParams(max_tokens=16, ignore_eos=True)])
    first_eos = ref.index(ref[k])
    assert list(eos_out.outputs[0].token_ids) == ref[:first_eos + 1]
    assert list(stop_out.outputs[0].token_ids) == ref[:ref.index(ref[k + 2]) + 1]
    assert list(ignore.outputs[0].token_ids) == ref
    assert eos_out.outputs[0].finish_reason == stop_out.outputs[0].finish_reason == "stop"


def test_streamed_pieces_add_up_to_the_text():
    model = tiny_model(max_position_embeddings=256)
    eng = LLMEngine(model, CharTokenizer(), EngineConfig(num_blocks=32, cpu_kernels=False))
    rid = eng.add_request("hello", SamplingParams(max_tokens=12, ignore_eos=True))
    pieces, final = [], None
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == rid and len(out.outputs[0].new_token_ids) == 1
            pieces.append(out.outputs[0].new_text)
            final = out
    assert final.finished and "".join(pieces) == final.outputs[0].text and len(final.outputs[0].text) == 12
