"""Tests for gambiarra_server.py: the real app on a loopback port, a real SQLite file,
and the clients a meetup has (runners and screens over `websockets`, the host and
the phones over HTTP). Sections mirror the server's, from pure code to the edges.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
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

    async def sync(self) -> None:
        """Wait until the server has handled every frame sent so far: it answers frames in order,
        so the error reply to a frame of an unknown type comes after all earlier ones are done."""
        await self.send({"type": "sync"})
        reply = await self.recv("error")
        assert reply["message"].startswith("Unknown message type 'sync'"), reply

    async def closed(self) -> tuple[int | None, str | None]:
        """Read until the server closes the connection; its close code and reason."""
        async with asyncio.timeout(TIMEOUT_S):
            with pytest.raises(ConnectionClosed):
                while True:
                    await self.ws.recv()
        return self.ws.close_code, self.ws.close_reason


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
# Contract helpers: placeholders for ids and clocks, polling, rounds in a stage
# =============================================================================

class Like:
    """Equal to any value `check` accepts, so full-dict comparisons can hold ids and clock readings."""

    def __init__(self, what: str, check: Callable[[Any], Any]) -> None:
        self.what, self.check = what, check

    def __eq__(self, other: Any) -> bool:
        return bool(self.check(other))

    def __repr__(self) -> str:
        return f"<{self.what}>"


ID = Like("uuid", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", v))
WHEN = Like("ISO time", lambda v: isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", v))
MS = Like("epoch ms", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 1_600_000_000_000)
AMOUNT = Like("number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
RUNNER_ROW = {"runner": "ollama", "model": "llama3.1:8b", "connected": True, "createdAt": WHEN, "lastSeen": WHEN}
MODEL_INFO = {"name": "llama3.1:8b", "runner": "ollama"}


async def eventually(probe: Callable[[], Any]) -> Any:
    """Poll `probe` (plain or async) until it returns something truthy: flushes and closes are asynchronous."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            result = probe()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.02)


async def get_when(room: Room, path: str, check: Callable[[Any], bool]) -> Any:
    """GET `path` until its body passes `check` (the server learns of a closed socket asynchronously)."""
    async def probe() -> Any:
        body = await room.host.call("GET", path)
        return body if check(body) else None
    return await eventually(probe)


@pytest.fixture
async def room_with(aiohttp_server: Any, config: gs.Config, http: aiohttp.ClientSession):
    """Start a server with some config fields changed; gives its Room and its Server."""
    rooms: list[Room] = []

    async def start(**changes: Any) -> tuple[Room, gs.Server]:
        app = gs.make_app(replace(config, **changes))
        server = await aiohttp_server(app, host="127.0.0.1")
        rooms.append(Room(str(server.make_url("")).rstrip("/"), http))
        return rooms[-1], app[gs.server_key]
    yield start
    for room in rooms:
        await room.close()


async def answered(room: Room, rnd: dict[str, Any], answers: dict[str, Runner], words: list[str] = WORDS) -> None:
    """Each runner gets the challenge, streams `words` and completes; returns once the server has it all."""
    for runner in answers.values():
        await runner.recv("challenge")
        await runner.stream(rnd["index"], words)
        await runner.complete(rnd["index"], len(words))
        await runner.sync()


async def round_in(room: Room, pin: str, stage: str) -> dict[str, Any]:
    """A new round taken to `stage` (created, running, open, closed, revealed or all revealed), with one
    answer (ana's) once started; its latest row."""
    host, rnd = room.host, await room.host.new_round()
    if stage == "created":
        return rnd
    ana = await room.runner("ana", pin)
    rnd = await host.start(rnd["id"])
    await answered(room, rnd, {"ana": ana})
    steps = [("running", None), ("open", "/rounds/stop"), ("closed", f"/rounds/{rnd['id']}/close-voting"),
             ("revealed", f"/rounds/{rnd['id']}/reveal"), ("all revealed", f"/rounds/{rnd['id']}/reveal-next")]
    for name, path in steps:
        if path:
            rnd = await host.call("POST", path, {"roundId": rnd["id"]} if path == "/rounds/stop" else None)
        if name == stage:
            return rnd
    raise AssertionError(stage)


def route_path(route: gs.Route) -> str:
    return route.path.replace("{round_id}", "no-such-round")


# =============================================================================
# HTTP: every route, at the root and under /api, with the shapes clients read
# =============================================================================

