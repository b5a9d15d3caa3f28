"""fastattnreg: fused attention kernels that also export exact, differentiable attention maps.

Public API: attention, attention_match, refined_attention (and their *_ref references),
FusedAttention, RefinerAttention, GTALoss, AttentionLink.
"""
from .backend import cpp_available, triton_available
from .nn.attention import FusedAttention
from .nn.refiner import RefinerAttention
from .nn.regularizers import AttentionLink, GTALoss
from .ops.attention import attention, attention_ref
from .ops.match import attention_match, attention_match_ref
from . import init, models  # noqa: E402  (ViT models and initialisations)
from .ops.refiner import refined_attention, refined_attention_ref
from .ops import autocast as _autocast  # noqa: F401,E402  (the ops' autocast rules)

__all__ = [
    "attention",
    "attention_ref",
    "attention_match",
    "attention_match_ref",
    "refined_attention",
    "refined_attention_ref",
    "FusedAttention",
    "RefinerAttention",
    "GTALoss",
    "AttentionLink",
    "cpp_available",
    "triton_available",
]
__version__ = "0.1.0"
