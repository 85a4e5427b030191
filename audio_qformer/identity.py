# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Identities: of a clip (its path, size and modification time, or its bytes) and of a model (its config and weights),
under which token caches and sound libraries store what was computed."""

import hashlib
import json
import os

import torch


# Config keys that say where a model came from or what wrote it, not what it computes: the same weights loaded from
# another path, from a Hub id (as a Space loads them), built in memory or saved by another transformers keep their
# identity.
PROVENANCE_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "architectures", "auto_map",
                             "dtype", "torch_dtype"})  # fmt: skip


def _without_provenance(value):
    if isinstance(value, dict):
        return {k: _without_provenance(v) for k, v in value.items() if k not in PROVENANCE_KEYS}
    return value


def weights_fingerprint(model, *settings: str) -> str:
    """
    A hash of a model's config (less `PROVENANCE_KEYS`) and weights, and of any further settings (hex, 16 characters):
    the identity under which token caches and sound libraries store what a model computed, so that other weights
    never read them.
    """
    digest = hashlib.blake2b(digest_size=16)
    config = _without_provenance(json.loads(model.config.to_json_string(use_diff=False)))
    digest.update(json.dumps(config, sort_keys=True).encode())
    for setting in settings:
        digest.update(setting.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def clip_key(audio_path: str | None, audio_bytes: bytes | None = None) -> str:
    """Cache key of a clip: its absolute path, size and modification time, or the hash of its encoded bytes."""
    if audio_bytes is not None:
        return "b:" + hashlib.blake2b(audio_bytes, digest_size=16).hexdigest()
    path = os.path.abspath(audio_path)
    try:
        stat = os.stat(path)
        signature = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    except OSError:
        signature = f"{path}\0missing"
    return "f:" + hashlib.blake2b(signature.encode(), digest_size=16).hexdigest()


__all__ = ["PROVENANCE_KEYS", "clip_key", "weights_fingerprint"]
