"""Model families: everything that differs between the two MiniCPM-V code bases, in one object.

* :data:`NATIVE_46` -- MiniCPM-V 4.6 / 4.7, native ``MiniCPMV4_6*`` classes in transformers:
  NaViT-packed patches (no pixel padding), a 2x2 window merger then an MLP merger.
* :data:`REMOTE_26` -- MiniCPM-V 2.6, MiniCPM-o 2.6, 4.0, 4.5, whose modelling code ships with
  the checkpoint (``trust_remote_code``): every (sub)image padded to the batch's largest, a
  64-query resampler.

A :class:`Family` carries its cost rule, its pixel normalisation, how its image span takes
its strings from a tokenizer, and the facts the trainer and the memory planner branch on, as
attributes: code outside this module asks the family, never compares its name. The name
(``"4.6"``/``"2.6"``) is what JSON and CLI output print. A family is a singleton: compare with
``is``; pickling gives back the same object. The trainer's adapters are keyed by family in
``mvtrain.model.adapters.ADAPTERS`` (this contract knows no stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mvshards.cost import CostModel


@dataclass(frozen=True)
class PixelNorm:
    """How uint8 pixels become the model's float32 input, bit for bit.

    ``rescale_in_float64``: True: ``uint8 * (1/255)`` in float64, then cast to float32 (the
    transformers image processors' ``rescale``); False: ``uint8 / 255`` in float32 (torchvision
    ``ToTensor``). Then ``(x - mean) / std`` in float32.
    """

    rescale_in_float64: bool
    mean: float = 0.5
    std: float = 0.5


@dataclass(frozen=True, eq=False)
class Family:
    """One MiniCPM-V code base (see the module doc); compare with ``is``."""

    name: str
    """``"4.6"`` or ``"2.6"``: what JSON and CLI output print."""
    cost: CostModel
    """How the model pads a micro-batch."""
    pixels: PixelNorm
    remote_code: bool
    """The modelling code ships with the checkpoint (``trust_remote_code``, ``AutoModel``);
    False: native transformers classes, which the memory planner's accounting follows."""
    navit_packing: bool
    """The vision tower takes all (sub)images NaViT-packed (one sequence per (sub)image, window
    and MLP mergers); False: SigLIP over padded slices and a resampler."""
    placeholder_mask: bool
    """Image features are scattered into the LLM input through a boolean mask of the image
    placeholder tokens; False: at the ``image_bound`` spans."""
    adapter_dummy_image: bool
    """The trainer's adapter runs a dummy image through the vision tower for a micro-batch
    without images; False: the model's own code does (the 2.6 remote code in training mode)."""
    named_span_tokens: bool
    """The image span's strings come from the tokenizer's named tokens (``image_token``,
    ``image_start_token``...); False: ``unk_token`` as the query and literal brackets."""
    label_rule: str = "mvkit"
    """The default label rule (``mvtrain.data.tokenize.LABEL_RULES``): ``"official"`` (the
    2.6 family: labels identical to the official ``finetune/dataset.py``) or ``"mvkit"``."""
    non_thinking_prefix: str = ""
    """What the family's fine-tuning recipes put in front of an answer that carries no reasoning
    (a hybrid thinking model's empty ``<think>`` block), applied by ``mvprep build
    --think-block auto`` (:mod:`mvshards.think_block`), never labelled by the trainer; empty:
    the family's recipes add nothing and ``--think-block`` has no effect."""

    def __str__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return get_family, (self.name,)


NATIVE_46 = Family(
    name="4.6",
    cost=CostModel("4.6", pads_subimages=False),
    pixels=PixelNorm(rescale_in_float64=True),
    remote_code=False,
    navit_packing=True,
    placeholder_mask=True,
    adapter_dummy_image=True,
    named_span_tokens=True,
    # ms-swift's ``minicpmv4_6`` template (``non_thinking_prefix``) and the Cookbook's 4.6
    # recipes; sources in mvshards.think_block.
    non_thinking_prefix="<think>\n\n</think>\n\n",
)
REMOTE_26 = Family(
    name="2.6",
    cost=CostModel("2.6", pads_subimages=True),
    pixels=PixelNorm(rescale_in_float64=False),
    remote_code=True,
    navit_packing=False,
    placeholder_mask=False,
    adapter_dummy_image=False,
    named_span_tokens=False,
    label_rule="official",
)
FAMILIES: dict[str, Family] = {f.name: f for f in (NATIVE_46, REMOTE_26)}


def get_family(name: str) -> Family:
    """The family called ``name`` or ``ValueError`` listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None
