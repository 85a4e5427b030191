# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Configuration classes of the audio Q-Former text-to-audio retrieval system.

`BeatsConfig` describes the frozen BEATs audio encoder. Its field names are those of the official
`BEATsConfig` (microsoft/unilm, `beats/BEATs.py`) so that the `cfg` dict stored inside an official
checkpoint becomes a config with `BeatsConfig(**checkpoint["cfg"])`.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


@strict
class BeatsConfig(PreTrainedConfig):
    r"""
    Configuration of [`BeatsModel`], the BEATs audio encoder (Chen et al., 2022, "BEATs: Audio Pre-Training with
    Acoustic Tokenizers"). The defaults are the values stored in the official `BEATs_iter3_plus_AS2M.pt` checkpoint
    (BEATs iter3+, pre-trained on AudioSet-2M): a 12-layer, 768-wide post-LayerNorm transformer with DeepNorm residuals
    and a gated relative position bias, fed with 16x16 patches of a 128-bin Kaldi fbank. The official code's own
    defaults differ (`deep_norm=False`, `max_distance=1280`, dropouts 0.1, ...); a config must therefore always be
    built from a checkpoint's `cfg`, never from the official defaults.

    Args:
        input_patch_size (`int`, *optional*, defaults to 16):
            Side of the square patches cut from the (frames x mel bins) fbank. A patch covers 16 frames (160 ms) and 16
            mel bins, so a 128-bin fbank gives 8 frequency patches per 160 ms time patch.
        embed_dim (`int`, *optional*, defaults to 512):
            Channels of the patch embedding convolution, before `post_extract_proj` maps them to `encoder_embed_dim`.
        conv_bias (`bool`, *optional*, defaults to `False`):
            Whether the patch embedding convolution has a bias.
        encoder_layers (`int`, *optional*, defaults to 12):
            Number of transformer layers.
        encoder_embed_dim (`int`, *optional*, defaults to 768):
            Width of the transformer, and of the tokens the encoder returns.
        encoder_ffn_embed_dim (`int`, *optional*, defaults to 3072):
            Inner width of each layer's feed-forward network.
        encoder_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads per layer (head size 64 at the defaults).
        activation_fn (`str`, *optional*, defaults to `"gelu"`):
            Feed-forward activation: `"gelu"` (exact erf GELU), `"gelu_accurate"` (tanh approximation), `"relu"`,
            `"tanh"` or `"linear"`.
        layer_wise_gradient_decay_ratio (`float`, *optional*, defaults to 0.6):
            Every layer multiplies the gradient flowing back into it by this factor (identity in the forward pass). It
            only matters when BEATs itself is trained; this project keeps it frozen.
        layer_norm_first (`bool`, *optional*, defaults to `False`):
            Pre-LayerNorm layers when `True`; iter3+ uses post-LayerNorm layers.
        deep_norm (`bool`, *optional*, defaults to `True`):
            DeepNorm residuals: the residual branch is scaled by `(2 * encoder_layers) ** 0.25` before each post
            LayerNorm. Loading iter3+ weights with `deep_norm=False` gives near-random features.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the residual branches and after the positional convolution.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        activation_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after the feed-forward activation.
        encoder_layerdrop (`float`, *optional*, defaults to 0.05):
            Probability of skipping a whole layer in training mode (LayerDrop). Keep a frozen encoder in eval mode.
        dropout_input (`float`, *optional*, defaults to 0.0):
            Dropout on the projected patch embeddings.
        conv_pos (`int`, *optional*, defaults to 128):
            Kernel size of the convolutional positional embedding, which runs over the flattened token sequence.
        conv_pos_groups (`int`, *optional*, defaults to 16):
            Groups of the convolutional positional embedding.
        relative_position_embedding (`bool`, *optional*, defaults to `True`):
            Whether attention adds a learnt relative position bias (one table shared by all layers).
        num_buckets (`int`, *optional*, defaults to 320):
            Buckets of the relative position bias (half for each direction).
        max_distance (`int`, *optional*, defaults to 800):
            Token distance from which all relative positions share the last bucket.
        gru_rel_pos (`bool`, *optional*, defaults to `True`):
            Whether each layer gates the relative position bias with a per-query factor computed from its projected
            query (the "gated relative position bias" of WavLM, with BEATs' own gate input).
        finetuned_model (`bool`, *optional*, defaults to `False`):
            `True` in the official AudioSet-fine-tuned checkpoints, which add a classifier (`predictor`). This project
            uses BEATs as an encoder and drops that head on loading.
        predictor_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before the fine-tuned checkpoints' classifier (unused here).
        predictor_class (`int`, *optional*, defaults to 527):
            Classes of the fine-tuned checkpoints' classifier (AudioSet's 527; unused here).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm in BEATs (PyTorch's default, which the official code relies on).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights (BERT style, as fairseq's
            `init_bert_params`).

    Example:

    ```python
    >>> from configuration_audio_qformer import BeatsConfig
    >>> from modeling_audio_qformer import BeatsModel

    >>> # The BEATs iter3+ AS2M architecture
    >>> configuration = BeatsConfig()

    >>> # A model with random weights; use `BeatsModel.from_original_checkpoint` for the official weights
    >>> model = BeatsModel(configuration)
    >>> configuration = model.config
    ```"""

    model_type = "beats"
    base_config_key = "audio_config"
    # Standard names used by transformers' utilities, pointing at the official field names.
    attribute_map = {
        "hidden_size": "encoder_embed_dim",
        "num_hidden_layers": "encoder_layers",
        "num_attention_heads": "encoder_attention_heads",
        "intermediate_size": "encoder_ffn_embed_dim",
    }

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float | int = 0.6
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    encoder_layerdrop: float | int = 0.05
    dropout_input: float | int = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_dropout: float | int = 0.1
    predictor_class: int = 527
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def validate_architecture(self):
        """Reject combinations the official code rejects or that cannot build a model."""
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("BeatsConfig: `deep_norm=True` requires post-LayerNorm layers (`layer_norm_first=False`).")
        if self.encoder_embed_dim % self.encoder_attention_heads != 0:
            raise ValueError(
                f"BeatsConfig: `encoder_embed_dim` ({self.encoder_embed_dim}) must be divisible by "
                f"`encoder_attention_heads` ({self.encoder_attention_heads})."
            )
        if self.input_patch_size <= 0:
            raise ValueError(f"BeatsConfig: `input_patch_size` must be positive, got {self.input_patch_size}.")
        if self.activation_fn not in ("gelu", "gelu_accurate", "gelu_fast", "relu", "tanh", "linear"):
            raise ValueError(
                f"BeatsConfig: `activation_fn={self.activation_fn!r}` is not supported; choose one of "
                "'gelu', 'gelu_accurate', 'relu', 'tanh', 'linear'."
            )


__all__ = ["BeatsConfig"]
