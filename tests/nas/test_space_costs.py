"""The search space, its plain subnets and the analytical cost predictors against analysis.profile."""

import random

import pytest
import torch

from efficientml.analysis.profile import profile
from efficientml.core.errors import ConfigError
from efficientml.nas.costs import subnet_cost
from efficientml.nas.space import Arch, MBSpace
from efficientml.nas.subnet import build_subnet

SPACE = MBSpace(resolutions=(20, 24, 28, 32), widths=(0.5, 0.75, 1.0))


def test_costs_equal_profile_on_random_subnets():
    rng = random.Random(0)
    archs = [SPACE.sample(rng) for _ in range(25)] + [SPACE.largest(), SPACE.smallest()]
    for a in archs:
        p = profile(build_subnet(SPACE, a), (1, 1, a.resolution, a.resolution))
        c = subnet_cost(SPACE, a)
        assert (c.params, c.macs, c.peak_elements, c.peak_step) == (
            p.params, p.macs, p.peak_activation_elements, p.peak_activation_step), a.key()


def test_known_counts_of_the_largest_network():
    s = MBSpace()
    c = subnet_cost(s, s.largest())
    assert (c.params, c.macs, c.peak_elements) == (644826, 21026416, 150528)
    # the peak: the first block's 1×1 expansion (16 → 96 channels at 28×28) while its BN writes
    assert c.peak_elements == 2 * 96 * 28 * 28 and c.peak_step == "features.1.conv.0.1"


def test_canonical_and_size():
    s = MBSpace(stages=((8, 2, 1), (16, 2, 2)), kernels=(3, 5), expands=(3, 6), min_depths=(1, 1),
                resolutions=(16,), head=32)
    a = Arch(16, 1.0, (1, 2), (3, 3, 5, 3), (3, 3, 6, 6))
    b = Arch(16, 1.0, (1, 2), (3, 5, 5, 3), (3, 6, 6, 6))
    assert s.canonical(a) == s.canonical(b) and s.canonical(a).kernels == (3, 5, 5, 3)
    assert s.size() == (4 + 16) ** 2
    rng = random.Random(0)
    seen = {s.sample(rng) for _ in range(20000)}
    assert len(seen) == s.size()  # sampling reaches every network, in canonical form only


def test_membership_errors_and_round_trip():
    s = MBSpace()
    with pytest.raises(ConfigError, match="resolution 30"):
        s.check(Arch(30, 1.0, (1, 1, 1, 1), (3,) * s.n_slots, (3,) * s.n_slots))
    with pytest.raises(ConfigError, match="min depth"):
        MBSpace(min_depths=(0, 1, 1, 1))
    a = s.sample(random.Random(3))
    assert Arch.from_json(a.to_json()) == a
    assert MBSpace.from_json(s.to_json()) == s


def test_encoding_is_injective_on_canonical_archs():
    rng = random.Random(1)
    archs = {SPACE.sample(rng) for _ in range(300)}
    codes = {tuple(SPACE.encode(a)) for a in archs}
    assert len(codes) == len(archs)


def test_subnet_runs_and_is_resolution_independent():
    a = SPACE.sample(random.Random(2))
    net = build_subnet(SPACE, a).eval()
    assert net(torch.randn(2, 1, a.resolution, a.resolution)).shape == (2, 10)
    assert [n for n, _ in net.named_children()] == ["features", "classifier"]
