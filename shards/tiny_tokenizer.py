"""A tiny, deterministic MiniCPM-V-style tokenizer for tests, demos and the ``tiny`` model.

``build_tiny_tokenizer(out_dir)`` writes a Hugging Face tokenizer folder that
``AutoTokenizer.from_pretrained(out_dir)`` loads: a byte-level BPE in the manner of Qwen2
(NFC normaliser, Qwen2's split regex, GPT-2 byte alphabet, so any text encodes without an
unknown token) with a few hundred merges learnt from a short built-in corpus, plus the
special tokens of MiniCPM-V 4.6 (:data:`TINY_SPECIAL_TOKENS`) and a Qwen-style chat
template (``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, no default system
prompt).

The merges come from a small pure-Python BPE trainer with a fixed tie-break (highest count,
then the lexicographically smallest pair), so every call writes byte-identical files; the
``tokenizers`` trainer is not used because its tie-breaking is not promised to be stable.
No download, no randomness. ``tokenizers`` and ``transformers`` are imported inside the
function, so importing this module costs nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TINY_SPECIAL_TOKENS: dict[str, str] = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "image_start": "<image>",
    "image_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "image_id_start": "<image_id>",
    "image_id_end": "</image_id>",
}
"""Role -> token string. ``unk`` doubles as the image token filling an image's query span
(as in MiniCPM-V). All are special tokens: never split, never merged with their neighbours."""

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_THINKING_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if not ns.found and message.role == 'user' %}{%- set ns.found = true %}"
    "{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content | trim %}"
    "{%- if message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- set reasoning_content = reasoning_content | trim %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content"
    " + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)
"""A thinking-style template for tests (``build_tiny_tokenizer(..., thinking=True)``): the
assistant and generation-prompt branches of the Qwen3/Qwen3.5 chat templates that MiniCPM-V
4.6's (a Qwen3.5 language model) follows -- contents trimmed, a ``<think>R</think>`` in an
answer split off, every answer after the last user turn written as ``<think>\\nR\\n</think>\\n\\n``
+ answer (an empty block when it has no reasoning), earlier answers without their reasoning;
the generation prompt ends in an empty block when ``enable_thinking=False``. The tool and
vision branches are left out."""

TINY_THINK_TOKENS = ("<think>", "</think>")
"""Added (not special) tokens of the thinking variant, as in the Qwen3 vocabulary."""

TINY_VOCAB_TARGET = 1024
"""Base bytes (256) plus merges; training stops earlier when no pair occurs twice."""

_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe this image in detail. What is shown in the picture? How many people are there?
The image shows a cat sitting on a wooden table next to a window. The cat is looking at
the camera. There is a cup of coffee and a small plant on the table. The light comes from
the left side of the image, and the background is out of focus.
Question: What color is the car? Answer: The car is red.
Question: Read the text in the image. Answer: The sign says "Open 24 hours".
User: Can you summarize the document? Assistant: Sure. The document describes the results
of an experiment with 12 participants over 3 weeks; the main finding is that training
with images improves accuracy from 71.5% to 84.2%.
Please answer the question based on the chart. The chart shows sales by month: January 120,
February 135, March 160, April 152, May 171, June 190. Sales grew in most months.
def train(model, data, steps=1000): return [model.step(batch) for batch in data[:steps]]
{"id": "sample-0001", "image": "images/cat.jpg", "conversations": []}
这是一张照片。图片中有一只猫坐在桌子上。请描述这张图片。图中的文字是什么？
この画像には何が写っていますか。猫がテーブルの上に座っています。
Il y a un chat sur la table. Das Bild zeigt eine Katze auf dem Tisch. El gato es negro.
There are two dogs playing in the park, and a child is running after a red ball.
The screenshot shows a settings page with a list of options and a blue button at the bottom.
In the first image there is a mountain; in the second image there is a lake. Compare them.
system user assistant user assistant: the user asks and the assistant answers the question.
You are a helpful assistant. Look at the image and answer the question in one sentence.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _train_bpe(words: Counter[str], vocab_target: int) -> list[tuple[str, str]]:
    """Learn merges greedily: most frequent adjacent pair, ties to the smallest pair."""
    symbols = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while 256 + len(merges) < vocab_target:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            seq = symbols[word]
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        a, b = best
        for word, seq in symbols.items():
            if len(seq) < 2:
                continue
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            symbols[word] = out
    return merges


def build_tiny_tokenizer(
    out_dir: Path | str, vocab_target: int = TINY_VOCAB_TARGET, thinking: bool = False
) -> Path:
    """Write the tiny tokenizer to ``out_dir`` (created if needed) and return ``out_dir``.

    ``thinking``: the thinking-style variant -- :data:`TINY_THINKING_CHAT_TEMPLATE` and
    ``<think>``/``</think>`` as added tokens. The same arguments always produce the same
    files, byte for byte.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words: Counter[str] = Counter()
    for line in _CORPUS.splitlines(keepends=True):
        for piece, _ in pre_tokenizer.pre_tokenize_str(line):
            words[piece] += 1
    merges = _train_bpe(words, vocab_target)

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
            for t in TINY_SPECIAL_TOKENS.values()
        ]
    )
    if thinking:
        tok.add_tokens(
            [
                AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False)
                for t in TINY_THINK_TOKENS
            ]
        )
    s = TINY_SPECIAL_TOKENS
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=s["unk"],
        pad_token=s["pad"],
        eos_token=s["im_end"],
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            "image_token": s["unk"],
            "video_token": s["unk"],
            "image_start_token": s["image_start"],
            "image_end_token": s["image_end"],
            "slice_start_token": s["slice_start"],
            "slice_end_token": s["slice_end"],
            "image_id_start_token": s["image_id_start"],
            "image_id_end_token": s["image_id_end"],
            "im_start_token": s["im_start"],
        },
    )
    hf.chat_template = TINY_THINKING_CHAT_TEMPLATE if thinking else TINY_CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    _normalise_json_files(out_dir)
    return out_dir


def _normalise_json_files(out_dir: Path) -> None:
    """Rewrite the saved JSON files with sorted keys so no dict ordering leaks into them."""
    for path in sorted(out_dir.glob("*.json")):
        obj = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "tokenizer.json":
            continue  # written by the tokenizers library in a fixed order; keep it as is
        path.write_text(
            json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
