"""Loopback HTTP servers that misbehave below what ``aiohttp.web`` lets the test node do.

- ``drip``: reads the request, sends ``200`` headers promising a 64 KiB JSON body, then one
  byte every ``drip_interval_s`` for as long as the client listens (a slow-loris answer:
  only the SLA's total timeout stops it);
- ``reset``: reads the request and closes with ``SO_LINGER`` 0, i.e. a TCP RST instead of
  an answer (the test node's ``disconnect`` fault closes politely).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from concurrent.futures import Future
from typing import Literal

HostileMode = Literal["drip", "reset"]

_DRIP_HEADERS = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 65536\r\n\r\n")


class HostileNode:
    __test__ = False  # not a pytest test class

    def __init__(self, mode: HostileMode, drip_interval_s: float = 0.25) -> None:
        self.mode = mode
        self.drip_interval_s = drip_interval_s
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _read_request(self, reader: asyncio.StreamReader) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return False
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readexactly(length)
        self.requests += 1
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not await self._read_request(reader):
                return
            if self.mode == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(_DRIP_HEADERS + b'{"choices":[{"text":"')
            await writer.drain()
            while True:  # until the client gives up and the write fails
                await asyncio.sleep(self.drip_interval_s)
                writer.write(b"x")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def start_in_thread(self) -> str:
        """Serve on a free loopback port from a daemon thread; returns the base URL."""
        ready: Future[int] = Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            ready.set_result(int(server.sockets[0].getsockname()[1]))
            loop.run_forever()
            server.close()
            handlers = asyncio.all_tasks(loop)  # drips still writing to their clients
            for task in handlers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*handlers, return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"hostile-{self.mode}", daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{ready.result(timeout=30)}"

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
