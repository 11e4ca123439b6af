"""``rigshift admin create-key | list-keys | revoke-key`` against a real broker.

They live in the client (``client/cli/admin.py``: they call the broker's API) and the
``rigshift`` command shows them in one ``admin`` group with the broker's own
``verify-ledger``. The admin key is the one the broker wrote to $RIGSHIFT_HOME/credentials.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from rigshift_cli import main

pytestmark = pytest.mark.timeout(60)


def admin(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["admin", *args], env=env)


def test_one_admin_group_holds_the_key_and_ledger_commands() -> None:
    result = admin("--help")
    assert result.exit_code == 0
    for command in ("create-key", "list-keys", "revoke-key", "verify-ledger"):
        assert command in result.output


def test_create_list_and_revoke_a_key(broker_address: str) -> None:
    created = admin("create-key", "--client", "alice", "--broker", broker_address)
    assert created.exit_code == 0, created.output
    lines = created.stdout.splitlines()
    name = lines[0].split()[0]
    assert name.startswith("apiKeys/") and "client 'alice'" in lines[0]
    assert lines[1].startswith("key: ") and len(lines[1]) > len("key: ")
    assert lines[2] == "Use it as RIGSHIFT_API_KEY=... (it is not shown again)."

    listed = admin("list-keys", "--broker", broker_address)
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert row.split()[1:3] == ["client", "alice"] and row.split()[-1] == "active"

    as_json = admin("list-keys", "--json", "--broker", broker_address)
    keys = json.loads(as_json.stdout)["api_keys"]
    assert any(k["name"] == name for k in keys)
    assert all("key" not in k for k in keys)  # never the secrets

    revoked = admin("revoke-key", name, "--broker", broker_address)
    assert revoked.exit_code == 0 and revoked.stdout == f"{name} revoked\n"
    after = admin("list-keys", "--broker", broker_address).stdout
    assert next(line for line in after.splitlines() if line.startswith(name)).endswith("revoked")


def test_create_key_json_for_an_operator_needs_its_farm(broker_address: str) -> None:
    missing = admin("create-key", "--operator", "bob", "--broker", broker_address)
    assert missing.exit_code == 1 and "Error:" in missing.output  # the broker says why
    farm = CliRunner().invoke(main, ["farm", "--broker", broker_address, "create", "f1", "--json"])
    farm_name = json.loads(farm.stdout)["name"]
    made = admin(
        "create-key", "--operator", "bob", "--farm", farm_name, "--json", "--broker", broker_address
    )
    assert made.exit_code == 0, made.output
    key = json.loads(made.stdout)
    assert key["farm"] == farm_name and key["key"]


def test_exactly_one_role_is_a_usage_error() -> None:
    result = admin("create-key", "--client", "a", "--admin", "b", "--broker", "127.0.0.1:1")
    assert result.exit_code == 2
    assert "give exactly one of --client NAME, --operator NAME, --admin NAME" in result.output


def test_a_refused_call_exits_1_with_the_reason(broker_address: str) -> None:
    result = admin("list-keys", "--broker", broker_address, env={"RIGSHIFT_API_KEY": "rsk_wrong"})
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
