"""ANODEV2 on real images, offline: scikit-learn's handwritten digits (minutes on a CPU, no download).

Run (needs the ``digits`` extra, ``pip install -e ".[digits]"``; ``[dev]`` includes it)::

    python train.py --config configs/digits.py --workdir runs/digits

The ``digits`` dataset (``anodev2_jax.data.digits_arrays``): the 1,797 8x8 digits shipped
inside scikit-learn, upscaled to 32x32x3 (each pixel a 4x4 block), split 80 / 20
stratified with a fixed seed: 1,437 training and 360 test images. No download.

Recipe: ResNet-4 with ANODEV2 configuration 1 (``steps_z = steps_w = 5``, "aligned"),
SGD with momentum 0.9 and weight decay 5e-4 (as ``default.py``), batch 100, 25 epochs
(350 steps), learning rate 0.01 divided by 10 at epoch 20. Augmentation ``crop`` (random
crop with 4 pixels of zero padding, no flip: a mirrored digit is another digit; with
CIFAR's flip every row of the README's evolution study plateaued near 80% test accuracy).

Measured with this command: test accuracy 97.78% (seed 0), 96.94% (seed 1), 98.89%
(seed 2); seed 0 took 86 s of wall time (2.6 CPU-minutes) on a quiet 2-core AMD EPYC VM
(2026-12-03; 7.4 minutes while the 2 cores were shared with other jobs). While choosing it (seed 1, the slowest of the three to
learn): 15 epochs at a constant 0.01 end at 84.4% (the test accuracy swings by 10-30
points between epochs), 15 with the decay at 10 at 93.9% (93.6% at batch 50, 91.4% at
lr 0.02; 0.05 diverges for this architecture); without augmentation (15 epochs, decay at
10) it overfits: 92.8% test at 96% training accuracy. It targets no number of the paper.
Any method works: ``--config configs/digits.py:baseline``.
"""

from configs import default


def get_config(arg=None):
    """The digits config with ``arg`` as the method (default: ``anodev2_conf1``)."""
    config = default.get_config(arg)
    config.model = "resnet4"
    config.dataset = "digits"
    config.augment = "crop"
    config.batch_size = 100
    config.num_epochs = 25
    config.learning_rate = 0.01
    config.lr_boundaries_epochs = (20,)  # a constant rate leaves the test accuracy swinging between epochs
    config.log_every_steps = 0
    return config
