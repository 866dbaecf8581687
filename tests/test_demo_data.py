"""The generated demo set: deterministic, well-formed records, and images that really open."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
KEY = re.compile(r"<image_\d\d>")
CJK = re.compile(r"[\u4e00-\u9fff]")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mdd = _load_script()

pytestmark = pytest.mark.slow  # generates the 48-record demo set (images) per worker; a CLI run


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default set (seed 0, 48 good records, bad records on), generated once."""
    out = tmp_path_factory.mktemp("demo")
    path = mdd.make_demo_dataset(out, seed=0, count=48, with_bad=True)
    assert path == out / "demo.json"
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _image_paths(record: dict) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image.values())


def _records(root: Path) -> tuple[list[dict], list[dict], dict]:
    data = json.loads((root / "demo.json").read_text(encoding="utf-8"))
    llava_lines = (root / "demo_llava.jsonl").read_text(encoding="utf-8").splitlines()
    expected = json.loads((root / "expected.json").read_text(encoding="utf-8"))
    return data, [json.loads(line) for line in llava_lines], expected


def test_same_seed_gives_byte_identical_files(demo: Path, tmp_path: Path) -> None:
    mdd.make_demo_dataset(tmp_path / "again", seed=0, count=48, with_bad=True)
    first, second = _tree(demo), _tree(tmp_path / "again")
    assert sorted(first) == sorted(second)
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"files differ between two runs with seed 0: {differ}"


