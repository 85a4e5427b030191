"""AudioQFormerModel: losses, hard negatives, the caption mask, BERT initialisation, and Hub-style loading."""

import json
import os
import subprocess
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_BEATS, make_waveform, tiny_qformer_config
from safetensors.torch import save_file

from configuration_audio_qformer import AudioQFormerConfig, BeatsConfig
from audio_qformer.building import bert_state_dict_to_qformer, from_components
from modeling_audio_qformer import (
    AudioQFormerModel,
    atc_loss,
    atg_loss,
    atm_loss,
    contrastive_logits,
    max_over_queries,
    sample_hard_negatives,
)
from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor


CAPTIONS = [
    "a dog barks twice",
    "rain falls on a tin roof",
    "a car horn honks in traffic",
    "birds chirp in the morning",
    "a door slams shut",
    "water runs from a tap",
]


def toy_batch(processor, num_clips=6, seconds=1.0):
    clips = [make_waveform(seconds + 0.2 * i, seed=i) for i in range(num_clips)]
    # Text-only options go in `text_kwargs`: a bare `max_length` would also reach the feature extractor (in frames).
    return processor(
        text=CAPTIONS[:num_clips], audio=clips, sampling_rate=16000, return_tensors="pt",
        text_kwargs={"padding": "max_length", "max_length": 12},
    )  # fmt: skip


# --- the pure loss and scoring functions ---------------------------------------------------------------------------


def test_max_over_queries_takes_best_query():
    audio = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # 2 clips x 2 queries
    text = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    expected = torch.tensor([[1.0, 0.0], [0.6, 0.0]])  # clip 1 vs text 2: best of -0.8 and 0.0
    torch.testing.assert_close(max_over_queries(audio, text), expected)


def test_atc_loss_equals_smoothed_cross_entropy_with_one_positive():
    torch.manual_seed(0)
    logits_a, logits_t = torch.randn(5, 5), torch.randn(5, 5)
    targets = torch.arange(5)
    expected = (
        F.cross_entropy(logits_a, targets, label_smoothing=0.1) + F.cross_entropy(logits_t, targets, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(atc_loss(logits_a, logits_t, torch.eye(5, dtype=torch.bool)), expected)


def test_atc_loss_multi_positive_by_hand():
    # Two captions of one clip (ids 0, 0) and one of another (id 1).
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    positives = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    log_p = torch.log_softmax(logits, dim=1)
    row0 = -(0.45 * log_p[0, 0] + 0.45 * log_p[0, 1] + 0.1 / 3 * log_p[0].sum())
    row1 = -(0.45 * log_p[1, 0] + 0.45 * log_p[1, 1] + 0.1 / 3 * log_p[1].sum())
    row2 = -(0.9 * log_p[2, 2] + 0.1 / 3 * log_p[2].sum())
    expected = (row0 + row1 + row2) / 3
    torch.testing.assert_close(atc_loss(logits, logits, positives), expected)


@pytest.mark.parametrize("with_grad", [False, True])
def test_contrastive_candidates_carry_gradient_only_with_the_option(with_grad):
    generator = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(3, 2, 4, generator=generator), dim=-1).requires_grad_()  # 3 clips x 2 queries
    text = F.normalize(torch.randn(3, 4, generator=generator), dim=-1).requires_grad_()
    logits_per_audio, logits_per_text = contrastive_logits(audio, text, lambda t: t, torch.tensor(0.07), with_grad)
    targets = torch.arange(3)
    # The audio-to-text term: by default (LAVIS) it reaches the audio side only, the captions being detached candidates.
    text_grad, audio_grad = torch.autograd.grad(F.cross_entropy(logits_per_audio, targets), (text, audio), allow_unused=True)
    assert audio_grad.abs().max() > 1e-3
    if with_grad:
        assert text_grad.abs().max() > 1e-3
    else:
        assert text_grad is None or torch.count_nonzero(text_grad) == 0
    audio_grad, text_grad = torch.autograd.grad(F.cross_entropy(logits_per_text, targets), (audio, text), allow_unused=True)
    assert text_grad.abs().max() > 1e-3
    assert (audio_grad.abs().max() > 1e-3) if with_grad else (audio_grad is None or torch.count_nonzero(audio_grad) == 0)


def test_model_contrastive_gradient_equals_lavis_formula(processor):
    """The model's ATC gradient against LAVIS' ITC written out here: candidates detached, max over queries, smoothed CE."""
    torch.manual_seed(0)
    model = AudioQFormerModel(tiny_qformer_config()).train()
    batch = toy_batch(processor, num_clips=4)
    hidden = torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    params = [p for p in model.parameters() if p.requires_grad]

    model(**inputs, audio_hidden_states=hidden, return_loss=True).loss_atc.backward()
    ours = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)

    image_feats = model.get_audio_features(audio_hidden_states=hidden).audio_embeds  # (4, queries, dim)
    text_feat = model.get_text_features(**inputs).text_embeds  # (4, dim)
    sim_i2t = (image_feats @ text_feat.detach().t()).max(dim=1).values / model.temperature
    sim_t2i = (text_feat @ image_feats.detach().transpose(1, 2)).max(dim=-1).values.t() / model.temperature
    targets = torch.arange(4)
    lavis = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    lavis.backward()
    for param, expected in zip(params, ours):
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(expected, got, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in ours)


