"""An MCP stdio server for tests of servers that die: each start appends its pid to the
file named by $STARTS_FILE; with $STARTS_OK = N, a start after the N-th exits at once (a
server that no longer starts). `pid` answers its pid; `crash` kills the server mid-call."""

from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("crashy", log_level="WARNING")


@server.tool()
def pid() -> str:
    """The server's process id."""
    return str(os.getpid())


@server.tool()
def crash() -> str:
    """The server dies during the call."""
    os._exit(1)


if __name__ == "__main__":
    with open(os.environ["STARTS_FILE"], "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(os.environ["STARTS_FILE"]) as f:
        started = len(f.read().split())
    if started > int(os.environ.get("STARTS_HANG", "1000")):
        time.sleep(3600)
    if started > int(os.environ.get("STARTS_OK", "1000")):
        sys.exit(3)
    server.run()
