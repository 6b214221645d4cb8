"""``DaskPool``: a state's execs on a Dask distributed cluster (``pip install 'jorb[dask]'``).

``import jorb`` never imports this module (nor dask); ``import jorb.dask`` does. The pool
talks to the cluster through a ``distributed.Client`` running on its own thread and loop;
exec attempts travel as Dask tasks, several to a task when they queue up. Execs and the app
factory travel once, in a ``WorkerPlugin``, by ``cloudpickle`` (a function defined in the
script itself goes by value, so workers never import the script); each Dask worker builds its
app once, in that plugin, and its execs receive that.

A Dask worker that dies mid-task makes the task fail with ``KilledWorker``, which jorb records
as :class:`~jorb.WorkerLost` for each attempt the task carried, once the scheduler has given
up rescheduling it elsewhere: after ``distributed.scheduler.allowed-failures`` deaths (3 by
default; the local cluster jorb starts sets 0, so each death is one failed attempt that jorb
retries or routes). A timeout abandons the attempt (Dask cannot stop a running task): it runs
on, its result is ignored.

``python -m jorb.dask`` starts the local cluster ``DaskPool()`` uses: a scheduler and one
single-threaded worker process per core on 127.0.0.1. It prints the scheduler's address and
runs until its standard input closes (the script that started it ended, even by ``kill -9``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import os
import pickle
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

try:
    import distributed
    from distributed.diagnostics.plugin import WorkerPlugin
    from distributed.protocol import pickle as dask_pickle
except ImportError as e:  # pragma: no cover - the extra is installed wherever tests run
    raise ImportError(f"jorb.dask needs Dask: pip install 'jorb[dask]' ({e})") from e

from .errors import ExecResultError, JorbError, StateError, TimedOut, WorkerLost
from .forkserver import flatten, rebuild
from .pool import hold_clock

if TYPE_CHECKING:
    from .states import State

__all__ = ["DaskPool"]

#: Environment of the local cluster: a worker that dies fails its task at once (jorb retries).
_LOCAL_ENV = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
#: The most attempts one task carries.
_MOST = 64
#: Seconds the first attempt to queue waits for others to go in the same task.
_GATHER = 0.002


class DaskPool:
    """A state's execs as tasks on a Dask cluster: ``State("fit", exec=fit, pool=pool)``.

    ``jorb.dask.DaskPool("tcp://scheduler:8786", app=make_app)``, a ``distributed.Client``,
    or ``DaskPool()`` for a local cluster on this machine (one worker process per core,
    started with the exec and ended with it). ``app`` is a zero-argument callable (plain or
    ``async def``) run once on each Dask worker; what it returns is the ``app`` the execs
    there receive. Workers need jorb installed (``pip install 'jorb[dask]'``).

    A Dask task costs far more than a millisecond exec, so the pool keeps a task per worker
    thread in flight and sends the attempts that wait meanwhile together, as tasks that run
    several one after the other; with enough waiting for a full task (64), a second per thread,
    so a worker that ends one has the next at hand. Give its states a ``concurrency`` well
    above the cluster's thread count (32 to 64 times; 128 times for millisecond execs) so there
    is something to send.
    """

    __slots__ = (
        "_client",
        "_in_flight",
        "_limit",
        "_local",
        "_loop",
        "_owned",
        "_plugin",
        "_queue",
        "_remote",
        "app",
        "cluster",
    )

    def __init__(self, cluster: str | distributed.Client | None = None, *, app: Any = None) -> None:
        if cluster is not None and not isinstance(cluster, str | distributed.Client):
            raise StateError(
                f"DaskPool(cluster={cluster!r}): give a scheduler address "
                f"('tcp://host:8786'), a distributed.Client, or None for a local cluster"
            )
        if app is not None and not callable(app):
            raise StateError(
                f"DaskPool(app={app!r}): app must be a zero-argument callable that returns "
                f"the app, run once on each worker (pass the factory, not what it makes)"
            )
        #: The scheduler's address, a Client, or None (a local cluster per exec).
        self.cluster = cluster
        #: The factory each Dask worker calls once to make the ``app`` its execs receive.
        self.app: Callable[[], Any] | None = app
        self._client: distributed.Client | None = None
        self._owned = False  # whether we made the client (and close it)
        self._local: subprocess.Popen[str] | None = None  # the local cluster we started
        self._remote: asyncio.AbstractEventLoop | None = None  # the client's loop
        self._loop: asyncio.AbstractEventLoop | None = None  # the processor's
        self._plugin = ""
        self._queue: deque[_Attempt] = deque()  # waiting to be sent
        self._in_flight = 0  # tasks sent, not back
        self._limit = 1  # worker threads: a task in flight for each (two, if full)

    def __repr__(self) -> str:
        if self._client is None:
            return f"<DaskPool {self.cluster or 'local'} (not started)>"
        where = self._client.scheduler_info().get("address")
        return f"<DaskPool {where} tasks={self._in_flight}/{self._limit} queued={len(self._queue)}>"

    def start(self, states: Sequence[State]) -> None:
        """Connect (starting a local cluster if need be) and set up each worker's app.

        Raises :class:`~jorb.JorbError` before any job if an exec or the factory cannot be
        sent to workers, the scheduler cannot be reached, or the factory fails on a worker.
        """
        if self._client is not None:
            raise JorbError(f"{self!r} is already in use by another exec; give each its own pool")
        self._loop = asyncio.get_running_loop()
        self._in_flight = 0
        self._plugin = f"jorb-{uuid.uuid4().hex}"
        plugin = _Plugin(self.app, {s.name: (s.exec, s.is_async) for s in states})
        _check_sendable(plugin)
        try:
            self._connect()
            assert self._client is not None
            answers = self._client.register_plugin(plugin, name=self._plugin)
            failed = [
                str(answer.get("exception") or answer)
                for answer in (answers or {}).values()
                if isinstance(answer, dict) and answer.get("status") != "OK"
            ]
            if failed:
                raise JorbError(f"the DaskPool's app factory failed on a worker: {failed[0]}")
            self._limit = max(1, sum(self._client.nthreads().values()))
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        cluster = self.cluster
        if isinstance(cluster, distributed.Client):
            self._client, self._owned = cluster, False
        else:
            address = cluster if cluster is not None else self._start_local()
            try:
                self._client = distributed.Client(address, set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise JorbError(
                    f"DaskPool: cannot reach the Dask scheduler at {address} ({e}); "
                    f"is it running, and is the address right?"
                ) from None
            self._owned = True
        loop = self._client.loop
        assert loop is not None
        self._remote = loop.asyncio_loop  # type: ignore[attr-defined]

    def _start_local(self) -> str:
        self._local = subprocess.Popen(
            [sys.executable, "-m", "jorb.dask", str(os.cpu_count() or 1)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **_LOCAL_ENV},
        )
        assert self._local.stdout is not None
        address = self._local.stdout.readline().strip()
        if not address.startswith("tcp://"):
            self._stop_local()
            raise JorbError("DaskPool: the local Dask cluster did not start (see its output)")
        return address

    async def call(self, state: State, args: tuple[Any, ...]) -> Any:
        """Run one attempt on the cluster; ``args[0]`` (the processor's app) stays here.

        A timeout counts from here (the wait for a worker included) and abandons the attempt.
        """
        loop = self._loop
        assert loop is not None, "the pool is not started"
        attempt = _Attempt(state.name, args[1:], loop.create_future())
        self._queue.append(attempt)
        hold_clock(loop, +1)
        if len(self._queue) == 1:  # the first to wait: send it in a moment, with the others
            loop.call_later(_GATHER, self._send)  # that come in the meantime
        try:
            if state.timeout is None:
                return await attempt.future
            done, _ = await asyncio.wait((attempt.future,), timeout=state.timeout)
            if not done:
                attempt.future.cancel()
                raise TimedOut(f"timed out after {state.timeout:g}s (its Dask task was abandoned)")
            return attempt.future.result()
        except asyncio.CancelledError:
            attempt.future.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(attempt)
            raise
        finally:
            hold_clock(loop, -1)

    def _send(self) -> None:
        """Send what waits, as tasks of several attempts: shared among the threads without a
        task, or as full tasks, up to a second one per thread.

        A Dask task costs milliseconds of CPU (client, scheduler, worker), so a second task per
        thread, to spare a worker the round trip to the next, is worth it only if it is full:
        split small, the tasks cost more than the round trips they spare.
        """
        remote = self._remote
        assert remote is not None
        while self._queue:
            idle = self._limit - self._in_flight
            if idle > 0:
                share = -(-len(self._queue) // idle)  # (rounded up)
            elif self._in_flight < 2 * self._limit and len(self._queue) >= _MOST:
                share = _MOST
            else:
                return
            batch = [self._queue.popleft() for _ in range(min(share, _MOST))]
            self._in_flight += 1
            # One bytes object: Dask passes it through as it is (a list of attempts it would walk
            # on the client and the scheduler, looking for keys in it).
            items = pickle.dumps([(a.state, a.args) for a in batch], pickle.HIGHEST_PROTOCOL)
            sent = asyncio.run_coroutine_threadsafe(self._run(items), remote)
            sent.add_done_callback(functools.partial(self._back, batch))

    async def _run(self, items: bytes) -> bytes:
        """On the client's loop: one task for ``items`` (pickled), and its answers (pickled)."""
        client = self._client
        assert client is not None
        future = client.submit(_run_batch, self._plugin, items, pure=False)
        try:
            answers: bytes = await client.gather(future, asynchronous=True)
            return answers
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _back(self, batch: list[_Attempt], sent: concurrent.futures.Future[bytes]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._landed, batch, sent)

    def _landed(self, batch: list[_Attempt], sent: concurrent.futures.Future[bytes]) -> None:
        """A task is back: settle each attempt it carried, send what waits."""
        self._in_flight -= 1
        try:
            answers = pickle.loads(sent.result())
        except BaseException as e:
            for attempt in batch:
                if not attempt.future.done():
                    attempt.future.set_exception(_lost(e))  # (one error object each)
        else:
            for attempt, (kind, value) in zip(batch, answers, strict=True):
                if attempt.future.done():
                    continue
                if kind == "ok":
                    attempt.future.set_result(pickle.loads(value))
                else:
                    attempt.future.set_exception(rebuild(value))
        if self._client is not None:
            self._send()

    def close(self) -> None:
        """Remove the app from the workers and disconnect; end the local cluster if ours."""
        client, self._client = self._client, None
        for attempt in self._queue:
            attempt.future.cancel()
        self._queue.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(self._plugin)
            if self._owned:
                with contextlib.suppress(Exception):
                    client.close()
        self._stop_local()
        self._remote = None
        self._in_flight = 0

    def _stop_local(self) -> None:
        local, self._local = self._local, None
        if local is not None:
            assert local.stdin is not None and local.stdout is not None
            local.stdin.close()  # it closes the cluster and exits
            try:
                local.wait(30)
            except subprocess.TimeoutExpired:
                local.kill()
                local.wait()
            local.stdout.close()


class _Attempt:
    """One exec attempt handed to the pool."""

    __slots__ = ("args", "future", "state")

    def __init__(self, state: str, args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.state = state
        self.args = args
        self.future = future


def _lost(error: BaseException) -> Exception:
    """What a task that failed as a whole means for each attempt it carried."""
    if type(error).__name__ == "KilledWorker":  # (distributed has moved it between modules)
        return WorkerLost(f"the Dask worker running it died ({error})")
    if isinstance(error, concurrent.futures.CancelledError | asyncio.CancelledError):
        return WorkerLost("its Dask task was cancelled")
    return WorkerLost(f"its Dask task failed: {type(error).__name__}: {error}")


class _Plugin(WorkerPlugin):
    """On each worker (and each that joins later): the execs, and the app, made once."""

    def __init__(self, factory: Callable[[], Any] | None, execs: dict[str, Any]) -> None:
        self.factory = factory
        self.execs = execs
        self.app: Any = None

    async def setup(self, worker: distributed.Worker) -> None:
        app = self.factory() if self.factory is not None else None
        if inspect.isawaitable(app):  # an async factory runs on the worker's loop
            app = await app
        self.app = app


def _run_batch(plugin: str, items: bytes) -> bytes:
    """The Dask task: run each attempt in turn; each answer pickled, or the error flattened.

    ``items`` is a pickled list of ``(state, args)``; the answers go back as one pickle too.
    """
    worker = distributed.get_worker()
    setup: _Plugin = worker.plugins[plugin]  # type: ignore[assignment]
    answers: list[tuple[str, Any]] = []
    for state, args in pickle.loads(items):
        fn, is_async = setup.execs[state]
        try:
            if is_async:  # (on the worker's own event loop, where an async factory made the app)
                loop = worker.loop.asyncio_loop  # type: ignore[attr-defined]
                result = asyncio.run_coroutine_threadsafe(fn(setup.app, *args), loop).result()
            else:
                result = fn(setup.app, *args)
            try:
                answers.append(("ok", pickle.dumps(result, pickle.HIGHEST_PROTOCOL)))
            except Exception as e:
                raise ExecResultError(
                    f"the exec's answer cannot be sent back from its Dask worker ({e}); "
                    f"return plain data: (ctx, next_state[, kicks])"
                ) from None
        except BaseException as e:
            answers.append(("error", flatten(e)))
    return pickle.dumps(answers, pickle.HIGHEST_PROTOCOL)


def _check_sendable(plugin: _Plugin) -> None:
    """Refuse, naming the state, what cannot be pickled to go to the workers."""
    problems = []
    for name, (fn, _) in plugin.execs.items():
        try:
            dask_pickle.dumps(fn)
        except Exception as e:
            problems.append(f"state {name!r}: its exec cannot be sent to Dask workers ({e})")
    if plugin.factory is not None:
        try:
            dask_pickle.dumps(plugin.factory)
        except Exception as e:
            problems.append(f"the DaskPool's app factory cannot be sent to Dask workers ({e})")
    if problems:
        raise StateError(
            "; ".join(problems) + ". An exec must not hold live objects (sockets, clients, "
            "locks): make those in the pool's app factory, which runs on each worker"
        )


def _serve_local_cluster(workers: int) -> None:
    """``python -m jorb.dask N``: a local cluster until standard input closes."""
    import dask

    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
    ):
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    _serve_local_cluster(int(sys.argv[1]))
