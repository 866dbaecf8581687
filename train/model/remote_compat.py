"""Load the 2.6 family's remote code, unmodified, under transformers 5 and torch 2.13.

The ``trust_remote_code`` files of MiniCPM-V 2.6, MiniCPM-o 2.6, 4.0 and 4.5 were written for
transformers 4.x and an older torch. :func:`remote_code_compat` is a context manager, entered
only while :mod:`mvtrain.model.loading` loads such a model, that applies the fixes below and
undoes every one of them on exit (nothing it changes outlives the load; the user's files are
never edited). Each fix is guarded by a check that its problem is present, so a fixed upstream
file, or a transformers that still has the name, is left alone.

1. **Names transformers 5 removed** (:data:`REMOVED_NAMES`): ``from transformers.X import N``
   where ``transformers.X`` or ``N`` no longer exists gets ``N`` from a small substitute
   installed for the load: ``transformers.modeling_attn_mask_utils._prepare_4d_attention_mask``
   (the 2.6 SigLIP; the module is gone), ``transformers.LogitsWarper`` (MiniCPM-o 2.6; now
   :class:`~transformers.LogitsProcessor`) and Whisper's ``WHISPER_ATTENTION_CLASSES``
   (MiniCPM-o 2.6's audio tower, frozen and never run). A removed name with no substitute is a
   one-line :class:`~mvtrain.model.loading.ModelLoadError`.
2. **Packages that are imported but not needed** (:data:`OPTIONAL_PACKAGES`): an
   ``import torchvision`` the code never uses (2.6's ``modeling_minicpmv.py``), or MiniCPM-o
   2.6's audio/TTS packages (``soundfile``, ``torchaudio``...) when only the vision+text part is
   built. When such a package is missing or broken (the PyPI torchvision wheel does not import
   against CPU-only torch), a stub module stands in for the load, whose every attribute raises,
   and one warning says so. An installed, working package is used as is (``pip install
   'mvkit[torchvision]'``). A package the code really uses is never stubbed, and one it
   imports inside ``try``/``except`` (MiniCPM-o 2.6's ``vocos``) is left to that ``except``.
3. **Typing names from a star import**: ``from torch.nn.functional import *`` no longer exports
   ``List`` (and other ``typing`` names) in torch 2.13; the 2.6 ``resampler.py`` relied on it.
   Those the file uses without defining are added to ``torch.nn.functional`` for the load.
4. **``post_init()`` never called**: transformers 5 needs it (``all_tied_weights_keys``);
   ``MiniCPMV.__init__`` does not call it. The model class's ``__init__`` is wrapped for the
   load: when an instance comes out without ``all_tied_weights_keys``, ``post_init()`` runs.
5. **Non-persistent buffers** (not a patch: :func:`rebuild_nonpersistent_buffers`, run after
   loading): transformers 5 re-creates them with ``torch.empty_like`` after loading, so the
   resampler's ``pos_embed`` (and 4.5's ``temporal_pos_embed``) hold leftover memory. Every
   non-persistent buffer of the loaded model is compared with the same model built fresh from
   its config (parameters on the meta device, buffers real), the wrong ones are replaced, and
   all are verified.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("mvtrain")

STAR_TYPING_NAMES = ("List", "Dict", "Tuple", "Optional", "Union", "Callable", "Any", "Sequence")
"""``typing`` names older torch re-exported from ``torch.nn.functional`` (fix 3)."""

OPTIONAL_PACKAGES: dict[str, str] = {
    "torchvision": "",
    "soundfile": "minicpmo",
    "torchaudio": "minicpmo",
    "librosa": "minicpmo",
    "vector_quantize_pytorch": "minicpmo",
    "vocos": "minicpmo",
}
"""Packages that may be stubbed when missing or broken (fix 2) -> the ``model_type`` for which
they may be stubbed although the code references them (the audio/TTS packages of MiniCPM-o
2.6, built without its audio and TTS towers); ``""``: only when the code never uses the name
beyond importing it."""


class RemoteCodeError(Exception):
    """The remote code needs something no compatibility fix provides (one line)."""


def _prepare_4d_attention_mask(mask: Any, dtype: Any, tgt_len: int | None = None) -> Any:
    """``[bsz, src_len]`` padding mask (1 = attend) -> ``[bsz, 1, tgt_len, src_len]`` additive
    mask (0 or the dtype's minimum), as transformers 4.x's function of this name."""
    import torch

    bsz, src_len = mask.size()
    tgt_len = tgt_len if tgt_len is not None else src_len
    expanded = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


def _logits_warper() -> Any:
    from transformers import LogitsProcessor

    return LogitsProcessor


def _whisper_attention_classes() -> Any:
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    # transformers 5's WhisperAttention dispatches on config._attn_implementation itself
    return dict.fromkeys(("eager", "sdpa", "flash_attention_2"), WhisperAttention)


REMOVED_NAMES: dict[tuple[str, str], Callable[[], Any]] = {
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_attention_mask"): lambda: (
        _prepare_4d_attention_mask
    ),
    ("transformers", "LogitsWarper"): _logits_warper,
    (
        "transformers.models.whisper.modeling_whisper",
        "WHISPER_ATTENTION_CLASSES",
    ): _whisper_attention_classes,
}
"""(module, name) transformers 5 removed -> a factory of its substitute (fix 1)."""


@dataclass
class RemoteSources:
    """The parsed Python files of a model folder."""

    trees: dict[str, ast.Module] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> RemoteSources:
        trees = {}
        for path in sorted(folder.glob("*.py")):
            try:
                trees[path.name] = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError) as exc:
                raise RemoteCodeError(f"{path} cannot be parsed ({exc})") from None
        return cls(trees)

    def from_imports(self) -> Iterator[tuple[str, str, str]]:
        """``(file, module, name)`` of every absolute ``from module import name``."""
        for file, tree in self.trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    for alias in node.names:
                        yield file, node.module, alias.name

    def imported_packages(self) -> dict[str, list[str]]:
        """Top-level package -> files importing it outside a ``try`` block (an import the
        code guards with ``try``/``except`` is its own business: MiniCPM-o 2.6 imports its
        TTS packages ``vector_quantize_pytorch`` and ``vocos`` that way)."""
        found: dict[str, list[str]] = {}
        for file, tree in self.trees.items():
            guarded = {
                id(n)
                for t in ast.walk(tree)
                if isinstance(t, ast.Try) and t.handlers
                for stmt in t.body
                for n in ast.walk(stmt)
            }
            for node in ast.walk(tree):
                if id(node) in guarded:
                    continue
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(file)
        return found

    def uses_name(self, name: str) -> bool:
        """Whether any file reads the global ``name`` (beyond importing it)."""
        return any(
            isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
            for tree in self.trees.values()
            for n in ast.walk(tree)
        )

    def undefined_star_names(self, star_module: str, candidates: tuple[str, ...]) -> set[str]:
        """Names of ``candidates`` a file that star-imports ``star_module`` reads but neither
        defines nor imports."""
        missing: set[str] = set()
        for tree in self.trees.values():
            star = any(
                isinstance(n, ast.ImportFrom)
                and n.module == star_module
                and any(a.name == "*" for a in n.names)
                for n in ast.walk(tree)
            )
            if not star:
                continue
            defined: set[str] = set()
            used: set[str] = set()
            for n in ast.walk(tree):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    defined.update((a.asname or a.name).split(".")[0] for a in n.names)
                elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(n.name)
                elif isinstance(n, ast.Name):
                    (used if isinstance(n.ctx, ast.Load) else defined).add(n.id)
            missing |= {c for c in candidates if c in used and c not in defined}
        return missing


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imports_cleanly(package: str) -> tuple[bool, str]:
    """Whether ``import package`` works; else the one-line reason."""
    if package in sys.modules and not isinstance(sys.modules[package], _StubModule):
        return True, ""
    try:
        importlib.import_module(package)
    except Exception as exc:  # a broken wheel raises RuntimeError, OSError...
        for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            sys.modules.pop(key, None)  # no half-imported package left behind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, first
    return True, ""


def _prime_availability_check(package: str) -> None:
    """Let transformers decide (and cache) whether ``package`` is available before a stub
    stands in for it, so that nothing in transformers takes the stub for the package."""
    import transformers  # noqa: F401  (its import runs availability checks)
    from transformers.utils import import_utils

    check = getattr(import_utils, f"is_{package}_available", None)
    if callable(check):
        check()


class _StubModule(types.ModuleType):
    """Stands in for a package the remote code imports but training never uses."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(
            f"{self.__name__}.{attr}: {self.__name__} is not installed (or does not import); "
            f"mvkit loaded this model without it because training does not use it"
        )


