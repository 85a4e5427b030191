"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) against BeatsModel and AudioQFormerModel.

    python benchmarks/transformers_common_tests.py --transformers_tests PATH/transformers-5.25.0/tests [-- PYTEST ARGS]

The common tests ship in the `tests/` folder of transformers' source distribution (`pip download --no-binary :all:
--no-deps transformers==5.25.0`), which lacks two modules they import (`exporters/test_export.py`,
`generation/test_utils.py`: neither model exports through transformers' exporters, and the caption head's `generate`
is tested in this repository's tests) and one dict
(`utils/test_configuration_utils.py`); this script writes stand-ins for those beside a copy of the folder, then runs
pytest on this file's test classes (they need `pip install parameterized`). Nothing of transformers' test code is
kept in this repository. A test a model cannot take is skipped with its reason, as transformers' own model tests do.
Run on 2026-12-07 (transformers 5.25.0, torch 2.13.0, CPU): 172 passed, 0 failed, 167 skipped (GPU, flash attention,
DeepSpeed, MoE, training heads, or a stated reason in the classes below).
"""

import os
import shutil
import subprocess
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAND_INS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    # The keys `ConfigTester` sets on a config (transformers' tests/utils/test_configuration_utils.py).
    "utils/test_configuration_utils.py": (
        'config_common_kwargs = {"return_dict": False, "output_hidden_states": True, "output_attentions": True, '
        '"dtype": "float16", "chunk_size_feed_forward": 5, "architectures": ["BertModel"], "id2label": {0: "label"}, '
        '"label2id": {"label": "0"}, "problem_type": "regression"}\n'
    ),
}

TEST_MODULE = '''
import sys
import unittest

import torch

sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/tests")
from conftest import TINY_BEATS, TINY_QFORMER  # noqa: E402

from configuration_audio_qformer import AudioQFormerConfig, BeatsConfig  # noqa: E402
from modeling_audio_qformer import AudioQFormerModel, BeatsModel  # noqa: E402

from .test_configuration_common import ConfigTester  # noqa: E402
from .test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor, random_attention_mask  # noqa: E402

FRAMES = 70  # 4 time patches of 16 frames (6 frames dropped by the stride), 8 frequency patches


def fbank_inputs(batch_size):
    features = floats_tensor([batch_size, FRAMES, 128])
    mask = torch.ones(batch_size, FRAMES, dtype=torch.long)
    mask[-1, 40:] = 0  # the last clip is padded: 2 real time patches
    return features, mask


class BeatsModelTester:
    def __init__(self, parent, batch_size=3):
        self.parent, self.batch_size, self.is_training = parent, batch_size, False
        self.hidden_size, self.num_hidden_layers = TINY_BEATS["encoder_embed_dim"], TINY_BEATS["encoder_layers"]
        self.num_attention_heads = TINY_BEATS["encoder_attention_heads"]
        self.seq_length = (FRAMES // 16) * 8

    def get_config(self):
        return BeatsConfig(**TINY_BEATS)

    def prepare_config_and_inputs_for_common(self):
        features, mask = fbank_inputs(self.batch_size)
        return self.get_config(), {{"input_features": features, "feature_attention_mask": mask}}


class BeatsModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BeatsModel,)
    test_resize_embeddings = False  # no vocabulary: the input is an fbank
    has_attentions = True

    def setUp(self):
        self.model_tester = BeatsModelTester(self)
        self.config_tester = ConfigTester(self, config_class=BeatsConfig, has_text_modality=False,
                                          common_properties=["hidden_size", "num_attention_heads", "num_hidden_layers"])

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="BEATs takes an fbank, not embeddings (no inputs_embeds)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="BEATs takes an fbank, not embeddings (no inputs_embeds)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="BEATs' input embedding is a convolution over the fbank; no vocabulary to resize")
    def test_model_get_set_embeddings(self):
        pass


class AudioQFormerModelTester:
    def __init__(self, parent, batch_size=3, text_length=7):
        self.parent, self.batch_size, self.text_length, self.is_training = parent, batch_size, text_length, False
        self.hidden_size, self.num_hidden_layers = TINY_QFORMER["hidden_size"], TINY_QFORMER["num_hidden_layers"]
        self.num_attention_heads = TINY_QFORMER["num_attention_heads"]
        self.seq_length = text_length

    def get_config(self):
        # [DEC] among the first ids: the resize tests shrink the vocabulary by 15, which must keep it (the model
        # refuses a vocabulary without it).
        return AudioQFormerConfig(audio_config=TINY_BEATS, qformer_config={{**TINY_QFORMER, "vocab_size": 99}},
                                  num_query_tokens=4, embed_dim=16, decoder_bos_token_id=3)

    def prepare_config_and_inputs_for_common(self):
        features, mask = fbank_inputs(self.batch_size)
        input_ids = ids_tensor([self.batch_size, self.text_length], 98)
        return self.get_config(), {{"input_ids": input_ids, "attention_mask": random_attention_mask([self.batch_size, self.text_length]),
                                   "input_features": features, "feature_attention_mask": mask}}


class AudioQFormerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (AudioQFormerModel,)
    # Its `generate` is the caption head's, on audio inputs: `GenerationTesterMixin`'s tests prompt a text LM (and are
    # not in the source distribution). Captioning is tested in the repository's tests/test_captioning.py.
    all_generative_model_classes = ()
    _is_composite = True
    has_attentions = False  # a composite, as CLAP and BLIP-2: its parts' attentions are tested on them

    def setUp(self):
        self.model_tester = AudioQFormerModelTester(self)
        self.config_tester = ConfigTester(self, config_class=AudioQFormerConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Hidden states are tested on BeatsModel and on transformers' Blip2QFormerModel (as CLAP does)")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="The text enters as token ids only (as BLIP-2's Q-Former text input)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="The text enters as token ids only (as BLIP-2's Q-Former text input)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="CLIP-style dual outputs, no single last_hidden_state to retain gradients on (as CLAP)")
    def test_retain_grad_hidden_states_attentions(self):
        pass
'''


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "--transformers_tests":
        sys.exit(__doc__)
    source, pytest_args = argv[1], argv[2:]
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    with tempfile.TemporaryDirectory() as work:
        tests = os.path.join(work, "tests")
        shutil.copytree(source, tests)
        for name, text in STAND_INS.items():
            path = os.path.join(tests, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path) or name == "__init__.py":
                with open(path, "w") as handle:
                    handle.write(text)
        with open(os.path.join(tests, "test_audio_qformer_common.py"), "w") as handle:
            handle.write(TEST_MODULE.format(root=ROOT))
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_audio_qformer_common.py",
                   "-q", "-rs", *pytest_args]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": work}
        return subprocess.call(command, cwd=work, env=env)


if __name__ == "__main__":
    sys.exit(main())
