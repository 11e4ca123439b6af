"""The client's command groups of the ``rigshift`` CLI: ``rigshift job …``, ``rigshift farm …``
and the API-key commands of ``rigshift admin …``.

Both talk to the broker through :class:`client.sdk.Client`; ``--broker`` (or
``$RIGSHIFT_BROKER``) says where it is. Every listing and every command that
returns a resource takes ``--json``, which prints the API response as proto
JSON. Errors from the broker print ``error: …`` on stderr and exit 1; usage
mistakes exit 2 (click's convention). The ``rigshift`` command itself, which
adds the broker's and the agent's groups, is :mod:`rigshift_cli`.
"""

from client.cli.admin import admin_group
from client.cli.farm import EARNINGS_DATABASE, EarningsDatabase, farm_group
from client.cli.job import job_group

__all__ = ["EARNINGS_DATABASE", "EarningsDatabase", "admin_group", "farm_group", "job_group"]
