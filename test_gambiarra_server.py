"""Tests for gambiarra_server.py: the real app on a loopback port, a real SQLite file,
and the clients a meetup has (runners and screens over `websockets`, the host and
the phones over HTTP). Sections mirror the server's, from pure code to the edges.
"""

from __future__ import annotations

import asyncio
import gc
import contextlib
import hashlib
import csv
import io
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import urllib.parse
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import gambiarra_server as gs


HERE = Path(__file__).resolve().parent
TIMEOUT_S = 5           # no single wait in a test may hang the suite for longer


# =============================================================================
# Actors: the host, a runner and a screen, as small helpers
# =============================================================================

class Host:
    """The host's curl, as an HTTP client; every call returns (status, JSON body)."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base = base
        self.http = http

    async def call(self, method: str, path: str, body: Any = None, expect: int | None = 200,
                   **kwargs: Any) -> Any:
        data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
        async with self.http.request(method, self.base + path, data=data, **kwargs) as response:
            text = await response.text()
            if expect is not None:
                assert response.status == expect, f"{method} {path}: {response.status} {text}"
            if response.content_type == "application/json":
                return json.loads(text)
            return text

    async def status(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
        async with self.http.request(method, self.base + path, data=data, **kwargs) as response:
            text = await response.text()
            return response.status, json.loads(text) if response.content_type == "application/json" else text

    async def new_session(self) -> str:
        return (await self.call("POST", "/session"))["pin"]

    async def new_round(self, prompt: str = "Write a haiku about llamas", **fields: Any) -> dict[str, Any]:
        return await self.call("POST", "/rounds", {"prompt": prompt, **fields})

    async def start(self, round_id: str) -> dict[str, Any]:
        return await self.call("POST", "/rounds/start", {"roundId": round_id})

    async def stop(self, round_id: str) -> dict[str, Any]:
        return await self.call("POST", "/rounds/stop", {"roundId": round_id})

    async def vote(self, round_id: str, participant_id: str, score: int, voter: str, expect: int = 200) -> Any:
        return await self.call("POST", "/votes", {"roundId": round_id, "participantId": participant_id,
                                                  "score": score, "voterId": voter}, expect=expect)


class Peer:
    """A WebSocket client: a runner or a screen."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: Any) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def recv(self, kind: str | None = None) -> dict[str, Any]:
        """The next message (of type `kind`, skipping others such as heartbeats)."""
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                message = json.loads(await self.ws.recv())
                if kind is None or message["type"] == kind:
                    return message

    async def quiet(self, seconds: float = 0.2) -> list[dict[str, Any]]:
        """Everything that arrives within `seconds` (to check what was *not* sent)."""
        seen = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    seen.append(json.loads(await self.ws.recv()))
        return seen


class Runner(Peer):
    """A participant's runner, speaking the club's protocol."""

    def __init__(self, ws: ClientConnection, participant_id: str) -> None:
        super().__init__(ws)
        self.participant_id = participant_id

    async def register(self, pin: str, nickname: str | None = None, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "register", "participant_id": self.participant_id,
                         "nickname": nickname or self.participant_id.title(), "pin": pin,
                         "runner": "ollama", "model": "llama3.1:8b", **extra})
        return await self.recv()

    async def token(self, round_index: int, seq: int, content: str) -> None:
        await self.send({"type": "token", "round": round_index, "participant_id": self.participant_id,
                         "seq": seq, "content": content})

    async def stream(self, round_index: int, words: list[str], start: int = 0) -> None:
        for seq, word in enumerate(words, start):
            await self.token(round_index, seq, word)

    async def complete(self, round_index: int, tokens: int, **extra: Any) -> None:
        await self.send({"type": "complete", "round": round_index, "participant_id": self.participant_id,
                         "tokens": tokens, "latency_ms_first_token": 120, "duration_ms": 900,
                         "model_info": {"name": "llama3.1:8b", "runner": "ollama"}, **extra})


class Room:
    """One running server and the ways to reach it."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base = base
        self.ws_url = base.replace("http", "ws", 1) + "/ws"
        self.host = Host(base, http)
        self.connections: list[ClientConnection] = []

    async def connect(self) -> ClientConnection:
        ws = await connect(self.ws_url)
        self.connections.append(ws)
        return ws

    async def close(self) -> None:
        for ws in self.connections:
            await ws.close()

    async def runner(self, participant_id: str, pin: str | None = None) -> Runner:
        runner = Runner(await self.connect(), participant_id)
        if pin is not None:
            reply = await runner.register(pin)
            assert reply["type"] == "registered", reply
        return runner

    async def screen(self, view: str | None = None) -> Peer:
        screen = Peer(await self.connect())
        await screen.send({"type": "telao_register", **({"view": view} if view else {})})
        assert (await screen.recv())["type"] == "registered_telao"
        return screen


WORDS = ["Lhamas ", "pastam ", "no ", "silício ", "🦙"]


# =============================================================================
# Fixtures
# =============================================================================

@pytest.fixture
def config(tmp_path: Path) -> gs.Config:
    return gs.Config(hosts=("127.0.0.1",), port=0, database=tmp_path / "arena.db", bcrypt_rounds=4,
                     flush_interval_s=0.05)


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def room(aiohttp_server: Any, config: gs.Config, http: aiohttp.ClientSession) -> Room:
    server = await aiohttp_server(gs.make_app(config), host="127.0.0.1")
    room = Room(str(server.make_url("")).rstrip("/"), http)
    yield room
    await room.close()


@pytest.fixture
async def pin(room: Room) -> str:
    return await room.host.new_session()


def db_rows(path: Path, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Read the database as the club's report scripts would, beside the running server."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql, args)]
    finally:
        conn.close()


class ServerProcess:
    """The server as a separate process, for kill -9 and SIGTERM."""

    def __init__(self, database: Path, *args: str) -> None:
        self.database = database
        self.args = args
        self.process: subprocess.Popen | None = None
        self.base = ""

    def start(self) -> str:
        command = [sys.executable, str(HERE / "gambiarra_server.py"), "--host", "127.0.0.1", "--port", "0",
                   "--database-url", str(self.database), "--bcrypt-rounds", "4", *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in self.process.stdout:
            if "listening on" in line:
                port = int(line.split("port ")[1].split()[0])
                self.base = f"http://127.0.0.1:{port}"
                return self.base
        raise AssertionError(f"server did not start: {self.process.stderr.read()}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()
        return code


@pytest.fixture
def server_process(tmp_path: Path):
    processes: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        process = ServerProcess(tmp_path / "arena.db", *args)
        processes.append(process)
        return process
    yield start
    for process in processes:
        if process.process and process.process.poll() is None:
            process.stop(signal.SIGKILL)


# =============================================================================
# Input fields
# =============================================================================

@pytest.mark.parametrize(("data", "message"), [
    ({}, "'prompt' is required"),
    ({"prompt": ""}, "'prompt' must be at least 1 characters"),
    ({"prompt": 7}, "'prompt' must be a string"),
    ({"prompt": "x", "maxTokens": "many"}, "'max_tokens' must be an integer"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"prompt": "x", "temperature": 9}, "'temperature' must be at most 2"),
    ({"prompt": "x", "temperature": True}, "'temperature' must be a number"),
    ({"prompt": "x", "svgMode": "yes"}, "'svg_mode' must be true or false"),
])
def test_round_fields_reject_bad_values_with_a_sentence(data: dict, message: str) -> None:
    """Each bad field is named, with what it should be."""
    spec = next(route.body for route in gs.ROUTES if route.path == "/rounds")
    with pytest.raises(gs.ClientError, match=message):
        gs.parse_fields(data, spec)


def test_fields_accept_camel_case_and_null_as_absent() -> None:
    """camelCase aliases work, and null means 'use the default'."""
    spec = next(route.body for route in gs.ROUTES if route.path == "/rounds")
    values = gs.parse_fields({"prompt": "x", "maxTokens": 50.0, "deadlineMs": None, "svgMode": True}, spec)
    assert values == {"prompt": "x", "max_tokens": 50, "temperature": 0.8, "deadline_ms": 90000, "seed": None,
                      "svg_mode": True}


# =============================================================================
# HTTP: session, rounds, voting
# =============================================================================

async def test_health_answers_at_root_and_under_api(room: Room) -> None:
    """The telão calls /api/...; scripts call the root."""
    for path in ("/health", "/api/health"):
        body = await room.host.call("GET", path)
        assert body["status"] == "ok" and body["database"] == "ok"


async def test_new_session_returns_pin_and_ids(room: Room) -> None:
    """POST /session works without a body and returns what the club's clients read."""
    body = await room.host.call("POST", "/session")
    assert body["session_id"] == body["id"]
    assert len(body["pin"]) == 6 and body["pin"].isdigit()
    assert body["created_at"].endswith("Z") and body["disconnected_participants"] == 0
    session = await room.host.call("GET", "/api/session")
    assert session["pin"] == body["pin"] and session["status"] == "active"
    assert session["participants"] == [] and session["rounds"] == []


