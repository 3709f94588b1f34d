"""The process around the engine: clean stops, no orphans, vLLM's environment."""
