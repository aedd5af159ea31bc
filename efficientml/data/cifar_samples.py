"""The first 20 CIFAR-10 test images (as shipped by foolbox 3.3.4, MIT), for smoke tests of
pretrained CIFAR models: ``cifar10-samples/cifar10_{i:02d}_{label}.png``, the label in the name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from efficientml.core.errors import DataNotFoundError
from efficientml.data import paths
from efficientml.data.png import read_png

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training set (pixels in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SAMPLE_LABELS = (3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6)
SAMPLE_URL = "https://raw.githubusercontent.com/bethgelab/foolbox/v3.3.4/foolbox/data/{}"
SAMPLE_SHA256 = (
    "0d4964922e2463ad0e2b1cd298e03d5627ff7dad1ab1cdd173ce35e9974e204f",
    "eaec54ee1aed958f9548d01aff16c41aeba408885da42759890a538888be879e",
    "3873d7fb73cd351df3244c6a16cd52eef264700093746e9ac7f8831b3ce6d2e3",
    "fce5a6515e44e57d6b4349822f25e2cf941c580c5cc2f5fc637d5743a9057338",
    "6cfbe4ca868b7da43a30545c2011658082ebf2c63680b221d9adbc9228f31192",
    "d31b1901b24199172f2f652d0b5d6661a4e346a8c1d6b436e77784e93a1d9ad7",
    "2362c09b8f26a398daac5f4edc5d04739c8b95b7adddad4e49dd6012d9e8fa1d",
    "84f9dc0df9d001f30ef3c0268a4250e13bc84c680494f2abf4ac10307253ffad",
    "d77efc76eaf52c5f4f9b76e1e313f462e7426bfebb212e431b5e10fdf7e91128",
    "5da75a70e31bfb9e28e6e5d82a4f1045227da16a82e359e27bd5a53f74a49d8d",
    "c50e97f0b6841005b23a108d01b6fe18ab1e59a0c84c9ed0d989fa854b0c9a87",
    "a7e6dca0f8fb57a9371015ee5ec609411bcf9f96c85177b5ef280c0d80b3bfe8",
    "b80d290cd1eb025112ea752b9877272fedeb7287f7d492e47bd7b31b94637aae",
    "3fe4359cdb1453db950f44a70289d4c4f75a4f92e5d822ff88a771769a085f65",
    "bdae32f37b5de6a6924aa5af401898bfd6c696f9572749a156e4cc6316c30a4e",
    "576c3d2292dd9f4effa0caa321a9da7cf774b0502ef50940443d797ff77be3ca",
    "c588d7a98d8a73cbc23a9cac274894bdb432b1394bce6647664ea8188dc1bc85",
    "9ac91edf5ca7fb19669943ce81f690dc155f245eb014ecf217b5ae16478ace05",
    "06ef95c8900cc444bf45ee23e86f9c7470eed6fba2c5290a1ae970ec708ea00e",
    "c7dfa89248f0c00066429fbc80a741d02e4a4328822280ef2c41f9c0b2c41f94",
)
_NAME = re.compile(r"cifar10_(\d+)_(\d)\.png")


def sample_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Paths of the 20 sample PNGs, in index order (from ``root`` if given, else the data roots)."""
    names = [f"cifar10_{i:02d}_{y}.png" for i, y in enumerate(SAMPLE_LABELS)]
    if root is not None:
        folder = Path(root)
        found = sorted(folder.glob("cifar10_*_*.png")) if folder.is_dir() else []
        if not found:
            raise DataNotFoundError(f"folder {str(folder)!r} holds no cifar10_{{i}}_{{label}}.png files")
        return sorted(found, key=lambda p: _parse(p)[0])
    return [paths.resolve(f"cifar10-samples/{n}", url=SAMPLE_URL.format(n), sha256=h)
            for n, h in zip(names, SAMPLE_SHA256)]


def load_cifar_samples(root: str | os.PathLike | None = None, normalize: bool = False,
                       mean: tuple[float, ...] = CIFAR10_MEAN,
                       std: tuple[float, ...] = CIFAR10_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) float32 in [0, 1] (or normalized by ``mean``/``std``) and labels (N,)."""
    files = sample_files(root)
    images = np.stack([read_png(p)[:, :, :3] for p in files])   # (N, 32, 32, 3) uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, 32, 32)
    if normalize:
        x = normalize_images(x, mean, std)
    y = torch.tensor([_parse(p)[1] for p in files], dtype=torch.long)
    return x, y


def normalize_images(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel of an (N, C, H, W) batch."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _parse(p: Path) -> tuple[int, int]:
    match = _NAME.fullmatch(p.name)
    if match is None:
        raise DataNotFoundError(f"{p.name!r} is not named cifar10_{{index}}_{{label}}.png")
    return int(match.group(1)), int(match.group(2))
