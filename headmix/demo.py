"""``headmix demo``: the four layers side by side on one input, with the checks that make them trustworthy."""

from __future__ import annotations

import time

import torch

from .layers import DCMHA, CollaborativeAttention, MultiHeadAttention, TalkingHeadsAttention


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run_demo(dim: int = 256, num_heads: int = 8, seq_len: int = 512, batch: int = 2, seed: int = 0) -> list[dict]:
    """Build the four layers with shared projection weights, run them on one random input and print a table.

    Shows that a fresh :class:`DCMHA` and :class:`TalkingHeadsAttention` equal
    :class:`MultiHeadAttention` (their composition starts at the identity), that the exact
    :class:`CollaborativeAttention` form equals it too, and what each costs. Returns the table rows.
    """
    torch.manual_seed(seed)
    x = torch.randn(batch, seq_len, dim)
    mha = MultiHeadAttention(dim, num_heads, rotary=True)
    layers = {
        "MultiHeadAttention": mha,
        "TalkingHeadsAttention": TalkingHeadsAttention(dim, num_heads, rotary=True),
        "DCMHA (chunked)": DCMHA(dim, num_heads, rotary=True, backend="chunked"),
        "DCMHA (reference)": DCMHA(dim, num_heads, rotary=True, backend="reference"),
        "CollaborativeAttention (exact)": CollaborativeAttention.from_multi_head(mha),
        "CollaborativeAttention (key_dim/2)": CollaborativeAttention(dim, num_heads, key_dim=dim // 2, rotary=True),
    }
    for name in ("TalkingHeadsAttention", "DCMHA (chunked)", "DCMHA (reference)"):
        layers[name].load_state_dict(mha.state_dict(), strict=False)  # same q/k/v/out projections
    rows = []
    with torch.no_grad():
        reference = mha(x)
        for name, layer in layers.items():
            out = layer(x)
            rows.append(
                {
                    "layer": name,
                    "params": sum(p.numel() for p in layer.parameters()),
                    "max |out - MHA|": (out - reference).abs().max().item(),
                    "forward ms": 1e3 * _time(lambda layer=layer: layer(x)),
                }
            )
    print(f"headmix demo: batch={batch} seq={seq_len} dim={dim} heads={num_heads}, causal, rotary, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'layer':<36}{'params':>10}{'max |out - MHA|':>18}{'forward ms':>12}")
    for r in rows:
        print(f"{r['layer']:<36}{r['params']:>10,}{r['max |out - MHA|']:>18.2e}{r['forward ms']:>12.1f}")
    print("Fresh DCMHA / talking-heads and the exact collaborative form reproduce MHA (differences are float32 "
          "rounding); the key_dim/2 collaborative layer is a different, smaller layer.")
    return rows
