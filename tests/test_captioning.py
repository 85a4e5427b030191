"""Caption generation (`AudioQFormerModel.generate`): the cached path against the whole sequence, beams, batching."""

import pytest
import torch
from conftest import TINY_BEATS, TINY_QFORMER, make_waveform

from configuration_audio_qformer import AudioQFormerConfig
from modeling_audio_qformer import AudioQFormerModel


@pytest.fixture
def captioner():
    """A tiny random model whose captions depend on the clip: with BERT's initialisation (std 0.02) a random Q-Former
    passes so little of the queries to the text that every clip gets the same caption; std 0.5 makes them differ."""
    torch.manual_seed(0)
    config = AudioQFormerConfig(
        audio_config=TINY_BEATS, qformer_config={**TINY_QFORMER, "initializer_range": 0.5}, num_query_tokens=4,
        embed_dim=16, initializer_range=0.5,
    )  # fmt: skip
    return AudioQFormerModel(config).eval()


@pytest.fixture
def clips(captioner, processor):
    waves = [make_waveform(1.6, seed=1), make_waveform(0.9, seed=2, kind="chirp"), make_waveform(1.2, seed=3)]
    inputs = processor(audio=waves, sampling_rate=16000, return_tensors="pt")
    return captioner.get_audio_hidden_states(inputs["input_features"], inputs["feature_attention_mask"])


def whole_sequence_logits(model, states, mask, ids):
    """Next-token logits at every caption position, from one pass over [queries; caption] with the caption loss' mask."""
    sequence = model._query_pass(states, mask, ids).last_hidden_state
    return model.lm_head(sequence[:, model.config.num_query_tokens :])


def test_greedy_cached_steps_equal_the_whole_sequence_each_step(captioner, clips):
    # In float64, so that the comparison sees the algorithm rather than float32 rounding (2.7e-5 on logits of up to 15).
    captioner.double()
    states, mask = clips[0].double(), clips[1]
    with torch.no_grad():
        out = captioner.generate(
            audio_hidden_states=states, audio_attention_mask=mask, num_beams=1, min_length=0, max_length=14,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        ids = out.sequences
        reference = whole_sequence_logits(captioner, states, mask, ids)
    assert ids.shape == (3, 14) and (ids[:, 0] == captioner.config.decoder_bos_token_id).all()
    assert len({tuple(row) for row in ids.tolist()}) == 3, "the clips should get different captions"
    for step, logits in enumerate(out.logits):  # the logits of step t predict token t + 1
        torch.testing.assert_close(logits.double(), reference[:, step], rtol=0, atol=1e-5)  # returned as float32
        assert torch.equal(ids[:, step + 1], logits.argmax(-1))


def test_generation_is_deterministic_and_batched_equals_one_clip_at_a_time(captioner, clips):
    states, mask = clips
    for options in ({"num_beams": 1}, {}):  # greedy; beam search, the default (3 beams)
        with torch.no_grad():
            first = captioner.generate(audio_hidden_states=states, audio_attention_mask=mask, **options)
            again = captioner.generate(audio_hidden_states=states, audio_attention_mask=mask, **options)
            alone = [
                captioner.generate(audio_hidden_states=states[[i]], audio_attention_mask=mask[[i]], **options)[0]
                for i in range(3)
            ]
        assert torch.equal(first, again)
        for row, single in zip(first, alone):  # padded clips in a batch caption as they do alone
            assert torch.equal(row[: single.shape[0]], single)


def test_beam_search_defaults_and_min_length(captioner, clips):
    states, mask = clips
    config = captioner.generation_config
    assert (config.num_beams, config.max_length, config.min_length) == (3, 30, 8)
    assert (config.bos_token_id, config.eos_token_id) == (captioner.config.decoder_bos_token_id, 102)
    eos = captioner.config.decoder_eos_token_id
    with torch.no_grad():
        # [SEP] made the likeliest token everywhere: held back until the 8th token, then it ends every caption.
        captioner.lm_head.bias[eos] += 1e3
        ids = captioner.generate(audio_hidden_states=states, audio_attention_mask=mask)
    assert ids.shape == (3, 9) and (ids[:, 1:8] != eos).all() and (ids[:, 8] == eos).all()


def test_sampling_follows_the_seed(captioner, clips):
    states, mask = clips

    def sample(seed):
        torch.manual_seed(seed)
        return captioner.generate(audio_hidden_states=states, audio_attention_mask=mask, do_sample=True, top_p=0.9,
                                  num_beams=1, max_length=12)  # fmt: skip

    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))


