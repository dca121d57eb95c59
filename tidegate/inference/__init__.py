"""Local model inference: bundled models, loading, quantization, the transformers backend.

Importing this package does not import torch; ``load_backend`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidegate.inference.bundled import BundledModelStatus, list_bundled_models

if TYPE_CHECKING:
    from tidegate.config import ModelSettings
    from tidegate.inference.transformers_backend import TransformersBackend

__all__ = ["BundledModelStatus", "list_bundled_models", "load_backend"]


def load_backend(settings: ModelSettings) -> TransformersBackend:
    """Load, quantize and wrap the model ``settings`` names (synchronous: seconds).

    Call it before starting the event loop, or via ``asyncio.to_thread`` inside one.
    """
    from tidegate.inference.loading import load_backend as _load_backend

    return _load_backend(settings)
