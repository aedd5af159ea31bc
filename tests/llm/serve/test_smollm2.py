"""The engine on the real SmolLM2-135M: greedy output equal to generate() per prompt, with a shared
system prompt hitting the prefix cache and long prompts split into chunks."""

from __future__ import annotations

from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

from ..conftest import needs_smollm2


@needs_smollm2
def test_smollm2_engine_equals_generate_with_prefix_cache_and_chunks(smollm2):
    model, tok = smollm2
    system = "You are a helpful assistant who answers in one short sentence. " * 3
    prompts = [system + q for q in ("What is the capital of France?", "Name a prime number.",
                                    "What colour is the sky?")] + ["Once upon a time"]
    ids = [tok.encode(p) for p in prompts]
    ref = [generate(model, i, SamplingConfig(max_new_tokens=12)).tokens[0] for i in ids]
    eng = LLMEngine(model, tok, EngineConfig(cpu_kernels=False,  # the fixture is shared: no module swaps
                                             scheduler=SchedulerConfig(max_num_batched_tokens=48)))
    first = eng.generate(ids[:1], SamplingParams(max_tokens=12, ignore_eos=True))
    rest = eng.generate(ids[1:], SamplingParams(max_tokens=12, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in first + rest] == ref
    assert [o.metrics.num_cached_tokens >= 32 for o in rest] == [True, True, False]
    assert first[0].outputs[0].text == tok.decode(ref[0], skip_special_tokens=True)
    assert eng.blocks.num_used_blocks == 0
