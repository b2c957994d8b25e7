"""transformers' own common model tests (``ModelTesterMixin``) on headmix's models, with Llama as the control.

The mixins are imported from the source distribution of the INSTALLED transformers version, never copied here:
``.ci/run`` downloads it from the package index (``pip download --no-binary :all: transformers==VERSION``) and
extracts it under ``$HEADMIX_TRANSFORMERS_TESTS`` (default ``~/.cache/headmix-ci``); this module looks for
``transformers-VERSION/tests`` there (or for a ``tests`` folder at ``$HEADMIX_TRANSFORMERS_TESTS`` itself, e.g. a
clone of the repository at the release tag). Without it, or without ``parameterized`` (which the mixins import),
every test here is skipped with the reason.

The sdist carries ``tests/test_modeling_common.py`` but not ``tests/generation/test_utils.py`` nor
``tests/exporters/test_export.py``, which it imports: where a file is missing, an empty class stands in for its
mixin (``GenerationTesterMixin``, ``ExportTesterMixin``) and those tests do not run (a clone of the repository at
the tag runs them).

One tester class (modelled on transformers' Llama tester: vocab 99, hidden 32, 2 layers, 4 heads, batch 13,
seq 7) builds the inputs for every model: Transformer++, DCFormer++ (local window 4, DCMHA query blocks of 4 so
that "sdpa" runs the chunked path against the "eager" reference) and DCPythia, and Llama as the control (marked
``slow``: it tests transformers, not headmix). The tests Llama passes that headmix skips are
:data:`HEADMIX_SKIPS`, each with its reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import unittest
from unittest import mock
from pathlib import Path

import pytest
import torch
import transformers

import headmix.models as hm

VERSION = transformers.__version__


def _tests_dir() -> Path | None:
    root = Path(os.environ.get("HEADMIX_TRANSFORMERS_TESTS", Path.home() / ".cache" / "headmix-ci")).expanduser()
    for candidate in (root / f"transformers-{VERSION}" / "tests", root / "tests", root):
        if (candidate / "test_modeling_common.py").is_file():
            return candidate
    return None


def _load_common():
    """``(ModelTesterMixin, GenerationTesterMixin or None, ids_tensor)`` from transformers' test sources, or
    ``None`` and the reason they are unavailable."""
    tests = _tests_dir()
    if tests is None:
        return None, (f"transformers {VERSION}'s test sources not found under $HEADMIX_TRANSFORMERS_TESTS "
                      "(default ~/.cache/headmix-ci; .ci/run downloads them: pip download --no-deps "
                      f"--no-binary :all: transformers=={VERSION})")
    if importlib.util.find_spec("parameterized") is None:
        return None, "the package 'parameterized' (imported by transformers' test mixins) is not installed"
    package = "_transformers_tests"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(tests)]
        sys.modules[package] = module
        # files the sdist leaves out: an empty mixin stands in (their tests do not run)
        for sub, file, mixin in (("generation", "test_utils", "GenerationTesterMixin"),
                                 ("exporters", "test_export", "ExportTesterMixin")):
            if not (tests / sub / f"{file}.py").is_file():
                parent = types.ModuleType(f"{package}.{sub}")
                parent.__path__ = []
                stub = types.ModuleType(f"{package}.{sub}.{file}")
                setattr(stub, mixin, type(mixin, (), {"_headmix_stub": True}))
                sys.modules[parent.__name__], sys.modules[stub.__name__] = parent, stub
    common = importlib.import_module(f"{package}.test_modeling_common")
    generation = sys.modules[f"{package}.generation.test_utils"].GenerationTesterMixin
    return (common.ModelTesterMixin, None if getattr(generation, "_headmix_stub", False) else generation,
            common.ids_tensor), None


_LOADED, SKIP_REASON = _load_common()
pytestmark = pytest.mark.skipif(_LOADED is None, reason=SKIP_REASON or "")
if _LOADED is not None:
    ModelTesterMixin, GenerationTesterMixin, ids_tensor = _LOADED
else:  # the classes below still need bases to be defined; every test is skipped
    ModelTesterMixin, GenerationTesterMixin, ids_tensor = object, None, None
GENERATION = GenerationTesterMixin is not None


class Tester:
    """Shapes and inputs of the common tests (as transformers' Llama tester: a small causal LM)."""

    batch_size, seq_length, vocab_size = 13, 7, 99
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size = 32, 2, 4, 37
    max_position_embeddings, is_training = 512, True
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, parent: unittest.TestCase, make_config) -> None:
        self.parent = parent
        self.make_config = make_config

    def get_config(self):
        return self.make_config(self)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))  # right padding of varied lengths
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


