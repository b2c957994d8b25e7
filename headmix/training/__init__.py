"""Training: :mod:`.config` (every default), :mod:`.data` (corpus, tokenizer, packed sequences),
:mod:`.engine` (Hugging Face ``Trainer`` with atomic checkpoints), :mod:`.run` (the main job)."""
