"""Smoke run: seconds on a CPU, generated data, no download.

Run::

    python train.py --config configs/smoke.py --workdir /tmp/smoke

ResNet-4 with ANODEV2 configuration 2 (``steps_z=2, steps_w=10``, "endpoints") on the
``synthetic`` dataset (learnable CIFAR-shaped images, ``anodev2_jax.data``): 512 training
and 256 test images, batch 64, 4 epochs at learning rate 0.02 (no decay; 0.1, the
paper's rate for batch 256, is unstable at batch 64 on this data). It targets no
number of the paper; it checks that the whole pipeline trains: the test accuracy should be
far above chance (10%). Any method works: ``--config configs/smoke.py:anodev2_conf1``.
"""

from configs import default


def get_config(arg=None):
    """The smoke config with ``arg`` as the method (default: ``anodev2_conf2``)."""
    config = default.get_config(arg or "anodev2_conf2")
    config.model = "resnet4"
    config.dataset = "synthetic"
    config.num_train = 512
    config.num_test = 256
    config.batch_size = 64
    config.num_epochs = 4
    config.learning_rate = 0.02
    config.lr_boundaries_epochs = ()
    config.log_every_steps = 0
    config.keep_checkpoints = 2
    return config
