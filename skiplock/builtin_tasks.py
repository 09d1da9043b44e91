"""Built-in task types: the demo's default, two CPU-heavy ones, and diagnostics for tests and benchmarks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import time
from typing import Any

from marshmallow import Schema, fields, validate

from skiplock.registry import TaskContext, task_type

# Report progress at most this often: every report is a row update on the hot table.
PROGRESS_STEPS = 100


class TaskFailed(Exception):
    """Raised by a task to fail its attempt with a plain message."""


# --- default -----------------------------------------------------------------------------------


@task_type("default", timeout_seconds=60)
def describe_json(value: Any, ctx: TaskContext) -> dict:
    """Describe any JSON value: its kind, size, shape and a SHA-256 of its canonical form."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    result: dict[str, Any] = {
        "kind": _json_kind(value),
        "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "canonical_bytes": len(canonical.encode()),
        "depth": _depth(value),
        "leaves": _leaves(value),
    }
    if isinstance(value, str):
        result.update(
            characters=len(value),
            words=len(value.split()),
            uppercase=value.upper(),
            reversed=value[::-1],
        )
    elif isinstance(value, dict):
        result["keys"] = sorted(value)
    elif isinstance(value, list):
        result["length"] = len(value)
    return result


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _children(value: Any) -> list:
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, list) else []


def _depth(value: Any) -> int:
    children = _children(value)
    return 1 + max(map(_depth, children), default=0) if children else 0


def _leaves(value: Any) -> int:
    children = _children(value)
    if isinstance(value, (dict, list)):
        return sum(map(_leaves, children))
    return 1


# --- CPU-heavy ---------------------------------------------------------------------------------


class PrimesInput(Schema):
    limit = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=2, max=5_000_000_000),
        metadata={"description": "Count the primes below this number."},
    )


SIEVE_SEGMENT = 1 << 20


@task_type("primes", input=PrimesInput, timeout_seconds=600)
def count_primes(data: dict, ctx: TaskContext) -> dict:
    """Count the primes below `limit` with a segmented sieve of Eratosthenes (CPU and memory bound)."""
    limit = data["limit"]
    root = math.isqrt(limit - 1) + 1
    base = bytearray([1]) * (root + 1)
    base[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(root) + 1):
        if base[i]:
            base[i * i :: i] = bytes(len(range(i * i, root + 1, i)))
    small_primes = [i for i in range(2, root + 1) if base[i]]

    count, largest = 0, None
    segments = range(0, limit, SIEVE_SEGMENT)
    report_every = max(1, len(segments) // PROGRESS_STEPS)
    for n, low in enumerate(segments):
        high = min(low + SIEVE_SEGMENT, limit)
        segment = bytearray([1]) * (high - low)
        for p in small_primes:
            if p * p >= high:
                break
            start = max(p * p, (low + p - 1) // p * p)
            segment[start - low :: p] = bytes(len(range(start, high, p)))
        if low == 0:
            segment[0 : min(2, high)] = bytes(min(2, high))
        count += segment.count(1)
        last = segment.rfind(1)
        if last >= 0:
            largest = low + last
        if n % report_every == 0:
            ctx.report_progress(high / limit)
    return {"limit": limit, "count": count, "largest": largest}


class HashChainInput(Schema):
    data = fields.String(required=True, validate=validate.Length(max=1_000_000))
    rounds = fields.Integer(required=True, strict=True, validate=validate.Range(min=1, max=1_000_000_000))
    algorithm = fields.String(
        load_default="sha256", validate=validate.OneOf(["sha256", "sha512", "blake2b", "sha3_256"])
    )


@task_type("hash_chain", input=HashChainInput, timeout_seconds=600)
def hash_chain(data: dict, ctx: TaskContext) -> dict:
    """Hash `data`, then hash the digest again, `rounds` times (a proof-of-work style CPU burner)."""
    rounds, algorithm = data["rounds"], data["algorithm"]
    new = getattr(hashlib, algorithm)
    digest = data["data"].encode()
    chunk = max(1, rounds // PROGRESS_STEPS)
    done = 0
    while done < rounds:
        for _ in range(min(chunk, rounds - done)):
            digest = new(digest).digest()
        done = min(rounds, done + chunk)
        ctx.report_progress(done / rounds)
    return {"algorithm": algorithm, "rounds": rounds, "digest": digest.hex()}


# --- diagnostics -------------------------------------------------------------------------------


@task_type("noop", timeout_seconds=30)
def noop(value: Any, ctx: TaskContext) -> None:
    """Do nothing and return null (benchmarks the queue itself)."""
    return None


# `sleep` reports its progress this often.
SLEEP_PROGRESS_SECONDS = 0.1


class SleepInput(Schema):
    seconds = fields.Float(required=True, validate=validate.Range(min=0, max=86_400))


@task_type("sleep", input=SleepInput, timeout_seconds=3600)
def sleep(data: dict, ctx: TaskContext) -> dict:
    """Sleep `seconds`, reporting progress (an I/O-bound stand-in)."""
    seconds = data["seconds"]
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, SLEEP_PROGRESS_SECONDS))
        if seconds:
            ctx.report_progress(min(1.0, 1 - max(0.0, deadline - time.monotonic()) / seconds))
    return {"slept": seconds}


class FailInput(Schema):
    times = fields.Integer(load_default=1, strict=True, validate=validate.Range(min=0, max=1000))
    message = fields.String(load_default="planned failure", validate=validate.Length(max=10_000))


@task_type("fail", input=FailInput, timeout_seconds=30)
def fail(data: dict, ctx: TaskContext) -> dict:
    """Fail the first `times` attempts with `message`, then succeed (exercises retries)."""
    if ctx.attempt <= data["times"]:
        raise TaskFailed(data["message"])
    return {"succeeded_on_attempt": ctx.attempt}


@task_type("crash", input=fields.Raw(required=False, allow_none=True), dangerous=True)
def crash(value: Any, ctx: TaskContext) -> None:
    """Kill the process running it with SIGSEGV, like a segfault in a C extension."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.kill(os.getpid(), signal.SIGSEGV)
