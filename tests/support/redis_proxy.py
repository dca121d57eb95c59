"""A TCP proxy to the real Redis whose replies can be slowed: a store that answers
later than its clients wait (tests of what a timeout leaves behind)."""

from __future__ import annotations

import asyncio


class SlowReplies:
    """A TCP proxy to the real Redis whose replies (not requests) wait ``delay_s``."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> SlowReplies:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", 6379)
        asyncio.ensure_future(self._pipe(reader, upstream_writer, delayed=False))
        asyncio.ensure_future(self._pipe(upstream_reader, writer, delayed=True))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delayed and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
