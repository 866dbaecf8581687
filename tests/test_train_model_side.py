"""The trainer's model side on real built shards: tiny model, tokenize, pixels, adapters, loss."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.options import BuildOptions
from mvprep.tokens import HFTokenCounter, make_token_counter
from mvshards.conversation import expand_placeholders
from mvshards.layout import assign_image_ids, compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta
from mvshards.tario import iter_shard
from mvshards.tiny_tokenizer import build_tiny_tokenizer
from mvtrain.adapters import (
    CostItem,
    LoadedSample,
    Native46Adapter,
    Remote26Adapter,
    adapter_for,
    load_sample,
    token_loss_sum,
)
from mvtrain.models import ModelLoadError, detect_family, load_model
from mvtrain.pixels import PixelError, normalise, sample_pixels
from mvtrain.tiny import build_tiny_model, save_tiny, tiny_model_config
from mvtrain.tokenize import IGNORE_INDEX, tokenize_sample

PROFILES = ("minicpmv-4.6", "minicpmv-4.6-4x", "minicpmv-2.6")
MAX_SLICE_NUMS = 4  # --max-res 896

Loaded = list[tuple[SampleMeta, dict[str, bytes], LoadedSample]]


class _Loaded(dict):
    """Profile -> loaded samples of the pipeline set built for it, built on first use.

    Lazy, so a test-distribution worker builds only the profiles its tests need; a short
    repr, because hypothesis prints the fixture arguments of a failing example.
    """

    def __init__(self, dataset: Path, tok_dir: Path, tok: Any, root: Path) -> None:
        super().__init__()
        self.dataset, self.tok_dir, self.tok, self.root = dataset, tok_dir, tok, root

    def __missing__(self, profile: str) -> Loaded:
        out = self.root / profile
        options = BuildOptions(
            data_path=self.dataset,
            out_dir=out,
            profile=profile,
            tokenizer=str(self.tok_dir),
            max_res=896,
            samples_per_shard=6,
        )
        assert build(options, workers=1, progress=False).ok
        rows = []
        for shard in sorted(out.glob("*.tar")):
            for _, members in iter_shard(shard):
                meta = SampleMeta.from_json(json.loads(members["json"]))
                rows.append((meta, members, load_sample(meta, members, self.tok, profile)))
        self[profile] = rows
        return rows

    def __repr__(self) -> str:
        return f"<loaded samples of {sorted(self)}>"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: with more threads than free cores (``pytest -n 2`` on 2 cores)
    torch's thread barriers make these tiny ops ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny(tok_dir: Path) -> tuple[Any, Any]:
    return build_tiny_model(seed=0, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)


@pytest.fixture(scope="module")
def loaded(
    dataset: Path, tok_dir: Path, tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> _Loaded:
    """The pipeline set built per profile with exact counts from the tiny tokenizer."""
    return _Loaded(dataset, tok_dir, tiny[1], tmp_path_factory.mktemp("built"))


def _with_images(rows: Loaded) -> list[LoadedSample]:
    return [s for meta, _, s in rows if meta.images]


def _text_only(rows: Loaded) -> list[LoadedSample]:
    return [s for meta, _, s in rows if not meta.images]


# --- tiny model -------------------------------------------------------------------------


def test_tiny_model_is_deterministic_full_attention_and_leaves_rng_alone(tok_dir: Path) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, tok = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    c, _ = build_tiny_model(seed=1, tokenizer_dir=tok_dir)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    cfg = a.config
    assert type(a).__name__ == "MiniCPMV4_6ForConditionalGeneration"
    assert set(cfg.text_config.layer_types) == {"full_attention"}
    assert cfg.image_token_id == tok.convert_tokens_to_ids(tok.image_token) == tok.unk_token_id
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.vision_config.insert_layer_id < cfg.vision_config.num_hidden_layers
    # The planner counts parameters from the config alone, on the meta device.
    with torch.device("meta"):
        meta_model = type(a)(tiny_model_config(tok))
    assert sum(p.numel() for p in meta_model.parameters()) == sum(p.numel() for p in a.parameters())


def test_forward_backward_on_a_real_batch_trains_vision_and_llm(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded]
) -> None:
    model, tok = tiny
    adapter = adapter_for("minicpmv-4.6", tok)
    # Two samples with one unsliced 448x448 image each (the brief's speed case).
    pair = [s for s in _with_images(loaded["minicpmv-4.6"]) if s.tgt_sizes == [(32, 32)]][:2]
    assert len(pair) == 2
    batch = adapter.collate(pair)
    model.zero_grad(set_to_none=True)
    adapter.forward_loss(model, batch)[0].backward()  # warm-up
    model.zero_grad(set_to_none=True)
    start = time.process_time()  # CPU seconds (one thread): robust to a busy machine
    loss, count = adapter.forward_loss(model, batch)
    (loss / count).backward()
    elapsed = time.process_time() - start
    assert elapsed < 3.0, f"tiny fwd+bwd took {elapsed:.2f} CPU s"  # ~0.07 s here
    assert torch.isfinite(loss) and count == adapter.label_count(batch) > 0
    vision = model.model.vision_tower.embeddings.patch_embedding.weight.grad
    merger = model.model.merger.mlp[0].linear_2.weight.grad
    llm = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    for grad in (vision, merger, llm, model.lm_head.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_loss_sum_matches_transformers_own_loss(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded]
) -> None:
    model, tok = tiny
    adapter = adapter_for("4.6", tok)
    batch = adapter.collate([s for _, _, s in loaded["minicpmv-4.6"][:3]])
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            target_sizes=batch["target_sizes"],
            labels=batch["labels"],
        )
        total, count = token_loss_sum(out.logits, batch["labels"])
        shifted = torch.cat(
            [batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], 1
        )
        total2, count2 = token_loss_sum(out.logits, shifted, pre_shifted=True)
    assert torch.allclose(total / count, out.loss, rtol=1e-5)
    assert torch.allclose(total, total2) and count == count2


def test_merger_tokens_equal_image_spans(tiny: tuple[Any, Any], loaded: dict[str, Loaded]) -> None:
    model, tok = tiny
    for profile in ("minicpmv-4.6", "minicpmv-4.6-4x"):
        adapter = adapter_for(profile, tok)
        assert isinstance(adapter, Native46Adapter)
        for sample in _with_images(loaded[profile]):
            batch = adapter.collate([sample])
            with torch.no_grad():
                out = model.get_image_features(
                    batch["pixel_values"],
                    batch["target_sizes"],
                    downsample_mode=adapter.downsample_mode,
                )
            got = [f.shape[0] for f in out.pooler_output]
            assert got == [b - a for a, b in sample.tokenized.image_spans], sample.meta.key
            ids = torch.tensor(sample.tokenized.input_ids)
            assert int((ids == model.config.image_token_id).sum()) == sum(got)


def test_dummy_vision_gives_zero_grads_and_keeps_the_loss(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded]
) -> None:
    model, tok = tiny
    adapter = adapter_for("4.6", tok)
    text = _text_only(loaded["minicpmv-4.6"])
    assert text
    batch = adapter.collate(text)
    assert batch["pixel_values"] is None and batch["target_sizes"] is None
    model.zero_grad(set_to_none=True)
    loss, count = adapter.forward_loss(model, batch)
    loss.backward()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        plain, plain_count = token_loss_sum(out.logits, batch["labels"])
    assert torch.equal(loss.detach(), plain) and count == plain_count
    vision = [p.grad for p in model.model.vision_tower.parameters()]
    vision += [p.grad for p in model.model.merger.parameters()]
    assert all(g is not None for g in vision), "every vision parameter must get a gradient"
    assert all(torch.count_nonzero(g) == 0 for g in vision)
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    features = adapter.vision_forward(model, *adapter.dummy_vision_inputs())
    assert features.shape == (1, model.config.text_config.hidden_size)


# --- tokenize ---------------------------------------------------------------------------


def test_exact_length_equals_mvprep_count(loaded: dict[str, Loaded], tok_dir: Path) -> None:
    counter = HFTokenCounter(tok_dir)
    for profile in PROFILES:
        rows = loaded[profile]
        for meta, _, sample in rows:
            assert meta.token_count_exact
            assert len(sample.tokenized) == meta.num_tokens, (profile, meta.key)
            recount = counter.count_text_tokens(meta.conversations, meta.image_names)
            assert len(sample.tokenized) == recount + meta.num_image_tokens
            assert len(sample.tokenized.labels) == len(sample.tokenized)
            assert sample.tokenized.num_label_tokens > 0


def _reference_processor(tok: Any) -> Any:
    """transformers' MiniCPMV4_6Processor with only the attributes its span methods read.

    Its constructor also wants a video processor, which needs torchvision (not installed);
    ``replace_image_token`` and ``_prepend_local_ids`` are run as transformers wrote them.
    """
    from transformers import MiniCPMV4_6Processor

    proc = object.__new__(MiniCPMV4_6Processor)
    proc.slice_mode = True
    for name in (
        "image_token",
        "image_start_token",
        "image_end_token",
        "slice_start_token",
        "slice_end_token",
        "image_id_start_token",
        "image_id_end_token",
    ):
        setattr(proc, name, getattr(tok, name))
    return proc


def test_native_tokens_equal_transformers_processor(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded], dataset: Path
) -> None:
    from transformers import MiniCPMV4_6ImageProcessorPil

    _, tok = tiny
    processor, images = _reference_processor(tok), MiniCPMV4_6ImageProcessorPil()
    checked = 0
    for meta, _, sample in loaded["minicpmv-4.6"]:
        if not meta.images:
            continue
        originals = [Image.open(dataset.parent / e.path).convert("RGB") for e in meta.images]
        turns = expand_placeholders(
            meta.conversations, meta.image_names, [tok.image_token] * len(originals)
        )
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
        out = images(images=originals, max_slice_nums=MAX_SLICE_NUMS)
        spans = [
            processor.replace_image_token(out, image_idx=i, image_token_divisor=16)
            for i in range(len(originals))
        ]
        spans = processor._prepend_local_ids([text], spans, tok.image_token)
        parts = text.split(tok.image_token)
        full = parts[0] + "".join(s + p for s, p in zip(spans, parts[1:], strict=True))
        assert tok(full)["input_ids"] == sample.tokenized.input_ids, meta.key
        assert np.asarray(out["target_sizes"]).tolist() == [list(t) for t in sample.tgt_sizes]
        checked += 1
    assert checked >= 8


def test_remote26_span_text_is_the_official_one(loaded: dict[str, Loaded], tiny) -> None:
    _, tok = tiny
    sliced = [
        (meta, s)
        for meta, _, s in loaded["minicpmv-2.6"]
        if len(meta.images) == 1 and meta.images[0].layout.grid
    ]
    meta, sample = sliced[0]
    entry = meta.images[0]
    cols, rows = entry.layout.grid
    q = "<unk>" * 64
    official = f"<image_id>{entry.image_id}</image_id><image>{q}</image>" + "\n".join(
        "".join(f"<slice>{q}</slice>" for _ in range(cols)) for _ in range(rows)
    )
    assert official in tok.decode(sample.tokenized.input_ids)
    assert all(b - a == 64 for a, b in sample.tokenized.image_spans)


def _label_text(tok: Any, labels: list[int]) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_label_rule_multi_turn_and_lookalike_content(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    turns = [
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "Say it again: 42"},
        {"role": "assistant", "content": "42"},
    ]
    meta = SampleMeta(key="000000007", id="x", conversations=turns)
    out = tokenize_sample(meta, tok, "minicpmv-4.6")
    assert _label_text(tok, out.labels) == "assistant<|im_end|>42<|im_end|>"
    rendered = tok.decode(out.input_ids)
    assert rendered == tok.apply_chat_template(turns, tokenize=False)
    # The label tokens are the ones of the assistant turns, at their positions.
    first = rendered.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    prefix = len(tok(rendered[:first], add_special_tokens=False)["input_ids"])
    assert out.labels[:prefix] == [IGNORE_INDEX] * prefix
    assert out.labels[prefix] == out.input_ids[prefix] != IGNORE_INDEX


def test_labels_with_a_template_that_trims_content(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    from mvshards.tiny_tokenizer import TINY_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = TINY_CHAT_TEMPLATE.replace(
        "message['content']", "message['content'] | trim"
    )
    turns = [
        {"role": "user", "content": " hello "},
        {"role": "assistant", "content": "  The cat.\n"},
    ]
    out = tokenize_sample(SampleMeta("000000003", "t", turns), tok, "minicpmv-2.6")
    assert "<|im_start|>assistant\nThe cat.<|im_end|>" in tok.decode(out.input_ids)
    assert _label_text(tok, out.labels) == "The cat.<|im_end|>"


_TEXT = st.text(
    alphabet=st.sampled_from(list("abc XYZ 0123.,!?\n\t猫图片éü-_()")), min_size=0, max_size=30
)
_WORD = st.text(alphabet=st.sampled_from(list("abcdXYZ019.!猫é")), min_size=1, max_size=12)


@st.composite
def _samples(draw: st.DrawFn) -> tuple[SampleMeta, str]:
    """A random sample: 0-3 images of random sizes, 1-3 rounds, placeholders in user turns."""
    profile = get_profile(draw(st.sampled_from(PROFILES)))
    n_images = draw(st.integers(0, 3))
    multi = n_images > 1 or (n_images == 1 and draw(st.booleans()))
    names = [f"<image_{i:02d}>" for i in range(n_images)] if multi else ["<image>"] * n_images
    rounds = draw(st.integers(1, 3))
    turns = []
    for r in range(rounds):
        user = draw(_TEXT)
        if r == 0 and n_images == 1 and not multi and draw(st.booleans()):
            user = draw(_TEXT) + "<image>" + user
        if multi and r == 0:
            user = "".join(draw(_TEXT) + name for name in names) + user
        turns.append({"role": "user", "content": user})
        # Assistant content starts and ends with a non-space so its tokens end at its edges.
        turns.append({"role": "assistant", "content": draw(_WORD) + draw(_TEXT) + draw(_WORD)})
    sizes = [(draw(st.integers(16, 2400)), draw(st.integers(16, 2400))) for _ in range(n_images)]
    layouts = [compute_layout(w, h, profile, MAX_SLICE_NUMS) for w, h in sizes]
    form = draw(st.sampled_from(["finetune", "inference", "none"]))
    ids = assign_image_ids(layouts, form)
    entries = [
        ImageEntry(
            f"{i}.jpg",
            "0" * 64,
            lay,
            iid,
            num_image_tokens(lay, profile, iid),
            f"000000001.src{i}.jpg",
            f"000000001.ref{i}.jpg" if lay.grid else None,
        )
        for i, (lay, iid) in enumerate(zip(layouts, ids, strict=True))
    ]
    meta = SampleMeta("000000001", "h", turns, entries, image_names=names)
    return meta, profile.name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_samples())
def test_property_length_and_labels(case: tuple[SampleMeta, str], tok_dir: Path) -> None:
    meta, profile = case
    counter = make_token_counter(tok_dir)
    assert isinstance(counter, HFTokenCounter)
    tok = counter.tokenizer
    out = tokenize_sample(meta, tok, profile)
    assert len(out) == counter.count_text_tokens(meta.conversations, meta.image_names) + sum(
        e.num_image_tokens for e in meta.images
    )
    expected = "".join(t["content"] + "<|im_end|>" for t in meta.conversations[1::2])
    assert _label_text(tok, out.labels) == expected
    assert all(
        lab in (IGNORE_INDEX, tid) for lab, tid in zip(out.labels, out.input_ids, strict=True)
    )


# --- pixels -----------------------------------------------------------------------------


def test_normalisation_is_bit_exact_for_every_byte() -> None:
    from transformers import MiniCPMV4_6ImageProcessorPil

    proc = MiniCPMV4_6ImageProcessorPil()
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, axis=0)  # CHW
    ref46 = proc.normalize(proc.rescale(values, 1 / 255), proc.image_mean, proc.image_std)
    ours46 = normalise(values.transpose(1, 2, 0), "4.6").transpose(2, 0, 1)
    assert ref46.dtype == ours46.dtype == np.float32 and np.array_equal(ref46, ours46)
    # The official 2.6 fine-tuning transform: ToTensor (x / 255) then Normalize(0.5, 0.5).
    t = torch.from_numpy(values).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(
        t, torch.from_numpy(normalise(values.transpose(1, 2, 0), "2.6")).permute(2, 0, 1)
    )
    assert ours46.min() == -1.0 and ours46.max() == 1.0


def test_pixels_equal_the_image_processor(loaded: dict[str, Loaded]) -> None:
    """Sources: the processor on the stored source, whose size is already its best size, so
    its resize is PIL's same-size copy. Slices: the processor with ``do_resize=False`` on the
    stored refine image slices it itself whenever it picks the same grid."""
    from transformers import MiniCPMV4_6ImageProcessorPil

    proc = MiniCPMV4_6ImageProcessorPil()
    sources = slices = 0
    for meta, members, sample in loaded["minicpmv-4.6"]:
        k = 0
        for entry in meta.images:
            n = len(entry.layout.tgt_sizes)
            ours = [p.numpy() for p in sample.pixel_values[k : k + n]]
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


# --- adapters: costs and the 2.6 batch ---------------------------------------------------


def _patches_padded_by(adapter: Any, batch: dict[str, Any]) -> int:
    if isinstance(adapter, Native46Adapter):
        pv = batch["pixel_values"]
        return 0 if pv is None else pv.shape[-1] // 14
    views = [p for per_sample in batch["pixel_values"] for p in per_sample]
    return len(views) * max((p.shape[-1] // 14 for p in views), default=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    profile=st.sampled_from(["minicpmv-4.6", "minicpmv-2.6"]),
    picks=st.lists(st.integers(0, 11), min_size=1, max_size=5),
)
def test_padded_cost_is_what_collate_pads(
    profile: str, picks: list[int], loaded: dict[str, Loaded], tiny: tuple[Any, Any]
) -> None:
    rows = [loaded[profile][i % len(loaded[profile])] for i in picks]
    adapter = adapter_for(profile, tiny[1])
    batch = adapter.collate([s for _, _, s in rows])
    padded = (batch["input_ids"].numel(), _patches_padded_by(adapter, batch))
    assert adapter.padded_cost([s for _, _, s in rows]) == padded
    assert adapter.padded_cost([m for m, _, _ in rows]) == padded
    if isinstance(adapter, Native46Adapter):
        assert adapter.padded_cost([m.index_row() for m, _, _ in rows]) == padded
    else:
        with pytest.raises(ValueError, match="per-"):
            adapter.padded_cost([m.index_row() for m, _, _ in rows])
    assert adapter.padded_cost([CostItem(5, 7, 1, 7)] * 2)[0] == 10


def test_remote26_collate_structure(loaded: dict[str, Loaded], tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    rows = loaded["minicpmv-2.6"]
    adapter = adapter_for("2.6", tok)
    assert isinstance(adapter, Remote26Adapter)
    samples = [s for _, _, s in rows[:6]]  # single, multi-image and text-only samples
    batch = adapter.collate(samples)
    b, length = batch["input_ids"].shape
    assert length == max(len(s.tokenized) for s in samples)
    assert batch["attention_mask"].dtype == torch.bool
    opens = {tok.convert_tokens_to_ids(t) for t in ("<image>", "<slice>")}
    closes = {tok.convert_tokens_to_ids(t) for t in ("</image>", "</slice>")}
    for i, s in enumerate(samples):
        n = len(s.tokenized)
        ids = batch["input_ids"][i]
        assert torch.equal(batch["position_ids"][i, :n], torch.arange(n))
        assert batch["attention_mask"][i].sum() == n and not batch["attention_mask"][i, n:].any()
        unshifted = torch.tensor(s.tokenized.labels)
        assert torch.equal(batch["labels"][i, : n - 1], unshifted[1:])
        assert (batch["labels"][i, n - 1 :] == IGNORE_INDEX).all()
        pixels, tgt, bound = (
            batch["pixel_values"][i],
            batch["tgt_sizes"][i],
            batch["image_bound"][i],
        )
        if not s.tgt_sizes:
            assert pixels == [] and tgt == [] and bound == []
            continue
        assert tgt.dtype == torch.int32 and tgt.shape == (len(pixels), 2)
        assert bound.shape == (len(pixels), 2)
        for p, (r, c), (start, end) in zip(pixels, tgt.tolist(), bound.tolist(), strict=True):
            assert p.shape == (3, 14, r * c * 14)
            assert end - start == 64 and (ids[start:end] == tok.unk_token_id).all()
            assert int(ids[start - 1]) in opens and int(ids[end]) in closes
    assert b == len(samples) and any(not s.tgt_sizes for s in samples)
    assert any(len(s.meta.images) > 1 for s in samples)


# --- models -----------------------------------------------------------------------------


def _config(folder: Path, obj: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(obj))
    return folder


def test_detect_family(tmp_path: Path) -> None:
    cases = {
        "v46": ({"model_type": "minicpmv4_6"}, "4.6"),
        "v47": ({"model_type": "minicpmv4_7"}, "4.6"),
        "v26": (
            {"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
            "2.6",
        ),
        "o26": ({"model_type": "minicpmo"}, "2.6"),
        "map": (
            {"model_type": "custom", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
            "2.6",
        ),
    }
    for name, (obj, family) in cases.items():
        assert detect_family(_config(tmp_path / name, obj)) == family
    with pytest.raises(ModelLoadError, match="query_num 96"):
        detect_family(_config(tmp_path / "v25", {"model_type": "minicpmv", "query_num": 96}))
    with pytest.raises(ModelLoadError, match="llama"):
        detect_family(_config(tmp_path / "llama", {"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no config.json"):
        detect_family(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(tmp_path / "v26", trust_remote_code=False)


def test_saved_tiny_model_loads_back(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    folder = save_tiny(tmp_path / "tiny", seed=0)
    model, tok, family = load_model(folder, trust_remote_code=False, dtype="bf16")
    assert family == "4.6" and type(model).__name__ == "MiniCPMV4_6ForConditionalGeneration"
    assert model.dtype == torch.bfloat16 and model.training
    assert tok.image_token == "<unk>" and tok.chat_template
    reference = tiny[0].state_dict()
    assert all(
        torch.equal(v.float(), reference[k].bfloat16().float())
        for k, v in model.state_dict().items()
    )
