"""r1kernels: kernels and runtime for DeepSeek-R1/V3-style reasoning models.

Layers (imports point down): native ``_C`` -> ``reference`` -> ``triton`` -> ``ops`` -> ``nn`` -> ``model``.
Importing this package never imports triton or requires the compiled extension.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference
from ._dispatch import BACKENDS, BackendUnavailable, use_backend
from ._info import info

__all__ = ["BACKENDS", "BackendUnavailable", "__version__", "info", "ops", "reference", "use_backend"]

from .config import ModelConfig  # noqa: E402
from .model import Transformer, load_pretrained, save_pretrained  # noqa: E402

__all__ += ["ModelConfig", "Transformer", "load_pretrained", "save_pretrained"]

from .inference import GenerationOutput, best_of_n, generate, majority_vote  # noqa: E402

__all__ += ["GenerationOutput", "best_of_n", "generate", "majority_vote"]
