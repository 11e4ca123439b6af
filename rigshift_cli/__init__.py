"""The ``rigshift`` command: the broker's, the agent's and the client's command groups in one.

This is the one module allowed to import ``broker``, ``worker_agent`` and
``client`` together: outside it, none of the three imports another. It adds

- ``rigshift job …`` and ``rigshift farm …`` from :mod:`client.cli`;
- ``rigshift broker …`` from :mod:`broker.cli`;
- ``rigshift admin …``: one group of the client's API-key commands (they call the
  broker's API) and the broker's own (``verify-ledger``, on its database);
- ``rigshift agent …`` from :mod:`worker_agent.cli`;
- ``rigshift demo`` from :mod:`harness.demo`;

and gives the client's ``farm earnings`` what it cannot have by itself: a reader
of broker databases (:class:`BrokerDatabase`), for ``--db URL`` and for the
fallback to the local database when no broker answers.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from broker.cli import admin_group as broker_admin_group
from broker.cli import broker_group
from client.cli import EARNINGS_DATABASE, farm_group, job_group
from client.cli import admin_group as client_admin_group
from harness.demo import demo_command
from rigshift.v1 import farm_service_pb2
from worker_agent.cli import agent_group

__all__ = ["BrokerDatabase", "main"]


class BrokerDatabase:
    """:class:`client.cli.EarningsDatabase` over the broker's store (read-only)."""

    def local(self) -> Path | None:
        """The database of a broker in ./.rigshift, else of the last ``rigshift demo``."""
        from broker.store import local_database

        return local_database()

    def earnings(
        self, db_url: str, farm_id: str, since: datetime | None, group_by: str
    ) -> farm_service_pb2.GetEarningsResponse:
        """GetEarnings computed from a broker database, as the broker would answer it."""
        from broker.convert import earnings_pb
        from broker.core import BrokerCore
        from broker.store import Store

        store = Store(db_url, create=False)
        try:
            core = BrokerCore()
            store.load(core)
            farm = farm_id.removeprefix("farms/")
            if farm and farm not in core.farms:
                raise click.ClickException(f"farms/{farm} not found in {db_url}")
            return earnings_pb(
                core,
                farm_id=farm,
                since=since.timestamp() if since else 0.0,
                group_by=group_by,
                farm_name=lambda fid: store.get_farm(fid).display_name,
                source=store,  # the ledger and finished jobs stay in the database
            )
        finally:
            store.close()


@click.group(name="rigshift", context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Rigshift: AI training jobs on former crypto-mining GPU farms."""
    ctx.meta[EARNINGS_DATABASE] = BrokerDatabase()


admin_group = click.Group(
    "admin",
    commands={**client_admin_group.commands, **broker_admin_group.commands},
    help=client_admin_group.help,
)

for _group in (job_group, farm_group, broker_group, admin_group, agent_group, demo_command):
    main.add_command(_group)


if __name__ == "__main__":
    main()
