"""Micro-batch iterators over map-style datasets, resumable from a consumed-samples count.

Megatron-LM's pretraining sampler order: global batch after global batch of consecutive sample
indices; within one step, micro-batch m of data-parallel rank r holds the samples
`start + m * (micro * dp) + r * micro + [0, micro)`. Only the count of consumed samples is
state, which is what a checkpoint saves. No DataLoader: its worker seeding draws from the torch
RNG, which would make the loss curve depend on when iterators are created.
"""

from __future__ import annotations

import torch


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


class MicroBatchIterator:
    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 wrap: bool = False):
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, micro_batch_size, dp_rank, dp_size
        self.consumed_samples = consumed_samples  # over all data-parallel ranks
        self.wrap = wrap  # validation reuses a fixed window: wrap around a short split

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = len(self.dataset)
        start = self.consumed_samples + self.dp_rank * self.mbs
        if not self.wrap and start + self.mbs > n:
            raise StopIteration
        batch = collate([self.dataset[i % n] for i in range(start, start + self.mbs)])
        self.consumed_samples += self.mbs * self.dp_size
        return batch
