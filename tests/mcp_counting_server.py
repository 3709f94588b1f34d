"""An MCP stdio server for tests that count its starts: each start appends a line to the
file named by $STARTS_FILE, the SHA-256 of the $API_KEY it was given (so a test sees the
secret arrived without writing it). Serves get_weather as tests/rollout_tools.py does,
and check_key, which fails quoting the key."""

from __future__ import annotations

import hashlib
import os

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("counting", log_level="WARNING")


@server.tool()
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"21 °C and sunny in {city}"


@server.tool()
def check_key() -> str:
    """Fails, quoting the key, as a server may on a key it refuses."""
    raise ToolError(f"key {os.environ.get('API_KEY')} refused")


if __name__ == "__main__":
    with open(os.environ["STARTS_FILE"], "a") as f:
        f.write(hashlib.sha256(os.environ.get("API_KEY", "").encode()).hexdigest() + "\n")
    server.run()
