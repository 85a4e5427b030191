# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""How a sound library embeds audio: a clip cut into windows, each through BEATs and the Q-Former into 32 query
vectors, with the BEATs copy (exact, fast or bfloat16, `beats_cpu.cpu_copy`) chosen once per library."""

import copy

import numpy as np
import torch

from audio_io import window_starts


class LibraryEncoder:
    """
    The model as a library runs it: `config` is the library's (`window_seconds`, `hop_seconds`, `beats_dtype`,
    `fast_cpu_encoder`); the BEATs copy it asks for is built on first use and kept.
    """

    def __init__(self, model, processor, config: dict):
        self.model, self.processor, self.config = model, processor, config
        self.sampling_rate = processor.feature_extractor.sampling_rate
        self._audio_encoder = None  # BEATs' CPU (or bfloat16) copy, built on first use

    def windows(self, waveform: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
        window = int(round(self.config["window_seconds"] * self.sampling_rate))
        hop = int(round(self.config["hop_seconds"] * self.sampling_rate))
        starts = window_starts(waveform.shape[0], window, hop)
        return starts, [waveform[start : start + window] for start in starts]

    @torch.no_grad()
    def embed_waveforms(self, waveforms: list[np.ndarray], batch_size: int = 8):
        """Audio embeddings `(n, queries, embed_dim)` of 16 kHz mono waveforms, and their BEATs tokens (float16)."""
        device = next(self.model.parameters()).device
        embeds, tokens = [], []
        for start in range(0, len(waveforms), batch_size):
            inputs = self.processor.feature_extractor(
                waveforms[start : start + batch_size], sampling_rate=self.sampling_rate, return_tensors="pt"
            ).to(device)
            states, mask = self.audio_hidden_states(inputs)
            # The Q-Former under autocast on a GPU when the library asked for bfloat16 (the CPU keeps it exact).
            lower = device.type == "cuda" and self.config.get("beats_dtype") == "bfloat16"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=lower):
                audio = self.model.get_audio_features(audio_hidden_states=states, audio_attention_mask=mask)
            embeds.append(audio.audio_embeds.float().cpu())
            lengths = mask.sum(-1).tolist()
            tokens += [s[:n].to(torch.float16).cpu().numpy() for s, n in zip(states, lengths)]
        return torch.cat(embeds), tokens

    def audio_hidden_states(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        features, bfloat16 = inputs["input_features"], self.config.get("beats_dtype") == "bfloat16"
        if features.device.type != "cpu" and not bfloat16:
            return self.model.get_audio_hidden_states(**inputs)
        if self._audio_encoder is None:
            if features.device.type != "cpu":  # a bfloat16 copy on the GPU; the model keeps its float32 BEATs
                self._audio_encoder = copy.deepcopy(self.model.audio_model).to(torch.bfloat16)
            else:
                from audio_qformer.beats_cpu import cpu_copy

                # Libraries made before the settings existed are exact.
                precision = "bfloat16" if bfloat16 else "fast" if self.config.get("fast_cpu_encoder") else "float32"
                self._audio_encoder, _ = cpu_copy(self.model.audio_model, precision)
        dtype = self._audio_encoder.patch_embedding.weight.dtype  # what the first layer reads, as `_run_beats` does
        with torch.no_grad():
            outputs = self._audio_encoder(features.to(dtype), inputs.get("feature_attention_mask"))
        return outputs.last_hidden_state.float(), outputs.audio_attention_mask

    def captions(self, window_tokens: list) -> list[str]:
        """Captions of windows given as BEATs tokens (the model's default generation)."""
        from audio_qformer.captioning import caption_token_arrays

        return caption_token_arrays(self.model, self.processor, window_tokens)


__all__ = ["LibraryEncoder"]
