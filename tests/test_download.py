"""Tests of anodev2_jax.download and of ``dataset="cifar10"`` without TensorFlow, against a local HTTP server.

A threaded ``http.server`` on 127.0.0.1 serves a small fake ``cifar-10-python.tar.gz``
(the six batches written by the test helpers, ~74 KB) and misbehaves on request: a
transfer cut short, a server that ignores ``Range``, one that stalls, HTTP errors. The
module constants ``CIFAR10_URL`` / ``CIFAR10_MD5`` / ``CIFAR10_SIZE`` are pointed at it,
and ``$ANODEV2_CIFAR10_URL`` is cleared, so no test reaches the internet ("no network" is
a ``getaddrinfo`` that fails, as it does offline).
"""

import fcntl
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import cifar_batch_bytes, fake_cifar_batches, write_cifar_tarball

from anodev2_jax import data as D
from anodev2_jax import download
from anodev2_jax.data import DataError
from anodev2_jax.download import DownloadError

REPO = Path(__file__).resolve().parents[1]


class FakeServer:
    """One file at ``/cifar-10-python.tar.gz``; ``mode`` says how the next requests are answered.

    Modes: ``"ok"`` (honours ``Range`` with 206), ``"ignore_range"`` (always the whole file,
    200), ``"cut"`` (promises the whole rest, sends ``cut`` bytes, closes), ``"stall"``
    (sends the headers and 100 bytes, then nothing for 5 s), ``"404"``.
    """

    def __init__(self, payload: bytes):
        self.payload, self.mode, self.cut, self.ranges = payload, "ok", 0, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if server.mode == "404":
                    self.send_error(404, "Not Found")
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and server.mode != "ignore_range" else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "cut":
                    self.wfile.write(body[: server.cut])
                elif server.mode == "stall":
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    time.sleep(5)
                else:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def batches():
    return fake_cifar_batches(seed=3, n_per_batch=4)


@pytest.fixture(scope="module")
def payload(tmp_path_factory, batches):
    members = {n: cifar_batch_bytes(x, y, n.encode(), legacy=True) for n, (x, y) in batches.items()}
    return write_cifar_tarball(tmp_path_factory.mktemp("src") / "c.tar.gz", members).read_bytes()


