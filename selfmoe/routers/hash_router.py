"""Hash routing (Roller et al. 2021): a fixed, random token-id -> k-experts table; 0 parameters.

For language models the model hands the token ids down (`set_token_ids`, done by selfmoe's
GPT model before every forward); for vision the table is indexed by patch position.
"""

from __future__ import annotations

import torch

from selfmoe.routers.base import FixedKRouter, router_option


def hash_table(num_keys: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """[num_keys, k] distinct experts per key, uniform over experts, fixed by the seed."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.rand(num_keys, num_experts, generator=gen).topk(k, dim=-1).indices


class HashRouter(FixedKRouter):
    needs_token_ids = True

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config, pg_collection, **kwargs)
        self.by = router_option(config, "hash_router_by")
        key = "vocab_size" if self.by == "token" else "max_position_embeddings"
        num_keys = getattr(config, key, 0) or 0
        if num_keys <= 0:
            raise ValueError(f"hash routing by {self.by} needs config.{key} (a plain TransformerConfig has none): "
                             f"set it, or use selfmoe.config.SelfMoEConfig")
        table = hash_table(num_keys, self.num_experts, self.topk, router_option(config, "hash_router_seed"))
        self.register_buffer("table", table, persistent=False)
        self._token_ids = None

    def set_token_ids(self, token_ids: torch.Tensor | None):
        """token ids [b, s] of the batch about to go through the model."""
        self._token_ids = token_ids

    def forward(self, input: torch.Tensor, padding_mask=None):
        s_local, b = input.shape[0], input.shape[1]
        s_full, offset = self.sequence_slice(s_local)
        if self.by == "token":
            if self._token_ids is None:
                raise RuntimeError("hash routing by token id: no token ids for this forward; call "
                                   "router.set_token_ids(input_ids) first (selfmoe's GPT model does it)")
            keys = self._token_ids.t()[offset : offset + s_local]  # [s_local, b], Megatron's s-major order
        else:
            keys = torch.arange(offset, offset + s_local, device=input.device)[:, None].expand(s_local, b)
        choices = self.table.to(input.device)[keys.reshape(-1)]
        return self.route_from_choices(choices, torch.float32)
