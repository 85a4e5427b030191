# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The local engine around the model: sound libraries (`library`, `indexing`, `embedding`, `library_dataset`), the
`audio-qformer` command (`cli`), the training data (`data`, `features`), search (`vector_search`, `retrieval`), and the
Hub pages. The model itself is the flat files beside this package (`modeling_audio_qformer.py` and its config and
processor), which ship to the Hub as remote code and never import it. `docs/architecture.md` maps each module."""
