"""Quantizers by name: ``QUANTIZERS`` maps a method to the quantizer that marks what an
exported graph computes in int8 (``raycv.quantization`` runs them). Apart from the flow, so
that validating ``compress.quantize`` does not import torchao (1.4 s, inductor with it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from raycv.registry import Registry

if TYPE_CHECKING:
    from torchao.quantization.pt2e.quantizer import Quantizer

# name -> quantizer, for post-training (qat=False) or quantization-aware training (qat=True)
QUANTIZERS: Registry[Callable[[bool], Quantizer]] = Registry("quantizer")


@QUANTIZERS.register("int8")
def x86_int8(qat: bool = False) -> Quantizer:
    """Static int8 for x86 CPUs (oneDNN kernels through inductor): activations uint8 per
    tensor from histograms of the calibration batches (or learnt ranges in QAT), weights
    int8 per output channel (symmetric); conv, linear, pooling and flatten quantized,
    BatchNorm folded."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=qat))
    return quantizer
