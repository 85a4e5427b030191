# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""PyTorch models of the audio Q-Former text-to-audio retrieval system.

`AudioQFormerModel` is the retrieval model of Fan & Zhu (DCASE 2023 task 6B): BLIP-2's first-stage Q-Former
(salesforce/LAVIS at commit 506965b9c4a18c1e565bd32acaccabe0198433f7, `lavis/models/blip2_models/blip2_qformer.py`) with
the image encoder replaced by BEATs. Its Q-Former blocks are transformers' own BLIP-2 Q-Former (`Blip2QFormerModel`,
`Blip2TextEmbeddings`); the losses are small functions of tensors below (`atc_loss`, `atm_loss`, `atg_loss`,
`sample_hard_negatives`), reproducing LAVIS' semantics.

`BeatsModel` is the frozen BEATs audio encoder (Chen et al., 2022). It is a re-implementation of the official code,
microsoft/unilm at commit 768a3c873f598bb9b4d4dfb9267b099e35f8fe56, folder `beats/` (`BEATs.py`, `backbone.py`),
written for transformers: scaled-dot-product attention with the relative position bias as an additive mask, the
weight-normalised positional convolution folded into a plain weight, one relative-position table for all layers, and an
exact token padding mask. Parameter names follow the official checkpoint, so its state dict maps one to one apart from
those two folds (see `BeatsModel.from_original_checkpoint`).
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLMPredictionHead
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward as qformer_eager_attention_forward
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging


# Relative first: as Hub remote code the three files form one package, and an installed copy of this project must not
# shadow them. Installed or run from the repository they are top-level modules. (transformers' remote-code import
# check skips `try` blocks.)
try:
    from .configuration_audio_qformer import AudioQFormerConfig, BeatsConfig, caption_generation_config
except ImportError:
    from configuration_audio_qformer import AudioQFormerConfig, BeatsConfig, caption_generation_config


logger = logging.get_logger(__name__)

# The official activation names mapped to transformers' implementations of the same functions.
_BEATS_ACTIVATIONS = {
    "gelu": "gelu",  # exact (erf) GELU
    "gelu_accurate": "gelu_pytorch_tanh",
    "gelu_fast": "gelu_pytorch_tanh",
    "relu": "relu",
    "tanh": "tanh",
    "linear": "linear",
}