async def test_pin_length_comes_from_the_body(room: Room) -> None:
    body = await room.host.call("POST", "/session", {"pinLength": 8})
    assert len(body["pin"]) == 8


async def test_rounds_are_numbered_from_one_with_the_club_defaults(room: Room, pin: str) -> None:
    first = await room.host.new_round()
    second = await room.host.new_round("Draw a cat", maxTokens=500, temperature=0.7, deadlineMs=120000,
                                       seed=42, svgMode=True)
    assert (first["index"], first["maxTokens"], first["temperature"], first["deadlineMs"]) == (1, 400, 0.8, 90000)
    assert first["votingStatus"] == "closed" and first["revealedCount"] == 0 and first["startedAt"] is None
    assert (second["index"], second["seed"], second["svgMode"]) == (2, 42, True)


async def test_a_full_round_from_challenge_to_reveal(room: Room, pin: str) -> None:
    """The evening in miniature: challenge, tokens on the screen, votes, ranking, reveal."""
    screen = await room.screen()
    snapshot = await screen.recv("state_snapshot")
    assert snapshot["round"] is None and snapshot["participants"] == []
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.new_round(seed=7)
    await room.host.start(rnd["id"])
    for runner in (ana, bia):
        challenge = await runner.recv("challenge")
        assert challenge == {"type": "challenge", "session_id": snapshot["session"]["id"], "round": 1,
                             "prompt": "Write a haiku about llamas", "max_tokens": 400, "temperature": 0.8,
                             "deadline_ms": 90000, "seed": 7}
    assert (await screen.recv("round_started"))["round"] == 1
    assert (await screen.recv("round_state"))["round"]["startedAt"] is not None
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, ["Sim."])
    await bia.complete(1, 1)
    updates = [await screen.recv("token_update") for _ in WORDS]
    assert [u["content"] for u in updates] == WORDS and updates[-1]["total_tokens"] == len(WORDS)
    completion = await screen.recv("completion")
    assert completion["participant_id"] == "ana" and completion["tokens"] == len(WORDS)
    assert completion["ttft_ms"] >= 0 and completion["tps"] >= 0
    await screen.recv("completion")
    stopped = await room.host.stop(rnd["id"])
    assert stopped["votingStatus"] == "open" and stopped["endedAt"] is not None
    answers = await room.host.call("GET", f"/api/rounds/{rnd['id']}/responses")
    assert {r["participant_id"]: r["generated_content"] for r in answers["responses"]} == {
        "ana": "".join(WORDS), "bia": "Sim."}
    for voter, scores in (("v1", (5, 2)), ("v2", (4, 3))):
        await room.host.vote(rnd["id"], "ana", scores[0], voter)
        await room.host.vote(rnd["id"], "bia", scores[1], voter)
    board = await room.host.call("GET", "/api/scoreboard")
    assert [(r["participant_id"], r["votes"], r["avg_score"], r["total_score"]) for r in board["scoreboard"]] == [
        ("ana", 2, 4.5, 9), ("bia", 2, 2.5, 5)]
    await room.host.call("POST", f"/api/rounds/{rnd['id']}/close-voting")
    await room.host.call("POST", f"/api/rounds/{rnd['id']}/reveal")
    assert (await room.host.call("POST", f"/api/rounds/{rnd['id']}/reveal-next"))["revealedCount"] == 1
    assert (await room.host.call("POST", f"/api/rounds/{rnd['id']}/reveal-next"))["revealedCount"] == 2
    states = [m["round"]["votingStatus"] for m in await screen.quiet() if m["type"] == "round_state"]
    assert states == ["open", "closed", "revealed", "revealed", "revealed"]


# =============================================================================
# Reliability and security
# =============================================================================
#
# Who is who on loopback: the server trusts only 127.0.0.1 as the host where a test
# says so (`host_addresses`), and strangers, phones and other laptops connect from
# other 127.x.y.z addresses by binding the client's local address.

STRANGER = "127.0.0.2"


class LiveRoom(Room):
    """A Room that also exposes the server's live state and reaches it from any loopback address."""

    def __init__(self, base: str, http: aiohttp.ClientSession, server: gs.Server) -> None:
        super().__init__(base, http)
        self.server = server
        self.sessions: list[aiohttp.ClientSession] = []

    async def connect_from(self, address: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(self.ws_url, local_addr=(address, 0), **kwargs)
        self.connections.append(ws)
        return ws

    async def runner_at(self, address: str, participant_id: str, pin: str | None = None) -> Runner:
        runner = Runner(await self.connect_from(address), participant_id)
        if pin is not None:
            reply = await runner.register(pin)
            assert reply["type"] == "registered", reply
        return runner

    async def screen_at(self, address: str, view: str | None = None) -> Peer:
        screen = Peer(await self.connect_from(address))
        await screen.send({"type": "telao_register", **({"view": view} if view else {})})
        assert (await screen.recv())["type"] == "registered_telao"
        return screen

    async def http_from(self, address: str, token: str | None = None) -> Host:
        """An HTTP client on another machine (optionally holding an admin token)."""
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)),
                                        headers={"Authorization": f"Bearer {token}"} if token else None)
        self.sessions.append(session)
        return Host(self.base, session)

    async def close(self) -> None:
        await super().close()
        for session in self.sessions:
            await session.close()


@pytest.fixture
async def make_room(aiohttp_server: Any, config: gs.Config, http: aiohttp.ClientSession):
    """Start a server with some config fields changed; returns a LiveRoom."""
    rooms: list[LiveRoom] = []

    async def make(**changes: Any) -> LiveRoom:
        app = gs.make_app(replace(config, **changes))
        server = await aiohttp_server(app, host="127.0.0.1")
        room = LiveRoom(str(server.make_url("")).rstrip("/"), http, app[gs.server_key])
        rooms.append(room)
        return room
    yield make
    for room in rooms:
        await room.close()


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every ERROR (or worse) any logger wrote: unhandled exceptions, failed writes, crashed tasks."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def eventually(check: Any, what: str, timeout_s: float = TIMEOUT_S) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy; bounded."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.02)
    raise AssertionError(what)      # pragma: no cover - the timeout raises first


async def closed_code(ws: ClientConnection) -> int | None:
    """Read until the connection closes; the close code the server sent (1006: none, the link just broke)."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                await ws.recv()
    return ws.close_code


def tokens_of(messages: list[dict[str, Any]], participant_id: str) -> list[tuple[int, str]]:
    return [(m["seq"], m["content"]) for m in messages
            if m["type"] == "token_update" and m["participant_id"] == participant_id]


async def running_round(room: Room, *runners: Runner, **fields: Any) -> dict[str, Any]:
    """Create and start a round; each runner reads its challenge."""
    rnd = await room.host.new_round(**fields)
    await room.host.start(rnd["id"])
    for runner in runners:
        await runner.recv("challenge")
    return rnd


# --- no one where they don't belong --------------------------------------------

async def test_host_routes_refuse_other_addresses_without_the_admin_token(make_room: Any) -> None:
    """Every host route in /openapi.json: 401 from a non-host address, 403 with a wrong token, even spoofing XFF."""
    room = await make_room(host_addresses=("127.0.0.1/32",))
    spec = await room.host.call("GET", "/openapi.json")
    host_routes = [(method.upper(), path.replace("{round_id}", "r1")) for path, ops in spec["paths"].items()
                   for method, op in ops.items() if "security" in op]
    assert len(host_routes) >= 10
    stranger, forger = await room.http_from(STRANGER), await room.http_from(STRANGER, token="guess")
    for method, path in host_routes:
        for prefix in ("", "/api"):
            assert (await stranger.status(method, prefix + path, {}))[0] == 401, path
            spoofed = await stranger.status(method, prefix + path, {}, headers={"X-Forwarded-For": "127.0.0.1"})
            assert spoofed[0] == 401 and spoofed[1]["code"] == "UNAUTHORIZED", path
            assert (await forger.status(method, prefix + path, {}))[1]["code"] == "FORBIDDEN", path
    assert (await room.host.status("GET", "/session"))[0] == 404        # none of that created a session
    holder = await room.http_from(STRANGER, token=room.server.config.admin_token)
    assert (await holder.call("POST", "/session"))["pin"]


async def test_the_pin_reaches_no_one_but_the_host(make_room: Any) -> None:
    """Screens, phones and runners never receive the PIN (nor its hash); only the host's GET /session has it."""
    room = await make_room(host_addresses=("127.0.0.1/32",), pin_length=12)
    pin = await room.host.new_session()
    phone = await room.http_from(STRANGER)
    screen = await room.screen_at(STRANGER)
    ana = await room.runner_at(STRANGER, "ana", pin)
    guesser = await room.runner_at("127.0.0.3", "eve")
    seen: list[Any] = [await guesser.register(pin[:-1] + str((int(pin[-1]) + 1) % 10))]
    rnd = await running_round(room, ana)
    seen.append(await phone.call("GET", "/rounds/current"))
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await room.host.stop(rnd["id"])
    await phone.vote(rnd["id"], "ana", 5, "phone-1")
    for path in ("/session", "/api/session", "/presence", "/scoreboard", "/metrics", "/health", "/openapi.json",
                 "/docs", f"/rounds/{rnd['id']}/responses", f"/votes/mine?roundId={rnd['id']}&voterId=phone-1"):
        seen.append(await phone.call("GET", path))
    seen += await screen.quiet() + await ana.quiet()
    seen += [await room.host.call("GET", path) for path in ("/export-all.json", "/export.csv", "/export-events.csv")]
    seen_text = json.dumps(seen)
    assert pin not in seen_text and "$2b$" not in seen_text and "pinHash" not in seen_text
    assert (await room.host.call("GET", "/session"))["pin"] == pin


