"""The parts of ``benchmarks/fleet_bench.py`` (run that script: its docstring says what it
measures).

- :mod:`fleetbench.loadgen`: a load-generator process, K/P simulated agents speaking the
  real WorkerService protocol in one asyncio loop;
- :mod:`fleetbench.processes`: the broker process under test, the bare gRPC server it can
  be compared with, and the sampler of the broker's CPU and memory;
- :mod:`fleetbench.report`: percentiles, the per-second timeline and the readable summary.
"""
