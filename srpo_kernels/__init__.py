"""srpo-kernels: the SRPO loss (GRPO clipped surrogate + entropy-weighted self-distillation) computed chunk by
chunk from hidden states and the lm_head weight, never materialising ``[tokens, vocab]`` logits."""
from . import reference
from .api import FusedSRPOLoss, fused_logprobs, fused_srpo_loss
from .config import SRPOLossConfig
from .output import SRPOLossOutput
from .workspace import release_workspace

__all__ = ["fused_srpo_loss", "fused_logprobs", "FusedSRPOLoss", "SRPOLossConfig", "SRPOLossOutput", "reference",
           "release_workspace"]
__version__ = "0.1.0"
