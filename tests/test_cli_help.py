"""Every option of every ``mvprep`` and ``mvtrain`` command says what it does (``--help``)."""

from __future__ import annotations

import click
import pytest

from mvprep.cli import main as mvprep_main
from mvtrain.cli import main as mvtrain_main


@pytest.mark.parametrize("group", [mvprep_main, mvtrain_main], ids=["mvprep", "mvtrain"])
def test_every_option_has_help_text(group: click.Group) -> None:
    missing = [
        f"{group.name} {name} {'/'.join(param.opts)}"
        for name, command in group.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
    ]
    assert not missing, missing
    assert len(group.commands) >= 4
