"""Triton's kernels run in its CPU interpreter when there is no GPU. Triton reads
TRITON_INTERPRET when a kernel is decorated (at import of planc.kernels.triton_bsr), so
it is set here, before any test module imports the kernels."""
import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _own_timing_cache(tmp_path, monkeypatch):
    """Each test gets an empty layer-timing cache (planc.timing_cache): no test reads a
    timing another made, or writes into the user's ~/.cache."""
    monkeypatch.setenv("PLANC_TIMING_CACHE", str(tmp_path / "layer-timings.json"))
