"""Language-model speed: training throughput with MFU, and generation speed, Transformer++ vs DCFormer(++).

Training: random tokens, ``--train-batch`` sequences of ``--seq`` tokens, bf16 weights with fp32
AdamW states (``torch.optim.AdamW(fused=True)`` on CUDA), ``--steps`` timed steps after
``--warmup``; tokens/s and model FLOPs utilisation. Model FLOPs per token are
``6 N + 6 L T D`` (weights, and the causal attention matmuls: ``12 L T D / 2``), ``N`` the
non-embedding parameters; MFU divides by the bf16 matmul rate measured on this device (an 8192^3
``torch.matmul``), not a datasheet figure. DCMHA's Compose arithmetic is not counted.

Inference: ``generate()`` with a ``--prompt``-token prompt and ``--new-tokens`` new tokens (greedy,
our cache), batch 1 and 16; prefill tokens/s from a 1-token generation, decode tokens/s from the
difference (medians of ``--repeats`` calls each, default 3, after one warm-up call of each length; the last column
gives their range). With ``--compile`` the generation rows decode as a user of transformers would with compilation:
a static cache (``model.new_cache(max_cache_len=...)``, reset and reused across the timed calls, as transformers
documents for its ``StaticCache``) and ``generate()``'s own compiled decoding step (``CompileConfig(dynamic=False)``:
inductor, ``mode="reduce-overhead"``, i.e. CUDA graphs, static shapes: the headmix models' default, given to every
variant, the anchor too, so that each batch size compiles its own static step -- transformers' ``dynamic=None``
recompiles the second batch size of a process with symbolic sizes); one warm-up generation compiles, the timed ones
do not.

``--rounds N`` builds and warms every generation row first, then times N rounds in which the rows take turns (the
medians over all rounds): a host whose speed drifts over minutes (the H200 machine's batch-1 decode moved by 20% within
an hour on 2026-12-01) then moves every row alike. ``--isolate`` measures each generation row (variant, batch) in a
process of its own: in one process a model measured
after another decoded slower on the H200 (2026-12-01: DCFormer++-405M at batch 1, 267.5-275.2 tokens/s after
Transformer++, 315.7-340.9 alone; the cause is not known), so without it the rows after the first may be understated.

The anchor: a variant ``hf-llama:<preset>`` is transformers' own ``LlamaForCausalLM`` with that preset's shape
(random weights, SDPA attention), decoded the same way (its ``StaticCache`` with ``--compile``)::

    python benchmarks/lm_speed.py --variants hf-llama:transformer++-405m transformer++-405m dcformer++-405m \
        --skip-train --compile --prompt 512 --new-tokens 128 --batches 1 16

    python benchmarks/lm_speed.py                                           # GPU: 125M-class models
    python benchmarks/lm_speed.py --variants tiny-transformer++ tiny-dcformer++ --device cpu --seq 64 \\
        --train-batch 2 --steps 2 --warmup 1 --prompt 16 --new-tokens 8 --batches 1     # CPU smoke run

``--profile N`` adds, after the training table, where N eager steps of each variant spend their time (the ops and
kernels with the most self device time per step, by input shapes)::

    python benchmarks/lm_speed.py --variants transformer++-405m dcformer++-405m --skip-generate --steps 4 --profile 2

Variants are preset names, plus ``<preset>:global`` (every layer global, no QK-norm: DCFormer
rather than DCFormer++).

``--compile`` trains through ``torch.compile``: of the whole model (``--compile-scope model``, default)
or of each decoder block (``layers``: torchtitan's per-block compilation, one compile reused by every
block, much quicker to build). ``--num-layers N`` keeps only the first ``N`` blocks of every variant (the
big presets on one GPU); the table says so.

    python benchmarks/lm_speed.py --variants transformer++-405m dcformer++-405m --compile --skip-generate
    python benchmarks/lm_speed.py --variants transformer++-2.8b dcformer++-2.8b --num-layers 16 --skip-generate
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headmix.models import DCFormerConfig, DCFormerForCausalLM  # noqa: E402
from headmix.models.modeling import CACHE_NAME  # noqa: E402  (generate()'s name for a cache object)


ANCHOR = "hf-llama"


def llama_anchor(preset: str, device, dtype, num_layers: int | None = None):
    """transformers' ``LlamaForCausalLM`` with the shape of a Transformer++ ``preset`` (random weights, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = DCFormerConfig.from_preset(preset)
    if c.backbone != "llama" or c.attention != "mha" or c.window_size is not None or c.qk_norm:
        raise ValueError(f"{ANCHOR}:{preset}: the anchor takes a Transformer++ preset (llama backbone, global "
                         "multi-head attention, no QK-norm)")
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=num_layers or c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype)


