"""fp8flow: FP8-Flow-MoE training as a torch.compile backend."""

from . import kernels  # noqa: F401  (registers torch.ops.fp8flow.*)
from .errors import Fp8Unsupported
from .recipe import BLOCKWISE, DEFAULT, Recipe

__all__ = ["BLOCKWISE", "DEFAULT", "Fp8Unsupported", "Recipe"]
__version__ = "0.1.0"
