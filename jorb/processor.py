"""The Processor: one coordinator drives every job of a run through its states.

One event loop owns the run, so nothing is locked. Each non-terminal state is a *lane* (ready
jobs, slots, workers running batches of execs); outcomes become journal records; a job's next
step starts once its record is durable (README, Design notes). The modules, one job each, and
the modules of jorb each may import (tests/test_api.py holds them to it):

- ``processor`` (the public ``Processor``; sets an exec up, owns its tasks, shuts it down, holds
  what the parts share: ``proc._run``, ``proc._lanes``...): any; no part imports it at run time.
- ``lanes`` (queues, slots, counters, workers, one attempt): model, states, errors.
- ``waiting`` (delays, fan-in joins): model, errors.
- ``commit`` (settle an outcome into a record, apply it as replay does, append it to the
  ``Store``; once durable, free the slot, queue the next step and children): outcome, model, errors.
- ``steering`` (changes from Python, any thread, and the inbox): control, model, errors.
- ``stops`` (a bug, ``sys.exit()``, Ctrl-C; what the user is told): tracebacks, states, errors.
- ``status`` (snapshots of the lanes' counters), ``gc_tuning`` (the collector, tuned): none.
- ``model`` (the run's data and records; no I/O): errors.
- Below the parts: ``checkpoint`` (files, journal, ``Store``), ``control``, ``executor``, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from . import control, gc_tuning
from .checkpoint import Store
from .commit import Commits
from .errors import ExecResultError, JorbError, RunFileError, public
from .executor import Executor, LocalExecutor
from .lanes import Lanes
from .model import Run, check_key, plain_name
from .readonly import read_only
from .states import CANCELLED, State, check_jobs, validate
from .status import Status, StatusListener, snapshot
from .steering import Steering
from .stops import Stops, say_interrupted, take_signals
from .waiting import Waiting

__all__ = ["Processor"]

logger = logging.getLogger("jorb")


class Processor:
    """Drives every job of a run through the states until all are terminal.

    ``jorb.Processor(app, states).exec(run)`` blocks and returns the run;
    ``await processor.aexec(run)`` is the same inside an event loop. ``app`` is handed to every
    exec and never written to disk.
    """

    @public
    def __init__(
        self,
        app: Any,
        states: Sequence[State],
        *,
        error_state: str = "failed",
        progress: bool = True,
        listeners: Iterable[StatusListener] = (),
        durable: bool = True,
        grace: float = 30.0,
        status_interval: float = 0.2,
        poll_interval: float = 0.25,
        executor: Executor | None = None,
        max_pending: int = 4096,
        stop_on_bug: bool = True,
        lifespan: Callable[..., AbstractAsyncContextManager[Any]] | None = None,
    ) -> None:
        #: The app context given to every exec.
        self.app = app
        error_state = plain_name(error_state)
        #: Declared states by name, in declaration order (the error state added if undeclared).
        self.states = validate(states, error_state)
        #: Where a job goes when its retries are used up and its state names no ``on_error``.
        self.error_state = error_state
        #: Whether to show live progress (rich bars on a terminal, plain lines otherwise).
        self.progress = progress
        #: Status listeners, told at start, a few times a second, and at the end.
        self.listeners = list(listeners)
        #: fsync every group commit (power-loss safe); False still survives ``kill -9``.
        self.durable = durable
        #: Seconds running execs may take to finish after Ctrl-C before they are cancelled.
        self.grace = grace
        #: Seconds between two status updates to listeners.
        self.status_interval = status_interval
        #: Seconds between two looks at the run's inbox for changes from the command line.
        self.poll_interval = poll_interval
        if type(max_pending) is not int or max_pending < 1:
            raise JorbError(f"max_pending must be an int >= 1, not {max_pending!r}")
        #: At most this many settled transitions wait for the disk at once, across the run:
        #: with the running execs, what a crash can make run again (see README, Durability).
        self.max_pending = max_pending
        #: Stop the exec at the first bug in the script (an ``ExecResultError``: an answer that
        #: cannot be right); False records it on the job, routes the job, and goes on.
        self.stop_on_bug = stop_on_bug
        #: ``() -> async context manager`` (or ``(app) -> ...``, given the app above, as
        #: Starlette's), entered on the exec's loop before the first exec and exited at the end;
        #: what it yields is the app execs get (an ``aiohttp.ClientSession``...).
        self.lifespan = lifespan
        self._executor = executor
        self._joins = any(s.join for s in self.states.values())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._steering = Steering(self)  # lives across execs: it queues changes between them
        self._reset()

    def _reset(self) -> None:
        self._run: Run | None = None
        self._store: Store | None = None
        self._order = itertools.count()
        self._lanes = Lanes(self)
        self._waiting = Waiting(self)
        self._commits = Commits(self)
        self._finished: asyncio.Future[None] | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[StatusListener] = []
        self._clock = time.monotonic
        self._offset = self._started = 0.0
        self._overall: dict[str, Any] = {}  # what execs receive: the run's, read-only
        self._stops = Stops(self)
        self._names: dict[str, str] = {}  # set when an exec starts (see _prepare)

    def __repr__(self) -> str:
        return f"<Processor states={list(self.states)} lanes={list(self._lanes.by_name.values())}>"

    # -- public entry points -----------------------------------------------------------------

    @public
    def exec(self, run: Run) -> Run:
        """Drive ``run`` until every job is terminal; Ctrl-C stops cleanly (see README)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise JorbError(
                "processor.exec(run) was called inside a running event loop (Jupyter, or an "
                "async def): use `await processor.aexec(run)` there"
            )
        try:
            asyncio.run(self.aexec(run))
        except KeyboardInterrupt:
            # (Only where aexec could not take the signal: not the main thread.)
            say_interrupted(run)
            raise SystemExit(130) from None
        except ExecResultError:
            raise SystemExit(1) from None  # aexec told the user where the bug is
        return run

    @public
    async def aexec(self, run: Run) -> Run:
        """Async twin of :meth:`exec`; cancelling it checkpoints and re-raises.

        Ctrl-C (SIGINT) or SIGTERM, when no one else handles them, stop it as gracefully as
        :meth:`exec`: running execs get ``grace`` seconds, the run is saved, one line says how
        to resume, and ``SystemExit(130)`` is raised.
        """
        self._reset()
        loop = asyncio.get_running_loop()
        answers = self._prepare(run, loop)  # (if it fails, it leaves nothing started)
        app, listeners, ticker, collector = self.app, [], None, None
        restore: Callable[[], None] = _nothing
        try:
            async with contextlib.AsyncExitStack() as stack:  # the lifespan exits after shutdown
                try:
                    self._loop = loop
                    self._overall = read_only(run.overall)
                    self._steering.start(loop)
                    self._listeners = listeners = self._all_listeners()
                    ticker = loop.create_task(self._tick()) if listeners else None
                    collector = gc_tuning.tune()
                    restore = take_signals(loop, self._stops.interrupt)
                    if self.lifespan is not None:  # execs get what it yields as their app
                        self.app = await stack.enter_async_context(_entered(self.lifespan, app))
                    for file, answer in answers:
                        control.reply(file, answer)
                    if self._joins:
                        self._waiting.index(run)
                    # Queue the jobs (nothing runs before the first await).
                    self._lanes.load(run.jobs.values(), self._now())
                    for listener in listeners:
                        listener.start(self.statistics())
                    for name in sorted(run.paused):
                        self._note(f"state {name!r} is paused (`jorb resume {run.path} {name}`)")
                    self._spawn(self._steering.watch_inbox())  # reaped: if it dies, exec says so
                    self._check_finished()
                    assert self._finished is not None
                    await self._finished
                except BaseException:
                    await self._shutdown(grace=0.0)
                    raise
                else:
                    await self._shutdown(grace=self.grace)
        finally:
            self.app = app
            restore()
            gc_tuning.restore(collector)
            if ticker is not None:
                ticker.cancel()
            status = self.statistics()
            for listener in listeners:
                listener.stop(status)
            if self.progress:
                from .progress import print_summary

                print_summary(status, self._stops.common())
            run.remember_file()
            run.close()  # no longer executing: commands may now edit the file directly
        self._stops.raise_stop(run)
        return run

    def statistics(self) -> Status:
        """A frozen snapshot of every state's counters (cheap: no scan of the jobs)."""
        transitions = self._commits.transitions
        return snapshot(self.states, self._lanes, transitions, self._started, self._loop, self._now)

    # -- steering from Python (the command line goes through the run's inbox) -----------------

    def pause(self, state: str) -> None:
        """Stop new exec starts in ``state``; applied at once if executing, else at exec start."""
        self._steering.submit("pause", {"name": plain_name(state)})

    def resume(self, state: str) -> None:
        """Let ``state`` start execs again."""
        self._steering.submit("resume", {"name": plain_name(state)})

    def redrive(self, source: str, target: str, job_ids: list[str] | None = None) -> None:
        """Move the jobs in ``source`` (or only ``job_ids``) to ``target``."""
        args = {"from": plain_name(source), "to": plain_name(target), "jobs": job_ids}
        self._steering.submit("redrive", args)

    def add_jobs(
        self,
        ctxs: list[dict[str, Any]],
        state: str = "new",
        *,
        priority: int = 0,
        delay: float | None = None,
        key: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        """Add jobs to the run being executed (from any thread).

        ``key(ctx)`` gives each job's key: a ctx whose key a job of the run has is not added.
        """
        args: dict[str, Any] = {"ctxs": ctxs, "state": plain_name(state)}
        if key is not None:
            args["keys"] = [check_key(key(ctx)) for ctx in ctxs]
        if priority:
            args["priority"] = priority
        if delay is not None:
            args["delay"] = delay
        self._steering.submit("add", args)

    def cancel(
        self, job_ids: list[str] | None = None, *, state: str | None = None, to: str = CANCELLED
    ) -> None:
        """Move jobs (``job_ids``, or all in ``state``) to the terminal state ``to``,
        cancelling their execs if they run (what ``jorb cancel`` does)."""
        args = {"jobs": job_ids, "state": plain_name(state), "to": plain_name(to)}
        self._steering.submit("cancel", args)

    # -- setup -----------------------------------------------------------------------------------

    def _prepare(
        self, run: Run, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[Any, dict[str, Any]]]:
        """Apply waiting changes, check the run against the declarations, take its lock and
        write the first checkpoint. Returns the answers owed to waiting commands."""
        if run.path is None:
            raise RunFileError("the run has no path; create it with jorb.Run.open(path)")
        store = run._holder
        if store is None:
            store = Store(run.path, durable=self.durable)
            try:
                run.check_file()
            except JorbError:
                store.close()
                raise
            run._holder = store
        store.durable = self.durable
        run.path = store.path  # the real file (a Run made by name may name a symlink)
        run.declared = [{"name": s.name, "terminal": s.terminal} for s in self.states.values()]
        answers = self._steering.apply_waiting(run)
        check_jobs(run, self.states)
        if self._joins:
            self._waiting.check_parents(run)
        # (Pools start here, before any job: one that cannot start stops the exec now.)
        self._executor = self._executor or LocalExecutor(self.states.values())
        self._run, self._store = run, store
        store.on_edit = self._steering.edit_kept
        try:
            store.begin(run)  # every added job, change and the declarations reach disk here
        except BaseException:
            executor = self._executor
            executor.close()  # (its pools' workers: nothing else would end them now)
            self._executor = None if isinstance(executor, LocalExecutor) else executor
            raise
        store.prepare = self._commits.prepare  # plain successes go out as one record per flush
        self._finished = loop.create_future()
        # The loop's clock, so a fake loop clock fakes history times too (read directly when
        # it is the usual one: it is read twice per transition).
        base_time = type(loop).time is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if base_time else loop.time
        self._offset = time.time() - self._clock()
        self._started = time.monotonic()
        # Each state's name, interned, by any str equal to it: what a job's state is set to
        # (a plain str, also for a name declared as a str subclass: a str enum's member).
        self._names = {name: sys.intern(name) for name in self.states}
        self._lanes.open(self.states, run.paused, self.max_pending)
        return answers

    def _all_listeners(self) -> list[StatusListener]:
        listeners = list(self.listeners)
        if self.progress:
            from .progress import make_progress  # the only place rich is imported

            listeners.append(make_progress())
        return listeners

    def _note(self, message: str) -> None:
        """Tell the user something: through the listeners, or the "jorb" logger if none."""
        if not self._listeners:
            logger.warning("jorb: %s", message)
        for listener in self._listeners:
            listener.note(message)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            status = self.statistics()
            for listener in self._listeners:
                listener.update(status)

    # -- helpers the parts share ------------------------------------------------------------

    def _now(self) -> float:
        """Unix time, read from the event loop's clock (so a fake loop clock fakes it too)."""
        return self._clock() + self._offset

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        """A task ended: a failure (a checkpoint error, a bug) stops the whole exec."""
        self._tasks.discard(task)
        if task.cancelled():
            if self._stopping:
                return
            failure: BaseException = JorbError(f"a jorb task was cancelled unexpectedly: {task}")
        else:
            exception = task.exception()
            if exception is None:
                return
            failure = exception
        if self._finished is not None and not self._finished.done():
            self._finished.set_exception(failure)

    def _check_finished(self) -> None:
        finished = self._finished
        if finished is None or finished.done() or self._lanes.active or self._steering.in_transit:
            return
        finished.set_result(None)

    def _ending(self) -> bool:
        """Whether the exec's end is decided (every job terminal, a signal, or a failure): a
        change applied now could leave a job open, so changes wait for the next exec."""
        return self._finished is None or self._finished.done()

    # -- stopping ------------------------------------------------------------------------------

    async def _shutdown(self, grace: float) -> None:
        """Stop starting execs, let running ones finish (up to ``grace``), fold the journal in."""
        self._stopping = True
        self._steering.stop()  # steering calls from now on wait for the next exec
        self._waiting.stop()
        self._lanes.unpark_all()
        # Tasks not inside an exec are only waiting (for a rate, a slot, the disk): cancel now.
        in_exec = self._lanes.in_exec
        for task in list(self._tasks):
            if task not in in_exec:
                task.cancel()
        if isinstance(self._executor, LocalExecutor):
            self._executor.stop_waiting()  # (calls waiting for an abandoned exec's slot)
        if in_exec and grace > 0:
            await asyncio.wait(set(in_exec), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        store, executor = self._store, self._executor
        if executor is not None:
            executor.close()
            self._executor = None if isinstance(executor, LocalExecutor) else executor
        if store is not None:
            with contextlib.suppress(JorbError):
                await store.drain()
            store.prepare = None
            store.finish()
            if store.failure is not None:
                raise store.failure


def _entered(
    lifespan: Callable[..., AbstractAsyncContextManager[Any]], app: Any
) -> AbstractAsyncContextManager[Any]:
    """``lifespan(app)`` if it takes an argument (Starlette's convention), else ``lifespan()``."""
    try:
        inspect.signature(lifespan).bind(app)
    except (TypeError, ValueError):  # (ValueError: no signature to read)
        return lifespan()
    return lifespan(app)


def _nothing() -> None:
    pass
