# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Configuration classes of the audio Q-Former text-to-audio retrieval system.

`BeatsConfig` describes the frozen BEATs audio encoder. Its field names are those of the official
`BEATsConfig` (microsoft/unilm, `beats/BEATs.py`) so that the `cfg` dict stored inside an official
checkpoint becomes a config with `BeatsConfig(**checkpoint["cfg"])`. `AudioQFormerConfig` composes it with the
Q-Former's `Blip2QFormerConfig` (transformers' BLIP-2 Q-Former, reused as is), the way `Blip2Config` composes the
vision and Q-Former configs.
"""

from huggingface_hub.dataclasses import strict
from transformers import Blip2QFormerConfig, GenerationConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
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
        patch_embed_dim (`int`, *optional*, defaults to 512):
            Channels of the patch embedding convolution, before `post_extract_proj` maps them to `encoder_embed_dim`
            (the official `cfg` calls it `embed_dim`; that name is accepted).
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
        # The official checkpoints' `cfg` (and configs saved before the rename) call the patch channels
        # `embed_dim`, a name that means the shared space's width in `AudioQFormerConfig`.
        "embed_dim": "patch_embed_dim",
    }

    input_patch_size: int = 16
    patch_embed_dim: int = 512
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


# bert-base-uncased has 30522 tokens; the Q-Former adds `[DEC]`, which starts a generated caption (LAVIS
# `Blip2Base.init_tokenizer`), as token 30522.
BERT_BASE_VOCAB_SIZE_WITH_DEC = 30523
DECODER_TOKEN = "[DEC]"


def add_decoder_token(tokenizer):
    """Make `[DEC]` the tokenizer's `bos_token`, adding it to the vocabulary if needed (in place; returns it)."""
    if tokenizer.bos_token != DECODER_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DECODER_TOKEN})
    return tokenizer


