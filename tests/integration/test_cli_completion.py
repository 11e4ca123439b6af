"""Shell completion through click's own mechanism: ``_RIGSHIFT_COMPLETE=<shell>_source``.

In tests/integration because click runs ``bash --version`` for the bash script.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rigshift_cli import main


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _rigshift_completion rigshift"),
        ("zsh", "compdef _rigshift_completion rigshift"),
        ("fish", "complete --no-files --command rigshift"),
    ],
)
def test_completion_script_is_produced(shell: str, marker: str) -> None:
    result = CliRunner().invoke(
        main, [], prog_name="rigshift", env={"_RIGSHIFT_COMPLETE": f"{shell}_source"}
    )
    assert result.exit_code == 0, result.output
    assert marker in result.stdout
    assert "_RIGSHIFT_COMPLETE" in result.stdout


def test_completion_offers_subcommands_and_output_formats() -> None:
    env = {
        "_RIGSHIFT_COMPLETE": "bash_complete",
        "COMP_WORDS": "rigshift job li",
        "COMP_CWORD": "2",
    }
    result = CliRunner().invoke(main, [], prog_name="rigshift", env=env)
    assert "plain,list" in result.stdout.splitlines()
    env = {"COMP_WORDS": "rigshift job list -o ", "COMP_CWORD": "4"}
    result = CliRunner().invoke(
        main, [], prog_name="rigshift", env={"_RIGSHIFT_COMPLETE": "bash_complete", **env}
    )
    assert {"plain,json", "plain,table", "plain,wide"} <= set(result.stdout.splitlines())