SHAPE = dict(vocab_size=Tester.vocab_size, hidden_size=Tester.hidden_size,
             num_hidden_layers=Tester.num_hidden_layers, num_attention_heads=Tester.num_attention_heads,
             intermediate_size=Tester.intermediate_size, max_position_embeddings=Tester.max_position_embeddings,
             pad_token_id=Tester.pad_token_id, bos_token_id=Tester.bos_token_id, eos_token_id=Tester.eos_token_id)


def _headmix_config(preset: str, **overrides):
    return lambda tester: hm.DCFormerConfig.from_preset(preset, **SHAPE, **overrides)


def _llama_config(tester):
    return transformers.LlamaConfig(**SHAPE, num_key_value_heads=2, hidden_act="silu", rope_theta=10000.0)


_NO_ROPE_SCALING = ("headmix's rotary embedding has no scaling variants (linear, dynamic NTK, YaRN): the config has "
                    "rope_theta only, no rope_parameters")
#: The tests Llama passes that headmix skips, each with why (the mixin would skip them by itself; the reasons are
#: ours). Measured: with these skipped, every other test Llama passes, the headmix variants pass too.
HEADMIX_SKIPS: dict[str, str] = {
    "test_model_rope_scaling_frequencies": _NO_ROPE_SCALING,
    "test_model_rope_scaling_from_config_0_linear": _NO_ROPE_SCALING,
    "test_model_rope_scaling_from_config_1_dynamic": _NO_ROPE_SCALING,
    "test_model_rope_scaling_from_config_2_yarn": _NO_ROPE_SCALING,
    "test_tp_plan_matches_params": ("no tensor-parallel plan: DCMHA's composition mixes heads, which a head-sharded "
                                    "colwise/rowwise plan does not express (headmix trains with FSDP/DDP)"),
}


def _skip(names: dict[str, str]):
    """A class decorator replacing each named test by a skip with its reason."""
    def decorate(cls):
        for name, reason in names.items():
            def skipped(self, _reason=reason):
                self.skipTest(_reason)
            setattr(cls, name, skipped)
        return cls
    return decorate


GENERATION_SKIP = ("tests/generation/test_utils.py is not in transformers' sdist, so GenerationTesterMixin is not "
                   "run here (run it from a clone at the release tag: HEADMIX_TRANSFORMERS_TESTS=the clone)")


class _Common(ModelTesterMixin):
    make_config = None

    def setUp(self) -> None:
        self.model_tester = Tester(self, type(self).make_config)

    def test_generation_tester_mixin_inheritance(self):
        if not GENERATION:
            self.skipTest(GENERATION_SKIP)
        super().test_generation_tester_mixin_inheritance()


@_skip(HEADMIX_SKIPS)
class _Headmix(_Common):
    """The headmix models: registered as a base model and a causal LM (what transformers' tables say of its own
    models), and the epsilon of the eager/SDPA comparison set on the one field our config has."""

    all_model_classes = (hm.DCFormerModel, hm.DCFormerForCausalLM)

    def setUp(self) -> None:
        super().setUp()
        from transformers.models.auto import modeling_auto

        common = sys.modules["_transformers_tests.test_modeling_common"]
        patches = [
            mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {hm.DCFormerConfig.model_type: "DCFormerModel"}),
            mock.patch.dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                            {hm.DCFormerConfig.model_type: "DCFormerForCausalLM"}),
            # transformers sets every epsilon spelling of its models (batch_norm_eps, ...) on the config; ours
            # refuses fields it does not have (a misspelt field would be silently ignored), so set the one it has
            mock.patch.object(common, "set_config_for_less_flaky_test",
                              lambda config: setattr(config, "norm_eps", 1.0)),
        ]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)


@pytest.mark.slow  # transformers' own model: the control, run when this harness or transformers' version changes
class LlamaCommonTest(_Common, unittest.TestCase):
    """The control: transformers' own Llama in the same harness (5.24.0: 113 passed; the tests it passes that the
    headmix variants skip are :data:`HEADMIX_SKIPS`, each with its reason)."""

    all_model_classes = (transformers.LlamaModel, transformers.LlamaForCausalLM)
    make_config = staticmethod(_llama_config)


class TransformerPPCommonTest(_Headmix, unittest.TestCase):
    make_config = staticmethod(_headmix_config("tiny-transformer++"))


class DCFormerPPCommonTest(_Headmix, unittest.TestCase):
    # local layers with a window shorter than the test sequences, so the window matters; DCMHA query blocks of 4
    # (shorter than the 7-token sequences), so "sdpa" runs the chunked path and "eager" the reference one
    make_config = staticmethod(_headmix_config("tiny-dcformer++", window_size=4, window_pattern="LG",
                                               attention_options={"chunk_size": 4}))


class DCPythiaCommonTest(_Headmix, unittest.TestCase):
    make_config = staticmethod(_headmix_config("tiny-dcpythia", attention_options={"chunk_size": 4}))
