"""ResNet-4 on CIFAR-10 (Table 6 architecture; Tables 1 and 4 of the paper).

Run, choosing the method as the config argument::

    python train.py --config configs/resnet4.py:anodev2_conf1 \
        --config.dataset=cifar10_local --config.data_dir=~/data

Paper targets, test accuracy over 5 seeds (min / max / avg; Tables 1, 2, 4), 350 epochs:

* ``baseline``       76.95% avg
* ``neural_ode``     47.37% avg
* ``anode``          77.30% avg
* ``anodev2_conf1``  78.11% avg  (Table 1)
* ``anodev2_conf2``  77.73% avg  (Table 2)

Use ``--config.num_seeds=5`` for the table's min / max / avg in one run.
"""

from configs import default


def get_config(arg=None):
    """ResNet-4 with ``arg`` as the method (default: ``anodev2_conf1``)."""
    config = default.get_config(arg)
    config.model = "resnet4"
    return config
