"""Training: the model-level losses, the trainer (AdamW, schedules, checkpoints) and distributed wrappers."""
from .losses import IGNORE_INDEX, LossConfig, LossOutput, causal_lm_loss

__all__ = ["IGNORE_INDEX", "LossConfig", "LossOutput", "causal_lm_loss"]
