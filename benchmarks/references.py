"""Independent implementations that tests and benchmarks compare against (kept out of the package itself)."""

import numpy as np
import torch


def kaldi_native_fbank(waveform: np.ndarray, num_bins: int) -> np.ndarray:
    """Kaldi's log mel fbank with BEATs' settings, computed by kaldi-native-fbank (PyPI), a C++ port of Kaldi."""
    import kaldi_native_fbank as knf

    options = knf.FbankOptions()
    options.frame_opts.samp_freq = 16000
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.mel_opts.num_bins = num_bins
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(16000, waveform * 32768.0)
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@torch.no_grad()
def randomize_beats_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """
    Give a BEATs model (the official one or ours: the parameter names agree) non-trivial gates, relative-position
    table, biases and norms, which a fresh initialisation leaves at 0 or 1, so that comparisons exercise every path.
    """
    for name, param in model.named_parameters():
        if name.endswith("weight_g"):  # the official weight-normalised positional convolution
            param.uniform_(0.5, 1.5)
        elif name.endswith("grep_a"):
            param.copy_(1.0 + 0.3 * torch.randn_like(param))
        elif "relative_attention_bias" in name:
            param.normal_(0.0, 1.0)
        elif "grep_linear.weight" in name:
            param.normal_(0.0, 0.3)
        elif "layer_norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1)
    return model
