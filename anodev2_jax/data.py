"""CIFAR-10 data: whole splits on the host, augmentation and normalization on the device.

Host side, :func:`load_dataset` returns a :class:`Dataset` of numpy arrays (uint8 NHWC images,
int32 labels) from one of four sources, and :func:`epoch_batches` / :func:`eval_batches`
yield index batches that the training loop gathers with ``x[idx], y[idx]`` (on the host, or
on the devices with :func:`gather_rows` when the splits are resident there). Device side,
:func:`augment`, :func:`normalize`, :func:`preprocess_train` and :func:`preprocess_eval` are
pure, jittable functions meant to run inside the jitted train / eval step.

Sources (``DATASETS``):

* ``"cifar10"``: CIFAR-10 from the first of these that works, in this order:

  1. tensorflow-datasets' prepared copy. Measured with tfds 4.9.10 and no TensorFlow: tfds
     imports, and a dataset prepared in a random-access format (``array_record``) reads
     through ``builder.as_data_source`` (records decoded by PIL or OpenCV; the tests run this
     path under ``tfds.testing.mock_data``) without TensorFlow.
  2. ``<root>/downloads/cifar-10-python.tar.gz`` (``root``: ``data_dir``, else
     ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``; :func:`anodev2_jax.download.cifar10_path`),
     read with the numpy reader of ``cifar10_local``.
  3. With TensorFlow installed: tfds prepares it (download + conversion; TFRecord, tfds'
     default format, read with ``as_dataset(batch_size=-1)``). *Preparing* needs
     TensorFlow (the generator reads with ``tf.io.gfile``) and ``importlib_resources``.
  4. Otherwise (no TensorFlow, or no tfds at all): the official tarball is downloaded into
     the place of step 2 (:mod:`anodev2_jax.download`: md5-verified, atomic, resumable, a
     progress bar on a terminal) and read as in step 2. Without a network this fails at once
     with one line naming the offline options (tfds' own download would retry for ~3.5
     minutes and then fail in the conversion).
* ``"digits"``: scikit-learn's 1,797 real handwritten digits (8x8, 0..16, shipped inside
  scikit-learn: no download), upscaled to 32x32x3 by :func:`upscale_digits` and split by
  :func:`digits_arrays` (1,437 training / 360 test images, stratified, fixed). Needs the
  ``digits`` extra (scikit-learn); ``data_dir`` is ignored.
* ``"cifar10_local"``: ``data_dir`` holds the standard ``cifar-10-batches-py`` folder (or is
  that folder), or is / contains ``cifar-10-python.tar.gz``, whose members are read straight
  from the archive. Numpy only.
* ``"npz"``: ``data_dir`` is the path of an ``.npz`` with ``x_train, y_train, x_test, y_test``.
* ``"synthetic"``: generated, learnable CIFAR-shaped data for smoke runs and tests.

Decisions (where the contract is silent):

* Images stay uint8 until they are on the device: four times less host memory and
  host-to-device traffic than float32; :func:`normalize` converts inside the step.
* Zero padding for the random crop is applied to the raw pixels, before normalization (as
  torchvision's ``RandomCrop(32, padding=4)`` followed by ``Normalize``): the border is black.
* The CIFAR batch files are pickles; they are read with an unpickler that only admits the
  few numpy globals such files contain, so a doctored file cannot run code.
* Labels of shape ``(N, 1)`` (as ``keras.datasets.cifar10`` returns them) are flattened;
  ``num_train`` / ``num_test`` larger than a split take the whole split (slice semantics).
* Every validation error is raised before any training, as one line naming the file or
  field, the bad value and the fix.
* Augmentation (``config.augment``, :data:`AUGMENTATIONS`): ``"crop_flip"`` (CIFAR's
  standard, the default), ``"crop"`` (no flip: a mirrored digit is another digit, or none)
  or ``"none"``. ``"crop"`` draws the same crops from a key as ``"crop_flip"``.
* All images are normalized with the CIFAR-10 channel statistics (:func:`normalize`), the
  digits too: a fixed affine map of the pixels, which the models' first BatchNorm absorbs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Integer, Key, Shaped

from anodev2_jax import download

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "AUGMENTATIONS",
    "NUM_CLASSES",
    "DIGITS_SPLIT_SEED",
    "DataError",
    "Dataset",
    "load_dataset",
    "upscale_digits",
    "digits_arrays",
    "normalize",
    "augment",
    "preprocess_train",
    "preprocess_eval",
    "gather_rows",
    "epoch_batches",
    "eval_batches",
    "eval_index_array",
    "tensorflow_installed",
]

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)
DATASETS = ("cifar10", "cifar10_local", "npz", "synthetic", "digits")
AUGMENTATIONS = ("crop_flip", "crop", "none")  # config.augment: see augment / preprocess_train
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
DIGITS_SPLIT_SEED = 0  # random_state of the digits' stratified 80 / 20 split (benchmarks/digits.py's too)

_FOLDER = "cifar-10-batches-py"
_TARBALL = download.CIFAR10_TARBALL
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_TARBALL_URL = download.CIFAR10_URL
_OFFLINE = (
    "--config.dataset=digits (real handwritten digits shipped with scikit-learn; configs/digits.py), "
    f"--config.dataset=cifar10_local --config.data_dir=DIR (a folder holding {_TARBALL} or {_FOLDER}), "
    "--config.dataset=npz or --config.dataset=synthetic"
)
_TFDS_FIX = f'install the data extra (pip install -e ".[data]"), or use {_OFFLINE}'
_DIGITS_FIX = 'install the digits extra: pip install -e ".[digits]" (or pip install scikit-learn)'


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the cause and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever went in


class Dataset(NamedTuple):
    """Whole CIFAR-style splits on the host.

    Attributes:
      x_train: uint8 ``(N, 32, 32, 3)`` NHWC images.
      y_train: int32 ``(N,)`` labels in ``[0, num_classes)``.
      x_test: uint8 ``(M, 32, 32, 3)``.
      y_test: int32 ``(M,)``.
      num_classes: 10.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _brief(err: BaseException) -> str:
    """``Type: first line of the message``, short enough for a one-line error."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------- validation


def _check_split(x, y, where_x: str, where_y: str) -> tuple[np.ndarray, np.ndarray]:
    """Validates one split and returns ``(uint8 (N, 32, 32, 3), int32 (N,))``."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        hint = ""
        if x.ndim == 4 and x.shape[1:] == (3, 32, 32):
            hint = "; it looks NCHW: convert with x.transpose(0, 2, 3, 1)"
        elif x.ndim == 2 and x.shape[1] == 3072:
            hint = "; rows of CIFAR's CHW layout convert with x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)"
        raise DataError(f"{where_x} has shape {x.shape}, expected (N, 32, 32, 3) NHWC images{hint}")
    if x.dtype != np.uint8:
        raise DataError(
            f"{where_x} has dtype {x.dtype}, expected uint8 pixels 0..255; convert with "
            "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1] "
            "or x.astype(np.uint8) for values 0..255"
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{where_y} has shape {y.shape}, expected (N,) class indices (not one-hot); "
            "use y.argmax(-1) for one-hot labels"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where_y} has dtype {y.dtype}, expected integer class indices; convert with y.astype(np.int32)"
        )
    if len(x) != len(y):
        raise DataError(f"{where_x} has {len(x)} images but {where_y} has {len(y)} labels; they must be equal")
    if len(x) == 0:
        raise DataError(f"{where_x} is empty (0 images); the split needs at least one example")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= NUM_CLASSES:
        bad = int(y[(y < 0) | (y >= NUM_CLASSES)][0])
        raise DataError(
            f"{where_y} has a label {bad} (range [{lo}, {hi}]) outside [0, {NUM_CLASSES}); "
            f"CIFAR-10 labels are class indices 0..{NUM_CLASSES - 1}: remap them"
        )
    return x, y.astype(np.int32)


