"""IDX reading, data set search order, and the real download code against a server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from capsctl.data import datasets, idx
from capsctl.errors import CapsctlError

from ._helpers import assert_one_line_error, idx_bytes, run_cli, static_server, write_set


def random_set(folder: Path, n: int = 20, seed: int = 0) -> dict[str, bytes]:
    """A tiny MNIST-style data set of random pixels and labels; returns the bytes written per role."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (n, 28, 28)),
        "train-labels": rng.integers(0, 10, n),
        "t10k-images": rng.integers(0, 256, (n // 2, 28, 28)),
        "t10k-labels": rng.integers(0, 10, n // 2),
    }
    return write_set(folder, arrays)


def test_reads_the_real_mnist_5k(mnist):
    train, test = mnist.train(), mnist.test()
    assert train.images.shape == (5000, 28, 28, 1) and train.images.dtype == np.float32
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    assert np.bincount(train.labels).tolist() == [500] * 10


def test_raw_and_gzip_are_equal(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    (tmp_path / "raw").write_bytes(idx_bytes(a))
    (tmp_path / "gz").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "raw"), a)
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "gz"), a)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x01" + b"\x00" * 8, "bad IDX magic"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, "bad IDX magic"),
        (b"\x00\x00\x08\x09" + b"\x00" * 8, "dimensions"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros((5, 4, 4)))[:-3], "truncated"),
        (idx_bytes(np.zeros((5, 4, 4))) + b"\x00", "trailing bytes"),
        (gzip.compress(idx_bytes(np.zeros(10)))[:-12], "truncated"),
        (b"\x1f\x8b" + b"garbage" * 10, "corrupt gzip"),
    ],
)
def test_bad_idx_is_refused_with_a_reason(data, message):
    with pytest.raises(CapsctlError, match=message):
        idx.parse_idx(data, "f.idx")


def test_images_labels_mismatch_is_refused(tmp_path):
    random_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(CapsctlError, match="10 images but .* has 3 labels"):
        datasets.Dataset("mnist", tmp_path).test()


def test_search_order(tmp_path, monkeypatch):
    env_dir, cache_dir, explicit = tmp_path / "env", tmp_path / "cache", tmp_path / "explicit"
    random_set(env_dir / "mnist")
    random_set(cache_dir / "capsctl" / "mnist")
    random_set(explicit)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))
    assert datasets.locate("mnist") == cache_dir / "capsctl" / "mnist"
    monkeypatch.setenv("CAPSCTL_DATA_DIR", str(env_dir))
    assert datasets.locate("mnist") == env_dir / "mnist"
    assert datasets.locate("mnist", explicit) == explicit
    with pytest.raises(CapsctlError, match="missing train-images"):
        datasets.locate("mnist", tmp_path)
    with pytest.raises(CapsctlError, match="unknown dataset"):
        datasets.locate("cifar")


def _info(files: dict[str, bytes]) -> datasets.DatasetInfo:
    return datasets.DatasetInfo(
        name="tiny", mirrors=(), sha256={r: hashlib.sha256(b).hexdigest() for r, b in files.items()},
        digest_of="download", classes=tuple("0123456789"),
    )


def test_download_tries_mirrors_in_turn_and_verifies(tmp_path):
    files = random_set(tmp_path / "srv" / "good")
    (tmp_path / "srv" / "empty").mkdir()
    with static_server(tmp_path / "srv") as url:
        mirrors = [f"{url}/empty/", f"{url}/good/"]
        dest = datasets.fetch(_info(files), tmp_path / "cache", mirrors=mirrors)
    for role, data in files.items():
        assert (dest / (datasets.FILES[role] + ".gz")).read_bytes() == data
    assert not list(dest.glob("*.part"))
    assert datasets.Dataset("mnist", dest).train().images.shape == (20, 28, 28, 1)


def test_download_refuses_a_checksum_mismatch_and_leaves_nothing(tmp_path):
    files = random_set(tmp_path / "srv")
    info = _info(files)
    info.sha256["train-labels"] = "0" * 64
    refused = pytest.raises(CapsctlError, match="SHA-256 mismatch.*--data-dir")
    with static_server(tmp_path / "srv") as url, refused:
        datasets.fetch(info, tmp_path / "cache", mirrors=[url])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_content_digests_accept_a_regzipped_copy(tmp_path):
    files = random_set(tmp_path / "srv")
    info = datasets.DatasetInfo(
        name="tiny", mirrors=(), digest_of="content", classes=tuple("0123456789"),
        sha256={r: hashlib.sha256(gzip.decompress(b)).hexdigest() for r, b in files.items()},
    )
    for f in (tmp_path / "srv").iterdir():  # different gzip bytes, same content
        f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), compresslevel=1, mtime=12345))
    with static_server(tmp_path / "srv") as url:
        datasets.fetch(info, tmp_path / "cache", mirrors=[url])
    assert datasets.is_complete(tmp_path / "cache")