def test_atg_loss_shifts_and_ignores_padding():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[5, 1, 2, -100], [5, 3, -100, -100]])
    # Position t predicts label t + 1: predictions (0->1), (1->2) for row 0 and (0->3) for row 1.
    picked = torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]])
    expected = F.cross_entropy(picked, torch.tensor([1, 2, 3]), label_smoothing=0.1)
    torch.testing.assert_close(atg_loss(logits, labels), expected)


def test_atm_loss_is_plain_cross_entropy():
    logits = torch.tensor([[0.0, 3.0], [2.0, -1.0]])
    labels = torch.tensor([1, 0])
    torch.testing.assert_close(atm_loss(logits, labels), F.cross_entropy(logits, labels))


def test_hard_negative_sampler_guarantees():
    generator = torch.Generator().manual_seed(0)
    cases = 0
    for trial in range(300):
        rows = int(torch.randint(1, 9, (1,), generator=generator))
        world = rows * int(torch.randint(1, 4, (1,), generator=generator))  # global batch, several "processes"
        num_ids = int(torch.randint(1, world + 1, (1,), generator=generator))
        all_ids = torch.randint(0, num_ids, (world,), generator=generator)
        if trial % 10 == 0:
            all_ids[:] = 7  # every caption of the same clip
        local_ids = all_ids[:rows]
        positives = local_ids[:, None] == all_ids[None, :]
        scale = [1.0, 100.0, 1e4][trial % 3]  # 1e4: the softmax underflows to one-hot or zeros
        similarity = torch.randn(rows, world, generator=generator) * scale
        if trial % 7 == 0:
            similarity = similarity.half()
        indices, has_negative = sample_hard_negatives(similarity, positives, generator)
        assert torch.equal(has_negative, (~positives).any(dim=1))
        assert (indices[~has_negative] == -1).all()
        chosen = indices[has_negative]
        assert ((chosen >= 0) & (chosen < world)).all()
        assert not positives[has_negative.nonzero().flatten(), chosen].any(), "a positive was drawn as a negative"
        cases += int(has_negative.sum())
    assert cases > 500
    # Batch of one: nothing to draw, no error.
    indices, has_negative = sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert indices.tolist() == [-1] and has_negative.tolist() == [False]


def test_hard_negatives_follow_the_similarities():
    similarity = torch.tensor([[5.0, 4.0, 0.0, -2.0]]).repeat(4000, 1)
    positives = torch.zeros(4000, 4, dtype=torch.bool)
    positives[:, 0] = True
    indices, _ = sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(indices, minlength=4).float() / 4000
    expected = torch.softmax(torch.tensor([-float("inf"), 4.0, 0.0, -2.0]), dim=0)
    torch.testing.assert_close(frequencies, expected, atol=0.02, rtol=0)


# --- the model --------------------------------------------------------------------------------------------------------


# Steps and learning rate per loss: at initialisation the queries' cross-attention is nearly uniform, so the matching
# head first learns only the 1:2 label prior and needs more steps before it tells pairs apart.
@pytest.mark.parametrize("name, steps, lr, ratio", [("loss_atc", 40, 1e-3, 0.6), ("loss_atg", 40, 1e-3, 0.85),
                                                    ("loss_atm", 60, 3e-3, 0.8)])  # fmt: skip
