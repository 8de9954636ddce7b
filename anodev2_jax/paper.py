"""The paper's published numbers, in one place: models, methods, Tables 1-4 (no JAX, no Flax).

Used by :mod:`anodev2_jax.methods` (the names), :mod:`anodev2_jax.models` (the Table 3
printer) and :mod:`anodev2_jax.reproduce` (the tables beside ours), which reads and
formats results without importing JAX.
"""

__all__ = ["MODELS", "METHODS", "MODEL_TITLES", "METHOD_TITLES", "PAPER_ACCURACY", "PAPER_PARAMS", "PAPER_SEEDS"]

# The paper's models (columns of its tables) and methods (rows); anodev2_jax.methods uses these.
MODELS = ("alexnet", "resnet4", "resnet10")
METHODS = ("baseline", "neural_ode", "anode", "anodev2_conf1", "anodev2_conf2")

MODEL_TITLES = {"alexnet": "AlexNet", "resnet4": "ResNet-4", "resnet10": "ResNet-10"}
METHOD_TITLES = {
    "baseline": "Baseline",
    "neural_ode": "NeuralODE [8]",
    "anode": "ANODE [9]",
    "anodev2_conf1": "ANODEV2 conf. 1",
    "anodev2_conf2": "ANODEV2 conf. 2",
}

# Test accuracy of the paper in percent, (min, max, avg) over five runs (Tables 1, 2, 4).
PAPER_ACCURACY: dict[str, dict[str, tuple[float, float, float]]] = {
    "alexnet": {
        "baseline": (86.84, 87.15, 87.03),
        "neural_ode": (74.54, 76.78, 75.67),
        "anode": (87.86, 88.14, 88.02),
        "anodev2_conf1": (88.59, 88.96, 88.78),
        "anodev2_conf2": (88.10, 88.33, 88.26),
    },
    "resnet4": {
        "baseline": (76.47, 77.35, 76.95),
        "neural_ode": (44.73, 49.91, 47.37),
        "anode": (76.92, 77.45, 77.30),
        "anodev2_conf1": (77.27, 78.58, 78.11),
        "anodev2_conf2": (77.23, 78.28, 77.73),
    },
    "resnet10": {
        "baseline": (87.79, 88.52, 88.10),
        "neural_ode": (64.70, 70.06, 67.94),
        "anode": (88.48, 88.75, 88.60),
        "anodev2_conf1": (88.67, 89.39, 89.04),
        "anodev2_conf2": (88.65, 89.19, 88.93),
    },
}

# Table 3 of the paper as printed (thousands of parameters).
PAPER_PARAMS: dict[str, dict[str, str]] = {
    "baseline": {"alexnet": "1756.68K", "resnet4": "7.71K", "resnet10": "44.19K"},
    "neural_ode": {"alexnet": "1757.13K", "resnet4": "7.96K", "resnet10": "44.95K"},
    "anode": {"alexnet": "1757.13K", "resnet4": "7.96K", "resnet10": "44.95K"},
    "anodev2_conf1": {"alexnet": "1757.51K", "resnet4": "8.23K", "resnet10": "45.77K"},
    "anodev2_conf2": {"alexnet": "1757.13K", "resnet4": "7.99K", "resnet10": "45.05K"},
}

PAPER_SEEDS = 5  # "All the experiments were repeated five times" (Section 3.1)
