"""Every pipeline deploykit knows, registered: what an artifact's `pipeline` field is looked up in.

Importing this module imports each pipeline module (cheap: their torch side loads on use).
"""

from __future__ import annotations

from deploykit.pipelines import (  # noqa: F401 - registration
    forward,
    onnx_file,
    optimum_forward,
    speech_translation,
    text2text_generation,
    text_generation,
)
from deploykit.pipelines.base import PIPELINES, Pipeline

__all__ = ["PIPELINES", "Pipeline"]
