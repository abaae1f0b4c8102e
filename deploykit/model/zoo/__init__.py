"""The built-in model zoo, imported as `deploykit.model.zoo`.

Each module registers its models with `deploykit.model.spec.register_model`; importing this package fills
the registry. Weights are random (seeded) unless a model can be trained quickly on data a package
ships (the LeNets, on the UCI handwritten digits (shipped with deploykit)).
"""

from . import espnet_st, gpt2, lenet, mlp, resnet, text, vae  # noqa: F401
