"""Model families: each a Megatron-Core model built from a layer spec with our router swapped in.

`moe_spec` is the part every family shares; `gpt` builds GPTModel, `vit` the ViT/DeiT classifier.
"""

from selfmoe.models.gpt import SelfMoEGPTModel, build_gpt_model, transformer_layer_spec
from selfmoe.models.moe_spec import prepare_moe, with_moe_router
from selfmoe.models.vit import SelfMoEViTModel, build_vit_model
from selfmoe.routers import moe_layers, routers

__all__ = ["SelfMoEGPTModel", "build_gpt_model", "transformer_layer_spec", "prepare_moe", "with_moe_router",
           "moe_layers", "routers", "SelfMoEViTModel", "build_vit_model"]
