"""BeatsModel: equality with the official BEATs code, the token layout, exact padding, and safe checkpoint loading."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, make_waveform
from safetensors.torch import load_file

from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import BeatsModel, relative_position_buckets, token_attention_mask
from processing_audio_qformer import BeatsFeatureExtractor


OFFICIAL_TINY = os.path.join(FIXTURES, "beats_tiny_official.pt")


@pytest.fixture(scope="module")
def reference():
    """Inputs and outputs recorded from the official code (tests/fixtures/make_beats_reference.py)."""
    return load_file(os.path.join(FIXTURES, "beats_tiny_reference.safetensors"))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_matches_official_implementation(reference, attn_implementation):
    model = BeatsModel.from_original_checkpoint(OFFICIAL_TINY)
    assert not model.training and model.config._attn_implementation == "sdpa"  # transformers' default
    model.set_attn_implementation(attn_implementation)
    with torch.inference_mode():
        unmasked = model(reference["input_features"]).last_hidden_state
        outputs = model(reference["input_features"], reference["feature_attention_mask"], output_attentions=True)
    # Only the eager attention returns its weights: each row a distribution, none on padded keys.
    if attn_implementation == "eager":
        assert len(outputs.attentions) == model.config.encoder_layers
        weights = outputs.attentions[-1]
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert weights[1, :, :, 88:].abs().max() < 1e-6
    else:
        assert all(w is None for w in outputs.attentions)
    torch.testing.assert_close(unmasked, reference["official_unmasked"], atol=1e-4, rtol=0)
    # With the exact token mask given to the official encoder, every real token agrees.
    assert torch.equal(outputs.audio_attention_mask, reference["token_attention_mask"])
    real = outputs.audio_attention_mask.bool()
    assert real.sum(-1).tolist() == [144, 88]  # 3 s and 1.875 s: 18 and 11 time patches of 8 tokens
    torch.testing.assert_close(
        outputs.last_hidden_state[real], reference["official_masked"][real], atol=1e-4, rtol=0
    )


def test_relative_position_buckets_known_values():
    # Values of the official bucketing for iter3+ (320 buckets, max distance 800); rows are queries, columns keys.
    buckets = relative_position_buckets(496, num_buckets=320, max_distance=800)
    assert buckets[0, 1] == 161 and buckets[1, 0] == 1  # +1 and -1
    assert buckets[0, 80] == 240  # first logarithmic bucket
    assert buckets[0, 495] == 303 and buckets[495, 0] == 143
    assert buckets[0, 0] == 0
    far = relative_position_buckets(1000, num_buckets=320, max_distance=800)
    assert far[0, 999] == 319 and far[999, 0] == 159  # saturated beyond max_distance


def test_token_layout_is_time_major(tiny_beats_config):
    # Token j covers time patch j // 8 and frequency patch j % 8: perturbing one 16x16 patch changes one token.
    model = BeatsModel(tiny_beats_config).eval()
    captured = []
    model.layer_norm.register_forward_hook(lambda module, args, output: captured.append(output))
    features = torch.randn(1, 64, 128)
    perturbed = features.clone()
    time_patch, frequency_patch = 2, 5
    perturbed[0, 16 * time_patch : 16 * time_patch + 16, 16 * frequency_patch : 16 * frequency_patch + 16] += 1.0
    with torch.inference_mode():
        model(features)
        model(perturbed)
    changed = (captured[0] - captured[1]).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [8 * time_patch + frequency_patch]


def test_output_shapes_and_frames_to_tokens(tiny_beats_config):
    model = BeatsModel(tiny_beats_config).eval()
    extractor = BeatsFeatureExtractor()
    clips = [make_waveform(10.0), make_waveform(0.1)]
    with torch.inference_mode():
        outputs = model(**extractor(clips, sampling_rate=16000, return_tensors="pt"), output_hidden_states=True)
    # 10 s: 998 frames -> 62 time patches -> 496 tokens; 0.1 s is padded to one patch -> 8 tokens.
    assert outputs.last_hidden_state.shape == (2, 496, 32)
    assert outputs.audio_attention_mask.sum(-1).tolist() == [496, 8]
    assert len(outputs.hidden_states) == tiny_beats_config.encoder_layers + 1
    assert torch.isfinite(outputs.last_hidden_state).all()


def test_padded_clip_equals_clip_alone(tiny_beats_config):
    torch.manual_seed(0)
    model = BeatsModel(tiny_beats_config).eval()
    extractor = BeatsFeatureExtractor()
    long_clip, short_clip = make_waveform(4.0, seed=1), make_waveform(2.3, seed=2)
    with torch.inference_mode():
        batch = model(**extractor([long_clip, short_clip], sampling_rate=16000, return_tensors="pt"))
        alone = model(**extractor(short_clip, sampling_rate=16000, return_tensors="pt"))
    real = batch.audio_attention_mask[1].bool()
    assert real.sum() == alone.last_hidden_state.shape[1] == 8 * ((1 + (36800 - 400) // 160) // 16)
    torch.testing.assert_close(batch.last_hidden_state[1, real], alone.last_hidden_state[0], atol=1e-5, rtol=0)
    # Without the mask the padding leaks into the real tokens: the mask is what makes them equal.
    with torch.inference_mode():
        unmasked = model(extractor([long_clip, short_clip], sampling_rate=16000, return_tensors="pt")["input_features"])
    assert (unmasked.last_hidden_state[1, real] - alone.last_hidden_state[0]).abs().max() > 1e-3


def test_token_mask_rule():
    frame_mask = torch.zeros(3, 64, dtype=torch.long)
    frame_mask[0, :64] = 1
    frame_mask[1, :47] = 1  # 2 whole time patches (32 frames); the partial third is padding
    frame_mask[2, :16] = 1
    mask = token_attention_mask(frame_mask, patch_size=16, num_frequency_patches=8, num_time_patches=4)
    assert mask.sum(-1).tolist() == [32, 16, 8]
    assert mask[1, :16].all() and not mask[1, 16:].any()
    with pytest.raises(ValueError, match="trailing"):
        token_attention_mask(torch.tensor([[0, 1, 1]]), patch_size=1, num_frequency_patches=1, num_time_patches=3)


def test_official_iter3_checkpoint_layout_loads(tmp_path):
    """A random state dict with exactly the official iter3+ keys and shapes loads, with nothing left over."""
    layout = json.load(open(os.path.join(FIXTURES, "beats_iter3_official_keys.json")))
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(layout["shapes"]["encoder.layers.0.self_attn.relative_attention_bias.weight"])
    state = {}
    for key, shape in layout["shapes"].items():
        if key.endswith("relative_attention_bias.weight"):
            state[key] = shared  # the official model stores its one shared table under every layer
        elif key.endswith("weight_g"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    path = tmp_path / "BEATs_iter3_plus_AS2M_random.pt"
    torch.save({"cfg": layout["cfg"], "model": state}, path)
    model = BeatsModel.from_original_checkpoint(path)
    assert model.config.deep_norm and model.config.max_distance == 800 and model.config.encoder_layers == 12
    # 90,311,792 official parameters, less the 128 weight-norm gains folded into the positional convolution.
    assert sum(p.numel() for p in model.parameters()) == 90_311_664
    v, g = state["encoder.pos_conv.0.weight_v"], state["encoder.pos_conv.0.weight_g"]
    torch.testing.assert_close(model.encoder.pos_conv.weight, g * v / v.norm(dim=(0, 1), keepdim=True))
    assert torch.equal(model.encoder.relative_attention_bias.weight, shared)


class _CreatesFile:
    """Unpickling this runs code: it creates the file at `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    torch.save({"cfg": {}, "model": {}, "payload": _CreatesFile(str(marker))}, checkpoint)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only"):
        BeatsModel.from_original_checkpoint(checkpoint)
    assert not marker.exists()
    # A plain pickle (not torch's zip format) is refused too.
    with open(tmp_path / "plain.pt", "wb") as handle:
        pickle.dump(_CreatesFile(str(marker)), handle)
    with pytest.raises(ValueError, match="Refused"):
        BeatsModel.from_original_checkpoint(tmp_path / "plain.pt")
    assert not marker.exists()


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No BEATs checkpoint"):
        BeatsModel.from_original_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "no_cfg.pt")
    with pytest.raises(ValueError, match="official BEATs format"):
        BeatsModel.from_original_checkpoint(tmp_path / "no_cfg.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="Refused"):
        BeatsModel.from_original_checkpoint(tmp_path / "corrupt.pt")
    official = torch.load(OFFICIAL_TINY, weights_only=True)
    del official["model"]["encoder.layers.1.fc2.weight"]
    official["model"]["encoder.extra.weight"] = torch.zeros(1)
    torch.save(official, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layers.1.fc2.weight'\].*encoder.extra.weight"):
        BeatsModel.from_original_checkpoint(tmp_path / "incomplete.pt")
    official = torch.load(OFFICIAL_TINY, weights_only=True)
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    official["model"][key] = official["model"][key] + 1.0  # the file stores one shared tensor: copy, then change
    torch.save(official, tmp_path / "unshared.pt")
    with pytest.raises(ValueError, match="shares one relative position table"):
        BeatsModel.from_original_checkpoint(tmp_path / "unshared.pt")


def test_fine_tuned_classifier_is_dropped(tmp_path, reference):
    official = torch.load(OFFICIAL_TINY, weights_only=True)
    official["cfg"]["finetuned_model"] = True
    official["model"]["predictor.weight"] = torch.zeros(527, 32)
    official["model"]["predictor.bias"] = torch.zeros(527)
    official["label_dict"] = {0: "/m/09x0r"}
    torch.save(official, tmp_path / "finetuned.pt")
    model = BeatsModel.from_original_checkpoint(tmp_path / "finetuned.pt")
    with torch.inference_mode():
        outputs = model(reference["input_features"]).last_hidden_state
    torch.testing.assert_close(outputs, reference["official_unmasked"], atol=1e-4, rtol=0)


def test_conversion_script_round_trip(tmp_path, reference):
    output_dir = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "convert_beats_checkpoint.py"), "--checkpoint", OFFICIAL_TINY,
         "--output_dir", str(output_dir)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (output_dir / "model.safetensors").exists() and (output_dir / "preprocessor_config.json").exists()
    model = BeatsModel.from_pretrained(output_dir).eval()
    with torch.inference_mode():
        outputs = model(reference["input_features"], reference["feature_attention_mask"])
    real = outputs.audio_attention_mask.bool()
    torch.testing.assert_close(outputs.last_hidden_state[real], reference["official_masked"][real], atol=1e-4, rtol=0)
    assert BeatsFeatureExtractor.from_pretrained(output_dir).feature_size == 128


def test_from_pretrained_round_trip_and_init(tmp_path, tiny_beats_config):
    model = BeatsModel(tiny_beats_config).eval()
    # The official initialisation: grep_a starts at one, DeepNorm-scaled value projections.
    assert torch.equal(model.encoder.layers[0].self_attn.grep_a, torch.ones(1, 4, 1, 1))
    beta = (8 * tiny_beats_config.encoder_layers) ** -0.25
    v_std = model.encoder.layers[0].self_attn.v_proj.weight.std().item()
    assert abs(v_std - beta * (2 / (32 + 32)) ** 0.5) < 0.3 * v_std
    model.save_pretrained(tmp_path)
    reloaded = BeatsModel.from_pretrained(tmp_path).eval()
    features = torch.randn(2, 48, 128)
    with torch.inference_mode():
        torch.testing.assert_close(model(features).last_hidden_state, reloaded(features).last_hidden_state)


def test_config_validation_and_official_names():
    config = BeatsConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.deep_norm and config.gru_rel_pos and config.max_distance == 800
    with pytest.raises(Exception, match="post-LayerNorm"):
        BeatsConfig(layer_norm_first=True)
    with pytest.raises(Exception, match="divisible"):
        BeatsConfig(encoder_embed_dim=100, encoder_attention_heads=12)
    with pytest.raises(Exception, match="activation_fn"):
        BeatsConfig(activation_fn="swish")


def test_short_input_raises(tiny_beats_config):
    model = BeatsModel(tiny_beats_config).eval()
    with pytest.raises(ValueError, match="at least 16 frames"):
        model(torch.zeros(1, 10, 128))
