"""Fashion-MNIST (Xiao et al. 2017: 60,000 training and 10,000 test 28×28 grey images
of clothing, 10 classes) and a small residual conv net for it: the paper's Table 1
(ResNet50 on ImageNet) at the scale of a 2-core CPU. Used by
plans/experiments/fashion-table1.yaml and the tests (which build the net, never the data).

The data is read from the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/*-idx[13]-ubyte.gz); nothing is downloaded. The
validation set is the official 10,000-image test set; `train_size` takes the first N
training images (the same ones for every seed and method).
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from typing import Optional, Tuple

import torch
from torch import nn
from planc.examples import tensor_loaders

ROOT = "/usr/share/datasets/fashion-mnist"
PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# the training set's pixel mean and standard deviation (of x/255), for normalisation
MEAN, STD = 0.2860, 0.3530


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """x + BN(conv(ReLU(BN(conv(x))))), then ReLU: ResNet's basic block."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class FashionResNet(nn.Module):
    """stem (1→`stem`, stride 2: 14×14) → down (`stem`→`channels`, stride 2: 7×7) →
    `blocks` residual blocks of `channels` → global average pool → linear head.

    Weight matrix views (out, 9·in) with the defaults (stem 32, channels 64): stem 32×9
    (one column group: stays dense), down 64×288 (288 blocks of 8×8, 72 of 16×16),
    each residual conv 64×576 (576 blocks of 8×8, 144 of 16×16), head 10×64."""

    def __init__(self, channels: int = 64, stem: int = 32, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(1, stem, stride=2), nn.ReLU())
        self.down = nn.Sequential(_conv_bn(stem, channels, stride=2), nn.ReLU())
        self.blocks = nn.Sequential(*[Residual(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.down(self.stem(x.view(-1, 1, 28, 28))))
        return self.head(x.mean(dim=(2, 3)))


def resnet(channels: int = 64, stem: int = 32, blocks: int = 2) -> FashionResNet:
    return FashionResNet(channels=channels, stem=stem, blocks=blocks)


def _read_idx(path: str, kind: int) -> torch.Tensor:
    """An IDX file (LeCun's format): magic 0x0000080N (N dimensions, unsigned bytes),
    N big-endian sizes, then the bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    if magic != 0x800 + kind:
        raise ValueError(f"{path}: expected an IDX file of {kind} dimension(s) of bytes, got magic {magic:#x}")
    dims = struct.unpack(f">{kind}I", raw[4:4 + 4 * kind])
    data = torch.frombuffer(bytearray(raw[4 + 4 * kind:]), dtype=torch.uint8)
    if data.numel() != int(torch.tensor(dims).prod()):
        raise ValueError(f"{path}: expected {dims} bytes of data, got {data.numel()}")
    return data.view(*dims)


def tensors(split: str, root: str = ROOT) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 28, 28) float32, normalised; labels (N,) int64) of `split`
    ('train' or 'test'). A missing file is one line naming the Debian package."""
    images, labels = (os.path.join(root, name) for name in FILES[split])
    for path in (images, labels):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Fashion-MNIST is not installed: no {path} (install the Debian package "
                                    f"{PACKAGE}: apt-get install {PACKAGE})")
    x = _read_idx(images, 3).unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)
    y = _read_idx(labels, 1).long()
    return x, y


@functools.lru_cache(maxsize=4)
def _cached(split: str, root: str):
    """tensors(), read once per process (`planc compare --jobs 1` runs every run in one
    process); callers slice, never mutate, them."""
    return tensors(split, root)


def loaders(batch_size: int = 128, seed: int = 0, train_size: Optional[int] = None, val_size: Optional[int] = None,
            root: str = ROOT):
    """(train_loader, eval_loader): the first `train_size` training images (all 60,000
    if None), reshuffled each epoch from a generator seeded by `seed`; the first
    `val_size` test images (all 10,000 if None)."""
    xt, yt = _cached("train", root)
    xv, yv = _cached("test", root)
    if train_size is not None:
        xt, yt = xt[:train_size], yt[:train_size]
    if val_size is not None:
        xv, yv = xv[:val_size], yv[:val_size]
    return tensor_loaders((xt, yt), (xv, yv), batch_size, seed, eval_batch=1000)
