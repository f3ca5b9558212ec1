"""The complete model and its checkpoints."""
from ..config import ModelConfig
from .checkpoint import load_pretrained, save_pretrained
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_pretrained", "save_pretrained"]
