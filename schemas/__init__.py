"""Pydantic models at the edges (job spec, plan) and the output's Arrow schema."""