@dataclass
class BeatsModelOutput(ModelOutput):
    r"""
    Output of [`BeatsModel`].

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
        The encoder's output tokens. Token `j` is time patch `j // F` and frequency patch `j % F`, with
        `F = num_mel_bins // input_patch_size` (8 for 128 bins): 8 tokens of 768 per 160 ms.
    audio_attention_mask (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
        1 for tokens computed from real audio, 0 for tokens of padding: the `audio_attention_mask` that
        [`AudioQFormerModel`] takes with `audio_hidden_states = last_hidden_state`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The input of the first layer (after the positional convolution) and the output of every layer, each of shape
        `(batch_size, num_tokens, hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        Every layer's attention weights `(batch_size, heads, num_tokens, num_tokens)`, with the eager attention
        (`attn_implementation="eager"`; SDPA does not return them).
    """

    last_hidden_state: torch.FloatTensor | None = None
    audio_attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.LongTensor:
    """
    Bucket index of every (query, key) pair of a sequence, shape `(length, length)`.

    The relative position is `key - query` over the flattened token index. Half the buckets hold positive offsets,
    half the others; within each half, offsets below a quarter of `num_buckets` get their own bucket and larger ones
    share logarithmically wider buckets up to `max_distance` (T5's scheme, as `MultiheadAttention._relative_positions_bucket`
    in unilm `beats/backbone.py` computes it, in float32).
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    # Clamp to 1 before the log: the value is only used where distance >= max_exact.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def token_attention_mask(
    feature_attention_mask: torch.Tensor, patch_size: int, num_frequency_patches: int, num_time_patches: int
) -> torch.LongTensor:
    """
    Token mask (1 = real) of BEATs' output from a frame mask of its input, shape `(batch, num_time_patches * F)`.

    A time patch is real when all of its `patch_size` frames are; a token is real when its time patch is. Padding
    must be trailing (the feature extractor pads on the right). This exact rule replaces the official
    `forward_padding_mask`, which reshapes the mask as if tokens were a 1-D time sequence and so mis-marks the tokens
    of the boundary time patch: with it, a padded clip's real tokens differ from the clip run alone.
    """
    mask = feature_attention_mask.long()
    # A check of the values, which `torch.export` / `torch.compile` cannot trace: made in eager mode only.
    if not torch.compiler.is_compiling() and (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("BeatsModel supports trailing (right) padding only: a real frame follows a padded one.")
    real_time_patches = mask.sum(-1) // patch_size
    time_index = torch.arange(num_time_patches, device=mask.device)
    real = (time_index[None, :] < real_time_patches[:, None]).long()
    return real.repeat_interleave(num_frequency_patches, dim=1)


def _scale_gradient(hidden_states: torch.Tensor, ratio: float) -> torch.Tensor:
    """Identity in the forward pass (exactly), gradient multiplied by `ratio` (fairseq's `GradMultiply`)."""
    if ratio == 1.0 or not (torch.is_grad_enabled() and hidden_states.requires_grad):
        return hidden_states
    detached = hidden_states.detach()
    return detached + (hidden_states - detached) * ratio


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as explicit products (transformers' eager attention, as in CLAP); `attention_mask` is additive."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class BeatsAttention(nn.Module):
    """
    Multi-head self-attention with BEATs' gated relative position bias.

    Each head adds `gate[h, i] * bias[h, i, j]` to its logits, where `bias` is the shared relative-position table and
    `gate = a * (b * grep_a[h] - 1) + 2` with `(a, b) = sigmoid` of a linear map of the head's *projected* query
    (unilm `beats/backbone.py`, `MultiheadAttention.forward`; WavLM gates with the layer input instead). The official
    code's scaling trick (q / 8 / 32, subtract the row max, times 32) equals plain 1/8 scaling, so any attention
    implementation of transformers that takes an additive mask runs it (`config._attn_implementation`: "sdpa" by
    default, "eager").
    """

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.encoder_embed_dim // config.encoder_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
        width = config.encoder_embed_dim
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.gru_rel_pos = config.gru_rel_pos
        if config.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_bias: torch.Tensor | None = None,
        attn_bias_buffer: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `position_bias` `(1, heads, length, length)` is the shared, ungated table; `key_padding_bias`
        `(batch, 1, 1, length)` is 0 for real keys and very negative for padding. `attn_bias_buffer`, a
        `(batch, heads, length, length)` tensor the encoder allocates once per pass (without autograd), receives this
        layer's bias: writing a fresh tensor of that size in every layer costs more than the product itself at batch 8.
        Returns the output and the attention weights (eager attention only, else `None`).
        """
        batch_size, length, width = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        # Cast once for the three projections (a no-op unless their weights are in another dtype than the residual
        # stream, as in `beats_cpu`'s bfloat16 copy).
        hidden_states = hidden_states.to(self.q_proj.weight.dtype)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)

        attn_bias = key_padding_bias
        if position_bias is not None:
            if self.gru_rel_pos:
                # (batch, heads, length, 8) -> two gates per query, each the sum of 4 of the 8 outputs
                gates = self.grep_linear(query).view(batch_size, self.num_heads, length, 2, 4).sum(-1).sigmoid()
                gate_a, gate_b = gates.unbind(-1)
                gate = (gate_a * (gate_b * self.grep_a.squeeze(-1) - 1.0) + 2.0).unsqueeze(-1)
                if key_padding_bias is None:
                    attn_bias = torch.mul(gate, position_bias, out=attn_bias_buffer)
                else:
                    attn_bias = torch.addcmul(key_padding_bias, gate, position_bias, out=attn_bias_buffer)
            elif key_padding_bias is not None:
                attn_bias = torch.add(position_bias, key_padding_bias, out=attn_bias_buffer)
            else:
                attn_bias = position_bias
        if attn_bias is not None:
            attn_bias = attn_bias.to(query.dtype)
        # A bias written into the per-pass buffer is this layer's own: an implementation may overwrite it with the
        # scores (`beats_cpu`'s bfloat16 products do; transformers' own implementations ignore the flag).
        scratch = attn_bias is not None and attn_bias is attn_bias_buffer

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attn_bias, dropout=self.dropout if self.training else 0.0, scaling=self.scaling,
            attention_mask_is_scratch=scratch, **kwargs,
        )  # fmt: skip
        return self.out_proj(attn_output.reshape(batch_size, length, width)), attn_weights


class BeatsEncoderLayer(nn.Module):
    """One transformer layer: post-LayerNorm with DeepNorm residual scaling (iter3+), or pre-LayerNorm."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.layer_norm_first = config.layer_norm_first
        # DeepNorm (Wang et al., 2022) up-weights the residual before each post-LayerNorm.
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0
        self.self_attn = BeatsAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.encoder_embed_dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.encoder_embed_dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, config.encoder_embed_dim)
        self.final_layer_norm = nn.LayerNorm(config.encoder_embed_dim, eps=config.layer_norm_eps)
        self.activation = ACT2FN[_BEATS_ACTIVATIONS[config.activation_fn]]
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        if config.deep_norm:
            # DeepNorm's initialisation: Xavier with gain (8 * layers) ** -0.25 on the value, output and feed-forward
            # projections, gain 1 on query and key. Recorded on the modules for `_init_weights`, which transformers
            # applies to modules that own parameters directly.
            beta = (8 * config.encoder_layers) ** -0.25
            for linear, gain in (
                (self.self_attn.q_proj, 1.0),
                (self.self_attn.k_proj, 1.0),
                (self.self_attn.v_proj, beta),
                (self.self_attn.out_proj, beta),
                (self.fc1, beta),
                (self.fc2, beta),
            ):
                linear.deep_norm_gain = gain

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_dropout(self.activation(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))

    def forward(
        self, hidden_states, position_bias=None, key_padding_bias=None, attn_bias_buffer=None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layer_norm_first:
            attended, attn_weights = self.self_attn(
                self.self_attn_layer_norm(hidden_states), position_bias, key_padding_bias, attn_bias_buffer, **kwargs
            )
            hidden_states = hidden_states + self.dropout(attended)
            return hidden_states + self._feed_forward(self.final_layer_norm(hidden_states)), attn_weights
        attended, attn_weights = self.self_attn(hidden_states, position_bias, key_padding_bias, attn_bias_buffer, **kwargs)
        hidden_states = self.self_attn_layer_norm(hidden_states * self.residual_scale + self.dropout(attended))
        return self.final_layer_norm(hidden_states * self.residual_scale + self._feed_forward(hidden_states)), attn_weights


class BeatsEncoder(nn.Module):
    """Convolutional positional embedding, then the transformer layers (unilm `beats/backbone.py`, `TransformerEncoder`)."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.config = config
        width = config.encoder_embed_dim
        # Official: a weight-normalised Conv1d (norm over dims 0 and 1, i.e. per kernel tap); its weight is folded
        # (g * v / ||v||) when a checkpoint is loaded, since the encoder is never trained here.
        self.pos_conv = nn.Conv1d(
            width, width, kernel_size=config.conv_pos, padding=config.conv_pos // 2, groups=config.conv_pos_groups
        )
        # An even kernel with padding k // 2 gives one extra output step; the official `SamePad` drops the last.
        self.pos_conv_trim = 1 if config.conv_pos % 2 == 0 else 0
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        # One table for all layers: the official code creates one per layer, then points all of them at layer 0's.
        if config.relative_position_embedding:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, config.encoder_attention_heads)
        self.layers = nn.ModuleList([BeatsEncoderLayer(config) for _ in range(config.encoder_layers)])

    def position_bias(self, length: int, device) -> torch.Tensor | None:
        """The ungated relative position bias, shape `(1, heads, length, length)`, built once per forward pass."""
        if not self.config.relative_position_embedding:
            return None
        buckets = relative_position_buckets(length, self.config.num_buckets, self.config.max_distance, device)
        # Made contiguous once here: every layer reads it in full, and a (length, length, heads) layout read with a
        # stride of `heads` costs each layer twice as much.
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False, output_attentions=False, **kwargs):
        key_padding_bias = None
        if attention_mask is not None:
            # Padding tokens are zeroed before the positional convolution, so that real tokens near the end of a
            # padded clip see what they would see at the end of the clip alone (the convolution's zero padding).
            hidden_states = hidden_states * attention_mask[..., None].to(hidden_states.dtype)
            # A large finite negative rather than -inf: an item without real tokens gives finite garbage, not NaN.
            key_padding_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

        position = F.gelu(self.pos_conv(hidden_states.transpose(1, 2)))
        if self.pos_conv_trim:
            position = position[:, :, : -self.pos_conv_trim]
        hidden_states = hidden_states + position.transpose(1, 2)
        if not self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        batch_size, length, _ = hidden_states.shape
        position_bias = self.position_bias(length, hidden_states.device)
        attn_bias_buffer = None
        needs_full_bias = position_bias is not None and (self.config.gru_rel_pos or key_padding_bias is not None)
        if needs_full_bias and len(self.layers) and not torch.is_grad_enabled():  # `out=` cannot record autograd
            # In the dtype of the projections, which attention runs in (bfloat16 in `beats_cpu.cpu_copy`'s copy).
            attn_bias_buffer = hidden_states.new_empty(
                (batch_size, self.config.encoder_attention_heads, length, length),
                dtype=self.layers[0].self_attn.q_proj.weight.dtype,
            )
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states = _scale_gradient(hidden_states, self.config.layer_wise_gradient_decay_ratio)
            attn_weights = None
            if self.training and torch.rand([]).item() < self.config.encoder_layerdrop:
                pass  # LayerDrop: skip the layer (training mode only)
            else:
                hidden_states, attn_weights = layer(
                    hidden_states, position_bias, key_padding_bias, attn_bias_buffer, output_attentions=output_attentions,
                    **kwargs,
                )  # fmt: skip
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        if self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        return hidden_states, all_hidden_states, all_attentions


class BeatsPreTrainedModel(PreTrainedModel):
    config: BeatsConfig
    base_model_prefix = "beats"
    main_input_name = "input_features"
    input_modalities = "audio"
    _supports_sdpa = True  # "sdpa" (default) and "eager"; flash attention takes no additive bias
    supports_gradient_checkpointing = False  # the encoder is frozen in this project
    _no_split_modules = ["BeatsEncoderLayer"]

    def _init_weights(self, module: nn.Module):
        """Initialise as the official code does (fairseq `init_bert_params`, then DeepNorm's scaled Xavier)."""
        config = self.config
        if isinstance(module, nn.Linear):
            if hasattr(module, "deep_norm_gain"):
                init.xavier_normal_(module.weight, gain=module.deep_norm_gain)
            else:
                init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch embedding keeps PyTorch's default initialisation
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):  # the positional convolution
            std = math.sqrt(4.0 / (config.conv_pos * config.encoder_embed_dim))
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, BeatsAttention) and module.gru_rel_pos:
            init.ones_(module.grep_a)


class BeatsModel(BeatsPreTrainedModel):
    r"""
    The BEATs audio encoder: normalised fbank `(batch, frames, mel bins)` to tokens `(batch, 8 * time patches, 768)`.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from configuration_audio_qformer import BeatsConfig
    >>> from modeling_audio_qformer import BeatsModel
    >>> from processing_audio_qformer import BeatsFeatureExtractor

    >>> model = BeatsModel(BeatsConfig()).eval()  # or BeatsModel.from_original_checkpoint("BEATs_iter3_plus_AS2M.pt")
    >>> feature_extractor = BeatsFeatureExtractor()
    >>> waveforms = [np.random.randn(160000).astype(np.float32) * 0.1, np.random.randn(96000).astype(np.float32) * 0.1]
    >>> with torch.inference_mode():
    ...     outputs = model(**feature_extractor(waveforms, sampling_rate=16000, return_tensors="pt"))
    >>> outputs.last_hidden_state.shape, outputs.audio_attention_mask.sum(-1).tolist()
    (torch.Size([2, 496, 768]), [496, 296])
    ```"""

    def __init__(self, config: BeatsConfig):
        super().__init__(config)
        self.patch_embedding = nn.Conv2d(
            1, config.patch_embed_dim, kernel_size=config.input_patch_size, stride=config.input_patch_size, bias=config.conv_bias
        )
        self.layer_norm = nn.LayerNorm(config.patch_embed_dim, eps=config.layer_norm_eps)
        self.post_extract_proj = (
            nn.Linear(config.patch_embed_dim, config.encoder_embed_dim)
            if config.patch_embed_dim != config.encoder_embed_dim
            else None
        )
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = BeatsEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embedding

    def forward(
        self,
        input_features: torch.Tensor,
        feature_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BeatsModelOutput | tuple:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(batch_size, num_frames, num_mel_bins)`):
                Normalised Kaldi fbank, as [`BeatsFeatureExtractor`] returns it.
            feature_attention_mask (`torch.LongTensor` of shape `(batch_size, num_frames)`, *optional*):
                1 for real frames, 0 for trailing padding. Without it every frame counts as real.
            output_hidden_states (`bool`, *optional*):
                Whether to return every layer's output as well.
            output_attentions (`bool`, *optional*):
                Whether to return every layer's attention weights (with `attn_implementation="eager"`).
            return_dict (`bool`, *optional*):
                Return a [`BeatsModelOutput`] (default) or a tuple.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        patch = self.config.input_patch_size
        if input_features.dim() != 3:
            raise ValueError(
                f"BeatsModel expects input_features of shape (batch, frames, mel bins); got {tuple(input_features.shape)}."
            )
        if input_features.shape[1] < patch or input_features.shape[2] < patch:
            raise ValueError(
                f"BeatsModel needs at least {patch} frames and {patch} mel bins (one patch); got "
                f"{tuple(input_features.shape[1:])}. BeatsFeatureExtractor pads short clips to one patch."
            )

        patches = self.patch_embedding(input_features.unsqueeze(1))  # (batch, channels, time patches, freq patches)
        batch_size, channels, num_time_patches, num_frequency_patches = patches.shape
        # Time-major flattening: token j = time patch j // F, frequency patch j % F.
        hidden_states = self.layer_norm(patches.reshape(batch_size, channels, -1).transpose(1, 2))
        if self.post_extract_proj is not None:
            hidden_states = self.post_extract_proj(hidden_states)
        hidden_states = self.dropout_input(hidden_states)

        if feature_attention_mask is not None:
            audio_attention_mask = token_attention_mask(feature_attention_mask, patch, num_frequency_patches, num_time_patches)
        else:
            audio_attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        # A mask without padding (e.g. a batch of equal-length clips) changes nothing: it would only add a pass of
        # zeros over every layer's (batch, heads, tokens, tokens) bias. (Traced, the mask is always applied: the
        # shortcut depends on its values.)
        encoder_mask = None
        if feature_attention_mask is not None and (torch.compiler.is_compiling() or not bool(audio_attention_mask.all())):
            encoder_mask = audio_attention_mask
        hidden_states, all_hidden_states, all_attentions = self.encoder(
            hidden_states, encoder_mask, output_hidden_states, output_attentions
        )

        if not return_dict:
            return tuple(v for v in (hidden_states, audio_attention_mask, all_hidden_states, all_attentions) if v is not None)
        return BeatsModelOutput(
            last_hidden_state=hidden_states, audio_attention_mask=audio_attention_mask, hidden_states=all_hidden_states,
            attentions=all_attentions,
        )  # fmt: skip

    @classmethod
    def from_original_checkpoint(cls, checkpoint_path: str | os.PathLike, **config_overrides) -> "BeatsModel":
        """
        Load an official BEATs checkpoint (e.g. `BEATs_iter3_plus_AS2M.pt`), returned in eval mode.

        The file is a `torch.save`d dict with `cfg` (the official config) and `model` (its state dict). It is read with
        `torch.load(weights_only=True)`, so nothing but tensors and plain containers is unpickled: a file carrying
        code is refused. The config is built from `cfg`; the weight-normalised positional convolution
        (`weight_g`/`weight_v`) is folded into one weight; the relative-position table, stored once per layer, is
        checked to be shared and kept once; an AudioSet classifier (`predictor.*`, fine-tuned checkpoints) is dropped.
        Any other missing or unexpected key is an error.

        Args:
            checkpoint_path (`str` or `os.PathLike`): path of the `.pt` file.
            config_overrides: config fields to change after reading `cfg` (e.g. `encoder_layerdrop=0.0`).
        """
        checkpoint = load_original_checkpoint(checkpoint_path)
        config = BeatsConfig(**{**checkpoint["cfg"], **config_overrides})
        state_dict = convert_original_state_dict(checkpoint["model"], config)
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint_path} does not match the BEATs architecture described by its own `cfg`: "
                f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}."
            )
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()


def load_original_checkpoint(checkpoint_path: str | os.PathLike) -> dict:
    """Read an official BEATs `.pt` file safely (`weights_only=True`) and check it is a `{cfg, model}` dict."""
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"No BEATs checkpoint at {checkpoint_path!r}.")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code objects, RuntimeError/EOFError for corrupt files
        raise ValueError(
            f"Refused to load {checkpoint_path!r}: it is not a plain BEATs checkpoint that can be read with "
            f"torch.load(weights_only=True) (tensors, numbers, strings and containers only). A file that needs more "
            f"could run arbitrary code when unpickled. Original error: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("cfg"), dict) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{checkpoint_path!r} is not in the official BEATs format: expected a dict with 'cfg' (a dict) and 'model' "
            f"(a state dict); found {found}."
        )
    return checkpoint


def convert_original_state_dict(original: dict[str, torch.Tensor], config: BeatsConfig) -> dict[str, torch.Tensor]:
    """Map an official BEATs state dict to `BeatsModel`'s keys (fp32): fold weight norm, de-duplicate the shared table."""
    state_dict = {}
    relative_tables = {}
    dropped = []
    weight_g = weight_v = None
    for key, tensor in original.items():
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        if key.startswith("predictor."):
            dropped.append(key)
        elif key in ("encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.parametrizations.weight.original0"):
            weight_g = tensor
        elif key in ("encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.parametrizations.weight.original1"):
            weight_v = tensor
        elif key == "encoder.pos_conv.0.bias":
            state_dict["encoder.pos_conv.bias"] = tensor
        elif key.endswith(".self_attn.relative_attention_bias.weight"):
            relative_tables[key] = tensor
        else:
            state_dict[key] = tensor
    if dropped:
        logger.info(f"Dropped the fine-tuned classifier ({', '.join(dropped)}): BeatsModel is the encoder only.")
    if (weight_g is None) != (weight_v is None):
        raise ValueError("The BEATs checkpoint has only one of encoder.pos_conv.0.weight_g / weight_v.")
    if weight_g is not None:
        # torch's legacy weight_norm with dim=2: the norm runs over all dims but 2, one norm per kernel tap.
        state_dict["encoder.pos_conv.weight"] = weight_v * (weight_g / weight_v.norm(dim=(0, 1), keepdim=True))
    if relative_tables:
        first_key = "encoder.layers.0.self_attn.relative_attention_bias.weight"
        if first_key not in relative_tables:
            raise ValueError(f"The BEATs checkpoint has relative position tables but not {first_key}.")
        table = relative_tables[first_key]
        for key, other in relative_tables.items():
            if not torch.equal(other, table):
                raise ValueError(
                    f"{key} differs from {first_key}; official BEATs shares one relative position table across layers."
                )
        state_dict["encoder.relative_attention_bias.weight"] = table
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# The audio Q-Former: losses and scoring as small functions of tensors
# ---------------------------------------------------------------------------------------------------------------------


def max_over_queries(audio_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """
    The retrieval score `(num_audio, num_text)`: for each clip and text, the best of the clip's query embeddings.

    `audio_embeds` is `(num_audio, num_queries, dim)` and `text_embeds` `(num_text, dim)`; with normalised embeddings
    this is BLIP-2's ITC similarity (`sim_q2t.max(-1)` in LAVIS), the cosine of the best-matching query. A query of
    several vectors, `(num_text, vectors, dim)` (a clip used as the query), scores as its best pair of vectors. One
    matrix product in the inputs' dtype; the search over a stored library (`vector_search`) computes it in chunks.
    """
    text = text_embeds[:, None, :] if text_embeds.dim() == 2 else text_embeds
    num_audio, num_queries, dim = audio_embeds.shape
    num_text, num_vectors, _ = text.shape
    products = audio_embeds.reshape(-1, dim) @ text.reshape(-1, dim).T
    return products.view(num_audio, num_queries, num_text, num_vectors).amax(dim=3).amax(dim=1)


def contrastive_logits(
    audio_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor],
    temperature: torch.Tensor,
    candidates_with_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ATC logits of this process's pairs against the gathered batch: `(logits_per_audio, logits_per_text)`, each
    `(batch, global batch)`: the local clips against every caption, the local captions against every clip.

    Without `candidates_with_grad` the gathered candidates (the local slice included) are detached, as LAVIS'
    no-grad `concat_all_gather`: the audio-to-text logits then train only the audio side and the text-to-audio
    logits only the text side. With it, both sides in each (open_clip's `gather_with_grad`).
    """
    all_audio_embeds, all_text_embeds = gather(audio_embeds), gather(text_embeds)
    if not candidates_with_grad:
        all_audio_embeds, all_text_embeds = all_audio_embeds.detach(), all_text_embeds.detach()
    logits_per_audio = max_over_queries(audio_embeds, all_text_embeds) / temperature
    logits_per_text = max_over_queries(all_audio_embeds, text_embeds).t() / temperature
    return logits_per_audio, logits_per_text


def atc_loss(
    logits_per_audio: torch.Tensor,
    logits_per_text: torch.Tensor,
    positives: torch.Tensor,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """
    Audio-text contrastive loss (InfoNCE in both directions, averaged).

    Args:
        logits_per_audio: `(batch, candidates)`, each local clip against every caption of the (global) batch.
        logits_per_text: `(batch, candidates)`, each local caption against every clip of the (global) batch.
        positives: `(batch, candidates)` bool, True where the pair shares an audio id, so that the other captions of
            a clip are positives rather than negatives (LAVIS' retrieval fine-tuning branch).
        label_smoothing: the target is `(1 - s) * positives / count + s / candidates`. With one positive per row this
            is exactly `cross_entropy(..., label_smoothing=s)`, LAVIS' pre-training branch.
    """
    positives = positives.float()
    targets = (1.0 - label_smoothing) * positives / positives.sum(1, keepdim=True)
    targets = targets + label_smoothing / positives.shape[1]
    loss_audio = -(targets * F.log_softmax(logits_per_audio.float(), dim=1)).sum(1).mean()
    loss_text = -(targets * F.log_softmax(logits_per_text.float(), dim=1)).sum(1).mean()
    return (loss_audio + loss_text) / 2


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """
    Draw one hard negative per row, with probability `softmax(similarity)` over the row's non-positive candidates.

    As in LAVIS (positives masked out, then `torch.multinomial` on the softmax), but robust where LAVIS fails: the
    softmax runs in fp32; a row whose softmax underflows falls back to a uniform draw over its non-positives; a row
    without any non-positive (a batch of one, or every candidate a caption of the same clip) gets no negative.

    Returns:
        `(indices, has_negative)`: the drawn candidate per row (`-1` where there is none) and a mask of the rows that
        have one. A drawn index is never a positive.
    """
    candidates = ~positives
    has_negative = candidates.any(dim=1)
    logits = similarity.float().masked_fill(positives, float("-inf"))
    weights = torch.softmax(logits.masked_fill(~has_negative[:, None], 0.0), dim=1) * candidates
    # Underflow (all weights zero) or non-finite similarities: draw uniformly among the candidates instead.
    broken = ~torch.isfinite(weights).all(dim=1) | (weights.sum(dim=1) <= 0)
    weights = torch.where(broken[:, None], candidates.float(), weights)
    weights = torch.where(has_negative[:, None], weights, torch.ones_like(weights))  # any row, ignored below
    indices = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return indices.masked_fill(~has_negative, -1), has_negative


def atm_loss(itm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Audio-text matching loss: cross-entropy of the match / no-match logits `(pairs, 2)` (no label smoothing)."""
    return F.cross_entropy(itm_logits.float(), labels)


def atg_loss(lm_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """
    Audio-grounded text generation loss: next-token cross-entropy over the caption.

    `lm_logits` `(batch, length, vocab)` at position t predict `labels[:, t + 1]`; labels are -100 at padding. The mean
    runs over every predicted token of the batch, with LAVIS' label smoothing.
    """
    shifted_logits = lm_logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def _to_dtype_of(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`hidden_states` in the dtype of `module`'s weight: a float16 model keeps the Q-Former in float32, not its heads."""
    return hidden_states.to(module.weight.dtype)


def same_batch(tensor: torch.Tensor) -> torch.Tensor:
    """The single-process batch gatherer: every process's tensors are this process's."""
    return tensor


@dataclass
class AudioQFormerAudioOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`AudioQFormerModel.get_audio_features`]: transformers' `BaseModelOutputWithPooling` of the audio side
    (as CLAP's `get_audio_features`), the pooled output being the projected embeddings.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_audio_tokens, audio_hidden_size)`):
        BEATs' output tokens (what a feature cache stores; the matching head reads them again).
    pooler_output (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, embed_dim)`):
        The clips' embeddings, one per query token, L2-normalised; also available as `audio_embeds`. Score texts
        against them with [`AudioQFormerModel.score`].
    hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
        BEATs' per-layer outputs and attention weights, when asked and BEATs ran (not with cached tokens).
    query_output (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, hidden_size)`):
        The Q-Former's query outputs, before the projection.
    audio_attention_mask (`torch.LongTensor` of shape `(batch_size, num_audio_tokens)`):
        1 for real audio tokens, 0 for padding.
    """

    query_output: torch.FloatTensor | None = None
    audio_attention_mask: torch.LongTensor | None = None

    @property
    def audio_embeds(self) -> torch.FloatTensor:
        """The normalised audio embeddings (`pooler_output`), under the name of CLAP's and this model's outputs."""
        return self.pooler_output


@dataclass
class AudioQFormerTextOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`AudioQFormerModel.get_text_features`]: transformers' `BaseModelOutputWithPooling` of the text side.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        The Q-Former's output for every text token.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
        The texts' embeddings (the projected `[CLS]` output, or mean), L2-normalised; also available as `text_embeds`.
    hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
        The Q-Former's per-layer outputs and attention weights, when asked.
    """

    @property
    def text_embeds(self) -> torch.FloatTensor:
        """The normalised text embeddings (`pooler_output`), under the name of CLAP's and this model's outputs."""
        return self.pooler_output


