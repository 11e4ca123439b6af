"""Code for running Rigshift locally, outside the product packages.

Nothing in ``broker``, ``worker_agent`` or ``client`` imports this package; it imports
them. Modules:

- :mod:`harness.fleet`: ``LocalFleet``, a broker and agents as real processes on
  loopback (the demo, the end-to-end and fault tests, the benchmarks);
- :mod:`harness.demo`: ``rigshift demo``;
- :mod:`harness.containers`: podman configured for the machine, a local registry and test
  images (the image tests and ``benchmarks/env_bench.py --images``);
- :mod:`harness.broker_fixtures`: builders of scheduler fixtures (``make_job``,
  ``make_worker``, ...);
- :mod:`harness.agent_fixtures`: builders and fakes for the agent's tests
  (``FakeClock``, ``make_assignment``, ``TcpProxy``, ...).
"""
