# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The embedded default dataset: synthetic sounds with captions that describe them.

    python -m audio_qformer.synthetic_sounds --output_dir data/synthetic

Each clip combines a sound (a tone, a buzz or a noise), its pitch or noise colour, a pitch movement (steady, rising,
falling), a rhythm (continuous, slow or fast pulses), a loudness change (even, louder, quieter) and a space (dry, an
echo, a large hall's reverberation, heard most in the half second after the sound stops). Every clip gets several
captions that say the same thing in other words, as Clotho's five captions do; each wording names exactly one value
of each attribute (`caption_attributes` reads them back). Within a set no two clips share their attributes, so every
caption describes its own clip and no other: the contrastive loss never pushes apart clips that their captions
cannot tell apart, and a caption's one relevant clip in the evaluation is truly the only one. Different sets may
share attributes (a held-out clip resembles a training clip, as it should).

The sets are written in the `audiofolder` layout the loaders read (`metadata.csv` with `file_name,
caption_1..caption_N, attributes`, 16 kHz WAV files): `train/`, `validation/` and `library/` (held out, for evaluation
and search). Generation is seeded and skipped when the output already holds the same sets.
"""

import argparse
import csv
import itertools
import json
import os
import re

import numpy as np


SAMPLING_RATE = 16000

SUBJECTS = {
    ("tone", "low"): ["a low tone", "a deep hum", "a low pitched sine tone"],
    ("tone", "mid"): ["a medium pitched tone", "a mid range tone", "a plain tone"],
    ("tone", "high"): ["a high tone", "a high pitched beep", "a shrill whistle"],
    ("buzz", "low"): ["a low buzz", "a deep growling buzz", "a low raspy drone"],
    ("buzz", "mid"): ["a buzzing sound", "a mid range buzz", "a nasal buzzing drone"],
    ("buzz", "high"): ["a high buzz", "a high pitched whine", "a thin shrill buzz"],
    ("noise", "white"): ["white noise", "a hiss of static", "bright hissing noise"],
    ("noise", "pink"): ["pink noise", "soft rushing noise", "noise like a distant waterfall"],
    ("noise", "brown"): ["brown noise", "a deep rumble", "low rumbling noise"],
}
MOTIONS = {
    "steady": ["holding a steady pitch", "at a constant pitch", "without changing pitch"],
    "rising": ["rising in pitch", "sweeping upwards", "going up in pitch"],
    "falling": ["falling in pitch", "sweeping downwards", "dropping in pitch"],
}
RHYTHMS = {
    "continuous": ["continuously", "without a break", "sustained throughout"],
    "slow": ["pulsing slowly", "in slow beats", "repeating about twice a second"],
    "fast": ["pulsing rapidly", "in quick bursts", "stuttering fast"],
}
LOUDNESS = {
    "even": ["at an even volume", "at a steady level", "at a constant loudness"],
    "louder": ["getting louder", "fading in", "growing in volume"],
    "quieter": ["getting quieter", "fading out", "dying away"],
}
SPACES = {
    "dry": ["up close", "in a dry room", "with no reverberation"],
    "echo": ["with an echo", "echoing back", "with repeating echoes"],
    "hall": ["in a large hall", "with a long reverb", "in a cavernous space"],
}
# Each attribute's wordings after the subject; a wording names one value only, so a caption can be read back.
PHRASES = {"motion": MOTIONS, "rhythm": RHYTHMS, "loudness": LOUDNESS, "space": SPACES}
PITCH_HZ = {"low": (110.0, 190.0), "mid": (400.0, 700.0), "high": (1500.0, 2500.0)}
# After the sound stops, this much more of the space is heard: silence (dry), the echoes, the hall's decay.
TAIL_SECONDS = 0.5


def _noise(colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2 power) noise, unit standard deviation."""
    spectrum = np.fft.rfft(rng.standard_normal(size))
    frequencies = np.fft.rfftfreq(size, 1 / SAMPLING_RATE)
    frequencies[0] = frequencies[1]
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[colour]
    noise = np.fft.irfft(spectrum / frequencies**exponent, n=size)
    return noise / noise.std()


def _source(attributes: dict, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """The dry sound of one clip: the sound, its pitch movement, rhythm and loudness change."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    if attributes["sound"] == "noise":
        signal = _noise(attributes["pitch"], t.size, rng) * 0.3
    else:
        low, high = PITCH_HZ[attributes["pitch"]]
        start = rng.uniform(low, high)
        glide = {"steady": 1.0, "rising": 1.8, "falling": 1 / 1.8}[attributes["motion"]]
        frequency = start * glide ** (t / seconds)  # exponential glide over the clip
        phase = 2 * np.pi * np.cumsum(frequency) / SAMPLING_RATE
        if attributes["sound"] == "tone":
            signal = np.sin(phase)
        else:  # buzz: odd and even harmonics with falling weights (a soft sawtooth)
            signal = sum(np.sin(k * phase) / k for k in range(1, 9)) * 0.6
    rate = {"continuous": 0.0, "slow": 2.0, "fast": 6.0}[attributes["rhythm"]]
    if rate:
        gate = (np.sin(2 * np.pi * rate * t - np.pi / 2) > 0).astype(float)
        signal = signal * np.convolve(gate, np.hanning(160) / np.hanning(160).sum(), mode="same")
    envelope = {"even": np.ones_like(t), "louder": 0.1 + 0.9 * t / seconds, "quieter": 1.0 - 0.9 * t / seconds}
    signal = signal * envelope[attributes["loudness"]] * rng.uniform(0.3, 0.8)
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)  # no clicks at the edges
    return signal * fade


def _in_space(signal: np.ndarray, space: str, rng: np.random.Generator) -> np.ndarray:
    """The sound in its space, `TAIL_SECONDS` longer: dry, two echoes (220 and 440 ms), or a 1.5 s hall reverb."""
    tail = int(TAIL_SECONDS * SAMPLING_RATE)
    if space == "dry":
        return np.concatenate([signal, np.zeros(tail)])
    if space == "echo":
        response = np.zeros(int(0.44 * SAMPLING_RATE) + 1)
        response[[0, int(0.22 * SAMPLING_RATE), int(0.44 * SAMPLING_RATE)]] = [1.0, 0.5, 0.25]
    else:  # hall: exponentially decaying noise, 60 dB down after 1.5 s, beside the direct sound
        t = np.arange(int(1.5 * SAMPLING_RATE)) / SAMPLING_RATE
        response = rng.standard_normal(t.size) * np.exp(-6.9 * t / 1.5)
        response *= 0.8 / np.sqrt(np.sum(response**2))
        response[0] += 0.6
    size = signal.size + response.size - 1
    wet = np.fft.irfft(np.fft.rfft(signal, size) * np.fft.rfft(response, size), size)[: signal.size + tail]
    return wet / max(1.0, np.abs(wet).max() / 0.95)  # never clip


def render(attributes: dict, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """The waveform (float32, 16 kHz, `seconds + TAIL_SECONDS` long) of one clip with the given attributes."""
    return _in_space(_source(attributes, seconds, rng), attributes["space"], rng).astype(np.float32)


def all_attribute_sets() -> list[dict]:
    """Every combination of attributes a clip can have (noise has no pitch movement): 567."""
    sets = []
    for sound, pitch in SUBJECTS:
        for motion in ["steady"] if sound == "noise" else MOTIONS:
            for rhythm, loudness, space in itertools.product(RHYTHMS, LOUDNESS, SPACES):
                sets.append(dict(sound=sound, pitch=pitch, motion=motion, rhythm=rhythm, loudness=loudness, space=space))
    return sets


def distinct_attributes(count: int, rng: np.random.Generator) -> list[dict]:
    """`count` clips' attributes, no two alike, drawn uniformly from every combination."""
    sets = all_attribute_sets()
    if count > len(sets):
        raise ValueError(f"a set of {count} clips cannot have distinct attributes: there are only {len(sets)} combinations.")
    return [sets[i] for i in rng.choice(len(sets), size=count, replace=False)]


def captions_for(attributes: dict, count: int, rng: np.random.Generator) -> list[str]:
    """`count` different wordings of the same description: the subject, then the other attributes in any order."""
    named = [name for name in PHRASES if name != "motion" or attributes["sound"] != "noise"]
    captions = []
    for index in range(count * 10):  # a few tries for distinct wordings
        if len(captions) == count:
            break
        subject = SUBJECTS[(attributes["sound"], attributes["pitch"])][(index + rng.integers(3)) % 3]
        parts = [PHRASES[name][attributes[name]][rng.integers(3)] for name in named]
        rng.shuffle(parts)
        caption = f"{subject} {parts[0]}, " + ", ".join(parts[1:-1]) + f" and {parts[-1]}"
        if caption not in captions or index >= count * 9:
            captions.append(caption)
    return captions


def caption_attributes(caption: str) -> dict:
    """The attributes a caption of `captions_for` names (its inverse); `ValueError` for any other text."""
    subjects = {wording: key for key, wordings in SUBJECTS.items() for wording in wordings}
    phrases = {wording: (name, value) for name, table in PHRASES.items() for value, wordings in table.items()
               for wording in wordings}  # fmt: skip
    subject = max((s for s in subjects if caption.startswith(s + " ")), key=len, default=None)
    if subject is None:
        raise ValueError(f"{caption!r} does not start with a sound of this generator")
    found = dict(zip(("sound", "pitch"), subjects[subject]), motion="steady")
    for part in re.split(r", | and ", caption[len(subject) + 1 :]):
        if part not in phrases:
            raise ValueError(f"{caption!r}: {part!r} is no wording of this generator")
        name, value = phrases[part]
        found[name] = value
    return found


def named_attributes(caption: str) -> dict:
    """
    What any text names of each attribute, read leniently (for generated captions, which need not follow the
    generator's grammar): an attribute's value when the text holds wordings of that value only, else `None` (no
    wording, or wordings of two values). Sound and pitch come from the subject wordings; `motion` is `"steady"` for
    noise, which has no pitch movement.
    """
    text = caption.lower()
    subjects = {key for key, wordings in SUBJECTS.items() if any(w in text for w in wordings)}
    found = {}
    for index, name in enumerate(("sound", "pitch")):
        values = {key[index] for key in subjects}
        found[name] = values.pop() if len(values) == 1 else None
    for name, table in PHRASES.items():
        values = {value for value, wordings in table.items() if any(w in text for w in wordings)}
        found[name] = values.pop() if len(values) == 1 else None
    if found["sound"] == "noise" and found["motion"] is None:
        found["motion"] = "steady"
    return found


def write_set(directory: str, num_clips: int, captions_per_clip: int, rng: np.random.Generator):
    import soundfile

    os.makedirs(directory, exist_ok=True)
    rows = []
    for index, attributes in enumerate(distinct_attributes(num_clips, rng)):
        seconds = float(rng.uniform(2.0, 4.0))
        name = f"clip_{index:04d}.wav"
        soundfile.write(os.path.join(directory, name), render(attributes, seconds, rng), SAMPLING_RATE, subtype="PCM_16")
        rows.append([name, *captions_for(attributes, captions_per_clip, rng), json.dumps(attributes)])
    with open(os.path.join(directory, "metadata.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", *[f"caption_{i + 1}" for i in range(captions_per_clip)], "attributes"])
        writer.writerows(rows)


def generate(output_dir: str, num_train=400, num_validation=60, num_library=60, captions_per_clip=3, seed=0) -> bool:
    """Write the three sets; returns False (and does nothing) when `output_dir` already holds these sets."""
    settings = dict(num_train=num_train, num_validation=num_validation, num_library=num_library,
                    captions_per_clip=captions_per_clip, seed=seed, version=2)  # fmt: skip
    stamp = os.path.join(output_dir, "generator.json")
    if os.path.isfile(stamp):
        with open(stamp) as handle:
            if json.load(handle) == settings:
                return False
    rng = np.random.default_rng(seed)
    for name, count in (("train", num_train), ("validation", num_validation), ("library", num_library)):
        write_set(os.path.join(output_dir, name), count, captions_per_clip, rng)
    with open(stamp, "w") as handle:  # written last: a killed run regenerates
        json.dump(settings, handle)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/synthetic", help="Where to write train/, validation/, library/.")
    parser.add_argument("--num_train", type=int, default=400, help="Clips in the training set.")
    parser.add_argument("--num_validation", type=int, default=60, help="Clips in the validation set.")
    parser.add_argument("--num_library", type=int, default=60, help="Clips in the held-out library.")
    parser.add_argument("--captions_per_clip", type=int, default=3, help="Captions per clip.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    args = parser.parse_args()
    made = generate(args.output_dir, args.num_train, args.num_validation, args.num_library, args.captions_per_clip, args.seed)
    print(f"{'Generated' if made else 'Reusing'} the synthetic sound set in {args.output_dir}")


if __name__ == "__main__":
    main()
