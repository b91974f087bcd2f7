# /// script
# requires-python = ">=3.10"
# dependencies = ["aiohttp>=3.9", "bcrypt>=4.0"]
# ///
"""Gambiarra arena server: one file that runs a live LLM meetup.

The host runs this file on a laptop. Participants' runners (ollama, llama.cpp,
LM Studio) connect to ``ws://HOST:3000/ws`` with the session PIN, receive each
round's challenge and stream their tokens back; the big screen (telão) and the
audience's phones watch the same socket; phones vote over HTTP; the host drives
everything with curl or the club's admin page and exports the evening at the end.

Run it::

    pip install aiohttp bcrypt
    python gambiarra_server.py            # http://0.0.0.0:3000 and [::]:3000

WebSocket protocol (every frame is one JSON object with a ``type``):

    runner -> server   register {participant_id, nickname, pin, runner, model}
                       token    {round, participant_id, seq, content}
                       complete {round, participant_id, tokens, latency_ms_first_token?,
                                 duration_ms?, model_info?}
                       error    {round, participant_id, code, message}
    screen -> server   telao_register {view?: "arena" | "voting" | ...}
    server -> runner   registered {session_id, participant_id, resume?}
                       challenge {session_id, round, prompt, max_tokens, temperature,
                                  deadline_ms, seed}
                       heartbeat {ts}      error {message, code}
    server -> screen   registered_telao {view}   state_snapshot {session, round, participants,
                       liveTokens?}   participant_registered {participant}
                       participant_disconnected {participant_id, ts}
                       round_started {round, session_id}   round_state {round}
                       token_update {participant_id, round, seq, content, total_tokens}
                       completion {participant_id, round, tokens, duration_ms, ttft_ms, tps}

Every HTTP route is served at the root and again under ``/api``; ``GET /docs``
lists them all. The sections of this file, in order (``grep -n '^# =='``):

    Configuration, Errors, Helpers, Input fields, Store (sqlite), Live state,
    Messages, Hub (fan-out), WebSocket, HTTP, Routes and docs, App, Command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import sqlite3
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp import WSCloseCode, WSMsgType, web


__version__ = "1.0.0"
# A peer silent (no frame, no pong) for this many ping intervals is dropped:
# generous, because a runner's CPU is saturated by its model.
MISSED_PINGS = 3
log = logging.getLogger("gambiarra")
HERE = Path(__file__).resolve().parent


# =============================================================================
# Configuration
# =============================================================================

def option(default: Any, env: str, help: str) -> Any:
    """A Config field with the environment variable (and so the --flag) that sets it."""
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class Config:
    """Everything a run can change; each field has an env var and a matching --flag."""

    hosts: tuple[str, ...] = option(("0.0.0.0", "::"), "HOST", "addresses to listen on, comma-separated")
    port: int = option(3000, "PORT", "TCP port (0: any free port)")
    database: Path = option(HERE / "gambiarra.db", "DATABASE_URL",
                            "SQLite file: a path, sqlite:///path or file:path")
    cors_origins: tuple[str, ...] = option(("*",), "CORS_ORIGINS", "browser origins allowed, comma-separated")
    pin_length: int = option(6, "PIN_LENGTH", "digits in a new session's PIN")
    admin_token: str = option("", "ADMIN_TOKEN", "token for host routes from other machines "
                                                  "(default: a new one, printed at start-up)")
    host_addresses: tuple[str, ...] = option(("127.0.0.0/8", "::1"), "HOST_ADDRESSES",
                                             "networks trusted as the host without a token, comma-separated")
    trust_proxy: bool = option(False, "TRUST_PROXY", "take the client address from X-Forwarded-For")
    rate_limit_max: int = option(500, "RATE_LIMIT_MAX", "HTTP requests per address per window")
    rate_limit_window_s: float = option(60.0, "RATE_LIMIT_WINDOW", "rate-limit window in seconds")
    pin_attempts_max: int = option(10, "PIN_ATTEMPTS_MAX", "wrong PINs per address per window")
    pin_attempts_total_max: int = option(300, "PIN_ATTEMPTS_TOTAL_MAX",
                                         "wrong PINs from all addresses together per window")
    pin_attempts_window_s: float = option(60.0, "PIN_ATTEMPTS_WINDOW", "wrong-PIN window in seconds")
    ws_heartbeat_interval_s: float = option(30.0, "WS_HEARTBEAT_INTERVAL",
                                            f"seconds between pings; {MISSED_PINGS} silent intervals drop a peer")
    ws_max_payload: int = option(1024 * 1024, "WS_MAX_PAYLOAD", "largest WebSocket message in bytes")
    ws_connections_per_address: int = option(20, "WS_CONNECTIONS_PER_ADDRESS",
                                             "WebSocket connections one address may hold (the host's: any number)")
    max_tokens_per_generation: int = option(100_000, "MAX_TOKENS_PER_GENERATION",
                                            "tokens kept per runner per round")
    max_answer_chars: int = option(1_000_000, "MAX_ANSWER_CHARS", "characters kept per runner per round")
    peer_queue_limit: int = option(8192, "PEER_QUEUE_LIMIT",
                                   "messages queued for one connection before it is dropped as not reading")
    peer_queue_chars: int = option(8 * 1024 * 1024, "PEER_QUEUE_CHARS",
                                   "characters queued for one connection before it is dropped as not reading")
    flush_interval_s: float = option(1.0, "FLUSH_INTERVAL", "seconds between saves of streamed tokens")
    bcrypt_rounds: int = option(12, "BCRYPT_ROUNDS", "bcrypt cost for PIN hashes")
    client_dir: Path = option(HERE / "client-browser", "CLIENT_DIR",
                              "the club's browser client folder (client.html, agent.html, shared/), "
                              "served at /client, /agent and /client-assets/")


MAX_TEXT = 200              # nickname, model, runner, ids
MAX_PROMPT = 100_000
SCREEN_VIEWS_WITHOUT_TOKENS = {"voting", "world"}


# =============================================================================
# Errors
# =============================================================================

class ClientError(Exception):
    """Something a client asked for that cannot be done; the edges turn it into a reply."""

    status = 400
    code = "INVALID_INPUT"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class Unauthorized(ClientError):
    status, code = 401, "UNAUTHORIZED"


class Forbidden(ClientError):
    status, code = 403, "FORBIDDEN"


class NotFound(ClientError):
    status, code = 404, "NOT_FOUND"


class Conflict(ClientError):
    status, code = 409, "CONFLICT"


class TooMany(ClientError):
    status, code = 429, "TOO_MANY_REQUESTS"

    def __init__(self, message: str, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s


# =============================================================================
# Helpers
# =============================================================================

def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as the ISO-8601 UTC text the club's clients parse."""
    if ms is None:
        return None
    stamp = datetime.fromtimestamp(ms // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ms % 1000:03d}Z"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def new_id() -> str:
    return str(uuid.uuid4())


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


class Throttle:
    """Counts events per key in fixed windows and says how long an over-limit key waits."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.windows: dict[str, tuple[float, int]] = {}

    def wait_s(self, key: str) -> float:
        """Seconds until `key` may act again; 0 when it may act now."""
        start, count = self.windows.get(key, (0.0, 0))
        remaining = start + self.window_s - time.monotonic()
        return remaining if count >= self.limit and remaining > 0 else 0.0

    def add(self, key: str) -> None:
        now = time.monotonic()
        start, count = self.windows.get(key, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        self.windows[key] = (start, count + 1)
        if len(self.windows) > 10_000:      # forget finished windows now and then
            self.windows = {k: v for k, v in self.windows.items() if now - v[0] < self.window_s}

    def forgive(self, key: str) -> None:
        """Take back one event of `key`'s current window (one that turned out to be harmless)."""
        start, count = self.windows.get(key, (0.0, 0))
        if count:
            self.windows[key] = (start, count - 1)


# =============================================================================
# Input fields: one description drives validation, OpenAPI and /docs
# =============================================================================

@dataclass(frozen=True)
class Field:
    """One input field of a request body, query string or WebSocket message.

    Inputs may spell the name in snake_case or camelCase; `null` counts as absent.
    """

    name: str
    kind: type = str
    required: bool = False
    default: Any = None
    low: float | None = None
    high: float | None = None
    doc: str = ""

    @property
    def alias(self) -> str:
        return camel(self.name)


KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              dict: "an object"}


def coerce(f: Field, value: Any, from_text: bool) -> Any:
    """Check one value against its field, converting query-string text where asked."""
    if from_text and f.kind is not str:
        value = parse_text(f, value)
    if f.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if f.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, f.kind) or (isinstance(value, bool) and f.kind is not bool):
        raise ClientError(f"'{f.name}' must be {KIND_NAMES[f.kind]}")
    if f.kind is float and not math.isfinite(value):
        raise ClientError(f"'{f.name}' must be a finite number")
    size = len(value) if isinstance(value, str) else value
    if f.low is not None and f.kind is not bool and size < f.low:
        raise ClientError(f"'{f.name}' must be at least {f.low:g}" + (" characters" if f.kind is str else ""))
    if f.high is not None and f.kind is not bool and size > f.high:
        raise ClientError(f"'{f.name}' must be at most {f.high:g}" + (" characters" if f.kind is str else ""))
    return value


def parse_text(f: Field, text: str) -> Any:
    try:
        if f.kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return f.kind(text)
    except (KeyError, ValueError):
        raise ClientError(f"'{f.name}' must be {KIND_NAMES[f.kind]}") from None


def parse_fields(data: Mapping[str, Any], spec: Iterable[Field], from_text: bool = False) -> dict[str, Any]:
    """Validate `data` against `spec`; return every field by its snake_case name."""
    values = {}
    for f in spec:
        value = data.get(f.name)
        if value is None:
            value = data.get(f.alias)
        if value is None:
            if f.required:
                raise ClientError(f"'{f.name}' is required")
            values[f.name] = f.default
        else:
            values[f.name] = coerce(f, value, from_text)
    return values


def parse_json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        raise ClientError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ClientError(f"{what} must be a JSON object")
    return data


# =============================================================================
# Store (sqlite)
# =============================================================================
#
# Every function here is a plain function of a connection. They all run on one
# thread that owns the only connection (see Database), so each one is atomic
# with respect to the others and none of them ever blocks the event loop.

SCHEMA_VERSION = 1


def open_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise SystemExit(f"{path} was written by a newer server (schema {version}); use a newer gambiarra_server.py")
    conn.executescript((HERE / "schema.sql").read_text())
    return conn


