"""Per-family batches: what each model's ``forward`` takes, and what a batch costs padded.

Two forms of a batch: :meth:`~_FamilyAdapter.host_batch` is what the loader hands the step --
every input below, except that ``pixel_values`` is a uint8
:class:`~mvtrain.model.pixel_input.PixelPack` (None: a 4.6 batch without images);
:func:`~mvtrain.model.pixel_input.model_inputs` turns it into the model's inputs on the
training device, and :meth:`~_FamilyAdapter.collate` gives those on the CPU (for checks and
tools). The model's inputs:

* :class:`Native46Adapter` -- transformers' ``MiniCPMV4_6ForConditionalGeneration`` (and 4.7):
  ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` right-padded, and all (sub)images of
  the batch NaViT-packed into one ``pixel_values`` ``[1, 3, 14, sum(L_i * 14)]`` with
  ``target_sizes`` ``int32 [N, 2]`` (no pixel padding at all). Labels are unshifted; the
  loss shifts.
* :class:`Remote26Adapter` -- the 2.6 family's remote code (``MiniCPMV.forward(data=...)``),
  in the layout of the official ``finetune/dataset.py`` ``data_collator``: per-sample lists
  of ``[3, 14, L*14]`` patch tensors, ``tgt_sizes`` and ``image_bound`` (``[]`` for a
  sample without images), ``position_ids``, a bool ``attention_mask``, and labels
  *pre-shifted* (``labels[i]`` is the target of the logits at ``i``). The model pads every
  (sub)image to the longest one in the batch.

Costs (:meth:`~_FamilyAdapter.padded_cost`), from metadata alone (no pixels): the family's
cost model (:class:`mvshards.cost.CostModel`) over each sample's
:class:`~mvshards.cost.SampleCost`. :data:`ADAPTERS` maps each family to its adapter class.

Vision every step, through the real image path: a text-only 4.6 micro-batch sends a dummy
image through the model's own image path (:meth:`Native46Adapter.with_dummy_image`), so every
rank's backward graph -- the order ZeRO-2 fills its reduce buckets in -- has the same shape.
The 2.6 remote code does the same by itself in training mode.

Loss: :func:`token_loss_sum` returns the *sum* of token losses and the label count (a tensor on
the loss's device: reading it would be a host sync; the step counts labels on the host with
:meth:`label_count` before the batch moves); the step divides by the global label count of
the accumulation window over all ranks. The result (:class:`TokenLoss`, what
``forward_loss`` returns) also carries each row's loss sum and label count, detached, which
the step groups by the samples' sources (per-source loss).

Chunked loss (on by default; ``chunked_loss=False``, ``--no-chunked-loss``, turns it off):
``forward_loss`` runs the model with its output head passed through and computes the loss
from the last hidden states at the label positions, a chunk of rows at a time, recomputed in
backward (:mod:`mvtrain.model.chunked_loss`): the fp32 ``[tokens, vocab]`` log-probabilities
and their gradient never exist. Off, the plain :func:`token_loss_sum` runs, bit for bit as
before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mvshards.cost import SampleCost
from mvshards.families import NATIVE_46, REMOTE_26, Family, get_family
from mvshards.profiles import PROFILES, Profile, get_profile
from mvshards.schema import SampleMeta
from mvtrain.data.pixels import PATCH_SIZE
from mvtrain.data.sample import LoadedSample
from mvtrain.data.tokenize import IGNORE_INDEX
from mvtrain.model.chunked_loss import (
    check_hidden,
    chunked_token_losses,
    head_returns_hidden,
    output_head,
)
from mvtrain.model.pixel_input import PixelPack, model_inputs

DUMMY_GRID = 4
"""Side, in patches, of the dummy image a text-only 4.6 micro-batch runs (4x4 = 16 patches:
the smallest grid the 2x2 window merger and then the 2x2 MLP merger accept)."""


def sample_cost(x: SampleCost | LoadedSample | SampleMeta | Sequence[Any]) -> SampleCost:
    """The :class:`~mvshards.cost.SampleCost` of a loaded sample (its exact token count and
    decoded patch grids), a sample's metadata, or an index row (no (sub)image sizes)."""
    if isinstance(x, SampleCost):
        return x
    if isinstance(x, LoadedSample):
        return SampleCost.from_grids(x.meta.key, len(x.tokenized), x.tgt_sizes)
    if isinstance(x, SampleMeta):
        return SampleCost.from_meta(x)
    if isinstance(x, Sequence) and len(x) == 4 and isinstance(x[0], str):
        return SampleCost.from_index_row(x)
    raise TypeError(f"cannot take a cost from {type(x).__name__}")


