"""Shared helpers of the input-record tests (test_records, test_readers): conversation
turns and dataset files."""

from __future__ import annotations

from pathlib import Path

from mvprep.readers import open_dataset


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def qa(question: str = "What is this?", answer: str = "A cat.") -> list[dict[str, str]]:
    return [turn("user", question), turn("assistant", answer)]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_all(path: Path) -> list[tuple[int, object]]:
    source = open_dataset(path)
    return list(source.read_range(0, source.num_records))
