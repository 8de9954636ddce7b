"""Downloads one file over HTTP(S) with the standard library: resumable, checksum-verified, written atomically.

:func:`download_file` is what ``dataset="cifar10"`` uses when tensorflow-datasets cannot
prepare CIFAR-10 (no TensorFlow, or no tfds at all): it fetches the official
``cifar-10-python.tar.gz`` (:data:`CIFAR10_URL`, 170,498,071 bytes, md5
:data:`CIFAR10_MD5` as published on the CIFAR page and used by tfds and torchvision), which
:mod:`anodev2_jax.data` then reads with its numpy reader. :func:`cifar10_tarball` says where
that file lives and downloads it when it is not there yet.

Decisions (where the issue is silent):

* **Where.** ``<root>/downloads/cifar-10-python.tar.gz`` with ``root`` the config's
  ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``: tfds' own data and
  download folder, so one folder holds CIFAR-10 however it came (tfds names its own
  downloads differently, so nothing collides). A file there is used as it is: only a
  verified download is ever moved there, and a file copied there by hand is checked by the
  reader, whose errors name the file.
* **Mirror / tests.** ``$ANODEV2_CIFAR10_URL`` replaces :data:`CIFAR10_URL` (a mirror of
  the same file: the checksum is still checked); the tests point it, or the module
  constants, at a local server.
* **Atomic and resumable.** Bytes go to ``<file>.part`` (held under an exclusive ``flock``,
  so two processes never write one file); a rerun continues it with an HTTP ``Range``
  request. A server that answers ``Range`` with the whole file (status 200) restarts the
  part from zero. Only when the size and md5 match is the part ``fsync``-ed and moved to its
  name (``os.replace``); a part that fails the checksum is set aside as ``<file>.bad`` (the
  previous ``.bad`` is replaced) and the next run starts from zero.
* **Errors** are one line (:class:`DownloadError`) naming the cause and what the next run
  does: no network or DNS failure, refused connection, timeout (``timeout`` seconds without
  a byte, :data:`TIMEOUT_S` by default), HTTP errors, a transfer cut short (the part is kept:
  rerun to resume), a checksum or size mismatch, a full disk / quota (the part is kept).
* **Progress** is a tqdm bar on stderr when stderr is a terminal; otherwise one line when
  the transfer starts (nothing is printed before the server answers, so a failure is the
  only line).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Optional

from anodev2_jax.errors import os_error_text

try:  # POSIX: an exclusive lock on the part file
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = [
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_SIZE",
    "CIFAR10_TARBALL",
    "URL_ENV",
    "TIMEOUT_S",
    "DownloadError",
    "download_root",
    "cifar10_path",
    "cifar10_url",
    "cifar10_tarball",
    "download_file",
    "file_md5",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_SIZE = 170_498_071  # bytes
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
URL_ENV = "ANODEV2_CIFAR10_URL"
TIMEOUT_S = 30.0  # seconds without a byte (connect or read) before giving up
_CHUNK = 1 << 20
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DownloadError(RuntimeError):
    """A download failed; the message is one line naming the cause and what a rerun does."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def download_root(data_dir: Optional[str] = None) -> Path:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (``~`` expanded)."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(root).expanduser()


def cifar10_path(data_dir: Optional[str] = None) -> Path:
    """Where the downloaded tarball lives: ``download_root(data_dir) / "downloads" / "cifar-10-python.tar.gz"``."""
    return download_root(data_dir) / "downloads" / CIFAR10_TARBALL


def cifar10_url() -> str:
    """``$ANODEV2_CIFAR10_URL`` if set (a mirror, or a test server), else :data:`CIFAR10_URL`."""
    return os.environ.get(URL_ENV) or CIFAR10_URL


def cifar10_tarball(data_dir: Optional[str] = None, *, progress: Optional[bool] = None) -> Path:
    """The path of ``cifar-10-python.tar.gz`` under ``data_dir``'s downloads folder, downloaded first if absent.

    Args:
      data_dir: see :func:`download_root`.
      progress: show a progress bar (None: when stderr is a terminal).

    Returns:
      The tarball's path (verified when this call downloaded it).

    Raises:
      DownloadError: see :func:`download_file`.

    Example: ``tarfile.open(cifar10_tarball("~/data"))``.
    """
    dest = cifar10_path(data_dir)
    if dest.is_file():
        return dest
    return download_file(cifar10_url(), dest, md5=CIFAR10_MD5, size=CIFAR10_SIZE, progress=progress)


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _network_error(e: BaseException, url: str, timeout: float) -> str:
    """One clause for a failure to connect or to get an answer."""
    host = urllib.parse.urlsplit(url).netloc
    reason = getattr(e, "reason", e)  # URLError wraps the socket error
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve {host} ({reason.strerror or reason}): no network, or a DNS failure"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"{host} did not answer within {timeout:g} s (timeout): a slow or blocked network"
    if isinstance(reason, ConnectionRefusedError):
        return f"{host} refused the connection"
    if isinstance(reason, OSError):
        return f"cannot connect to {host} ({os_error_text(reason)})"
    return f"cannot connect to {host} ({type(reason).__name__}: {reason})"


def _open(url: str, offset: int, timeout: float):
    """The server's response for ``url`` from byte ``offset`` (a ``Range`` request when ``offset > 0``)."""
    headers = {"User-Agent": "anodev2-jax", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # Range Not Satisfiable: the part is as long as (or longer than) the file
            e.close()
            return None
        raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}; check the URL or try again later") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"downloading {url} failed: {_network_error(e, url, timeout)}") from None


