"""A WebSocket echo server on python websockets (Debian's python3-websockets),
a second real server implementation for the handshake tests.

Usage: ws_echo.py PORT. Prints "ready" once listening, and "upgraded PATH
ORIGIN" for every handshake it completes.
"""
import asyncio
import logging
import sys

import websockets

# Clients that vanish without a close frame are expected here.
logging.getLogger("websockets").setLevel(logging.CRITICAL)


async def echo(ws, path):
    print("upgraded", path, ws.request_headers.get("Origin"), flush=True)
    try:
        async for message in ws:
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass


async def main(port):
    # host None: every address, IPv4 and IPv6.
    async with websockets.serve(echo, None, port):
        print("ready", flush=True)
        await asyncio.Future()


asyncio.run(main(int(sys.argv[1])))
