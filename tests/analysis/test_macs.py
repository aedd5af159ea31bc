import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.analysis import count_macs, matmul_macs


def test_conv2d_macs_formula():
    # out 8·8·32 elements, each a dot product of 16·3·3
    assert count_macs(nn.Conv2d(16, 32, 3, padding=1), (1, 16, 8, 8)).macs == 8 * 8 * 32 * 16 * 9


def test_grouped_and_depthwise_conv_macs():
    assert count_macs(nn.Conv2d(16, 32, 3, padding=1, groups=4), (2, 16, 8, 8)).macs == \
        2 * 8 * 8 * 32 * (16 // 4) * 9
    assert count_macs(nn.Conv2d(16, 16, 3, padding=1, groups=16), (1, 16, 8, 8)).macs == \
        8 * 8 * 16 * 9
    # stride 2, no padding: 7×7 → 3×3
    assert count_macs(nn.Conv2d(4, 6, 3, stride=2, bias=False), (1, 4, 7, 7)).macs == 3 * 3 * 6 * 4 * 9


def test_conv1d_and_transpose_macs():
    assert count_macs(nn.Conv1d(8, 4, 5), (1, 8, 20)).macs == 16 * 4 * 8 * 5
    # every input element scatters into C_out · k · k outputs
    assert count_macs(nn.ConvTranspose2d(4, 2, 2, stride=2), (1, 4, 3, 3)).macs == 3 * 3 * 4 * 2 * 4


def test_linear_macs_on_batched_sequence():
    assert count_macs(nn.Linear(20, 30), (2, 5, 20)).macs == 2 * 5 * 30 * 20


def test_matmul_formula_broadcasting():
    assert matmul_macs((2, 3, 4, 5), (5, 6)) == 2 * 3 * 4 * 5 * 6
    assert matmul_macs((7,), (7,)) == 7
    assert matmul_macs((3, 7), (7,)) == 21


class Attention(nn.Module):
    """Self-attention written with functional matmuls, as in nanoGPT."""

    def __init__(self, dim: int, heads: int, sdpa: bool):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / (c // self.heads) ** 0.5)  # (B, nh, T, T)
            y = torch.softmax(att, dim=-1) @ v                                  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_matmuls_counted(sdpa):
    b, t, c, h = 2, 10, 32, 4
    proj = b * t * c * 3 * c + b * t * c * c
    qk = b * h * t * t * (c // h)     # QKᵀ
    av = b * h * t * t * (c // h)     # AV
    rep = count_macs(Attention(c, h, sdpa), (b, t, c))
    assert rep.macs == proj + qk + av
    assert rep.total.elementwise >= b * h * t * t  # the softmax, not in the MAC total
    names = [n for n, _, cost in rep.layers if cost.macs]
    assert names[0] == "qkv" and names[-1] == "proj"


def test_multihead_attention_module():
    e, h, l, n = 16, 4, 6, 3
    mha = nn.MultiheadAttention(e, h, batch_first=True)
    rep = count_macs(mha, inputs=(torch.randn(n, l, e),) * 3)
    assert rep.macs == n * (4 * l * e * e) + 2 * n * l * l * e


def test_einsum_and_bmm():
    class M(nn.Module):
        def forward(self, a, b):
            return torch.einsum("bij,bjk->bik", a, b) + torch.bmm(a, b)

    rep = count_macs(M(), inputs=(torch.randn(2, 3, 4), torch.randn(2, 4, 5)))
    assert rep.macs == 2 * (2 * 3 * 4 * 5)
    assert rep.total.elementwise == 2 * 3 * 5   # the add


def test_elementwise_and_pool_reported_separately():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    rep = count_macs(net, (1, 3, 8, 8))
    assert rep.macs == 8 * 8 * 8 * 27 + 8 * 2
    assert rep.total.elementwise == 8 * 8 * 8           # ReLU
    assert rep.total.pool == 4 * 4 * 8 * 4 + 4 * 4 * 8  # 2×2 windows + global average
    assert rep.by_layer() == {"0": 8 * 8 * 8 * 27, "1": 0, "2": 0, "3": 0, "4": 0, "5": 16}


def test_residual_add_is_a_layer():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)

        def forward(self, x):
            out = self.conv(x)
            out += x
            return out

    rep = count_macs(nn.Sequential(Block()), (1, 4, 5, 5))
    assert [(n, k) for n, k, _ in rep.layers] == [("0.conv", "Conv2d"), ("0.add", "add")]
    assert rep.layers[1][2].elementwise == 4 * 5 * 5


@pytest.mark.parametrize("name,shape,macs", [
    ("resnet18", (1, 3, 224, 224), 1_814_073_344),   # "1.82 GMACs" (conv + fc)
    ("mobilenetv2", (1, 3, 224, 224), 300_774_272),  # "300M MACs"
    ("vgg", (1, 3, 32, 32), 605_754_368),            # course VGG: "606M MACs"
    ("resnet20", (1, 3, 32, 32), 40_551_040),        # "41M MACs"
])
def test_zoo_macs(zoo, name, shape, macs):
    assert count_macs(zoo(name), shape).macs == macs


def test_zoo_macs_rounded(zoo):
    assert abs(count_macs(zoo("resnet18"), (1, 3, 224, 224)).macs / 1e9 - 1.82) < 0.01
    assert round(count_macs(zoo("resnet20"), (1, 3, 32, 32)).macs / 1e6) == 41
    assert round(count_macs(zoo("vgg"), (1, 3, 32, 32)).macs / 1e6) == 606


def test_batch_scales_macs(zoo):
    assert count_macs(zoo("resnet20"), (4, 3, 32, 32)).macs == 4 * 40_551_040


def test_weight_computations_are_not_activation_work():
    from torch.nn.utils import prune

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    prune.l1_unstructured(net[0], "weight", amount=0.5)   # weight = weight_orig * mask, in a pre-hook
    rep = count_macs(net, (1, 3, 8, 8))
    assert [n for n, _, _ in rep.layers] == ["0", "1"]
    assert rep.macs == 8 * 8 * 8 * 27                      # dense MACs: masks are simulated sparsity
    assert rep.total.elementwise == 8 * 8 * 8              # only the ReLU


def test_sparse_csr_matmul_counts_nonzeros_only():
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight[:, :48] = 0                                  # 16 nonzeros per row remain

    class CSRLinear(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w.detach().to_sparse_csr()                 # (out, in)

        def forward(self, x):
            return torch.sparse.mm(self.w, x.T).T               # (N, out)

    assert count_macs(lin, (4, 64)).macs == 4 * 32 * 64
    assert count_macs(CSRLinear(lin.weight), (4, 64)).macs == 4 * 32 * 16


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers(cls, gates):
    i, h, t, b = 6, 5, 7, 3
    rnn = cls(i, h, num_layers=2, batch_first=True)
    per_step = gates * h * (i + h) + gates * h * (h + h)    # layer 1 sees x, layer 2 sees h
    assert count_macs(rnn, (b, t, i)).macs == t * b * per_step


def test_meta_device_model_counts_macs(zoo):
    import copy

    model = copy.deepcopy(zoo("resnet20")).to("meta")
    assert count_macs(model, inputs=torch.empty(1, 3, 32, 32, device="meta")).macs == 40_551_040
