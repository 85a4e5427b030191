"""What transformers' common model tests ask of BeatsModel and AudioQFormerModel, one test per cause they once failed on.

The common suite itself runs with `python benchmarks/transformers_common_tests.py --transformers_tests PATH`.
"""

import inspect

import pytest
import torch
from conftest import TINY_BEATS, tiny_qformer_config
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import AudioQFormerModel, BeatsModel


def fbank_batch():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 70, 128, generator=generator)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 40:] = 0
    return features, mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return AudioQFormerModel(tiny_qformer_config()).eval()


def text_batch():
    input_ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    return input_ids, torch.ones_like(input_ids)


def test_torch_export_with_a_padding_mask(model):
    """The mask checks that branch on tensor values run in eager mode only, so both models export with a mask."""
    features, mask = fbank_batch()
    beats = model.audio_model
    exported = torch.export.export(beats, (features,), {"feature_attention_mask": mask}).module()
    torch.testing.assert_close(exported(features, feature_attention_mask=mask).last_hidden_state,
                               beats(features, feature_attention_mask=mask).last_hidden_state)  # fmt: skip
    input_ids, attention_mask = text_batch()
    inputs = {"attention_mask": attention_mask, "input_features": features, "feature_attention_mask": mask}
    exported = torch.export.export(model, (input_ids,), inputs).module()
    torch.testing.assert_close(exported(input_ids, **inputs).logits_per_audio, model(input_ids, **inputs).logits_per_audio)
    # Eager mode still refuses a mask with padding before real frames.
    with pytest.raises(ValueError, match="trailing"):
        beats(features, feature_attention_mask=mask.flip(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_in_reduced_precision_runs_end_to_end(model, tmp_path, dtype):
    model.save_pretrained(tmp_path)
    reduced = AudioQFormerModel.from_pretrained(tmp_path, dtype=dtype).eval()
    features, mask = fbank_batch()
    input_ids, attention_mask = text_batch()
    inputs = dict(attention_mask=attention_mask, input_features=features, feature_attention_mask=mask,
                  use_audio_text_matching_head=True)  # fmt: skip
    with torch.no_grad():
        expected = model(input_ids, **inputs)
        got = reduced(input_ids, **{**inputs, "input_features": features.to(dtype)})
    if dtype == torch.float16:  # the Q-Former and BEATs stay float32, the heads around them are float16
        assert reduced.qformer.layernorm.weight.dtype == torch.float32 and reduced.itm_head.weight.dtype == dtype
    for name in ("audio_embeds", "text_embeds", "itm_logits"):
        torch.testing.assert_close(getattr(got, name).float(), getattr(expected, name), atol=1e-2, rtol=1e-2, msg=name)


def test_feature_methods_return_transformers_outputs(model):
    features, mask = fbank_batch()
    input_ids, attention_mask = text_batch()
    with torch.no_grad():
        audio = model.get_audio_features(features, mask, output_hidden_states=True)
        text = model.get_text_features(input_ids, attention_mask, output_hidden_states=True)
        as_tuple = model.get_audio_features(features, mask, return_dict=False)
    assert isinstance(audio, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    # The pooled output is the projected, normalised embedding, also under the project's own name.
    assert audio.pooler_output is audio.audio_embeds and text.pooler_output is text.text_embeds
    torch.testing.assert_close(audio.pooler_output.norm(dim=-1), torch.ones(2, model.config.num_query_tokens))
    assert audio.last_hidden_state.shape[-1] == model.config.audio_config.hidden_size  # BEATs' tokens
    assert len(audio.hidden_states) == model.config.audio_config.encoder_layers + 1
    assert len(text.hidden_states) == model.config.qformer_config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], audio.last_hidden_state)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model.get_audio_features(features, mask, output_attentions=True).attentions
    assert len(attentions) == model.config.audio_config.encoder_layers and attentions[0].shape[-1] == 32


def test_output_embeddings_are_the_tied_decoder(model):
    decoder = model.get_output_embeddings()
    assert isinstance(decoder, nn.Linear) and decoder is model.lm_head.decoder
    assert decoder.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("model_class", [BeatsModel, AudioQFormerModel])
def test_main_input_name_is_the_first_argument(model_class):
    assert list(inspect.signature(model_class.forward).parameters)[1] == model_class.main_input_name


def test_resize_token_embeddings_resizes_the_qformer_vocabulary_and_reloads(model, tmp_path):
    assert model.config.get_text_config() is model.config.qformer_config
    size = model.config.qformer_config.vocab_size
    model.resize_token_embeddings(size + 10)
    assert model.config.qformer_config.vocab_size == size + 10
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == size + 10
    input_ids, attention_mask = text_batch()
    input_ids[0, 3] = size + 5  # a new token
    with torch.no_grad():
        before = model.get_text_features(input_ids, attention_mask).text_embeds
    model.save_pretrained(tmp_path)
    reloaded = AudioQFormerModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_text_features(input_ids, attention_mask).text_embeds, before)


def test_resize_below_the_decoder_token_is_refused(model):
    dec = model.config.decoder_bos_token_id
    size = model.config.qformer_config.vocab_size
    for new_size, multiple in ((dec, None), (dec - 5, None), (dec - 8, 4)):
        with pytest.raises(ValueError, match=f"\\[DEC\\] token has id {dec}"):
            model.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    assert model.get_input_embeddings().weight.shape[0] == model.config.qformer_config.vocab_size == size  # untouched
    model.resize_token_embeddings(dec + 1)  # the smallest vocabulary that keeps it: captions still start with it
    features, mask = fbank_batch()
    ids = model.generate(input_features=features, feature_attention_mask=mask, num_beams=1, max_length=5, min_length=1)
    assert (ids[:, 0] == dec).all() and int(ids.max()) <= dec


def test_beats_config_and_model_pass_their_own_attention_choice():
    model = BeatsModel(BeatsConfig(**TINY_BEATS, attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    features, mask = fbank_batch()
    assert all(a is not None for a in model(features, mask, output_attentions=True).attentions)
