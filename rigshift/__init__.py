"""Rigshift's shared base: what the broker, the worker agent and the client all use.

The three product packages never import each other (``tests/unit/test_import_graph.py``
checks it); what they must agree on lives here once, and imports none of them:

=========================  ==============================================================
``rigshift.v1``            the API: generated gRPC code from ``protos/`` (do not edit)
``rigshift.units``         money (integer micro-dollars) and units: parsing, formatting
``rigshift.catalogue``     the GPU models farms own: VRAM, board and idle power, asks
``rigshift.archive``       the working-directory archive format: deterministic tar.gz,
                           safe extraction
``rigshift.checkpoint``    the marker a job writes when its checkpoint is complete
``rigshift.credentials``   the local credentials file (API keys per broker)
``rigshift.defaults``      the lease contract (TTL, heartbeats per TTL), the broker's
                           address and keepalive limit
=========================  ==============================================================

The modules above need only the standard library. The ``rigshift`` command
(``rigshift_cli/``), which assembles the broker's, the agent's and the client's
command groups, is the one place allowed to import all three packages.
"""
