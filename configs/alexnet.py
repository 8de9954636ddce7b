"""AlexNet on CIFAR-10 (Table 5 architecture; Tables 1 and 4 of the paper).

Run, choosing the method as the config argument::

    python train.py --config configs/alexnet.py:anodev2_conf1 \
        --config.dataset=cifar10_local --config.data_dir=~/data

Schedule (Appendix C): 120 epochs, learning rate 0.1 divided by 10 at epochs 40, 80 and
100; otherwise as ``default.py``.

Paper targets, test accuracy over 5 seeds (avg; Tables 1, 2, 4):

* ``baseline``       87.03% avg
* ``neural_ode``     75.67% avg
* ``anode``          88.02% avg
* ``anodev2_conf1``  88.78% avg  (Table 1)
* ``anodev2_conf2``  88.26% avg  (Table 2)

Use ``--config.num_seeds=5`` for the table's min / max / avg in one run.
"""

from configs import default


def get_config(arg=None):
    """AlexNet with ``arg`` as the method (default: ``anodev2_conf1``)."""
    config = default.get_config(arg)
    config.model = "alexnet"
    config.num_epochs = 120
    config.lr_boundaries_epochs = (40, 80, 100)
    return config
