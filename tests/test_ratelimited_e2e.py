"""End to end: jobs call an API with a hidden quota, and the adaptive Rate finds it.

The API is an in-process object on jorb.testing's virtual clock. It accepts at most ``quota``
requests in any sliding window of one second and answers the rest ``429`` with a
``Retry-After`` header; it keeps a log of every request (virtual time, status) that the client
never sees. The jobs' Rate is set well above the quota (50 per second against 20), so only the
AIMD cuts, the Retry-After pauses and the climb back bring the request rate under it.

Measured (seed 1, 10 workers, quota 20/s, 300 calls): 9 of 309 requests got a 429 (2.9%; 11 of
311 with two states sharing the Rate, 3.5%), one burst of them while the first 50/s meets the
quota, then about one every three seconds as the Rate probes above it. Over the second half of
the run: 15.0 requests per second, every status counted, below the quota of 20 and above half
of it. The assertions leave room: fewer than 10% 429s, a second-half rate between 50% and 100%
of the quota.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any

import pytest
from conftest import DONE, MakeRun, process_fake_clock

import jorb

Ctx = dict[str, Any]


class QuotaAPI:
    """An API that accepts ``quota`` requests per sliding ``window`` seconds, then says 429.

    ``await api.post(payload) -> (status, headers, body)``. Latency is random (seeded), around
    ``latency`` seconds for an answer, a fifth of it for a 429.
    """

    def __init__(self, quota: int, *, window: float = 1.0, latency: float = 0.05, seed: int = 1):
        self.quota = quota
        self.window = window
        self.latency = latency
        self.rng = random.Random(seed)
        #: Every request, as the API saw it: (virtual time, status).
        self.log: list[tuple[float, int]] = []
        self._accepted: deque[float] = deque()

    async def post(self, payload: Ctx) -> tuple[int, dict[str, str], Ctx]:
        now = asyncio.get_running_loop().time()
        while self._accepted and self._accepted[0] <= now - self.window:
            self._accepted.popleft()
        if len(self._accepted) >= self.quota:
            self.log.append((now, 429))
            await asyncio.sleep(self.latency / 5)
            wait = self._accepted[0] + self.window - now  # when the window has room again
            return 429, {"Retry-After": f"{wait:.3f}"}, {"error": "too many requests"}
        self._accepted.append(now)
        self.log.append((now, 200))
        await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.latency)
        return 200, {}, {"echo": payload["n"]}

    def times(self, status: int | None = None) -> list[float]:
        return [t for t, s in self.log if status is None or s == status]


async def call(api: QuotaAPI, overall: Ctx, ctx: Ctx) -> Any:
    """The exec a user writes: a 429 becomes jorb.RateLimited with the server's Retry-After."""
    status, headers, body = await api.post(ctx)
    if status == 429:
        raise jorb.RateLimited(retry_after=float(headers["Retry-After"]))
    ctx.setdefault("answers", []).append(body["echo"])
    then = ctx["then"]
    ctx["then"] = "done"  # fetch hands over to store (when shared), store to done
    return ctx, then


QUOTA = 20


@pytest.mark.parametrize("shared", [False, True], ids=["one-state", "two-states-one-rate"])
def test_the_rate_converges_under_a_hidden_quota(make_run: MakeRun, shared: bool) -> None:
    api = QuotaAPI(QUOTA)
    rate = jorb.Rate(50, per=1.0)  # the ceiling: 2.5 times what the API really allows
    states = [
        jorb.State("fetch", exec=call, concurrency=10, rate=rate),
        jorb.State("store", exec=call, concurrency=10, rate=rate),
        DONE,
    ]
    # 300 requests either way: 300 jobs calling once, or 150 jobs calling in two states.
    jobs = 150 if shared else 300
    run = make_run([{"n": i, "then": "store" if shared else "done"} for i in range(jobs)], "fetch")

    process_fake_clock(states, run, api, durable=False)

    # The run finished, and every job is done with every answer it asked for.
    assert run.counts() == {"done": jobs}
    assert not any(job.state == "failed" for job in run.jobs.values())
    calls = 2 if shared else 1
    for job in run.jobs.values():
        assert job.ctx["answers"] == [job.ctx["n"]] * calls
    accepted, limited, everything = api.times(200), api.times(429), api.times()
    assert len(accepted) == 300  # each call answered once: a 429 is retried, nothing repeats

    # A small fraction of the requests were turned away...
    share = len(limited) / len(everything)
    assert share < 0.10, f"{len(limited)} of {len(everything)} requests got a 429"
    # ...and each one is on its job, marked as a rate limit, with no retries used up.
    records = [r for job in run.jobs.values() for rs in job.errors.values() for r in rs]
    assert len(records) == len(limited)
    assert all(r["rate_limited"] for r in records)

    # Over the second half of the run the request rate (429s included) sits under the quota,
    # and not far under it: the Rate climbs back after each cut.
    end = everything[-1]
    late = [t for t in everything if t >= end / 2]
    late_rate = len(late) / (end / 2)
    assert 0.5 * QUOTA < late_rate < QUOTA, f"{late_rate:.1f} requests/s late in the run"
    # 429s late in the run are rare: the probing above the quota, about one every few seconds.
    late_limited = [t for t in limited if t >= end / 2]
    assert len(late_limited) <= (end / 2) / 2
    assert rate.floor <= rate.current < rate.n  # it adapted, and stayed within its bounds


def test_without_retry_after_the_cuts_alone_converge(make_run: MakeRun) -> None:
    # Some APIs answer 429 without saying how long to wait: the AIMD cuts have to do it all.
    class Silent(QuotaAPI):
        async def post(self, payload: Ctx) -> tuple[int, dict[str, str], Ctx]:
            status, _, body = await super().post(payload)
            return status, {}, body

    async def call_silent(api: QuotaAPI, overall: Ctx, ctx: Ctx) -> Any:
        status, _, body = await api.post(ctx)
        if status == 429:
            raise jorb.RateLimited()
        ctx["answer"] = body["echo"]
        return ctx, "done"

    api = Silent(QUOTA)
    states = [
        jorb.State("fetch", exec=call_silent, concurrency=10, rate=jorb.Rate(50, per=1.0)),
        DONE,
    ]
    run = make_run([{"n": i} for i in range(300)], "fetch")

    process_fake_clock(states, run, api, durable=False)

    assert run.counts() == {"done": 300}
    everything, limited = api.times(), api.times(429)
    end = everything[-1]
    late = [t for t in everything if t >= end / 2]
    late_limited = [t for t in limited if t >= end / 2]
    late_rate = len(late) / (end / 2)
    assert 0.5 * QUOTA < late_rate < QUOTA, f"{late_rate:.1f} requests/s late in the run"
    # Measured: 61 of 361 requests got a 429 (17%), 50 of them in the first second: at 25/s
    # after the first cut (one per interval) nearly every request meets a full window. Once
    # converged, 429s are rare: 3 of the ~140 requests in the second half (2%).
    assert len(limited) / len(everything) < 0.20, f"{len(limited)} of {len(everything)}"
    assert len(late_limited) / len(late) < 0.05, f"{len(late_limited)} of {len(late)} late"