@pytest.mark.parametrize("route", gs.ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_every_route_answers_at_the_root_and_under_api(room: Room, route: gs.Route) -> None:
    """Both spellings reach the same handler (the telão calls /api/..., scripts the root)."""
    answers = []
    for prefix in ("", "/api"):
        status, body = await room.host.status(route.method, prefix + route_path(route),
                                              {} if route.body else None)
        assert status < 500 and "No route" not in str(body), (prefix, status, body)
        answers.append(status)
    assert answers[0] == answers[1]


async def test_unknown_paths_and_methods_get_json_errors(room: Room) -> None:
    """A wrong URL is a JSON 404, a wrong method a JSON 405, like every other error."""
    assert await room.host.status("GET", "/nope") == (404, {"error": "No route GET /nope", "code": "NOT_FOUND"})
    assert await room.host.status("DELETE", "/api/session") == (
        405, {"error": "No route DELETE /api/session", "code": "METHOD_NOT_ALLOWED"})


async def test_health_shape(room: Room) -> None:
    """GET /health: status, server clock, version, database state and connection count."""
    assert await room.host.call("GET", "/health") == {"status": "ok", "timestamp": MS, "version": gs.__version__,
                                                     "database": "ok", "connections": 0}


async def test_new_session_shape(room: Room) -> None:
    """POST /session answers the club's keys; a body whose fields are all optional may be absent."""
    body = await room.host.call("POST", "/session")
    assert body == {"session_id": ID, "id": body["session_id"], "pin": body["pin"], "created_at": WHEN,
                    "status": "active", "disconnected_participants": 0}
    assert re.fullmatch(r"\d{6}", body["pin"])


async def test_session_lists_participants_and_rounds_in_the_club_casing(room: Room, pin: str) -> None:
    """GET /session: the session row (camelCase, with the PIN for the host), its participants and rounds."""
    ana = await room.runner("ana", pin)
    await room.runner("bia", pin)
    await ana.ws.close()
    rnd = await room.host.new_round()
    session = await get_when(room, "/session", lambda s: not s["participants"][0]["connected"])
    assert session == {
        "id": ID, "createdAt": WHEN, "endedAt": None, "status": "active", "pin": pin,
        "participants": [{"id": "ana", "sessionId": session["id"], "nickname": "Ana", **RUNNER_ROW, "connected": False},
                         {"id": "bia", "sessionId": session["id"], "nickname": "Bia", **RUNNER_ROW}],
        "rounds": [rnd]}


async def test_presence_lists_live_connections_only(room: Room, pin: str) -> None:
    """GET /presence comes from memory: who is connected now, oldest first."""
    ana = await room.runner("ana", pin)
    await room.runner("bia", pin)
    session_id = (await room.host.call("GET", "/session"))["id"]
    presence = await room.host.call("GET", "/api/presence")
    assert presence == {"sessionId": session_id, "connectedCount": 2, "participants": [
        {"id": "ana", "sessionId": session_id, "nickname": "Ana", **RUNNER_ROW},
        {"id": "bia", "sessionId": session_id, "nickname": "Bia", **RUNNER_ROW}]}
    await ana.ws.close()
    presence = await get_when(room, "/presence", lambda p: p["connectedCount"] == 1)
    assert [p["id"] for p in presence["participants"]] == ["bia"]


async def test_round_rows_are_camel_case_with_the_club_columns(room: Room, pin: str) -> None:
    """POST /rounds, start and stop return the whole Round row; start and stop stamp it."""
    session_id = (await room.host.call("GET", "/session"))["id"]
    rnd = await room.host.new_round("Draw a cat", max_tokens=64, temperature=0, deadline_ms=5000, svg_mode=True)
    assert rnd == {"id": ID, "sessionId": session_id, "index": 1, "prompt": "Draw a cat", "maxTokens": 64,
                   "temperature": 0.0, "deadlineMs": 5000, "seed": None, "svgMode": True, "startedAt": None,
                   "endedAt": None, "votingStatus": "closed", "revealedCount": 0, "createdAt": WHEN}
    started = await room.host.start(rnd["id"])
    assert started == {**rnd, "startedAt": WHEN}
    assert await room.host.call("POST", "/api/rounds/stop", {"round_id": rnd["id"]}) == {
        **started, "endedAt": WHEN, "votingStatus": "open"}


async def test_stop_without_a_body_stops_the_running_round(room: Room, pin: str) -> None:
    """POST /rounds/stop with no body stops whatever round is running."""
    rnd = await room.host.start((await room.host.new_round())["id"])
    stopped = await room.host.call("POST", "/rounds/stop")
    assert (stopped["id"], stopped["votingStatus"]) == (rnd["id"], "open")


async def test_current_round_carries_the_live_tokens(room: Room, pin: str) -> None:
    """GET /rounds/current: the running Round row spread, plus liveTokens by participant in seq order."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await ana.stream(1, WORDS[:3])
    await bia.token(1, 1, "b")
    await bia.token(1, 0, "a")
    await ana.sync()
    await bia.sync()
    assert await room.host.call("GET", "/api/rounds/current") == {**rnd, "liveTokens": {"ana": WORDS[:3],
                                                                                         "bia": ["a", "b"]}}
    await room.host.stop(rnd["id"])
    assert await room.host.status("GET", "/rounds/current") == (404, {"error": "No active round",
                                                                      "code": "NOT_FOUND"})


async def test_responses_list_every_answer_with_round_facts(room: Room, pin: str) -> None:
    """GET /rounds/{id}/responses: what the voting page shows."""
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round("Draw", svgMode=True))["id"])
    await answered(room, rnd, {"ana": ana}, ["<svg>", "</svg>"])
    assert await room.host.call("GET", f"/rounds/{rnd['id']}/responses") == {
        "responses": [{"participant_id": "ana", "nickname": "Ana", "generated_content": "<svg></svg>"}],
        "svgMode": True, "votingStatus": "closed", "prompt": "Draw", "round_id": rnd["id"]}


async def test_voting_ceremony_routes_return_the_round(room: Room, pin: str) -> None:
    """close-voting (or /votes/close), reveal and reveal-next each return the updated Round row."""
    rnd = await round_in(room, pin, "open")
    closed = await room.host.call("POST", "/votes/close")
    assert closed == {**rnd, "votingStatus": "closed"}
    revealed = await room.host.call("POST", f"/api/rounds/{rnd['id']}/reveal")
    assert revealed == {**closed, "votingStatus": "revealed", "revealedCount": 0}
    assert await room.host.call("POST", f"/rounds/{rnd['id']}/reveal-next") == {**revealed, "revealedCount": 1}
    assert (await room.host.call("POST", f"/rounds/{rnd['id']}/reveal"))["revealedCount"] == 0   # repeatable


async def test_votes_close_takes_a_round_id_too(room: Room, pin: str) -> None:
    """POST /votes/close {roundId} is the seed's name for close-voting."""
    rnd = await round_in(room, pin, "open")
    assert (await room.host.call("POST", "/votes/close", {"roundId": rnd["id"]}))["votingStatus"] == "closed"


async def test_kick_answers_whether_they_were_connected(room: Room, pin: str) -> None:
    """POST /participants/kick: ok, and whether a live connection was closed."""
    await room.runner("ana", pin)
    assert await room.host.call("POST", "/participants/kick", {"participantId": "ana"}) == {
        "status": "ok", "participant_id": "ana", "was_connected": True}
    assert await room.host.call("POST", "/participants/kick", {"participant_id": "ana"}) == {
        "status": "ok", "participant_id": "ana", "was_connected": False}
    assert await room.host.status("POST", "/participants/kick", {"participant_id": "zed"}) == (
        404, {"error": "Participant zed is not in this session", "code": "NOT_FOUND"})


# =============================================================================
# HTTP: lifecycle errors (each wrong step is a 4xx with a sentence)
# =============================================================================

def round_call(method: str, path: str, body: dict[str, Any] | None = None) -> Callable[[dict[str, Any]], tuple]:
    """A request about a round, filled in once the round exists ({id} in the path and body)."""
    def fill(rnd: dict[str, Any]) -> tuple:
        filled = None if body is None else {k: v.format(id=rnd["id"]) if isinstance(v, str) else v
                                            for k, v in body.items()}
        return method, path.format(id=rnd["id"]), filled
    fill.label = f"{method} {path}{'' if body is None else ' ' + json.dumps(body)}"
    return fill


START = round_call("POST", "/rounds/start", {"roundId": "{id}"})
STOP = round_call("POST", "/rounds/stop", {"roundId": "{id}"})
CLOSE = round_call("POST", "/rounds/{id}/close-voting")
REVEAL = round_call("POST", "/rounds/{id}/reveal")
NEXT = round_call("POST", "/rounds/{id}/reveal-next")


def gs_code(status: int) -> str:
    return {400: "INVALID_INPUT", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 409: "CONFLICT"}[status]


def vote_for(participant_id: str) -> Callable[[dict[str, Any]], tuple]:
    return round_call("POST", "/votes", {"roundId": "{id}", "participantId": participant_id, "score": 3,
                                         "voterId": "v1"})


@pytest.mark.parametrize(("stage", "call", "status", "error"), [
    ("running", START, 409, "Round already started"),
    ("open", START, 409, "Round already started"),
    ("created", STOP, 409, "Round has not started"),
    ("open", STOP, 409, "Round already ended"),
    ("closed", STOP, 409, "Round already ended"),
    ("created", round_call("POST", "/rounds/stop", {}), 409, "No round is running"),
    ("open", round_call("POST", "/rounds/stop"), 409, "No round is running"),
    ("created", CLOSE, 409, "Voting is not open for this round"),
    ("running", CLOSE, 409, "Voting is not open for this round"),
    ("closed", CLOSE, 409, "Voting is not open for this round"),
    ("revealed", CLOSE, 409, "Voting is not open for this round"),
    ("running", round_call("POST", "/votes/close", {"roundId": "{id}"}), 409, "Voting is not open for this round"),
    ("closed", round_call("POST", "/votes/close"), 404, "No round has voting open"),
    ("created", REVEAL, 409, "The round has not ended yet"),
    ("running", REVEAL, 409, "The round has not ended yet"),
    ("open", REVEAL, 409, "Close voting before the reveal"),
    ("open", NEXT, 409, "Start the reveal first"),
    ("closed", NEXT, 409, "Start the reveal first"),
    ("all revealed", NEXT, 409, "Every position is already revealed"),
    ("created", vote_for("ana"), 409, "Voting is not open for this round"),
    ("running", vote_for("ana"), 409, "Voting is not open for this round"),
    ("closed", vote_for("ana"), 409, "Voting is not open for this round"),
    ("revealed", vote_for("ana"), 409, "Voting is not open for this round"),
    ("open", vote_for("zed"), 404, "Participant not found"),
], ids=lambda value: getattr(value, "label", None))
async def test_lifecycle_errors(room: Room, pin: str, stage: str, call: Callable, status: int, error: str) -> None:
    """Each step out of order is refused with its status and sentence, and changes nothing."""
    rnd = await round_in(room, pin, stage)
    assert await room.host.status(*call(rnd)) == (status, {"error": error, "code": gs_code(status)})
    assert (await room.host.call("GET", "/session"))["rounds"] == [rnd]


async def test_only_one_round_runs_at_a_time(room: Room, pin: str) -> None:
    """Starting a second round while one runs is a 409 naming the running one."""
    first, second = await room.host.new_round(), await room.host.new_round()
    await room.host.start(first["id"])
    assert await room.host.status("POST", "/rounds/start", {"roundId": second["id"]}) == (
        409, {"error": "Round 1 is still running; stop it first", "code": "CONFLICT"})
    await room.host.stop(first["id"])
    assert (await room.host.start(second["id"]))["index"] == 2


async def test_voting_for_someone_who_did_not_answer_is_404(room: Room, pin: str) -> None:
    """A registered participant without an answer in the round can't be voted for."""
    await room.runner("bia", pin)
    rnd = await round_in(room, pin, "open")
    assert await room.host.status(*vote_for("bia")(rnd)) == (404, {"error": "Participant not found",
                                                                 "code": "NOT_FOUND"})


async def test_a_vote_is_immutable(room: Room, pin: str, config: gs.Config) -> None:
    """A second vote by the same voter for the same answer is 409 with the club's exact sentence."""
    rnd = await round_in(room, pin, "open")
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    assert await room.host.status(*vote_for("ana")(rnd)) == (
        409, {"error": "Already voted for this participant", "code": "CONFLICT"})
    assert [v["score"] for v in db_rows(config.database, "SELECT score FROM votes")] == [5]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/rounds/start", {"roundId": "no-such-round"}),
    ("POST", "/rounds/stop", {"roundId": "no-such-round"}),
    ("GET", "/rounds/no-such-round/responses", None),
    ("POST", "/rounds/no-such-round/close-voting", None),
    ("POST", "/votes/close", {"roundId": "no-such-round"}),
    ("POST", "/rounds/no-such-round/reveal", None),
    ("POST", "/rounds/no-such-round/reveal-next", None),
    ("POST", "/votes", {"roundId": "no-such-round", "participantId": "ana", "score": 3}),
    ("GET", "/votes/mine?roundId=no-such-round&voterId=v1", None),
    ("GET", "/scoreboard?round_id=no-such-round", None),
])
async def test_unknown_round_ids_are_404(room: Room, pin: str, method: str, path: str, body: Any) -> None:
    """Every route that takes a round id says so when there is no such round."""
    assert await room.host.status(method, path, body) == (404, {"error": "Round not found", "code": "NOT_FOUND"})


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/session", None), ("GET", "/presence", None), ("GET", "/rounds/current", None),
    ("POST", "/rounds", {"prompt": "x"}), ("GET", "/scoreboard", None), ("GET", "/metrics", None),
    ("POST", "/participants/kick", {"participantId": "ana"}), ("POST", "/votes/close", None),
    ("POST", "/rounds/stop", None), ("GET", "/export.csv", None), ("GET", "/export-events.csv", None), ("GET", "/export-all.json", None),
])
async def test_routes_that_need_a_session_say_there_is_none(room: Room, method: str, path: str, body: Any) -> None:
    """Before the first POST /session: 404 'No active session', never a 500."""
    status, answer = await room.host.status(method, path, body)
    assert (status, answer["error"]) == (404, "No active session")


# =============================================================================
# HTTP: bad input (always JSON {"error": ...} with a 4xx)
# =============================================================================

@pytest.mark.parametrize(("method", "path", "body", "error"), [
    ("POST", "/rounds", "{", "The request body is not valid JSON"),
    ("POST", "/rounds", b"\xff\xfe", "The request body is not valid JSON"),
    ("POST", "/rounds", "[1, 2]", "The request body must be a JSON object"),
    ("POST", "/rounds", '"prompt"', "The request body must be a JSON object"),
    ("POST", "/rounds", "null", "The request body must be a JSON object"),
    ("POST", "/rounds", "[" * 100_000, "The request body is not valid JSON"),
    ("POST", "/rounds", {}, "'prompt' is required"),
    ("POST", "/rounds", {"prompt": "x", "seed": -1}, "'seed' must be at least 0"),
    ("POST", "/rounds", {"prompt": "x", "deadlineMs": 1.5}, "'deadline_ms' must be an integer"),
    ("POST", "/session", {"pinLength": 3}, "'pin_length' must be at least 4"),
    ("POST", "/session", {"pinLength": "6"}, "'pin_length' must be an integer"),
    ("POST", "/session", "[]", "The request body must be a JSON object"),
    ("POST", "/rounds/start", {}, "'round_id' is required"),
    ("POST", "/rounds/start", {"roundId": 5}, "'round_id' must be a string"),
    ("POST", "/rounds/stop", {"round_id": ["x"]}, "'round_id' must be a string"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana"}, "'score' is required"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": 6}, "'score' must be at most 5"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": -1}, "'score' must be at least 0"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": 2.5}, "'score' must be an integer"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": "5"}, "'score' must be an integer"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": True}, "'score' must be an integer"),
    ("POST", "/votes", {"roundId": "r", "participantId": 7, "score": 1}, "'participant_id' must be a string"),
    ("POST", "/votes", {"roundId": "r", "participantId": "a", "score": 1, "responseTime": "x"},
     "'response_time' must be an integer"),
    ("POST", "/participants/kick", {}, "'participant_id' is required"),
    ("GET", "/votes/mine", None, "'round_id' is required"),
    ("GET", "/votes/mine?round_id=" + "r" * 201, None, "'round_id' must be at most 200 characters"),
])
async def test_bad_bodies_and_queries_are_400_with_a_sentence(room: Room, pin: str, method: str, path: str,
                                                              body: Any, error: str) -> None:
    """Malformed JSON, a non-object, a missing field, a wrong type, a value out of range: 400 naming it."""
    assert await room.host.status(method, path, body) == (400, {"error": error, "code": "INVALID_INPUT"})


