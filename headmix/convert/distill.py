"""A short distillation fine-tune of a converted model against its original (the teacher).

Only the collaborative parameters (shared query/key, mixing matrix, content bias) are trained, with
Hugging Face ``Trainer`` as the engine, on one of two losses at real (non-padding) tokens:

* ``"last"``: the mean squared error between the student's and the teacher's last hidden states;
* ``"layers"``: the squared error of *every* layer's hidden states, each divided by the teacher's
  mean square at that layer (so no layer, and no outlier dimension, dominates), plus
  ``1 - cosine`` of the mean-pooled sentence embeddings (what sentence-embedding users compare).
"""

from __future__ import annotations

import tempfile

import datasets
import torch
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments


class HiddenStateDistillation(nn.Module):
    """``student`` + frozen ``teacher``; ``forward`` returns the masked hidden-state MSE as ``loss``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str = "layers") -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not allowed: expected one of {LOSSES}")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.loss = loss

    def train(self, mode: bool = True) -> HiddenStateDistillation:
        """Both models stay in eval mode (``Trainer`` calls ``train()``): no dropout in the teacher's targets
        nor in the student, which is fitted to reproduce the teacher's deterministic outputs."""
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        every = self.loss == "layers"
        with torch.no_grad():
            target = self.teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=every)
        output = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=every)
        mask = attention_mask[..., None].to(output.last_hidden_state.dtype)
        if not every:
            hidden, reference = output.last_hidden_state, target.last_hidden_state
            return {"loss": ((hidden - reference) ** 2 * mask).sum() / (mask.sum() * hidden.shape[-1])}
        loss = 0.0
        for hidden, reference in zip(output.hidden_states[1:], target.hidden_states[1:]):
            loss = loss + ((hidden - reference) ** 2 * mask).sum() / ((reference**2) * mask).sum()
        loss = loss / (len(output.hidden_states) - 1)
        pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1)
        pooled_ref = (target.last_hidden_state * mask).sum(1) / mask.sum(1)
        loss = loss + (1 - torch.nn.functional.cosine_similarity(pooled, pooled_ref, dim=-1)).mean()
        return {"loss": loss}


LOSSES = ("layers", "last")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    texts: list[str],
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    max_length: int = 64,
    seed: int = 0,
    loss: str = "layers",
) -> list[float]:
    """Train ``student``'s collaborative parameters to reproduce ``teacher``'s hidden states on ``texts``.

    ``loss`` is ``"layers"`` (every layer, normalised, plus the pooled-embedding cosine) or ``"last"``
    (last hidden state MSE); see the module docstring. Returns the logged training losses.
    ``student`` is changed in place.
    """
    if not texts:
        raise ValueError("distillation needs at least one text")
    was_training = student.training
    for name, p in student.named_parameters():
        p.requires_grad_("headmix_collaborative" in name)
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("the student has no collaborative parameters: convert it first")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    data = datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 10),
            save_strategy="no", report_to="none", seed=seed, use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False, disable_tqdm=True,
        )
        trainer = Trainer(model=HiddenStateDistillation(student, teacher, loss), args=args, train_dataset=data.with_format("torch"))
        trainer.train()
    student.requires_grad_(True)
    student.train(was_training)
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]
