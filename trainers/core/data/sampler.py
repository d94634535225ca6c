"""The batch sampler that keeps each batch in one aspect-ratio bucket (buckets: `buckets.py`)."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import torch

from .records import ImageRecord


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one bucket each, over the "expanded" list where every record appears `repeats` times.

    Args:
        records: the scan's records.
        batch_size: images per batch; a bucket's last batch may be smaller (kept, unless `drop_last`).
        seed: with the epoch (`set_epoch`, as DistributedSampler), the only input of the order.
        drop_last: drop each bucket's incomplete last batch.

    An epoch: 1) shuffle the positions within each bucket, 2) cut them into batches, 3) shuffle the batches, so
    consecutive steps mix buckets. The same (seed, epoch) always gives the same batches (exact resume).
    """

    def __init__(self, records: list[ImageRecord], batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last, self.epoch = batch_size, seed, drop_last, 0
        self._expanded = [i for i, record in enumerate(records) for _ in range(record.repeats)]
        self._by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for position, index in enumerate(self._expanded):
            self._by_bucket[records[index].bucket].append(position)

    def expanded(self) -> list[int]:
        """Expanded position -> record index."""
        return list(self._expanded)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(positions) / self.batch_size) for positions in self._by_bucket.values())

    def __iter__(self):
        rng = random.Random(f"sdtune-buckets:{self.seed}:{self.epoch}")  # str seeds are hashed stably (sha512)
        batches = []
        for bucket in sorted(self._by_bucket):
            positions = list(self._by_bucket[bucket])
            rng.shuffle(positions)
            for start in range(0, len(positions), self.batch_size):
                batch = positions[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        yield from batches