async def test_a_wrong_pin_flood_from_one_address_is_throttled(room: Room, pin: str, config: gs.Config) -> None:
    """Past PIN_ATTEMPTS_MAX wrong PINs an address is refused (even the right PIN) until its window ends."""
    guesser = Runner(await connect(room.ws_url, local_addr=(STRANGER, 0)), "mallory")
    room.connections.append(guesser.ws)
    wrong = [f"{n:06d}" for n in range(config.pin_attempts_max + 5) if f"{n:06d}" != pin]
    codes = [(await guesser.register(guess))["code"] for guess in wrong]
    limit = config.pin_attempts_max
    assert codes == ["INVALID_PIN"] * limit + ["PIN_THROTTLED"] * (len(wrong) - limit)
    refused = await guesser.register(pin)
    assert refused["code"] == "PIN_THROTTLED" and "try again in" in refused["message"]
    neighbour = Runner(await connect(room.ws_url, local_addr=("127.0.0.3", 0)), "ana")
    room.connections.append(neighbour.ws)
    assert (await neighbour.register(pin))["type"] == "registered"


async def test_parallel_wrong_pins_from_one_address_are_throttled_too(room: Room, pin: str,
                                                                      config: gs.Config) -> None:
    """Guesses sent at once on many connections count before bcrypt answers: no more than the limit are tried."""
    guessers = [Runner(await connect(room.ws_url, local_addr=(STRANGER, 0)), f"m{n}") for n in range(15)]
    room.connections += [g.ws for g in guessers]
    guesses = [f"{n:07d}" for n in range(15)]           # 7 digits: never the 6-digit PIN
    replies = await asyncio.gather(*(g.register(guess) for g, guess in zip(guessers, guesses)))
    codes = sorted(reply["code"] for reply in replies)
    assert codes.count("INVALID_PIN") == config.pin_attempts_max
    assert codes.count("PIN_THROTTLED") == 15 - config.pin_attempts_max


async def test_wrong_pins_from_many_addresses_are_throttled_together(make_room: Any) -> None:
    """Past PIN_ATTEMPTS_TOTAL_MAX wrong PINs from all addresses together, every address waits out the window."""
    room = await make_room(pin_attempts_max=100, pin_attempts_total_max=5)
    pin = await room.host.new_session()
    codes = []
    for n in range(7):
        guesser = await room.runner_at(f"127.0.1.{n + 1}", f"m{n}")
        codes.append((await guesser.register(f"{n:07d}"))["code"])
    assert codes == ["INVALID_PIN"] * 5 + ["PIN_THROTTLED"] * 2
    latecomer = await room.runner_at("127.0.2.1", "ana")
    refused = await latecomer.register(pin)
    assert refused["code"] == "PIN_THROTTLED" and "on this server" in refused["message"]


def test_guessing_a_six_digit_pin_takes_longer_than_a_meetup() -> None:
    """With the default limits, trying half the 10**6 PINs takes over a day from any number of addresses."""
    config = gs.Config()
    assert config.pin_length == 6
    guesses_per_hour = config.pin_attempts_total_max * 3600 / config.pin_attempts_window_s
    assert 10**6 / 2 / guesses_per_hour > 24
    per_address_per_hour = config.pin_attempts_max * 3600 / config.pin_attempts_window_s
    assert 10**6 / 2 / per_address_per_hour > 24 * 30


async def test_a_runner_cannot_speak_for_another_participant(room: Room, pin: str) -> None:
    """token, complete and error naming someone else's id are refused; no one sees them, nothing is stored."""
    screen = await room.screen()
    ana, mallory = await room.runner("ana", pin), await room.runner("mallory", pin)
    stranger = Runner(await room.connect(), "ana")                 # never registered
    rnd = await running_round(room, ana, mallory)
    forged = [{"type": "token", "round": 1, "participant_id": "ana", "seq": 0, "content": "pwned"},
              {"type": "complete", "round": 1, "participant_id": "ana", "tokens": 1},
              {"type": "error", "round": 1, "participant_id": "ana", "code": "X", "message": "fake"}]
    for message in forged:
        await mallory.send(message)
        assert (await mallory.recv("error"))["code"] == "WRONG_PARTICIPANT"
        await stranger.send(message)
        assert (await stranger.recv("error"))["code"] == "NOT_REGISTERED"
    await ana.stream(1, ["mine"])
    await ana.complete(1, 1)
    assert tokens_of(await screen.quiet(), "ana") == [(0, "mine")]
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert answers == [{"participant_id": "ana", "nickname": "Ana", "generated_content": "mine"}]
    events = await room.host.call("GET", "/export-events.csv")
    assert "generation_failed" not in events and "pwned" not in events


async def test_a_connected_participant_cannot_be_taken_over_from_another_machine(make_room: Any) -> None:
    """Registering a live id from another address is refused (ID_IN_USE); from the same machine it replaces."""
    room = await make_room()
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    impostor = await room.runner_at(STRANGER, "ana")
    refused = await impostor.register(pin)
    assert refused["code"] == "ID_IN_USE" and "PIN" not in refused["message"]
    await running_round(room, ana)                                  # ana still gets her challenge
    again = await room.runner("ana", pin)                           # ana's laptop reconnecting
    assert await closed_code(ana.ws) == 1000
    await again.ws.close()
    await eventually(lambda: "ana" not in room.server.hub.runners, "ana's connection forgotten")
    assert (await impostor.register(pin))["type"] == "registered"   # an id no one holds can be claimed


async def test_voter_ids_are_stored_only_hashed(room: Room, pin: str, config: gs.Config) -> None:
    """No byte of the database files holds a voter id; votes carry sha256(voter id) only."""
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await room.host.stop(rnd["id"])
    voter = "voter-6f1d0c3e-secret"
    await room.host.vote(rnd["id"], "ana", 4, voter)
    assert await room.host.call("GET", f"/votes/mine?roundId={rnd['id']}&voterId={voter}") == [
        {"participantId": "ana", "score": 4}]
    await room.host.call("GET", "/export-all.json")                 # a flush and an event round trip
    files = list(config.database.parent.glob(config.database.name + "*"))
    assert files and not any(voter.encode() in path.read_bytes() for path in files)
    rows = db_rows(config.database, "SELECT voterHash FROM votes")
    assert rows == [{"voterHash": hashlib.sha256(voter.encode()).hexdigest()}]


async def test_export_all_json_holds_no_secret(make_room: Any) -> None:
    """The JSON export has no PIN, PIN hash, admin token or voter id."""
    room = await make_room()
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "ana", 3, "voter-secret-42")
    text = json.dumps(await room.host.call("GET", "/export-all.json"))
    for secret in (pin, "$2b$", "pinHash", '"pin"', "voter-secret-42", room.server.config.admin_token):
        assert secret not in text


async def test_a_web_page_from_another_site_cannot_act_as_the_host(make_room: Any) -> None:
    """On the host's machine, a request with a foreign Origin (a page in its browser, DNS rebinding) is not the host."""
    room = await make_room()
    pin = await room.host.new_session()
    for origin in ("https://evil.example", "http://evil.example:3000", "null", "http://[::1"):
        status, body = await room.host.status("POST", "/api/session", headers={"Origin": origin,
                                                                              "Content-Type": "text/plain"})
        assert (status, body["code"]) == (403, "FOREIGN_ORIGIN"), origin
        assert "pin" not in await room.host.call("GET", "/api/session", headers={"Origin": origin})
    assert (await room.host.call("GET", "/session"))["pin"] == pin          # no session was replaced
    port = room.base.rsplit(":", 1)[1]
    own = [f"http://{address}:5173" for address in gs.lan_addresses()[:1]]     # a header only: no traffic there
    for origin in (f"http://localhost:{port}", "http://127.0.0.1:5173", "http://[::1]:5173", *own):
        assert (await room.host.call("GET", "/session", headers={"Origin": origin}))["pin"] == pin
        await room.host.call("POST", "/rounds", {"prompt": "from the club's admin page"}, headers={"Origin": origin})
    holder = await room.http_from("127.0.0.1", token=room.server.config.admin_token)
    await holder.call("POST", "/rounds", {"prompt": "with the token"}, headers={"Origin": "https://evil.example"})


# --- faults ---------------------------------------------------------------------

