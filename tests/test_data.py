"""Tests of anodev2_jax.data: every source in its real file format, validation, augmentation.

The CIFAR files are generated at test time in the real formats (pickled batches with bytes
keys, the tarball layout, .npz); nothing is downloaded. tfds runs under
``tfds.testing.mock_data``, which works without TensorFlow for the data-source path.
"""

import functools
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cifar_batch_bytes, fake_cifar_batches, write_cifar_tarball

from anodev2_jax import data as D
from anodev2_jax.data import DataError

N_PER_BATCH = 20


# ------------------------------------------------------------------------------ fixtures


def _fake_cifar(seed: int = 0):
    return fake_cifar_batches(seed, N_PER_BATCH)


def _write_folder(root, batches, legacy=True, skip=()):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (x, y) in batches.items():
        if name not in skip:
            (folder / name).write_bytes(cifar_batch_bytes(x, y, f"{name} of 5".encode(), legacy))
    return folder


@pytest.fixture(scope="module")
def fake_cifar():
    return _fake_cifar()


@pytest.fixture(scope="module")
def cifar_dirs(tmp_path_factory, fake_cifar):
    """The same fake CIFAR-10 as a folder (legacy pickles) and as a tarball (numpy-2 pickles)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = _write_folder(root / "folder", fake_cifar)
    members = {n: cifar_batch_bytes(x, y, n.encode(), legacy=False) for n, (x, y) in fake_cifar.items()}
    tarball = write_cifar_tarball(root / "tar" / "cifar-10-python.tar.gz", members)
    return {"parent": folder.parent, "folder": folder, "tardir": tarball.parent, "tarball": tarball}


# ------------------------------------------------------------------------ cifar10_local


@pytest.mark.parametrize("where", ["parent", "folder", "tardir", "tarball"])
def test_local_reads_folder_and_tarball(cifar_dirs, fake_cifar, where):
    ds = D.load_dataset("cifar10_local", str(cifar_dirs[where]))
    assert ds.x_train.shape == (5 * N_PER_BATCH, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (N_PER_BATCH, 32, 32, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32 and ds.num_classes == 10
    want_x = np.concatenate([fake_cifar[f"data_batch_{i}"][0] for i in range(1, 6)])
    want_y = np.concatenate([fake_cifar[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(ds.x_train, want_x)
    np.testing.assert_array_equal(ds.y_train, want_y)
    np.testing.assert_array_equal(ds.x_test, fake_cifar["test_batch"][0])
    np.testing.assert_array_equal(ds.y_test, fake_cifar["test_batch"][1])


def test_local_pixel_layout_from_chw_rows(cifar_dirs):
    """Pixel (i, y, x, c) is byte ``c * 1024 + y * 32 + x`` of row i, as documented for CIFAR."""
    raw = pickle.loads((cifar_dirs["folder"] / "data_batch_2").read_bytes(), encoding="bytes")
    rows = raw[b"data"]
    ds = D.load_dataset("cifar10_local", str(cifar_dirs["folder"]))
    x2 = ds.x_train[N_PER_BATCH : 2 * N_PER_BATCH]
    for i, y, x, c in [(0, 0, 0, 0), (3, 5, 7, 1), (19, 31, 30, 2), (7, 12, 0, 2)]:
        assert x2[i, y, x, c] == rows[i, c * 1024 + y * 32 + x]
    assert list(ds.y_train[N_PER_BATCH : 2 * N_PER_BATCH]) == raw[b"labels"]


def test_truncation_keeps_first_examples(cifar_dirs, fake_cifar):
    ds = D.load_dataset("cifar10_local", str(cifar_dirs["tarball"]), num_train=7, num_test=1000)
    assert ds.x_train.shape == (7, 32, 32, 3) and len(ds.x_test) == N_PER_BATCH  # slice semantics
    np.testing.assert_array_equal(ds.x_train, fake_cifar["data_batch_1"][0][:7])


# ---------------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = dict(
        x_train=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, (12, 1)),  # keras' (N, 1) int64 labels are accepted
        x_test=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, (5,)).astype(np.uint8),
    )
    np.savez(tmp_path / "d.npz", **arrays)
    ds = D.load_dataset("npz", str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"][:, 0])
    np.testing.assert_array_equal(ds.x_test, arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32


# --------------------------------------------------------------------------------- tfds


def test_tfds_mock_without_tensorflow(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data mocks reading and makes download_and_prepare a no-op, but is_prepared() still
    # looks at the (mocked, empty) data_dir: stand in a prepared array_record dataset.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = D.load_dataset("cifar10", None, num_test=5)
        again = D.load_dataset("cifar10", None, num_test=5)
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (5, 32, 32, 3) and ds.y_test.shape == (5,)
    assert ds.y_train.dtype == np.int32 and ds.y_train.min() >= 0 and ds.y_train.max() < 10
    np.testing.assert_array_equal(ds.x_train, again.x_train)  # mock examples are deterministic


def _assert_tfds_fix(msg: str):
    assert "\n" not in msg
    fixes = ['pip install -e ".[data]"', "cifar-10-python.tar.gz", "--config.dataset=cifar10_local"]
    for word in fixes + ["--config.data_dir=DIR", "--config.dataset=npz", "--config.dataset=digits"]:
        assert word in msg, (word, msg)


@pytest.mark.parametrize(
    "error, words",
    [
        (ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow"), ["'tensorflow'"]),
        (
            ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources"),
            ["'importlib_resources'"],
        ),
        (ConnectionError("Max retries exceeded\nwith url: cifar-10-binary.tar.gz"), ["downloading", "network"]),
    ],
)
def test_tfds_preparation_failure(monkeypatch, tmp_path, error, words):
    """Observed without TensorFlow: ModuleNotFoundError; offline: requests.ConnectionError (an OSError)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(D, "tensorflow_installed", lambda: True)

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(DataError) as info:
        D.load_dataset("cifar10", str(tmp_path))
    _assert_tfds_fix(str(info.value))
    for word in words:
        assert word in str(info.value)