_warned_stubs: set[str] = set()


class _Patcher:
    """Temporary attribute and ``sys.modules`` changes, undone in reverse order."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = obj.__dict__.get(name, self._MISSING) if hasattr(obj, "__dict__") else self._MISSING
        setattr(obj, name, value)

        def undo() -> None:
            if old is self._MISSING:
                with suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def module(self, name: str, module: types.ModuleType) -> None:
        old = sys.modules.get(name)
        sys.modules[name] = module

        def undo() -> None:
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old

        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass
class CompatSession:
    """What :func:`remote_code_compat` applied; :meth:`model_class` resolves the model class
    with fix 4 in place."""

    folder: Path
    patcher: _Patcher
    applied: list[str] = field(default_factory=list)

    def model_class(self, auto_map_entry: str) -> type:
        """The remote class named by ``auto_map_entry`` (e.g. ``modeling_minicpmv.MiniCPMV``),
        its ``__init__`` wrapped to call ``post_init()`` when the original does not."""
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(auto_map_entry, str(self.folder))
        original = cls.__dict__.get("__init__")
        if original is None:
            return cls

        def __init__(model: Any, *args: Any, **kwargs: Any) -> None:
            original(model, *args, **kwargs)
            if type(model) is cls and "all_tied_weights_keys" not in model.__dict__:
                model.post_init()  # fix 4: the original __init__ never calls it

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        self.patcher.setattr(cls, "__init__", __init__)
        self.applied.append(f"post_init() after {cls.__name__}.__init__ when missing")
        return cls


def _fix_removed_names(sources: RemoteSources, patcher: _Patcher, applied: list[str]) -> None:
    for file, module_name, name in sources.from_imports():
        if not module_name.startswith("transformers"):
            continue
        module = sys.modules.get(module_name)
        if module is None and _has_module(module_name):
            module = importlib.import_module(module_name)
        if module is not None and hasattr(module, name):
            continue  # still there (or substituted already): nothing to fix
        factory = REMOVED_NAMES.get((module_name, name))
        if factory is None:
            import transformers

            raise RemoteCodeError(
                f"{file} imports {name} from {module_name}, which transformers "
                f"{transformers.__version__} no longer has and mvkit has no substitute for; "
                "use the model's latest remote code"
            )
        if module is None:
            module = types.ModuleType(module_name)
            module.__file__ = f"<mvkit substitute for {module_name}>"
            patcher.module(module_name, module)
        patcher.setattr(module, name, factory())
        applied.append(f"{module_name}.{name} (removed in transformers 5) for {file}")


def _fix_packages(
    sources: RemoteSources, model_type: str, patcher: _Patcher, applied: list[str]
) -> None:
    for package, files in sorted(sources.imported_packages().items()):
        if package not in OPTIONAL_PACKAGES:
            continue
        ok, why = _imports_cleanly(package)
        if ok:
            continue
        _prime_availability_check(package)
        allowed_for = OPTIONAL_PACKAGES[package]
        if sources.uses_name(package) and allowed_for != model_type:
            raise RemoteCodeError(
                f"the model code ({', '.join(sorted(set(files)))}) uses {package}, which does "
                f"not import here ({why}); install a {package} that matches your torch"
            )
        stub = _StubModule(package)
        stub.__file__ = f"<mvkit stub for {package}>"
        stub.__path__ = []  # a package: `import package.sub` finds the stub's children
        patcher.module(package, stub)
        applied.append(f"stub {package} ({why})")
        if package not in _warned_stubs:
            _warned_stubs.add(package)
            log.warning(
                "%s does not import (%s); loading the model without it: its code imports it "
                "but training does not use it",
                package,
                why,
            )


def _fix_star_typing(sources: RemoteSources, patcher: _Patcher, applied: list[str]) -> None:
    import torch.nn.functional as F

    missing = sources.undefined_star_names("torch.nn.functional", STAR_TYPING_NAMES)
    for name in sorted(missing):
        if hasattr(F, name) or hasattr(builtins, name):
            continue
        patcher.setattr(F, name, getattr(typing, name))
        applied.append(f"torch.nn.functional.{name} (typing.{name}) for a star import")


@contextmanager
def remote_code_compat(folder: Path | str, model_type: str = "") -> Iterator[CompatSession]:
    """Apply the fixes 1-3 to the remote code in ``folder`` (fix 4 through
    :meth:`CompatSession.model_class`); undo all of them on exit. Raises
    :class:`RemoteCodeError` when the code needs something no fix provides."""
    folder = Path(folder)
    sources = RemoteSources.read(folder)
    patcher = _Patcher()
    session = CompatSession(folder, patcher)
    with ExitStack() as stack:
        stack.callback(patcher.restore)
        _fix_packages(sources, model_type, patcher, session.applied)
        _fix_removed_names(sources, patcher, session.applied)
        _fix_star_typing(sources, patcher, session.applied)
        yield session
    for line in session.applied:
        log.debug("remote-code compatibility: %s", line)


# --- non-persistent buffers (fix 5) -------------------------------------------------------


def nonpersistent_buffers(model: Any) -> dict[str, Any]:
    """``name -> tensor`` of every non-persistent buffer of ``model`` (full dotted names)."""
    found = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None:
                found[f"{prefix}.{name}" if prefix else name] = buf
    return found


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (the
    buffers are what a fresh build is for); undone on exit."""
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def fresh_buffers(model_class: type, config: Any, dtype: Any = None) -> dict[str, Any]:
    """The non-persistent buffers of ``model_class(config)`` built fresh on the CPU (the
    parameters on the meta device), under the default dtype ``dtype`` as ``from_pretrained``
    builds the model."""
    import torch

    before = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with _parameters_on_meta():
            fresh = model_class(config)
    finally:
        torch.set_default_dtype(before)
    return nonpersistent_buffers(fresh)


@dataclass
class BufferReport:
    checked: int
    rebuilt: list[str]


def rebuild_nonpersistent_buffers(model: Any, fresh: dict[str, Any]) -> BufferReport:
    """Replace every non-persistent buffer of ``model`` that differs from ``fresh`` (same
    name) by the fresh value on the buffer's device, then verify all of them; raises
    :class:`RemoteCodeError` naming the first buffer that cannot be made equal."""
    import torch

    loaded = nonpersistent_buffers(model)
    rebuilt = []
    for name, buf in loaded.items():
        want = fresh.get(name)
        if want is None:
            continue  # created outside __init__ (e.g. a cache filled on first use)
        want = want.to(buf.device)
        if buf.shape == want.shape and buf.dtype == want.dtype and torch.equal(buf, want):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[attr] = want.clone()
        rebuilt.append(name)
    for name, buf in nonpersistent_buffers(model).items():
        want = fresh.get(name)
        if want is not None and not torch.equal(buf, want.to(buf.device)):
            raise RemoteCodeError(f"non-persistent buffer {name} differs from a fresh build")
    return BufferReport(checked=len(loaded), rebuilt=rebuilt)
