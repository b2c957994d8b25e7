"""A short distillation fine-tune of a converted model against its original (the teacher).

Only the collaborative parameters (shared query/key, mixing matrix, content bias) are trained, on
the mean squared error between the student's and the teacher's last hidden states at real
(non-padding) tokens, with Hugging Face ``Trainer`` as the engine.
"""

from __future__ import annotations

import tempfile

import datasets
import torch
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments


class HiddenStateDistillation(nn.Module):
    """``student`` + frozen ``teacher``; ``forward`` returns the masked hidden-state MSE as ``loss``."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            target = self.teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = self.student(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        loss = ((hidden - target) ** 2 * mask).sum() / (mask.sum() * hidden.shape[-1])
        return {"loss": loss}


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    texts: list[str],
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    max_length: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train ``student``'s collaborative parameters to reproduce ``teacher``'s hidden states on ``texts``.

    Returns the logged training losses. ``student`` is changed in place.
    """
    if not texts:
        raise ValueError("distillation needs at least one text")
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
        trainer = Trainer(model=HiddenStateDistillation(student, teacher), args=args, train_dataset=data.with_format("torch"))
        trainer.train()
    student.requires_grad_(True)
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]