class TokenLoss(tuple):  # type: ignore[type-arg]
    """``(loss sum, label count)`` -- unpacks to those two, as before -- plus per batch row
    (sample) :attr:`row_loss` (its token losses summed, detached float32 ``[B]``) and
    :attr:`row_count` (its label tokens, int64 ``[B]``), both on the loss's device."""

    row_loss: torch.Tensor
    row_count: torch.Tensor

    def __new__(
        cls,
        loss: torch.Tensor,
        count: torch.Tensor,
        row_loss: torch.Tensor,
        row_count: torch.Tensor,
    ) -> TokenLoss:
        self = super().__new__(cls, (loss, count))
        self.row_loss, self.row_count = row_loss, row_count
        return self

    @property
    def loss(self) -> torch.Tensor:
        return self[0]

    @property
    def count(self) -> torch.Tensor:
        return self[1]


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, pre_shifted: bool = False
) -> TokenLoss:
    """``(sum of token cross-entropies, number of label tokens)``, float32 and int64 tensors,
    with the per-row sums and counts (:class:`TokenLoss`).

    ``pre_shifted=False`` (native): ``labels`` align with ``input_ids`` and logits at ``i``
    predict label ``i+1``. ``pre_shifted=True`` (2.6 family): ``labels[i]`` is already the
    target of the logits at ``i``. ``-100`` marks no loss.

    ``log_softmax`` then ``nll_loss(reduction="sum")`` is what ``cross_entropy`` runs, so the
    loss and its gradients are bit for bit those of ``cross_entropy``; the per-row sums
    gather the same log-probabilities (detached: one ``[B, L]`` gather, no second softmax).
    """
    if not pre_shifted:
        logits = logits[:, :-1, :]
        labels = labels[:, 1:]
    labels = labels.to(logits.device).long()
    log_probs = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    flat = labels.reshape(-1)
    loss = F.nll_loss(log_probs, flat, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = labels != IGNORE_INDEX
    with torch.no_grad():
        picked = log_probs.detach().gather(1, flat.clamp(min=0).unsqueeze(1)).view_as(labels)
        row_loss = -picked.masked_fill(~keep, 0.0).sum(dim=1)
    return TokenLoss(loss, keep.sum(), row_loss, keep.sum(dim=1))


def chunked_loss_sum(
    model: Any,
    run: Callable[[], Any],
    labels: torch.Tensor,
    pre_shifted: bool,
    label_count: int | None = None,
    chunk_rows: int | None = None,
) -> TokenLoss:
    """:func:`token_loss_sum` by the chunked loss: ``run()`` forwards the model (the engine,
    ``model``) while its output head passes its input through; the loss is computed from
    those hidden states at the label positions (:mod:`mvtrain.model.chunked_loss`).
    ``label_count``: the batch's label tokens when the caller knows them on the host (no
    device sync)."""
    head = output_head(_unwrap(model))
    with head_returns_hidden(head):
        out = run()
    check_hidden(out.logits, head)
    losses, row_ids, keep = chunked_token_losses(
        out.logits, head.weight, labels, pre_shifted, label_count, chunk_rows
    )
    with torch.no_grad():
        row_loss = torch.zeros(keep.shape[0], dtype=torch.float32, device=losses.device)
        row_loss.index_add_(0, row_ids, losses.detach())
    return TokenLoss(losses.sum(), keep.sum(), row_loss, keep.sum(dim=1))


def _unwrap(model: Any) -> Any:
    """The underlying model of a DeepSpeed engine / DDP wrapper (PEFT forwards by itself)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class _FamilyAdapter:
    """What every adapter shares: its family and the family's padded cost."""

    family: ClassVar[Family]
    chunked_loss: bool = True
    """Compute the loss chunked from the hidden states (False: the plain logits loss)."""
    loss_chunk_rows: int | None = None
    """Label rows per loss chunk (None: 256 MiB of fp32 logits; tests set a few)."""

    @classmethod
    def padded_cost(cls, items: Sequence[Any]) -> tuple[int, int]:
        """``(padded tokens, padded patches)`` of a batch of ``items`` (anything
        :func:`sample_cost` takes) by the family's cost model; ValueError when an item lacks
        the per-(sub)image sizes the model reads."""
        costs = [sample_cost(x) for x in items]
        for cost in costs:
            cls.family.cost.check(cost)
        return cls.family.cost.padded(costs)

    def host_batch(self, samples: Sequence[LoadedSample]) -> dict[str, Any]:
        """The collated micro-batch as the loader hands it: pixels as a uint8 pack."""
        raise NotImplementedError

    def collate(self, samples: Sequence[LoadedSample]) -> dict[str, Any]:
        """The model's inputs (plus ``labels``) on the CPU: :meth:`host_batch` through
        :func:`~mvtrain.model.pixel_input.model_inputs`, as the step makes them on its
        device."""
        return model_inputs(self.host_batch(samples), "cpu")

    def _pixels(self, samples: Sequence[LoadedSample]) -> PixelPack:
        return PixelPack.pack([s.pixel_values for s in samples], self.family)


class Native46Adapter(_FamilyAdapter):
    """Batches for the native MiniCPM-V 4.6 / 4.7 classes."""

    family = NATIVE_46
    pre_shifted_labels = False

    def __init__(
        self, pad_token_id: int, downsample_mode: str | None = None, chunked_loss: bool = True
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.downsample_mode = downsample_mode
        """``"4x"`` for the 4x profile; None keeps the model config's (``"16x"``)."""
        self.chunked_loss = chunked_loss

    @classmethod
    def for_profile(
        cls, pad_token_id: int, profile: Profile | None, chunked_loss: bool = True
    ) -> Native46Adapter:
        """The adapter of ``profile`` (None: the model config's downsampling)."""
        four_x = profile is not None and profile.patch_tokens_divisor == 4
        return cls(pad_token_id, "4x" if four_x else None, chunked_loss)

    def host_batch(self, samples: Sequence[LoadedSample]) -> dict[str, Any]:
        """Model inputs plus ``labels``, the pixels packed uint8; ``pixel_values`` and
        ``target_sizes`` None without images."""
        if not samples:
            raise ValueError("cannot collate an empty micro-batch")
        ids = [s.tokenized.input_ids for s in samples]
        input_ids = _pad_rows(ids, self.pad_token_id)
        attention_mask = _pad_rows([[1] * len(r) for r in ids], 0)
        labels = _pad_rows([s.tokenized.labels for s in samples], IGNORE_INDEX)
        grids = [g for s in samples for g in s.tgt_sizes]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": self._pixels(samples) if grids else None,
            "target_sizes": torch.tensor(grids, dtype=torch.int32) if grids else None,
        }

    @staticmethod
    def label_count(batch: Mapping[str, Any]) -> int:
        """Label tokens the loss of ``batch`` counts (labels from position 1 on)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def dummy_vision_inputs(
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest valid image: one 56x56 view, patch grid 4x4.

        The vision tower needs grids divisible by the 2x2 window merger, then by the 2x2 MLP
        merger ("16x"), so 4x4 is the minimum (1 LLM token; 4 in "4x").
        """
        side = DUMMY_GRID
        pixel_values = torch.zeros((1, 3, PATCH_SIZE, side * side * PATCH_SIZE), dtype=dtype)
        target_sizes = torch.tensor([[side, side]], dtype=torch.int32)
        return pixel_values.to(device), target_sizes.to(device)

    def vision_forward(
        self, model: Any, pixel_values: torch.Tensor, target_sizes: torch.Tensor
    ) -> torch.Tensor:
        """Vision tower + mergers only; the image features ``[tokens, hidden]`` concatenated."""
        out = _unwrap(model).get_image_features(
            pixel_values, target_sizes, downsample_mode=self.downsample_mode
        )
        return torch.cat(list(out.pooler_output), dim=0)

    def dummy_image_tokens(self, model: Any) -> int:
        """LLM tokens of the dummy 4x4 image: 1 in "16x" mode, 4 in "4x"."""
        mode = self.downsample_mode or _unwrap(model).config.downsample_mode
        return DUMMY_GRID * DUMMY_GRID // (4 if mode == "4x" else 16)

    def with_dummy_image(self, model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` (text only) with the dummy image on the real image path.

        Appends ``k`` columns (the dummy image's LLM tokens): the image token in row 0, the
        pad token in other rows, attention mask 0 and label ``-100`` everywhere. A masked
        key is never attended to and an ignored label has zero gradient, so the loss and
        every gradient are those of the text alone, while the graph runs vision tower ->
        mergers -> placeholder scatter -> LLM exactly as for a real image. Works on tensors
        already on the device (no host sync).

        Why the real path: ZeRO-2 fills its reduce buckets in the order gradients become
        ready in backward. A dummy run beside the LLM (its features added to the loss times
        0) makes the vision gradients ready first on a text-only rank and last on an image
        rank, so the ranks would sum different parameters slot by slot: silently wrong
        gradients on NCCL, a size-mismatch abort on gloo.
        """
        config = _unwrap(model).config
        ids = batch["input_ids"]
        rows, k = ids.shape[0], self.dummy_image_tokens(model)
        extra = torch.full((rows, k), self.pad_token_id, dtype=ids.dtype, device=ids.device)
        extra[0] = int(config.image_token_id)
        mask = batch["attention_mask"]
        labels = batch["labels"]
        pixel_values, target_sizes = self.dummy_vision_inputs(ids.device)
        return {
            **batch,
            "input_ids": torch.cat([ids, extra], dim=1),
            "attention_mask": torch.cat([mask, mask.new_zeros((rows, k))], dim=1),
            "labels": torch.cat([labels, torch.full_like(labels[:, :k], IGNORE_INDEX)], dim=1),
            "pixel_values": pixel_values,
            "target_sizes": target_sizes,
        }

    def forward_loss(
        self, model: Any, batch: Mapping[str, Any], label_count: int | None = None
    ) -> TokenLoss:
        """Forward ``batch`` (already on the model's device); ``(loss sum, label count)`` with
        the per-row sums (:class:`TokenLoss`). ``label_count``: :meth:`label_count` of the
        batch when the caller has it on the host (the chunked loss then selects the label
        positions without a device sync).

        A batch without images runs the dummy image through the real image path
        (:meth:`with_dummy_image`).
        """
        if batch.get("pixel_values") is None:
            batch = self.with_dummy_image(model, batch)
        inputs: dict[str, Any] = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"],
            "target_sizes": batch["target_sizes"],
            "use_cache": False,
        }
        if self.downsample_mode is not None:
            inputs["downsample_mode"] = self.downsample_mode
        if self.chunked_loss:
            return chunked_loss_sum(
                model,
                lambda: model(**inputs),
                batch["labels"],
                False,
                label_count,
                self.loss_chunk_rows,
            )
        out = model(**inputs)
        return token_loss_sum(out.logits, batch["labels"])


class Remote26Adapter(_FamilyAdapter):
    """Batches for the 2.6 family (MiniCPM-V 2.6, MiniCPM-o 2.6, 4.0, 4.5; remote code)."""

    family = REMOTE_26
    pre_shifted_labels = True

    def __init__(self, pad_token_id: int, chunked_loss: bool = True) -> None:
        self.pad_token_id = int(pad_token_id)
        self.chunked_loss = chunked_loss

    @classmethod
    def for_profile(
        cls, pad_token_id: int, profile: Profile | None, chunked_loss: bool = True
    ) -> Remote26Adapter:
        """The adapter of ``profile`` (every 2.6-family profile batches alike)."""
        return cls(pad_token_id, chunked_loss)

    def host_batch(self, samples: Sequence[LoadedSample]) -> dict[str, Any]:
        """The official ``data_collator`` layout, labels shifted left by one, the pixels packed
        uint8 (their model form: per sample a list, ``[]`` without images)."""
        if not samples:
            raise ValueError("cannot collate an empty micro-batch")
        ids = [s.tokenized.input_ids for s in samples]
        shifted = [s.tokenized.labels[1:] + [IGNORE_INDEX] for s in samples]
        tgt_sizes: list[Any] = []
        image_bound: list[Any] = []
        for s in samples:
            if s.tgt_sizes:
                tgt_sizes.append(torch.tensor(s.tgt_sizes, dtype=torch.int32))
                image_bound.append(torch.tensor(s.tokenized.image_spans, dtype=torch.long))
            else:
                tgt_sizes.append([])
                image_bound.append([])
        return {
            "input_ids": _pad_rows(ids, self.pad_token_id),
            "position_ids": _pad_rows([list(range(len(r))) for r in ids], 0),
            "attention_mask": _pad_rows([[1] * len(r) for r in ids], 0).bool(),
            "labels": _pad_rows(shifted, IGNORE_INDEX),
            "pixel_values": self._pixels(samples),
            "tgt_sizes": tgt_sizes,
            "image_bound": image_bound,
        }

    @staticmethod
    def label_count(batch: Mapping[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward_loss(
        self, model: Any, batch: Mapping[str, Any], label_count: int | None = None
    ) -> TokenLoss:
        """``model(data=batch)`` as the official trainer calls it; loss on pre-shifted labels
        (:class:`TokenLoss`; ``label_count`` as for :meth:`Native46Adapter.forward_loss`).

        The remote code runs its own zero-weighted dummy image for a batch without images.
        The chunked loss runs the same call with the LLM's ``lm_head`` passed through: the
        hidden states come from ``get_vllm_embedding`` and the LLM body, the loss uses the
        ``lm_head`` weight.
        """
        data = {k: v for k, v in batch.items() if k != "labels"}
        if self.chunked_loss:
            return chunked_loss_sum(
                model,
                lambda: model(data=data, use_cache=False),
                batch["labels"],
                True,
                label_count,
                self.loss_chunk_rows,
            )
        out = model(data=data, use_cache=False)
        return token_loss_sum(out.logits, batch["labels"], pre_shifted=True)


Adapter = Native46Adapter | Remote26Adapter

ADAPTERS: dict[Family, type[Native46Adapter] | type[Remote26Adapter]] = {
    NATIVE_46: Native46Adapter,
    REMOTE_26: Remote26Adapter,
}
"""The adapter class of each family."""


def adapter_for(
    family_or_profile: Family | Profile | str,
    tokenizer: Any | None = None,
    chunked_loss: bool = True,
) -> Adapter:
    """The adapter of a family, a profile, or the name of either (``minicpmv-4.6-4x``,
    ``2.6``); ``chunked_loss=False`` computes the plain logits loss.

    The pad id comes from ``tokenizer`` (pad, else eos, else 0).
    """
    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    profile: Profile | None = None
    if isinstance(family_or_profile, Family):
        family = family_or_profile
    elif isinstance(family_or_profile, Profile):
        profile, family = family_or_profile, family_or_profile.family
    elif family_or_profile in PROFILES:
        profile = get_profile(family_or_profile)
        family = profile.family
    else:
        try:
            family = get_family(family_or_profile)
        except ValueError:
            raise ValueError(
                f"unknown model family or profile {family_or_profile!r}; expected a family "
                f"name or one of {sorted(PROFILES)}"
            ) from None
    return ADAPTERS[family].for_profile(pad, profile, chunked_loss)
