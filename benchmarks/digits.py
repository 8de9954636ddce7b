"""Real images offline: scikit-learn's handwritten digits as a CIFAR-shaped ``.npz`` (the ``npz`` dataset).

scikit-learn ships 1,797 real 8x8 grayscale digits (0-16) inside the package. This writes
the arrays of ``dataset="digits"`` (:func:`anodev2_jax.data.digits_arrays`: upscaled to
32x32 with each pixel a 4x4 block, nearest neighbour, no invented detail; repeated on 3
channels and scaled to 0-255 uint8; split 80 / 20 stratified by class with a fixed seed,
1,437 training and 360 test images) as ``x_train, y_train, x_test, y_test``, for other
tools or for ``dataset="npz"``::

    pip install -e ".[digits]"
    python benchmarks/digits.py --out /tmp/digits32.npz
    python train.py --config configs/digits.py --config.dataset=npz --config.data_dir=/tmp/digits32.npz

which trains exactly as ``python train.py --config configs/digits.py`` (the same arrays).
The recipe (``configs/digits.py``): lr 0.01 (lr 0.05 diverges for ResNet-4, in PyTorch too)
divided by 10 at epoch 20 of 25, batch 100, random crops without flips. Without scikit-learn this prints one line
naming the extra and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from anodev2_jax.data import DIGITS_SPLIT_SEED, DataError, digits_arrays  # noqa: E402

SEED = DIGITS_SPLIT_SEED  # the train / test split


def digits32() -> dict[str, np.ndarray]:
    """The four arrays of the digits npz: those of ``dataset="digits"`` (see the module docstring)."""
    return digits_arrays()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits32.npz", help="path of the .npz to write")
    args = parser.parse_args(argv)
    try:
        arrays = digits32()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
