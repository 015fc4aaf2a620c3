"""The fp8flow op set: each module holds an op's torch reference, its Triton kernel, its launcher
and its `torch.library.custom_op` registration (`torch.ops.fp8flow.<name>`)."""

from . import (  # noqa: F401  (registers the ops)
    gemm,
    groups,
    permute,
    quantize,
    scatter,
    swiglu,
    transpose,
    weight_cache,
)
