"""Prefect flows (plan -> shards -> finalize) and the command line."""
