"""Inference on the MLA latent cache: generation (prefill, then decode), speculative early-exit and MTP
decoding, best-of-N and self-consistency, per-step monitors."""
from .best_of_n import BestOfN, MajorityVote, best_of_n, majority_vote
from .generate import GenerationOutput, GenerationStats, generate
from .monitors import ContentMonitor, Monitor, StopStrings, TokenStream

__all__ = ["BestOfN", "ContentMonitor", "GenerationOutput", "GenerationStats", "MajorityVote", "Monitor", "StopStrings",
           "TokenStream", "best_of_n", "generate", "majority_vote"]
