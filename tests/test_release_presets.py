"""The presets that copy a released DCFormer configuration, compared field by field with the numbers of the
released files (typed here from the files, so that the test needs no network).

Source: https://github.com/Caiyun-AI/DCFormer at commit df8671f23b4830cb3a254c23e5576d45141cfbd6 (the paths
below are inside that repository). The JAX files are MaxText YAML; their model fields are ``base_*``,
``head_dim``, ``window_size`` (one entry per layer of a repeating block: ``[256, null]`` = local, global),
``qk_norm``, ``static_proj``, ``vocab_size``, ``normalization_layer_epsilon``; the initialisation std 0.006 is
hard-coded in ``jax/MaxText/layers/{models,llama2,dcformer}.py`` (``NormalInitializer(0.006)`` for the
embedding, every block's projections and the output layer) and the rotary base is MaxText's default
``max_timescale: 10_000`` (``jax/MaxText/layers/embeddings.py``).
"""

from __future__ import annotations

import pytest

from headmix.models.configuration import PRESETS, RELEASE_REPOSITORY, RELEASED_PRESETS, DCFormerConfig

COMMIT = "df8671f23b4830cb3a254c23e5576d45141cfbd6"
INIT_STD = 0.006  # jax/MaxText/layers/models.py, llama2.py, dcformer.py: NormalInitializer(0.006)
ROPE_BASE = 10_000  # jax/MaxText/layers/embeddings.py: RotaryEmbedding.max_timescale

RELEASED = {
    # jax/MaxText/configs/transformer_pp_405m.yml (decoder_block: "llama2")
    "transformer++-405m": dict(
        path="jax/MaxText/configs/transformer_pp_405m.yml", base_num_decoder_layers=24, base_emb_dim=1024,
        base_num_query_heads=16, base_num_kv_heads=16, base_mlp_dim=2816, head_dim=64, window_size=None,
        qk_norm=False, static_proj=None, vocab_size=50256, normalization_layer_epsilon=1e-5, max_target_length=2049,
        dcmha=False),
    # jax/MaxText/configs/dcformer_pp_405m.yml (decoder_block: "dcformer")
    "dcformer++-405m": dict(
        path="jax/MaxText/configs/dcformer_pp_405m.yml", base_num_decoder_layers=24, base_emb_dim=1024,
        base_num_query_heads=16, base_num_kv_heads=16, base_mlp_dim=2816, head_dim=64, window_size=[256, None],
        qk_norm=True, static_proj=False, vocab_size=50256, normalization_layer_epsilon=1e-5, max_target_length=2049,
        dcmha=True),
    # jax/MaxText/configs/dcformer_pp_2b8.yml (decoder_block: "dcformer"). Two of its fields disagree with the
    # DCFormer-2.8B checkpoint it describes and are not copied (docs/official.md, "Presets"): head_dim: 128 (the
    # PyTorch release derives head_dim = dim // n_head = 80 in pytorch/dcformer/configuration_dcformer.py) and
    # pre_compose/post_compose: False (which would make it MHA with windows, not DCFormer++).
    "dcformer++-2.8b": dict(
        path="jax/MaxText/configs/dcformer_pp_2b8.yml", base_num_decoder_layers=32, base_emb_dim=2560,
        base_num_query_heads=32, base_num_kv_heads=32, base_mlp_dim=6912, head_dim=2560 // 32,
        window_size=[256, None], qk_norm=False, static_proj=False, vocab_size=50256,
        normalization_layer_epsilon=1e-5, max_target_length=2049, dcmha=True),
}

# pytorch/dcpythia/config.json (the DCPythia-6.9B checkpoint's config); window_type null means "LG" in
# pytorch/dcpythia/modeling_dcpythia.py (``self.window_size = None if self.lidx % 2 == 1 else config.window_size``),
# and its DCMHAttention is built with use_sw=False: no static mix.
DCPYTHIA_6_9B = dict(
    path="pytorch/dcpythia/config.json", block_size=2048, dim=4096, n_head=32, n_local_heads=32, n_layer=32,
    head_dim=128, intermediate_size=16384, norm_eps=1e-5, rope_base=10000, rotary_pct=0.25,
    tie_word_embeddings=False, use_dcmha=True, use_linear_bias=True, use_parallel_residual=True, use_qk_norm=True,
    vocab_size=50257, window_size=256, window_type=None, use_sw=False)


