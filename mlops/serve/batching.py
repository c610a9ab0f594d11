"""Dynamic micro-batching: concurrent single-image requests share one ONNX Runtime call."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mlops.serve.inference import OnnxClassifier


class MicroBatcher:
    """Collects concurrent single-image requests into one model call.

    One worker thread runs the model; while it runs, new requests queue and go in the next batch,
    so batches grow with load. `max_wait_s` optionally waits for company when the queue is empty.
    """

    def __init__(self, model: OnnxClassifier, max_size: int, max_wait_s: float, on_batch=None):
        self.model, self.max_size, self.max_wait_s, self.on_batch = model, max_size, max_wait_s, on_batch
        self.queue: asyncio.Queue | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start on the running event loop (an app may be served by more than one, in turn)."""
        self.queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        if self.executor:
            self.executor.shutdown(wait=False)

    async def predict(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, embedding projection or None) of one image."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((array, future))
        return await future

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(items) < self.max_size:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            try:  # nothing may end this loop: every later request would wait for ever
                batch = np.stack([array for array, _ in items])
                logits, projection = await loop.run_in_executor(self.executor, self.model.run, batch)
            except Exception as error:  # noqa: BLE001 - every waiting request gets the error
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            if self.on_batch:
                self.on_batch(len(items))
            for index, (_, future) in enumerate(items):
                if not future.done():
                    future.set_result((logits[index], None if projection is None else projection[index]))
