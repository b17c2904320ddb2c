"""What the download code guarantees beyond tests/test_data.py, the properties docs/DESIGN-NOTES.md gives
as the reasons it is not pooch: a content digest (of the decompressed IDX bytes) is checked before the
file is published, so a mismatch leaves nothing; a killed earlier download's `.part` is reused, not
accumulated. Against a static server on 127.0.0.1."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from capsctl.data import datasets
from capsctl.errors import CapsctlError

from ._helpers import idx_bytes, static_server, write_set


def _serve_set(root: Path) -> dict[str, bytes]:
    """A tiny MNIST-style set, gzipped, in `root`; returns each role's decompressed IDX bytes."""
    rng = np.random.default_rng(0)
    shapes = {"train-images": (6, 28, 28), "train-labels": (6,), "t10k-images": (3, 28, 28),
              "t10k-labels": (3,)}
    arrays = {role: rng.integers(0, 10, shape) for role, shape in shapes.items()}
    write_set(root, arrays)
    return {role: idx_bytes(arr) for role, arr in arrays.items()}


def _content_info(raw: dict[str, bytes]) -> datasets.DatasetInfo:
    return datasets.DatasetInfo(
        name="tiny", mirrors=(), digest_of="content", classes=tuple("0123456789"),
        sha256={role: hashlib.sha256(data).hexdigest() for role, data in raw.items()},
    )


def test_a_content_digest_mismatch_publishes_nothing(tmp_path):
    info = _content_info(_serve_set(tmp_path / "srv"))
    info.sha256["train-images"] = "0" * 64
    with static_server(tmp_path / "srv") as url, pytest.raises(CapsctlError, match="SHA-256 mismatch"):
        datasets.fetch(info, tmp_path / "cache", mirrors=[url])
    # no file under its final name, no temporary, and no empty folder (the fetch made it)
    assert not (tmp_path / "cache").exists()


def test_a_killed_downloads_part_file_is_replaced_not_kept(tmp_path):
    info = _content_info(_serve_set(tmp_path / "srv"))
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / (datasets.FILES["train-images"] + ".gz.part")
    stale.write_bytes(b"\x1f\x8b half a download")
    with static_server(tmp_path / "srv") as url:
        datasets.fetch(info, cache, mirrors=[url])
    assert sorted(p.name for p in cache.iterdir()) == sorted(f + ".gz" for f in datasets.FILES.values())
    assert datasets.Dataset("mnist", cache).train().images.shape == (6, 28, 28, 1)


def test_two_processes_fetching_one_set_download_it_once(tmp_path, capsys):
    """The ranks of `train --nproc` reach a missing data set together: each downloaded it into the same
    `.part` files, truncating, checking and deleting the other's (spurious SHA-256 mismatches)."""
    import http.server
    import threading
    import time

    raw = _serve_set(tmp_path / "srv")
    info = _content_info(raw)
    requests: list[str] = []

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, directory=str(tmp_path / "srv"), **k)

        def do_GET(self) -> None:
            requests.append(self.path)
            time.sleep(0.2)  # (long enough for the other fetch to start meanwhile)
            super().do_GET()

        def log_message(self, *a) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            datasets.fetch(info, tmp_path / "cache" / "tiny", mirrors=[url])
        except BaseException as e:  # (reported below)
            errors.append(e)

    try:
        threads = [threading.Thread(target=fetch) for _ in range(2)]  # (flock: one lock per open())
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert errors == []
    assert sorted(requests) == sorted(f"/{f}.gz" for f in datasets.FILES.values())  # each file once
    assert datasets.Dataset("mnist", tmp_path / "cache" / "tiny").train().images.shape == (6, 28, 28, 1)
    assert "waiting for another capsctl process downloading" in capsys.readouterr().err


def test_a_download_draws_no_bar_under_quiet(tmp_path, monkeypatch):
    """`-q` said "no progress bars", but a first use's download drew one (on a terminal, where a bar
    disabled after it started was never stopped: redrawn on, the cursor left hidden)."""
    import io

    from rich.console import Console

    from capsctl import _console

    info = _content_info(_serve_set(tmp_path / "srv"))
    name = datasets.FILES["train-images"] + ".gz"
    for quiet, folder in ((False, "loud"), (True, "quiet")):
        screen = io.StringIO()
        monkeypatch.setattr(_console, "err", Console(file=screen, force_terminal=True, width=100))
        monkeypatch.setattr(_console, "_quiet", quiet)
        with static_server(tmp_path / "srv") as url:
            datasets.fetch(info, tmp_path / folder, mirrors=[url])
        drawn = screen.getvalue()
        assert (name in drawn) != quiet, (quiet, drawn)
        assert drawn.count("\x1b[?25l") == drawn.count("\x1b[?25h")  # the cursor shown again
