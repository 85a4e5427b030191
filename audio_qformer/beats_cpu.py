# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""BEATs on the CPU, faster: converted copies of a loaded `BeatsModel` for inference (indexing a sound library).

    from audio_qformer.beats_cpu import cpu_copy
    fast_beats, precision = cpu_copy(model.audio_model, "fast")   # bfloat16, int8 or float32: see below

This module stays local: it is not saved with models, because it calls oneDNN and fbgemm through private or deprecated
torch ops (`torch.ops.mkldnn`, `torch.ops.quantized`), which the model files that run as Hub remote code must not.
`modeling_audio_qformer.BeatsModel` itself uses public torch only; a copy made here has the same parameters and
modules, some of them replaced:

- in every copy the positional convolution runs through the FFT in float32 (`FftConv1d`: the convolution's outputs up
  to rounding, ~1e-6 relative, 7-10x faster than the direct convolution);
- `"float32"`: every linear layer runs through oneDNN's float32 product instead of `F.linear`'s MKL one (the same
  arithmetic, outputs differing by rounding, ~1e-6), and on CPUs with AVX-512 `fc1` applies the exact GELU as a
  oneDNN post-op (with AVX2 only, ATen's GELU after the product is faster);
- `"bfloat16"`: in the transformer layers the linear layers hold bfloat16 weights (oneDNN's packed layout for the
  products) and the attention runs as two bfloat16 products (`bfloat16_products_attention`); patch embedding,
  positional convolution, residuals and layer norms stay float32, the output is float32;
- `"int8"`: the transformer layers' projections (query, key, value, output, fc1, fc2) multiply in int8 through
  fbgemm (`DynamicInt8Linear`: weights per output channel, inputs quantized per call); the position gates, patch
  embedding, positional convolution, attention, norms and residuals stay float32, and so does the output.

`"fast"` picks by the CPU's flags and a measurement (`choose_fast_precision`): bfloat16 where it has bfloat16 units
(AVX512-BF16 or AMX); int8 with AVX2 and no bfloat16 units (there oneDNN has no bfloat16 product: bfloat16 ran 6-8x
slower than float32 with the CPU capped at AVX2, 11x on a real AVX2-only CPU), or with both where int8's products
measured `INT8_OVER_BFLOAT16` times bfloat16's (AMD Zen 4: AVX512-BF16 at half width, AVX512-VNNI int8); and it keeps
that choice only if its products measured at least `MIN_PRODUCT_SPEEDUP` times float32's on this CPU (one thread, a
few milliseconds, once per process). Otherwise, or without AVX2, the exact float32 copy, with a warning saying why.

`keep_freed_memory()` sets the C allocator up for BEATs' large blocks (process-wide; `audio-qformer index` calls it).

