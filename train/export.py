"""Export a trained model as a Hugging Face folder that ``from_pretrained`` loads back."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def export_hf(model: Any, tokenizer: Any, folder: Path, keep_model: bool = False) -> Path:
    """``save_pretrained`` the model and tokenizer into ``folder``.

    A LoRA (peft) model is written twice: the adapter alone in ``folder/adapter`` (load it
    with peft on top of the base model) and merged into the base weights in ``folder``. The
    merge changes the model it runs on: with ``keep_model`` (an export in the middle of
    training, e.g. ``--save-best``) it runs on a copy and ``model`` is left as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model.save_pretrained(str(folder / "adapter"))
        model = (copy.deepcopy(model) if keep_model else model).merge_and_unload()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder
