# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Loading a saved model for the library and the CLI (this project's classes: no remote code), and how a library
records where its model is."""

import os

import torch


def load_model(name_or_path: str, device: str | torch.device = "cpu"):
    """The model (eval mode) and processor saved at a path or Hub id."""
    from transformers import BertTokenizer

    from modeling_audio_qformer import AudioQFormerModel
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    # This project's classes, not the copies saved with the model: no remote code runs. The Q-Former reads BERT's
    # vocabulary, so its tokenizer is a BERT tokenizer (AutoTokenizer would look for remote code in the config).
    model = AudioQFormerModel.from_pretrained(name_or_path).to(device).eval()
    feature_extractor = BeatsFeatureExtractor.from_pretrained(name_or_path)
    return model, AudioQFormerProcessor(feature_extractor, BertTokenizer.from_pretrained(name_or_path))


def model_reference(name_or_path: str | None) -> str | None:
    """
    How a library records its model: a local folder as its absolute path (the library is then usable from any working
    directory), a Hub id as it is.
    """
    return os.path.abspath(name_or_path) if name_or_path and os.path.isdir(name_or_path) else name_or_path


__all__ = ["load_model", "model_reference"]