class Database:
    """The one sqlite connection, owned by one thread; statements run in submission order."""

    def __init__(self, path: Path) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self.conn = self.executor.submit(open_db, path).result()
        self.error: str | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(conn, *args)` on the database thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.call, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(conn, *args)` without waiting; a failure is logged, not raised."""
        future = self.executor.submit(self.call, fn, *args)
        future.add_done_callback(lambda f: f.exception() and log.error("database: %s", f.exception()))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """On the database thread: run `fn`, keeping `error` until a write succeeds again.

        A read that works says nothing about a full disk, so only a write clears the error.
        """
        changes = self.conn.total_changes
        try:
            result = fn(self.conn, *args)
        except sqlite3.Error as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        if self.conn.total_changes != changes:
            self.error = None
        return result

    def close(self) -> None:
        self.executor.submit(self.conn.close).result()
        self.executor.shutdown()


def one(conn: sqlite3.Connection, sql: str, *args: Any) -> dict[str, Any] | None:
    row = conn.execute(sql, args).fetchone()
    return dict(row) if row else None


def every(conn: sqlite3.Connection, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(sql, args)]


def active_session(conn: sqlite3.Connection) -> dict[str, Any] | None:
    return one(conn, "SELECT * FROM sessions WHERE status = 'active' ORDER BY createdAt DESC LIMIT 1")


def create_session(conn: sqlite3.Connection, pin: str, pin_hash: str) -> dict[str, Any]:
    """End the active session, start a new one, and return it."""
    now = now_ms()
    session_id = new_id()
    with conn:
        # The old session's rounds end with it: none stays running, none takes votes.
        conn.execute("UPDATE rounds SET endedAt = COALESCE(endedAt, :now), votingStatus = 'closed' "
                     "WHERE votingStatus = 'open' OR (startedAt IS NOT NULL AND endedAt IS NULL)", {"now": now})
        conn.execute("UPDATE sessions SET status = 'ended', endedAt = ? WHERE status = 'active'", (now,))
        disconnect_everyone(conn)
        conn.execute("INSERT INTO sessions (id, createdAt, pin, pinHash, status) VALUES (?, ?, ?, ?, 'active')",
                     (session_id, now, pin, pin_hash))
    return session_row(conn, session_id)


def session_row(conn: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
    return one(conn, "SELECT * FROM sessions WHERE id = ?", session_id)


def disconnect_everyone(conn: sqlite3.Connection) -> None:
    with conn:
        conn.execute("UPDATE participants SET connected = 0 WHERE connected = 1")


def session_participants(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    return every(conn, "SELECT * FROM participants WHERE sessionId = ? ORDER BY createdAt", session_id)


def session_rounds(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    return every(conn, 'SELECT * FROM rounds WHERE sessionId = ? ORDER BY "index"', session_id)


def get_participant(conn: sqlite3.Connection, participant_id: str) -> dict[str, Any] | None:
    return one(conn, "SELECT * FROM participants WHERE id = ?", participant_id)


def register_participant(conn: sqlite3.Connection, session_id: str, p: dict[str, Any]) -> dict[str, Any]:
    """Insert or update a participant, moving it into `session_id` (the club's semantics)."""
    now = now_ms()
    with conn:
        conn.execute(
            """INSERT INTO participants (id, sessionId, nickname, runner, model, connected, createdAt, lastSeen)
               VALUES (:id, :session, :nickname, :runner, :model, 1, :now, :now)
               ON CONFLICT (id) DO UPDATE SET
                 kicked = CASE WHEN sessionId = :session THEN kicked ELSE 0 END,
                 sessionId = :session, nickname = :nickname, runner = :runner, model = :model,
                 connected = 1, lastSeen = :now""",
            {"id": p["participant_id"], "session": session_id, "nickname": p["nickname"],
             "runner": p["runner"], "model": p["model"], "now": now})
    return get_participant(conn, p["participant_id"])


def set_connected(conn: sqlite3.Connection, participant_id: str, connected: bool) -> None:
    with conn:
        conn.execute("UPDATE participants SET connected = ?, lastSeen = ? WHERE id = ?",
                     (int(connected), now_ms(), participant_id))


def kick_participant(conn: sqlite3.Connection, session_id: str, participant_id: str) -> dict[str, Any]:
    with conn:
        cursor = conn.execute("UPDATE participants SET kicked = 1, connected = 0 WHERE id = ? AND sessionId = ?",
                              (participant_id, session_id))
    if cursor.rowcount == 0:
        raise NotFound(f"Participant {participant_id} is not in this session")
    return get_participant(conn, participant_id)


def kicked_ids(conn: sqlite3.Connection, session_id: str) -> set[str]:
    return {r["id"] for r in every(conn, "SELECT id FROM participants WHERE sessionId = ? AND kicked = 1", session_id)}


def create_round(conn: sqlite3.Connection, session_id: str, r: dict[str, Any]) -> dict[str, Any]:
    round_id = new_id()
    with conn:
        conn.execute(
            """INSERT INTO rounds (id, sessionId, "index", prompt, maxTokens, temperature, deadlineMs, seed,
                                   svgMode, createdAt)
               VALUES (?, ?, (SELECT COUNT(*) + 1 FROM rounds WHERE sessionId = ?), ?, ?, ?, ?, ?, ?, ?)""",
            (round_id, session_id, session_id, r["prompt"], r["max_tokens"], r["temperature"], r["deadline_ms"],
             r["seed"], int(r["svg_mode"]), now_ms()))
    return get_round(conn, round_id)


def get_round(conn: sqlite3.Connection, round_id: str) -> dict[str, Any]:
    row = one(conn, "SELECT * FROM rounds WHERE id = ?", round_id)
    if row is None:
        raise NotFound("Round not found")
    return row


def update_round(conn: sqlite3.Connection, round_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    assignments = ", ".join(f"{column} = :{column}" for column in changes)
    with conn:
        conn.execute(f"UPDATE rounds SET {assignments} WHERE id = :id", {**changes, "id": round_id})
    return get_round(conn, round_id)


def shown_round(conn: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
    """The round screens show: the highest index that has started."""
    return one(conn, 'SELECT * FROM rounds WHERE sessionId = ? AND startedAt IS NOT NULL ORDER BY "index" DESC LIMIT 1',
               session_id)


def voting_round(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    row = one(conn, "SELECT * FROM rounds WHERE sessionId = ? AND votingStatus = 'open' ORDER BY \"index\" DESC LIMIT 1",
              session_id)
    if row is None:
        raise NotFound("No round has voting open")
    return row


def save_metrics(conn: sqlite3.Connection, m: dict[str, Any]) -> None:
    """Insert or replace the metrics row of one (round, participant)."""
    columns = ", ".join(m)
    updates = ", ".join(f"{c} = excluded.{c}" for c in m if c not in ("id", "createdAt"))
    with conn:
        conn.execute(f"INSERT INTO metrics ({columns}) VALUES ({', '.join(':' + c for c in m)}) "
                     f"ON CONFLICT (roundId, participantId) DO UPDATE SET {updates}", m)


def save_tokens(conn: sqlite3.Connection, rows: list[tuple], contents: list[tuple]) -> None:
    """Write a batch of accepted tokens and refresh the content of already-saved answers."""
    with conn:
        conn.executemany("INSERT OR IGNORE INTO tokens (roundId, participantId, seq, content, receivedAt) "
                         "VALUES (?, ?, ?, ?, ?)", rows)
        conn.executemany("UPDATE metrics SET generatedContent = ?, tokensReceived = ?, seqGaps = ? "
                         "WHERE roundId = ? AND participantId = ?", contents)


def round_tokens(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    return every(conn, "SELECT participantId, seq, content, receivedAt FROM tokens WHERE roundId = ? "
                       "ORDER BY participantId, seq", round_id)


def round_metrics(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    return every(conn, "SELECT * FROM metrics WHERE roundId = ? ORDER BY createdAt", round_id)


def log_event(conn: sqlite3.Connection, session_id: str | None, event_type: str, actor_type: str = "system",
              actor_id: str | None = None, target_type: str | None = None, target_id: str | None = None,
              metadata: dict[str, Any] | None = None) -> None:
    with conn:
        conn.execute("INSERT INTO event_logs (id, sessionId, timestamp, eventType, actorType, actorId, targetType, "
                     "targetId, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (new_id(), session_id, now_ms(), event_type, actor_type, actor_id, target_type, target_id,
                      None if metadata is None else dumps(metadata)))


def cast_vote(conn: sqlite3.Connection, v: dict[str, Any]) -> dict[str, Any]:
    """Record one immutable vote, checking the round and participant in the same transaction."""
    rnd = get_round(conn, v["round_id"])
    if rnd["votingStatus"] != "open":
        raise Conflict("Voting is not open for this round")
    if not one(conn, "SELECT 1 FROM metrics WHERE roundId = ? AND participantId = ?", v["round_id"],
               v["participant_id"]):
        raise NotFound("Participant not found")
    vote_id = new_id()
    try:
        with conn:
            conn.execute(
                """INSERT INTO votes (id, roundId, voterHash, participantId, score, createdAt, voteOrder,
                                      responseTime, userAgent)
                   VALUES (?, ?, ?, ?, ?, ?, (SELECT COUNT(*) + 1 FROM votes WHERE roundId = ? AND voterHash = ?),
                           ?, ?)""",
                (vote_id, v["round_id"], v["voter_hash"], v["participant_id"], v["score"], now_ms(),
                 v["round_id"], v["voter_hash"], v["response_time"], v["user_agent"]))
    except sqlite3.IntegrityError:
        raise Conflict("Already voted for this participant") from None
    vote = one(conn, "SELECT * FROM votes WHERE id = ?", vote_id)
    log_event(conn, rnd["sessionId"], "vote_cast", "voter", v["voter_hash"], "participant", v["participant_id"],
              {"participantId": v["participant_id"], "score": v["score"], "voteOrder": vote["voteOrder"],
               "responseTime": v["response_time"]})
    return vote


def voter_votes(conn: sqlite3.Connection, round_id: str, voter_hash: str) -> list[dict[str, Any]]:
    get_round(conn, round_id)           # an unknown round is a 404, not "you have not voted"
    return every(conn, "SELECT participantId, score FROM votes WHERE roundId = ? AND voterHash = ? "
                       "ORDER BY createdAt", round_id, voter_hash)


def scoreboard(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    """One row per answer, best average first, then most votes (the order the reveal uses)."""
    return every(conn, """
        SELECT m.participantId AS participant_id, p.nickname, m.tokens,
               m.latencyFirstTokenMs AS latency_first_token_ms, m.durationMs AS duration_ms,
               COALESCE(m.tpsAvg, 0.0) AS tps_avg, COUNT(v.id) AS votes,
               COALESCE(AVG(v.score), 0.0) AS avg_score, COALESCE(SUM(v.score), 0) AS total_score,
               m.generatedContent AS generated_content, p.model, p.runner
        FROM metrics m JOIN participants p ON p.id = m.participantId
        LEFT JOIN votes v ON v.roundId = m.roundId AND v.participantId = m.participantId
        WHERE m.roundId = ?
        GROUP BY m.id
        ORDER BY avg_score DESC, votes DESC, m.createdAt""", round_id)


def scoreboard_round(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    """The scoreboard's default round: the latest ended one, else the running one."""
    row = one(conn, 'SELECT * FROM rounds WHERE sessionId = ? AND endedAt IS NOT NULL ORDER BY "index" DESC LIMIT 1',
              session_id) or one(conn, 'SELECT * FROM rounds WHERE sessionId = ? AND startedAt IS NOT NULL '
                                       'ORDER BY "index" DESC LIMIT 1', session_id)
    if row is None:
        raise NotFound("No round found")
    return row


def responses(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    return every(conn, """SELECT m.participantId AS participant_id, p.nickname, m.generatedContent AS generated_content
                          FROM metrics m JOIN participants p ON p.id = m.participantId
                          WHERE m.roundId = ? ORDER BY m.createdAt""", round_id)


def session_metrics(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    return one(conn, """
        SELECT ?1 AS session_id,
               (SELECT COUNT(*) FROM rounds WHERE sessionId = ?1) AS total_rounds,
               (SELECT COUNT(*) FROM rounds WHERE sessionId = ?1 AND endedAt IS NOT NULL) AS completed_rounds,
               COUNT(DISTINCT m.participantId) AS total_participants,
               COALESCE(SUM(m.tokens), 0) AS total_tokens,
               COALESCE(SUM(m.tokensReceived), 0) AS total_tokens_received,
               COALESCE(SUM(m.seqGaps), 0) AS total_seq_gaps,
               COALESCE(SUM(m.rescued), 0) AS rescued_generations,
               (SELECT COUNT(*) FROM votes v JOIN rounds r ON r.id = v.roundId WHERE r.sessionId = ?1) AS total_votes
        FROM metrics m JOIN rounds r ON r.id = m.roundId WHERE r.sessionId = ?1""", session_id)


def session_events(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    return every(conn, "SELECT * FROM event_logs WHERE sessionId = ? ORDER BY timestamp, rowid", session_id)


def session_answers(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    """Every answer of a session with its round, participant and votes: the CSV export's rows."""
    return every(conn, """
        SELECT m.*, r."index" AS roundIndex, r.startedAt AS roundStartedAt, r.endedAt AS roundEndedAt,
               p.nickname, p.model, p.runner, COUNT(v.id) AS votes, COALESCE(AVG(v.score), 0.0) AS avgScore
        FROM metrics m JOIN rounds r ON r.id = m.roundId JOIN participants p ON p.id = m.participantId
        LEFT JOIN votes v ON v.roundId = m.roundId AND v.participantId = m.participantId
        WHERE r.sessionId = ? GROUP BY m.id ORDER BY r."index", m.createdAt""", session_id)


def session_tree(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    """A whole session, nested, without its PIN: the JSON export."""
    session = session_row(conn, session_id)
    rounds = []
    for row in session_rounds(conn, session_id):
        metrics = [{**m, "modelInfo": json.loads(m["modelInfo"]) if m["modelInfo"] else None}
                   for m in round_metrics(conn, row["id"])]
        votes = every(conn, "SELECT * FROM votes WHERE roundId = ? ORDER BY createdAt", row["id"])
        rounds.append({**row, "metrics": metrics, "votes": votes})
    events = [{**e, "metadata": json.loads(e["metadata"]) if e["metadata"] else None}
              for e in session_events(conn, session_id)]
    return {**{k: v for k, v in session.items() if k not in ("pin", "pinHash")},
            "participants": session_participants(conn, session_id), "rounds": rounds, "events": events}


def find_session(conn: sqlite3.Connection, session_id: str | None) -> str:
    """The session an export is about: the one asked for, else the active one."""
    row = (one(conn, "SELECT id FROM sessions WHERE id = ?", session_id) if session_id
           else active_session(conn))
    if row is None:
        raise NotFound("Session not found" if session_id else "No active session")
    return row["id"]


# =============================================================================
# Live state: the session, its live rounds and their token buffers
# =============================================================================
#
# Concurrency: tokens are accepted by plain synchronous code (no await between
# reading and writing a buffer), so they need no lock and keep their order.
# Every transition that awaits (a database write, a bcrypt check) runs under
# Arena.lock, so a stop, a complete and a new session never interleave.

@dataclass
class Generation:
    """One participant's answer to one round, as its tokens arrive."""

    participant_id: str
    tokens: dict[int, str] = field(default_factory=dict)
    first_token_at: int | None = None
    saved: bool = False          # a metrics row exists (completed, or rescued at stop)
    completed: bool = False      # the runner said `complete`
    stale: bool = False          # tokens arrived after the metrics row was written
    chars: int = 0               # characters kept, to bound an answer's memory

    def add(self, seq: int, content: str, at: int) -> bool:
        """Keep a token unless its seq was already seen; say whether it was new."""
        if seq in self.tokens:
            return False
        self.tokens[seq] = content
        self.chars += len(content)
        if self.first_token_at is None:
            self.first_token_at = at
        self.stale = self.saved
        return True

    @property
    def content(self) -> str:
        return "".join(self.ordered())

    def ordered(self) -> list[str]:
        return [self.tokens[seq] for seq in sorted(self.tokens)]

    @property
    def next_seq(self) -> int:
        return max(self.tokens) + 1 if self.tokens else 0

    def missing(self) -> list[int]:
        return [seq for seq in range(self.next_seq) if seq not in self.tokens]

    @property
    def gaps(self) -> int:
        return self.next_seq - len(self.tokens)


@dataclass
class LiveRound:
    """A started round whose runners may still be streaming (running, or just stopped)."""

    row: dict[str, Any]
    generations: dict[str, Generation] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def index(self) -> int:
        return self.row["index"]

    @property
    def running(self) -> bool:
        return self.row["endedAt"] is None

    def generation(self, participant_id: str) -> Generation:
        gen = self.generations.get(participant_id)
        if gen is None:
            gen = self.generations[participant_id] = Generation(participant_id)
        return gen


@dataclass
class SessionState:
    """The active session as the live code needs it."""

    id: str
    created_at: int
    pin_hash: bytes
    kicked: set[str] = field(default_factory=set)
    # bcrypt verdicts per candidate PIN, shared by every register that asks at once.
    pin_checks: dict[str, asyncio.Future[bool]] = field(default_factory=dict)


class Arena:
    """The live state of the evening: the active session and its live rounds."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.session: SessionState | None = None
        self.rounds: dict[int, LiveRound] = {}          # by index
        self.unsaved: list[tuple] = []                   # token rows waiting for the next flush

    def start_session(self, row: dict[str, Any], kicked: set[str] = frozenset()) -> SessionState:
        self.session = SessionState(row["id"], row["createdAt"], row["pinHash"].encode(), set(kicked))
        self.rounds.clear()
        return self.session

    def require_session(self) -> SessionState:
        if self.session is None:
            raise NotFound("No active session", "NO_SESSION")
        return self.session

    def running_round(self) -> LiveRound | None:
        return next((r for r in self.rounds.values() if r.running), None)

    def live_round(self, index: int) -> LiveRound:
        live = self.rounds.get(index)
        if live is None:
            raise ClientError(f"Round {index} is not live", "UNKNOWN_ROUND")
        return live

    def start_round(self, row: dict[str, Any]) -> LiveRound:
        """Make `row` the running round; earlier rounds are saved already and leave memory."""
        self.rounds = {row["index"]: LiveRound(row)}
        return self.rounds[row["index"]]

    async def verify_pin(self, session: SessionState, candidate: str) -> bool:
        """Check a PIN with bcrypt off the loop, paying once per distinct candidate in flight."""
        check = session.pin_checks.get(candidate)
        if check is None:
            check = asyncio.ensure_future(asyncio.to_thread(bcrypt.checkpw, candidate.encode(), session.pin_hash))
            session.pin_checks[candidate] = check
        try:
            ok = await asyncio.shield(check)
        except ValueError:
            ok = False
        if not ok:
            session.pin_checks.pop(candidate, None)     # remember only the right PIN
        return ok

    def accept_token(self, participant_id: str, index: int, seq: int, content: str,
                     limit: int, chars_limit: int) -> Generation | None:
        """Buffer one token; return its generation if it was new, None for a duplicate."""
        gen = self.live_round(index).generation(participant_id)
        # seq is bounded too: a resume reply lists the seqs missing below the highest one.
        if len(gen.tokens) >= limit or seq >= limit:
            raise ClientError(f"An answer keeps at most {limit} tokens (seq 0 to {limit - 1}); the rest is ignored",
                              "TOO_MANY_TOKENS")
        if gen.chars + len(content) > chars_limit:
            raise ClientError(f"An answer keeps at most {chars_limit} characters; the rest is ignored",
                              "ANSWER_TOO_LONG")
        at = now_ms()
        if not gen.add(seq, content, at):
            return None
        self.unsaved.append((self.rounds[index].id, participant_id, seq, content, at))
        return gen

    def take_unsaved(self) -> tuple[list[tuple], list[tuple]]:
        """Hand over the tokens and refreshed contents that the next flush writes."""
        rows, self.unsaved = self.unsaved, []
        contents = []
        for live in self.rounds.values():
            for gen in live.generations.values():
                if gen.stale:
                    gen.stale = False
                    contents.append((gen.content, len(gen.tokens), gen.gaps, live.id, gen.participant_id))
        return rows, contents

    def give_back(self, rows: list[tuple]) -> None:
        """Keep tokens whose flush failed, so the next flush tries again."""
        self.unsaved[:0] = rows


def generation_metrics(live: LiveRound, gen: Generation, report: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics row of an answer: server-clock figures, with the runner's own report beside them.

    `report` is the runner's `complete` message; None means the answer is rescued at stop.
    """
    now = now_ms()
    started, first = live.row["startedAt"], gen.first_token_at
    client = report or {}
    client_tokens, client_ttft = client.get("tokens"), client.get("latency_ms_first_token")
    client_duration = client.get("duration_ms")
    received = len(gen.tokens)
    tokens = received if client_tokens is None else client_tokens
    if first is not None and now > first:
        tps = received / ((now - first) / 1000)
    elif client_duration:
        tps = tokens / (client_duration / 1000)
    else:
        tps = 0.0                                       # never null: the telão calls toFixed on it
    return {
        "id": new_id(), "roundId": live.id, "participantId": gen.participant_id, "tokens": tokens,
        "latencyFirstTokenMs": first - started if first is not None else client_ttft, "durationMs": now - started,
        "tpsAvg": round(tps, 3), "modelInfo": dumps(client["model_info"]) if client.get("model_info") else None,
        "generatedContent": gen.content, "createdAt": now,
        "generationStartedAt": first - client_ttft if first is not None and client_ttft is not None else started,
        "generationEndedAt": now, "firstTokenAt": first, "tokensReceived": received, "seqGaps": gen.gaps,
        "clientLatencyFirstTokenMs": client_ttft, "clientDurationMs": client_duration,
        "rescued": int(report is None),
    }


# =============================================================================
# Messages: the JSON shapes clients read
# =============================================================================
#
# The casing is the club's contract: database rows travel camelCase, hand-built
# payloads and every participant message snake_case.

ROUND_STATE_KEYS = ("id", "index", "prompt", "maxTokens", "temperature", "deadlineMs", "svgMode", "startedAt",
                    "endedAt", "votingStatus", "revealedCount")


def is_time(key: str) -> bool:
    return key.endswith("At") or key in ("lastSeen", "timestamp")


def iso_times(data: Any) -> Any:
    """`data` with every time column, at any depth, as ISO text instead of epoch milliseconds."""
    if isinstance(data, list):
        return [iso_times(item) for item in data]
    if isinstance(data, dict):
        return {key: iso(value) if is_time(key) and isinstance(value, int) else iso_times(value)
                for key, value in data.items()}
    return data


def round_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**iso_times(row), "svgMode": bool(row["svgMode"])}


def participant_json(row: dict[str, Any], connected: bool) -> dict[str, Any]:
    return {"id": row["id"], "sessionId": row["sessionId"], "nickname": row["nickname"], "runner": row["runner"],
            "model": row["model"], "connected": connected, "createdAt": iso(row["createdAt"]),
            "lastSeen": iso(row["lastSeen"])}


def session_json(row: dict[str, Any], with_pin: bool) -> dict[str, Any]:
    body = {"id": row["id"], "createdAt": iso(row["createdAt"]), "endedAt": iso(row["endedAt"]),
            "status": row["status"]}
    return {**body, "pin": row["pin"]} if with_pin else body


def vote_json(row: dict[str, Any]) -> dict[str, Any]:
    return iso_times(row)


def msg_error(message: str, code: str) -> dict[str, Any]:
    return {"type": "error", "message": message, "code": code}


def msg_challenge(session_id: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"type": "challenge", "session_id": session_id, "round": row["index"], "prompt": row["prompt"],
            "max_tokens": row["maxTokens"], "temperature": row["temperature"], "deadline_ms": row["deadlineMs"],
            "seed": row["seed"]}


def msg_round_state(row: dict[str, Any]) -> dict[str, Any]:
    state = round_json(row)
    return {"type": "round_state", "round": {key: state[key] for key in ROUND_STATE_KEYS}}


def msg_participant_registered(row: dict[str, Any]) -> dict[str, Any]:
    return {"type": "participant_registered", "participant": participant_json(row, True)}


def msg_participant_disconnected(participant_id: str) -> dict[str, Any]:
    return {"type": "participant_disconnected", "participant_id": participant_id, "ts": now_ms()}


def msg_completion(index: int, m: dict[str, Any]) -> dict[str, Any]:
    return {"type": "completion", "participant_id": m["participantId"], "round": index, "tokens": m["tokens"],
            "duration_ms": m["durationMs"], "ttft_ms": m["latencyFirstTokenMs"], "tps": m["tpsAvg"]}


def live_tokens(live: LiveRound) -> dict[str, list[str]]:
    return {pid: gen.ordered() for pid, gen in live.generations.items()}


# =============================================================================
# Hub: who is connected, and fan-out that never waits for a slow peer
# =============================================================================

@dataclass(frozen=True)
class Control:
    """A writer-queue item that is not a text frame: a ping, or a close."""

    kind: str
    code: int = WSCloseCode.OK
    reason: str = ""


PING = Control("ping")


class Peer:
    """One WebSocket connection: a runner, a screen, or not yet either.

    Everything sent to a peer goes through its bounded queue and its own writer
    task, so a publisher never awaits a socket. A peer whose queue fills up (in
    messages, or in characters: fan-out multiplies big tokens by the screens) is
    not reading: it is cut off, and everyone else carries on.
    """

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, address: str, queue_limit: int,
                 queue_chars: int) -> None:
        self.ws = ws
        self.transport = request.transport
        self.address = address
        self.participant_id: str | None = None          # set for registered runners
        self.row: dict[str, Any] = {}                   # ... with their participant row
        self.view: str | None = None                    # set for screens
        self.closing = False
        self.dropped = False
        self.last_heard = time.monotonic()
        self.queue: asyncio.Queue[str | Control] = asyncio.Queue(queue_limit)
        self.queue_chars = queue_chars
        self.queued_chars = 0
        self.writer = asyncio.create_task(self.write_all())

    def send(self, item: str | Control) -> None:
        size = len(item) if isinstance(item, str) else 0
        if self.queued_chars and self.queued_chars + size > self.queue_chars:
            self.cut_off(f"not reading ({self.queued_chars} characters queued)")
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.cut_off(f"not reading ({self.queue.maxsize} messages queued)")
            return
        self.queued_chars += size

    def send_json(self, message: dict[str, Any]) -> None:
        self.send(dumps(message))

    def close(self, code: int, reason: str) -> None:
        """Close after everything already queued (an error message, say) has gone out."""
        self.send(Control("close", code, reason))

    def cut_off(self, why: str) -> None:
        """Drop the connection at once, without a closing handshake it would not read."""
        if self.dropped:
            return                      # publishers keep finding the queue full until the handler leaves
        self.dropped = True
        log.warning("WS_DROPPED %s (%s)", self.participant_id or self.view or self.address, why)
        if self.transport is not None:
            self.transport.abort()

    async def write_all(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, str):
                    self.queued_chars -= len(item)
                    await self.ws.send_str(item)
                elif item.kind == "ping":
                    await self.ws.ping()
                else:
                    self.closing = True
                    await self.ws.close(code=item.code, message=item.reason.encode())
                    return
        except (ConnectionError, RuntimeError):
            pass        # the socket went away; the handler's finally cleans up


class Hub:
    """Every live connection, by role; publishing is synchronous and O(peers)."""

    def __init__(self) -> None:
        self.peers: set[Peer] = set()
        self.runners: dict[str, Peer] = {}             # registered participants by id
        self.screens: set[Peer] = set()

    def publish_screens(self, message: dict[str, Any], tokens: bool = False) -> None:
        """Send to every screen; `tokens` messages skip screens that don't show tokens."""
        text = dumps(message)
        for peer in self.screens:
            if not (tokens and peer.view in SCREEN_VIEWS_WITHOUT_TOKENS):
                peer.send(text)

    def publish_runners(self, message: dict[str, Any]) -> None:
        text = dumps(message)
        for peer in self.runners.values():
            peer.send(text)

    def add_runner(self, peer: Peer, row: dict[str, Any]) -> None:
        """Make `peer` the connection of participant `row`, closing any older one first."""
        old = self.runners.get(row["id"])
        if old is not None and old is not peer:
            log.info("WS_DEDUP %s", row["id"])
            old.close(WSCloseCode.OK, "replaced by a newer connection")
        self.screens.discard(peer)
        peer.participant_id, peer.row = row["id"], row
        self.runners[row["id"]] = peer

    def presence(self) -> list[dict[str, Any]]:
        """The connected runners, oldest participant first."""
        rows = sorted((peer.row for peer in self.runners.values()), key=lambda row: row["createdAt"])
        return [participant_json(row, True) for row in rows]


# =============================================================================
# The server: live state, database and connections, kept consistent together
# =============================================================================

@dataclass
class Server:
    """What every handler works with; one per app, so tests get a fresh one each."""

    config: Config
    db: Database = field(init=False)                 # opened when the app starts
    arena: Arena = field(default_factory=Arena)
    hub: Hub = field(default_factory=Hub)

    def __post_init__(self) -> None:
        self.pin_throttle = Throttle(self.config.pin_attempts_max, self.config.pin_attempts_window_s)
        # Every address together: however many addresses a guesser has, 10**6 PINs take days.
        self.pin_total_throttle = Throttle(self.config.pin_attempts_total_max, self.config.pin_attempts_window_s)
        self.http_throttle = Throttle(self.config.rate_limit_max, self.config.rate_limit_window_s)
        self.host_networks = [ipaddress.ip_network(net, strict=False) for net in self.config.host_addresses]
        self.own_addresses: set[str] | None = None      # this machine's LAN addresses, found when first needed

    def event(self, event_type: str, actor_type: str = "system", actor_id: str | None = None,
              target_type: str | None = None, target_id: str | None = None,
              metadata: dict[str, Any] | None = None) -> None:
        """Append to the event log, after every write already queued."""
        session_id = self.arena.session.id if self.arena.session else None
        self.db.submit(log_event, session_id, event_type, actor_type, actor_id, target_type, target_id, metadata)

    def is_host(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip
        return any(ip in net for net in self.host_networks)

    def acts_as_host(self, request: web.Request) -> bool:
        """The request comes from the host's machine, and not from a page of another site open in its browser.

        Browsers name a page's site in Origin. Without this check any web page the host opens
        (or a DNS-rebinding name) could reach 127.0.0.1 and act as the host: read the PIN, end
        the session. curl sends no Origin; the club's pages run on localhost or this machine.
        """
        if not self.is_host(client_address(request, self.config)):
            return False
        origin = request.headers.get("Origin")
        if origin is None or origin in self.config.cors_origins:
            return True
        try:
            hostname = urllib.parse.urlsplit(origin).hostname or ""
        except ValueError:
            return False
        if self.own_addresses is None:
            self.own_addresses = set(lan_addresses())
        return hostname == "localhost" or self.is_host(hostname) or hostname in self.own_addresses

    async def load(self) -> None:
        """Pick up where a previous run stopped: the active session and its live round."""
        row = await self.db.run(active_session)
        if row is None:
            return
        await self.db.run(disconnect_everyone)
        self.arena.start_session(row, await self.db.run(kicked_ids, row["id"]))
        shown = await self.db.run(shown_round, row["id"])
        if shown is None:
            return
        live = self.arena.start_round(shown)
        for token in await self.db.run(round_tokens, live.id):
            live.generation(token["participantId"]).add(token["seq"], token["content"], token["receivedAt"])
        for m in await self.db.run(round_metrics, live.id):
            gen = live.generation(m["participantId"])
            gen.saved, gen.completed, gen.stale = True, not m["rescued"], False
        log.info("resumed session %s, round %d (%d answers in memory)", row["id"], live.index, len(live.generations))

    async def flush(self) -> None:
        """Write the tokens accepted since the last flush; on failure keep them for the next."""
        rows, contents = self.arena.take_unsaved()
        if not rows and not contents:
            return
        try:
            await self.db.run(save_tokens, rows, contents)
        except sqlite3.Error as exc:
            log.error("could not save %d tokens (will retry): %s", len(rows), exc)
            self.arena.give_back(rows)
            for _, _, _, round_id, participant_id in contents:
                for live in self.arena.rounds.values():
                    if live.id == round_id:
                        live.generation(participant_id).stale = True

    async def save_answer(self, live: LiveRound, gen: Generation, report: dict[str, Any] | None) -> dict[str, Any]:
        """Write an answer's metrics row: on `complete` (with its report), or rescued at stop."""
        metrics = generation_metrics(live, gen, report)
        await self.db.run(save_metrics, metrics)
        gen.saved, gen.stale = True, False
        gen.completed = gen.completed or report is not None
        return metrics

    async def rescue(self, live: LiveRound) -> None:
        """Save every answer that streamed tokens but never completed (the runner dropped)."""
        for gen in live.generations.values():
            if gen.tokens and not gen.saved:
                await self.save_answer(live, gen, None)
                log.info("Flushed buffered tokens for %s: %d tokens", gen.participant_id, len(gen.tokens))
                self.event("generation_rescued", "system", None, "participant", gen.participant_id,
                           {"roundIndex": live.index, "tokens": len(gen.tokens)})

    async def snapshot(self) -> dict[str, Any] | None:
        """The state a screen needs when it (re)connects."""
        session = self.arena.session
        if session is None:
            return None
        shown = await self.db.run(shown_round, session.id)
        message = {"type": "state_snapshot",
                   "session": {"id": session.id, "createdAt": iso(session.created_at), "status": "active"},
                   "round": round_json(shown) if shown else None, "participants": self.hub.presence()}
        live = self.arena.running_round()
        if live is not None:
            message["liveTokens"] = live_tokens(live)
        return message

    async def publish_round(self, row: dict[str, Any]) -> None:
        """Tell screens a round changed; keep the live copy of its row in step."""
        live = self.arena.rounds.get(row["index"])
        if live is not None and live.id == row["id"]:
            live.row = row
        self.hub.publish_screens(msg_round_state(row))

    async def keep_alive(self) -> None:
        """Heartbeat the runners and ping everyone; drop peers silent for MISSED_PINGS intervals."""
        interval_s = self.config.ws_heartbeat_interval_s
        self.hub.publish_runners({"type": "heartbeat", "ts": now_ms()})
        silent_since = time.monotonic() - interval_s * MISSED_PINGS
        for peer in list(self.hub.peers):
            if peer.last_heard < silent_since:
                peer.cut_off(f"silent for {interval_s * MISSED_PINGS:g} s")
            else:
                peer.send(PING)

    async def leave(self, peer: Peer) -> None:
        """Forget a closed connection; a runner's departure is announced unless it was replaced."""
        self.hub.peers.discard(peer)
        self.hub.screens.discard(peer)
        if not peer.closing:
            peer.writer.cancel()
        pid = peer.participant_id
        if pid is not None and self.hub.runners.get(pid) is peer:
            del self.hub.runners[pid]
            log.info("WS_DISCONNECTED %s", pid)
            self.hub.publish_screens(msg_participant_disconnected(pid))
            self.db.submit(set_connected, pid, False)
            self.event("participant_disconnected", "participant", pid, "participant", pid)


# =============================================================================
# WebSocket: /ws for runners and screens
# =============================================================================

REGISTER = (
    Field("participant_id", str, True, low=1, high=MAX_TEXT, doc="stable id of this runner"),
    Field("nickname", str, high=MAX_TEXT, doc="shown on the screen (default: participant_id)"),
    Field("pin", str, True, high=64, doc="the session PIN"),
    Field("runner", str, default="", high=MAX_TEXT, doc="ollama, llamacpp, lmstudio, ..."),
    Field("model", str, default="", high=MAX_TEXT, doc="model name, free text"),
)
TELAO_REGISTER = (
    Field("view", str, default="arena", high=32, doc='"arena" (default), "voting" (no token_update), ...'),
)
TOKEN = (
    Field("round", int, True, low=0, doc="round index from the challenge"),
    Field("participant_id", str, high=MAX_TEXT, doc="must be the registered one"),
    Field("seq", int, True, low=0, high=10_000_000, doc="0, 1, 2, ... per round"),
    Field("content", str, default="", doc="the token text; may be empty"),
)
COMPLETE = (
    Field("round", int, True, low=0, doc="round index"),
    Field("participant_id", str, high=MAX_TEXT, doc="must be the registered one"),
    Field("tokens", int, low=0, doc="tokens generated, as the runner counts them"),
    Field("latency_ms_first_token", float, low=0, doc="runner's own time to first token"),
    Field("duration_ms", float, low=0, doc="runner's own generation time"),
    Field("model_info", dict, doc="{name, runner, device?}"),
)
RUNNER_ERROR = (
    Field("round", int, low=0, doc="round index"),
    Field("participant_id", str, high=MAX_TEXT, doc="must be the registered one"),
    Field("code", str, default="", high=MAX_TEXT, doc="e.g. GENERATION_FAILED"),
    Field("message", str, default="", high=10_000, doc="what went wrong"),
)


def require_runner(peer: Peer, m: dict[str, Any]) -> str:
    """The participant this socket registered as, which is the only one it may speak for."""
    if peer.participant_id is None:
        raise ClientError("Register before sending this message", "NOT_REGISTERED")
    if m["participant_id"] not in (None, peer.participant_id):
        raise Forbidden(f"This connection is registered as {peer.participant_id}, not {m['participant_id']}",
                        "WRONG_PARTICIPANT")
    return peer.participant_id


async def on_register(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    if peer.participant_id not in (None, m["participant_id"]):
        # One connection speaks for one participant; a second identity would leave the first
        # one listed as present on a socket that no longer answers for it.
        raise Conflict(f"This connection is registered as {peer.participant_id}; open another connection "
                       f"for {m['participant_id']}", "ALREADY_REGISTERED")
    arena = server.arena
    session = arena.require_session()
    wait_s, everyone_wait_s = server.pin_throttle.wait_s(peer.address), server.pin_total_throttle.wait_s("")
    if wait_s or everyone_wait_s:
        whose = "from your address" if wait_s else "on this server"
        wait_s = max(wait_s, everyone_wait_s)
        raise TooMany(f"Too many wrong PINs {whose}; try again in {math.ceil(wait_s)} s", wait_s, "PIN_THROTTLED")
    # Count the attempt before bcrypt answers, or guesses sent at once on many connections
    # would all be checked before the first failure was counted.
    server.pin_throttle.add(peer.address)
    server.pin_total_throttle.add("")
    if not await arena.verify_pin(session, m["pin"]):
        raise ClientError("Invalid PIN.", "INVALID_PIN")
    server.pin_throttle.forgive(peer.address)           # the right PIN is not a guess
    server.pin_total_throttle.forgive("")
    pid = m["participant_id"]
    async with arena.lock:
        if arena.session is not session:
            raise ClientError("A new session started; reconnect with the new PIN.", "SESSION_ENDED")
        if pid in session.kicked:
            raise Forbidden("The host removed you from this session", "KICKED")
        holder = server.hub.runners.get(pid)
        if holder is not None and holder is not peer and holder.address != peer.address:
            # Ids are shown on the screen; only the machine holding one may replace its connection.
            raise Conflict(f"'{pid}' is connected from another machine; choose another participant id",
                           "ID_IN_USE")
        row = await server.db.run(register_participant, session.id, {**m, "nickname": m["nickname"] or pid})
        server.hub.add_runner(peer, row)
    reply = {"type": "registered", "session_id": session.id, "participant_id": pid}
    live = arena.running_round()
    if live is not None:
        gen = live.generations.get(pid) or Generation(pid)     # only a read: no empty card in liveTokens
        reply["resume"] = {"round": live.index, "next_seq": gen.next_seq, "missing": gen.missing()}
    peer.send_json(reply)
    log.info("WS_REGISTERED %s", pid)
    server.hub.publish_screens(msg_participant_registered(row))
    server.event("participant_registered", "participant", pid, "participant", pid,
                 {"nickname": row["nickname"], "runner": row["runner"], "model": row["model"]})


async def on_telao_register(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    peer.view = m["view"]
    server.hub.screens.add(peer)
    peer.send_json({"type": "registered_telao", "view": peer.view})
    snapshot = await server.snapshot()
    if snapshot is not None:
        peer.send_json(snapshot)


async def on_token(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    pid = require_runner(peer, m)
    config = server.config
    gen = server.arena.accept_token(pid, m["round"], m["seq"], m["content"], config.max_tokens_per_generation,
                                    config.max_answer_chars)
    if gen is None:
        return                                          # a duplicate seq: already shown
    if len(gen.tokens) == 1:
        server.event("first_token_received", "participant", pid, metadata={"round": m["round"]})
    server.hub.publish_screens({"type": "token_update", "participant_id": pid, "round": m["round"], "seq": m["seq"],
                                "content": m["content"], "total_tokens": len(gen.tokens)}, tokens=True)


async def on_complete(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    pid = require_runner(peer, m)
    report = {**m, **{key: round(m[key]) for key in ("latency_ms_first_token", "duration_ms") if m[key] is not None}}
    async with server.arena.lock:
        live = server.arena.live_round(m["round"])
        metrics = await server.save_answer(live, live.generation(pid), report)
    log.info("WS_COMPLETE %s round %d: %d tokens", pid, live.index, metrics["tokensReceived"])
    server.hub.publish_screens(msg_completion(live.index, metrics))
    server.event("generation_completed", "participant", pid, "round", live.id,
                 {"roundIndex": live.index, "tokens": metrics["tokens"], "durationMs": metrics["durationMs"],
                  "latencyFirstTokenMs": metrics["latencyFirstTokenMs"], "tpsAvg": metrics["tpsAvg"]})


async def on_error(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    pid = require_runner(peer, m)
    log.warning("runner %s reported %s: %s", pid, m["code"], m["message"])
    server.event("generation_failed", "participant", pid, "participant", pid,
                 {"round": m["round"], "code": m["code"], "message": m["message"]})


ON_MESSAGE: dict[str, tuple[tuple[Field, ...], Callable[[Server, Peer, dict[str, Any]], Awaitable[None]]]] = {
    "register": (REGISTER, on_register),
    "telao_register": (TELAO_REGISTER, on_telao_register),
    "token": (TOKEN, on_token),
    "complete": (COMPLETE, on_complete),
    "error": (RUNNER_ERROR, on_error),
}


async def dispatch(server: Server, peer: Peer, text: str) -> None:
    """Handle one text frame; whatever is wrong with it is answered with an `error` message."""
    kind = None
    try:
        message = parse_json_object(text, "The message")
        kind = message.get("type")
        if not isinstance(kind, str) or kind not in ON_MESSAGE:
            raise ClientError(f"Unknown message type {kind!r}; expected one of {', '.join(ON_MESSAGE)}")
        spec, handler = ON_MESSAGE[kind]
        await handler(server, peer, parse_fields(message, spec))
    except ClientError as exc:
        peer.send_json(msg_error(str(exc), exc.code))
    except sqlite3.Error as exc:
        log.error("database error on a %s message: %s", kind, exc)
        peer.send_json(msg_error("The server could not save this; please send it again", "SERVER_BUSY"))
    except Exception:
        # A bug must not leave a runner's socket open and unread in the middle of a round.
        log.exception("unexpected error on a %r message", kind)
        peer.send_json(msg_error("Internal error; the server log has the details", "INTERNAL"))


def turned_away(server: Server, peer: Peer) -> bool:
    """Send away a connection beyond WS_CONNECTIONS_PER_ADDRESS, with an error it can show; say if it was.

    The host's addresses are exempt: a proxy or the club's load test there speaks for many.
    """
    limit = server.config.ws_connections_per_address
    if server.is_host(peer.address) or sum(p.address == peer.address for p in server.hub.peers) <= limit:
        return False
    log.warning("WS_REFUSED %s: more than %d connections", peer.address, limit)
    peer.send_json(msg_error(f"Too many connections from your address (at most {limit}); close one and "
                             "try again", "TOO_MANY_CONNECTIONS"))
    peer.close(WSCloseCode.TRY_AGAIN_LATER, "too many connections from your address")
    return True


async def ws_endpoint(request: web.Request) -> web.WebSocketResponse:
    """One connection: read frames in order until it closes, then forget it."""
    server = request.app[server_key]
    config = server.config
    check_origin(request, config)
    ws = web.WebSocketResponse(autoping=False, compress=False, max_msg_size=config.ws_max_payload, timeout=1.0)
    await ws.prepare(request)
    peer = Peer(ws, request, client_address(request, config), config.peer_queue_limit, config.peer_queue_chars)
    server.hub.peers.add(peer)
    try:
        if turned_away(server, peer):
            await peer.writer                           # the error, then the close (bounded by `timeout`)
            return ws
        async for msg in ws:
            peer.last_heard = time.monotonic()
            if msg.type is WSMsgType.TEXT:
                await dispatch(server, peer, msg.data)
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.BINARY:
                peer.send_json(msg_error("Binary frames are not supported; send JSON text", "INVALID_INPUT"))
            elif msg.type is WSMsgType.ERROR:
                break
    finally:
        await server.leave(peer)
    return ws


# =============================================================================
# HTTP: the host's, the screens' and the phones' routes
# =============================================================================

Params = dict[str, Any]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


def client_address(request: web.Request, config: Config) -> str:
    """The caller's address: the socket's, or X-Forwarded-For's first hop behind a trusted proxy."""
    if config.trust_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.remote or ""


def require_host(server: Server, request: web.Request) -> None:
    """Host routes answer the host's own machine, or anyone holding the admin token."""
    if server.acts_as_host(request):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not token and server.is_host(client_address(request, server.config)):
        raise Forbidden("A page from another site cannot act as the host: open it from this machine, list its "
                        "origin in CORS_ORIGINS, or send 'Authorization: Bearer <admin token>'", "FOREIGN_ORIGIN")
    if not token:
        raise Unauthorized("This is a host route: call it from the host's machine or send "
                           "'Authorization: Bearer <admin token>'")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.config.admin_token.encode()):
        raise Forbidden("Wrong admin token")


def is_host_request(server: Server, request: web.Request) -> bool:
    """Whether the caller may see what only the host sees (the plain PIN): the same rule as host routes."""
    try:
        require_host(server, request)
    except ClientError:
        return False
    return True


def allowed_origin(config: Config, origin: str) -> str | None:
    return origin if "*" in config.cors_origins or origin in config.cors_origins else None


def check_origin(request: web.Request, config: Config) -> None:
    """Refuse a browser WebSocket from a page on another origin that CORS_ORIGINS does not allow."""
    origin = request.headers.get("Origin")
    if origin and not allowed_origin(config, origin) and origin.split("://")[-1] != request.host:
        raise Forbidden("Cross-origin WebSocket connection rejected")


async def session_round(server: Server, round_id: str) -> dict[str, Any]:
    row = await server.db.run(get_round, round_id)
    if row["sessionId"] != server.arena.require_session().id:
        raise Conflict("That round belongs to an earlier session")
    return row


# --- session and presence ----------------------------------------------------

async def get_health(server: Server, request: web.Request, p: Params) -> web.Response:
    return json_response({"status": "ok", "timestamp": now_ms(), "version": __version__,
                          "database": server.db.error or "ok", "connections": len(server.hub.peers)})


async def post_session(server: Server, request: web.Request, p: Params) -> web.Response:
    """Start a new session with a fresh PIN; the previous session's runners are sent away."""
    pin = "".join(secrets.choice("0123456789") for _ in range(p["pin_length"] or server.config.pin_length))
    pin_hash = await asyncio.to_thread(bcrypt.hashpw, pin.encode(), bcrypt.gensalt(server.config.bcrypt_rounds))
    arena, hub = server.arena, server.hub
    async with arena.lock:
        live = arena.running_round()
        if live is not None:
            await server.rescue(live)
        await server.flush()
        row = await server.db.run(create_session, pin, pin_hash.decode())
        sent_away = list(hub.runners.values())
        hub.runners.clear()
        arena.start_session(row)
    for peer in sent_away:
        peer.participant_id = None
        peer.send_json(msg_error("A new session started; reconnect with the new PIN.", "SESSION_ENDED"))
        peer.close(WSCloseCode.OK, "session ended")
    server.event("session_created", "admin", metadata={"disconnectedPreviousParticipants": len(sent_away)})
    hub.publish_screens(await server.snapshot())
    return json_response({"session_id": row["id"], "id": row["id"], "pin": pin, "created_at": iso(row["createdAt"]),
                          "status": "active", "disconnected_participants": len(sent_away)})


async def get_session(server: Server, request: web.Request, p: Params) -> web.Response:
    session = server.arena.require_session()
    row = await server.db.run(session_row, session.id)
    participants = await server.db.run(session_participants, session.id)
    rounds = await server.db.run(session_rounds, session.id)
    with_pin = is_host_request(server, request)
    return json_response({**session_json(row, with_pin),
                          "participants": [participant_json(r, r["id"] in server.hub.runners) for r in participants],
                          "rounds": [round_json(r) for r in rounds]})


async def get_presence(server: Server, request: web.Request, p: Params) -> web.Response:
    session = server.arena.require_session()
    participants = server.hub.presence()
    return json_response({"sessionId": session.id, "connectedCount": len(participants), "participants": participants})


async def post_participants_kick(server: Server, request: web.Request, p: Params) -> web.Response:
    """Remove a participant for the rest of the session; their answers and votes stay."""
    pid = p["participant_id"]
    async with server.arena.lock:
        session = server.arena.require_session()
        await server.db.run(kick_participant, session.id, pid)
        session.kicked.add(pid)
        peer = server.hub.runners.pop(pid, None)
    if peer is not None:
        peer.participant_id = None
        peer.send_json(msg_error("The host removed you from this session", "KICKED"))
        peer.close(WSCloseCode.POLICY_VIOLATION, "kicked by the host")
        server.hub.publish_screens(msg_participant_disconnected(pid))
    server.event("participant_kicked", "admin", None, "participant", pid)
    return json_response({"status": "ok", "participant_id": pid, "was_connected": peer is not None})


# --- rounds --------------------------------------------------------------------

async def post_rounds(server: Server, request: web.Request, p: Params) -> web.Response:
    async with server.arena.lock:
        row = await server.db.run(create_round, server.arena.require_session().id, p)
    server.event("round_created", "admin", None, "round", row["id"],
                 {"index": row["index"], "prompt": row["prompt"], "maxTokens": row["maxTokens"],
                  "temperature": row["temperature"], "deadlineMs": row["deadlineMs"], "svgMode": p["svg_mode"]})
    return json_response(round_json(row))


async def post_rounds_start(server: Server, request: web.Request, p: Params) -> web.Response:
    """Start a round: every runner gets the challenge, every screen clears."""
    arena = server.arena
    async with arena.lock:
        row = await session_round(server, p["round_id"])
        if row["startedAt"] is not None:
            raise Conflict("Round already started")
        running = arena.running_round()
        if running is not None:
            raise Conflict(f"Round {running.index} is still running; stop it first")
        await server.flush()                            # the previous round leaves memory only once saved
        row = await server.db.run(update_round, row["id"], {"startedAt": now_ms()})
        arena.start_round(row)
    session_id = arena.require_session().id
    server.hub.publish_runners(msg_challenge(session_id, row))
    server.hub.publish_screens({"type": "round_started", "round": row["index"], "session_id": session_id})
    await server.publish_round(row)
    server.event("round_started", "admin", None, "round", row["id"], {"index": row["index"]})
    return json_response(round_json(row))


async def post_rounds_stop(server: Server, request: web.Request, p: Params) -> web.Response:
    """Stop a round: rescue unfinished answers, then open voting (even with no answers)."""
    arena = server.arena
    async with arena.lock:
        arena.require_session()
        running = arena.running_round()
        if p["round_id"] is None and running is None:
            raise Conflict("No round is running")
        row = await session_round(server, p["round_id"] or running.id)
        if row["startedAt"] is None:
            raise Conflict("Round has not started")
        if row["endedAt"] is not None:
            raise Conflict("Round already ended")
        await server.rescue(arena.rounds[row["index"]])
        row = await server.db.run(update_round, row["id"], {"endedAt": now_ms(), "votingStatus": "open"})
        await server.publish_round(row)
        answers = len(await server.db.run(round_metrics, row["id"]))
    server.event("round_stopped", "admin", None, "round", row["id"], {"index": row["index"], "responses": answers})
    server.event("voting_opened", "system", None, "round", row["id"])
    return json_response(round_json(row))


async def get_rounds_current(server: Server, request: web.Request, p: Params) -> web.Response:
    server.arena.require_session()
    live = server.arena.running_round()
    if live is None:
        raise NotFound("No active round")
    return json_response({**round_json(live.row), "liveTokens": live_tokens(live)})


async def get_round_responses(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.flush()                                # tokens that trailed their `complete`
    row = await server.db.run(get_round, request.match_info["round_id"])
    return json_response({"responses": await server.db.run(responses, row["id"]), "svgMode": bool(row["svgMode"]),
                          "votingStatus": row["votingStatus"], "prompt": row["prompt"], "round_id": row["id"]})


# --- voting and the reveal -------------------------------------------------------

async def change_round(server: Server, round_id: str | None, check: Callable[[dict[str, Any], int], dict[str, Any]],
                       event_type: str) -> web.Response:
    """One step of the voting ceremony: `check` vets the round and names the columns to change."""
    async with server.arena.lock:
        session = server.arena.require_session()
        row = await (session_round(server, round_id) if round_id else server.db.run(voting_round, session.id))
        answers = len(await server.db.run(round_metrics, row["id"]))
        row = await server.db.run(update_round, row["id"], check(row, answers))
        await server.publish_round(row)
    metadata = None
    if event_type == "position_revealed":
        metadata = {"position": answers - row["revealedCount"] + 1, "revealedCount": row["revealedCount"],
                    "totalParticipants": answers}
    server.event(event_type, "admin", None, "round", row["id"], metadata)
    return json_response(round_json(row))


def closing_vote(row: dict[str, Any], answers: int) -> dict[str, Any]:
    if row["votingStatus"] != "open":
        raise Conflict("Voting is not open for this round")
    return {"votingStatus": "closed"}


def starting_reveal(row: dict[str, Any], answers: int) -> dict[str, Any]:
    if row["endedAt"] is None:
        raise Conflict("The round has not ended yet")
    if row["votingStatus"] == "open":
        raise Conflict("Close voting before the reveal")
    return {"votingStatus": "revealed", "revealedCount": 0}


def revealing_next(row: dict[str, Any], answers: int) -> dict[str, Any]:
    if row["votingStatus"] != "revealed":
        raise Conflict("Start the reveal first")
    if row["revealedCount"] >= answers:
        raise Conflict("Every position is already revealed")
    return {"revealedCount": row["revealedCount"] + 1}


async def post_close_voting(server: Server, request: web.Request, p: Params) -> web.Response:
    return await change_round(server, request.match_info["round_id"], closing_vote, "voting_closed")


async def post_votes_close(server: Server, request: web.Request, p: Params) -> web.Response:
    return await change_round(server, p["round_id"], closing_vote, "voting_closed")


async def post_reveal(server: Server, request: web.Request, p: Params) -> web.Response:
    return await change_round(server, request.match_info["round_id"], starting_reveal, "reveal_started")


async def post_reveal_next(server: Server, request: web.Request, p: Params) -> web.Response:
    return await change_round(server, request.match_info["round_id"], revealing_next, "position_revealed")


def voter_hash(server: Server, request: web.Request, voter_id: str | None) -> str:
    """Votes are keyed by a hash of the phone's voter id (or of its address, without one)."""
    return sha256_hex(voter_id or client_address(request, server.config))


async def post_votes(server: Server, request: web.Request, p: Params) -> web.Response:
    vote = await server.db.run(cast_vote, {
        **p, "voter_hash": voter_hash(server, request, p["voter_id"]),
        "user_agent": p["user_agent"] or request.headers.get("User-Agent", "")[:MAX_TEXT]})
    return json_response(vote_json(vote))


async def get_votes_mine(server: Server, request: web.Request, p: Params) -> web.Response:
    votes = await server.db.run(voter_votes, p["round_id"], voter_hash(server, request, p["voter_id"]))
    return json_response(votes)


async def get_scoreboard(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.flush()
    if p["round_id"]:
        row = await server.db.run(get_round, p["round_id"])
    else:
        row = await server.db.run(scoreboard_round, server.arena.require_session().id)
    return json_response({"scoreboard": await server.db.run(scoreboard, row["id"]), "round_id": row["id"],
                          "round_index": row["index"], "svgMode": bool(row["svgMode"]),
                          "votingStatus": row["votingStatus"], "revealedCount": row["revealedCount"]})


async def get_metrics(server: Server, request: web.Request, p: Params) -> web.Response:
    return json_response(await server.db.run(session_metrics, server.arena.require_session().id))


# --- exports -----------------------------------------------------------------------

ANSWER_COLUMNS = (
    # The club's twelve columns first, in their order, so its scripts keep reading them.
    ("round", "roundIndex"), ("round_started_at", "roundStartedAt"), ("round_ended_at", "roundEndedAt"),
    ("participant_id", "participantId"), ("nickname", "nickname"), ("tokens", "tokens"),
    ("latency_first_token_ms", "latencyFirstTokenMs"), ("duration_ms", "durationMs"), ("tps_avg", "tpsAvg"),
    ("votes", "votes"), ("avg_score", "avgScore"), ("generated_content", "generatedContent"),
    ("model", "model"), ("runner", "runner"), ("tokens_received", "tokensReceived"), ("seq_gaps", "seqGaps"),
    ("client_latency_first_token_ms", "clientLatencyFirstTokenMs"), ("client_duration_ms", "clientDurationMs"),
    ("rescued", "rescued"),
)
EVENT_COLUMNS = ("id", "timestamp", "eventType", "actorType", "actorId", "targetType", "targetId", "metadata")


def csv_cell(column: str, value: Any) -> Any:
    if column.endswith("At") or column == "timestamp":
        return iso(value) or ""
    if column in ("tpsAvg", "avgScore"):
        return f"{value or 0:.2f}"
    return "" if value is None else value


def csv_text(header: Iterable[str], columns: Iterable[str], rows: Iterable[dict[str, Any]], quote_all: bool) -> str:
    out = io.StringIO()
    # CRLF line ends (RFC 4180): with "\n", the csv module (3.11 at least) leaves a lone CR in a
    # nickname or an answer unquoted, and CSV readers then split the row there.
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows([csv_cell(c, row[c]) for c in columns] for row in rows)
    return out.getvalue()


def attachment(text: str, content_type: str, filename: str) -> web.Response:
    return web.Response(text=text, content_type=content_type, charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def get_export_csv(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.flush()
    session_id = await server.db.run(find_session, p["session_id"])
    rows = await server.db.run(session_answers, session_id)
    header, columns = zip(*ANSWER_COLUMNS)
    return attachment(csv_text(header, columns, rows, False), "text/csv", f"session-{session_id}.csv")


async def get_export_events_csv(server: Server, request: web.Request, p: Params) -> web.Response:
    session_id = await server.db.run(find_session, p["session_id"])
    rows = await server.db.run(session_events, session_id)
    return attachment(csv_text(EVENT_COLUMNS, EVENT_COLUMNS, rows, True), "text/csv", f"events-{session_id}.csv")


async def get_export_all_json(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.flush()                                # include the tokens of the last second
    session_id = await server.db.run(find_session, p["session_id"])
    tree = await server.db.run(session_tree, session_id)
    return attachment(dumps(iso_times(tree)), "application/json", f"session-{session_id}.json")


# =============================================================================
# Routes and docs: one table is the router, the validator, /openapi.json and /docs
# =============================================================================

Handler = Callable[[Server, web.Request, Params], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    host: bool = False                  # host-only: host addresses, or the admin token
    body: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()


ROUND_ID = Field("round_id", str, True, high=MAX_TEXT, doc="a round's id")
SESSION_ID = Field("session_id", str, high=MAX_TEXT, doc="a session's id (default: the active one)")

ROUTES = (
    Route("GET", "/health", get_health, "Liveness, version and database state."),
    Route("POST", "/session", post_session, "Start a new session with a new PIN; ends the previous one "
          "and disconnects its runners.", True,
          (Field("pin_length", int, low=4, high=12, doc="digits in the PIN (default: PIN_LENGTH)"),)),
    Route("GET", "/session", get_session, "The active session with its participants and rounds "
          "(the PIN only for the host)."),
    Route("GET", "/presence", get_presence, "The runners connected right now."),
    Route("POST", "/rounds", post_rounds, "Create the session's next round.", True, (
        Field("prompt", str, True, low=1, high=MAX_PROMPT, doc="the challenge"),
        Field("max_tokens", int, default=400, low=1, high=1_000_000, doc="token budget per runner"),
        Field("temperature", float, default=0.8, low=0, high=2, doc="sampling temperature"),
        Field("deadline_ms", int, default=90_000, low=1000, high=86_400_000, doc="advisory time limit"),
        Field("seed", int, low=0, high=2**53, doc="sampling seed sent to every runner"),
        Field("svg_mode", bool, default=False, doc="answers are SVG drawings"))),
    Route("POST", "/rounds/start", post_rounds_start, "Start a round: the challenge goes to every runner.", True,
          (ROUND_ID,)),
    Route("POST", "/rounds/stop", post_rounds_stop, "Stop the running round, rescue unfinished answers and "
          "open voting.", True, (replace(ROUND_ID, required=False, doc="default: the running round"),)),
    Route("GET", "/rounds/current", get_rounds_current, "The running round with every runner's tokens so far."),
    Route("GET", "/rounds/{round_id}/responses", get_round_responses, "A round's answers, for the voting page."),
    Route("POST", "/rounds/{round_id}/close-voting", post_close_voting, "Close voting on a round.", True),
    Route("POST", "/votes/close", post_votes_close, "Close voting (the round given, else the one open).", True,
          (replace(ROUND_ID, required=False, doc="default: the round with voting open"),)),
    Route("POST", "/rounds/{round_id}/reveal", post_reveal, "Start the reveal (after voting closed).", True),
    Route("POST", "/rounds/{round_id}/reveal-next", post_reveal_next, "Reveal the next position, "
          "last place first.", True),
    Route("POST", "/votes", post_votes, "Vote 0-5 for one answer; one immutable vote per voter and answer.", False, (
        ROUND_ID,
        Field("participant_id", str, True, high=MAX_TEXT, doc="whose answer"),
        Field("score", int, True, low=0, high=5, doc="0 to 5"),
        Field("voter_id", str, high=MAX_TEXT, doc="the phone's id (default: its address); stored hashed"),
        Field("response_time", int, low=0, high=86_400_000, doc="ms the voter took"),
        Field("user_agent", str, high=MAX_TEXT, doc="default: the User-Agent header"))),
    Route("GET", "/votes/mine", get_votes_mine, "The votes this voter already cast in a round.", query=(
        ROUND_ID, Field("voter_id", str, high=MAX_TEXT, doc="the phone's id (default: its address)"))),
    Route("GET", "/scoreboard", get_scoreboard, "A round's ranking (default: the latest ended round, "
          "else the running one).", query=(replace(ROUND_ID, required=False),)),
    Route("GET", "/metrics", get_metrics, "Totals for the active session."),
    Route("GET", "/export.csv", get_export_csv, "Every answer of a session as CSV.", True, query=(SESSION_ID,)),
    Route("GET", "/export-events.csv", get_export_events_csv, "A session's event log as CSV.", True,
          query=(SESSION_ID,)),
    Route("GET", "/export-all.json", get_export_all_json, "A whole session as JSON (no PIN).", True,
          query=(SESSION_ID,)),
    Route("POST", "/participants/kick", post_participants_kick, "Disconnect a participant and refuse them for "
          "the rest of the session; their data stays.", True,
          (Field("participant_id", str, True, high=MAX_TEXT, doc="who"),)),
)


def endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler for a route: host check, then body and query validation."""
    async def handle(request: web.Request) -> web.StreamResponse:
        server = request.app[server_key]
        if route.host:
            require_host(server, request)
        params: Params = {}
        if route.body:
            params.update(parse_fields(parse_json_object(await request.read(), "The request body"), route.body))
        if route.query:
            params.update(parse_fields(request.query, route.query, from_text=True))
        return await route.handler(server, request, params)
    return handle


FIELD_SCHEMAS = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
                 bool: {"type": "boolean"}, dict: {"type": "object"}}


def field_schema(f: Field) -> dict[str, Any]:
    schema = {**FIELD_SCHEMAS[f.kind], "description": f.doc}
    limits = ("minLength", "maxLength") if f.kind is str else ("minimum", "maximum")
    schema.update({key: value for key, value in zip(limits, (f.low, f.high)) if value is not None})
    if f.default is not None:
        schema["default"] = f.default
    return schema


def openapi() -> dict[str, Any]:
    """An OpenAPI 3 description of ROUTES."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {"summary": route.summary, "responses": {"200": {"description": "OK"},
                                                                              "4XX": {"description": "{error}"}}}
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in ("round_id",) if "{" + name + "}" in route.path]
        parameters += [{"name": f.name, "in": "query", "required": f.required, "schema": field_schema(f)}
                       for f in route.query]
        if parameters:
            operation["parameters"] = parameters
        if route.body:
            schema = {"type": "object", "properties": {f.name: field_schema(f) for f in route.body},
                      "required": [f.name for f in route.body if f.required]}
            operation["requestBody"] = {"required": any(f.required for f in route.body),
                                        "content": {"application/json": {"schema": schema}}}
        if route.host:
            operation["security"] = [{}, {"adminToken": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {"openapi": "3.0.3", "info": {"title": "Gambiarra arena server", "version": __version__,
                                         "description": "Every path is also served under /api."},
            "paths": paths,
            "components": {"securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}}}


def field_rows(spec: Iterable[Field]) -> str:
    return "".join(f"<li><code>{f.name}</code> ({KIND_NAMES[f.kind]}{', required' if f.required else ''})"
                   f" {html.escape(f.doc)}</li>" for f in spec)


def docs_page() -> str:
    """A self-contained HTML page of every route and message: meetups are often offline."""
    routes = "".join(
        f"<tr><td><b>{r.method}</b></td><td><code>{html.escape(r.path)}</code></td>"
        f"<td>{'host' if r.host else 'anyone'}</td><td>{html.escape(r.summary)}"
        f"<ul>{field_rows(r.body + r.query)}</ul></td></tr>" for r in ROUTES)
    messages = "".join(f"<tr><td><code>{kind}</code></td><td><ul>{field_rows(spec)}</ul></td></tr>"
                       for kind, (spec, _) in ON_MESSAGE.items())
    style = ("body{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em}"
             "td{border-top:1px solid #ccc;padding:.4em;vertical-align:top}ul{margin:.2em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Gambiarra arena API</title>"
            f"<style>{style}</style></head><body><h1>Gambiarra arena server {__version__}</h1>"
            f"<p>Every route is also served under <code>/api</code>. Host routes answer the host's own machine, or "
            f"<code>Authorization: Bearer &lt;admin token&gt;</code>. Errors are <code>{{\"error\": ...}}</code>. "
            f"Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"
            f"<h2>HTTP</h2><table>{routes}</table>"
            f"<h2>WebSocket <code>/ws</code>: messages to the server</h2><table>{messages}</table>"
            f"<p>The server sends: <code>registered, challenge, heartbeat, error, registered_telao, state_snapshot, "
            f"participant_registered, participant_disconnected, round_started, round_state, token_update, "
            f"completion</code>.</p></body></html>")


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi())


async def get_docs(request: web.Request) -> web.Response:
    return web.Response(text=docs_page(), content_type="text/html")


async def get_redoc(request: web.Request) -> web.Response:
    raise web.HTTPFound("/docs")


STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def static_file(path: Path) -> web.Response:
    """A page of the club's browser client, never cached (a stale client once drew blank SVGs)."""
    if not path.is_file():
        raise NotFound(f"{path.name} is not installed on this server (see CLIENT_DIR)")
    return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix], charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def get_client_page(request: web.Request) -> web.Response:
    page = "client.html" if request.path == "/client" else "agent.html"
    return static_file(request.app[server_key].config.client_dir / page)


async def get_client_asset(request: web.Request) -> web.Response:
    return static_file(request.app[server_key].config.client_dir / "shared" / request.match_info["name"])


# =============================================================================
# App: middlewares, lifecycle and the route table
# =============================================================================

server_key = web.AppKey("server", Server)
MAX_BODY_BYTES = 1024 * 1024
UNTHROTTLED_PATHS = {"/ws", "/docs", "/redoc", "/openapi.json", "/health", "/client", "/agent"}


@web.middleware
async def cors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Answer preflights and label responses for the origins CORS_ORIGINS allows."""
    config = request.app[server_key].config
    origin = request.headers.get("Origin", "")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
    else:
        response = await handler(request)
    if origin and allowed_origin(config, origin) and not response.prepared:
        response.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                                 "Access-Control-Allow-Credentials": "true",
                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                 "Access-Control-Allow-Methods": "GET, POST, OPTIONS"})
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure becomes JSON {"error": ...} with a 4xx, or a 503 when the disk refuses a write."""
    try:
        return await handler(request)
    except ClientError as exc:
        response = json_response({"error": str(exc), "code": exc.code}, exc.status)
        if isinstance(exc, TooMany):
            response.headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"No route {request.method} {request.path}", 405: f"No route {request.method} {request.path}",
                   413: f"The request body is over the limit of {MAX_BODY_BYTES} bytes"}.get(exc.status, exc.reason)
        return json_response({"error": message, "code": exc.reason.upper().replace(" ", "_")}, exc.status)
    except sqlite3.Error as exc:
        log.error("database error on %s %s: %s", request.method, request.path, exc)
        return json_response({"error": f"The database refused the write ({exc}); check the disk and the "
                                       "database file. Live rounds keep streaming.", "code": "DATABASE_ERROR"}, 503)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return json_response({"error": "Internal error; the server log has the details", "code": "INTERNAL"}, 500)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """A generous per-address HTTP limit; never for the host's addresses, WebSockets or docs."""
    server = request.app[server_key]
    address = client_address(request, server.config)
    path = request.path.removeprefix("/api")
    if path not in UNTHROTTLED_PATHS and not path.startswith("/client-assets/") and not server.is_host(address):
        wait_s = server.http_throttle.wait_s(address)
        if wait_s:
            raise TooMany(f"Too many requests from your address; try again in {math.ceil(wait_s)} s", wait_s)
        server.http_throttle.add(address)
    return await handler(request)


async def repeat(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await action()


async def running_server(app: web.Application) -> Any:
    """Open the database and resume, run the background loops, and save everything at exit."""
    server = app[server_key]
    server.db = Database(server.config.database)
    await server.load()
    loops = [asyncio.create_task(repeat(server.config.flush_interval_s, server.flush)),
             asyncio.create_task(repeat(server.config.ws_heartbeat_interval_s, server.keep_alive))]
    yield
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    await server.flush()
    server.db.close()


async def close_connections(app: web.Application) -> None:
    """Close every socket with 1001 (going away), giving each a moment for the handshake."""
    peers = list(app[server_key].hub.peers)
    for peer in peers:
        peer.close(WSCloseCode.GOING_AWAY, "server shutdown")
    if peers:
        await asyncio.wait([peer.writer for peer in peers], timeout=1.0)
    for peer in peers:
        if not peer.writer.done():
            peer.cut_off("shutdown")


def make_app(config: Config) -> web.Application:
    if not config.admin_token:
        config = replace(config, admin_token=secrets.token_urlsafe(16))
    app = web.Application(middlewares=[cors_middleware, error_middleware, rate_limit_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[server_key] = Server(config)
    app.cleanup_ctx.append(running_server)
    app.on_shutdown.append(close_connections)
    table = [web.get("/ws", ws_endpoint), web.get("/client", get_client_page), web.get("/agent", get_client_page),
             web.get(r"/client-assets/{name:[\w.-]+\.(?:js|css)}", get_client_asset)]
    api = [("GET", "/openapi.json", get_openapi), ("GET", "/docs", get_docs), ("GET", "/redoc", get_redoc)]
    api += [(route.method, route.path, endpoint(route)) for route in ROUTES]
    table += [web.route(method, prefix + path, handler) for method, path, handler in api for prefix in ("", "/api")]
    app.add_routes(table)
    return app


# =============================================================================
# Command line
# =============================================================================

def read_dotenv(path: Path) -> None:
    """Load KEY=VALUE lines from `path` into the environment, never overriding what is set."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            os.environ.setdefault(key.strip().removeprefix("export "), value.strip().strip("'\""))


def database_path(url: str) -> Path:
    """DATABASE_URL as a path: a plain path, sqlite:///path or file:path."""
    for prefix in ("sqlite:///", "sqlite://", "file://", "file:"):
        if url.startswith(prefix):
            url = url[len(prefix):]
            break
    return Path(url.split("?")[0]).expanduser()


def option_value(default: Any, text: str) -> Any:
    """Parse option text into the type of the config field's default."""
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if isinstance(default, Path):
        return database_path(text)
    return type(default)(text)


def parse_config(argv: list[str]) -> Config:
    """Config from the command line, then the environment (and .env), then the defaults."""
    read_dotenv(HERE / ".env")
    parser = argparse.ArgumentParser(
        description="Gambiarra arena server. Every option can also be set by the environment variable named "
                    "in its help, or in a .env file beside this script.",
        epilog="Also: 'simulate' (fake runners, screens and voters) and 'bench' (measure); see their --help.")
    for f in fields(Config):
        env, doc = f.metadata["env"], f.metadata["help"]
        default = f.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        flag = "--" + env.lower().replace("_", "-")
        env_value = os.environ.get(env)
        value = option_value(default, env_value) if env_value is not None else default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", default=value, help=f"{doc} [{env}]")
        else:
            parser.add_argument(flag, dest=f.name, type=lambda text, d=default: option_value(d, text), default=value,
                                metavar=env, help=f"{doc} [{env}; default: {shown or 'none'}]")
    return Config(**vars(parser.parse_args(argv)))


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses, for the URLs participants type."""
    found = set()
    with contextlib.suppress(OSError):
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))     # a UDP connect sends nothing; it only picks the outgoing interface
        found.add(probe.getsockname()[0])
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_unspecified)


def banner(config: Config, listening: list[str], port: int) -> str:
    lan = lan_addresses()
    lines = [f"Gambiarra arena server {__version__}", f"  database      {config.database}",
             f"  listening on  port {port} of {', '.join(listening)}"]
    lines += [f"  runners:      ws://{address}:{port}/ws      screens and phones: http://{address}:{port}/api"
              for address in lan] or ["  (no LAN address found: runners on this machine use ws://127.0.0.1:"
                                      f"{port}/ws)"]
    lines += [f"  admin token   {config.admin_token}   (host routes from other machines: "
              "'Authorization: Bearer <token>')",
              f"  next step     curl -X POST http://127.0.0.1:{port}/session"]
    return "\n".join(lines)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then close every socket, save every token and exit."""
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    listening = []
    for host in config.hosts:
        try:
            await web.TCPSite(runner, host, config.port).start()
            listening.append(host)
        except OSError as exc:
            log.warning("cannot listen on %s port %d: %s", host, config.port, exc)
    if not listening:
        await runner.cleanup()
        raise SystemExit(f"could not listen on port {config.port}")
    port = runner.addresses[0][1]
    print(banner(app[server_key].config, listening, port), flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):      # Windows: Ctrl-C raises instead
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        print("shutting down: closing connections and saving tokens", flush=True)
        await runner.cleanup()


COMMANDS: dict[str, Callable[[list[str]], None]] = {}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