def test_the_released_presets_are_the_ones_compared_here():
    assert RELEASE_REPOSITORY.endswith(COMMIT)
    assert set(RELEASED_PRESETS) == {*RELEASED, "dcpythia-6.9b"}
    for name, released in RELEASED.items():
        assert RELEASED_PRESETS[name] == released["path"]
    assert RELEASED_PRESETS["dcpythia-6.9b"] == DCPYTHIA_6_9B["path"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_matches_the_released_jax_config(name):
    r = RELEASED[name]
    c = DCFormerConfig.from_preset(name)
    assert c.backbone == "llama" and c.num_hidden_layers == r["base_num_decoder_layers"]
    assert c.hidden_size == r["base_emb_dim"] and c.num_attention_heads == r["base_num_query_heads"]
    assert c.num_key_value_heads == r["base_num_kv_heads"] and c.intermediate_size == r["base_mlp_dim"]
    assert c.head_dim == r["head_dim"]
    assert c.max_position_embeddings == r["max_target_length"] - 1  # inputs and targets are one shifted sequence
    assert c.vocab_size == r["vocab_size"] and c.norm_eps == r["normalization_layer_epsilon"]
    assert c.initializer_range == INIT_STD and c.rope_theta == ROPE_BASE and c.rotary_pct == 1.0
    assert c.tie_word_embeddings is False  # logits_via_embedding: False
    assert c.qk_norm == r["qk_norm"]
    windows = [c.layer_window(i) for i in range(c.num_hidden_layers)]
    block = r["window_size"] or [None]
    assert windows == [block[i % len(block)] for i in range(c.num_hidden_layers)]
    assert {c.layer_attention(i) for i in range(c.num_hidden_layers)} == {"dcmha" if r["dcmha"] else "mha"}
    if r["dcmha"]:
        assert c.attention_option("static") == r["static_proj"]
        assert c.attention_option("rank") == 2 and c.attention_option("groups") == 1  # I = 2, num_groups = 1


def test_dcpythia_preset_matches_the_released_checkpoint_config():
    r, c = DCPYTHIA_6_9B, DCFormerConfig.from_preset("dcpythia-6.9b")
    assert c.backbone == "pythia" and c.max_position_embeddings == r["block_size"]
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        r["dim"], r["n_head"], r["n_local_heads"], r["n_layer"])
    assert c.head_dim == r["head_dim"] and c.intermediate_size == r["intermediate_size"]
    assert c.norm_eps == r["norm_eps"] and c.rope_theta == r["rope_base"] and c.rotary_pct == r["rotary_pct"]
    assert c.tie_word_embeddings == r["tie_word_embeddings"] and c.vocab_size == r["vocab_size"]
    assert c.use_bias == r["use_linear_bias"] and c.parallel_residual == r["use_parallel_residual"]
    assert c.qk_norm == r["use_qk_norm"]
    assert {c.layer_attention(i) for i in range(c.num_hidden_layers)} == {"dcmha"}
    assert [c.layer_window(i) for i in range(4)] == [r["window_size"], None, r["window_size"], None]
    assert c.attention_option("static") == r["use_sw"]


def test_the_release_recipe_reaches_our_presets_of_the_same_family():
    """Our DCFormer/DCPythia presets at the other sizes share the released recipe (they differ only in shape)."""
    for name, fields in PRESETS.items():
        if name.startswith(("dcformer-", "dcformer++-", "dcpythia-")):
            c = DCFormerConfig.from_preset(name)
            assert c.attention_option("static") is False, name
            if name.startswith("dcformer"):
                assert (c.vocab_size, c.norm_eps, c.initializer_range) == (50256, 1e-5, INIT_STD), name
            if name.startswith(("dcformer++-", "dcpythia-")):
                assert (c.window_size, c.window_pattern) == (256, "LG"), name


def test_the_docs_preset_table_is_the_computed_one():
    from pathlib import Path

    from headmix.models import preset_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "official.md").read_text()
    assert preset_table() in docs, "docs/official.md's preset table is stale: paste headmix.models.preset_table()"
