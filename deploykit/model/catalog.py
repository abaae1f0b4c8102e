"""The registered models, the zoo included: what `--model NAME` and `deploykit models` look up.

Separate from `deploykit.model.spec` because the zoo's modules register themselves through the spec
module: importing the zoo here, and the specs there, keeps both import orders one-way.
"""

from __future__ import annotations

from deploykit.model import zoo  # noqa: F401 - importing the zoo registers its models
from deploykit.model.spec import MODELS, ModelSpec


def get_model(name: str) -> ModelSpec:
    return MODELS.get(name)


def list_models() -> list[ModelSpec]:
    return [MODELS.get(name) for name in MODELS.names()]