async def test_an_oversize_body_is_413(room: Room, pin: str) -> None:
    """A body over aiohttp's 1 MiB limit is a JSON 413, not a 500."""
    big = io.BytesIO(json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode())   # aiohttp warns on raw bytes
    async with room.host.http.post(room.base + "/rounds", data=big) as response:
        status, body = response.status, await response.json()
    assert (status, body) == (413, {"error": "The request body is over the limit of 1048576 bytes",
                                    "code": "REQUEST_ENTITY_TOO_LARGE"})


async def test_a_body_with_both_casings_and_nulls_uses_the_defaults(room: Room, pin: str) -> None:
    """snake_case and camelCase both work; null means absent."""
    rnd = await room.host.new_round(max_tokens=10, deadlineMs=None, seed=None, svg_mode=None)
    assert (rnd["maxTokens"], rnd["deadlineMs"], rnd["seed"], rnd["svgMode"]) == (10, 90000, None, False)


# =============================================================================
# HTTP: votes, scoreboard and metrics
# =============================================================================

async def test_a_vote_returns_the_vote_row_and_stores_only_a_hash(room: Room, pin: str, config: gs.Config) -> None:
    """POST /votes answers the Vote row; the voter id is kept only as its SHA-256."""
    rnd = await round_in(room, pin, "open")
    vote = await room.host.call("POST", "/api/votes", {"round_id": rnd["id"], "participant_id": "ana", "score": 0,
                                                       "voter_id": "phone-1", "response_time": 1500})
    digest = gs.sha256_hex("phone-1")
    assert vote == {"id": ID, "roundId": rnd["id"], "voterHash": digest, "participantId": "ana", "score": 0,
                    "createdAt": WHEN, "voteOrder": 1, "responseTime": 1500, "userAgent": Like("aiohttp UA", bool)}
    stored = db_rows(config.database, "SELECT * FROM votes")
    assert [row["voterHash"] for row in stored] == [digest] and "phone-1" not in str(stored)


async def test_votes_mine_lists_this_voters_scores(room: Room, pin: str) -> None:
    """GET /votes/mine?roundId=&voterId= is a camelCase list of {participantId, score}, for that voter only."""
    bia = await room.runner("bia", pin)
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, {"ana": ana, "bia": bia})
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "bia", 4, "v1")
    await room.host.vote(rnd["id"], "ana", 2, "v1")
    await room.host.vote(rnd["id"], "ana", 5, "v2")
    mine = f"/api/votes/mine?roundId={rnd['id']}&voterId=v1"
    assert await room.host.call("GET", mine) == [{"participantId": "bia", "score": 4},
                                                 {"participantId": "ana", "score": 2}]
    assert await room.host.call("GET", f"/votes/mine?round_id={rnd['id']}&voter_id=v3") == []


async def test_without_a_voter_id_the_voter_is_the_address(room: Room, pin: str) -> None:
    """No voterId: the client address is the voter, so the same phone can't vote twice."""
    rnd = await round_in(room, pin, "open")
    body = {"roundId": rnd["id"], "participantId": "ana", "score": 4}
    await room.host.call("POST", "/votes", body)
    assert (await room.host.status("POST", "/votes", body))[0] == 409
    assert await room.host.call("GET", f"/votes/mine?roundId={rnd['id']}") == [{"participantId": "ana", "score": 4}]


async def test_scoreboard_ranks_by_average_then_vote_count(room: Room, pin: str) -> None:
    """GET /scoreboard: one row per answer, best average first, ties broken by more votes; no votes is 0."""
    names = ("ana", "bia", "caio", "dani")
    runners = {name: await room.runner(name, pin) for name in names}
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, runners, ["a", "b"])
    await room.host.stop(rnd["id"])
    for voter, scores in {"v1": {"ana": 4, "bia": 4, "caio": 5}, "v2": {"bia": 4}}.items():
        for name, score in scores.items():
            await room.host.vote(rnd["id"], name, score, voter)
    board = await room.host.call("GET", "/api/scoreboard")
    row = {"tokens": 2, "latency_first_token_ms": AMOUNT, "duration_ms": AMOUNT,
           "tps_avg": AMOUNT, "generated_content": "ab", "model": "llama3.1:8b", "runner": "ollama"}
    assert board == {"round_id": rnd["id"], "round_index": 1, "svgMode": False, "votingStatus": "open",
                     "revealedCount": 0, "scoreboard": [
                         {**row, "participant_id": "caio", "nickname": "Caio", "votes": 1, "avg_score": 5.0,
                          "total_score": 5},
                         {**row, "participant_id": "bia", "nickname": "Bia", "votes": 2, "avg_score": 4.0,
                          "total_score": 8},
                         {**row, "participant_id": "ana", "nickname": "Ana", "votes": 1, "avg_score": 4.0,
                          "total_score": 4},
                         {**row, "participant_id": "dani", "nickname": "Dani", "votes": 0, "avg_score": 0.0,
                          "total_score": 0}]}


async def test_scoreboard_default_round_is_the_latest_ended_else_the_running_one(room: Room, pin: str) -> None:
    """No round started: 404; one running: that one; once one ended, the latest ended, even while another runs."""
    assert await room.host.status("GET", "/scoreboard") == (404, {"error": "No round found", "code": "NOT_FOUND"})
    first, second = await room.host.new_round(), await room.host.new_round()
    await room.host.start(first["id"])
    assert (await room.host.call("GET", "/scoreboard"))["round_id"] == first["id"]
    await room.host.stop(first["id"])
    await room.host.start(second["id"])
    assert (await room.host.call("GET", "/scoreboard"))["round_id"] == first["id"]
    await room.host.stop(second["id"])
    assert (await room.host.call("GET", "/scoreboard"))["round_id"] == second["id"]
    explicit = await room.host.call("GET", f"/scoreboard?roundId={first['id']}")
    assert (explicit["round_id"], explicit["scoreboard"]) == (first["id"], [])


async def test_scoreboard_never_sends_a_null_tps(room: Room, pin: str) -> None:
    """tps_avg is a number even for an answer of one token or none (the telão calls toFixed on it)."""
    one_token, no_token = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await one_token.token(1, 0, "Sim")
    await one_token.send({"type": "complete", "round": 1, "participant_id": "ana", "tokens": 1})
    await no_token.send({"type": "complete", "round": 1, "participant_id": "bia", "latency_ms_first_token": None,
                         "duration_ms": None, "model_info": None})
    await one_token.sync()
    await no_token.sync()
    board = (await room.host.call("GET", f"/scoreboard?round_id={rnd['id']}"))["scoreboard"]
    assert sorted((r["participant_id"], r["tokens"], r["generated_content"]) for r in board) == [
        ("ana", 1, "Sim"), ("bia", 0, "")]                     # a tie: both orders are right
    assert all(isinstance(r["tps_avg"], float) for r in board), board


async def test_metrics_totals_for_the_session(room: Room, pin: str) -> None:
    """GET /metrics: the club's totals plus ours (tokens received, gaps, rescued answers)."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await room.host.new_round()
    await ana.stream(1, ["a", "b", "c"])
    await ana.complete(1, 7)                                   # the runner counts differently
    await bia.token(1, 0, "x")
    await bia.token(1, 2, "z")                                 # seq 1 never arrives, and bia never completes
    await ana.sync()
    await bia.sync()
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    assert await room.host.call("GET", "/api/metrics") == {
        "session_id": ID, "total_rounds": 2, "completed_rounds": 1, "total_participants": 2, "total_tokens": 9,
        "total_tokens_received": 5, "total_seq_gaps": 1, "rescued_generations": 1, "total_votes": 1}


# =============================================================================
# HTTP: the host and everyone else
# =============================================================================
#
# These servers trust only 10.255.255.0/24 as the host, so the test client on
# loopback is one of the audience's phones.

AWAY = ("10.255.255.0/24",)


@pytest.fixture
async def away(room_with: Callable) -> tuple[Room, dict[str, str]]:
    """A server that does not take loopback for the host, with a session; the admin token's header."""
    room, server = await room_with(host_addresses=AWAY)
    admin = {"Authorization": f"Bearer {server.config.admin_token}"}
    await room.host.call("POST", "/session", headers=admin)
    return room, admin


HOST_ROUTES = [route for route in gs.ROUTES if route.host]


