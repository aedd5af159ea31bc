"""Tokenizer built from the GGUF vocabulary: ids identical to transformers' tokenizer on the first
200,000 characters of WikiText-2, the same chat prompt, and exact decoding."""

from __future__ import annotations

import pytest

from efficientml.data.paths import resolve


@pytest.fixture(scope="module")
def wikitext_200k() -> str:
    return resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[:200_000]


def test_ids_identical_to_transformers(smollm2, hf_gguf_tokenizer, wikitext_200k):
    tok = smollm2[1]
    ours = tok.encode(wikitext_200k)
    theirs = hf_gguf_tokenizer(wikitext_200k, add_special_tokens=True).input_ids
    assert len(ours) == len(theirs) == 48386
    assert ours == theirs


def test_saved_tokenizer_identical(smollm2, smollm2_hf_dir, wikitext_200k):
    transformers = pytest.importorskip("transformers")
    from efficientml.llm.io.tokenizer import Tokenizer

    text = wikitext_200k[:50_000]
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    again = Tokenizer.from_folder(smollm2_hf_dir)
    assert again.encode(text) == smollm2[1].encode(text) == hf(text).input_ids
    assert again.chat_template == smollm2[1].chat_template


def test_chat_template_matches_transformers(smollm2, hf_gguf_tokenizer):
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    ours = smollm2[1].apply_chat_template(msgs, add_generation_prompt=True)
    assert ours == hf_gguf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    ids = smollm2[1].encode(ours)
    assert ids.count(smollm2[1].token_id("<|im_start|>")) == 5  # system (default) + 3 turns + the generation prompt


# the constructs Llama-3.1/3.2 and Qwen3 templates use: today's date, namespace, tojson with options,
# loop controls, raise_exception, extra variables (tools, enable_thinking)
MODERN_TEMPLATE = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- set ns = namespace(system=none, n=0) %}
{%- for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
{%- set ns.n = ns.n + 1 %}{% endfor %}
{{- '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '\n' }}
{%- if tools is defined and tools %}{{ tools | tojson(indent=4) }}{{ '\n' }}{% endif %}
{{- (ns.system or 'You are helpful.') + '<|eot_id|>' }}
{%- for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}
{%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"""


def test_modern_chat_template_constructs_match_transformers(smollm2, hf_gguf_tokenizer):
    from efficientml.core.errors import ConfigError
    from efficientml.llm.io.tokenizer import Tokenizer

    tok = smollm2[1]
    ours = Tokenizer(tok.backend, "<s>", "</s>", False, MODERN_TEMPLATE)
    msgs = [{"role": "system", "content": "Be brief & <exact>."}, {"role": "user", "content": "  Capital of France? "}]
    tools = [{"name": "lookup", "parameters": {"city": "str", "note": "é <b>"}}]
    kw = dict(tools=tools, enable_thinking=False)
    a = ours.apply_chat_template(msgs, add_generation_prompt=True, **kw)
    b = hf_gguf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                              chat_template=MODERN_TEMPLATE, bos_token="<s>", **kw)
    assert a == b
    assert "Today Date: " in a and '"note": "é <b>"' in a and a.endswith("<think>\n\n</think>\n\n")
    with pytest.raises(ConfigError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_decode_roundtrip_and_stream(smollm2, wikitext_200k):
    tok = smollm2[1]
    text = wikitext_200k[:5000] + " naïve café — 東京 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    s = tok.stream(skip_special_tokens=False)
    assert "".join(s.put(i) for i in ids) == text
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.add_bos is False
