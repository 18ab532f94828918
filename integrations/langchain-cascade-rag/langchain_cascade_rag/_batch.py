"""One engine batch per LangChain `batch` call of a chat model.

`BaseChatModel.generate` runs its prompts one after another, and `Runnable.batch` runs
`invoke` in a thread pool, so neither hands the engine its inputs together. `gated_batch`
runs every input's `invoke` in its own thread (callbacks, LangChain's cache, retries and
output formatting stay LangChain's) with a `BatchGate` in the thread's context. The model's
`_generate` parks its request at the gate; once every input has either parked or finished
without reaching the engine (a cache hit, a streamed call, an early error), all parked
requests go to the engine as one `CascadeEngine.generate` call.

It does not batch async calls: concurrent `agenerate` calls already share the engine's
running batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ContextThreadPoolExecutor


class BatchGate:
    """Collects the engine requests of `size` concurrent invokes into one engine call.

    Args:
        engine: the `CascadeEngine` all requests run on.
        size: the number of inputs; each must end in `generate` or `release` exactly once
            (a second `generate` for the same input runs on its own).
    """

    def __init__(self, engine, size: int) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._unresolved = set(range(size))
        self._parked: dict[int, tuple[Any, Any]] = {}
        self._results: dict[int, Any] = {}

    def generate(self, index: int, prompt, sampling):
        """Run input `index`'s request in the shared batch and return its `GenerationOutput`."""
        with self._cond:
            if index not in self._unresolved:
                batch = None
                solo = True
            else:
                solo = False
                self._unresolved.discard(index)
                self._parked[index] = (prompt, sampling)
                batch = self._take_if_complete()
        if solo:
            return self.engine.generate(prompt, sampling)
        if batch is not None:
            self._run(batch)
        with self._cond:
            while index not in self._results:
                self._cond.wait()
            result = self._results.pop(index)
        if isinstance(result, BaseException):
            raise result
        return result

    def release(self, index: int) -> None:
        """Input `index` will not park a request (streamed, cached, failed or finished)."""
        with self._cond:
            if index not in self._unresolved:
                return
            self._unresolved.discard(index)
            batch = self._take_if_complete()
        if batch is not None:
            self._run(batch)

    def _take_if_complete(self) -> dict[int, tuple[Any, Any]] | None:
        # caller holds self._cond
        if self._unresolved or not self._parked:
            return None
        batch, self._parked = self._parked, {}
        return batch

    def _run(self, batch: dict[int, tuple[Any, Any]]) -> None:
        indices = list(batch)
        results: dict[int, Any]
        try:
            outputs = self.engine.generate(
                [batch[i][0] for i in indices], [batch[i][1] for i in indices]
            )
            results = dict(zip(indices, outputs))
        except Exception:  # noqa: BLE001 - one bad request fails the whole call: retry alone
            results = {}
            for i in indices:
                try:
                    results[i] = self.engine.generate(*batch[i])
                except Exception as exc:  # noqa: BLE001 - delivered to that input's caller
                    results[i] = exc
        except BaseException as exc:  # noqa: BLE001 - every parked caller must wake up
            results = dict.fromkeys(indices, exc)
        with self._cond:
            self._results.update(results)
            self._cond.notify_all()


@dataclass(frozen=True)
class _Slot:
    gate: BatchGate
    index: int


_SLOT: ContextVar[_Slot | None] = ContextVar("langchain_cascade_rag_batch_slot", default=None)


def generate(engine, prompt, sampling):
    """`engine.generate(prompt, sampling)`, through the batch gate when inside `gated_batch`."""
    slot = _SLOT.get()
    if slot is None or slot.gate.engine is not engine:
        return engine.generate(prompt, sampling)
    return slot.gate.generate(slot.index, prompt, sampling)


def release(engine) -> None:
    """The current input will not park a request at the gate (e.g. it streams instead)."""
    slot = _SLOT.get()
    if slot is not None and slot.gate.engine is engine:
        slot.gate.release(slot.index)


def gated_batch(
    invoke: Callable[..., Any],
    engine,
    inputs: Sequence[Any],
    configs: Sequence[RunnableConfig],
    *,
    return_exceptions: bool,
    kwargs: dict[str, Any],
) -> list[Any]:
    """`Runnable.batch` with the engine requests of each group of inputs sent together.

    Groups hold up to `max_concurrency` (from the first config) and the engine's
    `max_num_seqs` inputs, each group one `engine.generate` call.
    """
    limit = configs[0].get("max_concurrency") or len(inputs)
    group = max(1, min(limit, engine.config.max_num_seqs))
    outputs: list[Any] = []
    for start in range(0, len(inputs), group):
        stop = start + group
        outputs += _run_group(
            invoke, engine, inputs[start:stop], configs[start:stop], return_exceptions, kwargs
        )
    return outputs


def _run_group(invoke, engine, inputs, configs, return_exceptions, kwargs) -> list[Any]:
    gate = BatchGate(engine, len(inputs))

    def run_one(index: int) -> Any:
        _SLOT.set(_Slot(gate, index))  # in this thread's copy of the caller's context
        try:
            return invoke(inputs[index], configs[index], **kwargs)
        except Exception as exc:
            if return_exceptions:
                return exc
            raise
        finally:
            gate.release(index)

    with ContextThreadPoolExecutor(max_workers=len(inputs)) as executor:
        futures = [executor.submit(run_one, i) for i in range(len(inputs))]
        return [f.result() for f in futures]