def test_each_loss_is_finite_and_falls(name, steps, lr, ratio, processor):
    torch.manual_seed(0)
    model = AudioQFormerModel(tiny_qformer_config())
    batch = toy_batch(processor)
    # Toy audio tokens that differ between clips (random BEATs' tokens average out across a clip).
    generator = torch.Generator().manual_seed(0)
    audio_hidden_states = torch.randn(6, 1, 32, generator=generator) * 2 + 0.5 * torch.randn(6, 40, 32, generator=generator)
    inputs = dict(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        audio_hidden_states=audio_hidden_states, return_loss=True,
    )  # fmt: skip

    def measure():
        with torch.no_grad():
            return getattr(model(**inputs, generator=torch.Generator().manual_seed(0)), name).item()

    model.train()
    before = measure()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        outputs = model(**inputs, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(outputs.loss)
        getattr(outputs, name).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = measure()
    assert np.isfinite(before) and after < ratio * before, (before, after)


def test_forward_outputs_and_temperature(tiny_model, processor):
    batch = toy_batch(processor, num_clips=3)
    with torch.no_grad():
        outputs = tiny_model(**batch, use_audio_text_matching_head=True)
    assert outputs.logits_per_audio.shape == (3, 3)
    torch.testing.assert_close(outputs.logits_per_text, outputs.logits_per_audio.t())
    cosine = max_over_queries(outputs.audio_embeds, outputs.text_embeds)
    torch.testing.assert_close(outputs.logits_per_audio, cosine / 0.07)
    assert outputs.audio_embeds.shape == (3, 4, 16) and outputs.text_embeds.shape == (3, 16)
    torch.testing.assert_close(outputs.audio_embeds.norm(dim=-1), torch.ones(3, 4))
    assert outputs.itm_logits.shape == (3, 2) and outputs.loss is None


def test_batch_of_one_and_all_same_clip(tiny_model, processor):
    tiny_model.train()
    one = toy_batch(processor, num_clips=1)
    outputs = tiny_model(**one, return_loss=True)
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.loss_atm)
    same = toy_batch(processor, num_clips=4)
    outputs = tiny_model(**same, return_loss=True, audio_ids=torch.zeros(4, dtype=torch.long))
    assert all(torch.isfinite(getattr(outputs, n)) for n in ("loss", "loss_atc", "loss_atm", "loss_atg"))
    outputs.loss.backward()


def test_caption_mask_queries_never_see_text_and_text_is_causal(tiny_model, processor):
    batch = toy_batch(processor, num_clips=2)
    hidden, mask = tiny_model.get_audio_hidden_states(batch["input_features"], batch["feature_attention_mask"])
    ids = batch["input_ids"].clone()
    changed = ids.clone()
    changed[:, 5] = 2000  # change one caption token
    with torch.no_grad():
        a = tiny_model._query_pass(hidden, mask, ids, batch["attention_mask"]).last_hidden_state
        b = tiny_model._query_pass(hidden, mask, changed, batch["attention_mask"]).last_hidden_state
        alone = tiny_model._query_pass(hidden, mask).last_hidden_state
    queries = tiny_model.config.num_query_tokens
    torch.testing.assert_close(a[:, :queries], alone, rtol=0, atol=1e-6)  # queries never see the caption
    torch.testing.assert_close(a[:, :queries], b[:, :queries], rtol=0, atol=0)
    text_a, text_b = a[:, queries:], b[:, queries:]
    torch.testing.assert_close(text_a[:, :5], text_b[:, :5], rtol=0, atol=1e-6)  # earlier tokens do not see it
    assert (text_a[:, 5:] - text_b[:, 5:]).abs().amax() > 1e-4  # later ones do


def test_padded_clip_embeds_like_clip_alone(tiny_model, processor):
    clips = [make_waveform(3.0, seed=1), make_waveform(1.2, seed=2)]
    fe = processor.feature_extractor
    with torch.no_grad():
        batch = tiny_model.get_audio_features(**fe(clips, sampling_rate=16000, return_tensors="pt")).audio_embeds
        alone = tiny_model.get_audio_features(**fe(clips[1], sampling_rate=16000, return_tensors="pt")).audio_embeds
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)