def test_caption_prefix_is_what_the_queries_hold_whatever_the_caption(captioner, clips):
    # The queries never see the caption (the caption loss' mask): the keys and values computed once per clip are those
    # of the query positions in a pass with any caption after them.
    states, mask = clips
    caption = torch.tensor([[captioner.config.decoder_bos_token_id, 2023, 2003, 1037, 3899]]).expand(3, -1)
    with torch.no_grad():
        prefix = captioner.get_caption_prefix(states, mask)
        layer_inputs = captioner._query_pass(states, mask, caption, output_hidden_states=True).hidden_states
    queries = captioner.config.num_query_tokens
    for index, layer in enumerate(captioner.qformer.encoder.layer):
        attention = layer.attention.attention
        query_part = layer_inputs[index][:, :queries]
        torch.testing.assert_close(prefix[:, index, 0], captioner._split_heads(attention, attention.key(query_part)),
                                   rtol=0, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(prefix[:, index, 1], captioner._split_heads(attention, attention.value(query_part)),
                                   rtol=0, atol=1e-5)  # fmt: skip
    assert prefix.shape == (3, len(captioner.qformer.encoder.layer), 2, 4, queries, 8)


def test_generate_from_fbank_equals_from_cached_tokens(captioner, processor):
    waves = [make_waveform(1.3, seed=5), make_waveform(0.8, seed=6)]
    inputs = processor(audio=waves, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        from_fbank = captioner.generate(**inputs)
        states, mask = captioner.get_audio_hidden_states(inputs["input_features"], inputs["feature_attention_mask"])
        from_tokens = captioner.generate(audio_hidden_states=states, audio_attention_mask=mask)
    assert torch.equal(from_fbank, from_tokens)
    with pytest.raises(ValueError, match="not both"):
        captioner.generate()


# --- scoring captions ----------------------------------------------------------------------------------------------


def test_attribute_accuracy_on_hand_made_captions():
    from audio_qformer.captioning import attribute_accuracy, shuffled_chance

    tone = dict(sound="tone", pitch="high", motion="rising", rhythm="fast", loudness="quieter", space="echo")
    noise = dict(sound="noise", pitch="pink", motion="steady", rhythm="slow", loudness="even", space="dry")
    captions = [
        # all right, in another order and with words the generator never writes
        "a shrill whistle sweeping upwards, clearly fading out, in quick bursts and echoing back",
        # the noise right but its rhythm named twice (slow and fast: not right) and no space named
        "soft rushing noise at a steady level, pulsing slowly and stuttering fast",
    ]
    scores = attribute_accuracy(captions, [tone, noise])
    # motion counts for the tone only (noise has no pitch movement)
    assert scores == {"sound": 1.0, "pitch": 1.0, "motion": 1.0, "rhythm": 0.5, "loudness": 1.0, "space": 0.5,
                      "all": 0.5}  # fmt: skip
    assert attribute_accuracy(["a low tone at a constant pitch"], [dict(tone, pitch="low")])["pitch"] == 1.0
    chance = shuffled_chance([tone, noise, dict(tone, space="hall")])
    assert chance["sound"] == pytest.approx((2 / 3) ** 2 + (1 / 3) ** 2)
    assert chance["motion"] == pytest.approx(1.0)  # both tones rise
    assert chance["all"] == pytest.approx(3 * (1 / 3) ** 2)
    with pytest.raises(ValueError, match="one attribute set per caption"):
        attribute_accuracy(captions, [tone])


def test_bleu4_perfect_none_and_several_references():
    from audio_qformer.captioning import bleu4

    references = [["a dog barks loudly in the distance", "a dog is barking far away"], ["rain falls on a tin roof"]]
    assert bleu4(["a dog barks loudly in the distance", "rain falls on a tin roof"], references) == pytest.approx(1.0)
    assert bleu4(["x y z w v", "q r s t u"], references) == pytest.approx(0.0)
    # Several references: a caption matching any one of them whole scores 1 (clips with fewer references are fine).
    partial = ["a dog barks in the distance", "rain falls on a roof"]
    assert bleu4(partial, [["a dog barks loudly", "a dog barks in the distance"], ["rain falls on a roof"]]) == pytest.approx(1.0)
    assert 0.2 < bleu4(partial, references) < 1.0
    with pytest.raises(ValueError):
        bleu4(partial, [references[0]])
