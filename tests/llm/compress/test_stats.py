import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.llm.compress import AWQConfig, GPTQConfig

from ..conftest import tiny_model


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("conf,other", [
    (AWQConfig(3, 32, n_grid=5, clip_grid=5, search_samples=2), AWQConfig(4, 32, n_grid=5, clip_grid=5, search_samples=2)),
    (GPTQConfig(3, 32, propagate="fp"), GPTQConfig(4, None, True, propagate="fp")),
    (GPTQConfig(3, 32, propagate="fp", sink_share=0.2, act_order=True, static_groups=True),
     GPTQConfig(4, None, True, propagate="fp", sink_share=0.2)),
])
def test_stored_stats_reproduce_a_calibration_run(conf, other, calib):
    """Statistics kept from one run quantize any setting exactly as a run over the calibration set would."""
    first = tiny_model(outliers=True)
    stats = apply(first, conf, calib=calib, inplace=True, pack=False, progress=False, keep_stats=True).report["stats"]
    assert len(stats.blocks) == 2 and stats.tokens == calib.numel()
    for c in (conf, other):
        direct, reused = tiny_model(outliers=True), tiny_model(outliers=True)
        apply(direct, c, calib=calib, inplace=True, pack=False, progress=False)
        apply(reused, c, inplace=True, pack=False, progress=False, stats=stats)
        a, b = _weights(direct), _weights(reused)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_awq_plus_gptq_from_merged_stats(calib):
    awq = AWQConfig(3, 32, n_grid=5, clip_grid=5, search_samples=2)
    s_awq = apply(tiny_model(outliers=True), awq, calib=calib, inplace=True, pack=False, progress=False,
                  keep_stats=True).report["stats"]
    s_gptq = apply(tiny_model(outliers=True), GPTQConfig(3, 32, propagate="fp"), calib=calib, inplace=True,
                   pack=False, progress=False, keep_stats=True).report["stats"]
    both = AWQConfig(3, 32, n_grid=5, clip_grid=5, search_samples=2, use_gptq=True)
    direct, reused = tiny_model(outliers=True), tiny_model(outliers=True)
    apply(direct, both, calib=calib, inplace=True, pack=False, progress=False)
    apply(reused, both, inplace=True, pack=False, progress=False, stats=s_awq.merge(s_gptq))
    a, b = _weights(direct), _weights(reused)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="Hessians"):
        apply(tiny_model(), both, inplace=True, stats=s_awq, progress=False)


def test_stats_need_fp_propagation(calib):
    with pytest.raises(ConfigError, match="propagate='fp'"):
        apply(tiny_model(), GPTQConfig(4, 32), calib=calib, inplace=True, keep_stats=True, progress=False)


def test_sink_share_counts_the_first_position_more(calib):
    """H(share) − H(0) = 2/N·(w − 1)·Σ x₀x₀ᵀ, x₀ the first position's input (computed here
    independently), w = share·(T − 1)/(1 − share): the first token then holds ``share`` of its sequence."""
    share, T = 0.2, calib.shape[1]
    w = share * (T - 1) / (1 - share)
    assert w / (w + T - 1) == pytest.approx(share)
    h1 = apply(tiny_model(), GPTQConfig(4, 32, propagate="fp", sink_share=0.0), calib=calib, inplace=True,
               pack=False, progress=False, keep_stats=True).report["stats"]
    hw = apply(tiny_model(), GPTQConfig(4, 32, propagate="fp", sink_share=share), calib=calib, inplace=True,
               pack=False, progress=False, keep_stats=True).report["stats"]
    assert (h1.sink_share, hw.sink_share) == (0.0, share)
    m = tiny_model()
    with torch.no_grad():  # block 0's q/k/v input at position 0: the normed embeddings of the first tokens
        x0 = m.model.layers[0].input_layernorm(m.model.embed_tokens(calib[:, 0])).float()
    diff = hw.blocks[0].hessian["self_attn.q_proj"] - h1.blocks[0].hessian["self_attn.q_proj"]
    torch.testing.assert_close(diff, 2.0 / calib.numel() * (w - 1.0) * x0.t() @ x0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="sink"):
        apply(tiny_model(), GPTQConfig(4, 32, propagate="fp", sink_share=share), inplace=True, stats=h1, progress=False)
    with pytest.raises(ConfigError, match="sink_share"):
        GPTQConfig(4, 32, sink_share=1.0)


def _block0_qkv_inputs(calib):
    """Block 0's q/k/v input, (N, T, d): the normed embeddings (computed here, independently)."""
    m = tiny_model()
    with torch.no_grad():
        return m.model.layers[0].input_layernorm(m.model.embed_tokens(calib)).float()


def _hessians(calib, **kw):
    conf = GPTQConfig(4, 32, propagate="fp", **kw)
    return apply(tiny_model(), conf, calib=calib, inplace=True, pack=False, progress=False,
                 keep_stats=True).report["stats"]


@pytest.mark.parametrize("share", [0.0, 0.05, 0.3])
def test_trace_rule_gives_the_first_positions_exactly_their_share(calib, share):
    """sink_rule="trace": H = 2/N·(X_restᵀX_rest + w·X₀ᵀX₀) with w·tr(X₀ᵀX₀) = share·tr(H)·N/2, built by hand;
    share 0 is the Hessian of every position but the first (still divided by all N tokens)."""
    X = _block0_qkv_inputs(calib)
    x0, xr = X[:, 0], X[:, 1:].reshape(-1, X.shape[-1])
    t0, tr = float(x0.pow(2).sum()), float(xr.pow(2).sum())
    w = share * tr / ((1 - share) * t0)
    ref = 2.0 / calib.numel() * (xr.t() @ xr + w * x0.t() @ x0)
    st = _hessians(calib, sink_share=share, sink_rule="trace")
    H = st.blocks[0].hessian["self_attn.q_proj"]
    torch.testing.assert_close(H, ref, rtol=1e-4, atol=1e-5)
    first = 2.0 / calib.numel() * w * t0
    assert first / float(H.trace()) == pytest.approx(share, rel=1e-4, abs=1e-7)
    assert (st.sink_share, st.sink_rule) == (share, "trace")


def test_statistics_remember_their_sink_rule(calib):
    st = _hessians(calib, sink_share=0.05, sink_rule="trace")
    with pytest.raises(ConfigError, match="rule 'trace'"):
        apply(tiny_model(), GPTQConfig(4, 32, propagate="fp", sink_share=0.05), inplace=True, stats=st, progress=False)
    with pytest.raises(ConfigError, match="different sink weights"):
        st.merge(_hessians(calib, sink_share=0.05))
    with pytest.raises(ConfigError, match="sink_rule"):
        GPTQConfig(4, 32, sink_rule="tokenz")
