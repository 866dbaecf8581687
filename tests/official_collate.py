"""The official MiniCPM-V fine-tuning batch path, copied for comparison tests.

Provenance: ``finetune/dataset.py`` of https://github.com/OpenBMB/MiniCPM-V at commit
0dbb566de090067266abb76e702fb289f09934c5 (Apache-2.0): ``preprocess``,
``conversation_to_ids`` (the ``llm_type == "qwen"`` branch), ``get_grid_placeholder``,
``reshape_by_patch``, ``data_collator`` and the item dict of ``SupervisedDataset.__getitem__``
(:func:`dataset_item`), unchanged except:

* ``preprocess`` takes the slicing function as ``slice_image`` (the tests pass
  ``MiniCPMVImageProcessor.slice_image`` of the reference ``image_processing_minicpmv.py``,
  the same algorithm as ``dataset.py``'s own ``slice_image``: grid from
  ``get_sliced_grid``, ``find_best_resize``/``get_refine_size``, PIL bicubic resizes of the
  original image, ``split_to_patches``);
* ``conversation_to_ids`` calls ``conversation_to_ids_qwen2`` (same upstream function,
  without the unused ``raw_msg``) and ``build_target`` (its own "build target" loop,
  verbatim) of ``official_labels.py``, and ``raw_msg`` is left out of
  its result; the ``logger`` calls are dropped (the exceptions stay; the truncation warning
  is a comment);
* the ``numpy``/``torch`` imports are local; the ``Dict`` annotation check is ``dict``;
  annotations added, unused loop variables renamed ``_i``/``_j`` and the code reformatted
  (``ruff format``), no logic changed (checked by comparing the ASTs).

The official ``build_transform()`` (torchvision ``ToTensor`` + ``Normalize`` with the
Inception mean/std 0.5) is :func:`official_transform`, reimplemented without torchvision
(which does not import against the CPU-only torch here) with exactly its float ops.
Used only by tests.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from official_labels import build_target, conversation_to_ids_qwen2
from torch.nn.utils.rnn import pad_sequence


def official_transform(image: Any) -> torch.Tensor:
    """``build_transform()`` of ``finetune/finetune.py``, without torchvision.

    ToTensor: uint8 HWC -> float CHW / 255 (``img.permute(2, 0, 1).contiguous()
    .to(float32).div(255)``); Normalize(mean 0.5, std 0.5): ``(x - 0.5) / 0.5``
    (``tensor.sub_(mean).div_(std)`` in float32).
    """
    arr = np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def dataset_item(ret: dict[str, Any]) -> dict[str, Any]:
    """``SupervisedDataset.__getitem__``'s dict from ``preprocess``'s result."""
    return dict(
        input_ids=ret["input_ids"],
        position_ids=ret["position_ids"],
        labels=ret["target"],
        attention_mask=torch.ones_like(ret["input_ids"], dtype=torch.bool),
        pixel_values=ret["pixel_values"],
        tgt_sizes=ret["tgt_sizes"],
        image_bound=ret["image_bound"],
    )


def data_collator(
    examples: list[dict[str, Any]], padding_value: int = 0, max_length: int = 2048
) -> dict[str, Any]:
    def trim_and_pad(seq: Any, batch_first: bool, padding_value: Any) -> torch.Tensor:
        return pad_sequence(
            [s[:max_length] for s in seq], batch_first=True, padding_value=padding_value
        )

    input_ids = trim_and_pad(
        [example["input_ids"] for example in examples],
        batch_first=True,
        padding_value=padding_value,
    )
    position_ids = trim_and_pad(
        [example["position_ids"] for example in examples],
        batch_first=True,
        padding_value=padding_value,
    )
    targets = trim_and_pad(
        [example["labels"] for example in examples],
        batch_first=True,
        padding_value=-100,
    )
    attention_mask = trim_and_pad(
        [example["attention_mask"] for example in examples],
        batch_first=True,
        padding_value=padding_value,
    )
    pixel_values = [example["pixel_values"] for example in examples]
    image_bound = [example["image_bound"] for example in examples]
    tgt_sizes = [example["tgt_sizes"] for example in examples]
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": targets,
        "attention_mask": attention_mask,
        "image_bound": image_bound,
        "tgt_sizes": tgt_sizes,
        "pixel_values": pixel_values,
    }


def conversation_to_ids(
    conversation: Any,
    tokenizer: Any,
    llm_type: Any = None,
    new_schema: bool = False,
    max_length: int = 2048,
) -> dict[str, Any]:
    assert llm_type == "qwen", "only the qwen branch is copied"
    input_ids, context = conversation_to_ids_qwen2(conversation, tokenizer)

    ids = torch.from_numpy(np.hstack(input_ids, dtype=np.int32))
    context = torch.from_numpy(np.hstack(context, dtype=np.int8))
    if input_ids.shape[-1] > max_length:
        ids = ids[:max_length]
        context = context[:max_length]
        # upstream: logger.warning(... "has been truncated")

    if torch.all(context):
        raise Exception("No tokens available to compute loss.")

    # build target
    target = build_target(ids, context, tokenizer)

    # build image bound
    if new_schema:
        start_cond = (ids == tokenizer.im_start_id) | (ids == tokenizer.slice_start_id)
        end_cond = (ids == tokenizer.im_end_id) | (ids == tokenizer.slice_end_id)
        image_start_tokens = torch.where(start_cond)[0]
        image_start_tokens += 1
        image_end_tokens = torch.where(end_cond)[0]
    else:
        image_start_tokens = torch.where(ids == tokenizer.im_start_id)[0]
        image_start_tokens += 1
        image_end_tokens = torch.where(ids == tokenizer.im_end_id)[0]
    if len(image_start_tokens) != len(image_end_tokens):
        raise Exception("image start token != image end tokens")

    if len(image_start_tokens) > 0:
        image_bound = torch.hstack(
            [image_start_tokens.unsqueeze(-1), image_end_tokens.unsqueeze(-1)]
        )
    else:
        image_bound = []

    position_ids = torch.arange(ids.size(0)).long()
    return {
        "input_ids": ids,
        "target": target,
        "image_bound": image_bound,
        "position_ids": position_ids,
    }


def preprocess(
    images_dict: dict[str, Any],
    conversations: Any,
    tokenizer: Any,
    transform: Callable[[Any], torch.Tensor],
    query_nums: int = 64,
    slice_config: dict[str, Any] | None = None,
    llm_type: Any = None,
    patch_size: int = 14,
    batch_vision: bool = False,
    max_length: int = 2048,
    *,
    slice_image: Callable[..., Any],
) -> dict[str, Any]:
    """
    single(multi) image(s) preprocess, the image(s) will be placed at the top of the conversation
    """
    conversations = copy.deepcopy(conversations)
    assert len(conversations) > 1, "conversations length must large than 2"
    assert conversations[0]["role"] == "user", "the first role must be user"

    if slice_config is not None:
        assert isinstance(slice_config, dict)
        assert "patch_size" in slice_config
        assert "max_slice_nums" in slice_config
        assert "scale_resolution" in slice_config
    default_image_placeholder = (
        tokenizer.im_start + tokenizer.unk_token * query_nums + tokenizer.im_end
    )
    new_schema = False
    use_image_id = False
    if llm_type == "qwen":
        new_schema = True
        use_image_id = True
    image_placeholder_dict = {}
    images = []
    image_id_cnt = 0
    for img_name, image in images_dict.items():
        if slice_config:
            source_image, patches, best_grid = slice_image(
                image,
                slice_config["max_slice_nums"],
                slice_config["scale_resolution"],
                slice_config["patch_size"],
            )
            images.append(source_image)
            image_placeholder = default_image_placeholder
            if len(patches) > 0:
                for i in range(len(patches)):
                    for j in range(len(patches[0])):
                        images.append(patches[i][j])
                if use_image_id:
                    image_placeholder = (
                        f"{tokenizer.im_id_start}{image_id_cnt}{tokenizer.im_id_end}"
                        + image_placeholder
                    )
                    image_id_cnt += 1
                image_placeholder += get_grid_placeholder(
                    tokenizer, best_grid, query_nums, new_schema=new_schema
                )
            image_placeholder_dict[img_name] = image_placeholder
        else:
            images.append(image)
            if use_image_id:
                image_placeholder = (
                    f"{tokenizer.im_id_start}{image_id_cnt}{tokenizer.im_id_end}"
                    + image_placeholder
                )  # unused here (no slice_config)
                image_id_cnt += 1
            else:
                image_placeholder = default_image_placeholder
            image_placeholder_dict[img_name] = image_placeholder

    images = [transform(i) for i in images]

    if len(images_dict) == 1 and "<image>" in images_dict:
        if "<image>" in conversations[0]["content"]:
            conversations[0]["content"] = conversations[0]["content"].replace(
                "<image>", image_placeholder
            )
        else:
            conversations[0]["content"] = image_placeholder + "\n" + conversations[0]["content"]
        input_dict = conversation_to_ids(conversations, tokenizer, llm_type, new_schema, max_length)
    else:
        pattern = r"<image_\d+>"
        new_conversations = []
        for conversation in conversations:
            content = conversation["content"]
            parts = re.split(f"({pattern})", content)
            for i, part in enumerate(parts):
                if not part.strip():
                    continue
                if re.match(pattern, part):
                    if part in image_placeholder_dict:
                        parts[i] = image_placeholder_dict[part]
                    else:
                        raise Exception(f"not found {part} in image dict")
            conversation["content"] = "\n".join(parts)
            new_conversations.append(conversation)
        conversations = new_conversations

        input_dict = conversation_to_ids(conversations, tokenizer, llm_type, new_schema, max_length)

    if batch_vision:
        tgt_sizes = []
        reshape_images = []
        for image in images:
            H, W = image.shape[1:]
            reshape_image = reshape_by_patch(image, patch_size)
            reshape_images.append(reshape_image)
            tgt_sizes.append([H // patch_size, W // patch_size])
        if tgt_sizes:
            tgt_sizes = torch.Tensor(tgt_sizes).type(torch.int32)

        input_dict["pixel_values"] = reshape_images
        input_dict["tgt_sizes"] = tgt_sizes

    else:
        input_dict["pixel_values"] = images
        input_dict["tgt_sizes"] = []

    return input_dict


def get_grid_placeholder(
    tokenizer: Any, grid: Any, query_num: int, new_schema: bool = False
) -> str:
    if new_schema:
        image_placeholder = (
            tokenizer.slice_start + tokenizer.unk_token * query_num + tokenizer.slice_end
        )
    else:
        image_placeholder = tokenizer.im_start + tokenizer.unk_token * query_num + tokenizer.im_end

    cols = grid[0]
    rows = grid[1]
    slices = []
    for _i in range(rows):
        lines = []
        for _j in range(cols):
            lines.append(image_placeholder)
        slices.append("".join(lines))
    if new_schema:
        slice_placeholder = "\n".join(slices)
    else:
        slice_placeholder = tokenizer.slice_start + "\n".join(slices) + tokenizer.slice_end
    return slice_placeholder


def reshape_by_patch(image_tensor: torch.Tensor, patch_size: int) -> torch.Tensor:
    """
    :param image_tensor: shape [3, H, W]
    :param patch_size:
    :return: [3, patch_size, HW/patch_size]
    """
    patches = torch.nn.functional.unfold(
        image_tensor, (patch_size, patch_size), stride=(patch_size, patch_size)
    )

    patches = patches.reshape(image_tensor.size(0), patch_size, patch_size, -1)
    patches = patches.permute(0, 1, 3, 2).reshape(image_tensor.size(0), patch_size, -1)
    return patches
