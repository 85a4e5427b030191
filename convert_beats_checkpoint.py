"""Convert an official BEATs checkpoint (`BEATs_iter3_plus_AS2M.pt`) into a `save_pretrained` directory.

    python convert_beats_checkpoint.py --checkpoint BEATs_iter3_plus_AS2M.pt --output_dir beats-iter3-plus-as2m

The directory holds `config.json`, `model.safetensors` and the feature extractor's config, and loads with
`BeatsModel.from_pretrained(output_dir)`. The script reloads what it wrote and checks that the outputs equal those of
the model read from the `.pt` file. `--push_to_hub REPO_ID` uploads the directory afterwards.
"""

import argparse

import numpy as np
import torch

from modeling_audio_qformer import BeatsModel
from processing_audio_qformer import BeatsFeatureExtractor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Path of the official BEATs .pt file.")
    parser.add_argument("--output_dir", required=True, help="Directory to write the converted model into.")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="Also upload to this Hub repository.")
    parser.add_argument(
        "--check_seconds", type=float, default=2.0, help="Length of the random clip used to check the conversion."
    )
    return parser.parse_args(argv)


def convert(checkpoint: str, output_dir: str, check_seconds: float = 2.0) -> float:
    """Convert, save, reload and return the largest absolute output difference between the two models."""
    model = BeatsModel.from_original_checkpoint(checkpoint)
    feature_extractor = BeatsFeatureExtractor(feature_size=128)
    model.save_pretrained(output_dir)
    feature_extractor.save_pretrained(output_dir)

    reloaded = BeatsModel.from_pretrained(output_dir).eval()
    waveform = np.random.default_rng(0).standard_normal(int(check_seconds * 16000)).astype(np.float32) * 0.1
    inputs = feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt")
    with torch.inference_mode():
        difference = (model(**inputs).last_hidden_state - reloaded(**inputs).last_hidden_state).abs().max().item()
    return difference


def main(argv=None):
    args = parse_args(argv)
    difference = convert(args.checkpoint, args.output_dir, args.check_seconds)
    print(f"Saved to {args.output_dir}; largest output difference after reloading: {difference:.3g}")
    if difference > 1e-5:
        raise SystemExit(f"The converted model's outputs differ from the checkpoint's by {difference:.3g}.")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo_id = HfApi().create_repo(args.push_to_hub, exist_ok=True).repo_id
        HfApi().upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Convert official BEATs")
        print(f"Uploaded to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    main()
