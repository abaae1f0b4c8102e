"""The built-in model zoo, imported as `deploykit.zoo`.

Each module registers its models with `deploykit.spec.register_model`; importing this package fills
the registry. Weights are random (seeded) unless a model can be trained quickly on data a package ships.
"""

from . import mlp  # noqa: F401
