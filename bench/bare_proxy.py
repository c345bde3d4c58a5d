"""The floor of a Python hop: a pass-through proxy with no logic (uvicorn + aiohttp, as the gateway uses).

``bench/gateway_overhead.py --fake-upstream --floor`` puts it before the same fake vLLM as the gateway and
measures both in the same rounds: what the gateway adds beyond it is PreSafe's own cost, the rest any Python
proxy in the path would add on this machine. It forwards the method, path and body, and relays the reply's
chunks as they arrive; nothing is checked, parsed or logged.

    python bench/bare_proxy.py --upstream http://127.0.0.1:8000 --port 8090
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn


def proxy_app(upstream: str):
    """A raw ASGI app forwarding every HTTP request to ``upstream`` over one pooled aiohttp session."""
    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        async with session.request(scope["method"], upstream + scope["path"], data=body,
                                   headers={"content-type": "application/json"}) as resp:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(b"content-type", resp.headers.get("content-type", "").encode())]})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(proxy_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, log_config=None,
                access_log=False)


if __name__ == "__main__":
    main()
