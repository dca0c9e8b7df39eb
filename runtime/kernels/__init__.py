"""Our attention and experts implementations, registered with transformers by name so that the model
tree stays transformers' own and `attention=` / `experts=` choose them from config; each has a
reference it is tested against (transformers' eager paths)."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Make our implementations known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from runtime.kernels import attention, flash, moe, moe_mxfp4

    ALL_ATTENTION_FUNCTIONS.register(attention.NAME, attention.gqa_sinks_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(attention.NAME, eager_mask)
    ALL_ATTENTION_FUNCTIONS.register(flash.NAME, flash.sinks_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(flash.NAME, eager_mask)  # the dynamic cache: gqa_sinks fallback
    ALL_EXPERTS_FUNCTIONS.register(moe.NAME, moe.experts_forward)
    ALL_EXPERTS_FUNCTIONS.register(moe_mxfp4.NAME, moe_mxfp4.experts_forward)
    _registered = True
