"""Downloads through a real HTTP server on 127.0.0.1: all or nothing, one-line errors offline."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from metarun.data import omniglot as omniglot_module
from metarun.data.download import download, md5sum
from metarun.data.omniglot import Omniglot
from metarun.errors import DataError


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature is the base class's
        pass


@pytest.fixture
def serve(tmp_path):
    """``serve(folder) -> base URL`` of a threaded HTTP server for that folder."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL nothing listens on: the port was just bound and released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/images_background.zip"


def test_md5sum_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)
    assert md5sum(path, chunk_bytes=1000) == hashlib.md5(path.read_bytes()).hexdigest()


def test_download_succeeds_and_leaves_only_the_file(tmp_path, serve):
    published = tmp_path / "published"
    published.mkdir()
    payload = bytes(range(256)) * 10_000
    (published / "data.bin").write_bytes(payload)
    base = serve(published)

    destination = tmp_path / "store" / "nested" / "data.bin"
    result = download(f"{base}/data.bin", destination, hashlib.md5(payload).hexdigest(), "data")
    assert result == destination and destination.read_bytes() == payload
    assert [path.name for path in destination.parent.iterdir()] == ["data.bin"]


def test_wrong_md5_fails_and_leaves_nothing(tmp_path, serve):
    published = tmp_path / "published"
    published.mkdir()
    (published / "data.bin").write_bytes(b"not what we expected")
    store = tmp_path / "store"
    with pytest.raises(DataError, match=r"downloaded data.bin from http://127.0.0.1:\d+/data.bin "
                                        r"but its md5 is [0-9a-f]{32}, expected 0{32}") as caught:
        download(f"{serve(published)}/data.bin", store / "data.bin", "0" * 32, "data")
    assert "\n" not in str(caught.value)
    assert list(store.iterdir()) == []


def test_http_error_names_the_status(tmp_path, serve):
    store = tmp_path / "store"
    with pytest.raises(DataError, match=r"could not download gone.zip from .*gone.zip "
                                        r"\(HTTP 404 .*\); put the official file at "):
        download(f"{serve(tmp_path)}/gone.zip", store / "gone.zip", "0" * 32, "gone")
    assert list(store.iterdir()) == []


def test_unreachable_server_gives_one_offline_line(tmp_path, closed_port_url):
    store = tmp_path / "store"
    destination = store / "images_background.zip"
    with pytest.raises(DataError) as caught:
        download(closed_port_url, destination, "0" * 32, "background")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"could not download images_background.zip from {closed_port_url} (")
    assert message.endswith(f"put the official file at {destination} or check your network")
    assert list(store.iterdir()) == []


def publish_fake_omniglot(tmp_path: Path, make_fake_omniglot, serve, monkeypatch) -> Path:
    """Fake Omniglot files behind a local server, wired in place of the official URLs."""
    published = make_fake_omniglot(tmp_path / "upstream")
    base = serve(published)
    monkeypatch.setattr(omniglot_module, "ARCHIVES", {
        name: (f"{base}/images_{name}.zip", md5sum(published / f"images_{name}.zip"))
        for name in ("background", "evaluation")
    })
    monkeypatch.setattr(omniglot_module, "SPLIT_LIST_URL", base + "/splits/vinyals/{phase}.txt")
    monkeypatch.setattr(omniglot_module, "SPLIT_LIST_MD5", {
        phase: md5sum(published / "splits" / "vinyals" / f"{phase}.txt")
        for phase in ("train", "val", "test")
    })
    return published


def test_omniglot_downloads_missing_files(tmp_path, make_fake_omniglot, serve, monkeypatch):
    published = publish_fake_omniglot(tmp_path, make_fake_omniglot, serve, monkeypatch)
    root = tmp_path / "user"
    data = Omniglot(root=str(root), cache_dir=str(tmp_path / "cache"), download=True)

    folder = root / "omniglot"
    for name in ("images_background.zip", "images_evaluation.zip", "splits/vinyals/val.txt"):
        assert (folder / name).read_bytes() == (published / name).read_bytes()
    reference = Omniglot(root=str(tmp_path / "upstream"), download=False)
    assert torch.equal(data.images, reference.images)
    assert data.num_classes("val") == 8


def test_omniglot_download_with_bad_md5_leaves_nothing(tmp_path, make_fake_omniglot, serve,
                                                       monkeypatch):
    publish_fake_omniglot(tmp_path, make_fake_omniglot, serve, monkeypatch)
    url = omniglot_module.ARCHIVES["background"][0]
    monkeypatch.setitem(omniglot_module.ARCHIVES, "background", (url, "f" * 32))
    root = tmp_path / "user"
    with pytest.raises(DataError, match=r"downloaded images_background.zip .* md5"):
        Omniglot(root=str(root), download=True)
    assert list((root / "omniglot").iterdir()) == []


def test_omniglot_offline(tmp_path, closed_port_url, monkeypatch):
    monkeypatch.setitem(omniglot_module.ARCHIVES, "background", (closed_port_url, "0" * 32))
    root = tmp_path / "user"
    with pytest.raises(DataError) as caught:
        Omniglot(root=str(root), download=True)
    message = str(caught.value)
    assert "\n" not in message
    assert f"images_background.zip from {closed_port_url}" in message
    assert str(root / "omniglot" / "images_background.zip") in message
    assert "images_evaluation.zip is missing too" in message
    assert list((root / "omniglot").iterdir()) == []
