"""Push a batch of prompts through a rate-limited API, and let jorb find the API's real limit.

The "API" is in-process and fake: it answers after ~20 ms, fails now and then with a 503, and
enforces a quota it does not document. Above it, it answers ``429 Too Many Requests`` with a
``Retry-After`` header. The exec turns a 429 into ``jorb.RateLimited(retry_after=...)``; jorb
then pauses every state sharing the Rate for that long, halves the Rate, and climbs back step
by step on successes (AIMD). A rate-limited attempt is retried without using up ``retries``.

Usage::

    .venv/bin/python examples/api_batch.py                 # writes runs/api_batch.json
    .venv/bin/python examples/api_batch.py --prompts 500 --quota 80 --fresh

At the end it prints the request rate it observed against the hidden quota, and the share of
requests that got a 429.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jorb

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ROOT / "runs" / "api_batch.json"

Ctx = dict[str, Any]


# -- the fake API ----------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)


class FakeCompletionsAPI:
    """A completions endpoint with a hidden quota of ``quota`` requests/s (a burst of ``burst``).

    It keeps the numbers a client never sees: every request's arrival time and status.
    """

    def __init__(self, quota: float, burst: int, seed: int) -> None:
        self.quota = quota
        self.burst = burst
        self.rng = random.Random(seed)
        self.arrivals: list[float] = []
        self.statuses: list[int] = []
        self._tokens = float(burst)
        self._refilled: float | None = None

    async def post(self, path: str, payload: dict[str, Any]) -> Response:
        now = asyncio.get_running_loop().time()
        self.arrivals.append(now)
        response = await self._answer(now, payload)
        self.statuses.append(response.status)
        return response

    async def _answer(self, now: float, payload: dict[str, Any]) -> Response:
        if self._refilled is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.quota)
        self._refilled = now
        if self._tokens < 1:
            wait = (1 - self._tokens) / self.quota
            await asyncio.sleep(0.001)
            return Response(429, {"Retry-After": f"{wait:.3f}"}, {"error": "rate limited"})
        self._tokens -= 1
        await asyncio.sleep(self.rng.uniform(0.01, 0.03))
        if self.rng.random() < 0.02:
            return Response(503, {}, {"error": "upstream overloaded"})
        words = payload["prompt"].split()
        return Response(200, {}, {"text": " ".join(reversed(words)), "tokens": len(words)})


# -- the exec --------------------------------------------------------------------------------------


async def complete(api: FakeCompletionsAPI, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    response = await api.post(
        "/v1/completions", {"model": overall["model"], "prompt": ctx["prompt"]}
    )
    if response.status == 429:
        raise jorb.RateLimited(retry_after=float(response.headers["Retry-After"]))
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.body['error']}")
    ctx["completion"] = response.body["text"]
    ctx["tokens"] = response.body["tokens"]
    return ctx, "done"


# -- the script ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Everything the script builds before it executes (tests drive it on a fake clock)."""

    run: jorb.Run
    states: list[jorb.State]
    api: FakeCompletionsAPI
    rate: jorb.Rate


def prepare(argv: list[str] | None = None) -> Batch:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=300, help="prompts in a new run")
    parser.add_argument("--quota", type=float, default=100.0, help="the API's hidden quota, req/s")
    parser.add_argument("--seed", type=int, default=3, help="seed of the fake API")
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="the run file")
    parser.add_argument("--fresh", action="store_true", help="discard the run file; start over")
    args = parser.parse_args(argv)

    if args.fresh:
        jorb.Run.open(args.run).close()  # refuses (RunLockedError) while another process runs it
        for stale in (args.run, args.run.with_name(args.run.name + ".journal")):
            stale.unlink(missing_ok=True)
        if "--fresh" in sys.argv:  # Ctrl-C prints the command line as the way to resume
            sys.argv.remove("--fresh")
    run = jorb.Run.open(args.run, overall={"model": "fake-1"})
    if not run.jobs:
        topics = ["rivers", "compilers", "bread", "tides", "jazz", "glaciers", "ledgers", "moths"]
        for i in range(args.prompts):
            run.add_job({"prompt": f"write one line about {topics[i % len(topics)]} #{i}"})

    # We do not know the quota, so we guess high (2x): jorb halves the Rate on a 429 and
    # climbs back step by step on successes.
    api_rate = jorb.Rate(2 * args.quota, per=1.0)
    states = [
        jorb.State(
            "new",
            exec=complete,
            concurrency=16,
            rate=api_rate,
            retries=3,
            backoff=0.05,
            on_error="failed",
        ),
        jorb.State("done", terminal=True),
        jorb.State("failed", terminal=True),
    ]
    api = FakeCompletionsAPI(args.quota, burst=max(1, int(args.quota / 10)), seed=args.seed)
    return Batch(run, states, api, api_rate)


@dataclass(frozen=True)
class Observed:
    """What the API saw: requests, over how long, and how many it answered with 429."""

    requests: int
    seconds: float
    limited: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def limited_share(self) -> float:
        return self.limited / self.requests if self.requests else 0.0


def observe(api: FakeCompletionsAPI) -> Observed:
    seconds = api.arrivals[-1] - api.arrivals[0] if len(api.arrivals) > 1 else 0.0
    return Observed(len(api.arrivals), seconds, api.statuses.count(429))


def main(argv: list[str] | None = None) -> None:
    batch = prepare(argv)
    jorb.Processor(batch.api, batch.states).exec(batch.run)  # blocks until every job is terminal

    print(f"{batch.run.path}: " + ", ".join(f"{s} {n}" for s, n in batch.run.counts().items()))
    seen = observe(batch.api)
    if seen.requests < 2:
        print("no requests made this time: every job was already finished")
        return
    print(
        f"hidden quota {batch.api.quota:g} req/s; observed {seen.rate:.1f} req/s "
        f"({seen.requests} requests in {seen.seconds:.2f}s); "
        f"429s: {seen.limited} ({seen.limited_share:.1%}); "
        f"Rate now {batch.rate.current / batch.rate.per:.1f}/s"
    )


if __name__ == "__main__":
    main()