async def test_a_runner_that_drops_mid_stream_reconnects_and_continues_its_seq(room: Room, pin: str,
                                                                              config: gs.Config) -> None:
    """After a broken link the runner re-registers, is told its next seq, and its answer is whole."""
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, WORDS[:3])
    shown = [await screen.recv("token_update") for _ in range(3)]
    ana.ws.transport.abort()                                        # Wi-Fi gone: no closing handshake
    assert (await screen.recv("participant_disconnected"))["participant_id"] == "ana"
    back = Runner(await room.connect(), "ana")
    reply = await back.register(pin)
    assert reply["resume"] == {"round": 1, "next_seq": 3, "missing": []}
    await back.stream(1, WORDS[3:], start=reply["resume"]["next_seq"])
    await back.complete(1, len(WORDS))
    shown += [m for m in await screen.quiet() if m["type"] == "token_update"]
    assert tokens_of(shown, "ana") == list(enumerate(WORDS))
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert [a["generated_content"] for a in answers] == ["".join(WORDS)]
    assert db_rows(config.database, "SELECT rescued, seqGaps FROM metrics") == [{"rescued": 0, "seqGaps": 0}]


async def test_a_runner_that_drops_for_good_is_rescued_at_stop(room: Room, pin: str, config: gs.Config) -> None:
    """Tokens of a runner that never completes are saved at stop, shown for voting and can be voted for."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await bia.stream(1, ["Sim."])
    await bia.complete(1, 1)
    await ana.stream(1, WORDS)
    await eventually(lambda: saved_tokens(config.database, "ana") == len(WORDS), "ana's tokens saved")
    ana.ws.transport.abort()
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert {a["participant_id"]: a["generated_content"] for a in answers} == {"ana": "".join(WORDS), "bia": "Sim."}
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    board = (await room.host.call("GET", "/scoreboard"))["scoreboard"]
    assert [(r["participant_id"], r["votes"], r["tokens"]) for r in board] == [("ana", 1, len(WORDS)), ("bia", 0, 1)]
    rescued = db_rows(config.database, "SELECT participantId, rescued FROM metrics ORDER BY participantId")
    assert rescued == [{"participantId": "ana", "rescued": 1}, {"participantId": "bia", "rescued": 0}]


async def test_a_new_session_mid_round_sends_old_runners_away_and_keeps_old_data(room: Room, pin: str,
                                                                                 config: gs.Config) -> None:
    """Old runners get SESSION_ENDED and a close; screens get the new session; the old round stays exportable."""
    screen = await room.screen()
    old_session = (await screen.recv("state_snapshot"))["session"]["id"]
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    await running_round(room, ana, bia)
    await ana.stream(1, WORDS)
    await eventually(lambda: saved_tokens(config.database, "ana") == len(WORDS), "ana's tokens saved")
    created = await room.host.call("POST", "/session")
    assert created["disconnected_participants"] == 2
    for runner in (ana, bia):
        assert (await runner.recv("error"))["code"] == "SESSION_ENDED"
        assert await closed_code(runner.ws) == 1000
    snapshot = await screen.recv("state_snapshot")
    assert snapshot["session"]["id"] == created["id"] and snapshot["round"] is None
    old = await room.host.call("GET", f"/export-all.json?sessionId={old_session}")
    [old_round] = old["rounds"]
    assert [(m["participantId"], m["generatedContent"], m["rescued"]) for m in old_round["metrics"]] == [
        ("ana", "".join(WORDS), 1)]
    late = Runner(await room.connect(), "carla")
    assert (await late.register(pin))["code"] == "INVALID_PIN"
    assert (await late.register(created["pin"]))["type"] == "registered"


def saved_tokens(database: Path, participant_id: str) -> int:
    return db_rows(database, "SELECT COUNT(*) AS n FROM tokens WHERE participantId = ?", participant_id)[0]["n"]


async def test_sigkill_mid_round_loses_only_unsaved_tokens_and_the_round_runs_on(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """kill -9 mid-round, restart on the same file: the round still runs, runners resume, votes and exports add up."""
    database = tmp_path / "arena.db"
    words = [f"w{n} " for n in range(40)]
    killed = server_process("--flush-interval", "0.2")
    room = Room(killed.start(), http)
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await ana.stream(1, words[:20])
    await bia.stream(1, words[:20])
    await eventually(lambda: saved_tokens(database, "ana") + saved_tokens(database, "bia") == 40, "a flush")
    await ana.stream(1, words[20:25], start=20)                    # accepted; maybe not saved yet
    killed.stop(signal.SIGKILL)
    await room.close()

    restarted = server_process("--flush-interval", "0.2")
    room = Room(restarted.start(), http)
    current = await room.host.call("GET", "/rounds/current")
    assert (current["id"], current["endedAt"]) == (rnd["id"], None)
    assert current["liveTokens"]["bia"] == words[:20]
    assert current["liveTokens"]["ana"] == words[:len(current["liveTokens"]["ana"])]
    assert 20 <= len(current["liveTokens"]["ana"]) <= 25
    screen = await room.screen()
    assert (await screen.recv("state_snapshot"))["liveTokens"] == current["liveTokens"]
    for name in ("ana", "bia"):
        runner = Runner(await room.connect(), name)
        resume = (await runner.register(pin))["resume"]
        assert resume["round"] == 1 and resume["missing"] == []
        await runner.stream(1, words[resume["next_seq"]:], start=resume["next_seq"])
        await runner.complete(1, len(words))
        assert (await screen.recv("completion"))["participant_id"] == name
    await room.host.stop(rnd["id"])
    for voter in ("v1", "v2", "v3"):
        await room.host.vote(rnd["id"], "ana", 4, voter)
        await room.host.vote(rnd["id"], "bia", 2, voter)
    board = (await room.host.call("GET", "/scoreboard"))["scoreboard"]
    assert [(r["participant_id"], r["votes"], r["total_score"]) for r in board] == [("ana", 3, 12), ("bia", 3, 6)]
    export = await room.host.call("GET", "/export-all.json")
    assert {m["participantId"]: m["generatedContent"] for m in export["rounds"][0]["metrics"]} == {
        "ana": "".join(words), "bia": "".join(words)}
    await room.close()
    assert restarted.stop(signal.SIGTERM) == 0


async def test_sigterm_closes_every_socket_with_1001_and_saves_every_token(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """On SIGTERM runners and screens get 1001 (going away), the exit code is 0 and every token is on disk."""
    database = tmp_path / "arena.db"
    process = server_process("--flush-interval", "60")             # no flush until the exit
    room = Room(process.start(), http)
    pin = await room.host.new_session()
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    words = [f"w{n} " for n in range(30)]
    await ana.stream(1, words)
    assert tokens_of([await screen.recv("token_update") for _ in words], "ana") == list(enumerate(words))
    assert saved_tokens(database, "ana") == 0
    assert process.stop(signal.SIGTERM) == 0
    assert await closed_code(ana.ws) == 1001 and await closed_code(screen.ws) == 1001
    rows = db_rows(database, "SELECT seq, content FROM tokens WHERE participantId = 'ana' ORDER BY seq")
    assert [(row["seq"], row["content"]) for row in rows] == list(enumerate(words))
    assert db_rows(database, "SELECT connected FROM participants") == [{"connected": 0}]
    await room.close()


def fill_the_disk(conn: sqlite3.Connection) -> None:
    """The file may not grow (as on a full disk) and every free byte in it is taken."""
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (junk BLOB)")
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    size = 1 << 16
    while size:
        try:
            with conn:
                conn.execute("INSERT INTO filler VALUES (zeroblob(?))", (size,))
        except sqlite3.OperationalError:                        # "database or disk is full"
            size //= 2


def free_the_disk(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA max_page_count = 1073741823")
    with conn:
        conn.execute("DROP TABLE filler")


def make_read_only(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only = ON")


def make_writable(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only = OFF")


@pytest.mark.parametrize(("break_it", "repair", "error"), [
    (fill_the_disk, free_the_disk, "database or disk is full"),
    (make_read_only, make_writable, "readonly database"),
], ids=["disk-full", "read-only"])
async def test_a_failing_database_tells_the_host_while_screens_keep_streaming(
        make_room: Any, break_it: Any, repair: Any, error: str) -> None:
    """While writes fail the host gets a clear 503 and /health says why, screens still stream; nothing is lost."""
    room = await make_room()
    pin = await room.host.new_session()
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    words = [f"{n:04d}" + "x" * 1000 for n in range(300)]          # enough to need new pages
    await ana.stream(1, words[:50])
    await eventually(lambda: saved_tokens(room.server.config.database, "ana") == 50, "the first tokens saved")
    await room.server.db.run(break_it)

    await ana.stream(1, words[50:250], start=50)
    assert len([await screen.recv("token_update") for _ in words[:250]]) == 250
    status, body = await room.host.status("POST", "/rounds/stop", {"roundId": rnd["id"]})
    assert status == 503 and body["code"] == "DATABASE_ERROR" and error in body["error"]
    assert "disk" in body["error"]
    await room.host.call("GET", "/session")                         # reads still work ...
    health = await room.host.call("GET", "/health")
    assert error in health["database"]                              # ... and do not hide the failed writes
    current = await room.host.call("GET", "/rounds/current")
    assert current["endedAt"] is None and current["liveTokens"]["ana"] == words[:250]
    await ana.stream(1, words[250:], start=250)                    # the round goes on
    assert len([await screen.recv("token_update") for _ in words[250:]]) == 50

    await room.server.db.run(repair)
    await eventually(lambda: saved_tokens(room.server.config.database, "ana") == 300, "the backlog saved")
    assert (await room.host.call("GET", "/health"))["database"] == "ok"
    await ana.complete(1, len(words))
    await screen.recv("completion")
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert answers[0]["generated_content"] == "".join(words)


# Both limits sit far above the burst a reading screen can lag behind by (a few hundred 2 kB tokens).
@pytest.mark.parametrize(("limits", "why"), [
    ({"peer_queue_limit": 512}, r"512 messages queued"),
    ({"peer_queue_chars": 1024 * 1024}, r"\d+ characters queued"),
], ids=["messages", "characters"])
async def test_a_screen_that_stops_reading_is_dropped_and_slows_no_one(
        make_room: Any, server_log: pytest.LogCaptureFixture, limits: dict[str, int], why: str) -> None:
    """A frozen phone's queue fills and it is cut off once; the runner and a reading screen get every token."""
    room = await make_room(max_answer_chars=10**7, **limits)
    pin = await room.host.new_session()
    reading = await room.screen()
    frozen = await room.connect_from("127.0.0.3", max_queue=1)     # buffers one message, then stops reading
    await frozen.send(json.dumps({"type": "telao_register"}))
    [frozen_peer] = await eventually(lambda: [p for p in room.server.hub.screens if p.address == "127.0.0.3"],
                                     "the frozen screen registered")
    # A phone on Wi-Fi has small kernel buffers; loopback's grow to megabytes, so shrink them to match.
    frozen_peer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    words = [f"{n:05d}" + "y" * 2000 for n in range(2000)]         # 4 MB: 3x what the frozen one can hold

    async def read_all() -> list[dict[str, Any]]:
        return [await reading.recv("token_update") for _ in words]
    reader = asyncio.create_task(read_all())
    await ana.stream(1, words)
    assert tokens_of(await reader, "ana") == list(enumerate(words))
    assert await ana.quiet(0.05) == []                              # the runner was never told to slow down
    await eventually(lambda: frozen_peer not in room.server.hub.screens, "the frozen screen forgotten")
    drops = [r.getMessage() for r in server_log.records if r.getMessage().startswith("WS_DROPPED")]
    assert len(drops) == 1 and re.fullmatch(rf"WS_DROPPED arena \(not reading \({why}\)\)", drops[0])
    received = []
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                received.append(json.loads(await frozen.recv()))
    assert frozen.close_code == 1006                               # cut off: no closing handshake
    shown = tokens_of(received, "ana")
    assert shown == list(enumerate(words))[:len(shown)] and len(shown) < len(words)