def build(variant: str, backend: str, device, dtype, num_layers: int | None = None) -> DCFormerForCausalLM:
    """The model of a variant name, built on ``device`` in ``dtype``; ``num_layers``: keep only that many blocks."""
    preset, _, option = variant.partition(":")
    if preset == ANCHOR:
        return llama_anchor(option, device, dtype, num_layers)
    overrides = dict(attention_backend=backend)
    if option == "global":
        overrides.update(window_size=None, window_pattern=None, qk_norm=False)
    elif option:
        raise ValueError(f"variant option {option!r} is not known: expected ':global' or nothing")
    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    config = DCFormerConfig.from_preset(preset, **overrides)
    with torch.device(device):  # initialised where it runs: a 6.9B model is slow to build on the CPU
        return DCFormerForCausalLM(config).to(dtype=dtype)


def preset_layers(variant: str) -> int:
    """The number of blocks of a variant's preset."""
    return DCFormerConfig.from_preset(variant.partition(":")[0]).num_hidden_layers


def compiled(model: DCFormerForCausalLM, scope: str):
    """``model`` trained through ``torch.compile``: ``scope="model"`` compiles the whole forward, ``"layers"``
    each decoder block in place (the returned callable is the model itself then)."""
    if scope == "model":
        return torch.compile(model)
    if scope == "layers":
        for block in model.model.layers:
            block.compile()
        return model
    raise ValueError(f"compile scope {scope!r} is not known: expected 'model' or 'layers'")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype) -> float:
    """Measured dense matmul FLOP/s of this device in ``dtype``."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    reps = 20 if device.type == "cuda" else 3
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def training_step(model, batch: int, seq: int, device, compile_scope: str | None = None):
    """A function running one optimizer step (AdamW) of ``model`` on a fixed batch of random tokens; ``compile_scope``:
    through ``torch.compile`` (see :func:`compiled`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    model.train()
    run = compiled(model, compile_scope) if compile_scope else model

    def step() -> None:
        run(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_speed(model, batch, seq, steps, warmup, device, compile_scope: str | None = None) -> tuple[float, float]:
    """(tokens/s, peak GiB) of optimizer steps on random tokens; ``compile_scope``: through ``torch.compile``
    (see :func:`compiled`; the warm-up steps include the compilation)."""
    step = training_step(model, batch, seq, device, compile_scope)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        step()
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch * seq * steps / elapsed, peak


def static_cache(model, max_cache_len: int):
    """A static cache for ``model`` (headmix's, or transformers' ``StaticCache`` for the Llama anchor)."""
    if isinstance(model, DCFormerForCausalLM):
        return model.new_cache(max_cache_len=max_cache_len)
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


class GenerationTimer:
    """One generation row (a model at one batch size) through ``generate()``: :meth:`warm` (the first calls: compilation
    with ``compile_backend``), then :meth:`sample` as often as wanted (``--rounds`` interleaves the rows' samples, so
    that a host whose speed drifts over minutes moves every row alike), then :meth:`result`. ``compile_backend``:
    decode with a static cache and generate()'s compiled step (``"inductor"``: transformers' default, CUDA graphs on
    CUDA)."""

    def __init__(self, model, batch: int, prompt: int, new_tokens: int, device, compile_backend: str | None = None):
        from transformers import CompileConfig

        model.eval()
        self.model, self.batch, self.prompt, self.new_tokens, self.device = model, batch, prompt, new_tokens, device
        self.compile_backend = compile_backend
        self.ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
        self.kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        self.cache = None
        if compile_backend:
            config = (CompileConfig(dynamic=False) if compile_backend == "inductor"
                      else CompileConfig(backend=compile_backend, mode=None, dynamic=False))
            config._compile_all_devices = True  # transformers compiles on accelerators only unless told (CPU runs)
            self.kwargs["compile_config"] = config
            self.cache = static_cache(model, prompt + new_tokens)
        self.first = float("nan")
        self.prefills: list[float] = []
        self.totals: list[float] = []

    @torch.no_grad()
    def run(self, n: int) -> float:
        if self.cache is not None:
            self.cache.reset()  # same buffers, same addresses: the CUDA graph replays, nothing recompiles
            self.kwargs[CACHE_NAME] = self.cache
        sync(self.device)
        t0 = time.perf_counter()
        self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, **self.kwargs)
        sync(self.device)
        return time.perf_counter() - t0

    def warm(self) -> None:
        self.first = self.run(self.new_tokens)  # full length: compilation, allocator growth, kernel selection, caches
        if self.compile_backend and not torch._dynamo.utils.counters["stats"]["unique_graphs"]:
            raise RuntimeError("--compile: generate() compiled nothing (this transformers version did not take the "
                               "static cache as compileable)")
        self.run(1)  # the prefill-only call has its own first-call costs (a 2026-11-30 run timed one at 1 s)

    def sample(self, repeats: int) -> None:
        self.prefills += [self.run(1) for _ in range(repeats)]
        self.totals += [self.run(self.new_tokens) for _ in range(repeats)]

    def result(self) -> tuple[float, float, float, dict]:
        """(prefill tokens/s, decode tokens/s, seconds of the first call, spread): medians over the timed calls;
        ``spread``: ``{"prefill": (lowest, highest), "decode": (lowest, highest)}`` tokens/s over them (decode: each
        full generation against the median prefill), for the table to show how much a figure moves between calls."""
        batch, prompt, new_tokens = self.batch, self.prompt, self.new_tokens
        prefill, total = statistics.median(self.prefills), statistics.median(self.totals)
        if total <= prefill:
            raise RuntimeError(f"generation of {new_tokens} tokens took {total:.4f} s, no longer than the prefill "
                               f"alone ({prefill:.4f} s): the timings are not usable")
        # (a full call no longer than the median prefill, possible on a busy CPU at tiny sizes, has no decode rate)
        decode = [batch * (new_tokens - 1) / (t - prefill) for t in self.totals if t > prefill]
        spread = {"prefill": (batch * prompt / max(self.prefills), batch * prompt / min(self.prefills)),
                  "decode": (min(decode), max(decode))}
        return batch * prompt / prefill, batch * (new_tokens - 1) / (total - prefill), self.first, spread


def generate_speed(model, batch, prompt, new_tokens, device,
                   compile_backend: str | None = None, repeats: int = 3) -> tuple[float, float, float, dict]:
    """:class:`GenerationTimer`'s result for one row on its own: one warm-up of each length, then ``repeats`` timed
    calls of each."""
    timer = GenerationTimer(model, batch, prompt, new_tokens, device, compile_backend)
    timer.warm()
    timer.sample(repeats)
    return timer.result()


def interleaved_rows(args, device, dtype, compile_backend: str | None) -> dict:
    """``--rounds``: every (variant, batch) row's :class:`GenerationTimer`, built and warmed first (every model stays
    in memory), then ``args.rounds`` rounds of ``args.repeats`` timed calls per row, the rows taking turns. Returns
    ``{(variant, batch): timer}``, or for a row that failed, what building or warming it raised."""
    rows = {}
    # every row's compiled step stays: room for each (the default limit of 8 compilations per frame would be hit)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               2 * len(args.variants) * len(args.batches))
    for variant in args.variants:
        torch.manual_seed(0)
        try:
            model = build(variant, args.backend, device, dtype, args.num_layers)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            rows.update({(variant, batch): error for batch in args.batches})
            continue
        for batch in args.batches:
            try:
                rows[variant, batch] = GenerationTimer(model, batch, args.prompt, args.new_tokens, device,
                                                       compile_backend)
                rows[variant, batch].warm()
            except (RuntimeError, torch.OutOfMemoryError) as error:
                rows[variant, batch] = error
    timers = [row for row in rows.values() if isinstance(row, GenerationTimer)]
    for _ in range(args.rounds):
        for timer in timers:
            timer.sample(args.repeats)
    return rows


def isolated_row(variant: str, batch: int, argv: list[str] | None) -> tuple[float, float, float, dict]:
    """:func:`generate_speed`'s result for one (variant, batch), measured by this script in a process of its own
    (``--isolate``); a failure there comes back as a ``RuntimeError`` naming its last line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keep, skip = [], False
    for arg in argv:  # the parent's options, less its variants, batches, --isolate and its training rows
        if skip and not arg.startswith("--"):
            continue
        skip = arg in ("--variants", "--batches")
        if not skip and arg != "--isolate":
            keep.append(arg)
    done = subprocess.run([sys.executable, __file__, *keep, "--skip-train", "--variants", variant, "--batches",
                           str(batch), "--emit-row"], capture_output=True, text=True)
    found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not found:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"isolated run failed: {last}")
    pre, dec, first, spread = json.loads(found[0])
    return pre, dec, first, {key: tuple(value) for key, value in spread.items()}


def profile_training(variant: str, backend: str, device, dtype, seq: int, batch: int, steps: int, top: int,
                     num_layers: int | None = None) -> None:
    """Print where ``steps`` eager training steps of ``variant`` spend their time (after two warm-up steps): the
    ``top`` operators and kernels by self time per step -- device time on CUDA, CPU time on the CPU -- grouped by
    name and input shapes (``torch.profiler``), with the wall time and the profiled total per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build(variant, backend, device, dtype, num_layers)
    cuda = device.type == "cuda"
    step = training_step(model, batch, seq, device)
    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages(group_by_input_shape=True)
    self_ms = [((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps, e) for e in events]
    self_ms = sorted(((ms, e) for ms, e in self_ms if ms > 0), key=lambda pair: -pair[0])
    where = "device" if cuda else "CPU"
    print(f"\n# {variant}: {wall:.1f} ms a step under the profiler (wall), {sum(ms for ms, _ in self_ms):.1f} ms of "
          f"self {where} time; top {top} by self {where} time per step (ops and kernels, by input shapes)")
    print("| ms/step | calls/step | op or kernel | input shapes |")
    print("|---|---|---|---|")
    for ms, e in self_ms[:top]:
        shapes = str(e.input_shapes)[:100] if e.input_shapes and any(e.input_shapes) else ""
        print(f"| {ms:.2f} | {e.count / steps:g} | {e.key[:90]} | {shapes} |", flush=True)
    del model, step
    if cuda:
        torch.cuda.empty_cache()


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def train_row(variant: str, backend: str, device, dtype, seq: int, batch: int, steps: int, warmup: int, rate: float,
              compile_scope: str | None = None, num_layers: int | None = None) -> dict:
    """One training measurement: tokens/s, MFU against ``rate``, peak GiB, parameters; ``{"error": ...}`` on
    out-of-memory or a failure (the table goes on)."""
    torch.manual_seed(0)
    model = None
    try:
        model = build(variant, backend, device, dtype, num_layers)
        c = model.config
        n = non_embedding_parameters(model)
        tps, peak = train_speed(model, batch, seq, steps, warmup, device, compile_scope)
        flops_per_token = 6 * n + 6 * c.num_hidden_layers * seq * c.hidden_size
        return dict(variant=variant, params=n, layers=c.num_hidden_layers, tokens_per_s=tps,
                    mfu=tps * flops_per_token / rate, peak_gib=peak)
    except torch.OutOfMemoryError:
        return dict(variant=variant, error="OOM")
    except ValueError:
        raise
    except Exception as error:  # e.g. a compile failure: a row saying so
        return dict(variant=variant, error=f"{type(error).__name__}: {str(error).splitlines()[0][:100]}")
    finally:
        del model
        if compile_scope:
            torch._dynamo.reset()  # the next variant compiles afresh, within the default recompile limits
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+",
                        default=["125m-transformer++", "125m-dcformer++", "125m-dcformer++:global"])
    parser.add_argument("--backend", default="auto", help="attention backend of composed layers (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generate() calls of each length per row (the table prints their medians and range; "
                             "batch-1 rows are host-bound and move between calls: more repeats, nothing else running)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile; generate with the static cache and a compiled step")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the generation rows with --compile (default: inductor; "
                             "'eager' or 'aot_eager' for a quick CPU check)")
    parser.add_argument("--compiled-decode", default=None, choices=["triton", "reference"],
                        help="with --compile: what DCMHA runs in the compiled decoding step on CUDA (sets "
                             "headmix.ops.COMPILED_DECODE; default: its value)")
    parser.add_argument("--decode-kernel", default=None, choices=["tiles", "one_query"],
                        help="the Triton kernel DCMHA decodes one query with (sets headmix.ops.triton.launch."
                             "DECODE_KERNEL; default: its value)")
    parser.add_argument("--compile-scope", default="model", choices=["model", "layers"],
                        help="with --compile: the whole model, or each decoder block")
    parser.add_argument("--num-layers", type=int, default=None, help="keep only the first N blocks of each variant")
    parser.add_argument("--all-guards", action="store_true",
                        help="with --compile: check dynamo's guards at every decoding step (headmix.models.steady."
                             "SKIP_GUARDS = False; by default headmix models skip them once the steps are steady)")
    parser.add_argument("--isolate", action="store_true",
                        help="measure each generation row (variant, batch) in a process of its own: in one process a "
                             "model measured after another decoded slower (H200, 2026-12-01: DCFormer++-405M "
                             "267.5-275.2 tokens/s after Transformer++, 315.7-340.9 alone; cause not found)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="generation rows in one process, every model built and warmed first, then this many "
                             "rounds of --repeats timed calls per row, the rows taking turns (a host whose speed "
                             "drifts moves every row alike; the table gives the medians over all rounds)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the training table, profile this many eager training steps of each variant and "
                             "print where their time goes (torch.profiler: ops and kernels by self time and input "
                             "shapes; --profile-top rows each)")
    parser.add_argument("--profile-top", type=int, default=30, help="rows of each --profile table (default 30)")
    parser.add_argument("--emit-row", action="store_true", help=argparse.SUPPRESS)  # (--isolate's child processes)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats is {args.repeats}: expected a positive number of timed calls")
    if args.rounds < 1 or (args.rounds > 1 and args.isolate):
        raise ValueError(f"--rounds is {args.rounds}: expected a positive number, and 1 with --isolate (rounds take "
                         "turns in one process)")
    if args.profile < 0 or args.profile_top < 1:
        raise ValueError(f"--profile is {args.profile} and --profile-top {args.profile_top}: expected a number of "
                         "steps (0: no profile) and a positive number of rows")
    if args.num_layers is not None and args.num_layers < 1:
        raise ValueError(f"--num-layers is {args.num_layers}: expected a positive number of blocks")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rate = matmul_rate(device, dtype)
    print(f"# headmix LM speed: {name}, {datetime.date.today()}, torch {torch.__version__}, {dtype}, "
          f"measured matmul rate {rate / 1e12:.1f} TFLOP/s")
    print(f"# command: python benchmarks/lm_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    rows = []
    if args.compile:
        # torch 2.11 (H200 machine, 2026-12-01): with its AOTAutograd cache on, the second model compiled in one process
        # segfaulted in the cache's save (autograd_cache._pickle_entry, during the first backward) -- twice, ending
        # the table without a row. The cache only saves compiled graphs for later processes; the timings need none.
        from torch._functorch import config as functorch_config

        functorch_config.enable_autograd_cache = False
    if not args.skip_train:
        mode = f"compiled ({args.compile_scope})" if args.compile else "eager"
        print(f"\n| variant | params (non-emb.) | train tokens/s (seq {args.seq}, batch {args.train_batch}, {mode}) | "
              "MFU | peak GiB | vs first |")
        print("|---|---|---|---|---|---|")
        first = None
        for variant in args.variants:
            r = train_row(variant, args.backend, device, dtype, args.seq, args.train_batch, args.steps, args.warmup,
                          rate, args.compile_scope if args.compile else None, args.num_layers)
            label = variant
            if args.num_layers is not None:
                label += f" ({args.num_layers} of {preset_layers(variant)} layers)"
            if "error" in r:
                print(f"| {label} | {r['error']} | | | | |", flush=True)
                continue
            first = first or r["tokens_per_s"]
            print(f"| {label} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                  f"{r['peak_gib']:.1f} | {r['tokens_per_s'] / first:.2f} |", flush=True)
            rows.append(("train", variant, r["tokens_per_s"]))
        for variant in args.variants if args.profile else ():
            profile_training(variant, args.backend, device, dtype, args.seq, args.train_batch, args.profile,
                             args.profile_top, args.num_layers)
    if not args.skip_generate:
        import transformers

        if args.compiled_decode:
            import headmix.ops

            headmix.ops.COMPILED_DECODE = args.compiled_decode
        from headmix.ops import COMPILED_DECODE

        if args.all_guards:
            from headmix.models import steady

            steady.SKIP_GUARDS = False
        if args.decode_kernel:
            from headmix.ops.triton import launch

            launch.DECODE_KERNEL = args.decode_kernel

        from headmix.models import steady

        guards = "every step's guards" if not steady.SKIP_GUARDS else "guards skipped once steady"
        mode = (f"static cache, compiled ({args.compile_backend}, static shapes; DCMHA's step: {COMPILED_DECODE}; "
                f"headmix models: {guards})" if args.compile else "dynamic cache, eager")
        print(f"\n# generation: {mode}, transformers {transformers.__version__}")
        calls = args.repeats * args.rounds
        print(f"| variant | batch | prefill tokens/s (prompt {args.prompt}) | decode tokens/s ({args.new_tokens} new) | "
              f"prefill ÷ first | decode ÷ first | first call s | range over {calls} calls (prefill; decode) |")
        print("|---|---|---|---|---|---|---|---|")
        backend = args.compile_backend if args.compile else None
        taken = interleaved_rows(args, device, dtype, backend) if args.rounds > 1 else {}
        first_rows: dict[int, tuple[float, float]] = {}  # per batch: the first variant's (prefill, decode)
        for variant in args.variants:
            torch.manual_seed(0)
            model = None if args.isolate or taken else build(variant, args.backend, device, dtype, args.num_layers)
            for batch in args.batches:
                try:
                    if args.isolate:
                        pre, dec, first, spread = isolated_row(variant, batch, argv)
                    elif taken:
                        if isinstance(taken[variant, batch], BaseException):
                            raise taken[variant, batch]
                        pre, dec, first, spread = taken[variant, batch].result()
                    else:
                        pre, dec, first, spread = generate_speed(model, batch, args.prompt, args.new_tokens, device,
                                                                 backend, args.repeats)
                except torch.OutOfMemoryError:
                    print(f"| {variant} | {batch} | OOM | | | | | |", flush=True)
                    continue
                except RuntimeError as error:  # a compile failure: a row saying so, the table goes on
                    print(f"| {variant} | {batch} | {type(error).__name__}: {str(error).splitlines()[0][:120]} | | | "
                          "| | |", flush=True)
                    continue
                if args.emit_row:
                    print("ROW " + json.dumps([pre, dec, first, spread]), flush=True)
                base_pre, base_dec = first_rows.setdefault(batch, (pre, dec))
                (pre_lo, pre_hi), (dec_lo, dec_hi) = spread["prefill"], spread["decode"]
                print(f"| {variant} | {batch} | {pre:,.0f} | {dec:,.1f} | {pre / base_pre:.2f} | {dec / base_dec:.2f} | "
                      f"{first:.1f} | {pre_lo:,.0f}–{pre_hi:,.0f}; {dec_lo:,.1f}–{dec_hi:,.1f} |", flush=True)
                rows.append(("generate", variant, batch, pre, dec))
            del model
            if args.compile and not args.isolate:
                torch._dynamo.reset()  # the next variant compiles afresh, within the default recompile limits
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as error:  # bad input: one clear line
        print(f"lm_speed: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
