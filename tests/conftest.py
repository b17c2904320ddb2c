"""Shared fixtures. Real data comes from ../shared/data/mnist-5k beside the checkout (as in CI), else from the
copy embedded in the package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ._helpers import BACKENDS

ROOT = Path(__file__).resolve().parents[1]


def _mnist_dir() -> Path:
    env = os.environ.get("CAPSCTL_TEST_MNIST")
    if env:
        return Path(env)
    shared = ROOT.parent / "shared" / "data" / "mnist-5k"
    # the same files ship inside the package: a checkout without ../shared (a user's machine) tests on those
    return shared if shared.is_dir() else ROOT / "capsctl" / "data" / "mnist-5k"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real mnist-5k folder; its absence is a failure, not a skip."""
    d = _mnist_dir()
    if not (d / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"real MNIST data not found at {d} (set CAPSCTL_TEST_MNIST)")
    return d


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path):
    from capsctl.data import datasets

    return datasets.Dataset("mnist", mnist_dir)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """Each backend in turn (as Keras' own CI runs one suite against every backend)."""
    from capsctl.backend import get_backend

    return get_backend(request.param)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never read or fill the user's real cache, and never download during tests.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    monkeypatch.setenv("CAPSCTL_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.delenv("CAPSCTL_DATA_DIR", raising=False)
