"""``headmix convert collab``: argument checks before loading, and output that explains itself."""

from __future__ import annotations

import warnings

import torch
from transformers import BertConfig, BertModel

from headmix.cli import main


def _bert(path):
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=1, num_attention_heads=6,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(path)


def test_key_dim_is_checked_before_the_model_loads(tmp_path, capsys):
    _bert(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()  # loading would fail: the check must come first
    assert main(["convert", "collab", str(tmp_path / "src"), str(tmp_path / "out"), "--key-dim", "49"]) == 2
    err = capsys.readouterr().err
    assert "--key-dim=49 is not allowed" in err and "1 <= key_dim <= 48" in err
    assert main(["convert", "collab", str(tmp_path / "src"), str(tmp_path / "out"), "--key-dim-ratio", "1.5"]) == 2
    assert "--key-dim-ratio=1.5 is not allowed: expected 0 < ratio <= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_explains_its_numbers_and_tensorly_stays_quiet(tmp_path, capsys):
    _bert(tmp_path / "src")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["convert", "collab", str(tmp_path / "src"), str(tmp_path / "out"), "--key-dim", "24",
                     "--iterations", "3"]) == 0  # 24 > 6 heads: TensorLy's SVD initialisation warned here
    assert not [w for w in caught if "n_eigenvecs" in str(w.message)]
    out = capsys.readouterr().out
    assert "rel. error: ||T~ - T|| / ||T||" in out
    assert "score FLOPs per query-key pair per layer: 96 -> 288: each of the 6 heads now scores with D~k=24" in out