@pytest.fixture
def server(payload, monkeypatch):
    """The fake server, with the download module's constants pointing at it."""
    s = FakeServer(payload)
    monkeypatch.delenv(download.URL_ENV, raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setattr(download, "CIFAR10_URL", s.url)
    monkeypatch.setattr(download, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(download, "CIFAR10_SIZE", len(payload))
    yield s
    s.close()


def fetch(server, dest, **kwargs):
    kwargs = {"md5": download.CIFAR10_MD5, "size": download.CIFAR10_SIZE, "progress": False, **kwargs}
    return download.download_file(kwargs.pop("url", server.url), dest, **kwargs)


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- download_file


def test_download_verifies_and_moves_into_place(server, tmp_path, payload, capsys):
    dest = tmp_path / "sub" / "c.tar.gz"
    assert fetch(server, dest) == dest
    assert dest.read_bytes() == payload and sorted(p.name for p in dest.parent.iterdir()) == ["c.tar.gz"]
    assert server.ranges == [None]
    err = capsys.readouterr().err  # not a terminal: one line says what is downloaded where
    assert err.count("\n") == 1 and server.url in err and str(dest) in err


def test_bad_checksum_sets_the_file_aside_and_the_next_run_starts_over(server, tmp_path, payload):
    server.payload = payload[:100] + bytes([payload[100] ^ 1]) + payload[101:]  # same size, one bit off
    dest = tmp_path / "c.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest)
    msg = one_line(info)
    assert f"md5 {hashlib.md5(server.payload).hexdigest()}, expected {download.CIFAR10_MD5}" in msg
    assert f"set aside as {dest}.bad" in msg and "rerun" in msg
    assert not dest.exists() and not Path(f"{dest}.part").exists()
    assert Path(f"{dest}.bad").read_bytes() == server.payload
    server.payload = payload
    fetch(server, dest)
    assert dest.read_bytes() == payload and server.ranges == [None, None]


def test_a_file_of_another_size_is_refused_before_any_byte(server, tmp_path, payload):
    server.payload = payload + b"extra"
    dest = tmp_path / "c.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest)
    assert f"serves a file of {len(payload) + 5} bytes, but the expected one has {len(payload)}" in one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_truncated_transfer_then_resume_with_range(server, tmp_path, payload):
    server.mode, server.cut = "cut", 30_000
    dest = tmp_path / "c.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest)
    msg = one_line(info)
    assert f"ended after 30,000 of {len(payload):,} bytes" in msg and "cut short" in msg and f"resume from {dest}.part" in msg
    assert Path(f"{dest}.part").read_bytes() == payload[:30_000] and not dest.exists()
    server.cut = 20_000  # interrupted again: the part grows from where it was
    with pytest.raises(DownloadError, match="cut short"):
        fetch(server, dest)
    assert Path(f"{dest}.part").read_bytes() == payload[:50_000]
    server.mode = "ok"
    fetch(server, dest)
    assert dest.read_bytes() == payload and not Path(f"{dest}.part").exists()
    assert server.ranges == [None, "bytes=30000-", "bytes=50000-"]


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path, payload):
    dest = tmp_path / "c.tar.gz"
    Path(f"{dest}.part").write_bytes(payload[:1000])
    server.mode = "ignore_range"
    fetch(server, dest)
    assert dest.read_bytes() == payload and server.ranges == ["bytes=1000-"]


def test_part_longer_than_the_file_is_discarded(server, tmp_path, payload):
    dest = tmp_path / "c.tar.gz"
    Path(f"{dest}.part").write_bytes(payload + b"junk")
    fetch(server, dest)
    assert dest.read_bytes() == payload and server.ranges == [None]


def test_complete_part_is_verified_without_a_request(server, tmp_path, payload):
    dest = tmp_path / "c.tar.gz"
    Path(f"{dest}.part").write_bytes(payload)
    fetch(server, dest)
    assert dest.read_bytes() == payload and server.ranges == []


def test_no_network(server, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    dest = tmp_path / "c.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest, url="https://cifar.example/cifar-10-python.tar.gz")
    assert "cannot resolve cifar.example" in one_line(info) and "no network, or a DNS failure" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no empty part left behind


def test_connection_refused_and_http_error(server, tmp_path):
    dest = tmp_path / "c.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest, url=f"http://127.0.0.1:{closed_port()}/c.tar.gz")
    assert "refused the connection" in one_line(info)
    server.mode = "404"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest)
    assert f"downloading {server.url} failed: HTTP 404 Not Found" in one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_transfer_times_out_and_keeps_the_part(server, tmp_path, payload):
    server.mode = "stall"
    dest = tmp_path / "c.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest, timeout=0.5)
    assert "interrupted after" in one_line(info) and "no data for 0.5 s" in str(info.value)
    assert Path(f"{dest}.part").read_bytes() == payload[:100]


def test_another_process_downloading_is_refused(server, tmp_path):
    dest = tmp_path / "c.tar.gz"
    with open(f"{dest}.part", "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running download holds it
        with pytest.raises(DownloadError) as info:
            fetch(server, dest)
    assert "being downloaded by another process" in one_line(info) and server.ranges == []


def test_disk_full_keeps_the_part_for_a_resume(server, tmp_path, payload):
    """``ulimit -f`` makes the write fail in the kernel (EFBIG), the path a full disk's ENOSPC takes."""
    dest = tmp_path / "c.tar.gz"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from anodev2_jax import download; "
        "download.download_file(sys.argv[1], sys.argv[2], md5=sys.argv[3], size=int(sys.argv[4]), progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    args = [server.url, str(dest), download.CIFAR10_MD5, str(len(payload))]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "DownloadError" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "File too large (EFBIG)" in last and "disk (or quota) is full" in last and "resumes from" in last
    kept = Path(f"{dest}.part").read_bytes()
    assert len(kept) == 20000 and payload.startswith(kept) and f"resumes from {len(kept):,} bytes" in last
    fetch(server, dest)  # space again: the rerun resumes
    assert dest.read_bytes() == payload and server.ranges == [None, f"bytes={len(kept)}-"]


def test_url_environment_variable(monkeypatch):
    monkeypatch.delenv(download.URL_ENV, raising=False)
    assert download.cifar10_url() == download.CIFAR10_URL
    monkeypatch.setenv(download.URL_ENV, "http://mirror.example/c.tar.gz")
    assert download.cifar10_url() == "http://mirror.example/c.tar.gz"
    monkeypatch.setenv("TFDS_DATA_DIR", "/data/tfds")
    assert download.cifar10_path(None) == Path("/data/tfds/downloads/cifar-10-python.tar.gz")
    assert download.cifar10_path("~/x") == Path(os.path.expanduser("~/x")) / "downloads" / "cifar-10-python.tar.gz"


# ----------------------------------------------------------------------------- dataset="cifar10"


def _assert_fake(ds, batches):
    np.testing.assert_array_equal(ds.x_train, np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    np.testing.assert_array_equal(ds.y_train, np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)]))
    np.testing.assert_array_equal(ds.x_test, batches["test_batch"][0])


def test_cifar10_without_tensorflow_downloads_and_loads(server, tmp_path, monkeypatch, batches, payload):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(D, "tensorflow_installed", lambda: False)

    def no_tfds_download(self, *args, **kwargs):
        raise AssertionError("tfds must not prepare cifar10 without TensorFlow")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_tfds_download)
    ds = D.load_dataset("cifar10", str(tmp_path), num_train=7)
    assert (tmp_path / "downloads" / "cifar-10-python.tar.gz").read_bytes() == payload
    assert ds.x_train.shape == (7, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    full = D.load_dataset("cifar10", str(tmp_path))  # the second time: the file that is there
    _assert_fake(full, batches)
    assert server.ranges == [None]


def test_cifar10_without_tfds_at_all(server, tmp_path, monkeypatch, batches):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # data_dir None: tfds' default folder
    _assert_fake(D.load_dataset("cifar10"), batches)
    assert (tmp_path / "tfds" / "downloads" / "cifar-10-python.tar.gz").is_file()


def test_cifar10_offline_is_one_line_naming_the_offline_options(server, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "tensorflow_installed", lambda: False)
    monkeypatch.setattr(download, "CIFAR10_URL", f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as info:
        D.load_dataset("cifar10", str(tmp_path))
    msg = one_line(info)
    for words in ("CIFAR-10 is missing", "refused the connection", f"to {tmp_path}/downloads/cifar-10-python.tar.gz",
                  "--config.dataset=digits", "--config.dataset=cifar10_local --config.data_dir=DIR",
                  "--config.dataset=synthetic", download.CIFAR10_MD5):  # fmt: skip
        assert words in msg, (words, msg)

