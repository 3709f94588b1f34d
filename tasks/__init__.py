"""The work: plan, read, render, engine, parse, commit, storage, report. Prefect-free."""
