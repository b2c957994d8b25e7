"""Official DCFormer / DCPythia checkpoints: import, export, logits against the format's formulas, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from official_fixtures import official_config, official_logits, random_official_state, write_official
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import headmix  # noqa: F401  (registers the Auto classes)
from headmix.convert.official import export_official, import_official

from helpers import run_in_process


def load_official_dir(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = {
    "dcformer": (official_config("dcformer"), {}),
    "dcformer-static-mgate-unwindowed": (official_config("dcformer", mgate=True, mgate_dim=4, window_size=None),
                                         {"static": True}),
    "dcpythia": (official_config("dcpythia"), {}),
    "dcpythia-sequential-residual": (official_config("dcpythia", use_parallel_residual=False, use_qk_norm=False), {}),
    "dcformer-plain-attention": (official_config("dcformer", use_dcmha=False), {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["safetensors", "safetensors-3-shards", "bin-2-shards"])
def test_round_trip_is_exact_for_every_tensor(tmp_path, case, layout):
    config, options = CASES[case]
    state = random_official_state(config, seed=1, **options)
    if not config.get("use_dcmha", True):  # the official code still holds neutral dynamic weights
        state_full = random_official_state(dict(config, use_dcmha=True), seed=1)
        for name, t in state_full.items():
            if ".dyn_w_proj." in name:
                state[name] = torch.eye(t.shape[-1])[None].clone() if name.endswith("_proj.w") else torch.zeros_like(t)
    fmt, shards = ("bin", 2) if layout.startswith("bin") else ("safetensors", 3 if "shards" in layout else 1)
    write_official(tmp_path / "official", config, state, fmt=fmt, shards=shards)
    import_official(tmp_path / "official", tmp_path / "headmix", progress=False, max_shard_bytes=20_000)
    assert len(list((tmp_path / "headmix").glob("model-*.safetensors"))) > 1  # sharded output, with an index
    if options.get("static"):
        with pytest.warns(UserWarning, match="use_sw=True"):
            export_official(tmp_path / "headmix", tmp_path / "back", progress=False)
    else:
        export_official(tmp_path / "headmix", tmp_path / "back", progress=False)
    back = load_official_dir(tmp_path / "back")
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    for field in ("model_type", "dim", "n_layer", "n_head", "window_size", "window_type", "use_qk_norm", "use_dcmha",
                  "intermediate_size", "vocab_size", "rope_base", "norm_eps"):
        assert exported[field] == config[field], field


def test_older_separate_query_key_value_files_import(tmp_path):
    config = official_config("dcpythia")
    state = random_official_state(config, seed=2)
    write_official(tmp_path / "official", config, state, split_qkv=True)
    import_official(tmp_path / "official", tmp_path / "headmix", progress=False)
    export_official(tmp_path / "headmix", tmp_path / "back", progress=False)
    back = load_official_dir(tmp_path / "back")
    assert all(torch.equal(back[n], state[n]) for n in state)  # written back fused, as the current format is


@pytest.mark.parametrize("case", ["dcformer", "dcformer-static-mgate-unwindowed", "dcpythia",
                                  "dcpythia-sequential-residual", "dcformer-plain-attention"])
def test_logits_match_the_formulas(tmp_path, case):
    config, options = CASES[case]
    state = random_official_state(config, seed=3, **options)
    write_official(tmp_path / "official", config, state)
    import_official(tmp_path / "official", tmp_path / "headmix", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "headmix").eval()
    ids = torch.randint(0, config["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(0))  # > window 6
    with torch.no_grad():
        ours = model(ids).logits
    expected = official_logits(config, state, ids)
    assert relative_error(ours, expected) <= 1e-4


def test_logits_match_with_a_named_256_token_pattern_and_a_longer_prompt(tmp_path):
    config = official_config("dcformer", window_type="LGLL", window_size=256, n_layer=4)
    state = random_official_state(config, seed=4)
    write_official(tmp_path / "official", config, state)
    import_official(tmp_path / "official", tmp_path / "headmix", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "headmix").eval()
    assert [model.config.layer_window(i) for i in range(4)] == [256, None, 256, 256]
    ids = torch.randint(0, config["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    assert relative_error(ours, official_logits(config, state, ids)) <= 1e-4


def test_window_conventions_differ_and_each_matches_its_own_mask(tmp_path):
    config = official_config("dcformer")
    state = random_official_state(config, seed=5)
    write_official(tmp_path / "official", config, state)
    ids = torch.randint(0, config["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    logits = {}
    for convention in ("decode", "prefill"):
        import_official(tmp_path / "official", tmp_path / convention, window_convention=convention, progress=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / convention).eval()
        assert model.config.window_size == (6 if convention == "decode" else 7)
        with torch.no_grad():
            logits[convention] = model(ids).logits
        assert relative_error(logits[convention], official_logits(config, state, ids, convention)) <= 1e-4
    assert relative_error(logits["decode"], logits["prefill"]) > 1e-3  # the test can tell them apart
    export_official(tmp_path / "prefill", tmp_path / "back", progress=False)  # convention recorded at import
    assert json.loads((tmp_path / "back" / "config.json").read_text())["window_size"] == 6


def test_generate_runs_past_the_window_with_our_cache(tmp_path):
    config = official_config("dcpythia")
    state = random_official_state(config, seed=6)
    write_official(tmp_path / "official", config, state)
    import_official(tmp_path / "official", tmp_path / "headmix", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "headmix").eval()
    prompt = torch.randint(0, config["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = official_logits(config, state, out)
    assert torch.equal(reference[0, 4:-1].argmax(-1), out[0, 5:])  # every greedy step agrees with the formulas


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(window_type="LGGL"), "window_type='LGGL' is not supported"),
        (dict(window_type="LGLL", window_size=128), "hard-codes 256"),
        (dict(query_wise=True), "query_wise=True is not supported"),
        (dict(n_local_heads=2), "grouped-query attention"),
        (dict(model_type="llama"), "model_type='llama' is not supported"),
        (dict(some_new_switch=True), "some_new_switch"),
        (dict(rotary_pct=0.5), "rotary_pct=0.5 is not supported"),
    ],
)
def test_unsupported_config_values_are_clear_errors(tmp_path, change, message):
    config = official_config("dcformer")
    state = random_official_state(config)
    write_official(tmp_path / "official", dict(config, **change), state)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        import_official(tmp_path / "official", tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("layers.1.attention.wo.weight"), "lacks tensors for \\['model.layers.1.attention.out_proj"),
        (lambda s: s.__setitem__("layers.0.attention.mystery", torch.zeros(2)), "'layers.0.attention.mystery' is not part"),
        (lambda s: s.__setitem__("layers.0.attention.wo.weight", torch.zeros(3, 3)), "has shape \\(3, 3\\)"),
        (lambda s: s.__setitem__("layers.9.attention.wo.weight", torch.zeros(3, 3)), "layer 9, but n_layer=4"),
        (lambda s: s.__setitem__("layers.2.attention.dyn_w_proj.pre_proj.w", 2 * torch.eye(4)[None]),
         "static mix in some layers only"),
    ],
)
def test_bad_tensors_are_clear_errors(tmp_path, edit, message):
    config = official_config("dcformer")
    state = random_official_state(config)
    edit(state)
    write_official(tmp_path / "official", config, state)
    with pytest.raises(ValueError, match=message):
        import_official(tmp_path / "official", tmp_path / "out", progress=False)


def test_export_refuses_what_the_official_format_cannot_hold(tmp_path):
    from headmix.models import DCFormerConfig, DCFormerForCausalLM

    for overrides, message in [(dict(attention="talking_heads"), "cannot be exported"),
                               (dict(attention="dcmha", dcmha_groups=2), "dcmha_groups=2 cannot be exported"),
                               (dict(attention="dcmha", window_size=8, window_pattern="LLLG"), "'LLLG' cannot be exported")]:
        model = DCFormerForCausalLM(DCFormerConfig.from_preset("tiny-transformer++", **overrides))
        model.save_pretrained(tmp_path / "m")
        with pytest.raises(ValueError, match=message):
            export_official(tmp_path / "m", tmp_path / "out", progress=False)


def test_trained_headmix_model_exports_and_reimports_with_the_same_logits(tmp_path):
    from headmix.models import DCFormerConfig, DCFormerForCausalLM

    config = DCFormerConfig.from_preset("tiny-dcformer", num_hidden_layers=2, window_size=5, window_pattern="LG",
                                        qk_norm=True, dcmha_init="paper", dcmha_static=False, vocab_size=64)
    model = DCFormerForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ours")
    export_official(tmp_path / "ours", tmp_path / "official", progress=False)
    official = json.loads((tmp_path / "official" / "config.json").read_text())
    assert official["window_size"] == 5 and official["window_type"] is None
    state = load_official_dir(tmp_path / "official")
    ids = torch.randint(0, 64, (1, 17))
    with torch.no_grad():
        assert relative_error(model(ids).logits, official_logits(official, state, ids)) <= 1e-4
    import_official(tmp_path / "official", tmp_path / "again", progress=False)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_cli_converts_both_ways_and_reports_errors(tmp_path):
    config = official_config("dcpythia")
    write_official(tmp_path / "official", config, random_official_state(config))
    cli = [sys.executable, "-m", "headmix.cli", "convert"]
    done = subprocess.run([*cli, "official", str(tmp_path / "official"), str(tmp_path / "ours"), "--dtype", "bfloat16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pythia backbone" in done.stdout
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "ours" / "model.safetensors").values())
    # the first conversion above went through a fresh interpreter; the rest run the same command line here
    done = run_in_process("headmix", "convert", "to-official", str(tmp_path / "ours"), str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "dcpythia"
    done = run_in_process("headmix", "convert", "official", str(tmp_path / "official"), str(tmp_path / "ours"))
    assert done.returncode == 2 and "already holds weights" in done.stderr and "Traceback" not in done.stderr


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import headmix
    from headmix.convert.official import import_official

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    before = rss("VmRSS:")
    report = import_official(src, out, progress=False, max_shard_bytes=int(sys.argv[3]))
    print(json.dumps({"before": before, "peak": rss("VmHWM:"), "bytes": report.bytes,
                      "buffer": report.peak_buffer_bytes}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_conversion_streams_shard_by_shard(tmp_path):
    """A ~250 MB, 8-shard checkpoint converts with peak memory growth of a few shards, not the model."""
    config = official_config("dcformer", dim=512, n_head=8, n_local_heads=8, head_dim=64, n_layer=16, intermediate_size=1536,
                             vocab_size=1024, window_size=None)
    state = random_official_state(config, seed=7)
    total = sum(t.numel() * t.element_size() for t in state.values())
    identities = sum(t.numel() * t.element_size() for n, t in state.items() if n.endswith("_proj.w"))  # not written
    write_official(tmp_path / "official", config, state, shards=8)
    del state
    shard = total // 8
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "official"), str(tmp_path / "out"),
                             str(shard)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["bytes"] == total - identities
    assert measured["buffer"] <= shard
    growth = measured["peak"] - measured["before"]
    print(f"checkpoint {total / 2**20:.0f} MiB in 8 shards; peak RSS growth {growth / 2**20:.0f} MiB")
    assert growth < 0.5 * total, f"peak grew by {growth / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB checkpoint"


def _truncate(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


@pytest.mark.parametrize("fmt,keep", [
    ("safetensors", lambda n: 0), ("safetensors", lambda n: 100), ("safetensors", lambda n: n // 2),
    ("safetensors", lambda n: n - 1), ("bin", lambda n: n // 2), ("bin", lambda n: 0),
], ids=["st-0-bytes", "st-100-bytes", "st-half", "st-all-but-one", "bin-half", "bin-0-bytes"])
def test_truncated_weights_file_is_named_and_leaves_no_output(tmp_path, fmt, keep):
    config = official_config("dcformer")
    write_official(tmp_path / "official", config, random_official_state(config, seed=1), fmt=fmt, shards=2)
    broken = sorted((tmp_path / "official").glob(f"*.{fmt}"))[-1]
    _truncate(broken, keep)
    out = tmp_path / "headmix"
    with pytest.raises(ValueError, match=rf"{broken.name}.*(truncated or corrupt|empty)"):
        import_official(tmp_path / "official", out, progress=False)
    assert not out.exists()  # no partial output
    if keep(1000) != 500:
        return
    # through the command line (once): one line naming the file, no traceback, nothing written
    result = run_in_process("headmix", "convert", "official", str(tmp_path / "official"), str(out))
    assert result.returncode == 2 and broken.name in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_failed_conversion_into_an_existing_directory_keeps_what_was_there(tmp_path):
    config = official_config("dcformer")
    state = random_official_state(config, seed=1)
    state.pop(next(n for n in state if n.endswith("feed_forward.w2.weight")))  # fails after writing some shards
    write_official(tmp_path / "official", config, state)
    out = tmp_path / "headmix"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="lacks tensors"):
        import_official(tmp_path / "official", out, progress=False, max_shard_bytes=20_000)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
