"""``mvtrain``: the training stage's command line (not built yet)."""

from __future__ import annotations

import sys


def main() -> None:
    print(
        "mvtrain is not built yet: the training stage lands with the training-stage issue. "
        "Build shards with `mvprep build` meanwhile.",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main()