def test_cli_in_a_fresh_process_matches(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--seed", "0", "--count", "48", "--with-bad"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out / "demo.json")
    assert _tree(out) == _tree(demo)


def test_counts_and_record_shapes(demo: Path) -> None:
    data, llava, expected = _records(demo)
    assert isinstance(data, list)
    ids = [r["id"] for r in data]
    assert len(ids) == len(set(ids)), "record ids must be unique"
    good = [r for r in data if not r["id"].startswith("bad-")]
    bad = [r for r in data if r["id"].startswith("bad-")]
    assert len(good) == 48
    assert len(bad) == len(mdd.BAD_RECORDS) >= 7
    assert expected["good_ids"] == [r["id"] for r in good]
    assert sorted(expected["bad"]) == sorted(r["id"] for r in bad)
    assert data[0]["id"] != bad[0]["id"] and data[-1]["id"] != bad[-1]["id"], "bad records spread"

    kinds = {"single": 0, "multi": 0, "text": 0, "multi_turn": 0}
    for r in good:
        assert set(r) <= {"id", "image", "conversations"}, r
        conv = r["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(set(t) == {"role", "content"} and t["content"] for t in conv)
        text = "\n".join(t["content"] for t in conv)
        image = r.get("image")
        if image is None:
            assert "<image" not in text
            kinds["text"] += 1
        elif isinstance(image, str):
            assert text.count("<image>") <= 1 and "<image>" not in conv[1]["content"]
            kinds["multi_turn" if len(conv) > 2 else "single"] += 1
        else:
            assert all(KEY.fullmatch(k) for k in image) and len(image) >= 2
            assert sorted(KEY.findall(conv[0]["content"])) == sorted(image), r
            kinds["multi"] += 1
    assert all(n >= 2 for n in kinds.values()), kinds
    assert any(CJK.search(json.dumps(r, ensure_ascii=False)) for r in good), "Chinese records"
    assert any(not CJK.search(json.dumps(r, ensure_ascii=False)) for r in good)

    assert [r["id"] for r in llava] == expected["llava_ids"] and len(llava) >= 4
    for r in llava:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert all(set(t) == {"from", "value"} for t in conv)
        assert ("image" in r) == ("<image>" in conv[0]["value"])


def test_cookbook_records_build_whole_in_the_shapes_the_recipes_write(
    demo: Path, tmp_path: Path
) -> None:
    from mvprep.build import build
    from mvprep.options import BuildOptions
    from mvshards.index import load_index

    expected = json.loads((demo / "expected.json").read_text(encoding="utf-8"))
    lines = (demo / expected["cookbook"]).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == expected["cookbook_ids"]
    assert all(set(r) <= {"id", "messages", "images", "channel"} for r in records)
    contents = [t["content"] for r in records for t in r["messages"]]
    assert any(isinstance(c, list) for c in contents), "content parts"
    assert any(isinstance(c, str) and "<image>" in c for c in contents), "string tags"
    assert any(t["role"] == "system" for r in records for t in r["messages"])
    assert any(len(r.get("images", [])) == 2 for r in records)
    out = tmp_path / "cookbook"
    options = BuildOptions(data_path=demo / expected["cookbook"], out_dir=out, max_res=448)
    result = build(options, workers=1, progress=False)
    assert result.ok
    index = load_index(out)
    assert len(index.keys) == len(records), "every Cookbook-style record becomes a sample"
    assert list(index.num_images) == [len(r.get("images", [])) for r in records]


def test_good_images_open_and_cover_formats(demo: Path) -> None:
    data, llava, expected = _records(demo)
    referenced = {
        p for r in data + llava if not r["id"].startswith("bad-") for p in _image_paths(r)
    }
    assert referenced <= set(expected["images"])
    formats, modes, orientations, sizes = set(), set(), set(), set()
    for rel, info in expected["images"].items():
        path = demo / rel
        assert path.resolve().is_relative_to(demo.resolve())
        with Image.open(path) as im:
            im.load()  # first frame for the GIF
            upright = ImageOps.exif_transpose(im)
            assert list(upright.size) == info["size"], rel
            formats.add(im.format)
            modes.add(im.mode)
            orientations.add(im.getexif().get(0x0112, 1))
            sizes.add(upright.size)
            if im.mode == "P" and im.format == "PNG":
                assert "transparency" in im.info, rel
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"} <= formats
    assert {"RGB", "RGBA", "CMYK", "P", "L", "LA", "1", "I;16"} <= modes
    assert {1, 3, 6} <= orientations
    assert (300, 3000) in sizes and (20, 20) in sizes
    assert any(w * h >= 12_000_000 for w, h in sizes), "a phone-size photo"
    assert (3024, 4032) in sizes, "the EXIF-6 portrait is upright 3024x4032"


def test_exif_orientation_is_meaningful(demo: Path) -> None:
    """The EXIF-3 JPEG, once transposed, shows the same picture as the upright rocket."""
    with Image.open(demo / "images/rocket.jpg") as im:
        reference = np.asarray(im.convert("RGB").resize((800, 534), Image.Resampling.BICUBIC))
    with Image.open(demo / "images/rocket_exif3.jpg") as im:
        raw = np.asarray(im.convert("RGB"), dtype=float)
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=float)
    assert np.abs(upright - reference).mean() < 8
    assert np.abs(raw - reference).mean() > 30


def test_bad_files_are_really_bad(demo: Path) -> None:
    data, _, expected = _records(demo)
    images = demo / "images"
    assert (images / "bad_empty.jpg").stat().st_size == 0
    with pytest.raises(UnidentifiedImageError):
        Image.open(images / "bad_text.jpg")
    with pytest.raises(OSError), Image.open(images / "bad_truncated.jpg") as im:
        im.load()
    with pytest.raises(Image.DecompressionBombError), Image.open(images / "bad_bomb.png"):
        pass
    assert (images / "bad_bomb.png").stat().st_size < 200_000
    by_id = {r["id"]: r for r in data}
    assert not (images / "does_not_exist.jpg").exists()
    assert by_id["bad-path-escape"]["image"].startswith("../")
    assert "conversations" not in by_id["bad-no-conversations"]
    roles = {t["role"] for t in by_id["bad-unknown-role"]["conversations"]}
    assert roles - {"user", "assistant"}
    assert "image" not in by_id["bad-placeholder-no-image"]
    readme = (demo / "README.txt").read_text(encoding="utf-8")
    for rid, why in expected["bad"].items():
        assert rid in readme and why in readme


def test_options(tmp_path: Path) -> None:
    a = mdd.make_demo_dataset(tmp_path / "a", seed=0, count=5, with_bad=False)
    b = mdd.make_demo_dataset(tmp_path / "b", seed=1, count=5, with_bad=False)
    data_a = json.loads(a.read_text(encoding="utf-8"))
    assert len(data_a) == 5 and not any(r["id"].startswith("bad-") for r in data_a)
    assert not list((tmp_path / "a" / "images").glob("bad_*"))
    assert a.read_bytes() != b.read_bytes(), "the seed must matter"
    for r in data_a:
        for rel in _image_paths(r):
            with Image.open(tmp_path / "a" / rel) as im:
                im.load()
    with pytest.raises(ValueError, match="count"):
        mdd.make_demo_dataset(tmp_path / "c", count=0)