# --- bounded resources -----------------------------------------------------------

async def test_websocket_connections_per_address_are_capped_except_for_the_host(make_room: Any) -> None:
    """Past WS_CONNECTIONS_PER_ADDRESS an address gets TOO_MANY_CONNECTIONS and 1013; others and the host don't."""
    room = await make_room(ws_connections_per_address=3, host_addresses=("127.0.0.1/32",))
    await room.host.new_session()
    held = [await room.screen_at(STRANGER) for _ in range(3)]
    extra = await room.connect_from(STRANGER)
    refused = await Peer(extra).recv()
    assert refused["code"] == "TOO_MANY_CONNECTIONS" and "at most 3" in refused["message"]
    assert await closed_code(extra) == 1013
    await room.screen_at("127.0.0.3")                               # another machine is unaffected
    for _ in range(5):
        await room.screen()                                         # the host's own address is exempt
    await held[0].ws.close()
    await eventually(lambda: sum(p.address == STRANGER for p in room.server.hub.peers) == 2, "a slot freed")
    await room.screen_at(STRANGER)


async def test_frames_over_ws_max_payload_close_that_connection_with_1009(make_room: Any) -> None:
    """An oversized frame closes its own connection with 1009 (message too big); the others stream on."""
    room = await make_room(ws_max_payload=1024)
    pin = await room.host.new_session()
    screen = await room.screen()
    ana, mallory = await room.runner("ana", pin), await room.runner("mallory", pin)
    await running_round(room, ana, mallory)
    await mallory.token(1, 0, "x" * 900)                            # under the limit: fine
    await mallory.token(1, 1, "x" * 2000)
    assert await closed_code(mallory.ws) == 1009
    await ana.stream(1, WORDS)
    shown = [m for m in await screen.quiet() if m["type"] == "token_update"]
    assert tokens_of(shown, "ana") == list(enumerate(WORDS)) and len(tokens_of(shown, "mallory")) == 1


async def test_tokens_past_the_per_round_limit_are_refused_and_the_rest_is_kept(make_room: Any) -> None:
    """Past MAX_TOKENS_PER_GENERATION (count or seq) a token gets TOO_MANY_TOKENS; the answer keeps the first ones."""
    room = await make_room(max_tokens_per_generation=5)
    pin = await room.host.new_session()
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    words = [f"w{n} " for n in range(7)]
    await ana.stream(1, words)
    await ana.token(1, 4_999_999, "far ahead")
    errors = [m for m in await ana.quiet() if m["type"] == "error"]
    assert [m["code"] for m in errors] == ["TOO_MANY_TOKENS"] * 3 and "at most 5 tokens" in errors[0]["message"]
    assert tokens_of(await screen.quiet(), "ana") == list(enumerate(words[:5]))
    await ana.complete(1, 7)
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert answers[0]["generated_content"] == "".join(words[:5])


async def test_an_answer_past_max_answer_chars_is_refused_and_keeps_the_rest(make_room: Any) -> None:
    """Past MAX_ANSWER_CHARS a token gets ANSWER_TOO_LONG: one runner cannot fill the host's memory."""
    room = await make_room(max_answer_chars=12)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, ["abcd", "efgh", "ijkl", "mnop"])
    assert await ana.recv("error") == ws_error("An answer keeps at most 12 characters; the rest is ignored",
                                               "ANSWER_TOO_LONG")
    await ana.complete(1, 4)
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert answers[0]["generated_content"] == "abcdefghijkl"


async def test_a_far_ahead_seq_cannot_swell_the_resume_reply(room: Room, pin: str) -> None:
    """A seq beyond the token limit is refused, so a reconnect's list of missing seqs stays small."""
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    await ana.token(1, 9_999_999, "x")
    assert (await ana.recv("error"))["code"] == "TOO_MANY_TOKENS"
    again = Runner(await room.connect(), "ana")
    await again.send({"type": "register", "participant_id": "ana", "pin": pin})
    raw = await asyncio.wait_for(again.ws.recv(), TIMEOUT_S)
    assert len(raw) < 1000 and json.loads(raw)["resume"] == {"round": 1, "next_seq": 0, "missing": []}


@pytest.mark.parametrize("field", ["participant_id", "nickname", "runner", "model"])
async def test_register_text_fields_are_capped_at_200_characters(room: Room, pin: str, field: str) -> None:
    """A participant id, nickname, runner or model over 200 characters is refused with a sentence; 200 is fine."""
    runner = Runner(await room.connect(), "ana")
    await runner.send({"type": "register", "participant_id": "ana", "pin": pin, field: "é" * 201})
    refused = await runner.recv()
    assert refused == {"type": "error", "message": f"'{field}' must be at most 200 characters",
                       "code": "INVALID_INPUT"}
    await runner.send({"type": "register", "participant_id": "ana", "pin": pin, field: "é" * 200})
    assert (await runner.recv())["type"] == "registered"


async def test_an_http_flood_from_one_address_gets_429_and_no_one_else_does(make_room: Any) -> None:
    """Past RATE_LIMIT_MAX a phone gets 429 with Retry-After; other phones, the host and /health carry on."""
    room = await make_room(host_addresses=("127.0.0.1/32",), rate_limit_max=20)
    await room.host.new_session()
    flooder = await room.http_from(STRANGER)
    statuses = [(await flooder.status("GET", "/presence"))[0] for _ in range(25)]
    assert statuses == [200] * 20 + [429] * 5
    async with flooder.http.get(room.base + "/api/scoreboard") as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) > 0
        assert (await response.json())["code"] == "TOO_MANY_REQUESTS"
    assert (await flooder.status("GET", "/health"))[0] == 200
    assert (await (await room.http_from("127.0.0.3")).status("GET", "/presence"))[0] == 200
    for _ in range(25):
        await room.host.call("GET", "/presence")