The speed of each copy against the exact one, per CPU, is measured by `benchmarks/beats_speed.py` and recorded in
`benchmarks/RESULTS.md`; the fast copies' Q-Former embeddings stay within a cosine of 0.99999 of the exact ones.
"""
import copy
import ctypes
import functools
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.utils import logging


logger = logging.get_logger(__name__)

PRODUCTS_ATTENTION = "beats_cpu_bfloat16_products"
BFLOAT16_FLAGS = {"avx512_bf16", "amx_bf16"}
# `"fast"` keeps a lower precision only if BEATs' largest product (fc1's shape, one 10 s clip: 496 tokens) ran at
# least this much faster in it than in float32 when measured; the products are ~85% of BEATs' time (layer norms,
# attention, convolutions stay as they are), so 1.2x there can never make the whole model slower.
MIN_PRODUCT_SPEEDUP = 1.2
# Where a CPU has both (bfloat16 units and AVX2), int8 must measure this much faster than bfloat16 to be chosen: on a
# Zen 4 its products ran 3.2x float32's against bfloat16's 2.1-2.7x (whole BEATs: 2.1-2.2x against 1.5-1.9x); on a
# Xeon with AMX 2.7x against 7.5x.
INT8_OVER_BFLOAT16 = 1.1
# glibc's `mallopt` parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


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


def keep_freed_memory() -> bool:
    """
    Have the C allocator (glibc) keep freed memory for reuse rather than hand it back to the system: every block from
    the heap (no `mmap`) and the heap never trimmed. Process-wide, so called by the programs that run BEATs on the CPU
    at length (`audio-qformer index`, unless `--release_memory`), never by the model; returns whether it applied
    (glibc only: elsewhere nothing changes).

    Why: at batch 8 BEATs allocates blocks of 48 and 94 MB in every pass (fc1's output and GELU's, 8 x 496 x 3072
    floats; the attention bias, 8 x 12 x 496 x 496), above glibc's largest mmap threshold (32 MB), so each is a fresh
    mapping whose pages are faulted in and zeroed, then unmapped, every layer of every batch (265k-535k page faults
    per pass). Kept instead, on a 2-core Xeon with AMX at batch 8 (`benchmarks/allocator_speed.py`), the exact copy ran
    1.08x as fast, the int8 copy 1.17x, the bfloat16 copy 1.54x (1.04x / 1.11x for exact / int8 with the CPU capped at
    AVX2), with no page faults and the same peak memory; at batch 1, whose blocks glibc already reuses, it changed
    nothing there (0.99-1.01x) but ran 0.92x as fast under the AVX2 cap. The cost: memory freed is not handed back to
    the system until the process exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl also has mallopt, with other parameters
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def int8_available() -> bool:
    """Whether this torch build has fbgemm's dynamic int8 linear (x86 CPUs with AVX2 or better)."""
    if not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines):
        return False
    linear = nn.Linear(4, 2, device="meta")
    linear.weight, linear.bias = nn.Parameter(torch.ones(2, 4)), nn.Parameter(torch.zeros(2))
    try:
        with torch.inference_mode():
            DynamicInt8Linear.from_linear(linear)(torch.ones(1, 4))
    except (RuntimeError, AttributeError) as error:
        logger.warning(f"Dynamic int8 linear unavailable ({error}).")
        return False
    return True


def fast_precision_for(flags: set[str]) -> dict[str, str]:
    """
    The precisions `cpu_copy(..., "fast")` may use on a CPU with these flags, each mapped to why: bfloat16 where products
    run on bfloat16 units; int8 with AVX2 (fbgemm's int8 products; bfloat16 would be emulated there, eleven times
    slower than float32 on an AVX2-only CPU). Empty where neither applies (float32 then).
    """
    candidates = {}
    units = sorted(BFLOAT16_FLAGS & flags)
    if units:
        candidates["bfloat16"] = f"bfloat16 units ({', '.join(units)})"
    if "avx2" in flags and int8_available():
        candidates["int8"] = "int8 products (fbgemm, AVX2 or better)"
    return candidates


@functools.cache
def _onednn_linear(dtype: torch.dtype = torch.float32):
    """
    oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`) if this torch build has one that works in `dtype`, else
    None. In bfloat16 it needs AVX-512 (or AVX-NE-CONVERT): on an AVX2-only CPU oneDNN has no bfloat16 product.
    """
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:  # a private op: its signature may differ between torch builds
        with torch.inference_mode():
            weight, bias = torch.ones(2, 4, dtype=dtype), torch.zeros(2, dtype=dtype)
            op(torch.ones(1, 4, dtype=dtype), weight, bias, "none", [], "")
    except (RuntimeError, TypeError) as error:
        logger.warning(f"oneDNN {dtype} linear unavailable ({error}); the CPU copy uses torch.nn.functional.linear.")
        return None
    return op


class PackedWeight:
    """
    A mixin for a layer that keeps a packed copy of its weight for a CPU library (`_packed(pack)`): built on first use,
    rebuilt when the weight changes, and left out of copies and pickles (it is opaque to both), which build their own.
    """

    def _packed(self, pack):
        # Inference tensors (weights copied under `torch.inference_mode`) keep no version counter.
        key = (self.weight.data_ptr(), None if self.weight.is_inference() else self.weight._version)
        if self.__dict__.get("_packed_key") != key:
            self._packed_weight = pack()
            self._packed_key = key
        return self._packed_weight

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_packed_weight", None)
        state.pop("_packed_key", None)
        return state


class PackedWeightLinear(PackedWeight, nn.Linear):
    """A linear layer with a packed copy of its weight (`PackedWeight`)."""


