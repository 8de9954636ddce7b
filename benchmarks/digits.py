"""Real images offline: scikit-learn's handwritten digits as a CIFAR-shaped ``.npz`` (the ``npz`` dataset).

scikit-learn ships 1,797 real 8x8 grayscale digits (0-16) inside the package. This writes
them upscaled to 32x32 (each pixel a 4x4 block: nearest neighbour, no invented detail),
repeated on 3 channels and scaled to 0-255 uint8, split 80 / 20 stratified by class with a
fixed seed (1,437 training and 360 test images), as ``x_train, y_train, x_test, y_test``::

    pip install scikit-learn
    python benchmarks/digits.py --out /tmp/digits32.npz
    python train.py --config configs/resnet4.py --config.dataset=npz --config.data_dir=/tmp/digits32.npz \
        --config.learning_rate=0.01 --config.batch_size=100 --config.num_epochs=15 --config.lr_boundaries_epochs='()'

A recipe that learns them: lr 0.01, batch 100, 15 epochs (lr 0.05 diverges for ResNet-4, in
PyTorch too). scikit-learn is needed only here (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse

import numpy as np

SEED = 0  # the train / test split


def digits32() -> dict[str, np.ndarray]:
    """The four arrays of the digits npz (see the module docstring)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8) in 0..255
    images = np.kron(images, np.ones((1, 4, 4), np.uint8))  # nearest-neighbour 8x8 -> 32x32
    images = np.repeat(images[..., None], 3, axis=-1)  # (N, 32, 32, 3)
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=SEED
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits32.npz", help="path of the .npz to write")
    args = parser.parse_args(argv)
    arrays = digits32()
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
