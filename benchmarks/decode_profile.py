"""What one compiled decoding step launches: kernels per step, by name, with their time (one GPU).

For each variant and batch: ``generate()`` with a static cache and its compiled step (as ``lm_speed.py --compile``
times it), warmed up, then profiled (``torch.profiler``) over a generation of one new token (the prefill) and one of
``--new-tokens``; the step's kernels are the difference, divided by the steps. Prints the kernels per step and their
time per step, then the ``--top`` kernels by time, after a header with device, date and versions. On the CPU (no CUDA
kernels) it counts the step's aten operators instead (the step compiled by dynamo's eager backend), a smoke run.

    python benchmarks/decode_profile.py --variants transformer++-405m dcformer++-405m --batches 16
    python benchmarks/decode_profile.py --variants dcformer++-405m --batches 1 16 --top 40
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_speed import GenerationTimer, build  # noqa: E402


def events(prof, cuda: bool) -> dict[str, list[float]]:
    """``{name: [count, microseconds]}`` of the profile's CUDA kernels (``cuda``) or CPU operators."""
    found: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for e in prof.events():
        if e.device_type == kind and (cuda or e.name.startswith("aten::")):
            found[e.name][0] += 1
            found[e.name][1] += e.device_time_total if cuda else e.self_cpu_time_total
    return found


def step_profile(model, batch: int, prompt: int, new_tokens: int, device) -> dict[str, tuple[float, float]]:
    """``{name: (per step, us per step)}`` of one decoding step of ``model`` at ``batch``: ``lm_speed``'s generation
    row (static cache, generate()'s compiled step: inductor on CUDA, dynamo's eager backend on the CPU), warmed, then
    profiled over a one-token and a full generation."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    timer = GenerationTimer(model, batch, prompt, new_tokens, device, "inductor" if cuda else "eager")
    timer.warm()
    timer.sample(1)  # (the CUDA graph recorded and replayed, the guards settled)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    found = []
    for n in (1, new_tokens):
        with profile(activities=activities) as prof:
            timer.run(n)
        found.append(events(prof, cuda))
    prefill, full = found
    steps = new_tokens - 1
    return {name: ((count - prefill.get(name, [0, 0])[0]) / steps, (us - prefill.get(name, [0, 0])[1]) / steps)
            for name, (count, us) in full.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["transformer++-405m", "dcformer++-405m"])
    parser.add_argument("--batches", type=int, nargs="+", default=[16])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--top", type=int, default=25, help="kernels listed per row, by time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: expected at least 2 (a step after the prefill)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"# headmix decode profile: {name}, {datetime.date.today()}, torch {torch.__version__}, {args.dtype}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens; "
          + ("compiled step (inductor, CUDA graphs): CUDA kernels" if cuda else
             "step compiled by dynamo's eager backend: aten operators"))
    unit = "kernels" if cuda else "aten ops"
    for variant in args.variants:
        torch.manual_seed(0)
        model = build(variant, "auto", device, getattr(torch, args.dtype)).eval()
        for batch in args.batches:
            per_step = step_profile(model, batch, args.prompt, args.new_tokens, device)
            total = sum(c for c, _ in per_step.values())
            time = sum(t for _, t in per_step.values())
            print(f"\n## {variant}, batch {batch}: {total:.1f} {unit} per step, {time:,.1f} us per step\n")
            print(f"| us per step | per step | {unit[:-1]} |\n|---|---|---|")
            for kernel, (count, us) in sorted(per_step.items(), key=lambda kv: -kv[1][1])[:args.top]:
                if count > 0:
                    print(f"| {us:,.2f} | {count:.2f} | `{kernel[:100]}` |")
        del model
        if cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
