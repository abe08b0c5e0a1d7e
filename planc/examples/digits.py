"""scikit-learn's handwritten digits (1,797 real 8×8 images, shipped with sklearn, no
download) and two small models for them. Used by the plans in plans/ and the tests.

The train/validation split is fixed by `seed`, so runs are comparable across methods.
"""
from __future__ import annotations

import torch
from torch import nn
from planc.examples import tensor_loaders


class DigitsMLP(nn.Module):
    """64 → hidden → … → 10. Hidden layers are `layers.0`, `layers.2`, …; the
    classifier is `head` (plans usually skip it: it is the last layer)."""

    def __init__(self, hidden: int = 512, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        mods, width = [], 64
        for _ in range(depth):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                mods.append(nn.Dropout(dropout))
            width = hidden
        self.layers = nn.Sequential(*mods)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x.flatten(1)))


class DigitsCNN(nn.Module):
    """A small conv net on the 1×8×8 images: conv → BN → ReLU ×2, pool, linear head."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1), nn.BatchNorm2d(channels * 2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(channels * 2 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def mlp(hidden: int = 512, depth: int = 2, dropout: float = 0.0) -> DigitsMLP:
    return DigitsMLP(hidden=hidden, depth=depth, dropout=dropout)


def cnn(channels: int = 32) -> DigitsCNN:
    return DigitsCNN(channels=channels)


def tensors(seed: int = 0, val_fraction: float = 0.2, train_size: int | None = None):
    """(x_train, y_train, x_val, y_val): pixels scaled to [0, 1], flattened to 64."""
    from sklearn.datasets import load_digits   # lazy: scikit-learn loads (about a second) only when data is built

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(x) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    if train_size is not None:
        train = train[:train_size]
    return x[train], y[train], x[val], y[val]


def loaders(batch_size: int = 64, seed: int = 0, val_fraction: float = 0.2, train_size: int | None = None):
    """(train_loader, eval_loader) over the fixed split. The train loader reshuffles each
    epoch from a generator seeded by `seed`, so a run is reproducible."""
    xt, yt, xv, yv = tensors(seed=seed, val_fraction=val_fraction, train_size=train_size)
    return tensor_loaders((xt, yt), (xv, yv), batch_size, seed, eval_batch=512)
