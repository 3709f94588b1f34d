"""The fleet simulation's servers, each in a process of its own, counting what they serve.

    python fleet_servers.py s3 LISTENERS READY_FILE
    python fleet_servers.py prefect PORT

`s3`: moto's S3 app (server mode, as tests/conftest.py's S3Endpoint runs it) behind
LISTENERS ports on 127.0.0.1, all on the one in-memory store. Each simulated node gets a
port of its own, so every request, pyarrow's ranged reads included, is counted for the
node that sent it: `GET /__sim/log` answers [[listener, unix time, kind, area], ...].
The ports are written to READY_FILE once all listen.

`prefect`: Prefect's API server app under uvicorn, as `prefect server start` runs it,
counting HTTP requests by method and route and the messages received on each websocket
(client events, the way task runs report their states): `GET /__sim/counts`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

CONTROL = "/__sim/"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
AREAS = ("_claims/", "_shards/", "data/", "in/", "_plan.json", "_workers/", "_manifest.json")


def _area(path: str, query: dict[str, list[str]]) -> str:
    """Which part of the job's folder a request touches (a listing: its prefix)."""
    where = query.get("prefix", [""])[0] if "list-type" in query else path
    return next((a.strip("/") for a in AREAS if a in where), "other")


def _kind(method: str, query: dict[str, list[str]], headers: dict[str, str]) -> str:
    if "list-type" in query:
        return "LIST"
    if method == "PUT" and ("HTTP_IF_NONE_MATCH" in headers or "HTTP_IF_MATCH" in headers):
        return "PUT_IF"  # a conditional write: claims, their renewals
    return method


def serve_s3(listeners: int, ready_file: str) -> None:
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication,
                                               MotoRequestHandler, create_backend_app)
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    app = DomainDispatcherApplication(create_backend_app)
    log: list[tuple[int, float, str, str, int, str]] = []

    def listener(index: int) -> Any:
        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path.startswith(CONTROL):
                body = json.dumps(list(log)).encode()
                start_response("200 OK", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
                return [body]
            query = parse_qs(environ.get("QUERY_STRING", ""))
            at, status = time.time(), []

            def answered(line: str, headers: Any, exc_info: Any = None) -> Any:
                status.append(int(line[:3]))
                return start_response(line, headers, exc_info)

            result = app(environ, answered)
            area = _area(path, query)
            log.append((index, at, _kind(environ["REQUEST_METHOD"], query, environ), area,
                        status[0] if status else 0,
                        path.rsplit("/", 1)[-1] if area == "_claims" else ""))
            return result
        return counted

    servers = [make_server("127.0.0.1", 0, listener(i), True, request_handler=MotoRequestHandler)
               for i in range(listeners)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(ready_file, "w") as f:
        json.dump([s.server_address[1] for s in servers], f)
    threading.Event().wait()


def serve_prefect(port: int) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app()
    http: Counter[str] = Counter()
    sockets: Counter[str] = Counter()

    async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = UUID.sub("{id}", scope.get("path", ""))
        if scope["type"] == "http" and path.startswith(CONTROL):
            body = json.dumps({"http": http, "websocket_messages": sockets}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http" and not path.endswith("/health"):
            http[f"{scope['method']} {path}"] += 1
        if scope["type"] == "websocket":
            inner = receive

            async def receive() -> dict[str, Any]:
                message = await inner()
                if message["type"] == "websocket.receive":
                    sockets[path] += 1
                return message
        await app(scope, receive, send)

    uvicorn.run(counted, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if sys.argv[1] == "s3":
        serve_s3(int(sys.argv[2]), sys.argv[3])
    else:
        serve_prefect(int(sys.argv[2]))
