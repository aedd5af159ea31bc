"""Small random LLaMA-family models for the compression tests (CPU, seconds)."""

import pytest
import torch

from efficientml.llm.config import LlamaConfig
from efficientml.llm.model import build_model


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, outliers: bool = False, **kw):
    torch.manual_seed(seed)
    m = build_model(tiny_config(**kw), "cpu")
    if outliers:  # a few hidden channels 20× larger, as in real LLM activations
        with torch.no_grad():
            m.model.embed_tokens.weight[:, :3] *= 20.0
    return m.eval()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 128, (2, 24), generator=g)