@dataclass
class AudioQFormerOutput(ModelOutput):
    r"""
    Output of [`AudioQFormerModel.forward`].

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        `loss_atc + loss_atm + loss_atg`, the three BLIP-2 objectives with unit weights.
    loss_atc (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        Audio-text contrastive loss ([`atc_loss`]).
    loss_atm (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        Audio-text matching loss on the positive pairs and in-batch hard negatives ([`atm_loss`]).
    loss_atg (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        Audio-grounded caption generation loss ([`atg_loss`]).
    logits_per_audio (`torch.FloatTensor` of shape `(audio_batch_size, text_batch_size)`):
        Max-over-queries cosine similarity divided by the learnt temperature.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, audio_batch_size)`):
        The transpose of `logits_per_audio`.
    itm_logits (`torch.FloatTensor` of shape `(batch_size, 2)`, *optional*):
        No-match / match logits of the (audio, text) pairs, averaged over the query tokens; returned when
        `use_audio_text_matching_head=True` (paired inputs).
    audio_embeds (`torch.FloatTensor` of shape `(audio_batch_size, num_query_tokens, embed_dim)`):
        Normalised audio embeddings.
    text_embeds (`torch.FloatTensor` of shape `(text_batch_size, embed_dim)`):
        Normalised text embeddings.
    audio_model_output ([`AudioQFormerAudioOutput`]):
        The audio side in full (query outputs, BEATs tokens and mask).
    text_model_output ([`AudioQFormerTextOutput`]):
        The text side in full.
    """

    loss: torch.FloatTensor | None = None
    loss_atc: torch.FloatTensor | None = None
    loss_atm: torch.FloatTensor | None = None
    loss_atg: torch.FloatTensor | None = None
    logits_per_audio: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    audio_model_output: AudioQFormerAudioOutput | None = None
    text_model_output: AudioQFormerTextOutput | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            value.to_tuple() if isinstance(value, ModelOutput) else value for value in super().to_tuple()
        )