async def test_a_finished_round_leaves_memory_once_it_is_saved(make_room: Any) -> None:
    """When the next round starts, the last one's buffers are on disk and no longer referenced anywhere."""
    room = await make_room(flush_interval_s=60)                     # only the start's own flush saves tokens
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    first = await running_round(room, ana, bia)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, WORDS[:2])                                  # bia never completes: rescued at stop
    await eventually(lambda: len(room.server.arena.unsaved) == len(WORDS) + 2, "tokens accepted")
    await room.host.stop(first["id"])
    live = room.server.arena.rounds[1]
    refs = [weakref.ref(live)] + [weakref.ref(gen) for gen in live.generations.values()]
    del live
    await running_round(room, ana, bia)
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    assert list(room.server.arena.rounds) == [2] and room.server.arena.unsaved == []
    saved = db_rows(room.server.config.database, "SELECT participantId, COUNT(*) AS n FROM tokens "
                                                 "WHERE roundId = ? GROUP BY participantId", first["id"])
    assert {row["participantId"]: row["n"] for row in saved} == {"ana": len(WORDS), "bia": 2}


async def test_closed_connections_leave_nothing_behind(make_room: Any) -> None:
    """Runners and screens that close or break are forgotten: no peer, no writer task, no per-address slot."""
    room = await make_room(ws_connections_per_address=1, host_addresses=("127.0.0.1/32",))
    pin = await room.host.new_session()
    refs = []
    for n in range(12):
        address = f"127.0.3.{n % 3 + 1}"
        peer = await room.runner_at(address, f"r{n}", pin) if n % 2 else await room.screen_at(address)
        [server_peer] = [p for p in room.server.hub.peers if p.ws is not None and p.address == address]
        refs.append(weakref.ref(server_peer))
        del server_peer
        if n % 4 == 3:
            peer.ws.transport.abort()
        else:
            await peer.ws.close()
        await eventually(lambda: not room.server.hub.peers, "the connection forgotten")
    gc.collect()
    hub = room.server.hub
    assert (hub.peers, hub.runners, hub.screens) == (set(), {}, set())
    assert [ref() for ref in refs] == [None] * 12


# --- hostile and malformed input -----------------------------------------------------

TYPES = "register, telao_register, token, complete, error"


def ws_error(message: str, code: str = "INVALID_INPUT") -> dict[str, Any]:
    return {"type": "error", "message": message, "code": code}


@pytest.mark.parametrize(("frame", "reply"), [
    (b"\x00\x01binary", ws_error("Binary frames are not supported; send JSON text")),
    ("{nope", ws_error("The message is not valid JSON")),
    ("[" * 100_000 + "]" * 100_000, ws_error("The message is not valid JSON")),
    ("[1, 2]", ws_error("The message must be a JSON object")),
    ("{}", ws_error(f"Unknown message type None; expected one of {TYPES}")),
    ('{"type": 5}', ws_error(f"Unknown message type 5; expected one of {TYPES}")),
    ('{"type": "vote"}', ws_error(f"Unknown message type 'vote'; expected one of {TYPES}")),
    ('{"type": "register"}', ws_error("'participant_id' is required")),
    ('{"type": "register", "participant_id": 5, "pin": "1"}', ws_error("'participant_id' must be a string")),
    ('{"type": "token", "round": 1, "seq": NaN}', ws_error("'seq' must be an integer")),
    ('{"type": "token", "round": 1, "seq": 1e999}', ws_error("'seq' must be an integer")),
    ('{"type": "token", "round": 1, "seq": true}', ws_error("'seq' must be an integer")),
    ('{"type": "token", "round": 1, "seq": 1000000000000000000000000}', ws_error("'seq' must be at most 1e+07")),
    ('{"type": "token", "round": -1, "seq": 0}', ws_error("'round' must be at least 0")),
    ('{"type": "complete", "round": 1, "duration_ms": Infinity}', ws_error("'duration_ms' must be a finite number")),
    ('{"type": "complete", "round": 1, "model_info": "x"}', ws_error("'model_info' must be an object")),
    ('{"type": "token", "round": 1, "seq": 0}', ws_error("Register before sending this message", "NOT_REGISTERED")),
    ('{"type": "telao_register", "view": [1]}', ws_error("'view' must be a string")),
], ids=["binary", "not-json", "deep-nesting", "not-object", "no-type", "type-not-string", "unknown-type",
        "missing-field", "wrong-type", "nan", "infinity", "bool-as-int", "huge-int", "negative", "infinite-float",
        "not-object-field", "before-register", "screen-view"])
async def test_each_kind_of_bad_frame_gets_its_error_and_the_socket_stays_open(room: Room, pin: str, frame: Any,
                                                                                reply: dict[str, Any]) -> None:
    """A bad frame is answered with a sentence naming the problem; the connection keeps working."""
    peer = Peer(await room.connect())
    await peer.send(frame)
    assert await peer.recv() == reply
    await peer.send({"type": "telao_register"})
    assert (await peer.recv())["type"] == "registered_telao"


@pytest.mark.parametrize(("frame", "code"), [
    (b"\xff\xfe not utf-8", 1007),
    ("x" * (1024 * 1024 + 1), 1009),
], ids=["invalid-utf-8", "over-ws-max-payload"])
async def test_frames_that_break_the_protocol_close_only_their_connection(room: Room, pin: str, frame: Any,
                                                                          code: int) -> None:
    """Invalid UTF-8 in a text frame gets 1007, a frame over WS_MAX_PAYLOAD 1009; a bystander notices nothing."""
    bystander = await room.screen()
    peer = await room.connect()
    await peer.send(frame, text=True)
    assert await closed_code(peer) == code
    await bystander.send({"type": "telao_register", "view": "voting"})
    assert (await bystander.recv("registered_telao"))["view"] == "voting"


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), [
    ("POST", "/rounds", "{nope", 400, "The request body is not valid JSON"),
    ("POST", "/rounds", b"\xff\xfe", 400, "The request body is not valid JSON"),
    ("POST", "/rounds", "[1]", 400, "The request body must be a JSON object"),
    ("POST", "/rounds", "{}", 400, "'prompt' is required"),
    ("POST", "/rounds", '{"prompt": "x", "temperature": NaN}', 400, "'temperature' must be a finite number"),
    ("POST", "/rounds", '{"prompt": "' + "x" * 100_001 + '"}', 400, "'prompt' must be at most 100000 characters"),
    ("POST", "/rounds/start", '{"roundId": "nope"}', 404, "Round not found"),
    ("POST", "/votes", '{"roundId": "r", "participantId": "p", "score": 6}', 400, "'score' must be at most 5"),
    ("GET", "/votes/mine", None, 400, "'round_id' is required"),
    ("GET", "/scoreboard?roundId=nope", None, 404, "Round not found"),
    ("GET", "/export.csv?sessionId=nope", None, 404, "Session not found"),
    ("GET", "/rounds/nope/responses", None, 404, "Round not found"),
    ("GET", "/nope", None, 404, "No route GET /nope"),
    ("DELETE", "/session", None, 405, "No route DELETE /session"),
], ids=lambda value: value if isinstance(value, int) else None)
async def test_each_kind_of_bad_request_gets_its_4xx_as_json(room: Room, pin: str, method: str, path: str,
                                                             body: str | None, status: int, error: str) -> None:
    """Malformed bodies, bad fields, unknown ids, routes and methods: a 4xx with {"error", "code"}, never a 500."""
    got, reply = await room.host.status(method, path, body)
    assert (got, reply["error"]) == (status, error) and reply["code"]


async def test_a_body_over_the_size_limit_gets_413(room: Room, pin: str) -> None:
    """A request body over aiohttp's 1 MiB limit is refused before anything reads it."""
    body = io.BytesIO(b"x" * (1024 * 1024 + 1))
    async with room.host.http.post(room.base + "/rounds", data=body) as response:
        assert response.status == 413
        assert await response.json() == {"error": "Request Entity Too Large", "code": "REQUEST_ENTITY_TOO_LARGE"}


async def test_malformed_http_is_refused_and_the_server_carries_on(room: Room, pin: str,
                                                                    server_log: pytest.LogCaptureFixture) -> None:
    """Garbage request lines, bad lengths or encodings, oversized headers: a 400; only aiohttp's parser complains."""
    host, port = room.base.removeprefix("http://").split(":")
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /health HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                b"GET /\xff HTTP/1.1\r\n\r\n", b"POST /rounds HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"POST /rounds HTTP/1.1\r\nContent-Encoding: deflate\r\nContent-Length: 3\r\n\r\n{}}"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        async with asyncio.timeout(TIMEOUT_S):
            status_line = await reader.readline()
        assert status_line[:10] in (b"HTTP/1.0 4", b"HTTP/1.1 4"), (raw[:30], status_line)
        writer.close()
    assert (await room.host.call("GET", "/health"))["status"] == "ok"
    # aiohttp logs each unparsable request at ERROR with a traceback; nothing else may be logged.
    complaints = [r for r in server_log.records if r.levelno >= logging.ERROR]
    assert all(r.name == "aiohttp.server" and getattr(r.exc_info[1], "code", None) == 400 for r in complaints)


