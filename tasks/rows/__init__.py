"""The row path: read, render, the engine, parse, and the continuous loop that joins them."""
