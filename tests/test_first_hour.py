"""First-hour frictions: sizes need a unit, WebP honours --quality, unpadded inspect keys,
--workers defaults to the usable CPUs, and the DeepSpeed config is checked and written."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from imagegen import real_photo
from PIL import Image

from mvprep.cli import available_cpus, build_command
from mvprep.cli import main as mvprep_main
from mvprep.image_modes import encode_image
from mvshards.units import GiB, parse_bytes

# --- sizes -------------------------------------------------------------------------------


def test_a_size_typed_without_a_unit_is_refused_but_an_int_from_code_is_bytes() -> None:
    with pytest.raises(ValueError, match=r"^80 has no unit: write 80GiB, 80GB or 81920MiB"):
        parse_bytes("80")
    with pytest.raises(ValueError, match="has no unit"):
        parse_bytes(" 24 ")
    assert parse_bytes(80) == 80
    assert parse_bytes("85899345920B") == parse_bytes("80GiB") == 80 * GiB


# --- WebP --------------------------------------------------------------------------------


def _is_lossless_webp(data: bytes) -> bool:
    return data[12:16] == b"VP8L"  # the first chunk: VP8L lossless, VP8 lossy


def test_webp_is_lossy_at_the_quality_asked_for_and_deterministic() -> None:
    photo = np.ascontiguousarray(real_photo("astronaut"))
    q80 = encode_image(photo, "webp", 80)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "WEBP", lossless=True, method=0, quality=50, exact=True)
    assert not _is_lossless_webp(q80) and _is_lossless_webp(buf.getvalue())
    assert len(q80) < len(buf.getvalue()) / 2
    assert len(encode_image(photo, "webp", 50)) < len(q80)
    assert q80 == encode_image(photo.copy(), "webp", 80)
    with pytest.raises(ValueError, match="quality"):
        encode_image(photo, "webp", 0)


def _write_photo_dataset(root: Path) -> Path:
    """``root/data.json``: three records of scikit-image's astronaut photo."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(real_photo("astronaut")).save(root / "astronaut.png")
    turns = [
        {"role": "user", "content": "<image>\nWho is this?"},
        {"role": "assistant", "content": "An astronaut."},
    ]
    records = [{"id": f"r{i}", "image": "astronaut.png", "conversations": turns} for i in range(3)]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


@pytest.fixture(scope="module")
def webp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("webp")
    data = _write_photo_dataset(root / "data")
    out = root / "out"
    args = [str(data), "--out", str(out), "--format", "webp", "--quality", "80"]
    result = CliRunner().invoke(build_command, [*args, "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_build_webp_stores_lossy_images_and_records_the_quality(webp_build: Path) -> None:
    import tarfile

    params = json.loads((webp_build / "build.json").read_text())
    assert params["image_format"] == "webp" and params["quality"] == 80
    with tarfile.open(next(webp_build.rglob("*.tar"))) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".webp")]
        assert images
        for member in images:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            assert data[:4] == b"RIFF" and not _is_lossless_webp(data)


def test_png_records_no_quality() -> None:
    from mvprep.options import BuildOptions

    assert BuildOptions(Path("d.json"), Path("o"), image_format="png").params()["quality"] is None
    assert BuildOptions(Path("d.json"), Path("o"), quality=80).params()["quality"] == 80


# --- inspect -----------------------------------------------------------------------------


def test_inspect_accepts_an_unpadded_key(webp_build: Path, tmp_path: Path) -> None:
    png = tmp_path / "i.png"
    for key in ("1", "000000001"):
        result = CliRunner().invoke(
            mvprep_main, ["inspect", str(webp_build), key, "--png", str(png)]
        )
        assert result.exit_code == 0, result.output
        assert result.output.startswith("sample 000000001 (id 'r1')")
    result = CliRunner().invoke(mvprep_main, ["inspect", str(webp_build), "x7"])
    assert result.exit_code == 1 and "is not a sample key" in result.output


def test_inspect_png_without_an_extension_writes_a_png(webp_build: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        mvprep_main, ["inspect", str(webp_build), "1", "--png", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").format == "PNG"
    assert result.output.rstrip().endswith(f"--- wrote {tmp_path / 'out.png'}")


# --- --epochs and --max-steps ------------------------------------------------------------


@pytest.mark.parametrize(
    ("epochs", "max_steps", "expected"),
    [(None, None, [2]), (3, None, [2, 2, 2]), (None, 5, [2, 2, 1]), (1, 5, [2]), (3, 3, [2, 1])],
)
def test_max_steps_caps_epochs_and_alone_trains_that_many_steps(
    tmp_path: Path, epochs: int | None, max_steps: int | None, expected: list[int]
) -> None:
    from mvshards.families import NATIVE_46
    from mvtrain.batching.epochs import plan_epochs
    from mvtrain.batching.plan_index import PlanIndex
    from mvtrain.distributed import DistInfo
    from mvtrain.run_config import RunConfig

    keys = [f"{i:09d}" for i in range(4)]
    index = PlanIndex.from_arrays(keys, [0] * 4, [300] * 4, [0] * 4, num_shards=1)
    config = RunConfig(
        shards=tmp_path, model="tiny", output=tmp_path / "out", token_budget=600,
        patch_budget=4096, epochs=epochs, max_steps=max_steps,
    )  # fmt: skip
    world = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    assert plan_epochs(config, index, world, NATIVE_46.cost).steps == expected


# --- workers -----------------------------------------------------------------------------


def test_workers_default_to_the_cpus_this_process_may_use() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cpus() == expected
    workers = next(p for p in build_command.params if p.name == "workers")
    assert workers.default is available_cpus
    help_text = " ".join(CliRunner().invoke(build_command, ["--help"]).output.split())
    assert f"the CPUs this process may use: {expected} here" in help_text


# --- DeepSpeed ---------------------------------------------------------------------------


def test_zero_3_is_refused_alike_from_zero_and_from_the_user_json() -> None:
    from mvtrain.deepspeed_config import deepspeed_config
    from mvtrain.run_config import RunConfig

    tail = r"must be 0, 1 or 2 \(ZeRO-3 is not supported\), got 3$"
    with pytest.raises(ValueError, match="^--zero " + tail):
        RunConfig(shards=Path("s"), model="m", output=Path("o"), zero_stage=3).validate()
    user = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="^--deepspeed-config zero_optimization.stage " + tail):
        deepspeed_config(1, 2, user_config=user)
    with pytest.raises(ValueError, match="^--zero " + tail):
        deepspeed_config(1, 3)
    assert (
        deepspeed_config(1, 2, user_config={"zero_optimization": {"stage": 1}})[
            "zero_optimization"
        ]["stage"]
        == 1
    )


def test_the_deepspeed_engine_writes_the_config_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    import torch

    from mvtrain.distributed import DistInfo
    from mvtrain.engine import make_engine

    given: list[dict[str, Any]] = []

    def fake_initialize(*, model: Any, config: dict[str, Any], **_: Any) -> tuple:
        given.append(json.loads(json.dumps(config)))
        return SimpleNamespace(module=model), None, None, None

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    path = tmp_path / "run" / "deepspeed_config.json"
    make_engine(
        torch.nn.Linear(2, 2),
        info,
        use_deepspeed=True,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=1,
        grad_accum=4,
        user_config={"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5},
        config_path=path,
    )
    written = json.loads(path.read_text())
    assert given == [written]
    assert written["zero_optimization"]["stage"] == 1 and written["gradient_clipping"] == 0.5
