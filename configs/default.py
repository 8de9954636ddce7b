"""Default configuration: every field of a run, with the paper's training recipe (Appendix C).

Run (the method is a field like any other)::

    python train.py --config configs/default.py --config.method=anodev2_conf1 \
        --config.dataset=cifar10_local --config.data_dir=~/data --workdir runs/r4-conf1

The variants (``resnet4.py``, ``resnet10.py``, ``alexnet.py``, ``smoke.py``) import this file
and override a few fields; each takes the method as its config argument, e.g.
``--config configs/resnet4.py:anodev2_conf2``. Every field can be overridden on the
command line (``--config.seed=3``); unknown fields are an error.

Defaults: ResNet-4 with ANODEV2 configuration 1 on CIFAR-10 (tfds), SGD with momentum
0.9, weight decay 5e-4, learning rate 0.1 divided by 10 at epochs 150 and 300 of 350,
batch 256 (Appendix C). Paper target: Table 1, ResNet-4 configuration 1, 78.11% average
test accuracy (``configs/resnet4.py`` lists the other rows).

ODE knobs (``steps_z`` ... ``rda_parameterization``) default to ``None``, which means "the method's
default" (``anodev2_jax.methods.method_defaults``): e.g. configuration 1 is
``steps_z = steps_w = 5, schedule="aligned"``, configuration 2 ``steps_z = 2,
steps_w = 10, schedule="endpoints"``, ANODE and Neural ODE ``steps_z = 2``.
"""

from ml_collections import config_dict


def get_config(arg=None):
    """The default ConfigDict; ``arg`` (``--config configs/default.py:METHOD``) sets ``method``."""
    config = config_dict.ConfigDict()

    # --- model: anodev2_jax.models.get_model(model, method, **ODE knobs)
    config.model = "resnet4"  # alexnet | resnet4 | resnet10
    config.method = "anodev2_conf1"  # baseline | neural_ode | anode | anodev2_conf1 | anodev2_conf2
    # ODE knobs; None = the method's default (placeholders keep the type for --config.X=...).
    config.steps_z = config_dict.placeholder(int)  # activation (Euler) steps per ODE block
    config.steps_w = config_dict.placeholder(int)  # RDA weight steps (anodev2_* only)
    config.schedule = config_dict.placeholder(str)  # aligned | endpoints
    config.solver = config_dict.placeholder(str)  # euler | rk2 | rk4
    config.remat = config_dict.placeholder(str)  # auto | none | block | step | binomial (O(log steps_z) memory; see anodev2_jax/ode.py)
    config.adjoint = config_dict.placeholder(str)  # autodiff | discrete | backsolve
    config.coeff_granularity = config_dict.placeholder(str)  # kernel | filter
    config.nonlinearity = config_dict.placeholder(str)  # tanh | sigmoid | none (sigma of Eq. 2.6)
    config.norm = config_dict.placeholder(str)  # per_step | shared
    # Eq. 2.3 (anodev2_* only; anodev2_jax/layers.py declare_evolution says how each starts):
    config.evolution = config_dict.placeholder(str)  # rda (B.4, default) | rda_equation (Eq. 2.6) | linear | mlp
    config.time_kernel = config_dict.placeholder(str)  # dirac (default) | exponential | discrete
    config.rda_parameterization = config_dict.placeholder(str)  # abs (d = |rda_d|, default) | softplus
    # float32 | bfloat16: the activations' and convolutions' dtype; params, BatchNorm
    # statistics and the RDA evolution stay float32 (bfloat16: the usual choice on Hopper GPUs
    # and TPUs). float64: the whole model in float64, for reference runs (JAX_ENABLE_X64=1)
    config.dtype = "float32"

    # --- data: anodev2_jax.data.load_dataset
    # cifar10 (tfds, else the official tarball downloaded into data_dir/downloads) | cifar10_local | npz
    # | synthetic | digits (scikit-learn's handwritten digits: offline, configs/digits.py)
    config.dataset = "cifar10"
    config.data_dir = config_dict.placeholder(str)  # tfds dir (None: ~/tensorflow_datasets) / folder or tarball / .npz path
    config.num_train = config_dict.placeholder(int)  # None: the whole training split
    config.num_test = config_dict.placeholder(int)  # None: the whole test split
    config.data_seed = 0  # generator seed of the synthetic dataset (shared by all seeds)
    # on-device training augmentation: crop_flip (random crop with 4 px zero padding + horizontal
    # flip, CIFAR's standard) | crop (no flip: a mirrored digit is another digit) | none
    config.augment = "crop_flip"

    # --- optimization (Appendix C)
    config.num_epochs = 350
    config.batch_size = 256  # global batch, split over all devices (must divide evenly)
    config.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
    config.learning_rate = 0.1
    config.lr_boundaries_epochs = (150, 300)  # learning rate *= lr_decay_factor at these epochs
    config.lr_decay_factor = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.decay_rda_coeffs = False  # weight decay on the evolution params (rda_*, evo_*, time_*): see anodev2_jax/optim.py
    config.evolution_lr_scale = 1.0  # learning rate of the evolution and time-kernel params / the schedule's

    # --- seeds: num_seeds replicas (seeds seed, seed+1, ...) trained in one vmapped program
    config.seed = 0
    config.num_seeds = 1

    # --- evaluation, logging, checkpoints
    config.eval_every_epochs = 1
    config.log_every_steps = 100  # a metrics.jsonl record (and TensorBoard scalars) per seed; 0: per epoch only
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    config.nonfinite = "stop"  # stop | skip: a NaN / Inf loss or gradient stops the run, or its step is skipped

    # --- execution: optimizer steps per jitted call, the data resident on the devices
    # (anodev2_jax/engine.py); 0 = automatic: the whole epoch on GPU / TPU, 1 on CPU. A stop
    # signal waits for the running call. Every value gives each step the same batch, key and
    # learning rate; another value is another compiled program: the numbers agree to round-off.
    config.steps_per_call = 0

    # --- multi-host: jax.distributed.initialize() before anything else
    config.distributed = False

    # --- memory: remat="auto" (the ODE methods' default) picks, per ODE block, the cheapest
    # schedule whose estimated activations fit this budget (anodev2_jax/ode.py choose_remat)
    config.remat_budget_mb = 2048.0  # MiB per device and ODE block (2048: sized for a 16 GB device)

    if arg:
        config.method = arg
    return config
