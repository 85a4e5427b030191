# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""BEATs on the CPU, faster: converted copies of a loaded `BeatsModel` for inference (indexing a sound library).

    from beats_cpu import cpu_copy
    fast_beats, precision = cpu_copy(model.audio_model, "fast")   # bfloat16 where the CPU has bfloat16 units

This module stays local: it is not saved with models, because it calls oneDNN through private torch ops
(`torch.ops.mkldnn`), which the model files that run as Hub remote code must not. `modeling_audio_qformer.BeatsModel`
itself uses public torch only; a copy made here has the same parameters and modules, some of them replaced:

- `"float32"`: every linear layer runs through oneDNN's float32 product instead of `F.linear`'s MKL one (the same
  arithmetic, outputs differing by rounding, ~1e-6), and `fc1` applies the exact GELU as a oneDNN post-op;
- `"bfloat16"`: in the transformer layers the linear layers and the positional convolution hold bfloat16 weights
  (oneDNN's packed layout for the products) and the attention runs as two bfloat16 products
  (`bfloat16_products_attention`); patch embedding, residuals and layer norms stay float32, the output is float32.

Measured on 2-core CPUs with bfloat16 units (AVX512-BF16 or AMX) the bfloat16 copy ran 2.2-2.7x the official code
and its tokens kept a cosine above 0.99999 to the exact ones (`benchmarks/beats_speed.py`, `benchmarks/RESULTS.md`).
Without such units bfloat16 is emulated and ran eleven times slower than float32 (an AVX2-only CPU), so `"fast"`
takes the float32 copy there and says so.
"""

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.utils import logging


logger = logging.get_logger(__name__)

PRODUCTS_ATTENTION = "beats_cpu_bfloat16_products"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (`/proc/cpuinfo`; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bfloat16_units() -> bool:
    """Whether bfloat16 products run in hardware here (AVX512-BF16 or AMX), rather than emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.cache
def _onednn_linear():
    """oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`) if this torch build has one that works, else None."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:  # a private op: its signature may differ between torch builds
        with torch.inference_mode():
            op(torch.ones(1, 4), torch.ones(2, 4), torch.zeros(2), "none", [], "")
    except (RuntimeError, TypeError) as error:
        logger.warning(f"oneDNN linear unavailable ({error}); the CPU copy uses torch.nn.functional.linear.")
        return None
    return op


class OneDnnLinear(nn.Linear):
    """
    A linear layer for CPU inference through oneDNN, in its weight's dtype (float32 or bfloat16): the input is cast
    to it and the output stays in it, so that consecutive products need no casts (a float32 residual promotes the sum
    back). With `gelu`, the exact (erf) GELU is applied by oneDNN as the product is written (the layer's separate
    activation is then an identity). With autograd, on another device or without oneDNN: `F.linear`.

    A bfloat16 weight is also kept in oneDNN's blocked layout, built on first use and rebuilt when the weight changes:
    given the plain weight oneDNN reorders it in every call (6-10% of BEATs' bfloat16 products). That packed copy is
    opaque and can be neither copied nor pickled, so copies of the module leave it out and build their own.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gelu: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.gelu = gelu

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, gelu: bool = False) -> "OneDnnLinear":
        """A copy of `linear` (its parameters converted to `dtype`)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, gelu=gelu, device="meta")
        new.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return new

    def _weight_for_onednn(self) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16:
            return self.weight
        # Inference tensors (weights copied under `torch.inference_mode`) keep no version counter.
        key = (self.weight.data_ptr(), None if self.weight.is_inference() else self.weight._version)
        if self.__dict__.get("_packed_key") != key:
            self._packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._packed_key = key
        return self._packed_weight

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_packed_weight", None)
        state.pop("_packed_key", None)
        return state

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input.to(self.weight.dtype)
        op = _onednn_linear()
        if (
            op is None
            or input.device.type != "cpu"
            or input.dtype not in (torch.float32, torch.bfloat16)
            or not input.is_contiguous()
            or torch.is_grad_enabled()
        ):
            output = F.linear(input, self.weight, self.bias)
            return F.gelu(output) if self.gelu else output
        # algorithm "none" is the exact (erf) GELU; "tanh" would be the approximation
        post_op, algorithm = ("gelu", "none") if self.gelu else ("none", "")
        return op(input, self._weight_for_onednn(), self.bias, post_op, [], algorithm)


class CastingConv1d(nn.Conv1d):
    """A convolution in its weight's dtype: the input is cast to it (the bfloat16 positional convolution)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, dtype: torch.dtype) -> "CastingConv1d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device="meta")  # fmt: skip
        new.weight = nn.Parameter(conv.weight.detach().to(dtype), requires_grad=False)
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach().to(dtype), requires_grad=False)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input.to(self.weight.dtype), self.weight, self.bias)


