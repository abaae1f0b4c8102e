"""The built-in model zoo: one module per family, its configs and data beside it.

Each module registers its models with `deploykit.model.spec.register_model`; importing this package fills
the registry. Weights are random (seeded) unless a model can be trained quickly on data a package
ships (the LeNets, on the UCI handwritten digits, which ship beside them).
"""

from . import espnet_st, gpt2, lenet, mlp, resnet, text, vae  # noqa: F401
