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
from collections.abc import Iterator
from contextlib import contextmanager
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


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))


def _check_remote_folder(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """The ``auto_map`` of a 2.6-family folder after checking that the files it names and
    the weights are there (each problem a one-line :class:`ModelLoadError`)."""
    auto_map = config.get("auto_map") or {}
    if "AutoModel" not in auto_map:
        raise ModelLoadError(
            f"{folder}: config.json has no auto_map.AutoModel naming the model code; copy the "
            "checkpoint's original config.json (and its *.py files) from the model repository"
        )
    for entry in auto_map.values():
        for ref in entry if isinstance(entry, list) else [entry]:
            if not isinstance(ref, str):
                continue
            file = folder / (ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
            if not file.is_file():
                raise ModelLoadError(
                    f"{folder}: {file.name} is missing (config.json's auto_map names it); "
                    "download every *.py file of the model repository into the folder"
                )
    if not _weight_files(folder):
        raise ModelLoadError(
            f"{folder}: no weights (*.safetensors or pytorch_model*.bin); download them into "
            "the folder, or use `mvtrain plan --model FOLDER` for a config-only plan"
        )
    return {k: v for k, v in auto_map.items() if isinstance(v, str)}


REMOTE_SKIPPED_TOWERS: dict[str, dict[str, bool]] = {
    "minicpmo": {"init_vision": True, "init_audio": False, "init_tts": False},
}
"""Constructor switches per ``model_type``, as the official fine-tuning script passes them:
MiniCPM-o 2.6 is fine-tuned on vision+text, its audio and TTS towers not built."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


@contextmanager
def _remote_errors(folder: Path, what: str) -> Iterator[None]:
    """Any failure while loading remote code as a one-line :class:`ModelLoadError`."""
    from mvtrain.model.remote_compat import RemoteCodeError

    try:
        yield
    except ModelLoadError:
        raise
    except RemoteCodeError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc
    except Exception as exc:
        if "ignore_mismatched_sizes" in str(exc):  # transformers' refusal of other shapes
            raise ModelLoadError(
                f"{folder}: the weights do not match the model code (tensors of another shape "
                "than config.json makes); download the weights, config.json and code of the "
                "same checkpoint revision"
            ) from exc
        raise ModelLoadError(
            f"{folder}: loading the {what} failed ({_one_line(exc)}); the checkpoint's code or "
            "files do not match this transformers/torch"
        ) from exc


def load_tokenizer(path: Path | str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local model folder; a 2.6-family folder under the remote-code
    compatibility fixes (its tokenizer config imports the model code)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file() or not detect_family(folder).remote_code:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if not trust_remote_code:
        raise _needs_trust(folder)
    from mvtrain.model.remote_compat import remote_code_compat

    model_type = str(read_config(folder).get("model_type", ""))
    with _remote_errors(folder, "tokenizer"), remote_code_compat(folder, model_type):
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def _needs_trust(folder: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{folder} is a MiniCPM-V 2.6-family model whose code ships with the "
        "checkpoint; pass --trust-remote-code to run it (read that code first)"
    )


def _load_remote(folder: Path, dtype: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a 2.6-family folder: the unmodified remote code under
    :func:`~mvtrain.model.remote_compat.remote_code_compat`, then every non-persistent buffer
    rebuilt from a fresh build and verified."""
    from transformers import AutoTokenizer

    from mvtrain.model.remote_compat import (
        fresh_buffers,
        rebuild_nonpersistent_buffers,
        remote_code_compat,
    )

    config = read_config(folder)
    auto_map = _check_remote_folder(folder, config)
    model_type = str(config.get("model_type", ""))
    switches = REMOTE_SKIPPED_TOWERS.get(model_type, {})
    with _remote_errors(folder, "model"), remote_code_compat(folder, model_type) as compat:
        cls = compat.model_class(auto_map["AutoModel"])
        model, info = cls.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, **switches
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        fresh = fresh_buffers(cls, model.config, dtype)
    _check_loading_info(folder, info, model_type)
    with _remote_errors(folder, "model"):
        report = rebuild_nonpersistent_buffers(model, fresh)
    log.info(
        "%s: %d non-persistent buffers checked against a fresh build, %d rebuilt%s",
        folder,
        report.checked,
        len(report.rebuilt),
        f" ({', '.join(report.rebuilt[:4])}{', ...' if len(report.rebuilt) > 4 else ''})"
        if report.rebuilt
        else "",
    )
    return model, tokenizer


SKIPPED_TOWER_PREFIXES = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.")
"""MiniCPM-o 2.6 parameters that are not built for vision+text fine-tuning (their weights in
the checkpoint are expected to go unused)."""


def _check_loading_info(folder: Path, info: dict[str, Any], model_type: str) -> None:
    """Weights that do not match the model: missing or wrongly shaped parameters, or (except
    for towers deliberately not built) unused checkpoint tensors, as one line."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(
        str(m[0]) if isinstance(m, tuple) else str(m) for m in (info.get("mismatched_keys") or [])
    )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if model_type in REMOTE_SKIPPED_TOWERS:
        unexpected = [k for k in unexpected if not k.startswith(SKIPPED_TOWER_PREFIXES)]
    problems = [
        (missing, "missing from the checkpoint"),
        (mismatched, "of another shape in the checkpoint"),
        (unexpected, "in the checkpoint but not in the model"),
    ]
    for keys, what in problems:
        if keys:
            raise ModelLoadError(
                f"{folder}: the weights do not match the model code: {len(keys)} tensors "
                f"{what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}); "
                "download the weights and code of the same checkpoint revision"
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
    ``trust_remote_code`` is set; its remote code is loaded unmodified under the
    compatibility fixes of :mod:`mvtrain.model.remote_compat`, and every non-persistent buffer
    is rebuilt from a fresh build of the model and verified. Every failure is a one-line
    :class:`ModelLoadError` naming the folder, what is wrong and the fix.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    family = detect_family(folder)
    torch_dtype = _torch_dtype(dtype)
    if not family.remote_code:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        if not trust_remote_code:
            raise _needs_trust(folder)
        model, tokenizer = _load_remote(folder, torch_dtype)
    _warn_low_precision_buffers(model, folder)
    model.train()
    return model, tokenizer, family