def _start(url: str, part: BinaryIO, size: Optional[int], timeout: float):
    """Opens the transfer, resuming ``part`` where it can; returns ``(response or None, offset, total or None)``.

    ``None`` as the response: nothing is left to fetch (the part already holds ``size``
    bytes, or the server said the range is past the end).
    """
    offset = os.fstat(part.fileno()).st_size
    if size is not None and offset > size:  # longer than the file can be: not a prefix of it
        part.truncate(0)
        offset = 0
    if size is not None and offset == size:
        return None, offset, size
    response = _open(url, offset, timeout)
    if response is None:
        return None, offset, size
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if offset and response.status == 200:  # the server ignored Range: it sends the whole file
        part.truncate(0)
        offset = 0
    elif offset and response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        start = content_range.removeprefix("bytes ").split("-", 1)[0]
        if not start.isdigit() or int(start) != offset:
            response.close()
            part.truncate(0)
            return _start(url, part, size, timeout)  # an unexpected range: start over once, from zero
    total = offset + length if length is not None else size
    if size is not None and total != size:  # e.g. an error page served with status 200: fetch nothing
        response.close()
        raise DownloadError(
            f"{url} serves a file of {total} bytes, but the expected one has {size}; check the URL (nothing was "
            "downloaded)"
        )
    return response, offset, total


def _write_error(e: OSError, part: Path, kept: int) -> DownloadError:
    """The one line for a failed write; ``kept``: the bytes the part holds, where a rerun resumes."""
    if e.errno in _DISK_FULL:
        return DownloadError(
            f"writing {part} failed: {os_error_text(e)}: the disk (or quota) is full; free space there (or point "
            f"--config.data_dir elsewhere) and rerun: the download resumes from {_mib(kept)}"
        )
    return DownloadError(f"writing {part} failed: {os_error_text(e)}; fix the folder's permissions and rerun")


def _progress_bar(enabled: Optional[bool], total: Optional[int], offset: int, dest: Path, url: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        size = f" ({_mib(total)})" if total else ""
        start = f", resuming at {_mib(offset)}" if offset else ""
        print(f"downloading {url}{size} to {dest}{start}", file=sys.stderr, flush=True)
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {dest.name}",
        file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str,
    size: Optional[int] = None,
    timeout: float = TIMEOUT_S,
    progress: Optional[bool] = None,
) -> Path:
    """Downloads ``url`` to ``dest`` through ``dest.part``; ``dest`` appears only once its md5 matches.

    Args:
      url: http(s) URL of the file.
      dest: final path (its folder is created).
      md5: expected hex md5 of the whole file.
      size: expected size in bytes (None: unknown; then the server's ``Content-Length`` is
        the total). A part longer than ``size`` is discarded.
      timeout: seconds without a byte before the transfer counts as failed.
      progress: show a tqdm bar on stderr (None: when stderr is a terminal); without one a
        single line says that the transfer started.

    Returns:
      ``dest`` as a Path.

    Raises:
      DownloadError: one line: the network or DNS failed, the server refused, timed out or
        answered an HTTP error, the transfer ended short (``dest.part`` is kept: rerun to
        resume), the size or md5 does not match (the file is set aside as ``dest.bad``),
        the disk or quota is full (the part is kept), or another process is downloading the
        same file.

    Example: ``download_file(CIFAR10_URL, "/data/c.tar.gz", md5=CIFAR10_MD5, size=CIFAR10_SIZE)``.
    """
    dest = Path(dest)
    part, bad = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".bad")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        f = open(part, "ab", buffering=0)  # unbuffered: a failed write leaves nothing to flush at close
    except OSError as e:
        raise _write_error(e, part, 0) from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DownloadError(
                    f"{part} is being downloaded by another process; wait for it to finish, then rerun"
                ) from None
        try:
            response, offset, total = _start(url, f, size, timeout)
        except DownloadError:
            if os.fstat(f.fileno()).st_size == 0:  # nothing arrived: leave no empty part behind
                part.unlink(missing_ok=True)
            raise
        got = offset
        if response is not None:
            with response, _progress_bar(progress, total, offset, dest, url) as bar:
                while True:
                    try:
                        chunk = response.read1(_CHUNK)  # what has arrived: a stall loses nothing
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                        why = f"no data for {timeout:g} s" if isinstance(e, TimeoutError) else os_error_text(e)
                        raise DownloadError(
                            f"downloading {url} was interrupted after {_mib(got)} of {_mib(total or got)} ({why}); "
                            f"rerun to resume from {part}"
                        ) from None
                    if not chunk:
                        break
                    try:
                        view = memoryview(chunk)
                        while view:  # a raw write may be partial (the last bytes before a full disk)
                            view = view[f.write(view) :]
                    except OSError as e:
                        raise _write_error(e, part, os.fstat(f.fileno()).st_size) from None
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            if total is not None and got < total:
                raise DownloadError(
                    f"downloading {url} ended after {got:,} of {total:,} bytes (the transfer was cut short); rerun "
                    f"to resume from {part}"
                )
        try:
            os.fsync(f.fileno())
        except OSError as e:
            raise _write_error(e, part, got) from None
        got = os.fstat(f.fileno()).st_size
        digest = file_md5(part)
        if (size is not None and got != size) or digest != md5.lower():
            what = f"size {got} bytes, expected {size}" if size is not None and got != size else f"md5 {digest}, expected {md5}"
            os.replace(part, bad)
            raise DownloadError(
                f"{url} gave a different file ({what}); it was set aside as {bad} (delete it when done); rerun to "
                "download it again, or check the URL"
            )
        os.replace(part, dest)  # still under the lock: no other process writes the part meanwhile
    with contextlib.suppress(OSError):  # the rename survives a power loss once the folder is synced
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dest
