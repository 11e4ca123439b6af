"""``python -m worker_agent run …`` is ``rigshift agent run …``."""

from worker_agent.cli import agent_group

if __name__ == "__main__":
    agent_group(prog_name="rigshift agent")