@pytest.mark.parametrize("route", HOST_ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_host_routes_need_the_admin_token_from_elsewhere(away: tuple, route: gs.Route) -> None:
    """No token: 401; a wrong token: 403; both before the body is even read."""
    room, _ = away
    for prefix in ("", "/api"):
        path = prefix + route_path(route)
        assert await room.host.status(route.method, path, "{") == (401, {
            "error": "This is a host route: call it from the host's machine or send "
                     "'Authorization: Bearer <admin token>'", "code": "UNAUTHORIZED"})
        for header in ("Bearer wrong", "Basic d3Jvbmc="):
            assert await room.host.status(route.method, path, "{", headers={"Authorization": header}) == (
                403, {"error": "Wrong admin token", "code": "FORBIDDEN"})


async def test_the_admin_token_opens_every_host_step(away: tuple) -> None:
    """With the token a remote host runs a whole round and exports it."""
    room, admin = away
    pin = (await room.host.call("POST", "/api/session", headers=admin))["pin"]
    ana = await room.runner("ana", pin)
    rnd = await room.host.call("POST", "/rounds", {"prompt": "p"}, headers=admin)
    rnd = await room.host.call("POST", "/rounds/start", {"roundId": rnd["id"]}, headers=admin)
    await answered(room, rnd, {"ana": ana})
    for path, body in [("/rounds/stop", {}), (f"/rounds/{rnd['id']}/close-voting", None),
                       (f"/rounds/{rnd['id']}/reveal", None), (f"/rounds/{rnd['id']}/reveal-next", None),
                       ("/participants/kick", {"participantId": "ana"})]:
        await room.host.call("POST", path, body, headers=admin)
    for path in ("/export.csv", "/export-events.csv", "/export-all.json"):
        await room.host.call("GET", path, headers=admin)


async def test_audience_routes_need_no_token(away: tuple) -> None:
    """Phones and the telão read and vote without any token."""
    room, admin = away
    for path in ("/health", "/session", "/presence", "/metrics"):
        await room.host.call("GET", "/api" + path)
    assert (await room.host.status("GET", "/rounds/current"))[0] == 404       # no round yet, but allowed


async def test_the_pin_is_only_for_the_host(away: tuple) -> None:
    """GET /session shows the plain PIN to the host (or the token's holder), never to a phone."""
    room, admin = away
    session = await room.host.call("GET", "/api/session")
    assert "pin" not in session and session["status"] == "active"
    assert (await room.host.call("GET", "/api/session", headers=admin))["pin"].isdigit()
    assert "pin" not in await room.host.call("GET", "/session", headers={"Authorization": "Bearer wrong"})


@pytest.mark.parametrize(("trust_proxy", "status"), [(False, 401), (True, 200)])
async def test_x_forwarded_for_counts_only_behind_a_trusted_proxy(room_with: Callable, trust_proxy: bool,
                                                                  status: int) -> None:
    """A forged X-Forwarded-For naming the host's address is ignored unless --trust-proxy."""
    room, _ = await room_with(host_addresses=AWAY, trust_proxy=trust_proxy)
    forged = {"X-Forwarded-For": "10.255.255.7, 127.0.0.1"}
    assert (await room.host.status("POST", "/session", headers=forged))[0] == status


async def test_the_audience_is_rate_limited_but_never_the_host_or_the_docs(room_with: Callable) -> None:
    """Past RATE_LIMIT_MAX requests a non-host address gets 429 with Retry-After; /health and /docs still answer."""
    room, _ = await room_with(host_addresses=AWAY, rate_limit_max=3)
    for _ in range(3):
        await room.host.call("GET", "/presence", expect=404)
    async with room.host.http.get(room.base + "/api/presence") as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) > 0
        assert (await response.json())["code"] == "TOO_MANY_REQUESTS"
    for path in ("/health", "/docs", "/openapi.json"):
        await room.host.call("GET", path)
    host_room, _ = await room_with(rate_limit_max=3)
    for _ in range(5):
        await host_room.host.call("GET", "/presence", expect=404)


async def test_cors_preflight_and_headers_follow_cors_origins(room_with: Callable) -> None:
    """A preflight from an allowed origin gets 204 and the CORS headers; another origin gets none."""
    room, _ = await room_with(cors_origins=("http://telao.local:5173",))
    preflight = {"Origin": "http://telao.local:5173", "Access-Control-Request-Method": "POST"}
    async with room.host.http.options(room.base + "/api/votes", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "http://telao.local:5173"
    async with room.host.http.get(room.base + "/health", headers={"Origin": "http://evil.example"}) as response:
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers


async def test_a_cross_origin_websocket_is_refused(room_with: Callable) -> None:
    """A browser page on an origin CORS_ORIGINS does not allow can't open /ws."""
    room, _ = await room_with(cors_origins=("http://telao.local:5173",))
    with pytest.raises(Exception, match="403"):
        await connect(room.ws_url, origin="http://evil.example")
    async with connect(room.ws_url, origin="http://telao.local:5173") as ws:
        await ws.send(json.dumps({"type": "telao_register"}))
        assert json.loads(await ws.recv())["type"] == "registered_telao"


# =============================================================================
# HTTP: the API describes itself, offline
# =============================================================================

async def test_openapi_lists_every_route(room: Room) -> None:
    """/openapi.json has one operation per route of the table, host routes marked with the token scheme."""
    spec = await room.host.call("GET", "/openapi.json")
    operations = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    assert operations == {(route.path, route.method) for route in gs.ROUTES}
    assert spec["openapi"].startswith("3.") and spec["info"]["version"] == gs.__version__
    votes = spec["paths"]["/votes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert votes["required"] == ["round_id", "participant_id", "score"]
    assert votes["properties"]["score"] == {"type": "integer", "description": "0 to 5", "minimum": 0, "maximum": 5}
    assert spec["paths"]["/rounds/start"]["post"]["security"] == [{}, {"adminToken": []}]


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_docs_are_one_self_contained_page(room: Room, prefix: str) -> None:
    """/docs is HTML with every route and message and no external asset (meetups are often offline)."""
    async with room.host.http.get(room.base + prefix + "/docs") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    for route in gs.ROUTES:
        assert f"<code>{route.path}</code>" in page
    for kind in gs.ON_MESSAGE:
        assert f"<code>{kind}</code>" in page


async def test_redoc_redirects_to_docs(room: Room) -> None:
    """FastAPI users type /redoc; it leads to the same page."""
    async with room.host.http.get(room.base + "/redoc", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (302, "/docs")


# =============================================================================
# WebSocket: register, screens and malformed frames
# =============================================================================

async def test_register_replies_with_the_session(room: Room, pin: str) -> None:
    """register -> registered with session_id (and our participant_id); no resume when nothing runs."""
    session_id = (await room.host.call("GET", "/session"))["id"]
    ana = await room.runner("ana")
    assert await ana.register(pin) == {"type": "registered", "session_id": session_id, "participant_id": "ana"}


async def test_a_wrong_pin_keeps_the_socket_open(room: Room, pin: str) -> None:
    """A bad PIN is an INVALID_PIN error; the same socket may then register with the right one."""
    ana = await room.runner("ana")
    wrong = "0000000" if pin != "0000000" else "1111111"
    assert await ana.register(wrong) == {"type": "error", "message": "Invalid PIN.", "code": "INVALID_PIN"}
    assert (await ana.register(pin))["type"] == "registered"


async def test_register_without_a_session(room: Room) -> None:
    """Before POST /session a register is told there is no session."""
    ana = await room.runner("ana")
    assert await ana.register("123456") == {"type": "error", "message": "No active session", "code": "NO_SESSION"}


async def test_wrong_pins_are_throttled_per_address(room_with: Callable) -> None:
    """Past PIN_ATTEMPTS_MAX wrong PINs an address is refused, even with the right PIN, for the window."""
    room, _ = await room_with(pin_attempts_max=2)
    pin = await room.host.new_session()
    ana = await room.runner("ana")
    for _ in range(2):
        assert (await ana.register("99999999"))["code"] == "INVALID_PIN"
    assert await ana.register(pin) == {"type": "error", "code": "PIN_THROTTLED",
                                       "message": "Too many wrong PINs from your address; try again in 60 s"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"participant_id": None}, "'participant_id' is required"),
    ({"participant_id": ""}, "'participant_id' must be at least 1 characters"),
    ({"participant_id": 7}, "'participant_id' must be a string"),
    ({"pin": None}, "'pin' is required"),
    ({"pin": 123456}, "'pin' must be a string"),
    ({"nickname": "x" * 201}, "'nickname' must be at most 200 characters"),
    ({"model": ["llama"]}, "'model' must be a string"),
])
async def test_register_with_bad_fields(room: Room, pin: str, fields: dict, message: str) -> None:
    """Each bad register field is named in an INVALID_INPUT error."""
    ana = await room.runner("ana")
    frame = {"type": "register", "participant_id": "ana", "nickname": "Ana", "pin": pin, "runner": "ollama",
             "model": "m", **fields}
    await ana.send({k: v for k, v in frame.items() if v is not None})
    assert await ana.recv() == {"type": "error", "message": message, "code": "INVALID_INPUT"}


