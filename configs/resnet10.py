"""ResNet-10 on CIFAR-10 (Table 6 architecture; Tables 1 and 4 of the paper).

Run, choosing the method as the config argument::

    python train.py --config configs/resnet10.py:anodev2_conf2 \
        --config.dataset=cifar10_local --config.data_dir=~/data

Paper targets, test accuracy over 5 seeds (avg; Tables 1, 2, 4), 350 epochs:

* ``baseline``       88.10% avg
* ``neural_ode``     67.94% avg
* ``anode``          88.60% avg
* ``anodev2_conf1``  89.04% avg  (Table 1)
* ``anodev2_conf2``  88.93% avg  (Table 2)

Use ``--config.num_seeds=5`` for the table's min / max / avg in one run.
"""

from configs import default


def get_config(arg=None):
    """ResNet-10 with ``arg`` as the method (default: ``anodev2_conf1``)."""
    config = default.get_config(arg)
    config.model = "resnet10"
    return config
