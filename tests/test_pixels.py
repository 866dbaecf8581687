"""The trainer's pixels on real built shards: the model's input made from the loader's uint8
(sub)images (normalised and patchified by :func:`mvtrain.model.pixel_input.model_inputs`, as
the step does on its device) equals the transformers image processor's, bit for bit; errors
name the sample and member."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import train_fixtures
from PIL import Image
from train_fixtures import MAX_SLICE_NUMS, Loaded

from mvshards.families import NATIVE_46, REMOTE_26
from mvtrain.data.pixels import PixelError, sample_pixels
from mvtrain.model.adapters import adapter_for
from mvtrain.model.pixel_input import norm_table

# The shared module-scoped fixtures (``loaded`` needs the other four), bound here so that
# this module gets its own instances.
_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded


# --- pixels -----------------------------------------------------------------------------


def test_normalisation_is_bit_exact_for_every_byte() -> None:
    from transformers import MiniCPMV4_6ImageProcessorPil

    proc = MiniCPMV4_6ImageProcessorPil()
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, axis=0)  # CHW
    ref46 = proc.normalize(proc.rescale(values, 1 / 255), proc.image_mean, proc.image_std)
    ours46 = norm_table(NATIVE_46.pixels)[torch.from_numpy(values).long()].numpy()
    assert ref46.dtype == ours46.dtype == np.float32 and np.array_equal(ref46, ours46)
    # The official 2.6 fine-tuning transform: ToTensor (x / 255) then Normalize(0.5, 0.5).
    t = torch.from_numpy(values).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(t, norm_table(REMOTE_26.pixels)[torch.from_numpy(values).long()])
    assert ours46.min() == -1.0 and ours46.max() == 1.0


@pytest.mark.slow
def test_pixels_equal_the_image_processor(loaded: dict[str, Loaded]) -> None:
    """Sources: the processor on the stored source, whose size is already its best size, so
    its resize is PIL's same-size copy. Slices: the processor with ``do_resize=False`` on the
    stored refine image slices it itself whenever it picks the same grid."""
    from transformers import MiniCPMV4_6ImageProcessorPil

    proc = MiniCPMV4_6ImageProcessorPil()
    adapter = adapter_for("minicpmv-4.6")
    sources = slices = 0
    for meta, members, sample in loaded["minicpmv-4.6"]:
        if not sample.tgt_sizes:
            continue
        assert all(p.dtype == torch.uint8 for p in sample.pixel_values)
        packed = adapter.collate([sample])["pixel_values"][0].numpy()  # [3, 14, sum L_i*14]
        cuts = np.cumsum([0] + [r * c * 14 for r, c in sample.tgt_sizes])
        views = [packed[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        k = 0
        for entry in meta.images:
            n = len(entry.layout.tgt_sizes)
            ours = views[k : k + n]
            for p, (r, c) in zip(ours, entry.layout.tgt_sizes, strict=True):
                assert p.shape == (3, 14, r * c * 14) and p.dtype == np.float32
                assert p.min() >= -1.0 and p.max() <= 1.0
            if entry.layout.grid is None:
                src = Image.open(io.BytesIO(members[entry.source_member.split(".", 1)[1]]))
                out = proc(images=[src], max_slice_nums=MAX_SLICE_NUMS)
                assert np.array_equal(np.asarray(out["pixel_values"])[0], ours[0])
                sources += 1
            else:
                ref = Image.open(io.BytesIO(members[entry.refine_member.split(".", 1)[1]]))
                out = proc(images=[ref], do_resize=False, max_slice_nums=MAX_SLICE_NUMS)
                cols, rows = entry.layout.grid
                if list(out["grids"][0]) == [rows, cols]:
                    theirs = np.asarray(out["pixel_values"])[0]
                    cut = np.cumsum([0] + [r * c * 14 for r, c in out["target_sizes"]])
                    for j in range(1, n):
                        assert np.array_equal(theirs[:, :, cut[j] : cut[j + 1]], ours[j])
                    slices += 1
            k += n
    assert sources >= 2 and slices >= 4


@pytest.mark.slow
def test_pixel_errors_name_the_sample_and_member(loaded: dict[str, Loaded]) -> None:
    meta, members, _ = next(r for r in loaded["minicpmv-4.6"] if r[0].images)
    entry = meta.images[0]
    ext = entry.source_member.split(".", 1)[1]
    wrong = io.BytesIO()
    Image.new("RGB", (56, 56)).save(wrong, format="JPEG")
    bad = dict(members, **{ext: wrong.getvalue()})
    with pytest.raises(
        PixelError, match=rf"sample {meta.key}: member {entry.source_member} is 56x56"
    ):
        sample_pixels(meta, bad)
    missing = {k: v for k, v in members.items() if k != ext}
    with pytest.raises(PixelError, match=rf"{entry.source_member} is missing"):
        sample_pixels(meta, missing)
