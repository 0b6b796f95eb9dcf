"""The ViT/DeiT classifier: Megatron-Core's TransformerBlock (local layer spec) between a patch
embedding and a classification head, with our router in its MoE MLPs.

    image [b, C, H, W] -> Conv2d(patch, stride=patch) -> [class token ;] patches + learned position
    embeddings -> pre-norm layers (bidirectional attention) -> final norm -> class token or mean
    over patches -> Linear -> logits [b, num_classes]

Dosovitskiy et al. 2021 (ViT), Touvron et al. 2021 (DeiT). Megatron-Core's own vision model
(CLIPViTModel) is not reused: it has no head, builds every layer on one pipeline stage, puts
position ids on the GPU at construction, and its local layer spec (get_vit_layer_with_local_spec,
0.16) declares *causal* attention. This model takes the GPT local spec (the one our routers plug
into, with TP/SP, EP, PP and dist_checkpointing) and sets the attention mask type to no_mask.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from selfmoe.models.moe_spec import block_spec, prepare_moe, with_moe_router


class DropPathBiasDropoutAdd:
    """Megatron's bias-dropout-add with stochastic depth on the branch (timm's drop_path, per sample).

    Under tensor parallelism every rank draws the same mask: the default torch generator is seeded
    alike on all tensor-parallel ranks (Megatron's set_random_seed).
    """

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, training: bool, fused: bool):
        if not training or self.rate <= 0:
            return get_bias_dropout_add(training, fused)
        from timm.layers import drop_path

        def bda(x_with_bias, residual, prob):
            x, bias = x_with_bias
            x = F.dropout(x if bias is None else x + bias, p=prob, training=True)
            return residual + drop_path(x.transpose(0, 1), self.rate, True).transpose(0, 1)  # [s, b, h]

        return bda


def vit_layer_spec(config, moe: bool, drop_path: float = 0.0) -> ModuleSpec:
    """One pre-norm layer: Megatron-Core's local GPT layer with unmasked (bidirectional) attention."""
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts if moe else None, moe_grouped_gemm=False,
                                    normalization=config.normalization)
    sub = spec.submodules
    attention = dataclasses.replace(sub.self_attention, params={**sub.self_attention.params,
                                                                  "attn_mask_type": AttnMaskType.no_mask})
    changes = dict(self_attention=attention)
    if drop_path > 0:
        changes.update(self_attn_bda=ModuleSpec(module=DropPathBiasDropoutAdd, params={"rate": drop_path}),
                       mlp_bda=ModuleSpec(module=DropPathBiasDropoutAdd, params={"rate": drop_path}))
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(sub, **changes))
    return with_moe_router(spec, config) if moe else spec


def num_tokens(img_h: int, img_w: int, patch_dim: int, class_token: bool) -> int:
    """Sequence length of the transformer: (H/p)(W/p) patches (+ 1 class token)."""
    return (img_h // patch_dim) * (img_w // patch_dim) + int(class_token)


class SelfMoEViTModel(VisionModule):
    """ViT/DeiT image classifier for one pipeline stage.

    forward(images [b, C, H, W]) -> logits [b, num_classes] on the last stage, else hidden states
    [s, b, h] for the next stage (Megatron's s-major layout; s/tp of them under sequence parallelism).
    pool: "cls" (class token, as ViT/DeiT) or "mean" (mean over patch tokens, no class token).
    """

    def __init__(self, config, img_h: int, img_w: int, patch_dim: int, num_channels: int, num_classes: int,
                 pool: str = "cls", drop_path: float = 0.0, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None):
        super().__init__(config=config)
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if img_h % patch_dim or img_w % patch_dim:
            raise ValueError(f"image size {img_h}x{img_w} is not divisible by the patch size {patch_dim}")
        self.pre_process, self.post_process, self.pool = pre_process, post_process, pool
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's pipeline schedules read
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads under PP
        self.patch_dim, self.num_channels, self.num_classes = patch_dim, num_channels, num_classes
        self.class_token_len = int(pool == "cls")
        self.seq_length = num_tokens(img_h, img_w, patch_dim, pool == "cls")
        H = config.hidden_size
        if pre_process:
            self.conv1 = torch.nn.Conv2d(num_channels, H, kernel_size=patch_dim, stride=patch_dim, bias=True)
            self.position_embeddings = torch.nn.Parameter(torch.empty(self.seq_length, H))
            torch.nn.init.trunc_normal_(self.position_embeddings, std=0.02)  # DeiT / timm
            if self.class_token_len:
                self.class_token = torch.nn.Parameter(torch.zeros(1, 1, H))
                torch.nn.init.trunc_normal_(self.class_token, std=0.02)
        L = config.num_layers
        rates = [drop_path * i / max(L - 1, 1) for i in range(L)]  # DeiT: linear in depth, 0 at layer 1
        spec = block_spec(config, lambda moe, i: vit_layer_spec(config, moe, rates[i]), vp_stage,
                          per_layer=drop_path > 0)
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        if post_process:
            self.head = torch.nn.Linear(H, num_classes)
            config.init_method(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [b, C, H, W] -> [s, b, h] (class token first), the input of the first layer."""
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [b, patches, h]
        if self.class_token_len:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = (x + self.position_embeddings).transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def forward(self, images: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(images) if self.pre_process else None
        x = self.decoder(hidden_states=x, attention_mask=None)
        if not self.post_process:
            return x
        if self.config.sequence_parallel:  # every rank classifies the whole image; grads are split back
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        x = x[0] if self.pool == "cls" else x.mean(0)
        return self.head(x)


def build_vit_model(config, img_h: int, img_w: int, patch_dim: int, num_channels: int, num_classes: int,
                    pool: str = "cls", drop_path: float = 0.0, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None) -> SelfMoEViTModel:
    """Build the ViT for this rank's pipeline stage (all of it at pipeline size 1).

    config.max_position_embeddings must equal the token count (hash routing by position reads it).
    """
    seq = num_tokens(img_h, img_w, patch_dim, pool == "cls")
    if config.max_position_embeddings != seq:
        raise ValueError(f"config.max_position_embeddings ({config.max_position_embeddings}) must be the token "
                         f"count {seq}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = SelfMoEViTModel(config, img_h, img_w, patch_dim, num_channels, num_classes, pool=pool,
                            drop_path=drop_path, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    prepare_moe(model, config)
    return model