def test_precomputed_features_equal_waveform_path(tiny_model, processor):
    inputs = processor.feature_extractor(
        [make_waveform(2.0), make_waveform(1.0, seed=4)], sampling_rate=16000, return_tensors="pt"
    )
    with torch.no_grad():
        from_fbank = tiny_model.get_audio_features(**inputs)
        hidden, mask = tiny_model.get_audio_hidden_states(**inputs)
        from_cache = tiny_model.get_audio_features(audio_hidden_states=hidden.half().float(), audio_attention_mask=mask)
        exact = tiny_model.get_audio_features(audio_hidden_states=hidden, audio_attention_mask=mask)
    torch.testing.assert_close(exact.audio_embeds, from_fbank.audio_embeds, rtol=0, atol=0)
    torch.testing.assert_close(from_cache.audio_embeds, from_fbank.audio_embeds, rtol=0, atol=1e-2)  # fp16 cache
    with pytest.raises(ValueError, match="either"):
        tiny_model.get_audio_features(input_features=inputs["input_features"], audio_hidden_states=hidden)


def test_beats_stays_frozen_in_eval(tiny_model, processor):
    tiny_model.train()
    assert not tiny_model.audio_model.training and tiny_model.qformer.training
    assert not any(p.requires_grad for p in tiny_model.audio_model.parameters())
    outputs = tiny_model(**toy_batch(processor, num_clips=2), return_loss=True)
    outputs.loss.backward()
    assert all(p.grad is None for p in tiny_model.audio_model.parameters())
    assert tiny_model.audio_layernorm.weight.grad is not None and tiny_model.temperature.grad is not None


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(processor):
    """`train.py --gradient_checkpointing` recomputes the Q-Former's layers in backward: nothing else may change."""
    from conftest import TINY_QFORMER

    torch.manual_seed(0)
    config = AudioQFormerConfig(audio_config=TINY_BEATS, qformer_config={**TINY_QFORMER, "hidden_dropout_prob": 0.1},
                                num_query_tokens=4, embed_dim=16)  # fmt: skip
    model = AudioQFormerModel(config)
    model.train()
    batch = toy_batch(processor, num_clips=4)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        saved = []
        torch.manual_seed(1)  # the same dropout draws: checkpointing replays them in the recomputation
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            outputs = model(**batch, return_loss=True, generator=torch.Generator().manual_seed(2))
        outputs.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((outputs, grads, sum(saved)))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    for name in ("loss", "loss_atc", "loss_atm", "loss_atg"):
        torch.testing.assert_close(getattr(ckpt, name), getattr(plain, name), rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The layers' activations were not kept (at this size the caption head's vocabulary logits, outside the layers,
    # are most of what is saved; benchmarks/training_memory.py measures the paper's sizes: 6.33 -> 0.53 GiB).
    assert ckpt_saved < 0.95 * plain_saved


def test_beats_patch_channels_accept_the_official_name(tmp_path):
    # `embed_dim` means the shared space's width in AudioQFormerConfig; BEATs' patch channels are `patch_embed_dim`,
    # and the official `cfg` / configs saved before the rename still load by the old name.
    config = BeatsConfig(embed_dim=24)
    assert config.patch_embed_dim == 24 and "embed_dim" not in config.to_dict()
    legacy = BeatsConfig().to_dict() | {"embed_dim": 40}
    legacy.pop("patch_embed_dim")
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert BeatsConfig.from_pretrained(tmp_path).patch_embed_dim == 40


def test_config_defaults_are_the_paper_architecture():
    config = AudioQFormerConfig()
    assert config.audio_config.encoder_layers == 12 and config.audio_config.deep_norm
    qformer = config.qformer_config
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.vocab_size) == (768, 12, 30523)
    assert qformer.encoder_hidden_size == 768 and qformer.use_qformer_text_input
    assert (config.num_query_tokens, config.embed_dim, config.temperature_init) == (32, 256, 0.07)
    assert (config.train_max_text_length, config.eval_max_text_length, config.rerank_top_k) == (32, 35, 16)
    with torch.device("meta"):
        model = AudioQFormerModel(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 90_311_664  # BEATs iter3+
    assert trainable == 180_805_950  # bert-base Q-Former with query FFNs and 6 cross-attention layers, heads
    with pytest.raises(TypeError, match="audio_config must be a BeatsConfig"):
        AudioQFormerConfig(audio_config=config.qformer_config)
    with pytest.raises(Exception, match="decoder_bos_token_id"):
        AudioQFormerConfig(qformer_config={"vocab_size": 100})


# --- processor ----------------------------------------------------------------------------------------------------


def test_processor_adds_decoder_token_and_batches(tokenizer):
    from transformers import AutoTokenizer

    from audio_qformer.building import default_bert_checkpoint

    plain = AutoTokenizer.from_pretrained(default_bert_checkpoint())
    assert "[DEC]" not in plain.get_vocab()
    processor = AudioQFormerProcessor(feature_extractor=BeatsFeatureExtractor(), tokenizer=plain)
    assert processor.tokenizer.bos_token == "[DEC]" and processor.tokenizer.bos_token_id == 30522
    assert len(processor.tokenizer) == 30523
    again = AudioQFormerProcessor(feature_extractor=BeatsFeatureExtractor(), tokenizer=processor.tokenizer)
    assert len(again.tokenizer) == 30523  # not added twice
    out = processor(text="a dog barks", audio=make_waveform(1.0), sampling_rate=16000, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "input_features", "feature_attention_mask"}
    assert out["input_ids"].shape[0] == 1 and out["input_features"].shape == (1, 98, 128)
    long_text = processor(text=["word " * 100], return_tensors="pt", text_kwargs={"max_length": 35})
    assert long_text["input_ids"].shape[1] == 35 and long_text["input_ids"][0, -1] == 102  # truncated, ends in [SEP]
    with pytest.raises(ValueError):
        processor()


# --- BERT initialisation ------------------------------------------------------------------------------------------


def test_from_components_loads_every_bert_weight(tiny_beats_config):
    from transformers import BertModel

    from audio_qformer.building import default_bert_checkpoint

    model, info = from_components(tiny_beats_config, output_loading_info=True)
    bert = BertModel.from_pretrained(default_bert_checkpoint()).eval()
    assert model.config.qformer_config.hidden_size == 384 and model.config.qformer_config.num_hidden_layers == 6
    assert model.config.qformer_config.encoder_hidden_size == tiny_beats_config.encoder_embed_dim
    assert model.config.text_pooling == "mean"  # the packaged sentence encoder pools by mean
    bert_state = bert.state_dict()
    own = model.state_dict()
    torch.testing.assert_close(own["embeddings.word_embeddings.weight"][:30522], bert_state["embeddings.word_embeddings.weight"])
    for i in range(6):
        layer, bert_layer = f"qformer.encoder.layer.{i}", f"encoder.layer.{i}"
        torch.testing.assert_close(own[f"{layer}.attention.attention.query.weight"], bert_state[f"{bert_layer}.attention.self.query.weight"])
        for ffn in ("intermediate", "intermediate_query"):
            torch.testing.assert_close(own[f"{layer}.{ffn}.dense.weight"], bert_state[f"{bert_layer}.intermediate.dense.weight"])
        for out in ("output", "output_query"):
            torch.testing.assert_close(own[f"{layer}.{out}.LayerNorm.bias"], bert_state[f"{bert_layer}.output.LayerNorm.bias"])
    torch.testing.assert_close(own["qformer.layernorm.weight"], bert_state["embeddings.LayerNorm.weight"])
    # The text path through the Q-Former is exactly BERT's encoder (no token types; BERT adds type 0's embedding).
    ids = torch.tensor([[101, 1037, 3899, 8123, 102]])
    with torch.no_grad():
        ours = model.get_text_features(ids).last_hidden_state
        theirs = bert(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        bert.embeddings.token_type_embeddings.weight.zero_()
        theirs_without_types = bert(ids).last_hidden_state
    assert (ours - theirs).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs_without_types, atol=1e-5, rtol=0)
    expected_new = {"query_tokens", "temperature", "audio_layernorm.weight", "audio_layernorm.bias"}
    expected_new |= {f"{m}.{p}" for m in ("audio_projection", "text_projection", "itm_head") for p in ("weight", "bias")}
    expected_new |= {"lm_head.bias"} | {f"lm_head.transform.{n}" for n in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")}
    cross = {k for k in own if ".crossattention." in k}
    assert {k.split(".")[3] for k in cross} == {"0", "2", "4"}  # cross-attention every other layer
    assert set(info["newly_initialized"]) == expected_new | cross
    assert info["unused_bert_keys"] == ["bert.embeddings.token_type_embeddings.weight"]
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight


def test_from_components_with_mlm_head_and_official_beats(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from audio_qformer.building import default_bert_checkpoint
    from processing_audio_qformer import add_decoder_token

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    bert.save_pretrained(tmp_path / "bert")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(default_bert_checkpoint()).save_pretrained(tmp_path / "bert")
    model, info = from_components(
        os.path.join(ROOT, "tests", "fixtures", "beats_tiny_official.pt"), str(tmp_path / "bert"),
        output_loading_info=True, num_query_tokens=8,
    )  # fmt: skip
    assert not any(k.startswith("lm_head.transform") for k in info["newly_initialized"])
    torch.testing.assert_close(model.lm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(model.lm_head.bias[:30522], bert.cls.predictions.bias)
    assert model.lm_head.bias[30522] == 0 and model.config.num_query_tokens == 8
    assert model.config.audio_config.patch_embed_dim == 24  # the official tiny checkpoint's cfg calls it embed_dim
    mapped, unused = bert_state_dict_to_qformer(bert.state_dict(), 2)
    assert "qformer.encoder.layer.1.output_query.dense.weight" in mapped and unused == ["bert.embeddings.token_type_embeddings.weight"]
    assert add_decoder_token(AutoTokenizer.from_pretrained(tmp_path / "bert")).bos_token_id == model.config.decoder_bos_token_id


# --- Hub-style loading --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from transformers import AutoTokenizer

    from audio_qformer.building import default_bert_checkpoint

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("saved") / "audio-qformer-tiny"
    model = from_components(BeatsConfig(**TINY_BEATS), num_query_tokens=4).eval()
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(default_bert_checkpoint()))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor, directory


def test_save_writes_code_auto_map_and_safetensors(saved_model):
    _, _, directory = saved_model
    files = set(os.listdir(directory))
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= files
    assert {"configuration_audio_qformer.py", "modeling_audio_qformer.py", "processing_audio_qformer.py"} <= files
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_audio_qformer.AudioQFormerModel"
    assert config["model_type"] == "audio_qformer"


def test_fresh_process_auto_classes_give_equal_outputs(saved_model, tmp_path):
    model, processor, directory = saved_model
    clips = [make_waveform(1.5), make_waveform(0.7, seed=3)]
    inputs = processor(text=["a dog barks", "rain on a roof"], audio=clips, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, use_audio_text_matching_head=True)
        captions = model.generate(input_features=inputs["input_features"],
                                  feature_attention_mask=inputs["feature_attention_mask"])  # fmt: skip
    save_file(
        {"logits": outputs.logits_per_audio.contiguous(), "itm": outputs.itm_logits.contiguous(), "captions": captions.contiguous(),
         "input_features": inputs["input_features"].contiguous(), "clip0": torch.from_numpy(clips[0]),
         "clip1": torch.from_numpy(clips[1])}, tmp_path / "expected.safetensors",
    )  # fmt: skip
    script = textwrap.dedent(
        f"""
        import numpy as np, torch, sys
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoProcessor, AutoFeatureExtractor
        sys.path = [p for p in sys.path if p not in ("", {ROOT!r})]
        directory = {str(directory)!r}
        config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
        assert type(config).__name__ == "AudioQFormerConfig", type(config)
        model = AutoModel.from_pretrained(directory, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        assert type(AutoFeatureExtractor.from_pretrained(directory, trust_remote_code=True)).__name__ == "BeatsFeatureExtractor"
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        clips = [expected["clip0"].numpy(), expected["clip1"].numpy()]
        inputs = processor(text=["a dog barks", "rain on a roof"], audio=clips, sampling_rate=16000, return_tensors="pt")
        assert torch.equal(inputs["input_features"], expected["input_features"])
        with torch.no_grad():
            outputs = model(**inputs, use_audio_text_matching_head=True)
        torch.testing.assert_close(outputs.logits_per_audio, expected["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(outputs.itm_logits, expected["itm"], rtol=0, atol=1e-5)
        assert model.generation_config.num_beams == 3, model.generation_config  # from generation_config.json
        with torch.no_grad():
            captions = model.generate(input_features=inputs["input_features"],
                                      feature_attention_mask=inputs["feature_attention_mask"])
        assert torch.equal(captions, expected["captions"]), (captions, expected["captions"])
        assert all(isinstance(text, str) for text in processor.batch_decode(captions, skip_special_tokens=True))
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )  # fmt: skip
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_folder_saved_before_captioning_generates_with_the_caption_defaults(saved_model, tmp_path):
    # No generation_config.json (saved before `generate` existed): transformers derives one from config.json, which
    # knows nothing of captions; loading then takes the caption defaults.
    model, processor, directory = saved_model
    assert json.loads((directory / "generation_config.json").read_text())["num_beams"] == 3
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    (old / "generation_config.json").unlink()
    reloaded = AudioQFormerModel.from_pretrained(old).eval()
    assert reloaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    assert reloaded.generation_config.eos_token_id == 102 == processor.tokenizer.sep_token_id  # from_components: [SEP]
    states = torch.randn(2, 20, TINY_BEATS["encoder_embed_dim"])
    with torch.no_grad():
        assert torch.equal(reloaded.generate(audio_hidden_states=states), model.generate(audio_hidden_states=states))
        with pytest.raises(ValueError, match="dynamic cache"):
            reloaded.generate(audio_hidden_states=states, cache_implementation="static")


def test_zero_shot_audio_classification_pipeline(saved_model):
    from transformers import pipeline

    model, processor, directory = saved_model
    classifier = pipeline("zero-shot-audio-classification", model=str(directory), trust_remote_code=True)
    audio = make_waveform(1.0, kind="chirp")
    labels = ["a dog barking", "a rising whistle", "rain"]
    results = classifier(audio, candidate_labels=labels)
    assert sorted(r["label"] for r in results) == sorted(labels)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    # The pipeline's scores are the softmax of the model's logits for "This is a sound of {label}."
    inputs = processor(
        text=[f"This is a sound of {label}." for label in labels], audio=audio, sampling_rate=16000,
        return_tensors="pt", padding=True,
    )  # fmt: skip
    with torch.no_grad():
        expected = model(**inputs).logits_per_audio.softmax(-1)[0]
    for result in results:
        assert abs(result["score"] - expected[labels.index(result["label"])].item()) < 1e-4


def test_fully_padded_clip_gives_finite_outputs(tiny_model):
    """A clip with no real token (all padding) must not turn the batch's embeddings or losses into NaN."""
    torch.manual_seed(0)
    states = torch.randn(3, 10, 32)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1] = 0
    mask[2, 5:] = 0
    embeds = tiny_model.get_audio_features(audio_hidden_states=states, audio_attention_mask=mask).audio_embeds
    assert torch.isfinite(embeds).all()
    ids = torch.randint(1000, 2000, (3, 7))
    tiny_model.train()
    outputs = tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids), audio_hidden_states=states,
                         audio_attention_mask=mask, return_loss=True)  # fmt: skip
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_beats_in_fp32_and_losses_finite(tiny_model, processor, dtype):
    inputs = processor.feature_extractor([make_waveform(2.0), make_waveform(1.0, seed=1)], sampling_rate=16000,
                                         return_tensors="pt")  # fmt: skip
    ids = processor.tokenizer(["a tone", "some noise"], padding=True, return_tensors="pt", return_token_type_ids=False)
    tiny_model.train()
    torch.manual_seed(0)
    reference = tiny_model(**ids, **inputs, return_loss=True).loss
    with torch.autocast("cpu", dtype=dtype):
        states, _ = tiny_model.get_audio_hidden_states(**inputs)
        torch.manual_seed(0)
        loss = tiny_model(**ids, **inputs, return_loss=True).loss
    assert states.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=0.05)
    assert "audio_model" in type(tiny_model)._keep_in_fp32_modules