async def test_register_takes_missing_optionals_and_defaults_the_nickname(room: Room, pin: str) -> None:
    """Only participant_id and pin are needed; the nickname defaults to the id."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    ana = await room.runner("ana-42")
    await ana.send({"type": "register", "participant_id": "ana-42", "pin": pin, "nickname": None})
    assert (await ana.recv())["type"] == "registered"
    assert await screen.recv() == {"type": "participant_registered", "participant": {
        "id": "ana-42", "sessionId": ID, "nickname": "ana-42", **RUNNER_ROW, "runner": "", "model": ""}}


async def test_one_socket_speaks_for_one_participant(room: Room, pin: str) -> None:
    """Registering another id on a registered socket is refused; registering the same id again is fine."""
    ana = await room.runner("ana", pin)
    await ana.send({"type": "register", "participant_id": "bia", "pin": pin})
    assert await ana.recv() == {"type": "error", "code": "ALREADY_REGISTERED",
                                "message": "This connection is registered as ana; open another connection for bia"}
    assert (await ana.register(pin, nickname="Ana 2"))["type"] == "registered"
    presence = await room.host.call("GET", "/presence")
    assert [(p["id"], p["nickname"]) for p in presence["participants"]] == [("ana", "Ana 2")]
    await ana.ws.close()
    await get_when(room, "/presence", lambda p: p["participants"] == [])


ALL_TYPES = "expected one of register, telao_register, token, complete, error"


@pytest.mark.parametrize(("frame", "message", "code"), [
    ("hello", "The message is not valid JSON", "INVALID_INPUT"),
    ("{'type': 'token'}", "The message is not valid JSON", "INVALID_INPUT"),
    ("[1, 2]", "The message must be a JSON object", "INVALID_INPUT"),
    ("42", "The message must be a JSON object", "INVALID_INPUT"),
    ("{}", f"Unknown message type None; {ALL_TYPES}", "INVALID_INPUT"),
    ('{"type": "vote"}', f"Unknown message type 'vote'; {ALL_TYPES}", "INVALID_INPUT"),
    ('{"type": ["token"]}', f"Unknown message type ['token']; {ALL_TYPES}", "INVALID_INPUT"),
    (b'{"type": "telao_register"}', "Binary frames are not supported; send JSON text", "INVALID_INPUT"),
    ('{"type": "token", "round": 1, "seq": 0, "content": "x"}', "Register before sending this message",
     "NOT_REGISTERED"),
    ('{"type": "complete", "round": 1, "tokens": 3}', "Register before sending this message", "NOT_REGISTERED"),
    ('{"type": "error", "round": 1, "code": "X", "message": "y"}', "Register before sending this message",
     "NOT_REGISTERED"),
    ('{"type": "token", "round": 1, "seq": "0", "content": "x"}', "'seq' must be an integer", "INVALID_INPUT"),
    ('{"type": "token", "round": 1, "seq": -1, "content": "x"}', "'seq' must be at least 0", "INVALID_INPUT"),
    ('{"type": "token", "seq": 0, "content": "x"}', "'round' is required", "INVALID_INPUT"),
    ('{"type": "token", "round": 1, "seq": 0, "content": 5}', "'content' must be a string", "INVALID_INPUT"),
    ('{"type": "complete", "round": 1, "tokens": 1.5}', "'tokens' must be an integer", "INVALID_INPUT"),
    ('{"type": "complete", "round": 1, "model_info": "llama"}', "'model_info' must be an object", "INVALID_INPUT"),
    ('{"type": "telao_register", "view": 3}', "'view' must be a string", "INVALID_INPUT"),
])
async def test_a_malformed_frame_gets_an_error_and_the_socket_stays_open(room: Room, pin: str, frame: Any,
                                                                        message: str, code: str) -> None:
    """Whatever is wrong with a frame is answered with an error; the same socket then registers fine."""
    peer = await room.runner("ana")
    await peer.send(frame)
    assert await peer.recv() == {"type": "error", "message": message, "code": code}
    assert (await peer.register(pin))["type"] == "registered"


async def test_the_screen_snapshot_mid_round(room: Room, pin: str) -> None:
    """telao_register -> registered_telao, then state_snapshot: session, shown round, who is here, live tokens."""
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await ana.stream(1, WORDS[:3])
    await ana.sync()
    screen = Peer(await room.connect())
    await screen.send({"type": "telao_register"})
    assert await screen.recv() == {"type": "registered_telao", "view": "arena"}
    session_id = rnd["sessionId"]
    assert await screen.recv() == {
        "type": "state_snapshot", "session": {"id": session_id, "createdAt": WHEN, "status": "active"},
        "round": rnd, "participants": [{"id": "ana", "sessionId": session_id, "nickname": "Ana", **RUNNER_ROW}],
        "liveTokens": {"ana": WORDS[:3]}}


async def test_the_snapshot_after_a_round_has_no_live_tokens(room: Room, pin: str) -> None:
    """After stop the snapshot shows the ended round (its voting state) and no liveTokens key."""
    rnd = await round_in(room, pin, "open")
    screen = await room.screen("voting")
    snapshot = await screen.recv("state_snapshot")
    assert snapshot["round"] == rnd and "liveTokens" not in snapshot


async def test_without_a_session_a_screen_gets_no_snapshot(room: Room) -> None:
    """A screen that registers before any session gets only registered_telao."""
    screen = Peer(await room.connect())
    await screen.send({"type": "telao_register", "view": "voting"})
    assert await screen.recv() == {"type": "registered_telao", "view": "voting"}
    assert await screen.quiet() == []


async def test_a_voting_screen_gets_no_token_updates(room: Room, pin: str) -> None:
    """A phone (view "voting") gets round_state and completion but not the token firehose."""
    arena, phone = await room.screen(), await room.screen("voting")
    await arena.recv("state_snapshot")
    await phone.recv("state_snapshot")
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, {"ana": ana})
    await room.host.stop(rnd["id"])
    arena_types = []
    while arena_types.count("round_state") < 2:                # the start's and the stop's
        arena_types.append((await arena.recv())["type"])
    assert arena_types.count("token_update") == len(WORDS)
    types = [m["type"] for m in await phone.quiet()]
    assert types == ["participant_registered", "round_started", "round_state", "completion", "round_state"]


async def test_screens_see_every_lifecycle_message(room: Room, pin: str) -> None:
    """An arena screen sees registrations, the start, each token, the completion, and every round_state."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, {"ana": ana}, ["x", "y"])
    await room.host.stop(rnd["id"])
    await ana.ws.close()
    await get_when(room, "/presence", lambda p: p["connectedCount"] == 0)
    seen = await screen.quiet()
    session_id = rnd["sessionId"]
    assert seen == [
        {"type": "participant_registered", "participant": {"id": "ana", "sessionId": session_id, "nickname": "Ana",
                                                           **RUNNER_ROW}},
        {"type": "round_started", "round": 1, "session_id": session_id},
        {"type": "round_state", "round": {k: rnd[k] for k in gs.ROUND_STATE_KEYS}},
        {"type": "token_update", "participant_id": "ana", "round": 1, "seq": 0, "content": "x", "total_tokens": 1},
        {"type": "token_update", "participant_id": "ana", "round": 1, "seq": 1, "content": "y", "total_tokens": 2},
        {"type": "completion", "participant_id": "ana", "round": 1, "tokens": 2, "duration_ms": AMOUNT,
         "ttft_ms": AMOUNT, "tps": AMOUNT},
        {"type": "round_state", "round": {**{k: rnd[k] for k in gs.ROUND_STATE_KEYS}, "endedAt": WHEN,
                                          "votingStatus": "open"}},
        {"type": "participant_disconnected", "participant_id": "ana", "ts": MS}]


async def test_creating_a_round_is_not_broadcast(room: Room, pin: str) -> None:
    """POST /rounds sends nothing: pre-created rounds must not flip the phones."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    ana = await room.runner("ana", pin)
    await screen.recv("participant_registered")
    await room.host.new_round()
    assert await screen.quiet() == [] and await ana.quiet() == []


async def test_the_challenge_always_has_all_seven_keys(room: Room, pin: str) -> None:
    """Without a seed the challenge still carries "seed" (null); only runners get it."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round("Oi", maxTokens=32, temperature=1.5))["id"])
    assert await ana.recv() == {"type": "challenge", "session_id": rnd["sessionId"], "round": 1, "prompt": "Oi",
                                "max_tokens": 32, "temperature": 1.5, "deadline_ms": 90000, "seed": None}
    assert "challenge" not in [m["type"] for m in await screen.quiet()]


async def test_runners_get_a_heartbeat_and_stay_connected(room_with: Callable) -> None:
    """Every WS_HEARTBEAT_INTERVAL runners get {type: heartbeat, ts}, and pings they answer keep them in."""
    room, _ = await room_with(ws_heartbeat_interval_s=0.1)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    for _ in range(5):                              # longer than MISSED_PINGS intervals
        assert await ana.recv("heartbeat") == {"type": "heartbeat", "ts": MS}
    assert (await room.host.call("GET", "/presence"))["connectedCount"] == 1


# =============================================================================
# WebSocket: tokens, completes and who may send them
# =============================================================================

async def started(room: Room, pin: str, *names: str) -> tuple[dict[str, Any], list[Runner]]:
    """Runners registered and a round started; each runner has read its challenge."""
    runners = [await room.runner(name, pin) for name in names]
    rnd = await room.host.start((await room.host.new_round())["id"])
    for runner in runners:
        await runner.recv("challenge")
    return rnd, runners


def metrics_row(database: Path, participant_id: str) -> dict[str, Any]:
    rows = db_rows(database, "SELECT * FROM metrics WHERE participantId = ?", participant_id)
    assert len(rows) == 1, rows
    return rows[0]


async def responses_of(room: Room, rnd: dict[str, Any]) -> dict[str, str]:
    body = await room.host.call("GET", f"/rounds/{rnd['id']}/responses")
    return {r["participant_id"]: r["generated_content"] for r in body["responses"]}


async def test_a_runner_speaks_only_for_itself(room: Room, pin: str) -> None:
    """token, complete and error naming another participant are WRONG_PARTICIPANT; nothing is kept."""
    rnd, (ana, bia) = await started(room, pin, "ana", "bia")
    wrong = {"type": "error", "message": "This connection is registered as ana, not bia", "code": "WRONG_PARTICIPANT"}
    for frame in ({"type": "token", "round": 1, "participant_id": "bia", "seq": 0, "content": "forged"},
                  {"type": "complete", "round": 1, "participant_id": "bia", "tokens": 1},
                  {"type": "error", "round": 1, "participant_id": "bia", "code": "X", "message": "forged"}):
        await ana.send(frame)
        assert await ana.recv() == wrong
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {}
    assert await responses_of(room, rnd) == {}


async def test_a_frame_without_participant_id_is_the_sockets_own(room: Room, pin: str) -> None:
    """participant_id may be left out of token and complete: the socket's registration says who."""
    rnd, (ana,) = await started(room, pin, "ana")
    await ana.send({"type": "token", "round": 1, "seq": 0, "content": "oi"})
    await ana.send({"type": "complete", "round": 1})
    await ana.sync()
    assert await responses_of(room, rnd) == {"ana": "oi"}


async def test_a_token_for_a_round_that_is_not_live(room: Room, pin: str) -> None:
    """Tokens for an unknown round index are refused with UNKNOWN_ROUND; the runner stays connected."""
    rnd, (ana,) = await started(room, pin, "ana")
    await ana.token(9, 0, "x")
    assert await ana.recv() == {"type": "error", "message": "Round 9 is not live", "code": "UNKNOWN_ROUND"}
    await ana.send({"type": "complete", "round": 9})
    assert (await ana.recv())["code"] == "UNKNOWN_ROUND"


async def test_duplicate_seqs_are_ignored(room: Room, pin: str) -> None:
    """A seq seen already is dropped silently: not shown again, first content kept."""
    screen = await room.screen()
    rnd, (ana,) = await started(room, pin, "ana")
    for seq, content in ((0, "a"), (0, "A"), (1, "b"), (0, "a"), (1, "B")):
        await ana.token(1, seq, content)
    await ana.complete(1, 2)
    await ana.sync()
    seen = []
    while (message := await screen.recv())["type"] != "completion":
        seen.append(message)
    assert [(m["seq"], m["content"]) for m in seen if m["type"] == "token_update"] == [(0, "a"), (1, "b")]
    assert await responses_of(room, rnd) == {"ana": "ab"}


async def test_a_gap_does_not_drop_the_rest_and_is_recorded(room: Room, pin: str, config: gs.Config) -> None:
    """A lost seq keeps every later token (unlike the club's server); the gap shows in metrics."""
    screen = await room.screen()
    rnd, (ana,) = await started(room, pin, "ana")
    for seq in (0, 1, 3, 4):
        await ana.token(1, seq, str(seq))
    await ana.complete(1, 5)
    await ana.sync()
    updates = [await screen.recv("token_update") for _ in range(4)]
    assert [(u["seq"], u["total_tokens"]) for u in updates] == [(0, 1), (1, 2), (3, 3), (4, 4)]
    assert await responses_of(room, rnd) == {"ana": "0134"}
    row = metrics_row(config.database, "ana")
    assert (row["tokens"], row["tokensReceived"], row["seqGaps"], row["rescued"]) == (5, 4, 1, 0)
    assert (await room.host.call("GET", "/metrics"))["total_seq_gaps"] == 1


