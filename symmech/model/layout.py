"""Linear maps and their weight layouts: ``nn.Linear`` stores W as (out, in), Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2's c_attn, c_proj, c_fc) stores it transposed,
(in, out), and computes ``x @ W + b``. The rules ask here which weight axis reads an input feature
and which one writes an output feature, so both layouts bind the right rows and columns. An
RMSNorm written as a model's own module (:func:`is_rms_norm`) is told apart here too: the graph
keeps it whole like a linear map.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "in_axis",
    "in_features",
    "is_linear",
    "is_rms_norm",
    "is_transposed",
    "out_axis",
    "out_features",
]


def is_transposed(module: nn.Module | None) -> bool:
    """A Hugging Face ``Conv1D``: a linear map whose weight is (in_features, out_features)."""
    cls = type(module)
    # the weight is read from _parameters: under torch.fx tracing, module attribute access of a
    # parameter returns a Proxy
    weight = getattr(module, "__dict__", {}).get("_parameters", {}).get("weight")
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and hasattr(module, "nf")
        and getattr(weight, "ndim", 0) == 2
    )


def is_linear(module: nn.Module | None) -> bool:
    """``nn.Linear`` or a Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def in_features(module: nn.Module) -> int:
    """Size of the input feature axis."""
    return int(module.weight.shape[0 if is_transposed(module) else 1])


def out_features(module: nn.Module) -> int:
    """Size of the output feature axis."""
    return int(module.weight.shape[1 if is_transposed(module) else 0])


def in_axis(module: nn.Module) -> int:
    """The weight axis indexed by the input feature (1 for nn.Linear, 0 for Conv1D)."""
    return 0 if is_transposed(module) else 1


def out_axis(module: nn.Module) -> int:
    """The weight axis indexed by the output feature (0 for nn.Linear, 1 for Conv1D)."""
    return 1 if is_transposed(module) else 0


def is_rms_norm(module: nn.Module | None) -> bool:
    """``nn.RMSNorm``, or a custom RMSNorm like Hugging Face's ``LlamaRMSNorm``: class name
    ending in "RMSNorm", a one-dimensional ``weight`` parameter, a ``variance_epsilon`` or
    ``eps`` attribute."""
    if module is None:
        return False
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return True
    # read from _parameters: under torch.fx tracing, attribute access of a parameter is a Proxy
    weight = getattr(module, "__dict__", {}).get("_parameters", {}).get("weight")
    eps = next(
        (getattr(module, a) for a in ("variance_epsilon", "eps") if hasattr(module, a)), None
    )
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 1
        and isinstance(eps, (int, float))
    )
