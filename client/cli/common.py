"""What every broker-facing command group of the CLI shares.

``--broker`` (on the group and on each subcommand), the :class:`Client` a
command talks through, ``--json``, ``-o/--output`` on listings, and
:class:`BrokerGroup`, which turns an SDK error into ``error: …`` on stderr and
exit status 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from client import output
from client.errors import RigshiftError, Unavailable
from client.render import Style, stdout_style
from client.sdk import DEFAULT_BROKER, Client
from client.units import usd_to_micros

__all__ = [
    "BROKER_EXPLICIT",
    "BROKER_KEY",
    "OUTPUT_FORMATS",
    "USD",
    "BrokerGroup",
    "Converted",
    "broker_address",
    "broker_client",
    "broker_option",
    "echo_json",
    "echo_listing",
    "group_broker_option",
    "json_option",
    "listing_format",
    "listing_options",
    "short_id",
    "table_style",
]

#: ``ctx.meta`` key: the broker address the command talks to.
BROKER_KEY = "rigshift.broker"
#: ``ctx.meta`` key: set when the address came from ``--broker`` or ``$RIGSHIFT_BROKER``.
BROKER_EXPLICIT = "rigshift.broker_explicit"


class Converted(click.ParamType):
    """A click type wrapping a ``units`` converter; its ValueError becomes a usage error."""

    def __init__(self, name: str, convert: Callable[[str], Any]) -> None:
        self.name = name
        self._convert = convert

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default that is converted already
            return value
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


USD = Converted("usd", usd_to_micros)


# -- broker address, client and error handling ---------------------------------


def _remember_broker(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[BROKER_KEY] = value
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source not in (None, click.core.ParameterSource.DEFAULT):
            ctx.meta[BROKER_EXPLICIT] = True


def group_broker_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker`` (env ``RIGSHIFT_BROKER``) on a command group."""
    return click.option(
        "--broker",
        envvar="RIGSHIFT_BROKER",
        default=DEFAULT_BROKER,
        show_default=True,
        metavar="HOST:PORT",
        expose_value=False,
        callback=_remember_broker,
        help="Broker address (env RIGSHIFT_BROKER).",
    )(f)


def broker_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The same ``--broker`` on each subcommand, so it may also come after the command name."""
    return click.option(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        expose_value=False,
        callback=_remember_broker,
        help="Broker address; overrides the group's --broker.",
    )(f)


def broker_address() -> str:
    """The broker address the current command talks to."""
    return str(click.get_current_context().meta.get(BROKER_KEY, DEFAULT_BROKER))


RETRY_BUDGET_ENV = "RIGSHIFT_RETRY_BUDGET_S"
"""How long a command keeps retrying an unreachable broker when its call is safe to repeat
(``job submit``: the request id makes a retry the same job); default 60 s."""


def broker_client() -> Client:
    """A client for the chosen broker, closed when the command ends."""
    ctx = click.get_current_context()
    raw = os.environ.get(RETRY_BUDGET_ENV, "")
    try:
        budget = float(raw) if raw else 60.0
    except ValueError:
        raise click.UsageError(f"{RETRY_BUDGET_ENV}={raw!r}: expected seconds, e.g. 60") from None
    client = Client(broker_address(), retry_budget_s=max(0.0, budget), on_retry=_say_retrying)
    return ctx.with_resource(client)


def _say_retrying(err: Unavailable, budget_s: float) -> None:
    """One line on stderr when a call starts retrying: the user knows why nothing happens."""
    why = " ".join(err.message.split()) if err.reason else "cannot reach it"
    click.echo(
        f"broker at {broker_address()}: {why}; retrying for up to {budget_s:g} s "
        f"({RETRY_BUDGET_ENV}; Ctrl-C stops)",
        err=True,
    )


def _report(exc: RigshiftError, address: str) -> None:
    if isinstance(exc, Unavailable) and not exc.reason:
        click.echo(
            f"error: cannot reach the broker at {address} (is `rigshift broker serve` running?)",
            err=True,
        )
        return
    line = str(exc)
    click.echo(f"error: {line}", err=True)
    for field, description in exc.field_violations:
        if f"{field}: {description}" not in line:
            click.echo(f"  {field}: {description}", err=True)
    if exc.request_id and isinstance(exc, Unavailable):
        click.echo(
            f"  the job may exist once the broker recovers: retry with --request-id "
            f"{exc.request_id} (the same id never makes a second job)",
            err=True,
        )


class BrokerGroup(click.Group):
    """A group whose commands talk to the broker: turns client errors into ``error: …``, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RigshiftError as exc:
            _report(exc, ctx.meta.get(BROKER_KEY, DEFAULT_BROKER))
        except OSError as exc:  # e.g. an unreadable file in --working-dir
            click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1)


def echo_json(msg: Any) -> None:
    """Print a proto message as JSON."""
    click.echo(output.to_json(msg))


def short_id(name: str) -> str:
    """``jobs/abc`` → ``abc``."""
    return name.partition("/")[2] or name


json_option = click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")


# -- listings: -o/--output json|table|wide, --json -----------------------------

#: ``ctx.meta`` keys: what ``-o`` and ``--json`` said.
_OUTPUT_KEY = "rigshift.output"
_JSON_KEY = "rigshift.output_json"
#: The formats of ``-o/--output``.
OUTPUT_FORMATS = ("json", "table", "wide")


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            ctx.meta[key] = value

    return callback


def listing_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output json|table|wide`` and ``--json`` (the alias of ``-o json``) on a
    listing; the command reads the choice with :func:`listing_format`."""
    f = click.option(
        "-o",
        "--output",
        type=click.Choice(OUTPUT_FORMATS, case_sensitive=False),
        default=None,
        expose_value=False,
        callback=_remember(_OUTPUT_KEY),
        help="json: the API response; table (default): columns; wide: more columns.",
    )(f)
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=_remember(_JSON_KEY),
        help="Print the response as JSON (the same as -o json).",
    )(f)


def listing_format() -> str:
    """``json``, ``table`` or ``wide``: what ``-o``/``--json`` asked of this listing.

    ``--json`` together with ``-o table``/``-o wide`` is a usage error (exit 2).
    """
    meta = click.get_current_context().meta
    chosen = str(meta.get(_OUTPUT_KEY, "")).lower()
    if meta.get(_JSON_KEY):
        if chosen not in ("", "json"):
            raise click.UsageError(f"--json is -o json; it does not go with -o {chosen}")
        return "json"
    return chosen or "table"


def table_style() -> Style:
    """How a table is drawn: ``rich`` when stdout is a terminal, else the plain columns."""
    return stdout_style()


def echo_listing(table: Callable[[bool, Style], str]) -> None:
    """Print a listing's table: ``table(wide, style)`` with ``-o wide`` and the style of
    stdout (every listing's table goes through :func:`client.render.render_table`)."""
    click.echo(table(listing_format() == "wide", table_style()))
