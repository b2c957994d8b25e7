"""Does the data-aware collaborative decomposition generalise beyond its calibration text?

all-MiniLM-L6-v2 at one shared key size, no fine-tuning. Two corpora of real English sentences:
Shakespeare (the embedded corpus ``headmix train`` uses) and modern technical English (the prose of
the installed Python packages' own descriptions, their ``METADATA``). Each decomposition is
evaluated on held-out sentences of *both* corpora (mean cosine between original and converted
sentence embeddings):

* plain (weights only), data-aware calibrated on Shakespeare, on the technical text, on a 50/50 mix;
* data-aware on Shakespeare with the whitening shrunk towards the identity (``ridge``: the
  calibration second moment ``C`` becomes ``C + ridge * tr(C)/d * I``).

    python benchmarks/collab_cross_domain.py                 # D~k = 192, 256 sentences per set
    python benchmarks/collab_cross_domain.py --key-dim 96 --sentences 64

Prints a table with the device, date and versions. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collab_reparam import embed, load_minilm, real_sentences  # noqa: E402


def technical_sentences(n: int, seed: int) -> list[str]:
    """Prose lines of the installed distributions' descriptions (no code, tables or markup)."""
    lines = set()
    for dist in importlib.metadata.distributions():
        payload = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        text = payload if isinstance(payload, str) else (dist.metadata.get("Description") or "")
        for line in text.splitlines():
            line = line.strip()
            letters = sum(c.isalpha() or c == " " for c in line)
            if (len(line.split()) >= 6 and line[:1].isupper() and line.endswith((".", "!", "?"))
                    and letters >= 0.9 * len(line) and not re.match(r"(from|import) ", line)
                    and not re.search(r"https?:|::|=|\|", line)):
                lines.add(line)
    usable = sorted(lines)
    if len(usable) < n:
        sys.exit(f"only {len(usable)} technical sentences found: lower --sentences")
    return random.Random(seed).sample(usable, n)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-dim", type=int, default=192, help="shared key size D~k (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=256, help="per evaluation and calibration set (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=20, help="ALS iteration cap (default: %(default)s)")
    parser.add_argument("--ridges", type=float, nargs="*", default=[0.1, 1.0], help="whitening shrinkage to try")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "headmix"))
    args = parser.parse_args(argv)

    from headmix.convert.collaborative_hf import collect_attention_inputs, convert_to_collaborative

    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    n = args.sentences
    shakespeare = real_sentences(2 * n, seed=0, cache=Path(args.cache))
    technical = technical_sentences(2 * n, seed=0)
    evaluation = {"Shakespeare": shakespeare[:n], "technical": technical[:n]}
    calibration_text = {"Shakespeare": shakespeare[n:], "technical": technical[n:],
                        "mix": shakespeare[n : n + n // 2] + technical[n : n + n // 2]}
    references = {k: embed(model, tokenizer, v) for k, v in evaluation.items()}

    def activations(texts):
        batches = [dict(tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=128,
                                  return_tensors="pt")) for i in range(0, len(texts), 64)]
        return collect_attention_inputs(model, batches)

    calibrations = {k: activations(v) for k, v in calibration_text.items()}
    runs = [("plain", None, 1e-6)] + [(f"data-aware, calibrated on {k}", k, 1e-6) for k in calibrations]
    runs += [(f"data-aware, Shakespeare, ridge {r:g}", "Shakespeare", r) for r in args.ridges]
    rows = []
    for label, calibration, ridge in runs:
        converted = copy.deepcopy(model)
        start = time.perf_counter()
        convert_to_collaborative(converted, key_dim=args.key_dim, progress=False, n_iter_max=args.iterations,
                                 calibration=calibrations[calibration] if calibration else None, ridge=ridge)
        seconds = time.perf_counter() - start
        row = {"method": label, "seconds": seconds}
        for name, sentences in evaluation.items():
            row[name] = (embed(converted, tokenizer, sentences) * references[name]).sum(-1).mean().item()
        rows.append(row)
        print(f"  {label:<42} Shakespeare {row['Shakespeare']:.4f}  technical {row['technical']:.4f}  "
              f"{seconds:.1f} s", flush=True)

    command = "python benchmarks/collab_cross_domain.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nall-MiniLM-L6-v2, D~k = {args.key_dim} of {model.config.hidden_size}, no fine-tuning; {n} evaluation and "
          f"{n} calibration sentences per corpus (disjoint); ALS cap {args.iterations}, SVD init, float64.\n"
          f"Measured {datetime.date.today()} on CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, tensorly {importlib.metadata.version('tensorly')}.\nCommand: `{command.strip()}`\n")
    print("| decomposition | mean cosine on Shakespeare | mean cosine on technical English | time |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['Shakespeare']:.4f} | {r['technical']:.4f} | {r['seconds']:.1f} s |")
    return rows


if __name__ == "__main__":
    main()
