"""The parts of ``benchmarks/soak.py`` (run that script: its docstring says what it measures).

- :mod:`soakbench.drive`: the run's traffic (CreateJob, the agents' assignments, GetJob) and
  the sampling as jobs complete;
- :mod:`soakbench.probes`: what the soak reads from outside the broker: its completed-jobs
  counter (``/metrics``), the database's size, the health check, a free port;
- :mod:`soakbench.series`: the samples file in the soak's home (several runs, one curve) and
  the figures the final JSON line reports;
- :mod:`soakbench.plot`: the PNG of RSS and latency over jobs completed (matplotlib, the
  ``bench`` extra; skipped with a message when it is missing).
"""
