"""fastattnreg: fused attention kernels that also export exact, differentiable attention maps.

Public API (see DESIGN.md): attention, attention_ref, FusedAttention.
"""
from .backend import cpp_available, triton_available
from .nn.attention import FusedAttention
from .ops.attention import attention, attention_ref

__all__ = [
    "attention",
    "attention_ref",
    "FusedAttention",
    "cpp_available",
    "triton_available",
]
__version__ = "0.1.0"
