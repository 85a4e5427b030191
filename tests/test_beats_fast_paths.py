"""Speed work on BEATs and its fbank: the exact paths give what they gave before; the CPU copies (`beats_cpu`) stay close."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, make_waveform
from references import randomize_beats_parameters
from transformers.audio_utils import spectrogram
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from audio_qformer import beats_cpu
from audio_qformer.beats_cpu import (
    DynamicInt8Linear,
    FftConv1d,
    OneDnnLinear,
    _onednn_linear,
    bfloat16_products_attention,
    choose_fast_precision,
    cpu_copy,
    int8_available,
    keep_freed_memory,  # the function itself: the tests' autouse fixture replaces the module's attribute
)
from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import BeatsModel
from processing_audio_qformer import KALDI_LOG_FLOOR, BeatsFeatureExtractor


# Moderately sized: wide and deep enough for bfloat16 rounding to accumulate as in the 768-wide, 12-layer model, small
# enough to run in a few seconds.
MEDIUM_BEATS = dict(
    patch_embed_dim=128,
    encoder_layers=6,
    encoder_embed_dim=256,
    encoder_ffn_embed_dim=1024,
    encoder_attention_heads=4,
    conv_pos=32,
    conv_pos_groups=8,
    encoder_layerdrop=0.0,
)


@pytest.fixture(scope="module")
def medium_model():
    torch.manual_seed(0)
    model = BeatsModel(BeatsConfig(**MEDIUM_BEATS)).eval()
    return randomize_beats_parameters(model)


@pytest.fixture(scope="module")
def padded_inputs():
    extractor = BeatsFeatureExtractor()
    clips = [make_waveform(2.5, seed=1), make_waveform(1.3, seed=2, kind="chirp")]
    return extractor(clips, sampling_rate=16000, return_tensors="pt")


def test_exact_path_same_with_and_without_autograd(tiny_beats_config, padded_inputs):
    # Without autograd the encoder writes every layer's attention bias into one buffer; with it, fresh tensors (and
    # SDPA may pick another kernel, hence the tolerance).
    torch.manual_seed(0)
    model = BeatsModel(tiny_beats_config).eval()
    with torch.inference_mode():
        buffered = model(**padded_inputs).last_hidden_state
        unmasked = model(padded_inputs["input_features"]).last_hidden_state
    with torch.enable_grad():
        fresh = model(**padded_inputs).last_hidden_state
        fresh_unmasked = model(padded_inputs["input_features"]).last_hidden_state
    assert fresh.requires_grad
    torch.testing.assert_close(buffered, fresh.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(unmasked, fresh_unmasked.detach(), atol=1e-5, rtol=0)


def test_mask_without_padding_changes_nothing(tiny_beats_config, padded_inputs):
    torch.manual_seed(0)
    model = BeatsModel(tiny_beats_config).eval()
    features = padded_inputs["input_features"][:1]
    mask = torch.ones(features.shape[:2], dtype=torch.long)
    with torch.inference_mode():
        with_mask = model(features, mask)
        without = model(features)
    assert torch.equal(with_mask.last_hidden_state, without.last_hidden_state)
    assert with_mask.audio_attention_mask.all()


def test_fast_copy_is_close_and_leaves_the_model_exact(medium_model, padded_inputs):
    with torch.inference_mode():
        before = medium_model(**padded_inputs)
    fast, precision = cpu_copy(medium_model, "bfloat16")
    with torch.inference_mode():
        after = medium_model(**padded_inputs)
        quick = fast(**padded_inputs)
    # The original is untouched: float32 weights, its attention, the same output to the bit.
    assert precision == "bfloat16" and medium_model.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in medium_model.parameters())
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    # The copy multiplies in bfloat16 but returns float32 tokens and the same token mask.
    assert fast.encoder.layers[0].fc1.weight.dtype == torch.bfloat16
    assert fast.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert isinstance(fast.encoder.pos_conv, FftConv1d) and fast.encoder.pos_conv.weight.dtype == torch.float32
    assert fast.patch_embedding.weight.dtype == fast.encoder.layers[0].final_layer_norm.weight.dtype == torch.float32
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert quick.last_hidden_state.dtype == torch.float32
    assert torch.equal(quick.audio_attention_mask, before.audio_attention_mask)
    real = before.audio_attention_mask.bool()
    cosine = F.cosine_similarity(quick.last_hidden_state[real], before.last_hidden_state[real], dim=-1)
    print(f"fast copy token 1 - cosine: max {1 - cosine.min():.2e}, mean {1 - cosine.mean():.2e}")
    assert cosine.min() >= 0.999, cosine.min()
    # bfloat16 does change the numbers: the copy is a different path, not the exact one under another name.
    assert (quick.last_hidden_state - before.last_hidden_state).abs().max() > 1e-4


def test_float32_copy_equals_the_model(medium_model, padded_inputs):
    exact, precision = cpu_copy(medium_model, "float32")
    assert precision == "float32" and isinstance(exact.encoder.layers[0].fc1, OneDnnLinear)
    assert isinstance(exact.encoder.pos_conv, FftConv1d)
    with torch.inference_mode():
        reference = medium_model(**padded_inputs).last_hidden_state
        ours = exact(**padded_inputs).last_hidden_state
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)  # float32 rounding of another kernel


def test_float32_copy_fuses_gelu_only_with_avx512(medium_model, padded_inputs, monkeypatch):
    # oneDNN's GELU post-op pays only where it has AVX-512; with AVX2 alone fc1 is followed by ATen's GELU: same numbers.
    copies = {}
    for flags in ({"avx2", "fma", "avx512f"}, {"avx2", "fma"}):
        monkeypatch.setattr(beats_cpu, "cpu_flags", lambda flags=flags: flags)
        copies["avx512f" in flags], _ = cpu_copy(medium_model, "float32")
    fused, unfused = copies[True].encoder.layers[0], copies[False].encoder.layers[0]
    assert fused.fc1.gelu and isinstance(fused.activation, torch.nn.Identity)
    assert not unfused.fc1.gelu and not isinstance(unfused.activation, torch.nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(copies[False](**padded_inputs).last_hidden_state,
                                   copies[True](**padded_inputs).last_hidden_state, atol=1e-5, rtol=0)  # fmt: skip


needs_int8 = pytest.mark.skipif(not int8_available(), reason="no fbgemm dynamic int8 linear in this torch build")


@needs_int8
def test_int8_copy_is_close_and_leaves_the_model_exact(medium_model, padded_inputs):
    with torch.inference_mode():
        before = medium_model(**padded_inputs)
    fast, precision = cpu_copy(medium_model, "int8")
    with torch.inference_mode():
        after = medium_model(**padded_inputs)
        quick = fast(**padded_inputs)
    assert precision == "int8" and torch.equal(before.last_hidden_state, after.last_hidden_state)
    # The transformer layers' projections multiply in int8; the position gates, the patch embedding, the positional
    # convolution and the norms stay float32, as does everything the model reads dtypes from.
    layer = fast.encoder.layers[0]
    assert isinstance(layer.fc1, DynamicInt8Linear) and isinstance(layer.self_attn.q_proj, DynamicInt8Linear)
    assert isinstance(layer.self_attn.grep_linear, OneDnnLinear)
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert quick.last_hidden_state.dtype == torch.float32
    assert torch.equal(quick.audio_attention_mask, before.audio_attention_mask)
    real = before.audio_attention_mask.bool()
    cosine = F.cosine_similarity(quick.last_hidden_state[real], before.last_hidden_state[real], dim=-1)
    print(f"int8 copy token 1 - cosine: max {1 - cosine.min():.2e}, mean {1 - cosine.mean():.2e}")
    assert cosine.min() >= 0.9999, cosine.min()  # measured 1 - cosine: 1.4e-5 here
    assert (quick.last_hidden_state - before.last_hidden_state).abs().max() > 1e-4  # not the exact path renamed


@needs_int8
def test_int8_linear_is_close_to_f_linear_and_survives_copies():
    import copy
    import pickle

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 96)
    linear = DynamicInt8Linear.from_linear(plain)
    x = torch.randn(2, 7, 64)
    with torch.inference_mode():
        output = linear(x)
        reference = F.linear(x, plain.weight, plain.bias)
        # int8 weights per output channel and 7-bit inputs per call: errors of ~1% of the output's scale
        assert (output - reference).abs().max() < 0.03 * reference.abs().max()
        assert not torch.equal(output, reference)
        assert torch.equal(copy.deepcopy(linear)(x), output)
        assert torch.equal(pickle.loads(pickle.dumps(linear))(x), output)
        linear.weight.mul_(2.0)  # a changed weight is quantized again rather than served stale
        torch.testing.assert_close(linear(x) - linear.bias, 2 * (output - linear.bias), atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # autograd takes F.linear on the float32 weight
        assert DynamicInt8Linear.from_linear(plain).requires_grad_()(x).grad_fn is not None


@pytest.mark.parametrize(
    "flags, speedup, expected",
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, {"bfloat16": 4.0, "int8": 4.0}, "bfloat16"),
        ({"avx2", "fma", "amx_bf16", "amx_tile"}, {"bfloat16": 7.5, "int8": 2.7}, "bfloat16"),  # a Xeon with AMX
        ({"avx2", "fma", "avx512_bf16"}, {"bfloat16": 2.2, "int8": 3.1}, "int8"),  # a Zen 4: int8 measured faster
        ({"avx2", "fma", "avx512_bf16"}, {"bfloat16": 2.9, "int8": 3.1}, "bfloat16"),  # within 10%: bfloat16
        ({"avx2", "fma"}, {"int8": 1.8}, "int8"),  # an AVX2-only CPU
        ({"avx2", "fma", "avx512f", "avx512_vnni"}, {"int8": 2.5}, "int8"),  # AVX-512 without bfloat16 units
        ({"sse4_2"}, {"bfloat16": 4.0, "int8": 4.0}, "float32"),  # nothing to multiply faster with
    ],
)
def test_fast_copy_chooses_its_precision_from_the_cpu(medium_model, monkeypatch, flags, speedup, expected):
    monkeypatch.setattr(beats_cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(beats_cpu, "int8_available", lambda: True)
    monkeypatch.setattr(beats_cpu, "product_speedup", lambda precision, *shape: speedup[precision])
    precision, reason = choose_fast_precision(768, 3072)
    assert precision == expected, reason
    if expected != "float32":
        assert f"{expected} {speedup[expected]:.2f}x" in reason
    if expected != "int8" or int8_available():  # building an int8 copy needs fbgemm for real
        fast, used = cpu_copy(medium_model, "fast")
        assert used == expected
        assert isinstance(fast.encoder.layers[0].fc1, DynamicInt8Linear if expected == "int8" else OneDnnLinear)
    with pytest.raises(ValueError, match="precision"):
        cpu_copy(medium_model, "int4")


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "avx512_bf16"}])
def test_fast_copy_falls_back_to_float32_when_measured_slower(medium_model, monkeypatch, flags):
    # A candidate that measured slower than float32 here (say a CPU whose int8 products are emulated) is dropped,
    # and the warning says so.
    monkeypatch.setattr(beats_cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(beats_cpu, "int8_available", lambda: True)
    monkeypatch.setattr(beats_cpu, "product_speedup", lambda precision, *shape: 0.9)
    with CaptureLogger(logging.get_logger("audio_qformer.beats_cpu")) as captured:
        fast, precision = cpu_copy(medium_model, "fast")
    assert precision == "float32" and fast.encoder.layers[0].fc1.weight.dtype == torch.float32
    assert "exact float32 path" in captured.out and "0.90x float32's speed" in captured.out, captured.out


def test_product_speedup_measures_here():
    # A real measurement (tiny: a few milliseconds): a positive ratio, 0.0 only where the precision fails.
    for precision in ["bfloat16"] + (["int8"] if int8_available() else []):
        assert beats_cpu.product_speedup(precision, 64, 128, rows=32, repeats=2) > 0.0


def test_fast_copy_survives_copying_and_pickling(medium_model, padded_inputs):
    # The copy's linear layers keep oneDNN's packed weights, opaque tensors that cannot be copied: copies rebuild them.
    import copy
    import pickle

    fast, _ = cpu_copy(medium_model, "bfloat16")
    with torch.inference_mode():
        first = fast(**padded_inputs).last_hidden_state
        copied = copy.deepcopy(fast)
        unpickled = pickle.loads(pickle.dumps(fast))
        assert torch.equal(copied(**padded_inputs).last_hidden_state, first)
        assert torch.equal(unpickled(**padded_inputs).last_hidden_state, first)
        # A changed weight is packed again rather than served stale.
        fc1 = fast.encoder.layers[0].fc1
        fc1.weight.mul_(0.5)
        assert not torch.equal(fast(**padded_inputs).last_hidden_state, first)
        fc1.weight.mul_(2.0)  # exact in bfloat16 (a power of two)
        assert torch.equal(fast(**padded_inputs).last_hidden_state, first)


@pytest.mark.parametrize(
    "channels, groups, kernel, padding, length, batch, bias",
    [
        (768, 16, 128, 64, 496, 2, True),  # BEATs' positional convolution on a 10 s clip: 4 blocks
        (768, 16, 128, 64, 3000, 1, True),  # 60 s: 24 blocks
        (64, 8, 32, 16, 7, 3, True),  # shorter than the kernel, within one block
        (12, 3, 5, 2, 40, 1, False),  # odd kernel, no bias
        (16, 16, 3, 0, 10, 2, True),  # depthwise, no padding
        (8, 1, 4, 3, 100, 2, True),  # one group, padding other than kernel // 2
    ],
)
def test_fft_conv1d_equals_the_convolution(channels, groups, kernel, padding, length, batch, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(channels, channels, kernel, padding=padding, groups=groups, bias=bias)
    x = torch.randn(batch, channels, length)
    fft_conv = FftConv1d.from_conv(conv)
    with torch.inference_mode():
        reference, output = conv(x), fft_conv(x)
    assert output.shape == reference.shape
    # float32 rounding of another algorithm: measured at most 5e-7 of the largest output
    torch.testing.assert_close(output, reference, atol=2e-6 * reference.abs().max().item(), rtol=0)
    assert fft_conv.state_dict().keys() == conv.state_dict().keys()


def test_fft_conv1d_falls_back_and_repacks():
    import copy
    import pickle

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 8, 4, padding=2, groups=2)
    fft_conv = FftConv1d.from_conv(conv)
    x = torch.randn(2, 8, 30)
    with torch.inference_mode():
        output = fft_conv(x)
        assert torch.equal(copy.deepcopy(fft_conv)(x), output)
        assert torch.equal(pickle.loads(pickle.dumps(fft_conv))(x), output)
        fft_conv.weight.mul_(2.0)  # a changed weight gets new spectra rather than stale ones
        torch.testing.assert_close(fft_conv(x) - fft_conv.bias[:, None], 2 * (output - fft_conv.bias[:, None]))
        fft_conv.weight.mul_(0.5)
        strided = FftConv1d.from_conv(torch.nn.Conv1d(8, 8, 4, stride=2, groups=2))  # not what the FFT path does
        assert torch.equal(strided(x), F.conv1d(x, strided.weight, strided.bias, stride=2, groups=2))
        with pytest.raises(RuntimeError):  # shorter than the kernel without padding: the convolution's own error
            FftConv1d.from_conv(torch.nn.Conv1d(8, 8, 4, groups=2))(x[..., :2])
    with torch.enable_grad():  # autograd takes the convolution itself
        trained = FftConv1d.from_conv(conv).requires_grad_()
        trained(x).sum().backward()
        assert trained.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_equals_f_linear(dtype):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 96)
    linear, fused = OneDnnLinear.from_linear(plain, dtype), OneDnnLinear.from_linear(plain, dtype, gelu=True)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        output, activated = linear(x), fused(x)
    reference = F.linear(x.to(dtype), linear.weight, linear.bias).float()
    tolerance = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)  # bfloat16 rounding
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), reference, **tolerance)
    torch.testing.assert_close(activated.float(), F.gelu(reference), **tolerance)  # exact (erf) GELU, not tanh
    if dtype == torch.bfloat16 and _onednn_linear(dtype) is not None:
        assert linear.__dict__.get("_packed_weight") is not None  # the oneDNN path ran, with the packed weight
    with torch.enable_grad():  # autograd takes F.linear
        assert OneDnnLinear.from_linear(plain, dtype).requires_grad_()(x).grad_fn is not None


@pytest.mark.parametrize("bias", ["none", "broadcast", "full", "scratch"])
def test_bfloat16_products_attention_equals_sdpa(bias):
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    attn_bias = {"none": None, "broadcast": torch.randn(1, 3, 7, 5), "full": torch.randn(2, 3, 7, 5),
                 "scratch": torch.randn(2, 3, 7, 5)}[bias]  # fmt: skip
    original = None if attn_bias is None else attn_bias.clone()
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias).transpose(1, 2)
    ours, weights = bfloat16_products_attention(None, query, key, value, attn_bias, scaling=16**-0.5,
                                                attention_mask_is_scratch=bias in ("scratch", "broadcast"))  # fmt: skip
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)  # in float32 it is exact attention
    assert weights is None
    if bias == "scratch":  # the layer's own buffer now holds the scores
        assert not torch.equal(attn_bias, original)
    elif attn_bias is not None:  # anything else is left alone (a broadcast bias is never written over)
        assert torch.equal(attn_bias, original)


@pytest.mark.parametrize("kind", ["mix", "chirp", "quiet"])
def test_vectorised_fbank_equals_transformers_spectrogram(kind):
    # The extractor computed its fbank with transformers' `spectrogram` (one FFT per frame) before it was vectorised.
    extractor = BeatsFeatureExtractor()
    waveform = make_waveform(2.0, seed=4, kind=kind)
    reference = spectrogram(
        waveform.astype(np.float64) * extractor.waveform_scale,
        extractor.window,
        frame_length=extractor.frame_length,
        hop_length=extractor.hop_length,
        fft_length=extractor.fft_length,
        power=2.0,
        center=False,
        preemphasis=extractor.preemphasis,
        mel_filters=extractor.mel_filters,
        mel_floor=KALDI_LOG_FLOOR,
        log_mel="log",
        remove_dc_offset=True,
    ).T
    reference = ((reference - extractor.fbank_mean) / (2 * extractor.fbank_std)).astype(np.float32)
    ours = extractor(waveform, sampling_rate=16000, return_tensors="np")["input_features"][0]
    assert ours.shape == reference.shape == (198, 128)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


KEPT_MEMORY_SCRIPT = """
import ctypes, resource, sys
from audio_qformer import beats_cpu
applied = beats_cpu.keep_freed_memory() if sys.argv[1] == "kept" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 64 * 2**20  # above glibc's largest mmap threshold (32 MB), as BEATs' blocks at batch 8
def block():
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    libc.free(pointer)
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "confstr")
                    or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc only")
def test_keep_freed_memory_reuses_large_blocks():
    # By default glibc maps a 64 MB block afresh on every malloc (one page fault per 4 KiB page when written); kept,
    # the freed block is reused and written without faults. Each side in its own process: the setting is process-wide.
    results = {}
    for side in ("default", "kept"):
        done = subprocess.run([sys.executable, "-c", KEPT_MEMORY_SCRIPT, side], capture_output=True, text=True,
                              cwd=ROOT, check=True)  # fmt: skip
        applied, faults = done.stdout.split()
        results[side] = (applied, float(faults))
    assert results["default"][0] == "False" and results["kept"][0] == "True"
    assert results["default"][1] >= 64 * 2**20 / 2**21  # at least one fault per 2 MiB (huge pages), 4 KiB pages: 16384
    assert results["kept"][1] < 100


def test_keep_freed_memory_changes_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