class OneDnnLinear(PackedWeightLinear):
    """
    A linear layer for CPU inference through oneDNN, in its weight's dtype (float32 or bfloat16): the input is cast
    to it and the output stays in it, so that consecutive products need no casts (a float32 residual promotes the sum
    back). With `gelu`, the exact (erf) GELU is applied by oneDNN as the product is written (the layer's separate
    activation is then an identity). With autograd, on another device or without oneDNN: `F.linear`.

    A bfloat16 weight is also kept in oneDNN's blocked layout (`PackedWeightLinear`): given the plain weight oneDNN
    reorders it in every call (6-10% of BEATs' bfloat16 products).
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
        return self._packed(lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight.detach()))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input.to(self.weight.dtype)
        op = _onednn_linear(self.weight.dtype)
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


class FftConv1d(PackedWeight, nn.Conv1d):
    """
    A 1-d convolution computed through the FFT (overlap-save), for BEATs' positional convolution: the same outputs as
    `nn.Conv1d` up to float32 rounding (relative ~1e-6), 7-10x faster. Why: that convolution (768 channels in 16
    groups, kernel 128) is 4.7 GFLOP per 10 s clip done directly, and oneDNN ran it at 100-125 GFLOP/s (37-45 ms a clip
    on a 2-core Zen 4, capped at AVX2 or not: 8-9% of the int8 copy's time); through the FFT its products are 0.15
    GFLOP.

    The time axis is cut into blocks of `n - kernel + 1` outputs, each read from `n` inputs (`n`, the FFT size: a power
    of two at least twice the kernel); per frequency each group's output is its `(out, in)` matrix of the kernels'
    spectra times the input spectra, one complex product for all blocks and clips. The spectra of the weight are
    packed on first use (`PackedWeight`: 38 MB for BEATs). Stride 1, no dilation, zero padding; with autograd, on
    another device or dtype, or for other settings: `nn.Conv1d`'s own forward.

    The output is `(batch, channels, time)` as a view of a `(batch, time, channels)` tensor: the layout BEATs' residual
    stream has, which the encoder transposes back to.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv1d) -> "FftConv1d":
        """A copy of `conv` (float32 parameters; the spectra are computed on first use)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device="meta")  # fmt: skip
        new.weight = nn.Parameter(conv.weight.detach().float(), requires_grad=False)
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach().float(), requires_grad=False)
        return new

    @property
    def fft_size(self) -> int:
        return 1 << (2 * self.kernel_size[0] - 1).bit_length()

    def _kernel_spectra(self) -> torch.Tensor:
        # conj: a convolution layer correlates (y[t] = sum_k w[k] x[t + k]); the spectrum of that is conj(W) X.
        spectra = torch.fft.rfft(self.weight.detach(), n=self.fft_size).conj()  # (out, in / groups, frequencies)
        per_group = self.out_channels // self.groups
        spectra = spectra.view(self.groups, per_group, spectra.shape[1], spectra.shape[2])
        return spectra.permute(3, 0, 2, 1).contiguous()  # (frequencies, groups, in, out)

    def _supported(self, input: torch.Tensor) -> bool:
        return (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and input.dim() == 3
            and not torch.is_grad_enabled()
            and self.stride == (1,)
            and self.dilation == (1,)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._supported(input):
            return self._conv_forward(input, self.weight, self.bias)
        batch, channels, length = input.shape
        kernel, padding, n = self.kernel_size[0], self.padding[0], self.fft_size
        out_length = length + 2 * padding - kernel + 1
        if out_length < 1:  # shorter than the kernel: let the convolution say so
            return self._conv_forward(input, self.weight, self.bias)
        block = n - kernel + 1  # outputs per block; each block reads n inputs
        blocks = -(-out_length // block)
        padded = input.new_zeros(batch, blocks * block + kernel - 1, channels)  # time first: channels stay contiguous
        padded[:, padding : padding + length] = input.transpose(1, 2)
        segments = padded.unfold(1, n, block).transpose(2, 3)  # (batch, blocks, n, channels), a view
        spectra = torch.fft.rfft(segments, dim=2)  # (batch, blocks, frequencies, channels)
        frequencies, per_group = spectra.shape[2], channels // self.groups
        # (frequencies, groups, batch * blocks, in) @ (frequencies, groups, in, out)
        columns = spectra.view(batch * blocks, frequencies, self.groups, per_group).permute(1, 2, 0, 3)
        products = torch.matmul(columns, self._packed(self._kernel_spectra))
        products = products.permute(2, 0, 1, 3).reshape(batch, blocks, frequencies, self.out_channels)
        output = torch.fft.irfft(products, n=n, dim=2)[:, :, :block]  # the outputs no block boundary wrapped into
        output = output.reshape(batch, blocks * block, self.out_channels)[:, :out_length]
        if self.bias is not None:
            output = output + self.bias
        return output.transpose(1, 2)


class DynamicInt8Linear(PackedWeightLinear):
    """
    A linear layer for CPU inference with int8 products (fbgemm's dynamic quantization): the weight is quantized once
    per output channel (symmetric, to int8), each call quantizes its input per tensor (to 7 bits, so that AVX2's
    16-bit pair sums cannot saturate: the same numbers with and without VNNI), multiplies in int8 with int32 sums and
    returns float32. With autograd, on another device or for another dtype: `F.linear` on the float32 weight.

    The float32 weight stays the parameter (so `weight.dtype` still names the residual stream's dtype); the int8 copy
    is fbgemm's packed weight (`PackedWeightLinear`).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DynamicInt8Linear":
        """A copy of `linear` (float32 parameters; the int8 copy of the weight is packed on first use)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        return new

    def _int8_pack(self):
        weight = self.weight.detach()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros_like(scales, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch, yet fbgemm's packing takes them
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(quantized, None if self.bias is None else self.bias.detach())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or input.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(input, self.weight, self.bias)
        return torch.ops.quantized.linear_dynamic(input, self._packed(self._int8_pack), True)  # True: 7-bit inputs


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


def _linear_copy(linear: nn.Linear, precision: str, gelu: bool = False) -> nn.Linear:
    if precision == "int8":
        return DynamicInt8Linear.from_linear(linear)
    return OneDnnLinear.from_linear(linear, torch.bfloat16 if precision == "bfloat16" else torch.float32, gelu=gelu)


@functools.cache
def product_speedup(precision: str, in_features: int, out_features: int, rows: int = 496, repeats: int = 5) -> float:
    """
    How many times faster a `(rows, in_features) x (in_features, out_features)` product runs in `precision` than in
    float32 here, as this module's linear layers compute them (median of `repeats` interleaved calls each; 0.0 where
    the lower precision fails). Cached per shape.

    Measured on one thread: split over threads, a product waits for the slowest, and on a CPU shared with other jobs
    the ratio swung from 1.2x to 15x for bfloat16 (two threads, a loaded 2-core machine) where one thread gave 6.4-7.0x.
    """
    generator = torch.Generator().manual_seed(0)  # random numbers that leave the caller's generator alone
    linear = nn.Linear(in_features, out_features, device="meta")
    linear.weight = nn.Parameter(torch.randn(out_features, in_features, generator=generator) * in_features**-0.5)
    linear.bias = nn.Parameter(torch.zeros(out_features))
    sides = {name: _linear_copy(linear, name) for name in ("float32", precision)}
    seconds = {name: [] for name in sides}
    input = torch.randn(rows, in_features, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first round warms up (packing, oneDNN's kernel generation)
                for name, side in sides.items():
                    start = time.perf_counter()
                    side(input)
                    seconds[name].append(time.perf_counter() - start)
    except RuntimeError as error:  # e.g. bfloat16 packing where oneDNN finds no bfloat16 support
        logger.warning(f"{precision} products failed here ({error}).")
        return 0.0
    finally:
        torch.set_num_threads(threads)
    return statistics.median(seconds["float32"][1:]) / statistics.median(seconds[precision][1:])


def choose_fast_precision(width: int, ffn_width: int) -> tuple[str, str]:
    """
    The precision of `cpu_copy(..., "fast")` for a BEATs of this width and feed-forward width, and why. The CPU's flags
    name the candidates (`fast_precision_for`); each one's largest product is measured here against float32's
    (`product_speedup`). Where both apply (AVX512-BF16 without AMX, e.g. AMD Zen 4), int8 is taken only if it measured
    `INT8_OVER_BFLOAT16` times bfloat16's speed: bfloat16 tokens are ~20x closer to the exact ones. The choice is kept
    only if it measured at least `MIN_PRODUCT_SPEEDUP` times float32's (so the fast copy never runs slower than the
    exact one), else float32.
    """
    reasons = fast_precision_for(cpu_flags())
    if not reasons:
        return "float32", "neither bfloat16 units (avx512_bf16 or amx_bf16) nor AVX2 for int8 products"
    speedups = {precision: product_speedup(precision, width, ffn_width) for precision in reasons}
    precision = "bfloat16" if "bfloat16" in reasons else "int8"
    if reasons.keys() == {"bfloat16", "int8"} and speedups["int8"] >= INT8_OVER_BFLOAT16 * speedups["bfloat16"]:
        precision = "int8"
    measured = ", ".join(f"{name} {speedups[name]:.2f}x" for name in speedups)
    reason = f"{reasons[precision]}; products measured at {measured} float32's speed here"
    if "bfloat16" not in reasons:
        reason = f"no bfloat16 units (avx512_bf16 or amx_bf16); {reason}"
    if speedups[precision] < MIN_PRODUCT_SPEEDUP:
        return "float32", f"{reason} (< {MIN_PRODUCT_SPEEDUP}x)"
    return precision, reason


def cpu_copy(beats_model, precision: str = "fast"):
    """
    A copy of a `BeatsModel` for CPU inference (eval mode, no gradients) and the precision it runs in; the model
    itself is unchanged (save the model, never the copy).

    Args:
        beats_model: a loaded `BeatsModel` (float32).
        precision: `"float32"` (the exact path through oneDNN), `"bfloat16"`, `"int8"`, or `"fast"`: the fastest of
            these for this CPU (`choose_fast_precision`: bfloat16 with bfloat16 units, else int8 with AVX2, each
            kept only if it measured faster than float32 here; logged).

    Returns:
        `(copy, precision)` with the precision actually used.
    """
    if precision == "fast":
        config = beats_model.config
        precision, reason = choose_fast_precision(config.encoder_embed_dim, config.encoder_ffn_embed_dim)
        if precision == "float32":
            logger.warning(f"BEATs' fast CPU copy runs the exact float32 path: {reason}.")
        else:
            logger.info(f"BEATs' fast CPU copy runs in {precision}: {reason}.")
    if precision not in ("float32", "bfloat16", "int8"):
        raise ValueError(f"precision must be 'fast', 'float32', 'bfloat16' or 'int8'; got {precision!r}.")
    if precision == "int8" and not int8_available():
        raise ValueError("precision 'int8' needs fbgemm's dynamic int8 linear, which this torch build or CPU lacks.")
    # The exact GELU, which oneDNN can apply as fc1 writes its output (fbgemm cannot): fused only with AVX-512. Where
    # oneDNN has AVX2 alone its GELU ran slower than ATen's after the product (CPUs capped at AVX2: Zen 4, the exact copy
    # 1.03-1.04x faster unfused, outputs equal; Xeon, 3.4 against 0.56 ms a layer), uncapped it was even (0.98-1.01x).
    fuse_gelu = beats_model.config.activation_fn == "gelu" and precision != "int8" and "avx512f" in cpu_flags()
    fast = copy.deepcopy(beats_model).eval().requires_grad_(False)
    if fast.post_extract_proj is not None:  # before the layers: float32 in every copy
        fast.post_extract_proj = OneDnnLinear.from_linear(fast.post_extract_proj, torch.float32)
    for layer in fast.encoder.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attention, name, _linear_copy(getattr(attention, name), precision))
        if hasattr(attention, "grep_linear"):  # 8 outputs per head, for the position gates: tiny, kept out of int8
            attention.grep_linear = _linear_copy(attention.grep_linear, "float32" if precision == "int8" else precision)
        layer.fc1 = _linear_copy(layer.fc1, precision, gelu=fuse_gelu)
        if fuse_gelu:
            layer.activation = nn.Identity()
        layer.fc2 = _linear_copy(layer.fc2, precision)
    fast.encoder.pos_conv = FftConv1d.from_conv(fast.encoder.pos_conv)  # float32 in every copy
    if precision == "bfloat16":
        fast.set_attn_implementation(PRODUCTS_ATTENTION)
    return fast, precision


__all__ = [
    "DynamicInt8Linear",
    "FftConv1d",
    "OneDnnLinear",
    "PackedWeight",
    "PackedWeightLinear",
    "bfloat16_products_attention",
    "choose_fast_precision",
    "cpu_copy",
    "cpu_flags",
    "fast_precision_for",
    "int8_available",
    "keep_freed_memory",
    "product_speedup",
]