def test_tfds_tfrecord_without_tensorflow(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(D, "tensorflow_installed", lambda: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)

    def sequential_only(self, *args, **kwargs):
        raise NotImplementedError("Random access data source for file format FileFormat.TFRECORD is not supported.")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", sequential_only)
    with pytest.raises(DataError, match="only TensorFlow can read") as info:
        D.load_dataset("cifar10", str(tmp_path))
    _assert_tfds_fix(str(info.value))


# --------------------------------------------------------------------------- bad inputs


def _npz(**overrides):
    """A writer of a valid small .npz, with some arrays replaced (None drops the key)."""

    def write(tmp):
        arrays = dict(
            x_train=np.zeros((4, 32, 32, 3), np.uint8),
            y_train=np.arange(4, dtype=np.int64),
            x_test=np.zeros((2, 32, 32, 3), np.uint8),
            y_test=np.arange(2, dtype=np.int64),
        )
        arrays.update(overrides)
        np.savez(tmp / "d.npz", **{k: v for k, v in arrays.items() if v is not None})
        return "npz", tmp / "d.npz"

    return write


def _file(name, content: bytes, kind="npz"):
    def write(tmp):
        (tmp / name).write_bytes(content)
        return kind, tmp / name

    return write


def _local(skip=(), replace=None):
    """A cifar-10-batches-py folder without the batches ``skip``, some replaced by raw bytes."""

    def write(tmp):
        folder = _write_folder(tmp, _fake_cifar(), skip=skip)
        for name, raw in (replace or {}).items():
            (folder / name).write_bytes(raw)
        return "cifar10_local", tmp

    return write


def _tar(raw=None, drop=()):
    """A cifar-10-python.tar.gz without the members ``drop``, its bytes passed through ``raw``."""

    def write(tmp):
        members = {n: cifar_batch_bytes(x, y, b"b", False) for n, (x, y) in _fake_cifar().items() if n not in drop}
        path = write_cifar_tarball(tmp / "cifar-10-python.tar.gz", members)
        if raw is not None:
            path.write_bytes(raw(path.read_bytes()))
        return "cifar10_local", path

    return write


class _Exploit:
    """A pickle that would run os.mkdir on load if the unpickler were not restricted."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _batch_with(name: str, rows: tuple[int, int], labels=None):
    """A folder whose batch ``name`` holds zero data of shape ``rows`` and ``labels`` (None: no key)."""
    batch = {b"data": np.zeros(rows, np.uint8)}
    if labels is not None:
        batch[b"labels"] = labels
    return _local(replace={name: _pickle_bytes(batch)})


BAD_INPUTS = [
    # (id, writer(tmp) -> (name, data_dir), kwargs, words the message must contain)
    ("unknown_name", lambda t: ("cifar100", None), {}, ["'cifar100'", "cifar10_local", "npz", "synthetic", "digits"]),
    ("npz_no_dir", lambda t: ("npz", None), {}, ["data_dir", "np.savez"]),
    ("npz_missing_path", lambda t: ("npz", t / "nope.npz"), {}, ["nope.npz", "does not exist"]),
    ("npz_is_directory", lambda t: ("npz", t), {}, ["is a directory", ".npz"]),
    ("npz_is_text", _file("d.npz", b"hello, not an archive\n"), {},
     ["d.npz is not an .npz archive", "a text file (it begins 'hello, not an archive')", "np.savez"]),
    ("npz_is_csv_utf8", _file("d.npz", "x,y\n1,é\n".encode() * 20), {}, ["not an .npz archive", "a text file"]),
    ("npz_is_gzip", _file("d.npz", b"\x1f\x8b\x08\x00rest"), {}, ["not an .npz archive", "a gzip file"]),
    ("npz_is_pickle", _file("d.npz", pickle.dumps({"x_train": 1})), {}, ["not an .npz archive", "a Python pickle"]),
    ("npz_is_empty", _file("d.npz", b""), {}, ["not an .npz archive", "an empty file"]),
    ("npz_is_binary", _file("d.npz", bytes(range(200, 256))), {}, ["not an .npz archive", "binary data (first bytes c8 c9"]),
    ("npz_corrupt_zip", _file("d.npz", b"PK\x03\x04" + b"\x00" * 40), {}, ["not a readable .npz"]),
    ("npz_is_npy", lambda t: (np.save(t / "d.npy", np.zeros(3)), ("npz", t / "d.npy"))[1], {}, [".npy", "np.savez"]),
    ("npz_missing_key", _npz(y_test=None), {}, ["'y_test'", "found: x_train, y_train, x_test"]),
    ("npz_object_array", _npz(y_test=np.array([1, None], dtype=object)), {}, ["not a readable .npz"]),
    ("image_shape_nchw", _npz(x_train=np.zeros((4, 3, 32, 32), np.uint8)), {},
     ["x_train", "(4, 3, 32, 32)", "transpose(0, 2, 3, 1)"]),
    ("image_shape_rank", _npz(x_test=np.zeros((2, 32, 32), np.uint8)), {}, ["x_test", "(N, 32, 32, 3)"]),
    ("image_dtype", _npz(x_train=np.zeros((4, 32, 32, 3), np.float32)), {},
     ["x_train", "float32", "uint8", "astype(np.uint8)"]),
    ("label_dtype", _npz(y_train=np.zeros((4,), np.float32)), {}, ["y_train", "float32", "integer"]),
    ("label_one_hot", _npz(y_train=np.eye(10, dtype=np.int64)[:4]), {}, ["y_train", "(4, 10)", "one-hot"]),
    ("label_too_big", _npz(y_test=np.array([3, 10])), {}, ["y_test", "label 10", "[0, 10)"]),
    ("label_negative", _npz(y_train=np.array([0, 1, -1, 2])), {}, ["y_train", "label -1"]),
    ("mismatched_n", _npz(y_train=np.arange(3)), {}, ["4 images", "3 labels"]),
    ("empty_split", _npz(x_test=np.zeros((0, 32, 32, 3), np.uint8), y_test=np.zeros((0,), np.int64)), {},
     ["x_test", "empty"]),
    ("num_train_zero", lambda t: ("synthetic", None), {"num_train": 0}, ["num_train=0", "positive"]),
    ("local_no_dir", lambda t: ("cifar10_local", None), {}, ["data_dir", "cifar-10-python.tar.gz"]),
    ("local_missing_dir", lambda t: ("cifar10_local", t / "nowhere"), {}, ["nowhere", "does not exist"]),
    ("local_empty_dir", lambda t: ("cifar10_local", t), {}, ["neither", "cifar-10-batches-py"]),
    ("local_missing_batch", _local(skip=("data_batch_3",)), {}, ["data_batch_3", "missing"]),
    ("local_corrupt_pickle", _local(replace={"data_batch_2": b"\x80\x02garbage"}), {},
     ["data_batch_2", "not a readable CIFAR-10 python batch"]),
    ("local_not_a_dict", _local(replace={"data_batch_2": _pickle_bytes([1, 2])}), {}, ["data_batch_2", "list"]),
    ("local_missing_labels", _batch_with("test_batch", (2, 3072)), {}, ["test_batch", "b'labels'"]),
    ("local_bad_row_size", _batch_with("data_batch_1", (2, 3000), [0, 1]), {},
     ["data_batch_1", "(2, 3000)", "(N, 3072)"]),
    ("local_label_range", _batch_with("data_batch_4", (2, 3072), [0, 12]), {}, ["data_batch_4", "label 12"]),
    ("local_label_count", _batch_with("data_batch_5", (2, 3072), [0]), {}, ["data_batch_5", "2 images", "1 labels"]),
    ("tar_garbage", _file("cifar-10-python.tar.gz", b"not a tarball at all", "cifar10_local"), {},
     ["not a readable tar.gz"]),
    ("tar_truncated", _tar(raw=lambda b: b[: len(b) // 2]), {}, ["not a readable tar.gz"]),
    ("tar_missing_member", _tar(drop=("test_batch",)), {}, ["no member 'test_batch'"]),
]


@pytest.mark.parametrize("writer, kwargs, words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_one_line_data_error(tmp_path, writer, kwargs, words):
    name, data_dir = writer(tmp_path)
    with pytest.raises(DataError) as info:
        D.load_dataset(name, None if data_dir is None else str(data_dir), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, ValueError)
    if data_dir is not None and name != "synthetic":
        assert str(data_dir) in msg  # names the file
    for word in words:
        assert word in msg, (word, msg)


def test_pickle_cannot_run_code(tmp_path):
    target = tmp_path / "pwned"
    _local(replace={"data_batch_1": _pickle_bytes(_Exploit(str(target)))})(tmp_path)
    with pytest.raises(DataError, match="not allowed"):
        D.load_dataset("cifar10_local", str(tmp_path))
    assert not target.exists()


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_and_learnable():
    a = D.load_dataset("synthetic", seed=3)
    b = D.load_dataset("synthetic", seed=3)
    c = D.load_dataset("synthetic", num_train=100, num_test=30, seed=4)
    assert a.x_train.shape == (2048, 32, 32, 3) and a.x_test.shape == (512, 32, 32, 3)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int32
    assert c.x_train.shape == (100, 32, 32, 3) and c.y_test.shape == (30,)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.x_test[:30], c.x_test)
    counts = np.bincount(a.y_train, minlength=10)
    assert counts.min() >= 204 and counts.max() <= 205
    # A nearest-class-mean on the mean colour already beats chance by far.
    feats = lambda x: x.reshape(len(x), -1, 3).mean(1)
    means = np.stack([feats(a.x_train)[a.y_train == k].mean(0) for k in range(10)])
    pred = ((feats(a.x_test)[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a.y_test).mean() > 0.5


# ------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return D.digits_arrays()


def test_digits_split_and_upscaling(digits):
    from sklearn.datasets import load_digits

    x_train, y_train, x_test, y_test = (digits[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    assert x_train.shape == (1437, 32, 32, 3) and x_test.shape == (360, 32, 32, 3) and x_train.dtype == np.uint8
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    # stratified: each class has 20% of its images (rounded) in the test split
    total = np.bincount(y_train, minlength=10) + np.bincount(y_test, minlength=10)
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - 0.2 * total) <= 1)
    # each 8x8 pixel is a 4x4 block, the same on 3 channels, scaled 0..16 -> 0..255
    x = np.concatenate([x_train, x_test])
    np.testing.assert_array_equal(x, np.repeat(np.repeat(x[:, ::4, ::4], 4, axis=1), 4, axis=2))
    assert (x == x[..., :1]).all() and x.max() == 255
    # together the splits are the 1,797 digits of scikit-learn, each once
    raw = load_digits()
    want = D.upscale_digits(raw.images)
    key = lambda imgs, labels: sorted(zip(labels.tolist(), (i.tobytes() for i in imgs)))
    assert key(x, np.concatenate([y_train, y_test])) == key(want, raw.target)
    np.testing.assert_array_equal(D.upscale_digits(raw.data[:3]), want[:3])  # flat rows work too
    # the split is fixed: the same arrays every call
    again = D.digits_arrays()
    assert all(np.array_equal(again[k], digits[k]) for k in digits)


def test_digits_dataset(digits):
    ds = D.load_dataset("digits", num_train=10, num_test=1000)
    np.testing.assert_array_equal(ds.x_train, digits["x_train"][:10])
    np.testing.assert_array_equal(ds.y_test, digits["y_test"])  # slice semantics: the whole test split


def test_digits_without_scikit_learn_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DataError) as info:
        D.load_dataset("digits")
    msg = str(info.value)
    assert "\n" not in msg and "dataset 'digits' needs scikit-learn" in msg and 'pip install -e ".[digits]"' in msg


# ------------------------------------------------------------------ augment, normalize


def _coordinate_images(n: int) -> np.ndarray:
    """Float images whose pixel values (all > 0) encode their own row, column and channel."""
    yy, xx, cc = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    img = (1 + yy * 1000 + xx * 10 + cc).astype(np.float32)
    return np.broadcast_to(img, (n, 32, 32, 3)).copy()


# Everything runs jitted (eager augment compiles op by op: seconds on a small CPU) and the
# shapes repeat, so each compiles once.
augment_jit = jax.jit(D.augment)


@pytest.fixture(scope="module")
def coordinate_batch():
    """4000 augmented coordinate images (float32, raw uint32 key)."""
    x = _coordinate_images(4000)
    out = augment_jit(jax.random.PRNGKey(11), x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    return np.asarray(out)


def test_augment_shape_dtype_determinism():
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    out = augment_jit(k1, x)
    assert out.shape == x.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, augment_jit(k1, x))
    assert not np.array_equal(out, augment_jit(k2, x))
    # Augmentation only moves pixels and adds zero padding: no new values appear.
    assert set(np.unique(np.asarray(out))) <= set(np.unique(x)) | {0}


def test_augment_outputs_are_windows_of_the_padded_image(coordinate_batch):
    out = coordinate_batch[:64]
    padded = np.pad(_coordinate_images(1)[0], ((4, 4), (4, 4), (0, 0)))
    windows = np.stack([padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9)])
    candidates = np.concatenate([windows, windows[:, :, ::-1]])  # (162, 32, 32, 3)
    match = (out[:, None] == candidates[None]).all(axis=(2, 3, 4))  # (64, 162)
    assert match.any(axis=1).all(), "an output is not a (flipped) window of the padded image"
    assert len(set(match.argmax(axis=1))) > 10  # crops and flips really vary per image


def test_augment_flip_rate_and_offsets(coordinate_batch):
    out = coordinate_batch
    # Output column 16 is always inside the original image (offsets 0..8, padding 4).
    step = out[:, 16, 17, 0] - out[:, 16, 16, 0]
    assert set(np.unique(step)) <= {10.0, -10.0}
    flip_rate = np.mean(step < 0)
    assert abs(flip_rate - 0.5) < 0.04, flip_rate
    rows = (out[:, 16, 16, 0] - 1) // 1000  # original row seen at output row 16 = 12 + offset
    assert set(np.unique(rows - 12)) == set(range(9))


@pytest.mark.exact  # two programs: pixels only move, so they agree bit for bit on every CPU
def test_augment_without_flip_crops_as_with_it(coordinate_batch):
    x = _coordinate_images(4000)
    crop = np.asarray(jax.jit(functools.partial(D.augment, flip=False))(jax.random.PRNGKey(11), x))
    flipped = crop[:, 16, 17, 0] < crop[:, 16, 16, 0]
    assert not flipped.any()  # never mirrored
    # the crops of the same key: where crop_flip did not flip, the same image; where it did, its mirror
    same = (coordinate_batch == crop).all(axis=(1, 2, 3))
    mirrored = (coordinate_batch == crop[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all() and 0.4 < same.mean() < 0.6


@pytest.mark.exact  # two programs: float32 normalization to round-off
@pytest.mark.parametrize("mode", D.AUGMENTATIONS)
def test_preprocess_train_modes(mode):
    key = jax.random.key(5)
    x = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    got = jax.jit(D.preprocess_train, static_argnums=2)(key, x, mode)
    want = {
        "crop_flip": D.normalize(augment_jit(key, x)),
        "crop": D.normalize(D.augment(key, x, flip=False)),
        "none": D.normalize(x),
    }[mode]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_preprocess_train_unknown_mode():
    with pytest.raises(ValueError, match="augmentation='flip' is not one of crop_flip, crop, none"):
        D.preprocess_train(jax.random.key(0), np.zeros((2, 32, 32, 3), np.uint8), "flip")


def test_normalize_matches_formula():
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    want = (x.astype(np.float32) / np.float32(255) - D.CIFAR10_MEAN) / D.CIFAR10_STD
    for got in (D.normalize(x), D.normalize(jnp.asarray(x)), jax.jit(D.normalize)(x), D.preprocess_eval(x)):
        assert got.dtype == jnp.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(D.normalize(x[0]), want[0], rtol=1e-6, atol=1e-6)  # single image
    assert D.CIFAR10_MEAN.dtype == np.float32 and D.CIFAR10_STD.shape == (3,)
    key = jax.random.key(3)
    x16 = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    got = jax.jit(D.preprocess_train)(key, x16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, D.normalize(augment_jit(key, x16)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- batching


def test_epoch_batches_is_a_permutation():
    batches = list(D.epoch_batches(103, 10, 0, drop_remainder=False))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))
    dropped = list(D.epoch_batches(103, 10, 0))
    assert len(dropped) == 10 and all(b.shape == (10,) and b.dtype == np.int64 for b in dropped)
    flat = np.concatenate(dropped)
    assert len(np.unique(flat)) == 100 and flat.max() < 103
    np.testing.assert_array_equal(flat, np.concatenate(list(D.epoch_batches(103, 10, 0))))
    rng = np.random.default_rng(5)  # a Generator advances: the next epoch is reshuffled
    first, second = (np.concatenate(list(D.epoch_batches(103, 10, rng))) for _ in range(2))
    assert not np.array_equal(first, second)
    with pytest.raises(DataError, match="batch_size=200"):
        list(D.epoch_batches(100, 200, 0))


@pytest.mark.parametrize("n, bs", [(103, 10), (100, 10), (7, 32)])
def test_eval_batches_cover_every_index_once(n, bs):
    batches = list(D.eval_batches(n, bs))
    assert all(idx.shape == (bs,) and idx.dtype == np.int64 for idx, _ in batches)
    valid = [v for _, v in batches]
    assert sum(valid) == n and all(v == bs for v in valid[:-1]) and 0 < valid[-1] <= bs
    covered = np.concatenate([idx[:v] for idx, v in batches])
    np.testing.assert_array_equal(covered, np.arange(n))
    assert all((idx >= 0).all() and (idx < n).all() for idx, _ in batches)  # padding is a valid index
