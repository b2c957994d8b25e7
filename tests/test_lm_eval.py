"""A saved headmix model loads in EleutherAI's lm-eval harness through its ordinary `hf` model type."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

import headmix  # noqa: E402,F401  (registers the Auto classes)
from headmix.models import DCFormerConfig, DCFormerForCausalLM  # noqa: E402
from headmix.training.data import default_corpus, train_tokenizer  # noqa: E402


def cloze_items(lines: list[str], n: int, seed: int = 0) -> list[dict]:
    """Real Shakespeare lines cut in two; the true ending against two endings of other lines."""
    rng = random.Random(seed)
    usable = [line for line in lines if len(line.split()) >= 6]
    items = []
    for line in rng.sample(usable, n):
        words = line.split()
        cut = len(words) // 2
        others = rng.sample(usable, 2)
        endings = [" " + " ".join(words[cut:])] + [" " + " ".join(o.split()[len(o.split()) // 2 :]) for o in others]
        order = rng.sample(range(3), 3)
        items.append({"context": " ".join(words[:cut]), "choices": [endings[i] for i in order], "label": order.index(0)})
    return items


def saved_model_and_task(tmp_path):
    """A tiny DCFormer++ saved with its tokenizer, and a local multiple-choice task (YAML in ``tmp_path``)."""
    text = default_corpus(tmp_path / "cache")[0].read_text()
    tokenizer = train_tokenizer(iter(text.split("\n\n")), vocab_size=300)
    torch.manual_seed(0)
    config = DCFormerConfig.from_preset("tiny-dcformer++", vocab_size=len(tokenizer), num_hidden_layers=2,
                                        eos_token_id=tokenizer.eos_token_id)
    model = DCFormerForCausalLM(config).eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    items = cloze_items([line for line in text.splitlines() if line and not line.endswith(":")], n=12)
    (tmp_path / "cloze.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "shakespeare_cloze.yaml").write_text(
        "task: shakespeare_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n"
    )
    return model, tokenizer, model_dir, items


@pytest.mark.slow
def test_lm_eval_scores_a_saved_model_from_the_harness_and_the_headmix_command(tmp_path, capsys):
    """One saved model, one local task, three routes to the same accuracy: lm-eval's own `hf` model type (through
    its Python API), `headmix eval MODEL --tasks ...` (lm-eval's task names, options and table, without
    trust_remote_code; the JSON it writes), and our model's log-probabilities summed here."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from headmix.cli import main
    from headmix.evaluation import task_manager

    model, tokenizer, model_dir, items = saved_model_and_task(tmp_path)
    manager = task_manager(tmp_path)  # built once (~15 s): `headmix eval` below reuses it in this process
    assert isinstance(manager, TaskManager)
    result = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["shakespeare_cloze"],
        task_manager=manager, device="cpu", batch_size=4,
    )
    harness_acc = result["results"]["shakespeare_cloze"]["acc,none"]

    # the same accuracy computed here, from our model's own log-probabilities
    correct = 0
    with torch.no_grad():
        for item in items:
            context = tokenizer(item["context"])["input_ids"]
            scores = []
            for choice in item["choices"]:
                ending = tokenizer(item["context"] + choice)["input_ids"][len(context):]
                ids = torch.tensor([context + ending])
                logprobs = model(ids).logits[0, :-1].log_softmax(-1)
                scores.append(sum(logprobs[len(context) - 1 + k, t].item() for k, t in enumerate(ending)))
            correct += int(max(range(3), key=scores.__getitem__) == item["label"])
    assert harness_acc == pytest.approx(correct / len(items))

    capsys.readouterr()
    out = tmp_path / "results.json"
    assert main(["eval", str(model_dir), "--tasks", "shakespeare_cloze", "--include-path", str(tmp_path),
                 "--batch-size", "4", "--output-path", str(out)]) == 0
    table = capsys.readouterr().out
    assert "shakespeare_cloze" in table and "acc" in table
    written = json.loads(out.read_text())["results"]["shakespeare_cloze"]["acc,none"]
    assert written == pytest.approx(harness_acc)
    assert main(["eval", str(model_dir), "--tasks", "no_such_task", "--include-path", str(tmp_path)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().err
