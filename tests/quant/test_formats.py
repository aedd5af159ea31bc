import pytest
import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.quant.formats import FORMATS, FP8_E4M3, FP8_E5M2, MXFormat, nf4_values

FP8 = [(FP8_E4M3, "float8_e4m3fn"), (FP8_E5M2, "float8_e5m2")]


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_fp8_bit_identical_on_every_code(fmt, dtype):
    dt = getattr(torch, dtype)
    values = torch.arange(256, dtype=torch.uint8).view(dt).float()       # all 256 encodings
    assert bool(_same(fmt.quantize(values), values).all())


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_fp8_bit_identical_on_random_sample(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g) * torch.exp(torch.randn(1_000_000, generator=g) * 5)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, 464.0, 480.0,
                             57344.0, 61440.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -17])
    x = torch.cat([x, specials, -specials])
    ref = x.to(getattr(torch, dtype)).float()
    ok = _same(fmt.quantize(x), ref)
    assert bool(ok.all()), f"{int((~ok).sum())} mismatches, e.g. {x[~ok][:3].tolist()}"


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_formats_match_torch(name, dtype):
    x = torch.randn(10000) * 1000
    assert torch.equal(FORMATS.get(name).quantize(x), x.to(dtype).float())


def test_fp4_grids_and_rounding():
    assert FORMATS.get("fp4_e2m1").grid().abs().unique().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FORMATS.get("fp4_e1m2").info()["max"] == 3.5
    assert FORMATS.get("fp4_e3m0").info()["max"] == 16.0
    e2m1 = FORMATS.get("fp4_e2m1")
    # ties to even mantissa: 2.5 → 2, 3.5 → 4, 5 → 4; saturation: 100 → 6
    assert e2m1.quantize(torch.tensor([2.5, 3.5, 5.0, 100.0, -0.25])).tolist() == [2.0, 4.0, 4.0, 6.0, -0.0]


@pytest.mark.parametrize("name", [n for n in FORMATS.names() if n.startswith(("fp4", "fp6", "fp8", "int", "uint"))])
def test_element_grids_are_fixed_points(name):
    fmt = FORMATS.get(name)
    grid = fmt.grid().float()
    assert torch.equal(fmt.quantize(grid), grid)
    mids = (grid[1:] + grid[:-1]) / 2                      # every value rounds to a grid neighbour
    q = fmt.quantize(mids)
    assert bool(((q == grid[1:]) | (q == grid[:-1])).all())


def test_int_formats_cover_1_to_8_bits():
    for n in range(1, 9):
        assert FORMATS.get(f"int{n}").info()["max"] == 2 ** (n - 1) - 1
        assert FORMATS.get(f"uint{n}").info()["max"] == 2 ** n - 1


def test_nf4_levels_match_qlora():
    ref = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    torch.testing.assert_close(nf4_values().float(), torch.tensor(ref), atol=2e-4, rtol=0)


def test_nf4_round_trip_exact_on_grid():
    g = torch.Generator().manual_seed(0)
    lv = nf4_values().float()
    codes = torch.randint(0, 16, (32, 64), generator=g)
    codes[:, 0] = 15                                       # each block holds its absmax (+1 level)
    absmax = torch.rand(32, 1, generator=g) * 10 + 0.1
    x = lv[codes] * absmax
    assert torch.equal(FORMATS.get("nf4").quantize(x), x)


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8"])
def test_mx_round_trip_exact_on_grid(name):
    fmt: MXFormat = FORMATS.get(name)
    g = torch.Generator().manual_seed(0)
    el_grid = (torch.arange(-127, 128, dtype=torch.float64) / 64 if name == "mxint8"   # −2 forces a larger scale
               else fmt.element.grid())
    idx = torch.randint(0, len(el_grid), (16, 4 * 32), generator=g)
    exps = torch.randint(-20, 20, (16, 4, 1), generator=g).double()
    x = (el_grid[idx].view(16, 4, 32) * torch.pow(2.0, exps)).view(16, 128).float()
    assert torch.equal(fmt.quantize(x), x)
    # and quantization is idempotent on arbitrary data
    y = fmt.quantize(torch.randn(8, 64, generator=g))
    assert torch.equal(fmt.quantize(y), y)


def test_mx_shared_scale_is_power_of_two_of_amax():
    fmt = FORMATS.get("mxfp4")
    x = torch.zeros(1, 32)
    x[0, 0] = 5.0                                          # floor(log2 5) = 2, E2M1 emax = 2 → X = 2^0
    assert fmt.shared_exponent(x).item() == 0
    assert fmt.quantize(x)[0, 0].item() == 4.0             # 5 → 4 (tie to even between 4 and 6)


def test_bad_format_and_block_errors():
    with pytest.raises(ConfigError, match="unknown number format 'fp9'"):
        FORMATS.get("fp9")
    with pytest.raises(ShapeError, match="multiple of its block size 32"):
        FORMATS.get("mxfp8").quantize(torch.randn(4, 30))
