"""What a (pruned) model costs: parameters, nonzero parameters, multiply-accumulates and CPU
latency for one image, flattened by ``as_metrics`` into the keys that training reports."""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from raycv.registry import Registry


@dataclass(frozen=True)
class ModelStats:
    params: int  # all parameters
    nonzero_params: int  # parameters not exactly zero: the honest count after unstructured pruning
    macs: int  # multiply-accumulates for one image (bias additions included)
    latency_ms: float  # median CPU wall time of one forward pass
    threads: int  # torch threads the latency was measured with


def measure(
    model: nn.Module,
    image_size: int,
    *,
    latency_batch: int = 1,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> ModelStats:
    """What ``model`` costs for ``image_size`` inputs; latency for ``latency_batch`` images."""
    model = _on_cpu(model)
    return ModelStats(
        params=sum(p.numel() for p in model.parameters()),
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in model.parameters()),
        macs=count_macs(model, image_size),
        latency_ms=latency_ms(model, image_size, latency_batch, threads, repeats, warmup),
        threads=threads,
    )


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one eval-mode forward pass over a square RGB image: torch's
    FLOP counter (convolutions, matrix products, attention) halved, as it counts two FLOPs
    per MAC. torch-pruning's counter agreed within 0.1 % but imports timm and torchvision,
    0.5-0.9 s on the way to every run's first step."""
    model = _on_cpu(model)
    was_training, fast = model.training, torch.backends.mha.get_fastpath_enabled()
    # MultiheadAttention's fused eval kernel is one op the counter does not know; on the
    # plain path it counts the projections and the attention.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as n:
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        model.train(was_training)
    return n.get_total_flops() // 2


def _cpu_attention_flops(query, key, value, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# The counter knows the CUDA attention kernels, not the one attention runs on a CPU.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


# How a model is run while timed: name -> context manager yielding the callable to time.
RUNTIMES: Registry[Callable[[nn.Module], contextlib.AbstractContextManager]] = Registry("runtime")


@RUNTIMES.register("eager")
@contextlib.contextmanager
def _eager(model: nn.Module) -> Iterator[nn.Module]:
    yield model


@RUNTIMES.register("inductor")
@contextlib.contextmanager
def _inductor(model: nn.Module) -> Iterator[Callable]:
    """``torch.compile`` with freezing: weights become constants, BatchNorm folds into the
    convs, and quantized graphs get oneDNN's int8 kernels (without freezing they run their
    quantize/dequantize chains in fp32). The first warm-up call compiles."""
    torch._dynamo.reset()  # each model compiles afresh, never against the recompile limit
    # Inductor logs that a CPU-only machine has no CUDA runtime at every first compile.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            # torchvision's NMS meta kernel (a detector's last step) calls a torch API that
            # is deprecated in 2.14, and warns at every trace: torchvision's to fix, not ours.
            warnings.filterwarnings("ignore", "`create_unbacked_symint` is deprecated")
            yield torch.compile(model)
    finally:
        torch._dynamo.reset()


def latency_ms(
    model: nn.Module,
    image_size: int,
    batch: int = 1,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    runtime: str = "eager",
) -> float:
    """Median CPU wall time, in ms, of one eval-mode forward pass over ``batch`` images, with
    ``threads`` torch threads, run by ``runtime`` (see ``RUNTIMES``). The thread count and
    the model's mode are restored after."""
    timings = interleaved_latency_ms([model], image_size, batch, threads, repeats, warmup, runtime)
    return timings[0].median


@dataclass(frozen=True)
class Timing:
    """One model's forward times, in ms: the median and the quartiles around it."""

    median: float
    q1: float
    q3: float

    def faster_than(self, other: Timing) -> bool:
        """Faster beyond the noise: its slower quarter still beats the other's faster one."""
        return self.q3 < other.q1


def interleaved_latency_ms(
    models: Sequence[nn.Module],
    image_size: int,
    batch: int = 1,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    runtime: str = "eager",
) -> list[Timing]:
    """Each model's CPU time per eval-mode forward pass over ``batch`` images, the models
    taking turns ``repeats`` times (one pass each per turn), so that a busy moment of the
    machine slows all of them alike rather than whichever ran then. All are prepared by
    ``runtime`` first (compiled, for inductor), then warmed up; threads and modes restored."""
    copies = [_on_cpu(m) for m in models]
    example = torch.zeros(batch, 3, image_size, image_size)
    previous_threads, modes = torch.get_num_threads(), [m.training for m in copies]
    torch.set_num_threads(threads)
    samples: list[list[float]] = [[] for _ in copies]
    try:
        # Variants of one class share its forward's code: dynamo keeps one compiled graph per
        # model instance only up to its recompile limit (8), so make room for all of them.
        limit = max(torch._dynamo.config.recompile_limit, 2 * len(copies))
        with (
            torch.inference_mode(),
            torch._dynamo.config.patch(recompile_limit=limit),
            contextlib.ExitStack() as stack,
        ):
            for m in copies:
                m.eval()  # not chained: an exported int8 graph's eval() returns None
            runs = [stack.enter_context(RUNTIMES.get(runtime)(m)) for m in copies]
            for run in runs:
                for _ in range(warmup):
                    run(example)
            for _ in range(repeats):
                for run, times in zip(runs, samples):
                    start = time.perf_counter()
                    run(example)
                    times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(previous_threads)
        for model, mode in zip(copies, modes):
            model.train(mode)
    return [_timing(times) for times in samples]


def _timing(times: list[float]) -> Timing:
    if len(times) < 2:
        return Timing(times[0], times[0], times[0])
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, q1, q3)


def as_metrics(stats: ModelStats) -> dict[str, float | int]:
    """The flat keys reported with every epoch and shown in sweep tables."""
    return {
        "params": stats.params,
        "nonzero_params": stats.nonzero_params,
        "macs": stats.macs,
        "latency_ms": stats.latency_ms,
        "latency_threads": stats.threads,
    }


def _on_cpu(model: nn.Module) -> nn.Module:
    # Costs are CPU costs; a model trained elsewhere is measured on a copy, left in place.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return model if on_cpu else copy.deepcopy(model).cpu()