def copy_endpoint_files(names, save_directory: str, loaded_from: str | None = None):
    """
    Copy `names` into `save_directory` from beside this module, else from the folder (or cached Hub repository) the
    model was loaded from: remote code runs from a cache that holds only the model's own modules. A file found in
    neither place is named in a warning.
    """
    import shutil

    from huggingface_hub import try_to_load_from_cache

    missing = []
    for name in names:
        candidates = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]
        if loaded_from and os.path.isdir(loaded_from):
            candidates.append(os.path.join(loaded_from, name))
        elif loaded_from:
            cached = try_to_load_from_cache(loaded_from, name)
            candidates += [cached] if isinstance(cached, str) else []
        source = next((path for path in candidates if os.path.isfile(path)), None)
        target = os.path.join(save_directory, name)
        if source is None:
            missing.append(name)
        elif not os.path.exists(target) or not os.path.samefile(source, target):
            shutil.copyfile(source, target)
    if missing:
        logger.warning(
            f"Saved to {save_directory} without {', '.join(missing)} (not found beside the model's code or in "
            f"{loaded_from or 'the folder it came from'}): the folder cannot serve as an Inference Endpoint."
        )


class AudioQFormerPreTrainedModel(PreTrainedModel):
    config: AudioQFormerConfig
    base_model_prefix = "audio_qformer"
    main_input_name = "input_ids"  # `forward`'s first argument (audio comes as `input_features` or cached tokens)
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # because the BLIP-2 Q-Former does not support FA2 (and is kept in fp32)
    # Kept in float32 under a float16 load: the Q-Former as BLIP-2 keeps it, BEATs (the official model overflows to
    # NaN in fp16), the audio LayerNorm before the Q-Former (LAVIS' fp32 `ln_vision`), and the word embeddings, which
    # feed the Q-Former and are tied to the caption head. The projections and the matching head may be float16: their
    # input is cast (`_to_dtype_of`).
    _keep_in_fp32_modules = ["query_tokens", "qformer", "audio_model", "embeddings", "audio_layernorm", "lm_head"]
    _no_split_modules = ["BeatsEncoderLayer", "Blip2QFormerLayer", "Blip2TextEmbeddings"]

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, AudioQFormerModel):
            # LAVIS draws the queries from N(0, 0.02) (transformers' BLIP-2 zeros them); the temperature starts at 0.07.
            init.normal_(module.query_tokens, mean=0.0, std=config.initializer_range)
            init.constant_(module.temperature, config.temperature_init)
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)


