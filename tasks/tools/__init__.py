"""Rollout tool executors: the toolbox runtime and the sources it runs tools from."""
