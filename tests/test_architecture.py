"""The house rules of docs/architecture.md, checked: import directions, a light root import, one home per
option (a toy DCMHA option added in the layer alone, end to end), and old config.json files still loading."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headmix
from headmix.layers import ATTENTION_LAYERS, DCMHA

from fixtures.make_legacy_fixtures import describe  # tests/ is on the path (conftest.py)

ROOT = Path(headmix.__file__).parent
LEGACY = Path(__file__).parent / "fixtures" / "legacy"


# -- import directions ---------------------------------------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    """Absolute names of the headmix modules ``path`` imports (relative imports resolved)."""
    package = ["headmix", *path.relative_to(ROOT).with_suffix("").parts[:-1]]  # the package the file is in
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


# (folder, what it must not import): the layers of the house, lower never importing higher
FORBIDDEN = {
    "reference.py": ("headmix.ops", "headmix.layers", "headmix.models", "headmix.convert", "headmix.training"),
    "ops": ("headmix.layers", "headmix.models", "headmix.convert", "headmix.training", "headmix.cli"),
    "layers": ("headmix.models", "headmix.convert", "headmix.training", "headmix.cli", "transformers"),
    "models": ("headmix.convert", "headmix.training", "headmix.cli"),
}


@pytest.mark.parametrize("where", list(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(where):
    files = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    bad = [(str(f.relative_to(ROOT)), name) for f in files for name in imported_modules(f)
           if any(name == x or name.startswith(x + ".") for x in FORBIDDEN[where])]
    assert not bad, bad


def test_no_source_file_over_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in ROOT.rglob("*.py") if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long


def test_import_headmix_is_light():
    """``import headmix`` gives the layers, the reference and the ops, without transformers, datasets, the
    converters or the Triton kernels (those load on first use)."""
    script = ("import sys, headmix; heavy = [m for m in ('transformers', 'datasets', 'headmix.models', "
              "'headmix.convert', 'headmix.training', 'triton') if m in sys.modules]; print(heavy); "
              "assert not heavy; assert headmix.DCMHA and headmix.composed_attention and headmix.ops")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_model_classes_load_on_first_use_and_register_with_the_auto_classes():
    script = ("import sys, headmix; assert 'transformers' not in sys.modules\n"
              "config = headmix.DCFormerConfig(attention='dcmha')\n"
              "from transformers import AutoConfig, AutoModelForCausalLM\n"
              "assert type(AutoConfig.for_model('headmix_dcformer')).__name__ == 'DCFormerConfig'\n"
              "assert type(AutoModelForCausalLM.from_config(config)).__name__ == 'DCFormerForCausalLM'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_auto_classes_register_when_transformers_is_imported_after_headmix():
    """``import headmix; AutoModelForCausalLM.from_pretrained(dir)`` works without importing headmix.models, also
    when a library has looked transformers up (``find_spec``) without importing it first."""
    script = ("import importlib.util, sys, headmix\n"
              "assert importlib.util.find_spec('transformers') is not None and 'transformers' not in sys.modules\n"
              "from transformers import AutoConfig\n"
              "assert type(AutoConfig.for_model('headmix_dcformer')).__name__ == 'DCFormerConfig'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# -- one home per option: a toy DCMHA option, added in the layer alone -------------------------------------
class ScaledDCMHA(DCMHA):
    """DCMHA with one more option, as docs/architecture.md adds it: ``score_scale`` multiplies the logit scale."""

    def __init__(self, dim: int, num_heads: int, *, score_scale: float = 1.0, **options) -> None:
        super().__init__(dim, num_heads, **options)
        if not score_scale > 0:
            raise ValueError(f"score_scale={score_scale!r} is not allowed: expected a positive number")
        self.score_scale = score_scale
        self.scale = self.scale * score_scale


def test_a_new_layer_option_needs_no_change_outside_the_layer(tmp_path, monkeypatch):
    from headmix.models import DCFormerConfig, DCFormerForCausalLM

    monkeypatch.setitem(ATTENTION_LAYERS, "dcmha", ScaledDCMHA)
    config = DCFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            attention="dcmha", attention_options={"score_scale": 0.5, "rank": 3})
    model = DCFormerForCausalLM(config).eval()
    assert all(layer.attention.score_scale == 0.5 and layer.attention.rank == 3 for layer in model.model.layers)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_options"] == {"score_scale": 0.5, "rank": 3}
    reloaded = DCFormerForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].attention.score_scale == 0.5
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        default = DCFormerForCausalLM(DCFormerConfig(**{**config.to_dict(), "attention_options": {"rank": 3}}))
        default.load_state_dict(model.state_dict())
        assert not torch.equal(default.eval()(ids).logits, model(ids).logits)  # the option does something
    with pytest.raises(ValueError, match=r"score_scale=0 is not allowed"):
        DCFormerConfig(attention="dcmha", attention_options={"score_scale": 0})


def test_unknown_attention_option_names_the_nearest():
    from headmix.models import DCFormerConfig

    with pytest.raises(ValueError, match=r"'rnak', which no attention layer takes: did you mean 'rank'"):
        DCFormerConfig(attention="dcmha", attention_options={"rnak": 4})


def test_a_config_records_only_what_was_overridden():
    from headmix.models import DCFormerConfig

    assert DCFormerConfig(attention="dcmha").attention_options == {}
    assert DCFormerConfig(attention="dcmha", dcmha_rank=2, dcmha_groups=2).attention_options == {"groups": 2}
    assert "dcmha_rank" not in DCFormerConfig(attention="dcmha", dcmha_rank=4).to_dict()


# -- old config.json files load to the same model -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in LEGACY.iterdir() if p.is_dir()))
def test_old_config_files_load_to_the_same_model(name):
    from headmix.models import DCFormerConfig, DCFormerForCausalLM

    expected = json.loads((LEGACY / name / "expected.json").read_text())
    config = DCFormerConfig.from_pretrained(LEGACY / name)
    with torch.device("meta"):
        model = DCFormerForCausalLM(config)
    got = describe(model)  # what today's code builds, described as the old code described its models
    assert got["layers"] == expected["layers"]
    assert got["tensors"] == expected["tensors"]
    assert got["num_parameters"] == expected["num_parameters"]
    if config.mlp_gate_groups is None:  # the old formula left out the MLP group gate's matrix (now counted)
        assert got["flops_per_token_256"] == expected["flops_per_token_256"]
    if "logits" in expected:
        model = DCFormerForCausalLM.from_pretrained(LEGACY / name).eval()
        with torch.no_grad():
            logits = model(torch.tensor(expected["ids"])).logits
        torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-5)
