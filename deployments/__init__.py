"""Presets, work-pool templates and Prefect deployments, shipped as package data."""
