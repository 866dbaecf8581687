"""Build options: everything that decides the bytes of a shard, and nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mvprep.inputs import check_distinct
from mvprep.records import INPUT_FORMATS
from mvprep.tokens import token_counter_fingerprint
from mvshards.layout import max_slice_nums_for_res
from mvshards.lengths_cache import FINGERPRINT_PARAM
from mvshards.profiles import DEFAULT_PROFILE, ImageIdForm, get_profile
from mvshards.storage import Location, location
from mvshards.think_block import DEFAULT_THINK_BLOCK, check_think_block

IMAGE_FORMATS = ("jpeg", "png", "webp")


@dataclass(frozen=True)
class BuildOptions:
    """Options of one ``mvprep build``. Equal options on equal input give equal shards.

    ``workers`` and progress settings are deliberately absent: they change how fast a
    build runs, never what it writes.
    """

    data_path: Location | tuple[Location, ...]
    """The data file, or several (a tuple; one sequence of records, see :mod:`mvprep.inputs`).
    Paths or object-store URLs (:mod:`mvshards.storage`)."""
    out_dir: Location
    """The output folder, or an object-store URL (``s3://bucket/prefix``)."""
    profile: str = DEFAULT_PROFILE
    max_res: int | None = 1344
    max_slice_nums: int | None = None
    image_format: str = "jpeg"
    quality: int = 95
    tokenizer: str | None = None
    max_tokens: int | None = None
    max_pixels: int | None = None
    samples_per_shard: int = 1000
    allow_outside_root: bool = False
    image_id_form: ImageIdForm | None = None
    input_format: str = "auto"
    """``--input-format`` (:data:`mvprep.records.INPUT_FORMATS`); ``auto`` is left out of
    ``params()``, so builds that do not set it keep their ``build.json``."""
    channel: str | None = None
    """``--channel``: the channel of every record that names none (see
    :func:`mvprep.records.record_channel`); left out of ``params()`` when None."""
    think_block: str = DEFAULT_THINK_BLOCK
    """``--think-block`` (:mod:`mvshards.think_block`): ``auto`` writes the family's empty
    reasoning block before answers without one, as its recipes do; ``never`` adds nothing.
    In ``params()`` only for families with such a block (4.6): other builds keep their
    ``build.json``."""
    imaging_path: str | None = None
    """``--imaging-path`` (:data:`mvprep.imaging.IMAGING_PATHS`): which decoder makes the
    pixels; None picks :func:`mvprep.imaging.default_imaging_path` (simplejpeg when
    installed). Always in ``params()``: another path may give other bytes, so a resume,
    ``--part`` or merge with another path is refused."""

    def __post_init__(self) -> None:
        if isinstance(self.data_path, list | tuple):
            paths = tuple(location(p) for p in self.data_path)
            if not paths:
                raise ValueError("give at least one data file")
            check_distinct(paths)
            # one file is stored as a plain path: its build.json is what it always was
            object.__setattr__(self, "data_path", paths[0] if len(paths) == 1 else paths)
        else:
            object.__setattr__(self, "data_path", location(self.data_path))
        object.__setattr__(self, "out_dir", location(self.out_dir))
        get_profile(self.profile)
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_res is not None and self.max_slice_nums is not None:
            raise ValueError("give --max-res or --max-slice-nums, not both")
        self.resolved_max_slice_nums  # noqa: B018 - validates max_res
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"--input-format must be one of {INPUT_FORMATS}")
        if self.channel is not None and not self.channel.strip():
            raise ValueError("--channel must be a non-empty name")
        check_think_block(self.think_block)
        from mvprep.imaging import check_imaging_path, default_imaging_path  # imports cv2

        path = self.imaging_path or default_imaging_path()
        object.__setattr__(self, "imaging_path", check_imaging_path(path))

    @property
    def data_paths(self) -> tuple[Location, ...]:
        """The data files, in order (one or several)."""
        if isinstance(self.data_path, tuple):
            return self.data_path
        return (location(self.data_path),)

    @property
    def resolved_max_slice_nums(self) -> int:
        if self.max_slice_nums is not None:
            if self.max_slice_nums < 1:
                raise ValueError(f"--max-slice-nums must be >= 1, got {self.max_slice_nums}")
            return self.max_slice_nums
        return max_slice_nums_for_res(self.max_res if self.max_res is not None else 1344)

    @property
    def resolved_image_id_form(self) -> ImageIdForm:
        return self.image_id_form or get_profile(self.profile).default_image_id_form

    def params(self) -> dict[str, Any]:
        """The parameters recorded in ``build.json`` and the manifest (paths as strings)."""
        raw = asdict(self)
        files = [str(location(p).resolve()) for p in self.data_paths]
        raw["data_path"] = files[0] if len(files) == 1 else files
        raw.pop("out_dir")
        raw["max_slice_nums"] = self.resolved_max_slice_nums
        raw["image_id_form"] = self.resolved_image_id_form
        raw["tokenizer"] = str(Path(self.tokenizer).resolve()) if self.tokenizer else None
        if self.tokenizer:  # lets the trainer skip its recount with the same tokenizer
            raw[FINGERPRINT_PARAM] = token_counter_fingerprint(self.tokenizer)
        raw["quality"] = None if self.image_format == "png" else self.quality  # PNG: unused
        if raw["input_format"] == "auto":
            raw.pop("input_format")
        if raw["channel"] is None:
            raw.pop("channel")
        if not get_profile(self.profile).family.non_thinking_prefix:
            raw.pop("think_block")  # no effect on this family
        return raw