def _check_count(field: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise DataError(f"{field}={value!r} is invalid; use a positive integer or None (whole split)")


# ------------------------------------------------------------------------------ sources


def tensorflow_installed() -> bool:
    """Whether TensorFlow could be imported (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def _quiet_tfds():
    """Hides tfds' absl warnings (``Variant folder ... has no dataset_info.json``) below ERROR.

    tfds logs them while it looks for a prepared copy that is not there, which is a normal
    case here (another source follows); any failure reaches the user as one DataError line.
    """

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _load_cifar10(data_dir: Optional[str], num_train, num_test):
    """``cifar10``: tfds' prepared copy, the downloaded tarball, tfds' preparation, or a download (module docstring)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        tfds = None  # not installed (it is in the data extra only): the tarball
    builder = None
    if tfds is not None:
        with _quiet_tfds():
            builder = tfds.builder("cifar10", data_dir=data_dir)
            prepared = builder.is_prepared()
        if prepared:
            return _load_tfds(tfds, builder, num_train, num_test)
    tarball = download.cifar10_path(data_dir)
    if not tarball.is_file() and builder is not None and tensorflow_installed():
        return _load_tfds(tfds, builder, num_train, num_test)
    try:
        tarball = download.cifar10_tarball(data_dir)
    except download.DownloadError as e:
        where = f"tfds has no prepared copy under {builder.data_dir} and " if builder is not None else ""
        raise DataError(
            f"CIFAR-10 is missing: {where}{e}; offline, copy {_TARBALL} (md5 {download.CIFAR10_MD5}) to {tarball} "
            f"and rerun, or use {_OFFLINE}"
        ) from e
    return _load_local(str(tarball))


def _load_tfds(tfds, builder, num_train, num_test):
    """``cifar10`` from tensorflow-datasets; returns ``{"train": (x, y), "test": (x, y)}``, origin."""
    if not builder.is_prepared():
        try:
            with _quiet_tfds():
                builder.download_and_prepare()
        except ModuleNotFoundError as e:
            raise DataError(
                f"preparing tfds cifar10 needs the missing module {e.name!r} ({_brief(e)}); {_TFDS_FIX}"
            ) from e
        except OSError as e:  # requests.ConnectionError and friends are OSErrors
            raise DataError(f"downloading tfds cifar10 failed ({_brief(e)}); check the network, or {_TFDS_FIX}") from e

    out = {}
    for split, limit in (("train", num_train), ("test", num_test)):
        try:
            source = builder.as_data_source(split=split)
        except NotImplementedError:
            # Prepared in a sequential format (TFRecord, tfds' default): only tf.data reads it.
            if not tensorflow_installed():
                raise DataError(
                    f"tfds cifar10 under {builder.data_dir} is stored as {builder.info.file_format}, "
                    f"which only TensorFlow can read; {_TFDS_FIX}"
                ) from None
            total = builder.info.splits[split].num_examples
            spec = split if limit is None else f"{split}[:{min(limit, total)}]"
            out[split] = tfds.as_numpy(builder.as_dataset(split=spec, batch_size=-1, as_supervised=True))
            continue
        n = len(source) if limit is None else min(limit, len(source))
        x, y = np.empty((n, *IMAGE_SHAPE), np.uint8), np.empty((n,), np.int64)
        for i in range(n):  # one record at a time: what every data source (and tfds' mock) supports
            ex = source[i]
            x[i], y[i] = ex["image"], ex["label"]
        out[split] = (x, y)
    return out, f"tfds cifar10 ({builder.data_dir})"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 python batches: only the globals an ndarray pickle needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # the real (Python 2) files
        ("numpy._core.multiarray", "_reconstruct"),  # pickled by numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch (``b'data'`` (n, 3072) uint8 rows in CHW order, ``b'labels'``) -> NHWC."""
    fix = f"re-download {_TARBALL} from {_TARBALL_URL}"
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # corrupt bytes can raise almost anything while unpickling
        raise DataError(f"{where} is not a readable CIFAR-10 python batch ({_brief(e)}); {fix}") from e
    if not isinstance(batch, dict):
        raise DataError(f"{where} holds a {type(batch).__name__}, expected a dict with b'data' and b'labels'; {fix}")
    for key in (b"data", b"labels"):
        if key not in batch:
            keys = sorted(batch, key=repr)
            raise DataError(f"{where} has no key {key!r} (keys: {keys}); expected a CIFAR-10 python batch; {fix}")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 32 * 32 * 3 or data.dtype != np.uint8:
        raise DataError(
            f"{where} b'data' has shape {data.shape} dtype {data.dtype}, expected (N, 3072) uint8; {fix}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    return _check_split(np.ascontiguousarray(images), batch[b"labels"], f"{where} b'data'", f"{where} b'labels'")


def _read_members(path: Path, names) -> dict[str, bytes]:
    """Reads the named batch files straight out of the tarball (matched by base name)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if not missing:
                return {n: tar.extractfile(members[n]).read() for n in names}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{path} is not a readable tar.gz archive ({_brief(e)}); re-download it from {_TARBALL_URL}"
        ) from e
    raise DataError(
        f"{path} has no member {missing[0]!r}; a complete {_TARBALL} holds {_FOLDER}/data_batch_1..5 and test_batch"
    )


def _load_local(data_dir: Optional[str]):
    """``cifar10_local``: the ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz``."""
    expected = f"a folder holding {_FOLDER}/ or {_TARBALL} (from {_TARBALL_URL})"
    if data_dir is None:
        raise DataError(f"dataset 'cifar10_local' needs --config.data_dir=DIR: {expected}")
    path = Path(data_dir).expanduser()
    names = (*_TRAIN_BATCHES, _TEST_BATCH)
    if not path.exists():
        raise DataError(f"data_dir {path} does not exist; point --config.data_dir at {expected}")
    if path.is_file():
        raw = _read_members(path, names)
    elif (path / _FOLDER).is_dir() or (path / "data_batch_1").is_file():
        folder = path / _FOLDER if (path / _FOLDER).is_dir() else path
        raw = {}
        for name in names:
            if not (folder / name).is_file():
                raise DataError(
                    f"{folder / name} is missing; a complete {_FOLDER} folder has data_batch_1..5 and "
                    f"test_batch: re-extract {_TARBALL}"
                )
            raw[name] = (folder / name).read_bytes()
        path = folder
    elif (path / _TARBALL).is_file():
        path = path / _TARBALL
        raw = _read_members(path, names)
    else:
        raise DataError(
            f"data_dir {path} has neither {_FOLDER}/ nor {_TARBALL}; point --config.data_dir at {expected}"
        )

    train = [_parse_batch(raw[n], f"{path}:{n}") for n in _TRAIN_BATCHES]
    splits = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": _parse_batch(raw[_TEST_BATCH], f"{path}:{_TEST_BATCH}"),
    }
    return splits, str(path)


def _looks_like(head: bytes) -> str:
    """What a file that is not an .npz seems to be, from its first bytes (for error messages)."""
    if not head:
        return "an empty file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file (an .npz is a zip archive: np.savez writes one)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut by the 64-byte read still counts as text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text is not None and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        first = " ".join(text.split())[:40]
        return f"a text file (it begins {first!r})"
    return f"binary data (first bytes {head[:8].hex(' ')})"


def _load_npz(data_dir: Optional[str]):
    """``npz``: ``data_dir`` is an ``.npz`` holding ``x_train, y_train, x_test, y_test``."""
    how = "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) with uint8 NHWC images"
    if data_dir is None:
        raise DataError(f"dataset 'npz' needs --config.data_dir=FILE.npz, written with {how}")
    path = Path(data_dir).expanduser()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"data_dir {path} {state}; dataset 'npz' needs the path of an .npz written with {how}")
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({_brief(e)}); fix its permissions") from e
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        # np.load would try it as a pickle and say it "contains pickled (object) data"
        raise DataError(f"{path} is not an .npz archive: it looks like {_looks_like(head)}; write it with {how}")
    arrays, error = {}, None
    try:  # collect first, raise after: DataError is itself a ValueError
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                found = list(loaded.files)
                arrays = {k: loaded[k] for k in keys if k in found}
        else:
            error = f"{path} holds a single .npy array, not an .npz archive; write it with {how}"
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        error = f"{path} is not a readable .npz archive ({_brief(e)}); write it with {how}"
    if error:
        raise DataError(error)
    missing = [k for k in keys if k not in arrays]
    if missing:
        found_text = ", ".join(found) or "none"
        raise DataError(f"{path} has no array {missing[0]!r} (found: {found_text}); write it with {how}")
    return {s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test")}, str(path)


def upscale_digits(images: np.ndarray) -> np.ndarray:
    """scikit-learn's 8x8 digits (values 0..16) -> uint8 ``(N, 32, 32, 3)`` images the models take.

    Each pixel becomes a 4x4 block (nearest neighbour: no invented detail), the value is
    scaled to 0..255 (``rint(v * 255 / 16)``) and repeated on 3 channels.

    Args:
      images: ``(N, 8, 8)`` (or ``(N, 64)``) numbers in [0, 16].

    Returns:
      uint8 ``(N, 32, 32, 3)``.

    Example: ``upscale_digits(sklearn.datasets.load_digits().images)``.
    """
    images = np.asarray(images, np.float64).reshape(-1, 8, 8)
    images = np.rint(images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8) in 0..255
    images = np.kron(images, np.ones((1, 4, 4), np.uint8))  # nearest-neighbour 8x8 -> 32x32
    return np.repeat(images[..., None], 3, axis=-1)


def digits_arrays() -> dict[str, np.ndarray]:
    """``dataset="digits"``: ``x_train, y_train, x_test, y_test`` of scikit-learn's handwritten digits.

    The 1,797 digits (:func:`upscale_digits`) split 80 / 20, stratified by class, with
    ``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels,
    random_state=DIGITS_SPLIT_SEED)``: 1,437 training and 360 test images, the same split
    for every run and for ``benchmarks/digits.py``'s ``.npz``.

    Raises:
      DataError: scikit-learn is not installed (one line naming the ``digits`` extra).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(f"dataset 'digits' needs scikit-learn, which is not importable ({_brief(e)}); {_DIGITS_FIX}") from e
    digits = load_digits()
    images, labels = upscale_digits(digits.images), digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _synthetic_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images whose class shows as a colour tint and as a stripe pattern, plus noise.

    Class ``c`` has hue ``c / 10`` of a colour wheel and stripes that are horizontal (even
    ``c``) or vertical (odd ``c``) with period ``4 + 2 * (c // 2)`` pixels at a random phase.
    A per-image colour jitter blurs neighbouring hues (the mean colour alone classifies ~80%
    of the test split, the stripe spectrum alone ~90%), so both cues matter. Both survive
    random crops and horizontal flips: a 2-conv CNN with augmentation reaches ~97% test
    accuracy in 300 Adam steps of batch 64.
    """
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
    hue = 2 * np.pi * labels.astype(np.float32) / NUM_CLASSES
    tint = np.cos(hue[:, None] - np.float32(2 * np.pi / 3) * np.arange(3, dtype=np.float32))  # (n, 3)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    coord = np.where((labels % 2 == 1)[:, None, None], xx, yy)  # (n, 32, 32)
    period = (4 + 2 * (labels // 2)).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    stripes = np.sin(np.float32(2 * np.pi) * coord / period + phase)
    jitter = rng.normal(0, 16, (n, 1, 1, 3)).astype(np.float32)  # colour alone is not enough
    noise = rng.normal(0, 24, (n, 32, 32, 3)).astype(np.float32)
    images = 128 + 48 * tint[:, None, None, :] + jitter + 40 * stripes[..., None] + noise
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def load_dataset(
    name: str,
    data_dir: Optional[str] = None,
    *,
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    seed: int = 0,
) -> Dataset:
    """Loads and validates a CIFAR-10-shaped dataset into host memory.

    Args:
      name: one of ``DATASETS`` (see the module docstring for each source).
      data_dir: ``cifar10``: the tfds data_dir, whose ``downloads/`` folder also holds the
        tarball when tfds cannot prepare it (``None``: ``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets``); ``cifar10_local``: folder with ``cifar-10-batches-py``
        or the tarball (or the tarball itself); ``npz``: path of the ``.npz``;
        ``synthetic``, ``digits``: ignored.
      num_train, num_test: keep only the first N examples of a split (``None``: all). For
        ``synthetic`` the number generated (defaults 2048 / 512).
      seed: seed of the ``synthetic`` generator (train and test use independent streams).

    Returns:
      A :class:`Dataset`: uint8 ``(N, 32, 32, 3)`` images, int32 ``(N,)`` labels.

    Raises:
      DataError: unknown name, missing or unreadable file, missing keys, wrong shapes or
        dtypes, labels out of range, mismatched or empty splits, CIFAR-10 neither prepared
        nor downloadable (the line names the offline options), scikit-learn missing for
        ``digits``: one line naming the fix.

    Example: ``load_dataset("digits").x_train.shape == (1437, 32, 32, 3)``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (--config.dataset=...)")
    _check_count("num_train", num_train)
    _check_count("num_test", num_test)
    if name == "synthetic":
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed={seed!r} is invalid for the synthetic dataset; use a non-negative integer")
        splits = {
            "train": _synthetic_split(np.random.default_rng([seed, 0]), num_train or 2048),
            "test": _synthetic_split(np.random.default_rng([seed, 1]), num_test or 512),
        }
        origin = "synthetic"
    elif name == "cifar10":
        splits, origin = _load_cifar10(data_dir, num_train, num_test)
    elif name == "digits":
        arrays = digits_arrays()
        splits = {s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test")}
        origin = "scikit-learn digits"
    elif name == "cifar10_local":
        splits, origin = _load_local(data_dir)
    else:
        splits, origin = _load_npz(data_dir)

    out = []
    for split, limit in (("train", num_train), ("test", num_test)):
        x, y = splits[split]
        x, y = _check_split(x, y, f"{origin} x_{split}", f"{origin} y_{split}")
        out += [x[:limit], y[:limit]]
    return Dataset(*out, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------- device transforms


def normalize(images: Shaped[ArrayLike, "*batch h w 3"]) -> Float[Array, "*batch h w 3"]:
    """Pixels 0..255 -> float32 ``(x / 255 - mean) / std`` per channel (CIFAR-10 statistics).

    Args:
      images: ``(..., H, W, 3)`` uint8 (or any real dtype holding 0..255 values), numpy or jax.

    Returns:
      float32 array of the same shape. Jittable.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    shape = (1,) * (x.ndim - 1) + (3,)  # explicit rank: the suite forbids rank promotion
    mean = jnp.asarray(CIFAR10_MEAN).reshape(shape)
    std = jnp.asarray(CIFAR10_STD).reshape(shape)
    return (x / jnp.float32(255) - mean) / std


def augment(
    key: Key[Array, ""] | Integer[Array, "2"],
    images: Shaped[ArrayLike, "n h w c"],
    *,
    padding: int = 4,
    flip: bool = True,
) -> Shaped[Array, "n h w c"]:
    """Standard CIFAR augmentation: zero-pad, random crop back to size, random horizontal flip.

    Every image gets its own crop offset (uniform over the ``(2 * padding + 1) ** 2`` windows
    of the zero-padded image) and its own flip (probability 0.5), all drawn from ``key``. The
    crops are one gather (``dynamic_slice`` under ``vmap``); no Python loop over images.

    Args:
      key: PRNG key (typed or raw uint32); same key, same output.
      images: ``(N, H, W, C)`` batch, uint8 or float.
      padding: zero pixels added on each side before cropping (4 for CIFAR).
      flip: False leaves out the flip (a static choice, made at trace time); the crops are
        the same as with the flip for the same key.

    Returns:
      Array of the same shape and dtype as ``images``. Jittable.

    Example: ``augment(jax.random.key(0), x_uint8, flip=False)``.
    """
    images = jnp.asarray(images)
    n, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * padding + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    zero = jnp.zeros((), jnp.int32)

    def crop_and_flip(img, offset, flipped):
        crop = lax.dynamic_slice(img, (offset[0], offset[1], zero), (h, w, c))
        return jnp.where(flipped, crop[:, ::-1], crop) if flip else crop

    return jax.vmap(crop_and_flip)(padded, offsets, flips)


def preprocess_train(
    key, images_uint8: Shaped[ArrayLike, "n h w 3"], augmentation: str = "crop_flip"
) -> Float[Array, "n h w 3"]:
    """Training input: :func:`augment` with ``key`` as ``augmentation`` says, then :func:`normalize`; float32.

    Args:
      key: PRNG key of the step.
      images_uint8: ``(N, H, W, 3)`` raw pixels.
      augmentation: one of :data:`AUGMENTATIONS` (``config.augment``): ``"crop_flip"``
        (random crop with 4 pixels of zero padding and horizontal flip), ``"crop"`` (the
        crop only) or ``"none"``. A static choice: each compiles its own program, with no
        branch per step.

    Returns:
      float32 ``(N, H, W, 3)``. Jittable.

    Raises:
      ValueError: an unknown ``augmentation`` (at trace time).
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} is not one of {', '.join(AUGMENTATIONS)}")
    if augmentation == "none":
        return normalize(images_uint8)
    return normalize(augment(key, images_uint8, flip=augmentation == "crop_flip"))


def preprocess_eval(images_uint8: Shaped[ArrayLike, "n h w 3"]) -> Float[Array, "n h w 3"]:
    """Evaluation input: :func:`normalize` only; float32. Jittable."""
    return normalize(images_uint8)


def gather_rows(x: Shaped[Array, "n *rest"], idx: Integer[Array, "*batch"]) -> Shaped[Array, "*batch *rest"]:
    """``x[idx]``: the rows of a device-resident split picked by an index array (jittable).

    Inside a jitted step, with ``x`` replicated and ``idx`` sharded along its batch axis,
    every device gathers only its own rows. The indices are in range by construction
    (:func:`epoch_batches`, :func:`eval_batches`), so the gather is told so: no clamping.
    """
    return jnp.asarray(x).at[idx].get(mode="promise_in_bounds")


# ------------------------------------------------------------------------ host batching


def _check_batch_args(num_examples: int, batch_size: int) -> None:
    if num_examples < 1 or batch_size < 1:
        raise DataError(f"num_examples={num_examples} and batch_size={batch_size} must both be positive")


def epoch_batches(
    num_examples: int, batch_size: int, rng: np.random.Generator | int, *, drop_remainder: bool = True
) -> Iterator[np.ndarray]:
    """Shuffled index batches for one epoch (host side).

    Args:
      num_examples: size of the split.
      batch_size: indices per batch.
      rng: a ``np.random.Generator`` (advanced in place, so successive epochs differ) or an
        int seed.
      drop_remainder: drop the last partial batch (keeps one compiled shape); otherwise it
        is yielded shorter.

    Yields:
      int64 ``(batch_size,)`` arrays of distinct indices; together a permutation of
      ``range(num_examples)`` (less the dropped remainder).

    Raises:
      DataError: non-positive sizes, or ``drop_remainder`` with fewer examples than one
        batch (the epoch would silently be empty).
    """
    _check_batch_args(num_examples, batch_size)
    if drop_remainder and num_examples < batch_size:
        raise DataError(
            f"batch_size={batch_size} exceeds the {num_examples} training examples, so every batch "
            "would be dropped; lower --config.batch_size or use more data"
        )
    perm = np.random.default_rng(rng).permutation(num_examples).astype(np.int64)
    stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Sequential index batches covering every example once, all of one shape.

    The last batch is padded with index 0 up to ``batch_size``, so an eval step compiles
    once; weight its per-example results with ``arange(batch_size) < num_valid``.

    Yields:
      ``(indices, num_valid)``: int64 ``(batch_size,)`` indices, of which the first
      ``num_valid`` are real.
    """
    _check_batch_args(num_examples, batch_size)
    for start in range(0, num_examples, batch_size):
        idx = np.zeros((batch_size,), np.int64)
        valid = min(batch_size, num_examples - start)
        idx[:valid] = np.arange(start, start + valid, dtype=np.int64)
        yield idx, valid


def eval_index_array(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All of :func:`eval_batches` as two arrays: int32 indices and bool masks, ``(num_batches, batch_size)``.

    Row ``b`` is batch ``b`` (padded with index 0); ``mask[b, j]`` says whether slot ``j``
    is a real example. Placed on the devices once per run for on-device evaluation.
    """
    batches = list(eval_batches(num_examples, batch_size))
    idx = np.stack([i for i, _ in batches]).astype(np.int32)
    mask = np.stack([np.arange(batch_size) < valid for _, valid in batches])
    return idx, mask
