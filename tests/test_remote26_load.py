"""The unmodified MiniCPM-V 2.6 remote code (``../shared/reference/minicpmv-2.6``) loads and
trains under our transformers: compatibility fixes undone after the load and skipped when the
problem is absent, every non-persistent buffer equal to a fresh build, one-line load errors,
plan counts equal to the model's own, and CLI runs of 3 steps on 1 rank (torch) and 2 steps on
2 ranks (DeepSpeed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from remote26_fixtures import REFERENCE_26, build_remote_model
from remote26_fixtures import require_reference as _require
from run_helpers import _env, _losses

from mvtrain.model.loading import ModelLoadError, load_model
from mvtrain.model.remote_compat import nonpersistent_buffers, remote_code_compat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model26(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require()
    return build_remote_model(tmp_path_factory.mktemp("m") / "minicpmv26")


@pytest.fixture(scope="module")
def loaded26(model26: Path) -> tuple[Any, Any, Any]:
    return load_model(model26, trust_remote_code=True)


def test_every_nonpersistent_buffer_equals_a_fresh_build(loaded26: tuple[Any, Any, Any]) -> None:
    model = loaded26[0]
    with torch.no_grad():
        fresh = type(model)(model.config)  # a full CPU build, parameters and all
    want = nonpersistent_buffers(fresh)
    got = nonpersistent_buffers(model)
    assert "resampler.pos_embed" in got and set(got) == set(want)
    for name, buf in got.items():
        assert buf.dtype == want[name].dtype and torch.equal(buf, want[name]), name


def test_compat_is_undone_after_the_load(loaded26: tuple[Any, Any, Any]) -> None:
    import torch.nn.functional as F

    model = loaded26[0]
    assert not hasattr(F, "List")
    assert "transformers.modeling_attn_mask_utils" not in sys.modules
    assert not isinstance(sys.modules.get("torchvision"), type(sys)) or _torchvision_ok()
    assert not hasattr(type(model).__init__, "__wrapped__")


def _torchvision_ok() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def test_fixes_are_skipped_when_the_problem_is_absent(tmp_path: Path) -> None:
    _require()
    folder = tmp_path / "fixed"
    shutil.copytree(REFERENCE_26, folder)
    res = folder / "resampler.py"
    res.write_text("from typing import List\n" + res.read_text())
    mod = folder / "modeling_minicpmv.py"
    mod.write_text(mod.read_text().replace("import torchvision\n", ""))
    with remote_code_compat(folder) as compat:
        applied = list(compat.applied)
    assert not any("List" in a or "torchvision" in a for a in applied), applied
    assert any("_prepare_4d_attention_mask" in a for a in applied)
    with remote_code_compat(REFERENCE_26) as compat:
        assert any("List" in a for a in compat.applied)


def test_packages_imported_under_try_are_not_stubbed(tmp_path: Path) -> None:
    """MiniCPM-o 2.6 imports its TTS packages inside try/except: its own fallback, no stub
    (a stub would raise RuntimeError, which ``except ImportError`` does not catch)."""
    if _imports("vocos"):
        pytest.skip("vocos is installed here")
    (tmp_path / "guarded.py").write_text(
        "try:\n    from vocos import Vocos\nexcept ImportError:\n    Vocos = None\n"
    )
    with remote_code_compat(tmp_path, "minicpmo") as compat:
        assert not any("vocos" in a for a in compat.applied), compat.applied
    (tmp_path / "plain.py").write_text("import vocos\n")
    with remote_code_compat(tmp_path, "minicpmo") as compat:
        assert any("stub vocos" in a for a in compat.applied), compat.applied
    assert "vocos" not in sys.modules


def _imports(package: str) -> bool:
    try:
        __import__(package)
    except Exception:
        return False
    return True


def _one_line_error(folder: Path, **kwargs: Any) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(folder, **kwargs)
    text = str(err.value)
    assert "\n" not in text and str(folder) in text
    return text


def test_load_errors_are_one_line(model26: Path, tmp_path: Path) -> None:
    assert "--trust-remote-code" in _one_line_error(model26)
    missing = tmp_path / "missing"
    shutil.copytree(model26, missing)
    (missing / "resampler.py").unlink()
    assert "resampler" in _one_line_error(missing, trust_remote_code=True)
    no_map = tmp_path / "nomap"
    shutil.copytree(model26, no_map)
    cfg = json.loads((no_map / "modeling_minicpmv.py").with_name("config.json").read_text())
    (no_map / "modeling_minicpmv.py").unlink()
    assert "modeling_minicpmv.py is missing" in _one_line_error(no_map, trust_remote_code=True)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "llava", "auto_map": {}}))
    assert "model_type 'llava'" in _one_line_error(unknown, trust_remote_code=True)
    wrong = tmp_path / "wrong"
    shutil.copytree(model26, wrong)
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    assert "weights do not match" in _one_line_error(wrong, trust_remote_code=True)


def test_plan_counts_equal_the_models_own(model26: Path, loaded26: tuple[Any, Any, Any]) -> None:
    from mvtrain.memory.params import count_parameters, load_config_only

    own = count_parameters(loaded26[0]).to_dict()
    planned = count_parameters(load_config_only(model26)).to_dict()
    assert planned.pop("estimate") and not own.pop("estimate")
    assert planned == own
    assert own["buffer_bytes"] >= 70 * 70 * 128 * 4


def test_cli_trains_on_1_and_2_ranks(model26: Path, tmp_path: Path) -> None:
    """3 steps on 1 rank (torch engine) and 2 steps on 2 ranks (DeepSpeed); every rank checks
    its non-persistent buffers against a fresh build while loading."""
    from pipeline_data import make_pipeline_dataset

    from mvprep.build import build
    from mvprep.options import BuildOptions

    data = make_pipeline_dataset(tmp_path / "data", count=8)
    shards = tmp_path / "shards"
    options = BuildOptions(
        data_path=data,
        out_dir=shards,
        profile="minicpmv-2.6",
        tokenizer=str(model26),  # the model folder's own remote-code tokenizer
        max_res=448,
        samples_per_shard=2,
    )
    assert build(options, workers=1, progress=False).ok
    base = [sys.executable, "-m", "mvtrain.cli", "run", "--shards", str(shards)]
    base += ["--model", str(model26), "--trust-remote-code", "--lr", "1e-3"]
    base += ["--token-budget", "1024", "--patch-budget", "4096", "--no-progress"]
    runs = {"torch1": (3, ["--engine", "torch"])}
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    else:
        runs["ds2"] = (2, ["--engine", "deepspeed", "--nproc-per-node", "2"])
    for name, (steps, extra) in runs.items():
        cmd = [*base, "--output", str(tmp_path / name), "--max-steps", str(steps), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
        assert proc.returncode == 0, f"{name}: " + proc.stdout[-3000:] + proc.stderr[-4000:]
        losses = _losses(tmp_path / name)
        assert sorted(losses) == list(range(1, steps + 1)), (name, losses)
        assert all(v == v for v in losses.values()), (name, losses)
