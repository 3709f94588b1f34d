"""A streamable-HTTP MCP server for tests of headers and lost sessions: `authorization`
answers the SHA-256 of the request's Authorization header (so a test sees the token
arrived without the server writing it). Usage: python mcp_header_server.py PORT"""

from __future__ import annotations

import hashlib
import sys

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("headers", log_level="WARNING")


@server.tool()
def authorization(ctx: Context) -> str:
    """The SHA-256 of the request's Authorization header."""
    return hashlib.sha256((ctx.headers or {}).get("authorization", "").encode()).hexdigest()


if __name__ == "__main__":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