async def test_tokens_out_of_order_are_stored_in_seq_order(room: Room, pin: str) -> None:
    """Content is the tokens in seq order, whatever order they arrived in."""
    rnd, (ana,) = await started(room, pin, "ana")
    for seq in (2, 0, 3, 1):
        await ana.token(1, seq, str(seq))
    await ana.complete(1, 4)
    await ana.sync()
    assert await responses_of(room, rnd) == {"ana": "0123"}


async def test_empty_tokens_and_sloppy_completes_are_accepted(room: Room, pin: str, config: gs.Config) -> None:
    """Empty content, latency_ms_first_token null and no model_info: all fine (the club's runners send them)."""
    rnd, (ana, bia) = await started(room, pin, "ana", "bia")
    await ana.stream(1, ["", "oi", ""])
    await ana.send({"type": "complete", "round": 1, "participant_id": "ana", "tokens": 3,
                    "latency_ms_first_token": None, "duration_ms": 850.7})
    await bia.stream(1, ["x"])
    await bia.complete(1, 1)
    await ana.sync()
    await bia.sync()
    ana_row, bia_row = metrics_row(config.database, "ana"), metrics_row(config.database, "bia")
    assert (ana_row["generatedContent"], ana_row["modelInfo"], ana_row["clientLatencyFirstTokenMs"],
            ana_row["clientDurationMs"], ana_row["tokensReceived"]) == ("oi", None, None, 851, 3)
    assert (json.loads(bia_row["modelInfo"]), bia_row["clientLatencyFirstTokenMs"]) == (MODEL_INFO, 120)


async def test_metrics_use_the_server_clock_beside_the_runners_report(room: Room, pin: str, config: gs.Config) -> None:
    """TTFT and duration are measured from the round's start; the runner's own figures are kept beside them."""
    rnd, (ana,) = await started(room, pin, "ana")
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await ana.sync()
    row = metrics_row(config.database, "ana")
    started_at = db_rows(config.database, "SELECT startedAt FROM rounds")[0]["startedAt"]
    assert row["latencyFirstTokenMs"] == row["firstTokenAt"] - started_at >= 0
    assert row["durationMs"] == row["generationEndedAt"] - started_at >= row["latencyFirstTokenMs"]
    assert row["generationStartedAt"] == row["firstTokenAt"] - 120
    assert (row["clientLatencyFirstTokenMs"], row["clientDurationMs"]) == (120, 900)
    assert row["tpsAvg"] >= 0 and row["tokens"] == row["tokensReceived"] == len(WORDS)


async def test_a_complete_that_overtakes_its_last_token(room: Room, pin: str, config: gs.Config) -> None:
    """A token arriving after its complete still lands in the stored answer after the next flush."""
    rnd, (ana,) = await started(room, pin, "ana")
    await ana.stream(1, WORDS[:-1])
    await ana.complete(1, len(WORDS))
    await ana.token(1, len(WORDS) - 1, WORDS[-1])
    await ana.sync()
    await eventually(lambda: metrics_row(config.database, "ana")["generatedContent"] == "".join(WORDS))
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS)}
    assert metrics_row(config.database, "ana")["tokensReceived"] == len(WORDS)


async def test_a_runner_error_is_logged_not_broadcast(room: Room, pin: str, config: gs.Config) -> None:
    """error {code, message} from a runner gets no reply and no broadcast; it lands in the event log."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    rnd, (ana,) = await started(room, pin, "ana")
    await ana.send({"type": "error", "round": 1, "participant_id": "ana", "code": "GENERATION_FAILED",
                    "message": "out of memory"})
    await ana.sync()
    assert [m["type"] for m in await screen.quiet()] == ["participant_registered", "round_started", "round_state"]
    events = await eventually(lambda: db_rows(config.database, "SELECT * FROM event_logs "
                                                               "WHERE eventType = 'generation_failed'"))
    assert json.loads(events[0]["metadata"]) == {"round": 1, "code": "GENERATION_FAILED", "message": "out of memory"}


# =============================================================================
# WebSocket: reconnects, replaced sockets, rescue at stop, late completes
# =============================================================================

async def test_reconnect_mid_round_resumes_where_the_server_stopped(room: Room, pin: str, config: gs.Config) -> None:
    """A runner that drops and registers again is told the next seq and the missing ones, and finishes."""
    screen = await room.screen()
    rnd, (ana,) = await started(room, pin, "ana")
    for seq in (0, 1, 3, 4):
        await ana.token(1, seq, WORDS[seq])
    await ana.sync()
    await ana.ws.close()
    assert (await screen.recv("participant_disconnected"))["participant_id"] == "ana"
    again = await room.runner("ana")
    assert await again.register(pin) == {"type": "registered", "session_id": rnd["sessionId"],
                                         "participant_id": "ana",
                                         "resume": {"round": 1, "next_seq": 4 + 1, "missing": [2]}}
    await again.token(1, 2, WORDS[2])
    await again.stream(1, ["!"], start=5)
    await again.complete(1, 6)
    await again.sync()
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS) + "!"}
    row = metrics_row(config.database, "ana")
    assert (row["tokensReceived"], row["seqGaps"]) == (6, 0)


async def test_a_newcomer_mid_round_gets_an_empty_resume(room: Room, pin: str) -> None:
    """Someone registering for the first time during a round is told to start at seq 0; no card is made."""
    rnd, (ana,) = await started(room, pin, "ana")
    bia = await room.runner("bia")
    assert (await bia.register(pin))["resume"] == {"round": 1, "next_seq": 0, "missing": []}
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {}


async def test_a_second_socket_for_the_same_participant_replaces_the_first(room: Room, pin: str) -> None:
    """The old socket is closed first, and screens see no participant_disconnected for it."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    old = await room.runner("ana", pin)
    rnd, _ = await started(room, pin)
    await old.recv("challenge")
    new = await room.runner("ana", pin)
    assert await old.closed() == (1000, "replaced by a newer connection")
    await new.stream(1, ["ok"])
    await new.sync()
    types = [m["type"] for m in await screen.quiet()]
    assert "participant_disconnected" not in types and types.count("participant_registered") == 2
    presence = await room.host.call("GET", "/presence")
    assert [p["id"] for p in presence["participants"]] == ["ana"]
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {"ana": ["ok"]}


async def test_stop_rescues_answers_that_never_completed(room: Room, pin: str, config: gs.Config) -> None:
    """Tokens streamed without a complete become an answer at stop (rescued = 1), voted like any other."""
    rnd, (ana, bia) = await started(room, pin, "ana", "bia")
    await ana.stream(1, WORDS)
    await ana.ws.close()                                       # the laptop died mid-answer
    await bia.stream(1, ["b"])
    await bia.complete(1, 1)
    await bia.sync()
    await room.host.stop(rnd["id"])
    row = metrics_row(config.database, "ana")
    assert (row["rescued"], row["generatedContent"], row["tokens"], row["tokensReceived"]) == (
        1, "".join(WORDS), len(WORDS), len(WORDS))
    assert metrics_row(config.database, "bia")["rescued"] == 0
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS), "bia": "b"}
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    board = (await room.host.call("GET", "/scoreboard"))["scoreboard"]
    assert [(r["participant_id"], r["avg_score"], r["generated_content"]) for r in board][0] == (
        "ana", 5.0, "".join(WORDS))
    assert isinstance(board[0]["tps_avg"], float)


async def test_stop_with_no_answers_still_opens_voting(room: Room, pin: str) -> None:
    """The club's server refuses to stop an empty round; ours stops it and opens (empty) voting."""
    rnd, _ = await started(room, pin, "ana")
    assert (await room.host.stop(rnd["id"]))["votingStatus"] == "open"
    assert (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"] == []
    assert (await room.host.call("GET", "/scoreboard"))["scoreboard"] == []


async def test_a_late_complete_after_stop_is_kept_and_shown(room: Room, pin: str, config: gs.Config) -> None:
    """A complete after stop is accepted, saved (replacing the rescue) and broadcast; phones refetch."""
    phone = await room.screen("voting")
    rnd, (ana, bia) = await started(room, pin, "ana", "bia")
    await ana.stream(1, WORDS[:2])
    await ana.sync()
    await room.host.stop(rnd["id"])
    assert metrics_row(config.database, "ana")["rescued"] == 1
    await ana.stream(1, WORDS[2:], start=2)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, ["tarde"])
    await bia.complete(1, 1)
    await ana.sync()
    await bia.sync()
    completions = [await phone.recv("completion") for _ in range(2)]
    assert [(c["participant_id"], c["tokens"]) for c in completions] == [("ana", len(WORDS)), ("bia", 1)]
    row = metrics_row(config.database, "ana")
    assert (row["rescued"], row["tokensReceived"]) == (0, len(WORDS))
    await eventually(lambda: metrics_row(config.database, "ana")["generatedContent"] == "".join(WORDS))
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS), "bia": "tarde"}
    await room.host.vote(rnd["id"], "bia", 3, "v1")


# =============================================================================
# WebSocket: kick and a new session mid-round
# =============================================================================

async def test_a_kick_closes_the_socket_and_refuses_the_participant(room: Room, pin: str, config: gs.Config) -> None:
    """The kicked runner gets KICKED and is closed; screens see it leave; its re-register is refused."""
    screen = await room.screen()
    rnd, (ana,) = await started(room, pin, "ana")
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await ana.sync()
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "ana", 4, "v1")
    await room.host.call("POST", "/participants/kick", {"participantId": "ana"})
    assert await ana.recv() == {"type": "error", "message": "The host removed you from this session",
                                "code": "KICKED"}
    assert await ana.closed() == (1008, "kicked by the host")
    assert (await screen.recv("participant_disconnected"))["participant_id"] == "ana"
    again = await room.runner("ana")
    assert await again.register(pin) == {"type": "error", "message": "The host removed you from this session",
                                         "code": "KICKED"}
    assert (await room.host.call("GET", "/presence"))["participants"] == []
    assert metrics_row(config.database, "ana")["generatedContent"] == "".join(WORDS)
    assert len(db_rows(config.database, "SELECT * FROM votes WHERE participantId = 'ana'")) == 1
    board = (await room.host.call("GET", "/scoreboard"))["scoreboard"]
    assert [(r["participant_id"], r["votes"]) for r in board] == [("ana", 1)]
    new_pin = await room.host.new_session()
    assert (await again.register(new_pin))["type"] == "registered"


