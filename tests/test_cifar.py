"""cifar10: the official binary archive, downloaded from a local 127.0.0.1 server (a small archive built
here in the same format), checked, read without extraction, and trained on (the model follows the data)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from capsctl.data import cifar, datasets
from capsctl.errors import CapsctlError

from ._helpers import TINY, assert_one_line_error, run_cli, static_server


def _records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    planes = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)  # R, G, B planes
    raw = b"".join(bytes([labels[i]]) + planes[i].tobytes() for i in range(n))
    return raw, labels, planes


def _archive(folder: Path, members: dict[str, bytes] | None = None) -> tuple[Path, dict]:
    """A cifar-10-binary.tar.gz with 5 training batches of 3 records and a test batch of 4."""
    truth: dict[str, list] = {"train": [], "test": []}
    if members is None:
        members = {}
        for k in range(1, 6):
            raw, y, x = _records(3, k)
            members[f"cifar-10-batches-bin/data_batch_{k}.bin"] = raw
            truth["train"].append((y, x))
        raw, y, x = _records(4, 9)
        members["cifar-10-batches-bin/test_batch.bin"] = raw
        truth["test"].append((y, x))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / cifar.ARCHIVE
    path.write_bytes(buf.getvalue())
    return path, truth


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """The small archive on a local server; the registry entry's digest set to its MD5."""
    path, truth = _archive(tmp_path / "www")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    info = replace(datasets.DATASETS["cifar10"], sha256={"archive": digest})
    monkeypatch.setitem(datasets.DATASETS, "cifar10", info)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this test's own cache: never shared
    with static_server(tmp_path / "www") as url:
        monkeypatch.setenv("CAPSCTL_MIRRORS", f"{url}/")
        yield truth


def test_download_check_and_read_planes_as_rgb(served):
    ds = datasets.load("cifar10")
    train, test = ds.train(), ds.test()
    assert train.images.shape == (15, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int64
    y, x = served["test"][0]
    assert test.labels.tolist() == y.tolist()
    np.testing.assert_array_equal(np.round(test.images[2] * 255).astype(np.uint8), x[2].transpose(1, 2, 0))
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert (datasets.cache_root() / "cifar10" / cifar.ARCHIVE).is_file()


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(served, monkeypatch):
    info = replace(datasets.DATASETS["cifar10"], sha256={"archive": "0" * 32})
    monkeypatch.setitem(datasets.DATASETS, "cifar10", info)
    with pytest.raises(CapsctlError, match="mismatch"):
        datasets.load("cifar10")
    assert not (datasets.cache_root() / "cifar10" / cifar.ARCHIVE).exists()


@pytest.mark.parametrize(("members", "fragment"), [
    ({"cifar-10-batches-py/data_batch_1": b"\x80\x04pickle"}, "data_batch_1.bin is missing"),
    ({**{f"cifar-10-batches-bin/data_batch_{k}.bin": bytes(3073) for k in range(1, 6)},
      "cifar-10-batches-bin/test_batch.bin": bytes(3000)}, "not a whole number of 3073-byte records"),
    ({**{f"cifar-10-batches-bin/data_batch_{k}.bin": bytes([12]) + bytes(3072) for k in range(1, 6)},
      "cifar-10-batches-bin/test_batch.bin": bytes(3073)}, "label 12 is out of range"),
])
def test_damaged_archives_are_one_line(tmp_path, members, fragment):
    path, _ = _archive(tmp_path, members)
    with pytest.raises(CapsctlError) as info:
        cifar.read_archive(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / cifar.ARCHIVE).write_bytes(b"not gzip")
    with pytest.raises(CapsctlError, match="not a readable CIFAR-10 binary archive"):
        cifar.read_archive(tmp_path / "junk" / cifar.ARCHIVE)


@pytest.mark.torch
def test_train_on_cifar10_takes_rgb_and_class_names_from_the_data(served, tmp_path, capsys):
    from capsctl.model.weights import load_model

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    code, out, err = run_cli(["train", "--dataset", "cifar10", "--spec", tmp_path / "tiny.json",
                              "--epochs", "1", "-q", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    spec, _ = load_model(tmp_path / "run" / "model.safetensors")
    assert spec.in_channels == 3 and spec.class_names == cifar.CLASSES
    code, out, _ = run_cli(["data", "list", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)["datasets"]}
    assert rows["cifar10"]["found"] is True and rows["cifar10"]["found_in"] == "cache"


def test_data_fetch_from_a_folder_checks_the_archive_then_copies_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _archive(tmp_path / "good")
    code, out, err = run_cli(["data", "fetch", "cifar10", "--from", tmp_path / "good"], capsys)
    assert code == 2 and "15 training and 4 test images, but cifar10 has 50,000 and 10,000" in err
    assert not (datasets.cache_root() / "cifar10").exists()
    monkeypatch.setitem(datasets.DATASETS, "cifar10", replace(datasets.DATASETS["cifar10"], sizes=(15, 4)))
    code, out, err = run_cli(["data", "fetch", "cifar10", "--from", tmp_path / "good"], capsys)
    assert_one_line_error(code, out, err, "is not the published cifar10 file (its MD5 differs)")
    assert not (datasets.cache_root() / "cifar10").exists()
    md5 = hashlib.md5((tmp_path / "good" / cifar.ARCHIVE).read_bytes()).hexdigest()
    monkeypatch.setitem(datasets.DATASETS, "cifar10",
                        replace(datasets.DATASETS["cifar10"], sizes=(15, 4), sha256={"archive": md5}))
    code, out, err = run_cli(["data", "fetch", "cifar10", "--from", tmp_path / "good"], capsys)
    assert code == 0, err
    assert (datasets.cache_root() / "cifar10" / cifar.ARCHIVE).read_bytes() == (
        tmp_path / "good" / cifar.ARCHIVE).read_bytes()
    _archive(tmp_path / "bad", {"cifar-10-batches-bin/test_batch.bin": bytes(3073)})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    code, out, err = run_cli(["data", "fetch", "cifar10", "--from", tmp_path / "bad"], capsys)
    assert out == ""
    assert code == 2 and "data_batch_1.bin is missing" in err
    assert not (datasets.cache_root() / "cifar10" / cifar.ARCHIVE).exists()


def test_an_interrupted_copy_from_a_folder_leaves_no_cache_folder(tmp_path, monkeypatch):
    """Ctrl-C during `data fetch X --from DIR` left the new cache folder (empty, or with 1 to 3 of MNIST's
    4 files); a copy into a new folder that stops part way now removes it, and an existing one is kept."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _archive(tmp_path / "good")
    md5 = hashlib.md5((tmp_path / "good" / cifar.ARCHIVE).read_bytes()).hexdigest()
    info = replace(datasets.DATASETS["cifar10"], sizes=(15, 4), sha256={"archive": md5})
    dest = datasets.cache_root() / "cifar10"

    def interrupted(path, data):
        Path(path).write_bytes(data[: len(data) // 2])  # (a part written, then the interrupt)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "atomic_write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        datasets.copy_from(info, tmp_path / "good", dest)
    assert not dest.exists()
    dest.mkdir(parents=True)
    (dest / "kept.txt").write_text("an earlier copy's")
    with pytest.raises(KeyboardInterrupt):
        datasets.copy_from(info, tmp_path / "good", dest)
    assert (dest / "kept.txt").read_text() == "an earlier copy's"
