"""Synthetic checkpoints in the official DCFormer / DCPythia format, and an evaluation of their logits
written directly from the format's description (issue 7), independently of headmix's model code.

Nothing here imports headmix: the point is a second, separate reading of the formulas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor


def official_config(kind: str = "dcformer", **overrides) -> dict:
    """A tiny official ``config.json`` dict (``kind`` "dcformer" or "dcpythia")."""
    config = {
        "model_type": kind, "architectures": ["DCFormer" if kind == "dcformer" else "DCPythia"],
        "block_size": 512, "vocab_size": 97, "n_layer": 4, "n_head": 4, "n_local_heads": 4, "dim": 32,
        "head_dim": 8, "intermediate_size": 64 if kind == "dcformer" else 128, "rope_base": 10000.0,
        "norm_eps": 1e-6 if kind == "dcformer" else 1e-5, "use_dcmha": True, "use_qk_norm": True,
        "window_size": 6, "window_type": None, "query_wise": False, "tie_word_embeddings": False,
        "is_training": False, "q_chunk_size": 128, "use_gradient_checkpointing": False, "torch_dtype": "float32",
        "transformers_version": "4.33.2", "bos_token_id": 0, "eos_token_id": 0,
        "auto_map": {"AutoConfig": "configuration_x.X", "AutoModelForCausalLM": "modeling_x.X"},
    }
    if kind == "dcpythia":
        config.update(rotary_pct=0.25, use_parallel_residual=True, use_linear_bias=True)
        config["head_dim"] = 16
        config["dim"] = 64
    config.update(overrides)
    return config


def random_official_state(config: dict, seed: int = 0, static: bool = False, rank: int = 2) -> dict[str, Tensor]:
    """Random weights with the official names and shapes (float32, scaled so activations stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    D, H, L, V, F_ = config["dim"], config["n_head"], config["n_layer"], config["vocab_size"], config["intermediate_size"]
    pythia = config["model_type"] == "dcpythia"
    K, M = 4 * H, H

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1] if len(shape) > 1 else 1)
        return torch.randn(*shape, generator=g) * scale

    state = {"tok_embeddings.weight": rnd(V, D, scale=1.0), "output.weight": rnd(V, D)}
    state["norm.weight"] = 1 + 0.1 * rnd(D, scale=1.0)
    if pythia:
        state["norm.bias"] = 0.1 * rnd(D, scale=1.0)
    for i in range(L):
        p = f"layers.{i}."
        state[p + "attention.wqkv.weight"] = rnd(3 * D, D)
        state[p + "attention.wo.weight"] = rnd(D, D)
        if pythia:
            state[p + "attention.wqkv.bias"] = 0.1 * rnd(3 * D, scale=1.0)
            state[p + "attention.wo.bias"] = 0.1 * rnd(D, scale=1.0)
        if config.get("use_qk_norm"):
            state[p + "attention.q_norm.scale"] = 1 + 0.1 * rnd(D // H, scale=1.0)
            state[p + "attention.k_norm.scale"] = 1 + 0.1 * rnd(D // H, scale=1.0)
        if config.get("use_dcmha", True):
            dp = p + "attention.dyn_w_proj."
            state[dp + "dw1"] = rnd(D, 1, 4, K, scale=1.0 / math.sqrt(D))
            state[dp + "qkw"] = rnd(1, 4, K, 2 * rank, M, scale=0.5 / math.sqrt(K))
            state[dp + "dd"] = rnd(D, 1, 4 * M, scale=1.0 / math.sqrt(D))
            eye = torch.eye(M)[None]
            state[dp + "pre_proj.w"] = eye + 0.2 * rnd(1, M, M, scale=1.0) if static else eye.clone()
            state[dp + "post_proj.w"] = eye + 0.2 * rnd(1, M, M, scale=1.0) if static else eye.clone()
        for norm in ("attention_norm", "ffn_norm"):
            state[p + f"{norm}.weight"] = 1 + 0.1 * rnd(D, scale=1.0)
            if pythia:
                state[p + f"{norm}.bias"] = 0.1 * rnd(D, scale=1.0)
        if pythia:
            state[p + "feed_forward.w1.weight"] = rnd(F_, D)
            state[p + "feed_forward.w1.bias"] = 0.1 * rnd(F_, scale=1.0)
            state[p + "feed_forward.w2.weight"] = rnd(D, F_)
            state[p + "feed_forward.w2.bias"] = 0.1 * rnd(D, scale=1.0)
        else:
            state[p + "feed_forward.w1.weight"] = rnd(F_, D)
            state[p + "feed_forward.w3.weight"] = rnd(F_, D)
            state[p + "feed_forward.w2.weight"] = rnd(D, F_)
            if config.get("mgate"):
                state[p + "feed_forward.mg.weight"] = rnd(config["mgate_dim"], D)
    return state


def write_official(directory: Path, config: dict, state: dict[str, Tensor], *, fmt: str = "safetensors",
                   shards: int = 1, split_qkv: bool = False) -> Path:
    """Write ``config.json`` and the weights as the official repositories do (optionally ``.bin``,
    sharded with an index, or with the older separate ``wq``/``wk``/``wv``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = dict(state)
    if split_qkv:
        for name in [n for n in state if ".wqkv." in n]:
            q, k, v = state.pop(name).chunk(3, dim=0)
            for part, t in zip(("wq", "wk", "wv"), (q, k, v)):
                state[name.replace("wqkv", part)] = t.contiguous()
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, str(directory / fname), metadata={"format": "pt"})
        else:
            torch.save(part, directory / fname)
        weight_map.update({n: fname for n in group})
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


# -- the formulas, evaluated directly ------------------------------------------------------------------
def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x: Tensor, positions: Tensor, rot: int, base: float) -> Tensor:
    """Rotary on pairs (x_j, x_{j + rot/2}) of the first ``rot`` channels; x (B, T, H, d)."""
    half = rot // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rot)
    ang = positions.double()[:, None] * freq[None]  # (T, half)
    cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]
    a, b, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def _layer_window(config: dict, i: int) -> int | None:
    if config["window_size"] is None:
        return None
    patterns = {"LG": [256, None], "LGLL": [256, None, 256, 256], "LGL6": [256, None] + [256] * 6}
    if config["window_type"] is None:
        return config["window_size"] if i % 2 == 0 else None
    pattern = patterns[config["window_type"]]
    return pattern[i % len(pattern)]


def official_logits(config: dict, state: dict[str, Tensor], ids: Tensor, window_convention: str = "decode") -> Tensor:
    """Logits ``(B, T, V)`` of an official checkpoint on token ids, from the format's description:
    scaled scores -> pre-compose -> mask -> float softmax -> post-compose -> values. Local layers see
    the current token and ``w - 1`` earlier ones (``"decode"``) or ``w`` earlier ones (``"prefill"``)."""
    pythia = config["model_type"] == "dcpythia"
    D, H = config["dim"], config["n_head"]
    dh = D // H
    eps = config["norm_eps"]
    B, T = ids.shape
    pos = torch.arange(T)
    rot = int(dh * config.get("rotary_pct", 1.0)) if pythia else dh

    def norm(x, name):
        if pythia:
            return F.layer_norm(x, (D,), state[name + ".weight"], state[name + ".bias"], eps)
        return _rms(x, eps) * state[name + ".weight"]

    def lin(x, name):
        y = x @ state[name + ".weight"].T
        return y + state[name + ".bias"] if name + ".bias" in state else y

    def compose(a, which, wq1, wq2, wk1, wk2, gq, gk, static):
        # a (B, H, T, S); wq* (B, T, R, H); wk* (B, S, R, H); gates (B, T|S, H); static (H, H) or None
        out = a.clone()
        if static is not None:
            out = out + torch.einsum("bmts,mn->bnts", a, static)
        for r in range(wq1.shape[2]):
            hq = torch.einsum("bmts,btm->bts", a, wq1[:, :, r])
            out = out + hq[:, None] * wq2[:, :, r].permute(0, 2, 1)[..., None]
            hk = torch.einsum("bmts,bsm->bts", a, wk1[:, :, r])
            out = out + hk[:, None] * wk2[:, :, r].permute(0, 2, 1)[:, :, None, :]
        out = out + a * gq.permute(0, 2, 1)[..., None] + a * gk.permute(0, 2, 1)[:, :, None, :]
        return out

    x = state["tok_embeddings.weight"][ids]
    for i in range(config["n_layer"]):
        p = f"layers.{i}."
        h = norm(x, p + "attention_norm")
        q, k, v = lin(h, p + "attention.wqkv").split(D, dim=-1)
        q, k, v = (t.reshape(B, T, H, dh) for t in (q, k, v))
        if config.get("use_qk_norm"):
            q = _rms(q, 1e-6) * state[p + "attention.q_norm.scale"]
            k = _rms(k, 1e-6) * state[p + "attention.k_norm.scale"]
        base = config.get("rope_base", 10000.0)
        q, k = _rotate(q, pos, rot, base), _rotate(k, pos, rot, base)
        scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(dh), k)
        i_idx, j_idx = pos[:, None], pos[None, :]
        allowed = j_idx <= i_idx
        w = _layer_window(config, i)
        if w is not None:
            allowed = allowed & ((i_idx - j_idx) <= (w - 1 if window_convention == "decode" else w))
        dp = p + "attention.dyn_w_proj."
        if config.get("use_dcmha", True):
            hidden = F.gelu(torch.einsum("btd,dck->btck", h, state[dp + "dw1"][:, 0]))
            dyn = torch.einsum("btck,ckrm->btcrm", hidden, state[dp + "qkw"][0])  # (B, T, 4, 2R, M)
            R = dyn.shape[3] // 2
            w1, w2 = _rms(dyn[:, :, :, :R], 1e-6), dyn[:, :, :, R:]
            gates = torch.tanh(h @ state[dp + "dd"][:, 0]).reshape(B, T, 4, H)
            # a stored identity means "no static mix was trained"; anything else W is applied as a + a W
            static = {c: state[dp + f"{c}_proj.w"][0] for c in ("pre", "post")}
            static = {c: (None if torch.equal(s, torch.eye(H)) else s) for c, s in static.items()}
            scores = compose(scores, "pre", w1[:, :, 0], w2[:, :, 0], w1[:, :, 1], w2[:, :, 1],
                             gates[:, :, 0], gates[:, :, 1], static["pre"])
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.float().softmax(-1).to(scores.dtype)
        if config.get("use_dcmha", True):
            probs = compose(probs, "post", w1[:, :, 2], w2[:, :, 2], w1[:, :, 3], w2[:, :, 3],
                            gates[:, :, 2], gates[:, :, 3], static["post"])
        y = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, D)
        attn = lin(y, p + "attention.wo")
        if pythia:
            mlp_in = norm(x, p + "ffn_norm") if config.get("use_parallel_residual") else None
            hmid = x + attn
            if mlp_in is None:
                mlp_in = norm(hmid, p + "ffn_norm")
            x = hmid + lin(F.gelu(lin(mlp_in, p + "feed_forward.w1")), p + "feed_forward.w2")
        else:
            hmid = x + attn
            m = norm(hmid, p + "ffn_norm")
            act = F.silu(lin(m, p + "feed_forward.w1")) * lin(m, p + "feed_forward.w3")
            if config.get("mgate"):
                E = config["mgate_dim"]
                gate = lin(m, p + "feed_forward.mg").float().softmax(-1).to(act.dtype)
                act = (act.reshape(B, T, E, -1) * gate[..., None]).reshape(B, T, -1)
            x = hmid + lin(act, p + "feed_forward.w2")
    x = norm(x, "norm")
    return x @ state["output.weight"].T
