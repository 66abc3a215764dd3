"""Kernels. `mxfp4_cpu` / `dense_cpu`: XLA FFI custom calls of one shared library for x86-64 CPUs (the fused MXFP4
dequantize-matmul, the bf16-weight matmul for decode-sized projections); `mxfp4_pallas` / `attention_pallas`: Pallas
kernels for GPUs (MXFP4 experts, flash attention with sinks); `select`: the `kernels` option."""

from gptoss.kernels.attention_pallas import flash_attend_pallas
from gptoss.kernels.mxfp4_cpu import kernel_available, load_error, mx_gather_matmul
from gptoss.kernels.mxfp4_pallas import mx_gather_pallas, mx_grouped_pallas
from gptoss.kernels.select import (
                                   KERNELS,
                                   KernelUnavailableWarning,
                                   check_kernels,
                                   cpu_kernels,
                                   default_kernels,
                                   pallas_kernels,
)

__all__ = ["KERNELS", "KernelUnavailableWarning", "check_kernels", "cpu_kernels", "default_kernels",
           "flash_attend_pallas", "kernel_available", "load_error", "mx_gather_matmul", "mx_gather_pallas",
           "mx_grouped_pallas", "pallas_kernels"]