class AudioQFormerModel(AudioQFormerPreTrainedModel, GenerationMixin):
    r"""
    Text-to-audio retrieval (and audio captioning) with a frozen BEATs encoder and a BLIP-2 Q-Former.

    - `get_audio_features` turns clips (fbank, or cached BEATs tokens) into `(batch, 32, 256)` normalised embeddings;
    - `get_text_features` turns captions into `(batch, 256)` normalised embeddings;
    - `score(audio_embeds, text_embeds)` scores them (cosine of the best query; `logits_per_audio` of `forward` is
      this over the temperature); `zero_shot_logits` scores labels for a clip embedded as windows;
    - `get_audio_text_matching_logits` scores (clip, caption) pairs with the matching head, for re-ranking;
    - `forward(..., return_loss=True)` computes the three training losses;
    - `generate` writes captions of clips with the caption head (`processor.batch_decode` turns them into text).

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from configuration_audio_qformer import AudioQFormerConfig
    >>> from modeling_audio_qformer import AudioQFormerModel

    >>> config = AudioQFormerConfig(
    ...     audio_config={"encoder_layers": 2, "encoder_embed_dim": 64, "encoder_attention_heads": 4, "encoder_ffn_embed_dim": 128},
    ...     qformer_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    ... )
    >>> model = AudioQFormerModel(config).eval()
    >>> features = torch.randn(2, 300, 128)  # normalised fbank of two 3 s clips
    >>> with torch.inference_mode():
    ...     audio_embeds = model.get_audio_features(input_features=features).audio_embeds
    ...     text_embeds = model.get_text_features(input_ids=torch.tensor([[101, 2000, 102]])).text_embeds
    >>> audio_embeds.shape, text_embeds.shape
    (torch.Size([2, 32, 256]), torch.Size([1, 256]))
    ```"""

    _tied_weights_keys = {
        "lm_head.decoder.weight": "embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias",
    }

    def __init__(self, config: AudioQFormerConfig):
        super().__init__(config)
        # Compared by model type, not class: as Hub remote code the config and the model may come from two copies of
        # the same module, whose classes differ.
        for name, expected in (("audio_config", BeatsConfig), ("qformer_config", Blip2QFormerConfig)):
            found = getattr(config, name)
            if getattr(found, "model_type", None) != expected.model_type:
                raise TypeError(f"config.{name} must be a {expected.__name__}, found {type(found).__name__}.")
        qformer_config = config.qformer_config
        hidden_size = qformer_config.hidden_size
        self.audio_model = BeatsModel._from_config(config.audio_config)
        # BLIP-2's `ln_vision`: the one trainable module between the frozen encoder and the Q-Former.
        self.audio_layernorm = nn.LayerNorm(config.audio_config.hidden_size, eps=config.audio_config.layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden_size))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel._from_config(qformer_config)
        self.audio_projection = nn.Linear(hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(hidden_size, 2)
        self.lm_head = BertLMPredictionHead(qformer_config)
        # Divides the cosine similarities (LAVIS `temp`); learnt, clamped by the training loop.
        self.temperature = nn.Parameter(torch.tensor(config.temperature_init))
        self.post_init()
        self.audio_model.requires_grad_(False)
        self.audio_model.eval()
        # Replaces the one derived from the config (which knows no caption settings); a saved generation_config.json
        # replaces this one when loading.
        self.generation_config = caption_generation_config(config)

    def train(self, mode: bool = True):
        """Set the training mode of everything but BEATs, which stays frozen in eval mode (no LayerDrop, no dropout)."""
        super().train(mode)
        self.audio_model.eval()
        return self

    # The files beside this one that serve a saved folder as an Inference Endpoint (`handler.py`, the audio decoding it
    # imports and its extra packages): `save_pretrained`, and so `push_to_hub`, copy them with the model.
    endpoint_files = ("handler.py", "audio_io.py", "requirements.txt")

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            copy_endpoint_files(self.endpoint_files, save_directory, self.name_or_path)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings.word_embeddings = value

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        # The caption head starts every caption with the [DEC] token: a vocabulary without it would fail at the next
        # forward with an IndexError, far from the cause.
        if new_num_tokens is not None:
            size = new_num_tokens if not pad_to_multiple_of else -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
            if size <= self.config.decoder_bos_token_id:
                raise ValueError(
                    f"Cannot resize the Q-Former vocabulary to {size} tokens: the caption head's [DEC] token has id "
                    f"{self.config.decoder_bos_token_id} (`config.decoder_bos_token_id`), so it needs at least "
                    f"{self.config.decoder_bos_token_id + 1}."
                )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head.decoder = new_embeddings
        self.lm_head.bias = new_embeddings.bias

    # --- audio -------------------------------------------------------------------------------------------------------

    def get_audio_hidden_states(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        BEATs' tokens and token mask for a normalised fbank (frozen: no gradient, eval mode). What a cache stores.
        BEATs always runs in fp32, also under autocast: the official model overflows to NaN in fp16.
        """
        outputs = self._run_beats(input_features, feature_attention_mask)
        return outputs.last_hidden_state, outputs.audio_attention_mask

    @torch.no_grad()
    def _run_beats(self, input_features, feature_attention_mask, **kwargs) -> BeatsModelOutput:
        with torch.autocast(device_type=input_features.device.type, enabled=False):
            dtype = self.audio_model.patch_embedding.weight.dtype
            return self.audio_model(input_features.to(dtype), feature_attention_mask, return_dict=True, **kwargs)

    def _audio_inputs(
        self, input_features, feature_attention_mask, audio_hidden_states, audio_attention_mask, **kwargs
    ) -> BeatsModelOutput:
        """
        BEATs' output (tokens, mask, and what `kwargs` asks: `output_hidden_states`, `output_attentions`), from an
        fbank or from precomputed tokens (exactly one must be given).
        """
        if (input_features is None) == (audio_hidden_states is None):
            raise ValueError("Pass either `input_features` (fbank) or `audio_hidden_states` (BEATs tokens), not both.")
        if input_features is not None:
            return self._run_beats(input_features, feature_attention_mask, **kwargs)
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones(
                audio_hidden_states.shape[:2], dtype=torch.long, device=audio_hidden_states.device
            )
        return BeatsModelOutput(last_hidden_state=audio_hidden_states, audio_attention_mask=audio_attention_mask)

    def _query_pass(
        self, audio_hidden_states, audio_attention_mask, input_ids=None, attention_mask=None, causal_text=True,
        **kwargs,
    ):  # fmt: skip
        """
        The Q-Former on the query tokens (reading the audio through cross-attention), optionally followed by a
        text. With `causal_text` (the ATG mask) the text attends to the queries and causally to itself and the queries
        never see it, so their outputs are the same with or without a text; otherwise (the matching mask) queries and
        text see each other. Returns the Q-Former's output (`kwargs` such as `output_hidden_states` reach it).
        """
        # One clip may go with several texts (`get_audio_text_matching_logits`): its keys and values broadcast.
        batch_size = audio_hidden_states.shape[0] if input_ids is None else input_ids.shape[0]
        queries = self.query_tokens.expand(batch_size, -1, -1)
        num_queries = queries.shape[1]
        embeddings = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            full_mask = torch.cat([attention_mask.new_ones(batch_size, num_queries), attention_mask], dim=1)

            def queries_then_causal_text(batch_idx, head_idx, q_idx, kv_idx):
                # Everyone sees the queries; text also sees earlier text (UniLM-style mask, LAVIS `BertLMHeadModel`).
                return (kv_idx < num_queries) | ((q_idx >= num_queries) & (kv_idx <= q_idx))

            mask = create_bidirectional_mask(
                config=self.qformer.config,
                inputs_embeds=embeddings,
                attention_mask=full_mask,
                and_mask_function=queries_then_causal_text,
                allow_is_bidirectional_skip=False,
            ) if causal_text else full_mask  # fmt: skip
        return self.qformer(
            query_embeds=embeddings,
            query_length=num_queries,
            attention_mask=mask,
            encoder_hidden_states=self.audio_layernorm(audio_hidden_states),
            encoder_attention_mask=self._cross_attention_mask(
                queries[: audio_hidden_states.shape[0]], audio_hidden_states, audio_attention_mask
            ),
            return_dict=True,
            **kwargs,
        )

    def _cross_attention_mask(self, queries, audio_hidden_states, audio_attention_mask):
        """
        The queries' mask over the audio tokens, built for the queries only. `Blip2QFormerModel` would build it for
        its whole input sequence, which is longer than the queries when a caption follows them, whereas only the
        queries cross-attend; a ready 4-D mask is used as given.
        """
        return create_bidirectional_mask(
            config=self.qformer.config,
            inputs_embeds=queries,
            attention_mask=audio_attention_mask,
            encoder_hidden_states=audio_hidden_states,
        )

    def get_audio_features(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AudioQFormerAudioOutput | tuple:
        r"""
        Normalised audio embeddings `(batch, num_query_tokens, embed_dim)` of clips (`pooler_output`, also
        `audio_embeds`), given either their fbank (`input_features`, `feature_attention_mask` from the feature
        extractor) or precomputed BEATs tokens (`audio_hidden_states`, `audio_attention_mask`, e.g. from a feature
        cache). `output_hidden_states` / `output_attentions` return BEATs' (when it runs).

        Example:

        ```python
        >>> outputs = model.get_audio_features(**feature_extractor(waveforms, sampling_rate=16000, return_tensors="pt"))
        >>> outputs.audio_embeds.shape
        torch.Size([2, 32, 256])
        ```"""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        beats = self._audio_inputs(
            input_features, feature_attention_mask, audio_hidden_states, audio_attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip
        query_output = self._query_pass(beats.last_hidden_state, beats.audio_attention_mask).last_hidden_state
        output = self._audio_output(query_output, beats)
        return output if return_dict else output.to_tuple()

    def _audio_output(self, query_output, beats: BeatsModelOutput) -> AudioQFormerAudioOutput:
        return AudioQFormerAudioOutput(
            last_hidden_state=beats.last_hidden_state,
            pooler_output=F.normalize(self.audio_projection(_to_dtype_of(self.audio_projection, query_output)), dim=-1),
            hidden_states=beats.hidden_states,
            attentions=beats.attentions,
            query_output=query_output,
            audio_attention_mask=beats.audio_attention_mask,
        )

    # --- text --------------------------------------------------------------------------------------------------------

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AudioQFormerTextOutput | tuple:
        r"""
        Normalised text embeddings `(batch, embed_dim)` (`pooler_output`, also `text_embeds`): the text alone through
        the Q-Former (no queries, no audio), its `[CLS]` output (or the mean over its tokens,
        `config.text_pooling="mean"`) projected. `token_type_ids` and other tokenizer outputs are accepted and ignored.

        Example:

        ```python
        >>> inputs = processor(text=["a dog barks", "rain on a roof"], return_tensors="pt")
        >>> model.get_text_features(**inputs).text_embeds.shape
        torch.Size([2, 256])
        ```"""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        recorded = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        qformer_output = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
            return_dict=True,
            **{name: value for name, value in recorded.items() if value is not None},
        )
        last_hidden_state = qformer_output.last_hidden_state
        if self.config.text_pooling == "mean":
            weights = (attention_mask if attention_mask is not None else torch.ones_like(input_ids))[..., None]
            weights = weights.to(last_hidden_state.dtype)
            pooled = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = last_hidden_state[:, 0, :]
        output = AudioQFormerTextOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=F.normalize(self.text_projection(_to_dtype_of(self.text_projection, pooled)), dim=-1),
            hidden_states=qformer_output.hidden_states,
            attentions=qformer_output.attentions,
        )
        return output if return_dict else output.to_tuple()

    def score(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """
        The retrieval score `(num_audio, num_text)` of embeddings from `get_audio_features` and `get_text_features`:
        the cosine of each clip's best query token for each text ([`max_over_queries`]). Search ranks by it;
        `forward`'s `logits_per_audio` divide it by the learnt temperature.
        """
        return max_over_queries(audio_embeds, text_embeds)

    def zero_shot_logits(self, window_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """
        Zero-shot classification logits `(num_text,)` of one clip embedded as windows `(windows, queries, dim)`: each
        label scores as the clip's best window, on `forward`'s `logits_per_audio` scale (the cosine over the
        temperature). For a clip within one window, its softmax is the zero-shot audio classification pipeline's.
        """
        scores = self.score(window_embeds, text_embeds).amax(0)
        return scores / self.temperature.to(scores.device, scores.dtype)

    # --- matching ----------------------------------------------------------------------------------------------------

    def get_audio_text_matching_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        No-match / match logits `(batch, 2)` of paired clips and captions: queries and caption in one bidirectional
        sequence, queries reading the audio; the matching head's logits averaged over the query outputs. The
        re-ranking score is the match logit, `[:, 1]`.

        One clip against several texts may be passed as a batch of one clip: the keys and values of its audio tokens
        (the cross-attention's largest products) are then computed once for all the texts (transformers' Q-Former
        broadcasts them), the same logits as with the clip repeated.
        """
        beats = self._audio_inputs(input_features, feature_attention_mask, audio_hidden_states, audio_attention_mask)
        audio_hidden_states, audio_attention_mask = beats.last_hidden_state, beats.audio_attention_mask
        if audio_hidden_states.shape[0] not in (1, input_ids.shape[0]):
            raise ValueError(
                f"Audio-text matching scores pairs (or one clip against several texts): got "
                f"{audio_hidden_states.shape[0]} clips and {input_ids.shape[0]} texts."
            )
        sequence_output = self._query_pass(
            audio_hidden_states, audio_attention_mask, input_ids, attention_mask, causal_text=False
        ).last_hidden_state
        query_output = sequence_output[:, : self.config.num_query_tokens, :]
        return self.itm_head(_to_dtype_of(self.itm_head, query_output)).mean(dim=1)

    # --- captions ----------------------------------------------------------------------------------------------------

    # A caption is decoded as the caption loss reads it (LAVIS `Blip2Qformer.generate`): `[DEC]` first, each token
    # attending to the 32 query outputs and to the tokens before it, the queries never seeing the text. So the queries'
    # keys and values in every layer depend on the clip alone: they are computed once per clip (the caption prefix), and
    # each new token runs the Q-Former's text path alone (self-attention, then the text feed-forward; no
    # cross-attention), its own keys and values appended to a `DynamicCache`.

    @staticmethod
    def _split_heads(attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.view(*hidden_states.shape[:-1], -1, attention.attention_head_size).transpose(1, 2)

    def get_caption_prefix(
        self, audio_hidden_states: torch.Tensor, audio_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        The query tokens' keys and values in each Q-Former layer's self-attention for clips given as BEATs tokens:
        `(batch, layers, 2, heads, num_query_tokens, head_dim)`, what every caption token attends to besides the
        caption itself.
        """
        beats = self._audio_inputs(None, None, audio_hidden_states, audio_attention_mask)  # the default mask
        layer_inputs = self._query_pass(
            beats.last_hidden_state, beats.audio_attention_mask, output_hidden_states=True
        ).hidden_states
        keys_values = []
        for layer, layer_input in zip(self.qformer.encoder.layer, layer_inputs):
            attention = layer.attention.attention
            keys_values.append(torch.stack([
                self._split_heads(attention, attention.key(layer_input)),
                self._split_heads(attention, attention.value(layer_input)),
            ], dim=1))  # fmt: skip
        return torch.stack(keys_values, dim=1)

    def _caption_token_pass(self, token_ids: torch.LongTensor, caption_prefix: torch.Tensor, cache: Cache):
        """The Q-Former's last hidden state `(batch, 1, hidden)` of one more caption token per row (`token_ids`)."""
        position_ids = torch.full_like(token_ids, cache.get_seq_length())  # caption positions count from [DEC] = 0
        hidden_states = self.qformer.layernorm(self.embeddings(input_ids=token_ids, position_ids=position_ids))
        hidden_states = self.qformer.dropout(hidden_states)
        for index, layer in enumerate(self.qformer.encoder.layer):
            attention = layer.attention.attention
            keys, values = cache.update(
                self._split_heads(attention, attention.key(hidden_states)),
                self._split_heads(attention, attention.value(hidden_states)),
                index,
            )
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                attention.config._attn_implementation, qformer_eager_attention_forward
            )
            # One query token, which sees every key: no mask.
            context, _ = attention_interface(
                attention,
                self._split_heads(attention, attention.query(hidden_states)),
                torch.cat([caption_prefix[:, index, 0], keys], dim=2),
                torch.cat([caption_prefix[:, index, 1], values], dim=2),
                None,
                dropout=0.0 if not self.training else attention.attention_dropout,
                scaling=attention.scaling,
            )
            hidden_states = layer.attention.output(context.reshape(*hidden_states.shape[:-1], -1), hidden_states)
            hidden_states = layer.feed_forward_chunk(hidden_states)
        return hidden_states

    def _caption_logits(
        self, input_ids: torch.LongTensor, caption_prefix: torch.Tensor, cache: Cache | None = None
    ) -> CausalLMOutputWithPast:
        """Next-token logits after each of `input_ids`, which continue the captions held in `cache` (a new one if none)."""
        if cache is None:
            cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        # Token by token: a step of generation is one token; a longer input (a prompt, or `use_cache=False`) is rare and
        # short, and this way needs no mask.
        hidden_states = torch.cat(
            [self._caption_token_pass(input_ids[:, [t]], caption_prefix, cache) for t in range(input_ids.shape[1])],
            dim=1,
        )
        return CausalLMOutputWithPast(logits=self.lm_head(hidden_states), cache=cache)

    @torch.no_grad()
    def generate(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        generation_config=None,
        **kwargs,
    ):
        r"""
        Caption clips, given as fbank (`input_features`, `feature_attention_mask`) or BEATs tokens
        (`audio_hidden_states`, `audio_attention_mask`): transformers' `GenerationMixin.generate` on the caption head,
        with the queries' keys and values computed once per clip. Returns token ids starting with `[DEC]` (or what
        `generate` returns with `return_dict_in_generate=True`); `processor.batch_decode(ids, skip_special_tokens=True)`
        gives the texts.

        Defaults (`model.generation_config`): LAVIS' beam search, 3 beams, at most 30 tokens, at least 8. Any
        `generate` option applies: `num_beams=1` is greedy, `do_sample=True, top_p=0.9` LAVIS' nucleus sampling.
        `input_ids` may start the captions (same length in every row, `[DEC]` first).

        Example:

        ```python
        >>> inputs = processor(audio=waveforms, sampling_rate=16000, return_tensors="pt")
        >>> processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
        ['a dog barks while cars pass by', ...]
        ```"""
        beats = self._audio_inputs(input_features, feature_attention_mask, audio_hidden_states, audio_attention_mask)
        caption_prefix = self.get_caption_prefix(beats.last_hidden_state, beats.audio_attention_mask)
        if input_ids is None:
            input_ids = torch.full(
                (caption_prefix.shape[0], 1), self.config.decoder_bos_token_id, device=caption_prefix.device
            )
        cache_implementation = kwargs.get("cache_implementation") or getattr(generation_config, "cache_implementation", None)
        if cache_implementation not in (None, "dynamic"):
            # A caption token attends to every cached key without a mask: a cache of fixed size would hold empty slots.
            raise ValueError(f"Captions are generated with a dynamic cache; got cache_implementation={cache_implementation!r}.")
        return super().generate(
            input_ids=input_ids, generation_config=generation_config, caption_prefix=caption_prefix, **kwargs
        )

    def adjust_generation_fn(self, *args, **kwargs):
        # `from_pretrained` loads generation_config.json here; a folder saved before captioning has none, and
        # transformers then derives one from config.json, which says nothing of captions: take the caption defaults.
        super().adjust_generation_fn(*args, **kwargs)
        if getattr(self.generation_config, "_from_model_config", False):
            self.generation_config = caption_generation_config(self.config)

    # --- everything at once ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        audio_ids: torch.LongTensor | None = None,
        return_loss: bool = False,
        use_audio_text_matching_head: bool = False,
        batch_gatherer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        caption_prefix: torch.Tensor | None = None,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AudioQFormerOutput | CausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids, attention_mask (`torch.LongTensor` of shape `(text_batch_size, length)`):
                Tokenized texts ([`AudioQFormerProcessor`]). `token_type_ids` is accepted and ignored.
            input_features, feature_attention_mask:
                Normalised fbank `(audio_batch_size, frames, 128)` and frame mask, from [`BeatsFeatureExtractor`].
            audio_hidden_states, audio_attention_mask:
                Precomputed BEATs tokens `(audio_batch_size, tokens, 768)` and their mask, instead of the fbank.
            audio_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                With `return_loss`: an id per clip, so that captions of one clip are not each other's negatives.
                Defaults to all-distinct ids.
            return_loss (`bool`, *optional*, defaults to `False`):
                Compute `loss`, `loss_atc`, `loss_atm`, `loss_atg` on a paired batch (caption i describes clip i).
            use_audio_text_matching_head (`bool`, *optional*, defaults to `False`):
                Also return `itm_logits` for the (clip i, caption i) pairs.
            batch_gatherer (`Callable`, *optional*):
                With `return_loss` across processes: maps a local tensor to its concatenation over all processes,
                differentiably (each slice's gradient goes back to the process that owns it, as LAVIS'
                `GatherLayer` does; `train.make_batch_gatherer`). Contrastive candidates and hard negatives are then
                drawn from the global batch; whether the candidates carry gradient is `config.atc_gather_with_grad`.
                Defaults to this process's batch only. `audio_ids` are required with a gatherer.
            generator (`torch.Generator`, *optional*):
                Random generator for the hard-negative draw (reproducible training).
            caption_prefix (`torch.Tensor`, *optional*), cache ([`Cache`], *optional*):
                A step of caption generation (`generate` passes them): the clips' [`get_caption_prefix`] and the
                captions' keys and values so far; `input_ids` are the next tokens. Returns a [`CausalLMOutputWithPast`]
                (next-token `logits`, `cache`) and ignores every other argument.
        """
        if caption_prefix is not None:
            return self._caption_logits(input_ids, caption_prefix, cache)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None:
            raise ValueError("AudioQFormerModel.forward needs `input_ids` (texts) as well as audio.")
        beats = self._audio_inputs(input_features, feature_attention_mask, audio_hidden_states, audio_attention_mask)
        audio_hidden_states, audio_attention_mask = beats.last_hidden_state, beats.audio_attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_output = self.get_text_features(input_ids, attention_mask, return_dict=True)
        text_embeds = text_output.text_embeds

        decoder_input_ids = None
        if return_loss:
            if audio_hidden_states.shape[0] != input_ids.shape[0]:
                raise ValueError("return_loss=True needs paired inputs: as many clips as captions.")
            # The caption decoder starts from [DEC] instead of [CLS] (LAVIS `decoder_input_ids[:, 0] = bos`).
            decoder_input_ids = input_ids.clone()
            decoder_input_ids[:, 0] = self.config.decoder_bos_token_id
        # With a caption, one pass gives both the audio queries (which never see the text) and the caption logits.
        sequence_output = self._query_pass(
            audio_hidden_states, audio_attention_mask, decoder_input_ids, attention_mask
        ).last_hidden_state
        num_queries = self.config.num_query_tokens
        audio_output = self._audio_output(sequence_output[:, :num_queries, :], beats)
        audio_embeds = audio_output.audio_embeds

        logits_per_audio = self.score(audio_embeds, text_embeds) / self.temperature
        itm_logits = None
        if use_audio_text_matching_head:
            itm_logits = self.get_audio_text_matching_logits(
                input_ids, attention_mask, audio_hidden_states=audio_hidden_states,
                audio_attention_mask=audio_attention_mask,
            )  # fmt: skip

        losses = {}
        if return_loss:
            losses = self._losses(
                audio_output, text_embeds, input_ids, attention_mask, decoder_input_ids,
                sequence_output[:, num_queries:, :], audio_ids, batch_gatherer, generator,
            )  # fmt: skip

        output = AudioQFormerOutput(
            **losses,
            logits_per_audio=logits_per_audio,
            logits_per_text=logits_per_audio.t(),
            itm_logits=itm_logits,
            audio_embeds=audio_embeds,
            text_embeds=text_embeds,
            audio_model_output=audio_output,
            text_model_output=text_output,
        )
        return output if return_dict else output.to_tuple()

    def _losses(
        self, audio_output, text_embeds, input_ids, attention_mask, decoder_input_ids, caption_output, audio_ids,
        batch_gatherer, generator,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """ATC, ATM and ATG as LAVIS `Blip2Qformer.forward` computes them, over the gathered batch."""
        batch_size = input_ids.shape[0]
        if audio_ids is None:
            if batch_gatherer is not None:
                raise ValueError("Training across processes needs `audio_ids` (ids must be unique across processes).")
            audio_ids = torch.arange(batch_size, device=input_ids.device)
        gather = batch_gatherer or same_batch
        all_audio_ids = gather(audio_ids)
        positives = audio_ids[:, None] == all_audio_ids[None, :]

        # ATC: local clips against all captions, local captions against all clips.
        logits_per_audio, logits_per_text = contrastive_logits(
            audio_output.audio_embeds, text_embeds, gather, self.temperature, self.config.atc_gather_with_grad
        )
        loss_atc = atc_loss(logits_per_audio, logits_per_text, positives, self.config.label_smoothing)

        # ATM: one hard negative clip per caption and one hard negative caption per clip, drawn from the similarities.
        negative_audio, caption_has_negative = sample_hard_negatives(logits_per_text.detach(), positives, generator)
        negative_text, audio_has_negative = sample_hard_negatives(logits_per_audio.detach(), positives, generator)
        all_audio_states = gather(audio_output.last_hidden_state)
        all_audio_masks, all_input_ids, all_attention_masks = (
            gather(audio_output.audio_attention_mask), gather(input_ids), gather(attention_mask),
        )  # fmt: skip
        rows = torch.arange(batch_size, device=input_ids.device)
        with_negative_audio, with_negative_text = rows[caption_has_negative], rows[audio_has_negative]
        pair_input_ids = torch.cat(
            [input_ids, input_ids[with_negative_audio], all_input_ids[negative_text[with_negative_text]]]
        )
        pair_attention_mask = torch.cat(
            [attention_mask, attention_mask[with_negative_audio], all_attention_masks[negative_text[with_negative_text]]]
        )
        pair_audio_states = torch.cat(
            [audio_output.last_hidden_state, all_audio_states[negative_audio[with_negative_audio]],
             audio_output.last_hidden_state[with_negative_text]]
        )  # fmt: skip
        pair_audio_masks = torch.cat(
            [audio_output.audio_attention_mask, all_audio_masks[negative_audio[with_negative_audio]],
             audio_output.audio_attention_mask[with_negative_text]]
        )  # fmt: skip
        itm_logits = self.get_audio_text_matching_logits(
            pair_input_ids, pair_attention_mask, audio_hidden_states=pair_audio_states,
            audio_attention_mask=pair_audio_masks,
        )  # fmt: skip
        itm_labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
        itm_labels[:batch_size] = 1
        loss_atm = atm_loss(itm_logits, itm_labels)

        # ATG: the caption, starting from [DEC], predicted token by token from the queries.
        labels = decoder_input_ids.masked_fill(attention_mask == 0, -100)
        loss_atg = atg_loss(self.lm_head(caption_output), labels, self.config.label_smoothing)
        return {"loss": loss_atc + loss_atm + loss_atg, "loss_atc": loss_atc, "loss_atm": loss_atm, "loss_atg": loss_atg}


AudioQFormerModel.register_for_auto_class("AutoModel")
BeatsModel.register_for_auto_class("AutoModel")


__all__ = [
    "AudioQFormerModel",
    "AudioQFormerOutput",
    "AudioQFormerAudioOutput",
    "AudioQFormerTextOutput",
    "AudioQFormerPreTrainedModel",
    "BeatsModel",
    "BeatsModelOutput",
    "BeatsPreTrainedModel",
    "atc_loss",
    "atg_loss",
    "atm_loss",
    "max_over_queries",
    "sample_hard_negatives",
]
