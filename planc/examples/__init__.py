"""Example models and data for planc's plans, tests and experiments."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset


def tensor_loaders(train: tuple, evaluation: tuple, batch_size: int, seed: int, eval_batch: int,
                   train_collate: Optional[Callable[[torch.Generator], Callable]] = None):
    """(train_loader, eval_loader) over in-memory tensors, as every example's data factory
    returns them: training batches reshuffled each epoch from a generator seeded by
    `seed` (so a run is reproducible), incomplete last batch dropped; evaluation in order.
    `train_collate(generator)` makes the training batches' collate function; it may draw
    from that generator (the loader's own, whose state a checkpoint keeps, so a resumed
    run draws the same)."""
    generator = torch.Generator().manual_seed(seed)
    collate = train_collate(generator) if train_collate is not None else None
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=generator, collate_fn=collate)
    return train_loader, DataLoader(TensorDataset(*evaluation), batch_size=eval_batch)