async def test_a_new_session_mid_round_sends_the_old_runners_away(room: Room, pin: str, config: gs.Config) -> None:
    """Old runners get SESSION_ENDED and are closed; the old round's answers stay; screens get a new snapshot."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    rnd, (ana, bia) = await started(room, pin, "ana", "bia")
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, ["meio"])
    await ana.sync()
    await bia.sync()
    body = await room.host.call("POST", "/session")
    assert body["disconnected_participants"] == 2
    for runner in (ana, bia):
        assert await runner.recv() == {"type": "error", "message": "A new session started; reconnect with the new PIN.",
                                       "code": "SESSION_ENDED"}
        assert await runner.closed() == (1000, "session ended")
    snapshot = await screen.recv("state_snapshot")
    assert (snapshot["session"]["id"], snapshot["round"], snapshot["participants"]) == (body["id"], None, [])
    assert "participant_disconnected" not in [m["type"] for m in await screen.quiet()]
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS), "bia": "meio"}
    assert metrics_row(config.database, "bia")["rescued"] == 1
    assert await room.host.status("POST", "/rounds/stop", {"roundId": rnd["id"]}) == (
        409, {"error": "That round belongs to an earlier session", "code": "CONFLICT"})
    old = db_rows(config.database, "SELECT status FROM sessions ORDER BY createdAt")
    assert [s["status"] for s in old] == ["ended", "active"]
    [old_round] = db_rows(config.database, "SELECT endedAt, votingStatus FROM rounds")
    assert old_round["endedAt"] is not None and old_round["votingStatus"] == "closed"
    ana_again = await room.runner("ana")
    assert await ana_again.register(pin) == {"type": "error", "message": "Invalid PIN.", "code": "INVALID_PIN"}
    assert (await ana_again.register(body["pin"]))["session_id"] == body["id"]


# =============================================================================
# Exports: what the files contain
# =============================================================================

DIGITS = Like("digits", lambda v: isinstance(v, str) and v.isdigit())
FIXED_2 = Like("d.dd", lambda v: isinstance(v, str) and re.fullmatch(r"\d+\.\d\d", v))
EXPORT_HEADER = ["round", "round_started_at", "round_ended_at", "participant_id", "nickname", "tokens",
                 "latency_first_token_ms", "duration_ms", "tps_avg", "votes", "avg_score", "generated_content",
                 "model", "runner", "tokens_received", "seq_gaps", "client_latency_first_token_ms",
                 "client_duration_ms", "rescued"]
CLUB_EVENT_TYPES = {"session_created", "round_created", "round_started", "round_stopped", "voting_opened",
                    "voting_closed", "reveal_started", "position_revealed", "participant_registered",
                    "participant_disconnected", "first_token_received", "generation_completed", "vote_cast"}


async def export(room: Room, path: str) -> tuple[str, str]:
    """A download: its text and the filename it is offered under."""
    async with room.host.http.get(room.base + path) as response:
        assert response.status == 200, await response.text()
        assert (response.content_type, response.charset) == (
            "application/json" if ".json" in path else "text/csv", "utf-8")
        disposition = response.headers["Content-Disposition"]
        return await response.text(), re.fullmatch(r'attachment; filename="(.+)"', disposition).group(1)


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def evening(room: Room, pin: str) -> dict[str, Any]:
    """A whole round with awkward text, votes, a reveal and a runner who leaves: every event type happens."""
    ana = await room.runner("ana")
    assert (await ana.register(pin, nickname='Ana, "a lhama"\nda silva'))["type"] == "registered"
    bia = await room.runner("bia")
    assert (await bia.register(pin, nickname="Bia\rCR"))["type"] == "registered"
    rnd = await room.host.start((await room.host.new_round("Say hi, \"politely\""))["id"])
    await answered(room, rnd, {"ana": ana}, ["Olá, ", '"mundo"', "\r\n", "fim\r"])
    await bia.recv("challenge")
    await bia.stream(1, ["b"])
    await bia.sync()
    await bia.ws.close()
    await get_when(room, "/presence", lambda p: p["connectedCount"] == 1)
    await room.host.stop(rnd["id"])
    for voter, score in (("v1", 5), ("v2", 4)):
        await room.host.vote(rnd["id"], "ana", score, voter)
    for step in ("close-voting", "reveal", "reveal-next"):
        await room.host.call("POST", f"/rounds/{rnd['id']}/{step}")
    return rnd


async def test_export_csv_rows_and_quoting(room: Room, pin: str) -> None:
    """export.csv: the club's 12 columns then ours; commas, quotes, newlines and CRs survive a CSV reader."""
    rnd = await evening(room, pin)
    text, filename = await export(room, "/api/export.csv")
    assert filename == f"session-{rnd['sessionId']}.csv"
    assert text.splitlines()[0] == ",".join(EXPORT_HEADER)
    assert '"Ana, ""a lhama""\nda silva"' in text and '"Olá, ""mundo""\r\nfim\r"' in text
    common = {"round": "1", "round_started_at": WHEN, "round_ended_at": WHEN, "latency_first_token_ms": DIGITS,
              "duration_ms": DIGITS, "tps_avg": FIXED_2, "model": "llama3.1:8b", "runner": "ollama",
              "seq_gaps": "0"}
    assert csv_rows(text) == [
        {**common, "participant_id": "ana", "nickname": 'Ana, "a lhama"\nda silva', "tokens": "4", "votes": "2",
         "avg_score": "4.50", "generated_content": 'Olá, "mundo"\r\nfim\r', "tokens_received": "4",
         "client_latency_first_token_ms": "120", "client_duration_ms": "900", "rescued": "0"},
        {**common, "participant_id": "bia", "nickname": "Bia\rCR", "tokens": "1", "votes": "0",
         "avg_score": "0.00", "generated_content": "b", "tokens_received": "1",
         "client_latency_first_token_ms": "", "client_duration_ms": "", "rescued": "1"}]


async def test_export_events_csv_quotes_every_value_and_has_the_club_event_types(room: Room, pin: str) -> None:
    """export-events.csv: 8 columns, every value quoted, one row per event of the session, in time order."""
    rnd = await evening(room, pin)
    text, filename = await export(room, "/export-events.csv")
    assert filename == f"events-{rnd['sessionId']}.csv"
    lines = text.splitlines()          # metadata is JSON, so no line break inside a value
    assert lines[0] == '"id","timestamp","eventType","actorType","actorId","targetType","targetId","metadata"'
    for line in lines:
        assert re.fullmatch(r'"(?:[^"]|"")*"(?:,"(?:[^"]|"")*"){7}', line), line
    events = csv_rows(text)
    assert len(events) == len(lines) - 1
    assert CLUB_EVENT_TYPES <= {e["eventType"] for e in events}
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    by_type = {e["eventType"]: e for e in events}
    assert json.loads(by_type["round_created"]["metadata"]) == {
        "index": 1, "prompt": 'Say hi, "politely"', "maxTokens": 400, "temperature": 0.8, "deadlineMs": 90000,
        "svgMode": False}
    assert json.loads(by_type["position_revealed"]["metadata"]) == {"position": 2, "revealedCount": 1,
                                                                    "totalParticipants": 2}
    vote = by_type["vote_cast"]
    assert (vote["actorType"], vote["actorId"], vote["targetId"]) == ("voter", gs.sha256_hex("v2"), "ana")
    assert json.loads(vote["metadata"]) == {"participantId": "ana", "score": 4, "voteOrder": 1, "responseTime": None}
    assert json.loads(by_type["participant_registered"]["metadata"]) == {
        "nickname": "Bia\rCR", "runner": "ollama", "model": "llama3.1:8b"}