def bfloat16_products_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """
    `softmax(query key^T * scaling + attention_mask) value` as two batched products and a softmax in the inputs'
    dtype, registered as a transformers attention implementation. Why: in bfloat16 on the CPU measured, SDPA's flash
    kernel took 5.9 ms per BEATs layer and clip (no faster than float32), these products 3.2 ms. Where BEATs flags
    the mask as its per-layer scratch buffer (`attention_mask_is_scratch`), the scores are written over it, which saves
    allocating and copying 6 MB per layer and clip.
    """
    batch, heads, length, head_dim = query.shape
    key_length = key.shape[-2]
    shape = (batch, heads, length, key_length)
    if kwargs.get("attention_mask_is_scratch") and attention_mask.shape == shape and attention_mask.is_contiguous():
        scores = attention_mask.view(batch * heads, length, key_length)  # BEATs' per-layer buffer: written over
    else:
        scores = query.new_empty((batch * heads, length, key_length))
        if attention_mask is not None:
            scores.view(shape).copy_(attention_mask.expand(shape))
    scores.baddbmm_(
        query.reshape(batch * heads, length, head_dim),
        key.reshape(batch * heads, key_length, head_dim).transpose(1, 2),
        beta=0.0 if attention_mask is None else 1.0,  # beta 0 ignores the uninitialised scores
        alpha=scaling,
    )
    output = torch.bmm(scores.softmax(-1), value.reshape(batch * heads, key_length, head_dim))
    return output.view(batch, heads, length, head_dim).transpose(1, 2), None


AttentionInterface.register(PRODUCTS_ATTENTION, bfloat16_products_attention)


def cpu_copy(beats_model, precision: str = "fast"):
    """
    A copy of a `BeatsModel` for CPU inference (eval mode, no gradients) and the precision it runs in; the model
    itself is unchanged (save the model, never the copy).

    Args:
        beats_model: a loaded `BeatsModel` (float32).
        precision: `"float32"` (the exact path through oneDNN), `"bfloat16"`, or `"fast"`: bfloat16 where the CPU has
            bfloat16 units, else float32 (logged).

    Returns:
        `(copy, precision)` with the precision actually used.
    """
    if precision == "fast":
        precision = "bfloat16" if cpu_has_bfloat16_units() else "float32"
        if precision == "float32":
            logger.warning(
                "This CPU has no bfloat16 units (avx512_bf16 or amx_bf16), where BEATs' bfloat16 copy runs slower "
                "than float32: using the exact float32 path."
            )
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be 'fast', 'float32' or 'bfloat16'; got {precision!r}.")
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    fast = copy.deepcopy(beats_model).eval().requires_grad_(False)
    if fast.post_extract_proj is not None:  # before the layers: float32 in both copies
        fast.post_extract_proj = OneDnnLinear.from_linear(fast.post_extract_proj, torch.float32)
    for layer in fast.encoder.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj", "grep_linear"):
            if hasattr(attention, name):
                setattr(attention, name, OneDnnLinear.from_linear(getattr(attention, name), dtype))
        gelu = fast.config.activation_fn == "gelu"  # the exact GELU, which oneDNN can apply with fc1
        layer.fc1 = OneDnnLinear.from_linear(layer.fc1, dtype, gelu=gelu)
        if gelu:
            layer.activation = nn.Identity()
        layer.fc2 = OneDnnLinear.from_linear(layer.fc2, dtype)
    if precision == "bfloat16":
        fast.encoder.pos_conv = CastingConv1d.from_conv(fast.encoder.pos_conv, dtype)
        fast.set_attn_implementation(PRODUCTS_ATTENTION)
    return fast, precision


__all__ = ["OneDnnLinear", "bfloat16_products_attention", "cpu_copy", "cpu_flags", "cpu_has_bfloat16_units"]
