# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""PyTorch models of the audio Q-Former text-to-audio retrieval system.

`BeatsModel` is the frozen BEATs audio encoder (Chen et al., 2022). It is a re-implementation of the official code,
microsoft/unilm at commit 768a3c873f598bb9b4d4dfb9267b099e35f8fe56, folder `beats/` (`BEATs.py`, `backbone.py`),
written for transformers: scaled-dot-product attention with the relative position bias as an additive mask, the
weight-normalised positional convolution folded into a plain weight, one relative-position table for all layers, and an
exact token padding mask. Parameter names follow the official checkpoint, so its state dict maps one to one apart from
those two folds (see `BeatsModel.from_original_checkpoint`).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging


try:  # as a top-level module (installed, or run from the repository)
    from configuration_audio_qformer import BeatsConfig
except ImportError:  # as Hub remote code, where the files live in one package; transformers' import check skips `try`
    from .configuration_audio_qformer import BeatsConfig


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
    attention_mask (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
        1 for tokens computed from real audio, 0 for tokens of padding. Pass it on as the cross-attention mask of a
        model that reads `last_hidden_state`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The input of the first layer (after the positional convolution) and the output of every layer, each of shape
        `(batch_size, num_tokens, hidden_size)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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
    if (mask[:, 1:] > mask[:, :-1]).any():
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


class BeatsAttention(nn.Module):
    """
    Multi-head self-attention with BEATs' gated relative position bias.

    Each head adds `gate[h, i] * bias[h, i, j]` to its logits, where `bias` is the shared relative-position table and
    `gate = a * (b * grep_a[h] - 1) + 2` with `(a, b) = sigmoid` of a linear map of the head's *projected* query
    (unilm `beats/backbone.py`, `MultiheadAttention.forward`; WavLM gates with the layer input instead). The official
    code's scaling trick (q / 8 / 32, subtract the row max, times 32) equals plain 1/8 scaling, so SDPA runs it.
    """

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.encoder_embed_dim // config.encoder_attention_heads
        self.dropout = config.attention_dropout
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
    ) -> torch.Tensor:
        batch_size, length, width = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)

        attn_bias = key_padding_bias
        if position_bias is not None:
            if self.gru_rel_pos:
                # (batch, heads, length, 8) -> two gates per query, each the sum of 4 of the 8 outputs
                gates = self.grep_linear(query).view(batch_size, self.num_heads, length, 2, 4).sum(-1).sigmoid()
                gate_a, gate_b = gates.unbind(-1)
                gate = gate_a * (gate_b * self.grep_a.squeeze(-1) - 1.0) + 2.0
                position_bias = gate.unsqueeze(-1) * position_bias
            attn_bias = position_bias if attn_bias is None else position_bias + attn_bias
        if attn_bias is not None:
            attn_bias = attn_bias.to(query.dtype)

        attn_output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
        )
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, length, width)
        return self.out_proj(attn_output)


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

    def forward(self, hidden_states, position_bias=None, key_padding_bias=None) -> torch.Tensor:
        if self.layer_norm_first:
            attended = self.self_attn(self.self_attn_layer_norm(hidden_states), position_bias, key_padding_bias)
            hidden_states = hidden_states + self.dropout(attended)
            return hidden_states + self._feed_forward(self.final_layer_norm(hidden_states))
        attended = self.self_attn(hidden_states, position_bias, key_padding_bias)
        hidden_states = self.self_attn_layer_norm(hidden_states * self.residual_scale + self.dropout(attended))
        return self.final_layer_norm(hidden_states * self.residual_scale + self._feed_forward(hidden_states))


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
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False):
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

        position_bias = self.position_bias(hidden_states.shape[1], hidden_states.device)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = _scale_gradient(hidden_states, self.config.layer_wise_gradient_decay_ratio)
            if self.training and torch.rand([]).item() < self.config.encoder_layerdrop:
                pass  # LayerDrop: skip the layer (training mode only)
            else:
                hidden_states = layer(hidden_states, position_bias, key_padding_bias)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        if self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        return hidden_states, all_hidden_states


class BeatsPreTrainedModel(PreTrainedModel):
    config: BeatsConfig
    base_model_prefix = "beats"
    main_input_name = "input_features"
    input_modalities = "audio"
    _supports_sdpa = True  # attention always runs through torch's scaled_dot_product_attention
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
    >>> outputs.last_hidden_state.shape, outputs.attention_mask.sum(-1).tolist()
    (torch.Size([2, 496, 768]), [496, 296])
    ```"""

    def __init__(self, config: BeatsConfig):
        super().__init__(config)
        self.patch_embedding = nn.Conv2d(
            1, config.embed_dim, kernel_size=config.input_patch_size, stride=config.input_patch_size, bias=config.conv_bias
        )
        self.layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
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
            return_dict (`bool`, *optional*):
                Return a [`BeatsModelOutput`] (default) or a tuple.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
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
            attention_mask = token_attention_mask(feature_attention_mask, patch, num_frequency_patches, num_time_patches)
        else:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        encoder_mask = attention_mask if feature_attention_mask is not None else None
        hidden_states, all_hidden_states = self.encoder(hidden_states, encoder_mask, output_hidden_states)

        if not return_dict:
            return tuple(v for v in (hidden_states, attention_mask, all_hidden_states) if v is not None)
        return BeatsModelOutput(
            last_hidden_state=hidden_states, attention_mask=attention_mask, hidden_states=all_hidden_states
        )

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


__all__ = ["BeatsModel", "BeatsModelOutput", "BeatsPreTrainedModel"]
