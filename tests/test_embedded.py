"""The mnist-5k set embedded in the package: found offline, checked against its SHA-256 on load, and a missing
or damaged file is one line naming the reinstall command."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

from capsctl.data import datasets
from capsctl.errors import CapsctlError

from ._helpers import assert_one_line_error, run_cli

INFO = datasets.DATASETS["mnist-5k"]


def test_the_embedded_files_are_the_published_ones(mnist_dir: Path) -> None:
    folder = datasets.EMBEDDED_DIR / "mnist-5k"
    for role in datasets.ROLES:
        name = datasets.FILES[role] + ".gz"
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == INFO.sha256[role]
        # the same digits as the shared copy the rest of the suite reads
        assert gzip.decompress(data) == gzip.decompress((mnist_dir / name).read_bytes())


def test_it_loads_offline_with_500_digits_a_class() -> None:
    ds = datasets.load("mnist-5k")  # the test session points every mirror at a dead port
    train, test = ds.train(), ds.test()
    assert train.images.shape == (5000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert sorted(set(train.labels.tolist())) == list(range(10))
    assert all(int((train.labels == d).sum()) == 500 for d in range(10))
    assert ds.folder == datasets.EMBEDDED_DIR / "mnist-5k"


@pytest.fixture
def embedded_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the embedded folder that a test may damage."""
    shutil.copytree(datasets.EMBEDDED_DIR / "mnist-5k", tmp_path / "mnist-5k")
    monkeypatch.setattr(datasets, "EMBEDDED_DIR", tmp_path)
    return tmp_path / "mnist-5k"


def test_a_damaged_file_names_the_reinstall_command(embedded_copy: Path) -> None:
    target = embedded_copy / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CapsctlError) as e:
        datasets.load("mnist-5k")
    msg = str(e.value)
    assert "\n" not in msg and "damaged" in msg and target.name in msg and datasets.REINSTALL in msg


def test_a_missing_file_names_the_reinstall_command(embedded_copy: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (embedded_copy / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(CapsctlError) as e:
        datasets.load("mnist-5k")
    assert "missing" in str(e.value) and datasets.REINSTALL in str(e.value)
    code, out, err = run_cli(["data", "fetch", "mnist-5k"], capsys)
    assert_one_line_error(code, out, err, "train-images-idx3-ubyte.gz", "reinstall")


def test_data_commands_know_the_embedded_set(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code, out, _ = run_cli(["data", "list", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["datasets"]}
    assert rows["mnist-5k"]["found_in"] == "embedded"
    code, out, _ = run_cli(["data", "fetch", "mnist-5k"], capsys)
    assert code == 0 and "nothing to fetch" in out


def test_a_bad_dataset_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["eval-pairs", "--dataset", "mnist-6k"], capsys)
    assert_one_line_error(code, out, err, "mnist-6k")
