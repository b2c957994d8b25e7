"""Compiled static-cache decoding on a GPU: the same greedy tokens as eager decoding, and one compilation.

For each model: greedy tokens with the static cache and ``generate()``'s compiled decoding step (inductor,
``fullgraph=True``, ``mode="reduce-overhead"``: CUDA graphs) against eager decoding with the dynamic cache, float32,
batch 2 with left padding, a prompt longer than the sliding window; and the number of graphs dynamo compiled over
the whole generation. Models: a converted official-format DCFormer (random weights, the tests' fixtures) and a
DCPythia-backbone model with every attention kind (one layer each).

    python benchmarks/generate_check.py            # needs CUDA
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from transformers import CompileConfig  # noqa: E402

from headmix.models import DCFormerConfig, DCFormerForCausalLM  # noqa: E402


def models(directory: Path):
    from official_fixtures import official_config, random_official_state, write_official

    from headmix.convert.official import import_official

    config = official_config("dcformer", n_layer=2, window_size=4, vocab_size=64)
    write_official(directory / "official", config, random_official_state(config, seed=3))
    import_official(directory / "official", directory / "headmix", progress=False)
    yield "official DCFormer (converted)", DCFormerForCausalLM.from_pretrained(directory / "headmix")
    torch.manual_seed(0)
    config = DCFormerConfig.from_preset("tiny-dcpythia", num_hidden_layers=4, hidden_size=32, vocab_size=64,
                                        window_size=4, window_pattern="LG",
                                        attention=["mha", "talking_heads", "dcmha", "collaborative"],
                                        attention_options={"content_bias": True})
    model = DCFormerForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    yield "DCPythia, every attention kind", model


def main() -> int:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # "cpu": a quick check, dynamo's eager backend
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}")
    print("| model | compiled tokens == eager tokens | graphs compiled | first call s | second call s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models(Path(tmp)):
            model = model.to(device).eval()
            torch.manual_seed(1)
            ids = torch.randint(1, 64, (2, 9), device=device)
            mask = torch.ones_like(ids)
            mask[0, :3] = 0
            kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
            eager = model.generate(ids, **kwargs)
            torch._dynamo.reset()
            graphs = []

            def counting(gm, example_inputs):
                graphs.append(gm)
                if device.type != "cuda":
                    return gm.forward
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})

            config = CompileConfig(backend=counting, fullgraph=True, mode=None)
            config._compile_all_devices = True
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                out = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            print(f"| {name} | {torch.equal(out, eager)} | {len(graphs)} | {times[0]:.1f} | {times[1]:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
