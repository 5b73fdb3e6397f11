"""The training loader: an endless, sharded, resumable walk over the training pairs."""
from __future__ import annotations

import math
import random
import signal
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from brainpaint.data.slices import SliceDataset, _stable_seed
from brainpaint.io.brats import CaseError


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process.

    Schedulers (SLURM, Kubernetes, `kill -- -PGID`) signal the whole process group; a worker
    dying of that signal would crash the main process before it writes its final checkpoint.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainStream(IterableDataset):
    """Endless shuffled stream of training samples, sharded over DDP ranks and loader workers.

    The cases are dealt out once to the shards (rank x worker) with a seed shared by all of
    them; each epoch a shard walks its own cases in a new order, in groups that fit the volume
    cache, shuffling the pairs within a group. Every volume is thus decoded by a single worker,
    at most once per epoch, and only once per run when the shard's cases fit in its cache. With fewer cases than shards, the pairs themselves are dealt out instead.
    The stream never ends: training is counted in steps, and ranks never run out unevenly.

    `skip` batches of `batch_size` samples are passed over first (without decoding anything):
    a resumed run continues the stream of the uninterrupted one. With loader workers, batch j
    of a rank comes from worker j % workers, so each worker skips its own share.
    """

    def __init__(
        self, dataset: SliceDataset, seed: int = 0, rank: int = 0, world_size: int = 1, skip: int = 0, batch_size: int = 1
    ):
        if not len(dataset):
            raise ValueError("no training slices: no usable case has a non-empty mask")
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.skip = skip
        self.batch_size = batch_size

    def _shard(self) -> tuple[int, int, int]:
        """(this loader shard, number of shards, samples this shard skips)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        skipped_batches = len(range(worker, self.skip, workers))
        return self.rank * workers + worker, self.world_size * workers, skipped_batches * self.batch_size

    def shard_pairs(self, epoch: int, shard: int, n_shards: int) -> list[list[tuple[int, int]]]:
        """The groups of pairs one shard visits in one epoch (each group fits the cache)."""
        ds = self.dataset
        order = list(range(len(ds.cases)))
        # Cases are dealt to shards once (not per epoch): a shard whose cases all fit in its
        # cache then decodes each of them only once for the whole run.
        random.Random(_stable_seed(self.seed, "deal")).shuffle(order)
        by_case: dict[int, list[tuple[int, int]]] = {}
        for pair in ds.pairs:
            by_case.setdefault(ds.units[pair[0]].case_index, []).append(pair)
        order = [c for c in order if c in by_case]
        local = random.Random(_stable_seed(self.seed, "shard", shard, epoch))
        if len(order) >= n_shards:
            mine = order[shard::n_shards]
            local.shuffle(mine)
            units_per_case = max(1, math.ceil(len(ds.units) / max(1, len(by_case))))
            per_group = max(1, ds.cfg.data.cache_volumes // units_per_case)
            groups = []
            for i in range(0, len(mine), per_group):
                group = [p for c in mine[i : i + per_group] for p in by_case[c]]
                local.shuffle(group)
                groups.append(group)
            return groups
        pairs = [p for c in order for p in by_case[c]]
        random.Random(_stable_seed(self.seed, "pairs", epoch)).shuffle(pairs)
        mine = pairs[shard::n_shards] or [pairs[shard % len(pairs)]]
        return [mine]

    def __iter__(self) -> Iterator[dict]:
        shard, n_shards, skip = self._shard()
        ds = self.dataset
        epoch = 0
        while True:
            aug = random.Random(_stable_seed(self.seed, "augment", shard, epoch))
            produced = 0
            for group in self.shard_pairs(epoch, shard, n_shards):
                for pair in group:
                    if pair[0] in ds._bad_units:
                        continue
                    if skip:
                        ds.skip_sample(aug)
                        skip -= 1
                        produced += 1
                        continue
                    try:
                        yield ds.sample(pair, aug)
                    except CaseError as exc:
                        ds._bad_units.add(pair[0])
                        ds.log(f"warning: skipping {exc}")
                        continue
                    produced += 1
            if produced == 0:
                raise RuntimeError("every training case assigned to this loader failed to load")
            epoch += 1


def train_loader(dataset: SliceDataset, tc, workers: int, dist, step: int, device) -> DataLoader:
    """The training data stream of this rank, past the batches `step` steps have used."""
    stream = TrainStream(dataset, seed=tc.seed * 1000003, rank=dist.rank, world_size=dist.world_size, skip=step,
                         batch_size=tc.batch_size)
    return DataLoader(
        stream,
        batch_size=tc.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