def keys_anywhere(tree: Any) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | set().union(*(keys_anywhere(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(keys_anywhere(v) for v in tree))
    return set()


async def test_export_all_json_nests_the_session_without_its_pin(room: Room, pin: str, config: gs.Config) -> None:
    """export-all.json: session, participants, rounds with their metrics and votes, events; no PIN or hash."""
    rnd = await evening(room, pin)
    text, filename = await export(room, "/export-all.json")
    assert filename == f"session-{rnd['sessionId']}.json"
    tree = json.loads(text)
    assert set(tree) == {"id", "createdAt", "endedAt", "status", "participants", "rounds", "events"}
    assert not {"pin", "pinHash"} & keys_anywhere(tree)
    assert db_rows(config.database, "SELECT pinHash FROM sessions")[0]["pinHash"] not in text
    assert [p["id"] for p in tree["participants"]] == ["ana", "bia"]
    [round_tree] = tree["rounds"]
    assert (round_tree["id"], round_tree["votingStatus"], round_tree["revealedCount"]) == (rnd["id"], "revealed", 1)
    assert {m["participantId"]: (m["generatedContent"], m["modelInfo"], m["rescued"]) for m in round_tree["metrics"]} \
        == {"ana": ('Olá, "mundo"\r\nfim\r', MODEL_INFO, 0), "bia": ("b", None, 1)}
    assert sorted((v["participantId"], v["score"], v["voterHash"]) for v in round_tree["votes"]) == [
        ("ana", 4, gs.sha256_hex("v2")), ("ana", 5, gs.sha256_hex("v1"))]
    assert CLUB_EVENT_TYPES <= {e["eventType"] for e in tree["events"]}
    created = next(e for e in tree["events"] if e["eventType"] == "session_created")
    assert created["metadata"] == {"disconnectedPreviousParticipants": 0}
    times = (tree["createdAt"], round_tree["startedAt"], round_tree["metrics"][0]["firstTokenAt"],
             round_tree["votes"][0]["createdAt"], tree["participants"][0]["lastSeen"], created["timestamp"])
    assert times == (WHEN,) * len(times)                   # ISO text, as in every other JSON answer


async def test_a_new_session_closes_voting_left_open_in_the_old_one(room: Room, pin: str) -> None:
    """Phones still on the old round cannot vote once the host started a new session."""
    rnd = await round_in(room, pin, "open")
    await room.host.new_session()
    assert await room.host.status("POST", "/votes", {"roundId": rnd["id"], "participantId": "ana", "score": 5,
                                                     "voterId": "late"}) == (
        409, {"error": "Voting is not open for this round", "code": "CONFLICT"})


async def test_exports_of_an_earlier_session(room: Room, pin: str) -> None:
    """?session_id= exports an earlier session; without it, the active one; an unknown id is 404."""
    rnd = await round_in(room, pin, "open")
    first = rnd["sessionId"]
    await room.host.new_session()
    assert csv_rows((await export(room, "/export.csv"))[0]) == []
    old_csv, filename = await export(room, f"/export.csv?session_id={first}")
    assert filename == f"session-{first}.csv"
    assert [(r["participant_id"], r["generated_content"]) for r in csv_rows(old_csv)] == [("ana", "".join(WORDS))]
    old_events = csv_rows((await export(room, f"/export-events.csv?sessionId={first}"))[0])
    assert "round_stopped" in {e["eventType"] for e in old_events}
    old_tree = json.loads((await export(room, f"/export-all.json?session_id={first}"))[0])
    assert (old_tree["id"], old_tree["status"], len(old_tree["rounds"])) == (first, "ended", 1)
    for path in ("/export.csv", "/export-events.csv", "/export-all.json"):
        assert await room.host.status("GET", f"{path}?session_id=nope") == (
            404, {"error": "Session not found", "code": "NOT_FOUND"})


# =============================================================================
# Crash and restart: the server as a separate process
# =============================================================================
#
# The subprocess keeps the default flush interval (1 s), as on the evening.

def saved_tokens(database: Path) -> list[str]:
    return [row["content"] for row in db_rows(database, "SELECT content FROM tokens ORDER BY seq")]


async def test_a_crash_mid_round_loses_nothing_the_runner_cannot_resend(server_process: Callable,
                                                                        http: aiohttp.ClientSession) -> None:
    """kill -9 mid-round, restart on the same database: the round still runs with the saved tokens, the
    runner's resume says where to continue, and the answer is finished, voted and exported whole."""
    first = server_process()
    room = Room(first.start(), http)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await ana.recv("challenge")
    await ana.stream(1, WORDS[:3])
    await ana.sync()
    await eventually(lambda: saved_tokens(first.database) == WORDS[:3])       # one flush later
    await ana.token(1, 3, WORDS[3])                    # accepted, and maybe not yet saved when the server dies
    await ana.sync()
    assert await asyncio.to_thread(first.stop, signal.SIGKILL) == -signal.SIGKILL
    await room.close()

    room = Room(server_process().start(), http)
    current = await room.host.call("GET", "/rounds/current")
    assert {**current, "liveTokens": None} == {**rnd, "liveTokens": None}
    held = current["liveTokens"]["ana"]
    assert held in (WORDS[:3], WORDS[:4])
    assert (await room.host.call("GET", "/presence"))["participants"] == []
    again = await room.runner("ana")
    assert await again.register(pin) == {"type": "registered", "session_id": rnd["sessionId"],
                                         "participant_id": "ana",
                                         "resume": {"round": 1, "next_seq": len(held), "missing": []}}
    await again.stream(1, WORDS[len(held):], start=len(held))
    await again.complete(1, len(WORDS))
    await again.sync()
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    [row] = csv_rows((await export(room, "/export.csv"))[0])
    assert (row["generated_content"], row["tokens_received"], row["seq_gaps"], row["votes"], row["rescued"]) == (
        "".join(WORDS), str(len(WORDS)), "0", "1", "0")
    events = json.loads((await export(room, "/export-all.json"))[0])["events"]
    assert [e["eventType"] for e in events].count("round_started") == 1
    await room.close()


async def test_sigterm_closes_with_1001_and_saves_every_accepted_token(server_process: Callable,
                                                                      http: aiohttp.ClientSession) -> None:
    """SIGTERM: runners and screens see close code 1001, the process exits 0, and the tokens accepted just
    before are in the database, so a restart resumes the round with all of them (and a kick still holds)."""
    process = server_process()
    room = Room(process.start(), http)
    pin = await room.host.new_session()
    await room.runner("zed", pin)
    await room.host.call("POST", "/participants/kick", {"participantId": "zed"})
    ana = await room.runner("ana", pin)
    screen = await room.screen()
    await room.host.start((await room.host.new_round())["id"])
    await ana.recv("challenge")
    await ana.stream(1, WORDS)
    await ana.sync()
    assert await asyncio.to_thread(process.stop, signal.SIGTERM) == 0
    assert await ana.closed() == (1001, "server shutdown")
    assert await screen.closed() == (1001, "server shutdown")
    assert saved_tokens(process.database) == WORDS
    await room.close()

    room = Room(server_process().start(), http)
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {"ana": WORDS}
    assert (await (await room.runner("zed")).register(pin))["code"] == "KICKED"
    await room.close()



# =============================================================================
# Configuration, start-up and the database file
# =============================================================================

ENV_VARS = [f.metadata["env"] for f in fields(gs.Config)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No configuration from the machine running the tests, and none left behind for later tests."""
    for name in ENV_VARS:
        monkeypatch.setenv(name, "")        # so that undoing also removes what read_dotenv sets
        monkeypatch.delenv(name)
    return monkeypatch


def test_every_env_var_has_a_flag_in_help(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--help names every option's flag and its environment variable."""
    with pytest.raises(SystemExit):
        gs.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ENV_VARS:
        assert f"--{name.lower().replace('_', '-')}" in text and f"[{name}" in text, name


def test_flags_then_environment_then_defaults(clean_env: pytest.MonkeyPatch) -> None:
    """A flag beats its env var, which beats the default; lists are comma-separated."""
    clean_env.setenv("PORT", "4000")
    clean_env.setenv("PIN_LENGTH", "8")
    clean_env.setenv("TRUST_PROXY", "true")
    clean_env.setenv("HOST", "127.0.0.1, ::1")
    config = gs.parse_config(["--port", "5000", "--admin-token", "s3cret", "--flush-interval", "0.5"])
    assert (config.port, config.pin_length, config.trust_proxy, config.hosts, config.admin_token,
            config.flush_interval_s) == (5000, 8, True, ("127.0.0.1", "::1"), "s3cret", 0.5)
    for name in ("PORT", "PIN_LENGTH", "TRUST_PROXY", "HOST"):
        clean_env.delenv(name)
    default = gs.parse_config([])
    assert (default.port, default.hosts, default.host_addresses, default.rate_limit_max,
            default.ws_heartbeat_interval_s, default.ws_max_payload) == (
        3000, ("0.0.0.0", "::"), ("127.0.0.0/8", "::1"), 500, 30.0, 1024 * 1024)


@pytest.mark.parametrize("url", ["/srv/arena.db", "sqlite:////srv/arena.db", "file:/srv/arena.db",
                                 "file:///srv/arena.db", "sqlite:////srv/arena.db?mode=rwc"])
def test_database_url_forms(clean_env: pytest.MonkeyPatch, url: str) -> None:
    """DATABASE_URL may be a path, sqlite:///path or file:path."""
    clean_env.setenv("DATABASE_URL", url)
    assert gs.parse_config([]).database == Path("/srv/arena.db")


def test_dotenv_fills_only_what_is_unset(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A .env file sets variables the environment lacks, and never overrides one that is set."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nexport PIN_LENGTH=8\nPORT='4100'\nRATE_LIMIT_MAX = 20\n")
    clean_env.setenv("PORT", "4200")
    gs.read_dotenv(dotenv)
    assert (os.environ["PIN_LENGTH"], os.environ["PORT"], os.environ["RATE_LIMIT_MAX"]) == ("8", "4200", "20")


def test_the_banner_shows_the_admin_token_and_the_next_step() -> None:
    """Start-up prints where runners connect, the admin token and the curl to run next."""
    config = gs.Config(admin_token="tok-123")
    text = gs.banner(config, ["0.0.0.0", "::"], 3000)
    assert "admin token   tok-123" in text and "curl -X POST http://127.0.0.1:3000/session" in text
    assert "listening on  port 3000 of 0.0.0.0, ::" in text
    for address in gs.lan_addresses():
        assert f"ws://{address}:3000/ws" in text


async def test_the_database_is_wal_with_a_schema_version(room: Room, config: gs.Config) -> None:
    """The file is in WAL mode and carries PRAGMA user_version, for the club's scripts and future migrations."""
    assert db_rows(config.database, "PRAGMA journal_mode") == [{"journal_mode": "wal"}]
    assert db_rows(config.database, "PRAGMA user_version") == [{"user_version": gs.SCHEMA_VERSION}]


async def test_round_indexes_restart_at_one_in_each_session(room: Room, pin: str) -> None:
    """The index is per session: a new session's first round is round 1 again."""
    await room.host.new_round()
    await room.host.new_round()
    await room.host.new_session()
    assert (await room.host.new_round())["index"] == 1


async def test_a_frame_over_ws_max_payload_closes_with_1009(room_with: Callable) -> None:
    """WS_MAX_PAYLOAD bounds one message: a bigger one closes that connection with 1009 (message too big)."""
    room, _ = await room_with(ws_max_payload=1024)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    await ana.send({"type": "token", "round": 1, "seq": 0, "content": "x" * 2048})
    assert (await ana.closed())[0] == 1009


async def test_a_peer_that_never_answers_pings_is_dropped(room_with: Callable, http: aiohttp.ClientSession) -> None:
    """A connection silent for MISSED_PINGS ping intervals is cut off; one that answers pings stays."""
    room, _ = await room_with(ws_heartbeat_interval_s=0.3)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    async with http.ws_connect(room.ws_url, autoping=False) as silent:       # never sends a pong
        await silent.send_json({"type": "telao_register"})
        async with asyncio.timeout(TIMEOUT_S):
            async for message in silent:
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
        assert silent.closed
    assert (await room.host.call("GET", "/presence"))["connectedCount"] == 1
    assert (await ana.recv("heartbeat"))["type"] == "heartbeat"

# The club's browser client, served from CLIENT_DIR
# =============================================================================

@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "client-browser"
    (folder / "shared").mkdir(parents=True)
    (folder / "client.html").write_text("<title>cliente</title>")
    (folder / "shared" / "net.js").write_text("export const x = 1;")
    return folder


async def test_browser_client_pages_and_assets_are_served_uncached(aiohttp_server: Any, config: gs.Config,
                                                                    client_dir: Path,
                                                                    http: aiohttp.ClientSession) -> None:
    """/client and /client-assets/*.js come from CLIENT_DIR with the right type and no-store."""
    server = await aiohttp_server(gs.make_app(replace(config, client_dir=client_dir)))
    for path, content_type in (("/client", "text/html"), ("/client-assets/net.js", "text/javascript")):
        async with http.get(server.make_url(path)) as response:
            assert response.status == 200 and response.content_type == content_type
            assert response.headers["Cache-Control"] == "no-store"
    for path in ("/agent", "/client-assets/missing.js", "/client-assets/..%2Fclient.html"):
        async with http.get(server.make_url(path)) as response:
            assert response.status == 404 and "error" in await response.json()
