"""The order training images are read in, and fair samples of them.

Each epoch reads the whole training split in a fresh permutation of the cached rows,
drawn from ``(seed, epoch)`` alone, before the stream is split across workers: classes
are mixed in every batch on every worker whatever order the source listed its files in,
and a resumed run (or a worker group restarted from a checkpoint) reads the order the
uninterrupted run would have read. Why a shuffled index over the cache and not Ray
Data's ``random_shuffle``: it costs a gather of the epoch's rows instead of an
all-to-all exchange (measured in docs/benchmarks.md), and ``random_shuffle`` reseeds by
Ray's private count of executions, which starts again at 0 after a restart or --resume.

The epoch reaches the pipeline through an ``EpochClock`` actor: rank 0 sets it before
any worker starts reading the epoch (a barrier follows), and every chunk of the stream
reads it when it is gathered."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHUNK = 64  # rows gathered per Ray Data task, then augmented as one batch


@functools.lru_cache(maxsize=2)  # every chunk of an epoch needs it: draw it once per process
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of the ``n`` cached rows that epoch ``epoch`` reads."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.setflags(write=False)  # shared by every caller through the cache
    return order


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch the training stream is reading; set by rank 0 before each epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


@dataclass(frozen=True)
class CachedRows:
    """A source's decoded rows as NumPy blocks in the object store, addressable by row."""

    blocks: list  # ObjectRefs of {"image": uint8 (n, W, W, 3), "label": int64 (n,), ...}
    starts: np.ndarray  # the row number each block starts at
    labels: np.ndarray  # every row's label, in row order (for stratified draws); all 0
    # for rows without one (segmentation): a single stratum, so draws are uniform
    labelled: bool = True

    @classmethod
    def of(cls, ds: ray.data.Dataset) -> CachedRows:
        blocks = ds.to_numpy_refs()
        labels = ray.get([_labels.remote(b) for b in blocks])
        sizes = [len(lab) for lab in labels]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        labelled = "label" in ds.schema().names
        return cls(blocks, starts, np.concatenate(labels).astype(np.int64), labelled)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``rows``, in that order, with every cached column, and each row's
        number (``row``: which image a batch holds, e.g. to check an epoch's order)."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        needed = np.unique(which)
        got = dict(zip(needed, ray.get([self.blocks[i] for i in needed])))
        at = [(got[b], r - self.starts[b]) for b, r in zip(which, rows)]
        columns = [c for c in got[needed[0]] if c != "label"]
        picked = {c: np.stack([block[c][i] for block, i in at]) for c in columns}
        labels = {"label": self.labels[rows]} if self.labelled else {}
        return {**picked, **labels, "row": rows}

    def rows_dataset(self, rows: np.ndarray) -> ray.data.Dataset:
        """A fixed selection of rows, read in chunks in the given order."""
        chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
        ds = ray.data.range(len(chunks), override_num_blocks=max(1, len(chunks)))
        return _gathered(ds, _GatherFixed(self, chunks))


@ray.remote(num_cpus=0)
def _labels(block: dict[str, np.ndarray]) -> np.ndarray:
    return block["label"] if "label" in block else np.zeros(len(block["image"]), np.int64)


@dataclass(frozen=True)
class _GatherEpoch:
    """Ray Data batch function: chunk numbers -> that chunk of the current epoch's order."""

    rows: CachedRows
    clock: ray.actor.ActorHandle
    seed: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = ray.get(self.clock.get.remote())
        order = epoch_order(self.seed, epoch, len(self.rows))
        picked = np.concatenate([order[c * CHUNK : (c + 1) * CHUNK] for c in batch["id"]])
        return self.rows.gather(picked)


@dataclass(frozen=True)
class _GatherFixed:
    rows: CachedRows
    chunks: list[np.ndarray]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.rows.gather(np.concatenate([self.chunks[c] for c in batch["id"]]))


def epoch_stream(rows: CachedRows, seed: int) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """The training rows in each epoch's order, and the clock that names the epoch."""
    # On the driver's node: a clock on a worker node would die with it, and the run with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    clock = EpochClock.options(scheduling_strategy=here).remote()
    chunks = math.ceil(len(rows) / CHUNK)
    ds = ray.data.range(chunks, override_num_blocks=chunks)
    return _gathered(ds, _GatherEpoch(rows, clock, seed)), clock


def _gathered(chunks: ray.data.Dataset, gather) -> ray.data.Dataset:
    # batch_size=None (here and in whatever maps the result): each one-row block of chunk
    # numbers is its own task. With a batch size Ray Data bundles the tiny blocks into as few
    # tasks as fill it, and one core gathers and augments the whole epoch.
    return chunks.map_batches(gather, batch_size=None, batch_format="numpy")


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` random row numbers, each class's share in proportion to its size and
    every class represented when ``count`` allows (largest remainders get the rest);
    all rows, shuffled, when ``count`` is not smaller than the split."""
    rng = np.random.default_rng(seed)
    if count >= len(labels):
        return rng.permutation(len(labels))
    classes, sizes = np.unique(labels, return_counts=True)
    share = sizes * count / len(labels)
    take = np.floor(share).astype(int)
    if count >= len(classes):
        take = np.maximum(take, 1)
    for i in np.argsort(take - share, kind="stable"):  # most short-changed first
        if take.sum() >= count:
            break
        take[i] += 1
    while take.sum() > count:  # the minimum of one overshot: trim the largest shares
        take[np.argmax(take)] -= 1
    picked = [
        rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)
    ]
    return rng.permutation(np.concatenate(picked))
