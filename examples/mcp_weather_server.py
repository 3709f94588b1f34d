"""An MCP server (the `mcp` package's MCPServer, formerly FastMCP) serving the demo's
tools, for a rollout job:

    rollout:
      tools:
        - mcp: {command: [python, mcp_weather_server.py]}      # stdio, started by thinkbatch
        - mcp: {url: "http://127.0.0.1:8765/mcp"}              # or streamable HTTP:
                                                               #   python mcp_weather_server.py --http 8765

The tools are those of examples/tools.py, so a job gets the same results from either
executor.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools import convert_units, get_time, get_weather  # noqa: E402  (this folder)


def _told(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A ValueError becomes a ToolError, whose message the client sees (MCPServer hides
    the text of any other exception behind `Error executing tool NAME`)."""
    @functools.wraps(fn)
    def tool(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise ToolError(str(e)) from e
    return tool


server = MCPServer("thinkbatch-weather", log_level="WARNING")
for function in (get_weather, get_time, convert_units):
    server.add_tool(_told(function))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", type=int, metavar="PORT",
                        help="serve streamable HTTP on 127.0.0.1:PORT/mcp instead of stdio")
    port = parser.parse_args().http
    if port is None:
        server.run()
    else:
        server.run("streamable-http", host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
