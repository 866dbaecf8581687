"""Load a real model from a local folder: native MiniCPM-V 4.6/4.7, or the 2.6 family.

Families (:mod:`mvshards.families`, decided from ``config.json`` alone, see
:func:`detect_family`):

* :data:`~mvshards.families.NATIVE_46` -- MiniCPM-V 4.6 / 4.7, native in transformers
  (``model_type`` ``minicpmv4_6`` or ``minicpmv4_7``): loaded with
  ``AutoModelForImageTextToText``; no remote code.
* :data:`~mvshards.families.REMOTE_26` -- MiniCPM-V 2.6, MiniCPM-o 2.6, MiniCPM-V 4.0 / 4.5
  (``model_type`` ``minicpmv`` or ``minicpmo``, or an ``auto_map`` naming MiniCPM code):
  their modelling code ships with the checkpoint, so loading needs ``trust_remote_code``
  (``--trust-remote-code``); loaded with ``AutoModel`` as the official fine-tuning script
  does.

Nothing is downloaded: ``path`` must be a local folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mvshards.families import NATIVE_46, REMOTE_26, Family

NATIVE_MODEL_TYPES = ("minicpmv4_6", "minicpmv4_7")
REMOTE_MODEL_TYPES = ("minicpmv", "minicpmo")

log = logging.getLogger("mvtrain")


class ModelLoadError(Exception):
    """The model folder cannot be used (one line, naming the folder and the fix)."""


def read_config(path: Path | str) -> dict[str, Any]:
    """The parsed ``config.json`` of a local model folder."""
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(
            f"{folder}: no config.json; --model takes a local Hugging Face model folder "
            "(download it first, e.g. with `hf download`) or `tiny`"
        )
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config}: not valid JSON ({exc})") from exc


def detect_family(path: Path | str) -> Family:
    """The family of a local model folder, from its config.json: native classes
    (:data:`~mvshards.families.NATIVE_46`) or remote code (:data:`~mvshards.families.REMOTE_26`)."""
    config = read_config(path)
    model_type = str(config.get("model_type", ""))
    if model_type in NATIVE_MODEL_TYPES:
        return NATIVE_46
    auto_map = config.get("auto_map") or {}
    if model_type in REMOTE_MODEL_TYPES or any(
        "minicpm" in str(v).lower() for v in auto_map.values()
    ):
        query_num = config.get("query_num", 64)
        if query_num != 64:
            raise ModelLoadError(
                f"{path}: config.json has query_num {query_num}; only the 2.6 family (64 "
                "queries per image: MiniCPM-V 2.6, MiniCPM-o 2.6, 4.0, 4.5) is supported, "
                "not MiniCPM-V 2.0 / Llama3-V 2.5"
            )
        return REMOTE_26
    raise ModelLoadError(
        f"{path}: config.json has model_type {model_type!r}, not a MiniCPM-V model this "
        f"trainer knows (native: {', '.join(NATIVE_MODEL_TYPES)}; remote code: "
        f"{', '.join(REMOTE_MODEL_TYPES)} or an auto_map to MiniCPM code)"
    )


def _torch_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` for ``dtype``: a ``torch.dtype``, a ``--dtype`` name, or None
    (float32)."""
    import torch

    from mvtrain.precision import torch_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype("fp32" if dtype is None else str(dtype))


def _warn_low_precision_buffers(model: Any, folder: Path) -> None:
    """Name the floating-point buffers that came out below float32 (modelling code that
    builds them in the default dtype, which ``from_pretrained`` sets to the load dtype)."""
    import torch

    low = [
        name
        for name, buf in model.named_buffers()
        if buf.is_floating_point() and buf.dtype != torch.float32
    ]
    if low:
        log.warning(
            "%s: %d buffers loaded below float32 (%s%s); their values are rounded",
            folder,
            len(low),
            ", ".join(low[:3]),
            ", ..." if len(low) > 3 else "",
        )


def load_model(
    path: Path | str, trust_remote_code: bool = False, dtype: Any = None
) -> tuple[Any, Any, Family]:
    """``(model, tokenizer, family)`` from the local folder ``path``, the model in train mode.

    ``dtype``: the parameter dtype, a ``torch.dtype`` or a ``--dtype`` name (``"bf16"``,
    ``"fp16"``, ``"fp32"``, ``"auto"``); None is float32. It is always passed to
    ``from_pretrained``, whose own default (``"auto"``) would follow the checkpoint's dtype.
    Buffers keep the dtype the modelling code builds them in (float32 RoPE frequencies for
    the native 4.6 family). The 2.6 family raises :class:`ModelLoadError` unless
    ``trust_remote_code`` is set.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    family = detect_family(folder)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if not family.remote_code:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        if not trust_remote_code:
            raise ModelLoadError(
                f"{folder} is a MiniCPM-V 2.6-family model whose code ships with the "
                "checkpoint; pass --trust-remote-code to run it (read that code first)"
            )
        from transformers import AutoModel

        if read_config(folder).get("model_type") == "minicpmo":
            # As the official fine-tuning script: the vision-language part only.
            kwargs.update(init_vision=True, init_audio=False, init_tts=False)
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    _warn_low_precision_buffers(model, folder)
    model.train()
    return model, tokenizer, family