async def test_an_unexpected_failure_in_one_message_leaves_the_connection_working(
        room: Room, pin: str, server_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one message's handler is logged and answered with INTERNAL; the runner's next tokens still count."""
    async def broken(server: gs.Server, peer: gs.Peer, m: dict[str, Any]) -> None:
        raise RuntimeError("a latent bug")
    monkeypatch.setitem(gs.ON_MESSAGE, "error", (gs.RUNNER_ERROR, broken))
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    await ana.send({"type": "error", "round": 1, "code": "GENERATION_FAILED", "message": "oops"})
    assert await ana.recv("error") == ws_error("Internal error; the server log has the details", "INTERNAL")
    await ana.stream(1, WORDS)
    assert tokens_of(await screen.quiet(), "ana") == list(enumerate(WORDS))
    assert errors_logged(server_log) == ["gambiarra: unexpected error on a 'error' message"]


# Fuzzing: hypothesis drives from a worker thread, the server and its clients run on the test's
# loop, and every example is one coroutine handed to that loop. State carries over between
# examples on purpose: the server must survive the whole sequence, not one frame at a time.

# No shrinking: examples share one server, so a shrunk replay is not the run that failed, and every
# replay of a broken server waits out its timeouts. A failure is reported as generated.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.reuse, Phase.generate))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
WS_FIELDS = sorted({name for spec, _ in gs.ON_MESSAGE.values() for f in spec for name in (f.name, f.alias)})
ERROR_CODES = {"INVALID_INPUT", "NOT_REGISTERED", "WRONG_PARTICIPANT", "INVALID_PIN", "PIN_THROTTLED", "ID_IN_USE",
               "UNKNOWN_ROUND", "TOO_MANY_TOKENS", "NO_SESSION", "FORBIDDEN", "CONFLICT", "NOT_FOUND"}
SERVER_MESSAGES = {"error", "registered", "registered_telao", "state_snapshot", "participant_registered",
                   "participant_disconnected", "token_update", "completion", "round_state", "round_started",
                   "challenge", "heartbeat"}


def run_on(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    """From hypothesis's thread: run `coroutine` on the test's loop and wait for it (bounded)."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=4 * TIMEOUT_S)


NASTY = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -1, 0.5, 2**63, 10**30, 1e308, True]),
                  st.sampled_from(["", "é" * 5000, {"a": {"b": [1]}}, [], None]), JSON_VALUES)


def field_values(f: gs.Field, pin: str) -> st.SearchStrategy[Any]:
    """Values a well-behaved client would send for one field (mallory's own id, round 1, ...)."""
    special = {"participant_id": st.sampled_from(["mallory", "mallory", "ana", "eve"]),
               "pin": st.sampled_from([pin, pin, "000000"]), "round": st.sampled_from([1, 1, 1, 0, 2]),
               "seq": st.integers(0, 60)}
    by_kind = {str: st.text(max_size=12), int: st.integers(0, 1000), float: st.floats(0, 1e6),
               bool: st.booleans(), dict: st.just({"name": "m", "runner": "r"})}
    return special.get(f.name, by_kind[f.kind])


def ws_frames(pin: str) -> st.SearchStrategy[tuple[str, Any]]:
    """(kind, data): mutated protocol messages, random JSON and text, binary, broken UTF-8, deep and huge frames."""
    @st.composite
    def messages(draw: Any) -> str:
        """A message of a real type with plausible fields, then up to three of them made nasty or dropped."""
        kind = draw(st.sampled_from([*gs.ON_MESSAGE, "vote", ""]))
        spec = gs.ON_MESSAGE.get(kind, (gs.TOKEN, None))[0]
        message: dict[str, Any] = {"type": kind}
        for f in spec:
            if f.required or draw(st.booleans()):
                message[draw(st.sampled_from([f.name, f.alias]))] = draw(field_values(f, pin))
        own = sorted({name for f in spec for name in (f.name, f.alias)})
        for name in draw(st.lists(st.sampled_from(own) | st.sampled_from(WS_FIELDS), max_size=3)):
            message[name] = draw(NASTY)
        for name in draw(st.lists(st.sampled_from(sorted(message)), max_size=1)):
            message.pop(name)
        return json.dumps(message)                              # NaN and Infinity go out as such
    protocol = messages().map(lambda text: ("text", text))
    rare = st.one_of(                                               # these may end the connection
        st.binary(min_size=1, max_size=20).map(lambda data: ("raw", data)),     # a text frame, maybe not UTF-8
        st.sampled_from(["[" * 50_000, '{"a":' * 5_000 + "1" + "}" * 5_000, "x" * (1024 * 1024 + 1)]).map(
            lambda text: ("text", text)))
    return st.one_of(
        protocol, protocol, protocol, protocol,
        JSON_VALUES.map(lambda value: ("text", json.dumps(value))),
        st.text(max_size=60).map(lambda text: ("text", text)),
        st.binary(max_size=60).map(lambda data: ("binary", data)),
        st.binary(max_size=20).map(lambda data: ("ping", data)),
        rare)


async def collect(peer: Peer, into: list[dict[str, Any]]) -> None:
    """Read everything `peer` receives into `into`, until cancelled."""
    while True:
        into.append(json.loads(await peer.ws.recv()))


async def test_fuzzed_frames_get_clear_errors_and_disturb_no_one(make_room: Any,
                                                                server_log: pytest.LogCaptureFixture) -> None:
    """Thousands of random and mutated frames: only known replies, no error logged, bystanders see only their own."""
    room = await make_room(host_addresses=("127.0.0.1/32",), pin_attempts_max=10**6, pin_attempts_total_max=10**6)
    pin = await room.host.new_session()
    screen, ana = await room.screen(), await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    screen_saw: list[dict[str, Any]] = []
    ana_saw: list[dict[str, Any]] = []
    readers = [asyncio.create_task(collect(screen, screen_saw)), asyncio.create_task(collect(ana, ana_saw))]
    await ana.stream(1, WORDS[:2])
    sent = 0

    async def attack(frames: list[tuple[str, Any]], register: bool) -> None:
        nonlocal sent
        mallory = Runner(await connect(room.ws_url, local_addr=(STRANGER, 0)), "mallory")
        if register:
            assert (await mallory.register(pin))["type"] == "registered"
        replies = []
        try:
            for n, (kind, data) in enumerate(frames):
                if kind == "ping":
                    await mallory.ws.ping(data + b"%d" % n)             # the client wants each ping distinct
                else:
                    await mallory.ws.send(data, text=kind != "binary")
                sent += 1
            await mallory.ws.send('{"type": "sync"}')           # every reply before its error is ours
            async with asyncio.timeout(TIMEOUT_S):
                while not replies or "'sync'" not in replies[-1].get("message", ""):
                    replies.append(json.loads(await mallory.ws.recv()))
        except ConnectionClosed:
            assert mallory.ws.close_code in (1007, 1009), mallory.ws.close_code
        finally:
            await mallory.ws.close()
        for reply in replies:
            assert reply["type"] in SERVER_MESSAGES, reply
            assert reply["type"] != "error" or reply["code"] in ERROR_CODES, reply

    loop = asyncio.get_running_loop()

    @FUZZ
    @given(st.lists(ws_frames(pin), min_size=5, max_size=30), st.booleans())
    def fuzz(frames: list[tuple[str, Any]], register: bool) -> None:
        run_on(loop, attack(frames, register))
    await asyncio.to_thread(fuzz)
    assert sent >= 1000

    await ana.stream(1, WORDS[2:], start=2)
    await ana.complete(1, len(WORDS))
    await eventually(lambda: any(m["type"] == "completion" and m["participant_id"] == "ana" for m in screen_saw),
                     "ana's completion shown")
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert [a["generated_content"] for a in answers if a["participant_id"] == "ana"] == ["".join(WORDS)]
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    second = await room.host.new_round("again")
    await room.host.start(second["id"])
    await eventually(lambda: any(m["type"] == "challenge" and m["round"] == 2 for m in ana_saw), "ana challenged")
    await ana.stream(2, WORDS)
    await eventually(lambda: len(tokens_of([m for m in screen_saw if m.get("round") == 2], "ana")) == len(WORDS),
                     "round 2 shown")
    for task in readers:
        task.cancel()
    assert {m["type"] for m in ana_saw} <= {"challenge", "heartbeat"}
    assert tokens_of([m for m in screen_saw if m.get("round") == 1], "ana") == list(enumerate(WORDS))
    assert [m for m in screen_saw if m["type"] == "completion" and m["participant_id"] == "ana"][0]["tokens"] == 5
    assert {m["type"] for m in screen_saw} <= SERVER_MESSAGES - {"error", "challenge", "registered"}
    assert errors_logged(server_log) == [] and room.server.db.error is None


