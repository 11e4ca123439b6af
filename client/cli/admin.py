"""``rigshift admin create-key | list-keys | revoke-key``: API keys, through the broker's API.

These commands call ``AdminService`` with the SDK and need an admin key. The
``rigshift`` command shows them in one ``admin`` group with the broker's own
admin commands, which work on its database directly (``rigshift admin
verify-ledger``, in ``broker.cli``).
"""

from __future__ import annotations

from collections.abc import Sequence

import click
from google.protobuf.json_format import MessageToJson

from client import output, render
from client.cli.common import echo_listing, listing_format, listing_options
from client.errors import RigshiftError
from client.sdk import Client
from rigshift.defaults import BROKER_ADDRESS
from rigshift.v1 import admin_service_pb2

__all__ = ["admin_group"]

_broker_option = click.option(
    "--broker", envvar="RIGSHIFT_BROKER", default=BROKER_ADDRESS, show_default=True
)


@click.group("admin")
def admin_group() -> None:
    """Administer the broker: API keys, the ledger."""


@admin_group.command("create-key")
@click.option("--client", "client_name", default="", help="A client key for this name.")
@click.option("--operator", "operator_name", default="", help="An operator key (needs --farm).")
@click.option("--admin", "admin_name", default="", help="An admin key for this name.")
@click.option("--farm", default="", help="The operator's farm (id or farms/ID).")
@_broker_option
@click.option("--json", "as_json", is_flag=True, help="Print the ApiKey as JSON.")
def create_key_command(
    client_name: str, operator_name: str, admin_name: str, farm: str, broker: str, as_json: bool
) -> None:
    """Issue an API key (needs an admin key). The secret is printed once; store it safely."""
    chosen = [
        (r, n)
        for r, n in (("client", client_name), ("operator", operator_name), ("admin", admin_name))
        if n
    ]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --client NAME, --operator NAME, --admin NAME")
    role, name = chosen[0]
    try:
        with Client(broker) as rs:
            key = rs.create_api_key(role, name, farm=farm)
    except RigshiftError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(MessageToJson(key, preserving_proto_field_name=True))
        return
    click.echo(f"{key.name}  {role} {name!r}" + (f" of {key.farm}" if key.farm else ""))
    click.echo(f"key: {key.key}")
    click.echo("Use it as RIGSHIFT_API_KEY=... (it is not shown again).")


@admin_group.command("list-keys")
@_broker_option
@listing_options
def list_keys_command(broker: str) -> None:
    """List API keys (never their secrets); -o wide adds when each was created."""
    as_json = listing_format() == "json"
    try:
        with Client(broker) as rs:
            resp = rs.list_api_keys()
    except RigshiftError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(MessageToJson(resp, preserving_proto_field_name=True))
        return
    if resp.api_keys:
        echo_listing(lambda wide, style: keys_table(resp.api_keys, wide=wide, style=style))


def keys_table(
    keys: Sequence[admin_service_pb2.ApiKey],
    *,
    wide: bool = False,
    style: render.Style = "plain",
) -> str:
    """The keys; in the plain style and not ``wide``, the fixed-width lines scripts read."""
    rows = []
    for k in keys:
        role = admin_service_pb2.ApiKey.Role.Name(k.role).lower()
        state = "revoked" if k.revoked else "active"
        rows.append([k.name, role, k.principal, k.farm or "-", state])
        if wide:
            rows[-1].append(output.format_time(k.create_time))
    if style == "plain" and not wide:
        return "\n".join(f"{n:<22} {r:<9} {p:<20} {f:<20} {s}" for n, r, p, f, s in rows)
    headers = ["NAME", "ROLE", "PRINCIPAL", "FARM", "STATE"]
    return render.render_table([*headers, "CREATED"] if wide else headers, rows, style)


@admin_group.command("revoke-key")
@click.argument("name")
@_broker_option
def revoke_key_command(name: str, broker: str) -> None:
    """Revoke an API key (apiKeys/ID or ID); calls with it fail from then on."""
    try:
        with Client(broker) as rs:
            key = rs.revoke_api_key(name)
    except RigshiftError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{key.name} revoked")