def test_cli_download_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    # Every mirror answers 404: the error names the way out.
    srv_root = tmp_path / "srv"
    srv_root.mkdir()
    with static_server(srv_root) as url:
        monkeypatch.setenv("CAPSCTL_MIRRORS", f"{url}/missing/,{url}/gone/")
        code, out, err = run_cli(["data", "fetch", "mnist"], capsys)
    assert_one_line_error(code, out, err, "2 mirror(s) failed", "--data-dir")
    assert err.startswith("error: could not download mnist")


def test_cli_real_mnist_checksum_rejects_other_files(tmp_path, monkeypatch, capsys, mnist_dir):
    srv_root = tmp_path / "srv"
    shutil.copytree(mnist_dir, srv_root)
    with static_server(srv_root) as url:
        monkeypatch.setenv("CAPSCTL_MIRRORS", url)
        code, _, err = run_cli(["data", "fetch", "mnist"], capsys)
    # (not the one-line contract: the download's progress line comes before the error)
    assert code == 2 and "SHA-256 mismatch" in err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert not list((datasets.cache_root() / "mnist").glob("train-images*"))


def test_cli_fetch_from_folder_and_list(tmp_path, capsys, monkeypatch, mnist_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # (other tests fill the session's cache)
    # the 5,000-digit subset is not the full set: cached as `mnist`, every later run would train on it
    code, out, err = run_cli(["data", "fetch", "mnist", "--from", mnist_dir], capsys)
    assert_one_line_error(code, out, err, "5,000 training", "mnist has 60,000", "--data-dir")
    assert not (datasets.cache_root() / "mnist").exists()
    # a folder with the set's own counts is copied (here the counts are the subset's, as if it were mnist)
    from dataclasses import replace

    as_if_full = replace(datasets.DATASETS["mnist"], sizes=(5_000, 10_000))
    monkeypatch.setitem(datasets.DATASETS, "mnist", as_if_full)
    # the counts are right but the files are not the published ones: refused by their SHA-256
    code, out, err = run_cli(["data", "fetch", "mnist", "--from", mnist_dir], capsys)
    assert_one_line_error(code, out, err, "train-images-idx3-ubyte.gz is not the published mnist file "
                          "(its SHA-256 differs)", "--data-dir")
    assert not (datasets.cache_root() / "mnist").exists()
    contents = {role: hashlib.sha256(gzip.decompress(datasets.find_file(mnist_dir, role).read_bytes()))
                .hexdigest() for role in datasets.ROLES}
    as_if_full = replace(as_if_full, sha256=contents)  # (these files' sums)
    monkeypatch.setitem(datasets.DATASETS, "mnist", as_if_full)
    code, _, err = run_cli(["data", "fetch", "mnist", "--from", mnist_dir], capsys)
    assert code == 0 and err == ""
    cached = datasets.cache_root() / "mnist"
    assert datasets.is_complete(cached)
    code, out, _ = run_cli(["data", "list"], capsys)
    assert code == 0 and "mnist" in out and "cache" in out
    bad = tmp_path / "bad"
    random_set(bad)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really")
    code, out, err = run_cli(["data", "fetch", "fashion-mnist", "--from", bad], capsys)
    assert_one_line_error(code, out, err, "corrupt gzip")
    assert not (datasets.cache_root() / "fashion-mnist").exists()
    # mnist's sums are of the decompressed bytes: a plain or a re-gzipped copy is judged like a download
    plain, regzipped = tmp_path / "plain", tmp_path / "regzipped"
    plain.mkdir()
    regzipped.mkdir()
    for f in mnist_dir.glob("*.gz"):
        content = gzip.decompress(f.read_bytes())
        (plain / f.name[:-3]).write_bytes(content)
        (regzipped / f.name).write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    name = "t10k-labels-idx1-ubyte.gz"
    assert (regzipped / name).read_bytes() != (mnist_dir / name).read_bytes()  # (other gzip bytes)
    for folder in (plain, regzipped):
        code, out, err = run_cli(["data", "fetch", "mnist", "--from", folder], capsys)
        assert code == 0 and err == ""
    labels = bytearray((plain / "t10k-labels-idx1-ubyte").read_bytes())
    labels[-1] = (labels[-1] + 1) % 10  # one test label changed
    (plain / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    code, out, err = run_cli(["data", "fetch", "mnist", "--from", plain], capsys)
    assert_one_line_error(code, out, err, "t10k-labels-idx1-ubyte is not the published mnist file")
    # a set whose sums are of the decompressed bytes judges any copy, gzipped or not
    fashion = replace(datasets.DATASETS["fashion-mnist"], sizes=(5_000, 10_000))
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist", fashion)
    for folder in (plain, mnist_dir):
        code, out, err = run_cli(["data", "fetch", "fashion-mnist", "--from", folder], capsys)
        assert_one_line_error(code, out, err, "is not the published fashion-mnist file (its SHA-256 differs)")
    assert not (datasets.cache_root() / "fashion-mnist").exists()


def test_mnist_test_set_sums_are_those_of_the_shipped_official_test_set():
    """mnist's sums are of the decompressed files; the shipped mnist-5k test set is the official one."""
    shipped = datasets.EMBEDDED_DIR / "mnist-5k"
    for role in ("t10k-images", "t10k-labels"):
        found = datasets.find_file(shipped, role)
        assert found is not None
        assert datasets.file_digest(found, "content") == datasets.DATASETS["mnist"].sha256[role]
    assert datasets.DATASETS["mnist"].digest_of == "content"


def test_a_second_copy_replaces_the_first_whatever_its_compression(tmp_path):
    """`data fetch --from A` (gzipped) then `--from B` (plain files): the cache held both and went on
    reading A's .gz files."""
    from ._helpers import write_set

    random_set(tmp_path / "a", seed=1)
    rng = np.random.default_rng(2)
    b = {"train-images": rng.integers(0, 256, (20, 28, 28)), "train-labels": rng.integers(0, 10, 20),
         "t10k-images": rng.integers(0, 256, (10, 28, 28)), "t10k-labels": rng.integers(0, 10, 10)}
    write_set(tmp_path / "b", b, compress=False)
    from dataclasses import replace

    info = replace(datasets.DATASETS["mnist"], sizes=None, sha256={})  # (any image counts, any files)
    dest = tmp_path / "cache"
    datasets.copy_from(info, tmp_path / "a", dest)
    datasets.copy_from(info, tmp_path / "b", dest)
    assert not list(dest.glob("*.gz"))
    got = datasets.Dataset("mnist", dest).train()
    np.testing.assert_array_equal(got.labels, b["train-labels"])
    np.testing.assert_array_equal(np.round(got.images[..., 0] * 255), b["train-images"])
    datasets.copy_from(info, tmp_path / "a", dest)  # and back
    assert len(list(dest.glob("*.gz"))) == 4 and len(list(dest.iterdir())) == 4


def test_a_failed_first_download_leaves_no_empty_folder(tmp_path):
    files = random_set(tmp_path / "srv" / "good")
    (tmp_path / "srv" / "empty").mkdir()
    with static_server(tmp_path / "srv") as url, pytest.raises(CapsctlError, match="could not download"):
        datasets.fetch(_info(files), tmp_path / "cache" / "tiny", mirrors=[f"{url}/empty/"])
    assert not (tmp_path / "cache" / "tiny").exists()


def test_a_data_dir_without_the_named_sets_counts_is_said_to_be_read_as_it_is(mnist_dir, capsys, tmp_path):
    # (`--dataset fashion-mnist --data-dir` of MNIST files trained on digits under Fashion's names, silently)
    ds = datasets.load("fashion-mnist", mnist_dir)
    err = capsys.readouterr().err
    assert "holds 5,000 training and 10,000 test images, not fashion-mnist's 60,000 and 10,000" in err
    assert ds.classes[0] == "T-shirt"  # (still read: a subset of a named set is a fine choice)
    datasets.load("mnist-5k", mnist_dir)  # its own counts: nothing to say
    assert capsys.readouterr().err == ""
    random_set(tmp_path / "mine")  # nor with the default data set: its --data-dir is any IDX folder
    datasets.load("mnist-5k", tmp_path / "mine")
    assert capsys.readouterr().err == ""
