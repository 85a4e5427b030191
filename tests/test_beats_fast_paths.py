"""Speed work on BEATs and its fbank: the exact paths give what they gave before; the fast CPU copy stays close."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_waveform
from references import randomize_beats_parameters
from transformers.audio_utils import spectrogram

from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import BeatsModel
from processing_audio_qformer import KALDI_LOG_FLOOR, BeatsFeatureExtractor


# Moderately sized: wide and deep enough for bfloat16 rounding to accumulate as in the 768-wide, 12-layer model, small
# enough to run in a few seconds.
MEDIUM_BEATS = dict(
    embed_dim=128,
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
    assert with_mask.attention_mask.all()


def test_fast_copy_is_close_and_leaves_the_model_exact(medium_model, padded_inputs):
    with torch.inference_mode():
        before = medium_model(**padded_inputs)
    fast = medium_model.quantize_for_cpu()
    with torch.inference_mode():
        after = medium_model(**padded_inputs)
        quick = fast(**padded_inputs)
    # The original is untouched: float32 weights, the same output to the bit.
    assert all(p.dtype == torch.float32 for p in medium_model.parameters())
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    # The copy multiplies in bfloat16 but returns float32 tokens and the same token mask.
    assert fast.encoder.layers[0].fc1.weight.dtype == torch.bfloat16
    assert fast.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert fast.encoder.pos_conv.weight.dtype == torch.bfloat16
    assert fast.patch_embedding.weight.dtype == fast.encoder.layers[0].final_layer_norm.weight.dtype == torch.float32
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert quick.last_hidden_state.dtype == torch.float32
    assert torch.equal(quick.attention_mask, before.attention_mask)
    real = before.attention_mask.bool()
    cosine = F.cosine_similarity(quick.last_hidden_state[real], before.last_hidden_state[real], dim=-1)
    print(f"fast copy token 1 - cosine: max {1 - cosine.min():.2e}, mean {1 - cosine.mean():.2e}")
    assert cosine.min() >= 0.999, cosine.min()
    # bfloat16 does change the numbers: the copy is a different path, not the exact one under another name.
    assert (quick.last_hidden_state - before.last_hidden_state).abs().max() > 1e-4


def test_fast_copy_survives_copying_and_pickling(medium_model, padded_inputs):
    # The copy's linear layers keep oneDNN's packed weights, opaque tensors that cannot be copied: copies rebuild them.
    import copy
    import pickle

    import modeling_audio_qformer

    onednn_before = modeling_audio_qformer._ONEDNN_LINEAR
    fast = medium_model.quantize_for_cpu()
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
    # and none of this made the fast path give up oneDNN (a failure there falls back to F.linear for good)
    assert modeling_audio_qformer._ONEDNN_LINEAR is onednn_before


def test_reduced_precision_linear_equals_f_linear_in_bfloat16():
    import modeling_audio_qformer

    torch.manual_seed(0)
    linear = modeling_audio_qformer._BeatsLinear(64, 96).to(torch.bfloat16)
    linear.__class__ = modeling_audio_qformer._ReducedPrecisionLinear
    x = torch.randn(2, 9, 64)
    with torch.inference_mode():
        output, fused = linear(x), linear.forward_gelu(x)
        reference = F.linear(x.bfloat16(), linear.weight, linear.bias)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), reference.float(), atol=2e-2, rtol=1e-2)  # bfloat16 rounding
    torch.testing.assert_close(fused.float(), F.gelu(reference.float()), atol=2e-2, rtol=1e-2)
    if modeling_audio_qformer._ONEDNN_LINEAR is not None:
        assert linear.__dict__.get("_packed_weight") is not None  # the oneDNN path ran, with the packed weight


@pytest.mark.parametrize("bias", ["none", "broadcast", "full", "overwrite"])
def test_attention_by_products_equals_sdpa(bias):
    from modeling_audio_qformer import attention_by_products

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    attn_bias = {
        "none": None,
        "broadcast": torch.randn(1, 3, 7, 5),
        "full": torch.randn(2, 3, 7, 5),
        "overwrite": torch.randn(2, 3, 7, 5),
    }[bias]
    original = None if attn_bias is None else attn_bias.clone()
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias)
    ours = attention_by_products(query, key, value, attn_bias, overwrite_bias=bias == "overwrite")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    if bias == "overwrite":  # the scratch bias now holds the scores
        assert not torch.equal(attn_bias, original)
    elif attn_bias is not None:  # a bias it may not overwrite is left alone
        assert torch.equal(attn_bias, original)
    with pytest.raises(ValueError, match="overwrite_bias"):
        attention_by_products(query, key, value, torch.zeros(1, 3, 7, 5), overwrite_bias=True)


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


def test_onednn_linear_matches_f_linear():
    import modeling_audio_qformer

    if modeling_audio_qformer._ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN linear; BEATs uses F.linear")
    torch.manual_seed(0)
    linear = modeling_audio_qformer._BeatsLinear(48, 96)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        fast, fused = linear(x), linear.forward_gelu(x)
    reference = F.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, F.gelu(fast), atol=1e-6, rtol=0)  # exact (erf) GELU, not the tanh one
    with torch.enable_grad():  # training keeps F.linear
        assert linear(x).grad_fn is not None
