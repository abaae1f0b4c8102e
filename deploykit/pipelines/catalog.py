"""Every pipeline deploykit knows, registered: what an artifact's `pipeline` field is looked up in.

Importing this module imports each pipeline module (cheap: their torch side loads on use).
"""

from __future__ import annotations

from deploykit.pipelines import forward, onnx_file, speech_translation, text_generation  # noqa: F401 - registration
from deploykit.pipelines.base import PIPELINES, Pipeline

__all__ = ["PIPELINES", "Pipeline"]