TOKEN_CHARS = string.ascii_letters + string.digits + "-_"
HEADER_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
# Framing headers (lengths, encodings, upgrades) are aiohttp's parser's business: see the malformed-HTTP test.
HEADERS = st.dictionaries(
    st.sampled_from(["Authorization", "Origin", "X-Forwarded-For", "Content-Type", "Accept", "User-Agent", "Cookie",
                     "Access-Control-Request-Method"]) | st.text(TOKEN_CHARS, min_size=1, max_size=12),
    st.sampled_from(["Bearer ", "application/json", "127.0.0.1", "null", "*"]) | HEADER_VALUES,
    max_size=4).map(lambda headers: {k: v for k, v in headers.items()
                                     if k.lower() not in ("content-length", "content-encoding", "transfer-encoding",
                                                          "host", "expect", "connection", "upgrade")})


def http_requests(operations: list[tuple[str, str, dict[str, Any]]], ids: list[str],
                  who: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    """(who, method, path, query, body, headers, route) for a documented route, mutated at every layer."""
    @st.composite
    def build(draw: Any) -> tuple[Any, ...]:
        method, path, op = template = draw(st.sampled_from(operations))
        method = draw(st.sampled_from([method] * 6 + ["GET", "POST", "PUT", "DELETE", "OPTIONS"]))
        some_id = draw(st.sampled_from(ids) | st.text(max_size=20))
        path = draw(st.sampled_from(["", "/api"])) + path.replace("{round_id}", urllib.parse.quote(some_id, safe=""))
        query = {}
        for param in op.get("parameters", []) + [{"name": draw(st.text(TOKEN_CHARS, min_size=1, max_size=8)),
                                                  "in": "query"}]:
            if param["in"] == "query" and draw(st.booleans()):
                query[draw(st.sampled_from([param["name"], gs.camel(param["name"])]))] = draw(
                    st.sampled_from(ids + ["1", "-1", "true", "NaN", "1e999", ""]) | st.text(max_size=30))
        schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
        fields = {name: draw(st.sampled_from(ids + [0, 3, 0.5, True, "x"]) | NASTY)
                  for name in schema.get("properties", {}) if draw(st.booleans())}
        body = draw(st.sampled_from([None, json.dumps(fields, allow_nan=True), "{}"]) | JSON_VALUES.map(json.dumps)
                    | st.binary(max_size=80) | st.text(max_size=80))
        return draw(st.sampled_from(who)), method, path, query, body, draw(HEADERS), template
    return build()


async def test_fuzzed_requests_to_every_route_get_a_4xx_or_an_answer_never_a_500(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Random bodies, queries, headers and methods on every route in /openapi.json: never a 5xx, nothing logged."""
    room = await make_room(host_addresses=("127.0.0.1/32",))
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    spec = await room.host.call("GET", "/openapi.json")
    operations = [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    operations += [("GET", path, {}) for path in ("/openapi.json", "/docs", "/redoc", "/ws")]
    clients = {"host": room.host, "stranger": await room.http_from(STRANGER),
               "token": await room.http_from("127.0.0.3", token=room.server.config.admin_token)}
    ids = [rnd["id"], "ana", (await room.host.call("GET", "/session"))["id"]]
    hit: set[tuple[str, str]] = set()
    statuses: list[int] = []

    async def request(who: str, method: str, path: str, query: dict[str, str], body: Any,
                      headers: dict[str, str], route: tuple[str, str, dict[str, Any]]) -> None:
        host = clients[who]
        async with host.http.request(method, room.base + path, params=query, data=body, headers=headers,
                                     allow_redirects=False) as response:
            text = await response.text(errors="replace")
            statuses.append(response.status)
            assert response.status < 500, (method, path, query, body, headers, response.status, text)
            if response.status >= 400:
                reply = json.loads(text)
                assert isinstance(reply["error"], str) and isinstance(reply["code"], str), reply
            hit.add(route[:2])

    loop = asyncio.get_running_loop()

    def fuzz_every_route() -> None:
        for operation in operations:                            # each route gets its share, not a biased draw
            @settings(FUZZ, max_examples=15)
            @given(st.lists(http_requests([operation], ids, list(clients)), min_size=1, max_size=4))
            def fuzz(requests: list[tuple[Any, ...]]) -> None:
                for args in requests:
                    run_on(loop, request(*args))
            fuzz()
    await asyncio.to_thread(fuzz_every_route)
    assert len(statuses) >= 600 and 200 in statuses and 401 in statuses
    assert hit == {(method, path) for method, path, _ in operations}
    assert errors_logged(server_log) == [] and room.server.db.error is None
    await a_full_round_works(room)


async def a_full_round_works(room: Room) -> None:
    """A new session and one round end to end: challenge, tokens on a screen, votes, ranking, reveal."""
    pin = await room.host.new_session()
    screen = await room.screen()
    ana, bia = await room.runner("ana-2", pin), await room.runner("bia-2", pin)
    rnd = await running_round(room, ana, bia)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, ["Sim."])
    await bia.complete(1, 1)
    shown = [await screen.recv("token_update") for _ in range(len(WORDS) + 1)]
    assert tokens_of(shown, "ana-2") == list(enumerate(WORDS)) and tokens_of(shown, "bia-2") == [(0, "Sim.")]
    await room.host.stop(rnd["id"])
    for voter in ("v1", "v2"):
        await room.host.vote(rnd["id"], "ana-2", 5, voter)
        await room.host.vote(rnd["id"], "bia-2", 1, voter)
    board = (await room.host.call("GET", f"/scoreboard?roundId={rnd['id']}"))["scoreboard"]
    assert [(r["participant_id"], r["votes"], r["total_score"], r["generated_content"]) for r in board] == [
        ("ana-2", 2, 10, "".join(WORDS)), ("bia-2", 2, 2, "Sim.")]
    await room.host.call("POST", f"/rounds/{rnd['id']}/close-voting")
    await room.host.call("POST", f"/rounds/{rnd['id']}/reveal")
    assert (await room.host.call("POST", f"/rounds/{rnd['id']}/reveal-next"))["revealedCount"] == 1


# --- load without loss ----------------------------------------------------------------

async def test_under_load_every_token_reaches_every_screen_in_order_and_every_vote_counts_once(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """30 runners x 200 tokens, 10 screens, 50 voters, each on its own address: nothing lost, nothing doubled."""
    room = await make_room(host_addresses=("127.0.0.1/32",))
    pin = await room.host.new_session()
    screens = [await room.screen_at(f"127.0.6.{n + 1}") for n in range(10)]
    runners = [await room.runner_at(f"127.0.5.{n + 1}", f"r{n:02d}", pin) for n in range(30)]
    texts = {r.participant_id: [f"{r.participant_id}:{seq} " for seq in range(200)] for r in runners}
    rnd = await running_round(room, *runners)
    expected = len(runners) * (200 + 1)                            # token_updates and completions

    async def watch(screen: Peer) -> list[dict[str, Any]]:
        seen = []
        async with asyncio.timeout(60):
            while len(seen) < expected:
                message = json.loads(await screen.ws.recv())
                if message["type"] in ("token_update", "completion"):
                    seen.append(message)
        return seen

    async def generate(runner: Runner) -> None:
        for seq, word in enumerate(texts[runner.participant_id]):
            await runner.token(1, seq, word)
            if seq % 20 == 19:
                await asyncio.sleep(0)                          # thirty laptops, interleaved
        await runner.complete(1, 200)
    watchers = [asyncio.create_task(watch(screen)) for screen in screens]
    await asyncio.gather(*(generate(runner) for runner in runners))
    for seen in await asyncio.gather(*watchers):
        for pid, words in texts.items():
            assert tokens_of(seen, pid) == list(enumerate(words)), pid
        assert sorted(m["participant_id"] for m in seen if m["type"] == "completion") == sorted(texts)
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert {a["participant_id"]: a["generated_content"] for a in answers} == {
        pid: "".join(words) for pid, words in texts.items()}
    saved = db_rows(room.server.config.database, "SELECT participantId, group_concat(content, '') AS text "
                    "FROM (SELECT * FROM tokens ORDER BY seq) GROUP BY participantId")
    assert {row["participantId"]: row["text"] for row in saved} == {pid: "".join(w) for pid, w in texts.items()}

    def score(voter: int, pid: str) -> int:
        return (voter * 7 + int(pid[1:])) % 6

    async def vote(voter: int) -> None:
        phone = await room.http_from(f"127.0.7.{voter + 1}")
        for pid in texts:
            await phone.vote(rnd["id"], pid, score(voter, pid), f"phone-{voter}")
        again = await phone.vote(rnd["id"], "r00", 5, f"phone-{voter}", expect=409)     # a double tap
        assert again["error"] == "Already voted for this participant"
    await asyncio.gather(*(vote(voter) for voter in range(50)))
    board = (await room.host.call("GET", f"/scoreboard?roundId={rnd['id']}"))["scoreboard"]
    assert {r["participant_id"]: (r["votes"], r["total_score"]) for r in board} == {
        pid: (50, sum(score(voter, pid) for voter in range(50))) for pid in texts}
    assert errors_logged(server_log) == []