def test_text_pooling_mean_ignores_padding_and_cls_is_default(processor):
    from modeling_audio_qformer import AudioQFormerModel

    assert tiny_qformer_config().text_pooling == "cls"
    with pytest.raises(ValueError, match="text_pooling"):
        tiny_qformer_config(text_pooling="max")
    torch.manual_seed(0)
    model = AudioQFormerModel(tiny_qformer_config(text_pooling="mean")).eval()
    alone = processor.tokenizer(["a dog barks"], return_tensors="pt", return_token_type_ids=False)
    padded = processor.tokenizer(["a dog barks", "rain falls on a tin roof all night"], padding=True,
                                 return_tensors="pt", return_token_type_ids=False)  # fmt: skip
    with torch.no_grad():
        one = model.get_text_features(**alone)
        two = model.get_text_features(**padded)
    torch.testing.assert_close(two.text_embeds[0], one.text_embeds[0], atol=1e-5, rtol=1e-5)
    expected = F.normalize(model.text_projection(one.last_hidden_state.mean(1)), dim=-1)
    torch.testing.assert_close(one.text_embeds, expected, atol=1e-6, rtol=1e-6)


def test_one_clip_against_several_texts_equals_the_clip_repeated(tiny_model, processor):
    torch.manual_seed(3)
    states = torch.randn(1, 20, 32)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[:, 15:] = 0  # a padded clip: the broadcast mask must still hide the padding
    texts = processor.tokenizer(["a dog barks", "rain", "a door slams shut twice"], padding=True, return_tensors="pt")
    with torch.no_grad():
        once = tiny_model.get_audio_text_matching_logits(
            texts["input_ids"], texts["attention_mask"], audio_hidden_states=states, audio_attention_mask=mask
        )
        repeated = tiny_model.get_audio_text_matching_logits(
            texts["input_ids"], texts["attention_mask"],
            audio_hidden_states=states.expand(3, -1, -1), audio_attention_mask=mask.expand(3, -1),
        )  # fmt: skip
        unpadded = tiny_model.get_audio_text_matching_logits(
            texts["input_ids"], texts["attention_mask"], audio_hidden_states=states[:, :15].expand(3, -1, -1)
        )
    torch.testing.assert_close(once, repeated, atol=1e-6, rtol=0)
    torch.testing.assert_close(once, unpadded, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pairs"):
        tiny_model.get_audio_text_matching_logits(
            texts["input_ids"], texts["attention_mask"], audio_hidden_states=states.expand(2, -1, -1)
        )


def test_rerank_scores_equal_pairwise_scores(tiny_model, processor):
    # Items shared by several queries go through the one-clip-several-texts path, the others in batches of pairs;
    # either way every score must be the pair's own match logit + cosine.
    from audio_qformer.retrieval import rerank_with_matching_head

    torch.manual_seed(4)
    tokens = [torch.randn(10 + 3 * i, 32).numpy() for i in range(6)]
    texts = processor.tokenizer(["a dog", "rain on a roof", "a bell", "wind"], padding=True, return_tensors="pt")
    candidates = torch.tensor([[0, 1, 2], [1, 0, 3], [4, 1, 0], [5, 2, 1]])  # 0, 1, 2 shared; 3, 4, 5 alone
    cosines = torch.rand(4, 3)
    with torch.no_grad():
        order, scores = rerank_with_matching_head(
            tiny_model, candidates, cosines, texts["input_ids"], texts["attention_mask"],
            lambda ids: [tokens[i] for i in ids], batch_size=2,
        )  # fmt: skip
        for query in range(4):
            for position, item in enumerate(order[query].tolist()):
                logits = tiny_model.get_audio_text_matching_logits(
                    texts["input_ids"][query : query + 1], texts["attention_mask"][query : query + 1],
                    audio_hidden_states=torch.from_numpy(tokens[item])[None],
                )  # fmt: skip
                cosine = cosines[query, candidates[query].tolist().index(item)]
                torch.testing.assert_close(scores[query, position], logits[0, 1] + cosine, atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    assert sorted(order[3].tolist()) == [1, 2, 5]  # only the query's own candidates, re-ordered


def test_recorded_outputs_unchanged():
    """A model saved by main before the architecture change (tests/fixtures) loads and gives the outputs recorded then."""
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    from make_qformer_reference import MODEL_DIR, REFERENCE, outputs_of

    recorded = load_file(REFERENCE)
    inputs = {k[len("input.") :]: v for k, v in recorded.items() if k.startswith("input.")}
    model = AudioQFormerModel.from_pretrained(MODEL_DIR).eval()
    for name, value in outputs_of(model, inputs).items():
        # BEATs' products may take another kernel (float32 rounding, ~1e-6 here); everything else follows.
        torch.testing.assert_close(value.float(), recorded[f"output.{name}"], atol=2e-5, rtol=1e-5, msg=name)