@strict
class AudioQFormerConfig(PreTrainedConfig):
    r"""
    Configuration of [`AudioQFormerModel`]: a frozen BEATs audio encoder, a BLIP-2 Q-Former whose learnt query tokens
    read the audio tokens through cross-attention, projections into a shared audio-text embedding space, an
    audio-text matching head and a caption (language-modelling) head.

    `AudioQFormerConfig()` with no arguments is the paper's architecture: BEATs iter3+ (768 wide) and a bert-base
    sized Q-Former (12 layers, 768 wide, cross-attention every other layer, 32 queries, vocabulary 30523 with
    `[DEC]`). `audio_qformer.building.from_components` builds a config whose Q-Former takes the size of a given BERT
    checkpoint (e.g. the offline default, MiniLM-L6: 6 layers, 384 wide).

    Args:
        audio_config (`dict` or [`BeatsConfig`], *optional*):
            The BEATs encoder. Defaults to BEATs iter3+ AS2M.
        qformer_config (`dict` or [`Blip2QFormerConfig`], *optional*):
            The Q-Former. Defaults to bert-base sizes with a 30523-token vocabulary. Its `encoder_hidden_size` is set
            from the audio encoder's width and `use_qformer_text_input` to `True` (text runs through the Q-Former).
        num_query_tokens (`int`, *optional*, defaults to 32):
            Learnt query tokens; each audio clip is summarised as this many embeddings.
        embed_dim (`int`, *optional*, defaults to 256):
            Width of the shared audio-text embedding space (LAVIS' `embed_dim`, CLAP's `projection_dim`).
        temperature_init (`float`, *optional*, defaults to 0.07):
            Initial value of the learnt contrastive temperature, which divides the cosine similarities.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the contrastive and caption losses (LAVIS' value).
        atc_gather_with_grad (`bool`, *optional*, defaults to `False`):
            Whether the contrastive candidates gathered from the batch (the captions each clip is scored against, the
            clips each caption is scored against; this process's own included) carry gradient. `False` is LAVIS' (and
            so the report's) gradient: BLIP-2 gathers them with a no-grad `concat_all_gather`, on one process too, so
            the audio-to-text term trains only the audio side and the text-to-audio term only the text side. `True`
            trains both sides in each term (open_clip's `gather_with_grad`); the gradient then reaches every
            process's embeddings.
        train_max_text_length (`int`, *optional*, defaults to 32):
            Token length captions are padded or truncated to in training.
        eval_max_text_length (`int`, *optional*, defaults to 35):
            Token length queries are truncated to at retrieval time.
        rerank_top_k (`int`, *optional*, defaults to 16):
            How many of the best contrastive candidates the matching head re-ranks at retrieval time.
        text_pooling (`str`, *optional*, defaults to `"cls"`):
            How the text embedding summarises the Q-Former's text output: `"cls"`, the `[CLS]` token (BLIP-2 and the
            report), or `"mean"`, the mean over the caption's tokens. Use `"mean"` with a BERT trained for mean pooling,
            such as the packaged MiniLM-L6 sentence encoder, whose `[CLS]` output is almost the same for every text
            (cosine 0.9996 between captions; 1.0 in its first five layers), which stalls the contrastive loss.
        decoder_bos_token_id (`int`, *optional*, defaults to 30522):
            Id of `[DEC]`, which replaces `[CLS]` as the first token when the Q-Former generates a caption.
        decoder_eos_token_id (`int`, *optional*, defaults to 102):
            Id of `[SEP]`, which ends a caption: the last token the caption loss predicts, where generation stops.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the query tokens and new layers.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Tie the caption head's output weights to the Q-Former's word embeddings (as BERT does).

    Example:

    ```python
    >>> from configuration_audio_qformer import AudioQFormerConfig, BeatsConfig
    >>> from modeling_audio_qformer import AudioQFormerModel

    >>> # The paper's architecture (random weights; see `audio_qformer.building.from_components` for real ones)
    >>> configuration = AudioQFormerConfig()

    >>> # A small one: sub-configs are dicts or config objects
    >>> configuration = AudioQFormerConfig(
    ...     audio_config=BeatsConfig(encoder_layers=2),
    ...     qformer_config={"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 1536},
    ... )
    >>> model = AudioQFormerModel(configuration)
    ```"""

    model_type = "audio_qformer"
    # The Q-Former is the text model: `get_text_config()` (used by `resize_token_embeddings`) finds it under this name.
    attribute_map = {"text_config": "qformer_config"}
    sub_configs_defaults = {
        "audio_config": BeatsConfig,
        "qformer_config": SubConfigSpec(Blip2QFormerConfig, init_kwargs={"vocab_size": BERT_BASE_VOCAB_SIZE_WITH_DEC}),
    }

    audio_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    embed_dim: int = 256
    temperature_init: float = 0.07
    label_smoothing: float = 0.1
    atc_gather_with_grad: bool = False
    train_max_text_length: int = 32
    eval_max_text_length: int = 35
    rerank_top_k: int = 16
    text_pooling: str = "cls"
    decoder_bos_token_id: int = BERT_BASE_VOCAB_SIZE_WITH_DEC - 1
    decoder_eos_token_id: int = 102
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.qformer_config, dict):  # a partial dict keeps the vocabulary with [DEC] unless it says otherwise
            self.qformer_config = {"vocab_size": BERT_BASE_VOCAB_SIZE_WITH_DEC, **self.qformer_config}
        super().__post_init__(**kwargs)
        # Compared by model type, not class: Hub remote code may hold two copies of this module.
        for name, expected in (("audio_config", BeatsConfig), ("qformer_config", Blip2QFormerConfig)):
            found = getattr(self, name)
            if getattr(found, "model_type", None) != expected.model_type:
                raise TypeError(f"{name} must be a {expected.__name__} or a dict, got {type(found).__name__}.")
        # The Q-Former's cross-attention reads BEATs tokens, and text runs through its text feed-forward path.
        self.qformer_config.encoder_hidden_size = self.audio_config.hidden_size
        self.qformer_config.use_qformer_text_input = True
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}.")
        if self.decoder_bos_token_id >= self.qformer_config.vocab_size:
            raise ValueError(
                f"decoder_bos_token_id ({self.decoder_bos_token_id}) is outside the Q-Former vocabulary "
                f"({self.qformer_config.vocab_size} tokens): add [DEC] to the tokenizer and size the vocabulary to it."
            )
        self.hidden_size = self.qformer_config.hidden_size


# How captions are generated unless told otherwise: LAVIS `Blip2Qformer.generate`'s beam search (3 beams, at most 30
# tokens counting `[DEC]`), with at least 8. LAVIS' other mode, nucleus sampling, is `do_sample=True, top_p=0.9`.
CAPTION_GENERATION_DEFAULTS = {"num_beams": 3, "max_length": 30, "min_length": 8}


def caption_generation_config(config: AudioQFormerConfig, **overrides) -> GenerationConfig:
    """The [`GenerationConfig`] of captions: `[DEC]` starts them, `[SEP]` ends them, `[PAD]` fills finished beams."""
    return GenerationConfig(
        bos_token_id=config.decoder_bos_token_id,
        eos_token_id=config.decoder_eos_token_id,
        pad_token_id=config.qformer_config.pad_token_id,
        **{**CAPTION_GENERATION_DEFAULTS, **overrides},
    )


AudioQFormerConfig.register_for_auto_class()
BeatsConfig.register_for_auto_class()


__all__ = ["AudioQFormerConfig", "BeatsConfig", "add_decoder_token", "caption_generation_config"]
