"""Tests for gambiarra_server.py: the real app on a loopback port, a real SQLite file,
and the clients a meetup has (runners and screens over `websockets`, the host and
the phones over HTTP). After the helpers, sections follow the server's order
(configuration, input fields, WebSocket, HTTP, routes and docs); then the whole app
under attack, the README, the runner (`join`) and the rehearsal.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import gc
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import string
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest
import yarl
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
        status, answer = await self.status(method, path, body, **kwargs)
        assert expect is None or status == expect, f"{method} {path}: {status} {answer}"
        return answer

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


async def closed_code(ws: ClientConnection) -> int | None:
    """Read until the connection closes; the close code the server sent (1006: none, the link just broke)."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                await ws.recv()
    return ws.close_code


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
        return await closed_code(self.ws), self.ws.close_reason


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

    async def answer_in_order(self, seqs: Iterable[int], tokens: int) -> None:
        """Round 1's tokens sent in this order of seq (each one's content its seq), then a `complete` claiming
        `tokens`, read by the server."""
        for seq in seqs:
            await self.token(1, seq, str(seq))
        await self.complete(1, tokens)
        await self.sync()


# Who is who on loopback: the server trusts only 127.0.0.1 as the host where a test
# says so (`host_addresses`), and strangers, phones and other laptops connect from
# other 127.x.y.z addresses by binding the client's local address.
STRANGER = "127.0.0.2"


class Room:
    """One running server and the ways to reach it, from the host's address or any other on loopback."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base = base
        self.ws_url = base.replace("http", "ws", 1) + "/ws"
        self.host = Host(base, http)
        self.connections: list[ClientConnection] = []
        self.sessions: list[aiohttp.ClientSession] = []

    async def connect_from(self, address: str | None, **kwargs: Any) -> ClientConnection:
        ws = await connect(self.ws_url, **({"local_addr": (address, 0)} if address else {}), **kwargs)
        self.connections.append(ws)
        return ws

    async def connect(self) -> ClientConnection:
        return await self.connect_from(None)

    async def close(self) -> None:
        for ws in self.connections:
            await ws.close()
        for session in self.sessions:
            await session.close()

    async def runner_at(self, address: str | None, participant_id: str, pin: str | None = None) -> Runner:
        runner = Runner(await self.connect_from(address), participant_id)
        if pin is not None:
            reply = await runner.register(pin)
            assert reply["type"] == "registered", reply
        return runner

    async def runner(self, participant_id: str, pin: str | None = None) -> Runner:
        return await self.runner_at(None, participant_id, pin)

    async def screen_at(self, address: str | None, view: str | None = None) -> Peer:
        screen = Peer(await self.connect_from(address))
        await screen.send({"type": "telao_register", **({"view": view} if view else {})})
        assert (await screen.recv())["type"] == "registered_telao"
        return screen

    async def screen(self, view: str | None = None) -> Peer:
        return await self.screen_at(None, view)

    async def http_from(self, address: str, token: str | None = None) -> Host:
        """An HTTP client on another machine (optionally holding an admin token)."""
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)),
                                        headers={"Authorization": f"Bearer {token}"} if token else None)
        self.sessions.append(session)
        return Host(self.base, session)


class LiveRoom(Room):
    """A Room that also exposes the server's live state."""

    def __init__(self, base: str, http: aiohttp.ClientSession, server: gs.Server) -> None:
        super().__init__(base, http)
        self.server = server


WORDS = ["Lhamas ", "pastam ", "no ", "silício ", "🦙"]


# =============================================================================
# Fixtures
# =============================================================================

@pytest.fixture
def config(tmp_path: Path) -> gs.Config:
    return gs.Config(listen_addresses=("127.0.0.1",), port=0, database=tmp_path / "arena.db", bcrypt_rounds=4,
                     save_interval_s=0.05)


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serve_app():
    """Start an app on a free loopback port as serve() does (gs.start); gives its base URL."""
    runners: list[Any] = []

    async def start(app: Any) -> str:
        runner, _, _ = await gs.start(served(app), ("127.0.0.1",), 0, None)
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def room(make_room: Callable) -> LiveRoom:
    """A server with the test's config."""
    return await make_room()


@pytest.fixture
async def pin(room: Room) -> str:
    return await room.host.new_session()


# A running server holds its database file alone (an exclusive lock), so a test reads a
# database that a server of this process has open through that server's own connection.
SERVED: dict[Path, gs.Server] = {}


def served(app: aiohttp.web.Application) -> aiohttp.web.Application:
    """`app`, with its database reachable by `db_rows` from its start-up to its clean-up."""
    server = app[gs.server_key]
    key = server.config.database.resolve()

    async def opened(app: aiohttp.web.Application) -> None:
        SERVED[key] = server

    async def closing(app: aiohttp.web.Application) -> None:
        SERVED.pop(key, None)
    app.on_startup.append(opened)
    app.on_cleanup.insert(0, closing)           # before the database closes
    return app


def own_database(config: gs.Config, started: int) -> dict[str, Path]:
    """One database file per server a test starts (one server per database), unless it names one."""
    return {"database": config.database.with_name(f"arena-{started + 1}.db")} if started else {}


def rows_of(conn: sqlite3.Connection, sql: str, args: tuple) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, args)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def db_rows(path: Path, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Read the database as the club's report scripts would: what the server has saved.

    Through the server's own connection while a server of this process holds the file;
    from the file once it has stopped; from a copy of the file and its write-ahead log
    while a server process holds it (what a crash would leave).
    """
    server = SERVED.get(Path(path).resolve())
    if server is not None:
        db = server.db
        return db.executor.submit(lambda: rows_of(db.conn, sql, args)).result(timeout=TIMEOUT_S)
    try:
        return read_rows(path, sql, args)
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        return read_rows(copy, sql, args)


def read_rows(path: Path, sql: str, args: tuple) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(path, timeout=0)) as conn:
        return rows_of(conn, sql, args)


class ServerProcess:
    """The server as a separate process, for kill -9 and SIGTERM."""

    def __init__(self, database: Path, *args: str, open_files: int | None = None) -> None:
        self.database = database
        self.args = args
        self.open_files = open_files            # a lower limit (soft and hard) on the server's open files
        self.process: subprocess.Popen | None = None
        self.base = ""
        self.lines: list[str] = []              # what it printed, up to its "listening on" line

    def start(self) -> str:
        command = [sys.executable, str(HERE / "gambiarra_server.py"), "--host", "127.0.0.1", "--port", "0",
                   "--database-url", str(self.database), "--bcrypt-rounds", "4", *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=self.limit_files)
        for line in self.process.stdout:
            self.lines.append(line)
            if "listening on" in line:
                port = int(line.split("port ")[1].split()[0])
                self.base = f"http://127.0.0.1:{port}"
                return self.base
        raise AssertionError(f"server did not start: {self.process.stderr.read()}")

    def limit_files(self) -> None:
        if self.open_files is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()
        return code


@pytest.fixture
def server_process(tmp_path: Path):
    processes: list[ServerProcess] = []

    def start(*args: str, **options: Any) -> ServerProcess:
        process = ServerProcess(tmp_path / "arena.db", *args, **options)
        processes.append(process)
        return process
    yield start
    for process in processes:
        if process.process and process.process.poll() is None:
            process.stop(signal.SIGKILL)


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
SECRET = Like("resume secret", lambda v: isinstance(v, str) and len(v) >= 20)
MS = Like("epoch ms", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 1_600_000_000_000)
AMOUNT = Like("number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
SEED = Like("a drawn seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < gs.SEED_RANGE)
NO_RUNNER = {"warning": "No runner is connected: nobody got the challenge. Runners that register while the round "
                        "runs get it then; or stop the round and start another once they are here."}
RUNNER_ROW = {"runner": "ollama", "model": "llama3.1:8b", "connected": True, "createdAt": WHEN, "lastSeen": WHEN}
MODEL_INFO = {"name": "llama3.1:8b", "runner": "ollama"}


async def eventually(probe: Callable[[], Any], what: str = "", timeout_s: float = TIMEOUT_S) -> Any:
    """Poll `probe` (plain or async) until it returns something truthy: flushes and closes are asynchronous.

    `what` names the awaited condition, for the reader; the timeout's traceback shows where it was.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            result = probe()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.02)


async def get_when(room: Room, path: str, check: Callable[[Any], bool], timeout_s: float = TIMEOUT_S) -> Any:
    """GET `path` until its body passes `check` (the server learns of a closed socket asynchronously)."""
    async def probe() -> Any:
        body = await room.host.call("GET", path)
        return body if check(body) else None
    return await eventually(probe, path, timeout_s)


@pytest.fixture
async def make_room(serve_app: Any, config: gs.Config, http: aiohttp.ClientSession):
    """Start a server with some config fields changed; returns a LiveRoom."""
    rooms: list[LiveRoom] = []

    async def make(**changes: Any) -> LiveRoom:
        app = gs.make_app(replace(config, **{**own_database(config, len(rooms)), **changes}))
        room = LiveRoom(await serve_app(app), http, app[gs.server_key])
        rooms.append(room)
        return room
    yield make
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
            rnd.pop("revealed", None)                   # reveal-next also says who it revealed
        if name == stage:
            return rnd
    raise AssertionError(stage)


def route_path(route: gs.Route) -> str:
    return route.path.replace("{round_id}", "no-such-round")


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
    assert (config.port, config.pin_length, config.trust_proxy, config.listen_addresses, config.admin_token,
            config.save_interval_s) == (5000, 8, True, ("127.0.0.1", "::1"), "s3cret", 0.5)
    for name in ("PORT", "PIN_LENGTH", "TRUST_PROXY", "HOST"):
        clean_env.delenv(name)
    default = gs.parse_config([])
    assert (default.port, default.listen_addresses, default.host_addresses, default.rate_limit_max,
            default.ws_heartbeat_interval_s, default.ws_max_payload) == (
        3000, ("0.0.0.0", "::"), ("127.0.0.0/8", "::1"), 500, 30.0, 1024 * 1024)


@pytest.mark.parametrize("url", ["/srv/arena.db", "sqlite:////srv/arena.db", "file:/srv/arena.db",
                                 "file:///srv/arena.db", "sqlite:////srv/arena.db?mode=rwc"])
def test_database_url_forms(clean_env: pytest.MonkeyPatch, url: str) -> None:
    """DATABASE_URL may be a path, sqlite:///path or file:path."""
    clean_env.setenv("DATABASE_URL", url)
    assert gs.parse_config([]).database == Path("/srv/arena.db")


def test_the_banner_shows_the_admin_token_and_the_next_step() -> None:
    """Start-up prints where runners connect, the admin token and the curl to run next."""
    app = gs.make_app(gs.Config(admin_token="tok-123"))
    text = gs.banner(app, ["0.0.0.0", "::"], 3000, 1024, "set by ADMIN_TOKEN", None)
    assert "admin token   tok-123   (set by ADMIN_TOKEN;" in text
    assert text.endswith("next step     curl -X POST http://127.0.0.1:3000/session")
    assert "listening on  port 3000 of 0.0.0.0, ::" in text
    assert "connections   1024 open files; 50 per address (the host's: any number)" in text
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


async def test_a_peer_that_never_answers_pings_is_dropped(make_room: Callable, http: aiohttp.ClientSession) -> None:
    """A connection silent for MISSED_PINGS ping intervals is cut off; one that answers pings stays."""
    room = await make_room(ws_heartbeat_interval_s=0.3)
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

# Start-up mistakes as the host meets them: the file copied alone into an empty
# folder and started in a subprocess. Each mistake is one line and exit status 2.

NUMERIC_FIELDS = [f for f in fields(gs.Config) if type(f.default) in (int, float)]
# Runs a script with `websockets` unimportable, as on a machine that lacks it.
WITHOUT_WEBSOCKETS = ("import runpy, sys; sys.modules['websockets'] = None; sys.argv = sys.argv[1:]; "
                      "runpy.run_path(sys.argv[0], run_name='__main__')")
SKIP_AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only file or folder")


@pytest.fixture
def alone(tmp_path: Path) -> Path:
    """gambiarra_server.py copied alone into an empty folder."""
    folder = tmp_path / "alone"
    folder.mkdir()
    return Path(shutil.copy(HERE / "gambiarra_server.py", folder))


def host_env(**settings: str) -> dict[str, str]:
    """This process's environment without the server's settings, then loopback on any port, then `settings`."""
    return {**{k: v for k, v in os.environ.items() if k not in ENV_VARS}, "HOST": "127.0.0.1", "PORT": "0",
            **settings}


def start_up(script: Path, *args: str, python: tuple[str, ...] = (sys.executable,),
             **settings: str) -> subprocess.CompletedProcess:
    """Start the server from its folder as the host would, for a mistake that stops it at once."""
    return subprocess.run([*python, str(script), *args], cwd=script.parent, env=host_env(**settings),
                          capture_output=True, text=True, timeout=30)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The only line a start-up mistake prints (no traceback), after which it exits with status 2."""
    assert (result.returncode, result.stdout, result.stderr.count("\n")) == (2, "", 1), result
    assert result.stderr.startswith("error: ")
    return result.stderr.strip()


def start_server(script: Path, cwd: Path, **settings: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """The server started from `script` with the working folder `cwd`, and its banner as {label: text}."""
    process = subprocess.Popen([sys.executable, str(script), "--bcrypt-rounds", "4"], cwd=cwd,
                               env=host_env(PYTHONUNBUFFERED="1", **settings), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    banner = {}
    for line in process.stdout:
        label, _, text = line.strip().partition("  ")
        banner[label] = text.strip()
        if label == "next step":
            break
    return process, banner


def stop_server(process: subprocess.Popen) -> str:
    """SIGTERM the server; its stderr."""
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=10)[1]


def post_session(banner: dict[str, str]) -> dict[str, Any]:
    port = banner["listening on"].split()[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/session", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.load(response)


def test_the_embedded_schema_is_schema_sql(tmp_path: Path) -> None:
    """The file carries schema.sql's text for when it runs alone; when the two differ, this writes what to paste."""
    text = (HERE / "schema.sql").read_text()
    assert "\\" not in text and '"""' not in text, "schema.sql must stay pastable into a plain triple-quoted string"
    paste = tmp_path / "SCHEMA_SQL.py"
    paste.write_text(f'SCHEMA_SQL = """\\\n{text}"""\n')
    assert gs.SCHEMA_SQL == text, f"schema.sql changed: replace SCHEMA_SQL in gambiarra_server.py with all of {paste}"


def test_the_file_alone_in_an_empty_folder_runs(alone: Path) -> None:
    """Copied alone (no schema.sql beside it), the server starts, creates its database beside the file and
    starts a session."""
    process, banner = start_server(alone, alone.parent)
    try:
        assert banner["database"] == str(alone.parent / "gambiarra.db")
        assert len(post_session(banner)["pin"]) == 6
    finally:
        assert "Traceback" not in stop_server(process)
    assert db_rows(alone.parent / "gambiarra.db", "SELECT count(*) AS n FROM sessions") == [{"n": 1}]


def test_help_and_a_missing_dependency_before_anything_is_installed(alone: Path) -> None:
    """With no third-party package at all, --help answers, a bad setting is named, and starting says what
    is missing and the pip command: one line, exit status 2, nothing created."""
    bare = (sys.executable, "-I", "-S")       # -S: no site-packages, as on a fresh machine
    shown = start_up(alone, "--help", python=bare)
    assert shown.returncode == 0 and "--database-url DATABASE_URL" in shown.stdout
    assert one_line_error(start_up(alone, python=bare)) == (f"error: not installed for {sys.executable}: aiohttp, "
                                                            f"bcrypt (pip install aiohttp bcrypt, or: uv run {alone})")
    assert "PORT='abc'" in one_line_error(start_up(alone, python=bare, PORT="abc"))
    assert list(alone.parent.iterdir()) == [alone]


@pytest.mark.parametrize("command", ["simulate", "bench"])
def test_simulate_and_bench_without_websockets_say_so(alone: Path, command: str) -> None:
    """simulate and bench need the websockets client: without it they say so at once, with the pip command
    and the uv one."""
    line = one_line_error(start_up(alone, command, python=(sys.executable, "-c", WITHOUT_WEBSOCKETS)))
    assert line == (f"error: not installed for {sys.executable}: websockets (pip install websockets, "
                    f"or: uv run --with websockets {alone} {command})")


@pytest.mark.parametrize("setting, value", [
    ("PORT", "abc"), ("PORT", "70000"), ("PIN_LENGTH", "99"), ("PIN_LENGTH", "0"), ("BCRYPT_ROUNDS", "99"),
    ("FLUSH_INTERVAL", "nan"), ("RATE_LIMIT_WINDOW", "-1"), ("WS_MAX_PAYLOAD", "10"), ("TRUST_PROXY", "ture"),
    ("HOST", ","), ("HOST_ADDRESSES", "192.168.1/24"), ("DATABASE_URL", "postgresql://db/arena"),
    ("CORS_ORIGINS", "http://localhost:5173/"),
    ("--port", "abc"), ("--bcrypt-rounds", "3")])
def test_a_bad_setting_is_one_line_naming_it(alone: Path, setting: str, value: str) -> None:
    """An env var or flag out of range stops the start-up with one line holding its name as written, the
    value and what is allowed; nothing is created."""
    args, env = ((setting, value), {}) if setting.startswith("--") else ((), {setting: value})
    line = one_line_error(start_up(alone, *args, **env))
    assert f"{setting}='{value}': expected " in line
    assert list(alone.parent.iterdir()) == [alone]


@pytest.mark.parametrize("f", NUMERIC_FIELDS, ids=lambda f: f.name)
def test_every_number_out_of_its_range_is_refused(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                  f: Any) -> None:
    """Below, above or not a number: each numeric setting is refused with its range."""
    env, low, high = f.metadata["env"], f.metadata["low"], f.metadata["high"]
    for text in (str(low - 1), str(high + 1), "many"):
        clean_env.setenv(env, text)
        with pytest.raises(SystemExit) as stopped:
            gs.parse_config([])
        assert stopped.value.code == 2
        assert capsys.readouterr().err == f"error: {env}={text!r}: expected a {'whole ' * (type(f.default) is int)}" \
                                          f"number from {low:,} to {high:,}\n"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(fields(gs.Config)), st.text(st.characters(blacklist_categories=("Cs",),
                                                                  blacklist_characters="\x00"), max_size=40)
       | st.sampled_from(["-1", "1e999", "nan", "0x10", "١٢٣", "sqlite:///", "*", ",", "::", "999999999999",
                          "caf\udce9"]),                 # the last: a byte that is not UTF-8, as Python reads it
       st.booleans())
def test_any_setting_starts_the_server_or_stops_it_in_one_line(f: Any, text: str, as_flag: bool) -> None:
    """Whatever text a setting gets, as an env var or a flag: a Config, or one line and exit 2; never a
    traceback."""
    env = f.metadata["env"]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()) as said:
        for name in ENV_VARS:
            patch.delenv(name, raising=False)
        if not as_flag:
            patch.setenv(env, text)
        try:
            gs.parse_config([gs.flag_name(env), text] if as_flag else [])
        except SystemExit as stopped:
            assert stopped.code == 2, said.getvalue()
            assert said.getvalue().count("\n") == 1 or said.getvalue().startswith("usage:"), said.getvalue()


def test_every_numeric_setting_declares_its_range() -> None:
    """Each Config number says the range it may take, so no setting escapes the start-up check."""
    assert [f.name for f in NUMERIC_FIELDS if f.metadata["low"] is None or f.metadata["high"] is None] == []


@pytest.mark.parametrize("case", ["a folder", "no such folder", "sqlite URL, no such folder",
                                  pytest.param("read-only file", marks=SKIP_AS_ROOT),
                                  pytest.param("unwritable folder, default path", marks=SKIP_AS_ROOT)])
def test_a_bad_database_path_is_one_line_and_leaves_nothing(alone: Path, case: str) -> None:
    """A database path SQLite cannot use is named, absolute, with the reason; no empty file is left behind."""
    folder = alone.parent
    url, path, reason = {
        "a folder": (str(folder), folder, "it is a folder"),
        "no such folder": ("nowhere/arena.db", folder / "nowhere/arena.db", f"there is no folder {folder}/nowhere"),
        "sqlite URL, no such folder": ("sqlite:///nowhere/arena.db", folder / "nowhere/arena.db",
                                       f"there is no folder {folder}/nowhere"),
        "read-only file": ("arena.db", folder / "arena.db", "the file is read-only"),
        "unwritable folder, default path": ("", folder / "gambiarra.db", "the folder is not writable"),
    }[case]
    before = sorted(folder.iterdir())
    if case == "read-only file":
        path.touch(0o444)
        before = sorted(folder.iterdir())
    if case.startswith("unwritable"):
        folder.chmod(0o555)
    try:
        line = one_line_error(start_up(alone, DATABASE_URL=url))
    finally:
        folder.chmod(0o755)
    assert line.startswith(f"error: cannot use the database {path}: {reason}")
    assert sorted(folder.iterdir()) == before


def test_the_clubs_env_example_beside_the_file_works(alone: Path, tmp_path: Path) -> None:
    """The club's .env.example dropped beside the file: its sqlite+aiosqlite URL becomes a file beside the .env,
    its settings are honoured (an env var still wins), its keys we do not use are named once, and a typo
    is warned about with the likely name."""
    (alone.parent / ".env").write_text(
        "HOST=0.0.0.0\nPORT=3000\nDATABASE_URL=sqlite+aiosqlite:///./dev.db\nCORS_ORIGINS=*\nPIN_LENGTH=8\n"
        "ENVIRONMENT=development\nSESSION_TIMEOUT_MS=3600000\nPIN_LENGHT=5\n")
    process, banner = start_server(alone, tmp_path)        # HOST and PORT come from the environment
    try:
        assert banner["database"] == str(alone.parent / "dev.db")
        assert banner["listening on"].endswith(" of 127.0.0.1") and " 3000 " not in banner["listening on"]
        assert len(post_session(banner)["pin"]) == 8
    finally:
        errors = stop_server(process).splitlines()
    dotenv = alone.parent / ".env"
    assert errors[:2] == [
        f"{dotenv}: ENVIRONMENT, SESSION_TIMEOUT_MS (from the club's .env.example) not used by this server; ignored",
        f"{dotenv}: PIN_LENGHT is not a setting (did you mean PIN_LENGTH?); ignored"]
    assert (alone.parent / "dev.db").is_file()


def test_dotenv_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """.env holds KEY=VALUE lines, with `export`, quotes and comments; a line that is none of these is named,
    and a file that cannot be read stops the start-up."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nexport PIN_LENGTH=8\nPORT='4100'\nRATE_LIMIT_MAX = 20   # per minute\n"
                      'ADMIN_TOKEN="a # b"\n\nnonsense\n')
    assert gs.read_dotenv(dotenv) == {"PIN_LENGTH": "8", "PORT": "4100", "RATE_LIMIT_MAX": "20", "ADMIN_TOKEN": "a # b"}
    assert caplog.messages == [f"{dotenv} line 7 is not KEY=VALUE; ignored"]
    dotenv.write_bytes(b"PORT=\xff\n")            # saved in another encoding
    with pytest.raises(SystemExit) as stopped:
        gs.read_dotenv(dotenv)
    assert stopped.value.code == 2


def test_a_port_in_use_says_so_and_suggests_another(alone: Path) -> None:
    """A port another program holds ends the start-up with a line that names it and suggests --port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start_up(alone, PORT=str(port))
    assert one_line_error(result) == (f"error: could not listen on port {port} of 127.0.0.1: Address already in use "
                                      "(another port: --port N or PORT=N)")


# A restart keeps the room: the server stopped mid-round and started again on its database.

SUGGESTS_A_NEW_SESSION = re.compile(r"POST\s+\S*/session\b")


def banner_lines(process: ServerProcess) -> dict[str, list[str]]:
    """The banner of a started server process, read to its next step: the lines of each label."""
    lines = list(process.lines)
    for _ in range(200):                # printed at once with the "listening on" line: nothing waits here
        if lines[-1].strip().startswith("next step") or not lines[-1]:
            break
        lines.append(process.process.stdout.readline())
    shown: dict[str, list[str]] = {}
    for line in lines:
        label, _, text = line.strip().partition("  ")
        shown.setdefault(label, []).append(text.strip())
    return shown


def rest_of_output(process: ServerProcess) -> str:
    """SIGTERM the server process; everything it printed after its banner, log included."""
    process.process.send_signal(signal.SIGTERM)
    out, err = process.process.communicate(timeout=10)
    return out + err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_a_restart_shows_the_room_and_keeps_the_admin_token(server_process: Callable,
                                                                  http: aiohttp.ClientSession, signum: int) -> None:
    """Stopped mid-round and started again on the same database, the server's banner shows the session, its
    PIN, the round running and who may register again, with the admin token of the first start (which
    still opens the host routes from another machine); nothing it prints suggests a new session, which would
    end the evening; the step it does suggest works."""
    first = server_process("--host-addresses", "127.0.0.1/32")
    room = Room(first.start(), http)
    shown = banner_lines(first)
    token = shown["admin token"][0].split()[0]
    token_file = first.database.resolve().with_name("arena.db.admin-token")
    assert shown["admin token"][0].startswith(f"{token}   (new, kept in {token_file};")
    assert shown["next step"] == [f"curl -X POST {room.base}/session"]
    pin = await room.host.new_session()
    for pid in ("ana", "bia", "zed"):
        await room.runner(pid, pin)
    await room.host.call("POST", "/participants/kick", {"participantId": "zed"})
    rnd = await room.host.start((await room.host.new_round("Write a haiku\nabout   llamas"))["id"])
    assert await asyncio.to_thread(first.stop, signum) == (0 if signum == signal.SIGTERM else -signum)
    await room.close()

    second = server_process("--host-addresses", "127.0.0.1/32")
    room = Room(second.start(), http)
    shown = banner_lines(second)
    assert shown["database"] == [str(second.database.resolve())]
    assert shown["admin token"][0].startswith(f"{token}   (kept in {token_file};")
    assert re.fullmatch(rf"{rnd['sessionId']} \(PIN {pin}\), active since \d{{4}}-\d\d-\d\d \d\d:\d\d; it goes on",
                        shown["session"][0])
    assert re.fullmatch(r'1 running for \d+ min \d+ s: "Write a haiku about llamas"', shown["round"][0])
    assert shown["participants"] == ["2 may register again (1 kicked may not): ana (Ana), bia (Bia)"]
    assert shown["next step"] == [f"runners reconnect by themselves; when its answers are in: "
                                  f"curl -X POST {room.base}/rounds/stop"]
    assert (await (await room.runner("ana")).register(pin))["type"] == "registered"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)),
                                     headers={"Authorization": f"Bearer {token}"}) as away:
        stopped = await Host(room.base, away).call("POST", "/rounds/stop")
    assert (stopped["id"], stopped["sessionId"]) == (rnd["id"], rnd["sessionId"])
    await room.close()
    output = "".join(second.lines) + "\n".join(" ".join(texts) for texts in shown.values()) + rest_of_output(second)
    assert "restarted: session" in output and not SUGGESTS_A_NEW_SESSION.search(output)


async def test_an_admin_token_set_by_admin_token_wins_and_is_not_written(
        server_process: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """ADMIN_TOKEN wins over the kept token and is never written; without it, the token made at the first
    start is kept in a file only the host's user may read, and used at the next start."""
    token_file = server_process().database.resolve().with_name("arena.db.admin-token")

    def started(**env: str) -> str:
        with monkeypatch.context() as context:
            for name, value in env.items():
                context.setenv(name, value)
            process = server_process()
            process.start()
        line = banner_lines(process)["admin token"][0]
        process.stop()
        return line

    assert started(ADMIN_TOKEN="given-1").startswith("given-1   (set by ADMIN_TOKEN;")
    assert not token_file.exists()
    made = started(ADMIN_TOKEN="").split()[0]
    assert token_file.read_text() == made + "\n" and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert started(ADMIN_TOKEN="given-2").startswith("given-2   (set by ADMIN_TOKEN;")
    assert token_file.read_text() == made + "\n"
    assert started(ADMIN_TOKEN="").startswith(f"{made}   (kept in {token_file};")


def test_the_banner_prints_absolute_paths_and_the_pages_there_are(alone: Path, tmp_path: Path) -> None:
    """Started from its folder with a relative database path, the banner names the database and the token
    file by their absolute paths, and each page it lists answers at the URL it gives."""
    client = tmp_path / "client-browser"
    client.mkdir()
    (client / "client.html").write_text("<!doctype html><title>runner</title>")
    process, shown = start_server(alone, alone.parent, DATABASE_URL="arena.db", CLIENT_DIR=str(client))
    try:
        assert shown["database"] == str(alone.parent / "arena.db")
        assert f"(new, kept in {alone.parent / 'arena.db.admin-token'};" in shown["admin token"]
        port = shown["listening on"].split()[1]
        urls = re.findall(r"http://\S+", shown["pages"])
        assert f"http://localhost:{port}/client" in urls
        for url in urls:
            with urllib.request.urlopen(url.replace("localhost", "127.0.0.1"), timeout=TIMEOUT_S) as page:
                assert page.status == 200 and page.headers.get_content_type() == "text/html"
    finally:
        assert "Traceback" not in stop_server(process)


def test_the_restart_banner_fits_a_room_of_200_and_shows_only_a_known_pin() -> None:
    """The banner names a full room's participants in one line of bounded length: the count, the first
    names, how many more; a name's control characters are escaped. A session whose PIN the server does
    not know (a club database keeps only its hash) shows no PIN rather than a wrong one."""
    people = [{"id": f"runner-{i:03d}", "nickname": f"Name {i}", "kicked": 0} for i in range(200)]
    people[0]["nickname"] = "Ana\x1b[2J" * 30
    session = {"id": "s", "pin": "000000", "createdAt": gs.now_ms()}
    line = gs.who_may_reconnect(gs.Resumed(session, "123456", None, people, 0))
    assert line.startswith("200 may register again: runner-000 (Ana\\x1b[2JAna")
    assert re.search(r"…\), runner-001 \(Name 1\), runner-002 \(Name 2\), .*\) and 1\d\d more$", line)
    assert len(line) < 250
    [shown, *_] = gs.room_lines(gs.Resumed(session, None, None, [], 0), 3000)
    assert "(its PIN is not known here: only its hash is kept)" in shown and "000000" not in shown


# =============================================================================
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
    server = await aiohttp_server(served(gs.make_app(replace(config, client_dir=client_dir))))
    for path, content_type in (("/client", "text/html"), ("/client-assets/net.js", "text/javascript")):
        async with http.get(server.make_url(path)) as response:
            assert response.status == 200 and response.content_type == content_type
            assert response.headers["Cache-Control"] == "no-store"
    for path in ("/agent", "/client-assets/missing.js", "/client-assets/..%2Fclient.html",
                 f"/client-assets/{'a' * 5000}.js"):                   # longer than a file name can be
        async with http.get(server.make_url(path)) as response:
            assert response.status == 404 and "error" in await response.json()


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
# WebSocket: register, screens and malformed frames
# =============================================================================

async def test_register_replies_with_the_session(room: Room, pin: str) -> None:
    """register -> registered with session_id (and our participant_id, resume_secret); no resume when nothing runs."""
    session_id = (await room.host.call("GET", "/session"))["id"]
    ana = await room.runner("ana")
    assert await ana.register(pin) == {"type": "registered", "session_id": session_id, "participant_id": "ana",
                                       "resume_secret": SECRET}


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


@pytest.mark.parametrize(("fields", "message"), [
    ({"participant_id": None}, "'participant_id' is required"),
    ({"participant_id": ""}, "'participant_id' must be at least 1 characters"),
    ({"participant_id": 7}, "'participant_id' must be a string"),
    ({"pin": None}, "'pin' is required"),
    ({"pin": 123456}, "'pin' must be a string"),
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
         "ttft_ms": AMOUNT, "tps": AMOUNT, "engine_tps": None},
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
    """Without a seed the challenge carries the seed drawn for the round (never null); only runners get it."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round("Oi", maxTokens=32, temperature=1.5))["id"])
    assert await ana.recv() == {"type": "challenge", "session_id": rnd["sessionId"], "round": 1, "prompt": "Oi",
                                "max_tokens": 32, "temperature": 1.5, "deadline_ms": 90000, "seed": rnd["seed"]}
    assert rnd["seed"] == SEED
    assert "challenge" not in [m["type"] for m in await screen.quiet()]


async def test_runners_get_a_heartbeat_and_stay_connected(make_room: Callable) -> None:
    """Every WS_HEARTBEAT_INTERVAL runners get {type: heartbeat, ts}, and pings they answer keep them in."""
    room = await make_room(ws_heartbeat_interval_s=0.1)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    for _ in range(5):                              # longer than MISSED_PINGS intervals
        assert await ana.recv("heartbeat") == {"type": "heartbeat", "ts": MS}
    assert (await room.host.call("GET", "/presence"))["connectedCount"] == 1


# =============================================================================
# WebSocket: tokens, completes and who may send them
# =============================================================================

def metrics_row(database: Path, participant_id: str) -> dict[str, Any]:
    rows = db_rows(database, "SELECT * FROM metrics WHERE participantId = ?", participant_id)
    assert len(rows) == 1, rows
    return rows[0]


async def responses_of(room: Room, rnd: dict[str, Any]) -> dict[str, str]:
    body = await room.host.call("GET", f"/rounds/{rnd['id']}/responses")
    return {r["participant_id"]: r["generated_content"] for r in body["responses"]}


async def test_a_frame_without_participant_id_is_the_sockets_own(room: Room, pin: str) -> None:
    """participant_id may be left out of token and complete: the socket's registration says who."""
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.send({"type": "token", "round": 1, "seq": 0, "content": "oi"})
    await ana.send({"type": "complete", "round": 1})
    await ana.sync()
    assert await responses_of(room, rnd) == {"ana": "oi"}


async def test_a_token_for_a_round_that_is_not_live(room: Room, pin: str) -> None:
    """Tokens for an unknown round index are refused with UNKNOWN_ROUND; the runner stays connected."""
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    await ana.token(9, 0, "x")
    assert await ana.recv() == {"type": "error", "message": "Round 9 is not live", "code": "UNKNOWN_ROUND"}
    await ana.send({"type": "complete", "round": 9})
    assert (await ana.recv())["code"] == "UNKNOWN_ROUND"


async def test_duplicate_seqs_are_ignored(room: Room, pin: str) -> None:
    """A seq seen already is dropped silently: not shown again, first content kept."""
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
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
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.answer_in_order((0, 1, 3, 4), 5)
    updates = [await screen.recv("token_update") for _ in range(4)]
    assert [(u["seq"], u["total_tokens"]) for u in updates] == [(0, 1), (1, 2), (3, 3), (4, 4)]
    assert await responses_of(room, rnd) == {"ana": "0134"}
    row = metrics_row(config.database, "ana")
    assert (row["tokens"], row["tokensReceived"], row["seqGaps"], row["rescued"]) == (5, 4, 1, 0)
    assert (await room.host.call("GET", "/metrics"))["total_seq_gaps"] == 1


async def test_tokens_out_of_order_are_stored_in_seq_order(room: Room, pin: str) -> None:
    """Content is the tokens in seq order, whatever order they arrived in."""
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.answer_in_order((2, 0, 3, 1), 4)
    assert await responses_of(room, rnd) == {"ana": "0123"}


async def test_empty_tokens_and_sloppy_completes_are_accepted(room: Room, pin: str, config: gs.Config) -> None:
    """Empty content, latency_ms_first_token null and no model_info: all fine (the club's runners send them)."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    await running_round(room, ana, bia)
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
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
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
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
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
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    await ana.send({"type": "error", "round": 1, "participant_id": "ana", "code": "GENERATION_FAILED",
                    "message": "out of memory"})
    await ana.sync()
    assert [m["type"] for m in await screen.quiet()] == ["participant_registered", "round_started", "round_state"]
    events = await eventually(lambda: db_rows(config.database, "SELECT * FROM event_logs "
                                                               "WHERE eventType = 'generation_failed'"))
    assert json.loads(events[0]["metadata"]) == {"roundIndex": 1, "code": "GENERATION_FAILED",
                                                 "message": "out of memory"}


# =============================================================================
# WebSocket: reconnects, replaced sockets, rescue at stop, late completes
# =============================================================================

async def test_reconnect_mid_round_resumes_where_the_server_stopped(room: Room, pin: str, config: gs.Config) -> None:
    """A runner that drops and registers again is told the next seq and the missing ones, and finishes."""
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    for seq in (0, 1, 3, 4):
        await ana.token(1, seq, WORDS[seq])
    await ana.sync()
    await ana.ws.close()
    assert (await screen.recv("participant_disconnected"))["participant_id"] == "ana"
    again = await room.runner("ana")
    assert await again.register(pin) == {"type": "registered", "session_id": rnd["sessionId"],
                                         "participant_id": "ana", "resume_secret": SECRET,
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
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    bia = await room.runner("bia")
    assert (await bia.register(pin))["resume"] == {"round": 1, "next_seq": 0, "missing": []}
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {}


async def test_a_second_socket_for_the_same_participant_replaces_the_first(room: Room, pin: str) -> None:
    """The old socket is closed first, and screens see no participant_disconnected for it."""
    screen = await room.screen()
    await screen.recv("state_snapshot")
    old = await room.runner("ana", pin)
    await running_round(room)
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


async def test_stop_with_no_answers_still_opens_voting(room: Room, pin: str) -> None:
    """The club's server refuses to stop an empty round; ours stops it and opens (empty) voting."""
    await room.runner("ana", pin)
    rnd = await running_round(room)
    assert (await room.host.stop(rnd["id"]))["votingStatus"] == "open"
    assert (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"] == []
    assert (await room.host.call("GET", "/scoreboard"))["scoreboard"] == []


async def test_a_late_complete_after_stop_is_kept_and_shown(room: Room, pin: str, config: gs.Config) -> None:
    """A complete after stop is accepted, saved (replacing the rescue) and broadcast; phones refetch."""
    phone = await room.screen("voting")
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
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


@pytest.mark.parametrize("then", ["the saver's turn", "the next round"])
async def test_an_answer_begun_in_the_grace_after_stop_is_kept_without_a_complete(make_room: Callable,
                                                                                  then: str) -> None:
    """A runner whose first tokens arrive after the stop (but within STOP_GRACE), and that never completes:
    its answer is shown, and saved and listed for voting as the stop's rescue would have, by the saver's
    next turn (the phones are told to fetch the answers again) or when the next round starts, whichever
    comes first."""
    room = await make_room(save_interval_s=0.2 if then == "the saver's turn" else 600)
    pin = await room.host.new_session()
    screen, phone = await room.screen(), await room.screen("voting")
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await room.host.stop(rnd["id"])
    while (await phone.recv("round_state"))["round"]["votingStatus"] != "open":
        pass                                                # the start's, then the stop's
    await ana.stream(1, WORDS[:2])
    await ana.sync()
    assert [(u["seq"], u["content"]) for u in [await screen.recv("token_update") for _ in range(2)]] == [
        (0, WORDS[0]), (1, WORDS[1])]
    if then == "the next round":
        await running_round(room, ana)
    else:
        assert (await phone.recv("round_state"))["round"]["id"] == rnd["id"]      # fetch the answers again
    await eventually(lambda: responses_of(room, rnd), "the late answer listed")
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS[:2])}
    assert metrics_row(room.server.config.database, "ana")["rescued"] == 1


# =============================================================================
# WebSocket: kick and a new session mid-round
# =============================================================================

async def test_a_kick_closes_the_socket_and_refuses_the_participant(room: Room, pin: str, config: gs.Config) -> None:
    """The kicked runner gets KICKED and is closed; screens see it leave; its re-register is refused."""
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
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
    assert first["votingStatus"] == "pending" and first["revealedCount"] == 0 and first["startedAt"] is None
    assert (first["seed"], second["index"], second["seed"], second["svgMode"]) == (SEED, 2, 42, True)


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
        405, {"error": "/api/session takes GET or POST, not DELETE", "code": "METHOD_NOT_ALLOWED"})


async def test_health_shape(room: Room) -> None:
    """GET /health: status, server clock, version, database state (and when its file was last written back),
    connection count, and how each background writer fares."""
    assert await room.host.call("GET", "/health") == {
        "status": "ok", "timestamp": MS, "version": gs.__version__, "database": "ok", "database_restored_at": None,
        "connections": 0, "refused": [],
        "writers": {"tokens": "ok", "answers": "ok", "votes": "ok", "events": "ok", "heartbeat": "ok"}}


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
                   "temperature": 0.0, "deadlineMs": 5000, "seed": SEED, "svgMode": True, "startedAt": None,
                   "endedAt": None, "votingStatus": "pending", "revealedCount": 0, "createdAt": WHEN}
    started = await room.host.start(rnd["id"])
    assert started == {**rnd, "startedAt": WHEN, "votingStatus": "running", **NO_RUNNER}
    assert await room.host.call("POST", "/api/rounds/stop", {"round_id": rnd["id"]}) == {
        **rnd, "startedAt": started["startedAt"], "endedAt": WHEN, "votingStatus": "open"}


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
        "svgMode": True, "votingStatus": "running", "prompt": "Draw", "round_id": rnd["id"]}


async def test_voting_ceremony_routes_return_the_round(room: Room, pin: str) -> None:
    """close-voting (or /votes/close), reveal and reveal-next each return the updated Round row."""
    rnd = await round_in(room, pin, "open")
    closed = await room.host.call("POST", "/votes/close")
    assert closed == {**rnd, "votingStatus": "closed"}
    revealed = await room.host.call("POST", f"/api/rounds/{rnd['id']}/reveal")
    assert revealed == {**closed, "votingStatus": "revealed", "revealedCount": 0}
    assert await room.host.call("POST", f"/rounds/{rnd['id']}/reveal-next") == {
        **revealed, "revealedCount": 1,
        "revealed": {"position": 1, "participant_id": "ana", "nickname": "Ana", "score": 0.0, "votes": 0}}
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


async def test_a_body_with_both_casings_and_nulls_uses_the_defaults(room: Room, pin: str) -> None:
    """snake_case and camelCase both work; null means absent."""
    rnd = await room.host.new_round(max_tokens=10, deadlineMs=None, seed=None, svg_mode=None)
    assert (rnd["maxTokens"], rnd["deadlineMs"], rnd["seed"], rnd["svgMode"]) == (10, 90000, SEED, False)


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
    return {400: "INVALID_INPUT", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
            409: "CONFLICT"}[status]


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
    ("open", round_call("POST", "/rounds/stop", {"roundId": ""}), 409, "No round is running"),
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
           "tps_avg": AMOUNT, "generated_content": "ab", "model": "llama3.1:8b", "runner": "ollama", "engine_tps": None}
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


# --- the host's log and small things ---------------------------------------------

def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log read the way the club's report scripts read it: json.loads per line."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def stopped_log(process: ServerProcess) -> str:
    """Stop a server process as Ctrl-C would and return what its terminal showed."""
    process.process.send_signal(signal.SIGINT)
    out, err = process.process.communicate(timeout=TIMEOUT_S * 2)
    return out + err


async def test_the_json_log_counts_requests_registrations_and_completes(make_room: Callable,
                                                                       tmp_path: Path) -> None:
    """With LOG_JSON, a report script parsing each line with json.loads finds pino's fields, one
    incoming/completed pair per HTTP request and per WebSocket (none per frame), every register and
    complete, a replaced connection, a disconnect and each 429."""
    path = tmp_path / "server.log"
    room = await make_room(log_json=str(path), host_addresses=("127.0.0.1/32",), rate_limit_max=2)
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    await running_round(room, ana, bia)
    for runner in (ana, bia):
        await runner.stream(1, WORDS)
        await runner.complete(1, len(WORDS))
        await runner.sync()
    await room.runner("ana", pin)                       # ana's laptop reconnects: the old socket is replaced
    await bia.ws.close()
    phone = await room.http_from("127.0.0.2")
    statuses = [(await phone.status("GET", "/scoreboard"))[0] for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    requests = 3 + 4 + 3                                # the host's, the phone's, and three WebSockets
    await room.close()                                  # every WebSocket request completes when it closes

    def logged() -> list[dict[str, Any]]:
        lines = json_lines(path)
        done = [line for line in lines if line["msg"] == "request completed"]
        gone = [line for line in lines if line["msg"].startswith("WS_DISCONNECTED")]
        return lines if len(done) == requests and len(gone) == 2 else []
    lines = await eventually(logged, "every request written")
    assert all(isinstance(l["time"], int) and l["time"] == MS and l["level"] in (30, 40, 50) for l in lines)
    incoming = [line["req"] for line in lines if line["msg"] == "incoming request"]
    assert len(incoming) == requests
    assert [r["url"] for r in incoming].count("/ws") == 3
    assert {r["remoteAddress"] for r in incoming} == {"127.0.0.1", "127.0.0.2"}
    assert {"method": "POST", "url": "/rounds/start", "remoteAddress": "127.0.0.1"} in incoming
    completed = [line for line in lines if line["msg"] == "request completed"]
    assert sorted(line["res"]["statusCode"] for line in completed) == [101] * 3 + [200] * 5 + [429] * 2
    assert all(line["responseTime"] == AMOUNT for line in completed)

    def count(prefix: str) -> int:
        return sum(line["msg"].startswith(prefix) for line in lines)
    assert (count("WS_REGISTERED"), count("WS_COMPLETE"), count("WS_DEDUP"), count("WS_DISCONNECTED"),
            count("HTTP_429")) == (3, 2, 1, 2, 2)           # ana's old socket leaves quietly
    assert [line["level"] for line in lines if line["msg"].startswith("HTTP_429")] == [40, 40]


async def test_a_terminal_that_is_not_read_does_not_stop_the_server(server_process: Callable,
                                                                    http: aiohttp.ClientSession) -> None:
    """Log lines are written by a thread: with the terminal's pipe full and unread (a stalled terminal),
    runners and the host are still answered. Writing on the event loop would block it at the first full pipe."""
    process = server_process()
    room = Room(process.start(), http)                  # nothing reads its stderr from here on
    pin = await room.host.new_session()
    ana = await room.runner("ana")
    for _ in range(600):                                # some 170 KB of WS_REGISTERED lines; a pipe holds 64 KB
        await ana.send({"type": "register", "participant_id": "ana", "nickname": "n" * gs.MAX_TEXT, "pin": pin})
    for _ in range(600):
        assert (await ana.recv())["type"] == "registered"
    assert (await room.host.call("GET", "/health"))["status"] == "ok"
    await room.close()


async def test_the_host_reads_the_evening_in_the_terminal_and_the_json_log(server_process: Callable,
                                                                          http: aiohttp.ClientSession,
                                                                          tmp_path: Path) -> None:
    """The server as the host runs it: one terminal line per step of the evening (the PIN, rounds,
    voting, reveal, registers, refusals with their reason and address, kicks, disconnects, the
    restart), and with --log-json the club's "Server listening at" line."""
    process = server_process("--log-json", str(tmp_path / "first.log"))
    room = Room(process.start(), http)
    pin = await room.host.new_session()
    wrong = await room.runner("eve")
    assert (await wrong.register("0" if pin != "0" * len(pin) else "1"))["code"] == "INVALID_PIN"
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, {"ana": ana})
    await room.host.stop(rnd["id"])
    for step in ("close-voting", "reveal", "reveal-next"):
        await room.host.call("POST", f"/rounds/{rnd['id']}/{step}")
    await room.host.call("POST", "/participants/kick", {"participantId": "ana"})
    assert (await (await room.runner("ana")).register(pin))["code"] == "KICKED"
    await room.runner("bia", pin)
    await room.close()
    await eventually(lambda: any(l["msg"].startswith("WS_DISCONNECTED bia")
                                 for l in json_lines(tmp_path / "first.log")), "bia's leave")
    terminal = stopped_log(process)
    session_id = rnd["sessionId"]
    for line in (f"session {session_id} created, PIN {pin}", f"round 1 created ({rnd['id']}), seed ",
                 "round 1 started: the challenge went to 1 runners", "WS_REGISTERED ana (Ana) from 127.0.0.1",
                 "WS_REFUSED register eve from 127.0.0.1: INVALID_PIN (Invalid PIN.)",
                 "WS_COMPLETE ana round 1", "round 1 stopped with 1 answers; voting opened",
                 "round 1: voting closed", "round 1: reveal started",
                 "round 1: position 1 revealed: Ana (ana), average 0.00 from 0 votes",
                 "kicked ana (was connected from 127.0.0.1)",
                 "WS_REFUSED register ana from 127.0.0.1: KICKED (The host removed you from this session)",
                 "WS_DISCONNECTED bia from 127.0.0.1"):
        assert line in terminal, line
    listening = [l["msg"] for l in json_lines(tmp_path / "first.log") if l["msg"].startswith("Server listening")]
    assert listening == [f"Server listening at {room.base}"]

    again = server_process()
    again.start()
    assert f"restarted: session {session_id} (PIN {pin}) goes on" in stopped_log(again)


async def test_throttled_refusals_are_one_line_a_minute(make_room: Callable,
                                                        server_log: pytest.LogCaptureFixture) -> None:
    """A guesser past the wrong-PIN limit, or a phone past the HTTP limit, is one terminal line a
    minute, not one per attempt; each wrong PIN before that has its own line."""
    room = await make_room(host_addresses=("127.0.0.1/32",), pin_attempts_max=2, rate_limit_max=1)
    await room.host.new_session()
    guesser = await room.runner_at("127.0.0.3", "eve")
    codes = [(await guesser.register("x"))["code"] for _ in range(5)]
    assert codes == ["INVALID_PIN"] * 2 + ["PIN_THROTTLED"] * 3
    phone = await room.http_from("127.0.0.2")
    assert [(await phone.status("GET", "/metrics"))[0] for _ in range(4)] == [200, 429, 429, 429]
    ours = [r.getMessage() for r in server_log.records if r.name == "gambiarra"]
    assert [line.split(":")[1].split()[0] for line in ours if line.startswith("WS_REFUSED register eve")] == [
        "INVALID_PIN", "INVALID_PIN", "PIN_THROTTLED"]
    assert len([line for line in ours if line.startswith("throttled: 127.0.0.2")]) == 1


async def test_a_round_created_without_a_seed_draws_one_and_keeps_it(room: Room, pin: str,
                                                                      config: gs.Config) -> None:
    """Runners pass the seed straight to ollama: it is a number, the one stored with the round."""
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    challenge = await ana.recv("challenge")
    assert challenge["seed"] == rnd["seed"] == SEED
    assert db_rows(config.database, "SELECT seed FROM rounds") == [{"seed": rnd["seed"]}]
    older = {**await room.host.new_round(), "seed": None}          # a round saved before seeds were drawn
    assert "seed" not in gs.msg_challenge(rnd["sessionId"], older)


async def test_reveal_next_says_who_was_revealed(room: Room, pin: str) -> None:
    """Each reveal-next answers the position it revealed, last place first, with the name and score."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, {"ana": ana, "bia": bia})
    await room.host.stop(rnd["id"])
    for voter, (a, b) in {"p1": (5, 2), "p2": (4, 3)}.items():
        await room.host.vote(rnd["id"], "ana", a, voter)
        await room.host.vote(rnd["id"], "bia", b, voter)
    for step in ("close-voting", "reveal"):
        await room.host.call("POST", f"/rounds/{rnd['id']}/{step}")
    revealed = [(await room.host.call("POST", f"/rounds/{rnd['id']}/reveal-next"))["revealed"] for _ in "ab"]
    assert revealed == [{"position": 2, "participant_id": "bia", "nickname": "Bia", "score": 2.5, "votes": 2},
                        {"position": 1, "participant_id": "ana", "nickname": "Ana", "score": 4.5, "votes": 2}]


async def test_a_round_says_pending_then_running_wherever_it_is_json(room: Room, pin: str,
                                                                      config: gs.Config) -> None:
    """A created round is "pending" and a started one "running" in /session, responses, round_state and
    the export; the database keeps the club's "closed"."""
    screen = await room.screen()
    first, second = await room.host.new_round(), await room.host.new_round()
    await room.host.start(first["id"])
    assert (await screen.recv("round_state"))["round"]["votingStatus"] == "running"
    session = await room.host.call("GET", "/session")
    assert [r["votingStatus"] for r in session["rounds"]] == ["running", "pending"]
    for rnd, status in ((first, "running"), (second, "pending")):
        assert (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["votingStatus"] == status
    exported = json.loads((await export(room, "/export-all.json"))[0])
    assert [r["votingStatus"] for r in exported["rounds"]] == ["running", "pending"]
    assert db_rows(config.database, "SELECT votingStatus FROM rounds") == [{"votingStatus": "closed"}] * 2


async def test_flags_are_booleans_in_every_json(room: Room, pin: str) -> None:
    """`connected` (and kicked, svgMode, rescued) is true/false in /presence, /session and export-all.json."""
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round(svgMode=True))["id"])
    await ana.recv("challenge")
    await ana.token(1, 0, "<svg/>")
    await ana.sync()
    await room.host.stop(rnd["id"])                     # ana's answer is rescued
    assert (await room.host.call("GET", "/presence"))["participants"][0]["connected"] is True
    assert (await room.host.call("GET", "/session"))["participants"][0]["connected"] is True
    exported = json.loads((await export(room, "/export-all.json"))[0])
    [participant], [exported_round] = exported["participants"], exported["rounds"]
    assert (participant["connected"], participant["kicked"]) == (True, False)
    assert (exported_round["svgMode"], exported_round["metrics"][0]["rescued"]) == (True, True)


POST_ONLY = sorted({route.path for route in gs.ROUTES if route.method == "POST"}
                   - {route.path for route in gs.ROUTES if route.method == "GET"})


@pytest.mark.parametrize("path", POST_ONLY)
async def test_get_on_a_post_only_route_names_the_method(room: Room, path: str) -> None:
    """A browser or a curl without -X POST gets a 405 that says to use POST, with Allow."""
    url = room.base + path.replace("{round_id}", "r1")
    async with room.host.http.get(url) as response:
        assert (response.status, response.headers["Allow"]) == (405, "POST")
        assert await response.json() == {"error": f"{path.replace('{round_id}', 'r1')} takes POST, not GET",
                                         "code": "METHOD_NOT_ALLOWED"}


def readme_runner() -> str:
    """The README's sample runner, as a participant copies it."""
    readme = (HERE / "README.md").read_text()
    return re.search(r"```python\n(# runner\.py.*?)```", readme, re.S).group(1)


async def test_the_readmes_sample_runner_stops_at_a_wrong_pin(room: Room, pin: str, tmp_path: Path) -> None:
    """The participant who types a wrong PIN sees why and gets the prompt back (it used to wait forever)."""
    script = tmp_path / "runner.py"
    script.write_text(readme_runner())
    wrong = "0" * len(pin) if pin != "0" * len(pin) else "1" * len(pin)
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), room.ws_url, wrong, "ana",
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(TIMEOUT_S * 2):
        out, err = await process.communicate()
    assert (process.returncode, out.decode(), err.decode()) == (
        1, "error Invalid PIN.\n", "ana stops: Invalid PIN.\n")


async def test_starting_a_round_with_no_runner_warns(room: Room, pin: str,
                                                     server_log: pytest.LogCaptureFixture) -> None:
    """The host who starts too early is told in the answer (and the terminal); with a runner, no warning."""
    empty = await room.host.start((await room.host.new_round())["id"])
    assert empty["warning"] == NO_RUNNER["warning"]
    assert "round 1 started with no runner connected" in [r.getMessage() for r in server_log.records]
    await room.host.stop(empty["id"])
    ana = await room.runner("ana", pin)
    assert "warning" not in await room.host.start((await room.host.new_round())["id"])
    await ana.recv("challenge")


async def test_a_wrong_admin_token_is_refused_even_from_the_hosts_machine(room: Room) -> None:
    """A screen set up with a mistyped token fails at the rehearsal on the host's laptop: 403, not accepted."""
    app_token = {"Authorization": "Bearer not-the-token"}
    assert await room.host.status("POST", "/session", headers=app_token) == (
        403, {"error": "Wrong admin token", "code": "FORBIDDEN"})
    assert await room.host.status("GET", "/export.csv", headers={"Authorization": "Basic eDp5"}) == (
        403, {"error": "Wrong admin token", "code": "FORBIDDEN"})
    assert (await room.host.status("POST", "/session"))[0] == 200          # no token: the host's own curl


# =============================================================================
# HTTP: the host and everyone else
# =============================================================================
#
# These servers trust only 10.255.255.0/24 as the host, so the test client on
# loopback is one of the audience's phones.

AWAY = ("10.255.255.0/24",)


@pytest.fixture
async def away(make_room: Callable) -> tuple[Room, dict[str, str]]:
    """A server that does not take loopback for the host, with a session; the admin token's header."""
    room = await make_room(host_addresses=AWAY)
    admin = {"Authorization": f"Bearer {room.server.config.admin_token}"}
    await room.host.call("POST", "/session", headers=admin)
    return room, admin


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


async def test_cors_preflight_and_headers_follow_cors_origins(make_room: Callable) -> None:
    """A preflight from an allowed origin gets 204 and the CORS headers; another origin gets none."""
    room = await make_room(cors_origins=("http://telao.local:5173",))
    preflight = {"Origin": "http://telao.local:5173", "Access-Control-Request-Method": "POST"}
    async with room.host.http.options(room.base + "/api/votes", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "http://telao.local:5173"
    async with room.host.http.get(room.base + "/health", headers={"Origin": "http://evil.example"}) as response:
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers


async def test_a_cross_origin_websocket_is_refused(make_room: Callable) -> None:
    """A browser page on an origin CORS_ORIGINS does not allow can't open /ws."""
    room = await make_room(cors_origins=("http://telao.local:5173",))
    with pytest.raises(Exception, match="403"):
        await connect(room.ws_url, origin="http://evil.example")
    async with connect(room.ws_url, origin="http://telao.local:5173") as ws:
        await ws.send(json.dumps({"type": "telao_register"}))
        assert json.loads(await ws.recv())["type"] == "registered_telao"


# =============================================================================
# Exports: what the files contain
# =============================================================================

DIGITS = Like("digits", lambda v: isinstance(v, str) and v.isdigit())
FIXED_2 = Like("d.dd", lambda v: isinstance(v, str) and re.fullmatch(r"\d+\.\d\d", v))
EXPORT_HEADER = ["round", "round_started_at", "round_ended_at", "participant_id", "nickname", "tokens",
                 "latency_first_token_ms", "duration_ms", "tps_avg", "votes", "avg_score", "generated_content",
                 "model", "runner", "tokens_received", "seq_gaps", "client_latency_first_token_ms",
                 "client_duration_ms", "rescued", "engine_tps"]
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
              "seq_gaps": "0", "engine_tps": ""}
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
                                                                    "totalParticipants": 2, "participantId": "bia"}
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


def test_the_docstring_and_docs_list_every_message_the_server_sends_with_its_fields() -> None:
    """The module docstring's protocol and /docs are true to the two message tables."""
    docstring, page = " ".join(gs.__doc__.split()), gs.docs_page()
    for kind, (_, names) in gs.SERVER_MESSAGES.items():
        assert f"{kind} {{{names}}}" in docstring and f"<code>{kind}</code>" in page, kind
    for kind in gs.ON_MESSAGE:
        assert f" {kind} {{" in docstring, kind


def test_the_docstring_names_the_files_sections_in_their_order() -> None:
    """The section map in the module docstring is the file's banners, in order."""
    banners = re.findall(r"^# =+\n# ([^\n]+)\n# =+$", (HERE / "gambiarra_server.py").read_text(), re.M)
    listed = " ".join(gs.__doc__.split("The sections of this file")[1].split("\n\n")[1].split())
    assert [part.split(" (")[0] for part in listed.split(" -> ")] == [b.split(":")[0].split(" (")[0] for b in banners]


async def test_redoc_redirects_to_docs(room: Room) -> None:
    """FastAPI users type /redoc; it leads to the same page."""
    async with room.host.http.get(room.base + "/redoc", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (302, "/docs")


# =============================================================================
# Reliability and security
# =============================================================================

@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every ERROR (or worse) any logger wrote: unhandled exceptions, failed writes, crashed tasks."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def tokens_of(messages: list[dict[str, Any]], participant_id: str) -> list[tuple[int, str]]:
    return [(m["seq"], m["content"]) for m in messages
            if m["type"] == "token_update" and m["participant_id"] == participant_id]


async def running_round(room: Room, *runners: Runner, **fields: Any) -> dict[str, Any]:
    """Create and start a round; each runner reads its challenge. The started round's row."""
    rnd = await room.host.start((await room.host.new_round(**fields))["id"])
    for runner in runners:
        await runner.recv("challenge")
    return rnd


# --- no one where they don't belong --------------------------------------------

async def test_host_routes_refuse_other_addresses_without_the_admin_token(make_room: Any) -> None:
    """Every host route in /openapi.json: 401 from a non-host address, 403 with a wrong token (Bearer or Basic),
    even spoofing XFF, and all before the body is even read."""
    room = await make_room(host_addresses=("127.0.0.1/32",))
    spec = await room.host.call("GET", "/openapi.json")
    host_routes = [(method.upper(), path.replace("{round_id}", "r1")) for path, ops in spec["paths"].items()
                   for method, op in ops.items() if "security" in op]
    assert len(host_routes) >= 10
    assert set(host_routes) == {(r.method, r.path.replace("{round_id}", "r1")) for r in gs.ROUTES if r.host}
    stranger = await room.http_from(STRANGER)
    unauthorized = (401, {"error": "This is a host route: call it from the host's machine or send "
                                   "'Authorization: Bearer <admin token>'", "code": "UNAUTHORIZED"})
    for method, path in host_routes:
        for prefix in ("", "/api"):
            assert await stranger.status(method, prefix + path, "{") == unauthorized, path
            spoofed = await stranger.status(method, prefix + path, "{", headers={"X-Forwarded-For": "127.0.0.1"})
            assert spoofed == unauthorized, path
            for header in ("Bearer guess", "Basic d3Jvbmc="):
                assert await stranger.status(method, prefix + path, "{", headers={"Authorization": header}) == (
                    403, {"error": "Wrong admin token", "code": "FORBIDDEN"}), path
    assert (await room.host.status("GET", "/session"))[0] == 404        # none of that created a session
    holder = await room.http_from(STRANGER, token=room.server.config.admin_token)
    assert (await holder.call("POST", "/session"))["pin"]


async def test_the_pin_reaches_no_one_but_the_host(make_room: Any) -> None:
    """Screens, phones and runners never receive the PIN (nor its hash); only the host's GET /session has it,
    or that of a client holding the admin token (not a wrong one)."""
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
    assert (await (await room.http_from(STRANGER, token=room.server.config.admin_token)).call(
        "GET", "/api/session"))["pin"] == pin
    assert "pin" not in await (await room.http_from(STRANGER, token="wrong")).call("GET", "/session")


async def test_a_wrong_pin_flood_from_one_address_is_throttled(room: Room, pin: str, config: gs.Config) -> None:
    """Past PIN_ATTEMPTS_MAX wrong PINs an address is refused (even the right PIN) until its window ends."""
    guesser = await room.runner_at(STRANGER, "mallory")
    wrong = [f"{n:06d}" for n in range(config.pin_attempts_max + 5) if f"{n:06d}" != pin]
    codes = [(await guesser.register(guess))["code"] for guess in wrong]
    limit = config.pin_attempts_max
    assert codes == ["INVALID_PIN"] * limit + ["PIN_THROTTLED"] * (len(wrong) - limit)
    refused = await guesser.register(pin)
    assert refused["code"] == "PIN_THROTTLED" and "try again in" in refused["message"]
    await room.runner_at("127.0.0.3", "ana", pin)


async def test_parallel_wrong_pins_from_one_address_are_throttled_too(room: Room, pin: str,
                                                                      config: gs.Config) -> None:
    """Guesses sent at once on many connections count before bcrypt answers: no more than the limit are tried."""
    guessers = [await room.runner_at(STRANGER, f"m{n}") for n in range(15)]
    guesses = [f"{n:07d}" for n in range(15)]           # 7 digits: never the 6-digit PIN
    replies = await asyncio.gather(*(g.register(guess) for g, guess in zip(guessers, guesses)))
    codes = sorted(reply["code"] for reply in replies)
    assert codes.count("INVALID_PIN") == config.pin_attempts_max
    assert codes.count("PIN_THROTTLED") == 15 - config.pin_attempts_max


async def test_wrong_pins_from_many_addresses_are_throttled_together(make_room: Any) -> None:
    """Past PIN_ATTEMPTS_TOTAL_MAX wrong PINs from all addresses together, an address that guessed wrong waits
    out the window (even with the right PIN, even within its own allowance); the others get one check each."""
    room = await make_room(pin_attempts_max=100, pin_attempts_total_max=5)
    pin = await room.host.new_session()
    guessers = [await room.runner_at(f"127.0.1.{n + 1}", f"m{n}") for n in range(7)]
    assert [(await g.register(f"{n:07d}"))["code"] for n, g in enumerate(guessers)] == ["INVALID_PIN"] * 7
    for n, guesser in enumerate(guessers):
        refused = await guesser.register(f"{n + 10:07d}" if n else pin)
        assert refused["code"] == "PIN_THROTTLED" and "on this server" in refused["message"], refused
    latecomer = await room.runner_at("127.0.2.1", "eve")
    assert (await latecomer.register("0000000"))["code"] == "INVALID_PIN"
    assert (await latecomer.register("0000001"))["code"] == "PIN_THROTTLED"


def test_guessing_a_six_digit_pin_takes_longer_than_a_meetup() -> None:
    """With the default limits a window holds at most PIN_ATTEMPTS_TOTAL_MAX wrong PINs plus one per address
    (one per /64 for IPv6, where one machine can take any address of it): trying half the 10**6 PINs takes
    over a day from 40 addresses, over 15 hours from a whole /24, and over a month from one address."""
    config = gs.Config()
    assert config.pin_length == 6

    def hours_for_half(addresses: int) -> float:
        per_window = min(config.pin_attempts_total_max + addresses, config.pin_attempts_max * addresses)
        return 10**6 / 2 / (per_window * 3600 / config.pin_attempts_window_s)
    assert hours_for_half(40) > 24 and hours_for_half(254) > 15 and hours_for_half(1) > 24 * 30
    assert gs.pin_network("2001:db8::1") == gs.pin_network("2001:db8::ffff:ffff:ffff:ffff") == "2001:db8::/64"
    assert gs.pin_network("127.0.0.2") == "127.0.0.2" and gs.pin_network("::ffff:10.0.0.1") == "::ffff:10.0.0.1"


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
        assert await mallory.recv("error") == {"type": "error", "code": "WRONG_PARTICIPANT",
                                               "message": "This connection is registered as mallory, not ana"}
        await stranger.send(message)
        assert (await stranger.recv("error"))["code"] == "NOT_REGISTERED"
    await mallory.sync()
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {}
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
    await eventually(lambda: "ana" not in room.server.hub.by_participant, "ana's connection forgotten")
    assert (await impostor.register(pin))["code"] == "ID_IN_USE"    # nor once she has left


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


# --- attack: client text and sizes ---------------------------------------------------

# A runner that cuts text by UTF-16 units (JavaScript's) splits 🦙 (U+1F999) into its two halves.
LLAMA_HIGH, LLAMA_LOW, LONE = "\ud83e", "\udd99", "\ud800"
SPLIT = ["Uma ", "lhama ", LLAMA_HIGH, LLAMA_LOW, " e meia ", LONE, "."]
JOINED = "Uma lhama 🦙 e meia \ufffd."


async def raw_request(room: Room, request: bytes, address: str = "127.0.0.1") -> bytes:
    """Send `request` as written (bytes aiohttp's client would not send, or HTTP/1.0 with no Host) from
    `address`, and read the whole answer."""
    host, port = urllib.parse.urlsplit(room.base).netloc.split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(address, 0))
    try:
        writer.write(request)
        async with asyncio.timeout(TIMEOUT_S):
            return await reader.read()
    finally:
        writer.close()


async def raw_http(room: Room, method: str, path: str, headers: bytes = b"", body: Any = None,
                   address: str = "127.0.0.1") -> tuple[int, Any]:
    """A request written byte by byte (aiohttp's client sends no header that is not UTF-8); (status, JSON)."""
    data = b"" if body is None else json.dumps(body).encode()          # \ud800 goes out as an escape
    if not headers.lower().startswith(b"host:"):
        headers = b"Host: %s\r\n%s" % (urllib.parse.urlsplit(room.base).netloc.encode(), headers)
    response = await raw_request(room, b"%s %s HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n%s\r\n%s" % (
        method.encode(), path.encode(), len(data), headers, data), address)
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def nothing_unwritable_logged(caplog: pytest.LogCaptureFixture) -> bool:
    """No ERROR, and every line the server logged can be written as UTF-8 (a log file would refuse it).

    aiohttp's access log, which copies headers as they came, is the test server's only: `main` turns it off.
    """
    for record in caplog.records:
        if record.name != "aiohttp.access":
            record.getMessage().encode()
    return errors_logged(caplog) == []


async def test_an_emoji_split_across_two_tokens_is_one_character_in_the_answer_the_exports_and_the_vote(
        room: Room, pin: str, config: gs.Config, server_log: pytest.LogCaptureFixture) -> None:
    """Halves of a UTF-16 pair in two tokens are joined when stored, a lone half is U+FFFD; screens get them as sent."""
    screen = await room.screen()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await bia.stream(1, SPLIT)
    await ana.stream(1, WORDS)
    await bia.sync()
    await ana.sync()
    await eventually(lambda: saved_token_count(config.database, "bia") == len(SPLIT), "the halves saved")
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {"ana": WORDS, "bia": SPLIT}
    late_screen = await room.screen()
    assert (await late_screen.recv("state_snapshot"))["liveTokens"]["bia"] == SPLIT
    for runner, words in ((ana, WORDS), (bia, SPLIT)):
        await runner.complete(1, len(words))
        await runner.sync()                             # no INTERNAL, no SERVER_BUSY before it
    saw = await screen.quiet()
    assert tokens_of(saw, "bia") == list(enumerate(SPLIT)) and tokens_of(saw, "ana") == list(enumerate(WORDS))
    await room.host.stop(rnd["id"])
    assert metrics_row(config.database, "bia")["generatedContent"] == JOINED
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS), "bia": JOINED}
    answers = {row["participant_id"]: row["generated_content"] for row in csv_rows((await export(room, "/export.csv"))[0])}
    tree = json.loads((await export(room, "/export-all.json"))[0])
    assert answers == {m["participantId"]: m["generatedContent"] for m in tree["rounds"][0]["metrics"]} == {
        "ana": "".join(WORDS), "bia": JOINED}
    assert nothing_unwritable_logged(server_log)


async def test_a_split_emoji_is_still_joined_after_kill_9_and_a_restart(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """The tokens table keeps each half, so the answer a restart rebuilds joins them again."""
    killed = server_process("--flush-interval", "0.2")
    room = Room(killed.start(), http)
    pin = await room.host.new_session()
    bia = await room.runner("bia", pin)
    rnd = await running_round(room, bia)
    await bia.stream(1, SPLIT)
    await eventually(lambda: saved_token_count(tmp_path / "arena.db", "bia") == len(SPLIT), "the halves saved")
    killed.stop(signal.SIGKILL)
    await room.close()
    kinds = db_rows(tmp_path / "arena.db", "SELECT typeof(content) AS kind FROM tokens ORDER BY seq")
    assert [row["kind"] for row in kinds] == ["text", "text", "blob", "blob", "text", "blob", "text"]

    restarted = server_process("--flush-interval", "0.2")
    room = Room(restarted.start(), http)
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {"bia": SPLIT}
    bia = Runner(await room.connect(), "bia")
    assert (await bia.register(pin))["resume"] == {"round": 1, "next_seq": len(SPLIT), "missing": []}
    await bia.complete(1, len(SPLIT))
    await bia.sync()
    await room.host.stop(rnd["id"])
    assert await responses_of(room, rnd) == {"bia": JOINED}
    await room.close()
    assert restarted.stop(signal.SIGTERM) == 0


async def test_lone_surrogates_in_every_websocket_field_are_stored_logged_and_shown_cleanly(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Halves of UTF-16 pairs in register, telao_register, complete and error fields: U+FFFD, no INTERNAL."""
    room = await make_room()
    pin = await room.host.new_session()
    watcher = await room.screen()
    screen = Peer(await room.connect_from(STRANGER))
    await screen.send({"type": "telao_register", "view": f"v{LONE}"})
    assert await screen.recv() == {"type": "registered_telao", "view": "v\ufffd"}
    ana, mallory = await room.runner("ana", pin), Runner(await room.connect_from(STRANGER), f"mal{LONE}")
    reply = await mallory.register(pin, nickname=f"N{LLAMA_HIGH}", runner=LLAMA_LOW, model=f"m{LONE}")
    assert (reply["type"], reply["participant_id"]) == ("registered", "mal\ufffd")
    await running_round(room, ana, mallory)
    await mallory.stream(1, ["x"])
    await mallory.send({"type": "error", "round": 1, "code": f"E{LONE}", "message": f"{LLAMA_LOW} oops"})
    await mallory.complete(1, 1, model_info={f"n{LONE}": [LLAMA_LOW, {"k": f"x{LONE}"}]})
    await mallory.sync()
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await ana.sync()
    assert tokens_of(await watcher.quiet(), "ana") == list(enumerate(WORDS))
    database = room.server.config.database
    assert db_rows(database, "SELECT id, nickname, runner, model FROM participants WHERE id != 'ana'") == [
        {"id": "mal\ufffd", "nickname": "N\ufffd", "runner": "\ufffd", "model": "m\ufffd"}]
    assert json.loads(metrics_row(database, "mal\ufffd")["modelInfo"]) == {"n\ufffd": ["\ufffd", {"k": "x\ufffd"}]}
    failed = db_rows(database, "SELECT metadata FROM event_logs WHERE eventType = 'generation_failed'")
    assert json.loads(failed[0]["metadata"]) == {"roundIndex": 1, "code": "E\ufffd", "message": "\ufffd oops"}
    assert (await room.host.call("GET", "/export-all.json"))["participants"][1]["id"] == "mal\ufffd"
    assert nothing_unwritable_logged(server_log)


async def test_lone_surrogates_and_bad_bytes_in_bodies_queries_and_headers_get_answers_not_500s(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Prompts, ids, the headers we read (not UTF-8, or halves of pairs): a clean answer, clean rows, no 500."""
    room = await make_room(host_addresses=("127.0.0.1/32",), trust_proxy=True)
    await room.host.new_session()
    status, rnd = await raw_http(room, "POST", "/rounds", body={"prompt": f"Diga {LONE}"})
    assert (status, rnd["prompt"]) == (200, "Diga \ufffd")
    bad = b"\xff\xfe\xed\xa0\x80"
    for method, path, headers, expect in (
            ("GET", "/session", b"Authorization: Bearer " + bad + b"\r\n", 200),            # a public route
            ("POST", "/rounds/stop", b"Authorization: Bearer " + bad + b"\r\n", 403),       # a host route
            ("GET", "/health", b"Origin: http://" + bad + b"\r\n", 200),
            ("GET", f"/votes/mine?roundId={rnd['id']}", b"X-Forwarded-For: " + bad + b"\r\n", 200),  # the voter
            ("GET", f"/rounds/{rnd['id']}/responses", b"Accept-Encoding: " + bad + b"\r\n", 200),
            ("GET", "/rounds/%ED%A0%80/responses", b"", 404),
            ("GET", "/session", b"Host: " + bad + b"\r\nOrigin: http://" + bad + b"\r\n", None),
            ("GET", f"/votes/mine?roundId={rnd['id']}&voterId=%ED%A0%80%FF", b"User-Agent: " + bad + b"\r\n", 200)):
        status, reply = await raw_http(room, method, path, headers, address=STRANGER)
        assert status == expect or expect is None and status < 500, (method, path, headers, reply)
        if "pin" in reply:
            raise AssertionError(f"the PIN went to a stranger: {reply}")
    status, reply = await raw_http(room, "POST", "/participants/kick", body={"participantId": LONE})
    assert (status, reply["error"]) == (404, "Participant \ufffd is not in this session")
    status, reply = await raw_http(room, "GET", "/export.csv?sessionId=%ED%A0%80")
    assert (status, reply["error"]) == (404, "Session not found")
    await a_full_round_works(room)
    assert db_rows(room.server.config.database, "SELECT prompt FROM rounds")[0] == {"prompt": "Diga \ufffd"}
    assert nothing_unwritable_logged(server_log)


async def test_bad_text_in_votes_never_fails_the_honest_votes_batched_with_them(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Lone halves in participantId, voterId, userAgent or a User-Agent that is not UTF-8, sent in the middle of
    a burst: each gets its own answer, every honest vote gets 200 and counts, the vote writer carries on."""
    room = await make_room()
    pin = await room.host.new_session()
    rnd = await room.host.new_round()
    ana = await room.runner("ana", pin)
    await room.host.start(rnd["id"])
    await answered(room, rnd, {"ana": ana})
    await room.host.stop(rnd["id"])
    vote = {"roundId": rnd["id"], "participantId": "ana", "score": 4}
    stranger = await room.http_from(STRANGER)

    async def honest(n: int) -> int:
        return (await stranger.status("POST", "/votes", {**vote, "voterId": f"phone-{n}"}))[0]
    attacks = [raw_http(room, "POST", "/votes", body={**vote, "participantId": f"ana{LONE}"}, address=STRANGER),
               raw_http(room, "POST", "/votes", body={**vote, "voterId": f"x{LONE}"}, address=STRANGER),
               raw_http(room, "POST", "/votes", body={**vote, "voterId": "ua", "userAgent": f"UA{LLAMA_LOW}"},
                        address=STRANGER),
               raw_http(room, "POST", "/votes", b"User-Agent: \xff\xfe\r\n", {**vote, "voterId": "raw"}, STRANGER)]
    async with asyncio.timeout(TIMEOUT_S):                  # every request gets an answer
        results = await asyncio.gather(*[honest(n) for n in range(30)], *attacks)
    assert results[:30] == [200] * 30
    assert [status for status, _ in results[30:]] == [404, 200, 200, 200]
    assert results[30][1]["error"] == "Participant not found"
    agents = {row["userAgent"] for row in db_rows(room.server.config.database, "SELECT userAgent FROM votes")}
    assert {"UA\ufffd", "\ufffd\ufffd"} <= agents
    board = (await room.host.call("GET", f"/scoreboard?roundId={rnd['id']}"))["scoreboard"]
    assert [(row["participant_id"], row["votes"]) for row in board] == [("ana", 33)]
    assert (await room.host.call("GET", "/health"))["database"] == "ok"
    assert nothing_unwritable_logged(server_log)


def test_every_input_field_has_a_bound_that_sqlite_and_the_exports_can_take() -> None:
    """Every field of every route and message: strings a length, numbers a range (integers within SQLite's
    64 bits), objects a size as JSON and a depth. A new field cannot forget its bound."""
    specs = [(f"{route.method} {route.path}", route.body + route.query) for route in gs.ROUTES]
    specs += [(kind, spec) for kind, (spec, _) in gs.ON_MESSAGE.items()]
    for where, spec in specs:
        for f in spec:
            if f.kind is str:
                assert f.high is not None, (where, f.name)
            elif f.kind in (int, float):
                assert f.low is not None and f.high is not None, (where, f.name)
                assert f.kind is float or -2**63 <= f.low <= f.high < 2**63, (where, f.name)
            elif f.kind is dict:
                assert f.high is not None and f.depth is not None, (where, f.name)
            else:
                assert f.kind is bool, (where, f.name)


@pytest.mark.parametrize(("fields", "error"), [
    ({"tokens": 2**70}, "'tokens' must be at most 1e+07"),
    ({"duration_ms": 1e300}, "'duration_ms' must be at most 8.64e+07"),
    ({"model_info": functools.reduce(lambda inner, _: {"a": inner}, range(600), {})},
     "'model_info' must be at most 8 levels deep"),
    ({"model_info": {"name": "x" * 10_000}}, "'model_info' must be at most 10000 characters as JSON"),
    ({"model_info": {"n": [math.nan]}}, "'model_info' must hold finite numbers only"),
], ids=["huge-int", "huge-float", "deep-object", "big-object", "nan-inside"])
async def test_values_past_their_bounds_are_refused_before_anything_stores_them(
        room: Room, pin: str, fields: dict[str, Any], error: str, server_log: pytest.LogCaptureFixture) -> None:
    """A complete with a value past its bound gets INVALID_INPUT; the next good one is saved, the export still works."""
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, WORDS)
    await ana.send({"type": "complete", "round": 1, **fields})
    assert await ana.recv("error") == ws_error(error)
    await ana.complete(1, len(WORDS))
    await ana.sync()
    await room.host.stop(rnd["id"])
    tree = await room.host.call("GET", "/export-all.json")
    assert [(m["generatedContent"], m["modelInfo"]) for m in tree["rounds"][0]["metrics"]] == [
        ("".join(WORDS), MODEL_INFO)]
    assert nothing_unwritable_logged(server_log)

# --- attack: host, PIN and seats ---------------------------------------------------

async def test_a_client_cannot_choose_its_address_through_a_trusted_proxy(make_room: Any) -> None:
    """X-Forwarded-For counts only behind --trust-proxy, and then the hop the proxy added is the caller; the
    hops the client wrote itself (left of the proxies' own) make no one the host, and changing them on every
    connection does not escape the wrong-PIN throttle."""
    for trust_proxy, status in [(False, 401), (True, 200)]:
        room = await make_room(host_addresses=("127.0.0.1/32",), trust_proxy=trust_proxy)
        proxied = await (await room.http_from(STRANGER)).status("POST", "/session",
                                                              headers={"X-Forwarded-For": "10.0.0.66, 127.0.0.1"})
        assert proxied[0] == status, trust_proxy
    for hops, header in [(1, "127.0.0.1, 10.0.0.66"), (2, "127.0.0.1, 10.0.0.66, 10.0.0.1")]:
        room = await make_room(host_addresses=("127.0.0.1/32",), trust_proxy=True, proxy_hops=hops)
        stranger = await room.http_from(STRANGER)
        status, body = await stranger.status("POST", "/session", headers={"X-Forwarded-For": header})
        assert (status, body["code"]) == (401, "UNAUTHORIZED"), header
    holder = await room.http_from(STRANGER, token=room.server.config.admin_token)
    pin = await holder.new_session()
    codes = []
    for n in range(room.server.config.pin_attempts_max + 2):
        ws = await room.connect_from(STRANGER, additional_headers={"X-Forwarded-For": f"127.0.0.1, 10.0.{n}.1, "
                                                                                      "10.0.0.66, 10.0.0.1"})
        codes.append((await Runner(ws, f"m{n}").register(f"{n:07d}"))["code"])
    assert codes == ["INVALID_PIN"] * room.server.config.pin_attempts_max + ["PIN_THROTTLED"] * 2
    proxied = await room.connect_from(STRANGER, additional_headers={"X-Forwarded-For": "10.0.0.7, 10.0.0.1"})
    assert (await Runner(proxied, "ana").register(pin))["type"] == "registered"     # another caller, same proxy


async def test_a_site_whose_name_points_here_gets_a_clear_403_on_every_route(make_room: Any) -> None:
    """DNS rebinding: requests naming another site in Host (no Origin) get 403 UNKNOWN_HOST on every route and
    on /ws; this machine's addresses and names, localhost, ALLOWED_HOSTS and clients sending no Host work."""
    room = await make_room(host_addresses=("127.0.0.1/32",), allowed_hosts=("Arena.Example.",))
    pin = await room.host.new_session()
    port = room.base.rsplit(":", 1)[1]
    routes = [("GET", "/session"), ("GET", "/api/session"), ("POST", "/session"), ("GET", "/export.csv"),
              ("GET", "/export-all.json"), ("GET", "/health"), ("GET", "/docs"), ("GET", "/client"),
              ("POST", "/votes"), ("GET", "/nowhere")]
    for foreign in (f"attacker.example:{port}", "attacker.example", "ATTACKER.EXAMPLE.", f"127.0.0.1.nip.io:{port}",
                    f"localhost.attacker.example:{port}", "10.0.0.66", f"[2001:db8::1]:{port}", "arena.example.org"):
        for method, path in routes:
            status, body = await room.host.status(method, path, headers={"Host": foreign})
            assert (status, body["code"]) == (403, "UNKNOWN_HOST"), (foreign, path)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await room.host.http.ws_connect(room.ws_url, headers={"Host": foreign})
        assert refused.value.status == 403, foreign
    assert (await room.host.call("GET", "/session"))["pin"] == pin               # nothing was replaced
    own = [*gs.machine_names(), *gs.lan_addresses()]
    for name in ("localhost", "LocalHost.", "127.0.0.1", "127.0.0.2", "[::1]", "arena.example", *own):
        for host in (name, f"{name}:{port}"):
            assert (await room.host.call("GET", "/session", headers={"Host": host}))["pin"] == pin, host
    async with room.host.http.ws_connect(room.ws_url, headers={"Host": f"localhost:{port}"}) as ws:
        await ws.send_json({"type": "telao_register"})
        assert (await ws.receive_json())["type"] == "registered_telao"
    answer = await raw_request(room, b"GET /session HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200") and pin.encode() in answer


async def guess_from(room: LiveRoom, address: str, guesses: list[str]) -> list[str]:
    """A stranger at `address` tries each guess in turn on one connection; the reply codes."""
    guesser = await room.runner_at(address, f"guesser-{address}")
    return [(await guesser.register(guess))["code"] for guess in guesses]


async def test_strangers_filling_the_wrong_pin_total_never_lock_out_the_right_pin(make_room: Any) -> None:
    """31 addresses, each within its own allowance, fill PIN_ATTEMPTS_TOTAL_MAX: they are refused from then on,
    while runners arriving with the right PIN are registered, and a guess from a new address is still only one."""
    room = await make_room(host_addresses=("127.0.0.1/32",))
    config = room.server.config
    pin = await room.host.new_session()
    strangers = [f"127.0.4.{n + 1}" for n in range(31)]
    per_address = [[f"{n:02d}{k:05d}" for k in range(config.pin_attempts_max)] for n in range(31)]  # 7 digits
    codes = await asyncio.gather(*(guess_from(room, a, g) for a, g in zip(strangers, per_address)))
    assert sorted({code for c in codes for code in c}) == ["INVALID_PIN", "PIN_THROTTLED"]
    assert sum(c.count("INVALID_PIN") for c in codes) == config.pin_attempts_total_max
    assert room.server.gate.pin_total_throttle.wait_s("") > 0
    ana = await room.runner_at("127.0.5.1", "ana", pin)
    crowd = await asyncio.gather(*(room.runner_at("127.0.5.2", f"r{n}") for n in range(12)))
    assert {r["type"] for r in await asyncio.gather(*(r.register(pin) for r in crowd))} == {"registered"}
    for address in strangers[:3]:
        assert await guess_from(room, address, [pin]) == ["PIN_THROTTLED"]
    assert await guess_from(room, "127.0.6.1", ["0000000", "0000001"]) == ["INVALID_PIN", "PIN_THROTTLED"]
    assert await guess_from(room, "127.0.6.2", ["\ud800"]) == ["INVALID_PIN"]         # valid JSON, not UTF-8
    await running_round(room, ana, *crowd)


def club_database(path: Path, pin_hash: bytes) -> None:
    """A database from the club's server, which keeps only the PIN's hash (its `pin` column is the default)."""
    conn = gs.open_db(path)
    with conn:
        conn.execute("INSERT INTO sessions (id, createdAt, pinHash, status) VALUES ('club', 1, ?, 'active')",
                     (pin_hash.decode(),))
    conn.close()


async def test_before_the_pin_is_known_bcrypt_checks_one_pin_at_a_time(make_room: Any, config: gs.Config,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a club database (no plain PIN), guesses from 31 addresses at once never run two bcrypt checks together;
    past the queue they are refused with PIN_THROTTLED; 12 runners with the right PIN at once cost one check."""
    club_database(config.database, gs.bcrypt.hashpw(b"424242", gs.bcrypt.gensalt(4)))
    checkpw, running, most, calls = gs.bcrypt.checkpw, [0], [0], []

    def watched(candidate: bytes, hashed: bytes) -> bool:
        running[0] += 1                     # no lock: if two threads ever overlapped, `most` would show it
        most[0] = max(most[0], running[0])
        calls.append(candidate)
        try:
            time.sleep(0.02)                # cost 12 takes ~0.25 s: guesses pile up behind the one running
            return checkpw(candidate, hashed)
        finally:
            running[0] -= 1
    monkeypatch.setattr(gs.bcrypt, "checkpw", watched)
    room = await make_room(host_addresses=("127.0.0.1/32",))
    guessers = [await room.runner_at(f"127.0.4.{n + 1}", f"m{n}") for n in range(31)]
    replies = await asyncio.gather(*(g.register(f"{n:07d}") for n, g in enumerate(guessers)))
    codes = [reply["code"] for reply in replies]
    assert codes.count("INVALID_PIN") >= gs.PIN_CHECKS_WAITING and set(codes) == {"INVALID_PIN", "PIN_THROTTLED"}
    assert all("busy checking other PINs" in r["message"] for r in replies if r["code"] == "PIN_THROTTLED")
    assert most[0] == 1 and len(calls) == codes.count("INVALID_PIN") + 1        # +1: the stored PIN, at start
    assert await guess_from(room, "127.0.6.2", ["\ud800", "4\x002"]) == ["INVALID_PIN"] * 2
    calls.clear()
    crowd = await asyncio.gather(*(room.runner_at("127.0.5.2", f"r{n}") for n in range(12)))
    assert {r["type"] for r in await asyncio.gather(*(r.register("424242") for r in crowd))} == {"registered"}
    assert calls == [b"424242"]


async def test_runners_reconnecting_at_once_after_a_restart_are_not_throttled(
        server_process: Any, http: aiohttp.ClientSession) -> None:
    """After a restart, 15 runners from one address registering at once with the right PIN all get in;
    15 wrong PINs at once from another address are still cut at PIN_ATTEMPTS_MAX."""
    first = server_process("--host-addresses", "127.0.0.1/32")
    room = Room(first.start(), http)
    pin = await room.host.new_session()
    first.stop()
    room = Room(server_process("--host-addresses", "127.0.0.1/32").start(), http)

    async def runner_at(address: str, participant_id: str) -> Runner:
        ws = await connect(room.ws_url, local_addr=(address, 0))
        room.connections.append(ws)
        return Runner(ws, participant_id)
    laptops = [await runner_at("127.0.0.5", f"r{n}") for n in range(15)]
    guessers = [await runner_at(STRANGER, f"m{n}") for n in range(15)]
    replies = await asyncio.gather(*(r.register(pin) for r in laptops),
                                   *(g.register(f"{n:07d}") for n, g in enumerate(guessers)))
    assert [r["type"] for r in replies[:15]] == ["registered"] * 15
    codes = [r["code"] for r in replies[15:]]
    assert sorted(codes) == ["INVALID_PIN"] * 10 + ["PIN_THROTTLED"] * 5
    await room.close()


async def test_a_disconnected_id_is_taken_back_only_by_its_runner(make_room: Any, config: gs.Config) -> None:
    """Once ana has left, her id (and the nickname on her voted answer) is refused to anyone else; her laptop
    comes back without a secret, any address with her latest resume_secret; the host can release the id."""
    room = await make_room(host_addresses=("127.0.0.1/32",))
    pin = await room.host.new_session()
    ana = await room.runner_at("127.0.0.5", "ana")
    first = await ana.register(pin)
    rnd = await running_round(room, ana)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "ana", 5, "phone-1")
    await ana.ws.close()
    await eventually(lambda: "ana" not in room.server.hub.by_participant, "ana's connection forgotten")
    impostor = await room.runner_at(STRANGER, "ana")
    for extra in ({}, {"resume_secret": "guess"}, {"resume_secret": None}, {"resume_secret": "\udc80"}):
        refused = await impostor.register(pin, "Pwned", **extra)
        assert refused["code"] == "ID_IN_USE" and "release" in refused["message"], extra
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert [a["nickname"] for a in answers] == ["Ana"]
    back = await (await room.runner_at("127.0.0.5", "ana")).register(pin)          # the club's client: no secret
    assert back["type"] == "registered" and back["resume_secret"] != first["resume_secret"]
    moved = await room.runner_at("127.0.0.6", "ana")                               # new address, with the secret
    assert (await moved.register(pin, resume_secret=back["resume_secret"]))["type"] == "registered"
    stale = await room.runner_at("127.0.0.7", "ana")
    assert (await stale.register(pin, resume_secret=first["resume_secret"]))["code"] == "ID_IN_USE"
    rows = db_rows(config.database, "SELECT resumeHash, lastAddress FROM participants WHERE id = 'ana'")
    assert rows[0]["lastAddress"] == "127.0.0.6" and len(rows[0]["resumeHash"]) == 64
    files = list(config.database.parent.glob(config.database.name + "*"))
    assert not any(back["resume_secret"].encode() in path.read_bytes() for path in files)
    stranger = await room.http_from(STRANGER)
    assert (await stranger.status("POST", "/participants/release", {"participantId": "ana"}))[0] == 401
    assert await room.host.call("POST", "/participants/release", {"participantId": "ana"}) == {
        "status": "ok", "participant_id": "ana", "connected": True}
    assert (await room.host.status("POST", "/participants/release", {"participantId": "nobody"}))[0] == 404
    assert (await impostor.register(pin))["code"] == "ID_IN_USE"               # ana is still connected
    await moved.ws.close()
    await eventually(lambda: "ana" not in room.server.hub.by_participant, "ana's connection forgotten")
    assert (await impostor.register(pin))["type"] == "registered"
    export = await room.host.call("GET", "/export-all.json")
    assert "resumeHash" not in json.dumps(export) and "lastAddress" not in json.dumps(export)


async def test_resume_secrets_and_addresses_survive_a_restart(server_process: Any,
                                                             http: aiohttp.ClientSession) -> None:
    """After a restart, ids are still their runners': strangers are refused, ana's laptop (by its address) and
    bia's secret (from a new address) get in."""
    first = server_process()
    room = Room(first.start(), http)
    pin = await room.host.new_session()

    async def runner_at(address: str, participant_id: str) -> Runner:
        ws = await connect(room.ws_url, local_addr=(address, 0))
        room.connections.append(ws)
        return Runner(ws, participant_id)
    assert (await (await runner_at("127.0.0.5", "ana")).register(pin))["type"] == "registered"
    secret = (await (await runner_at("127.0.0.6", "bia")).register(pin))["resume_secret"]
    await room.close()
    first.stop()
    room = Room(server_process().start(), http)
    for name in ("ana", "bia"):
        assert (await (await runner_at(STRANGER, name)).register(pin))["code"] == "ID_IN_USE"
    assert (await (await runner_at("127.0.0.5", "ana")).register(pin))["type"] == "registered"
    assert (await (await runner_at("127.0.0.7", "bia")).register(pin, resume_secret=secret))["type"] == "registered"
    await room.close()


async def test_an_older_database_gets_the_new_columns_and_keeps_its_rows(make_room: Any, config: gs.Config) -> None:
    """A schema-1 database (no resumeHash, lastAddress) is brought up to date at start-up; its rows stay."""
    conn = gs.open_db(config.database)
    with conn:
        conn.execute("INSERT INTO sessions (id, createdAt, pinHash) VALUES ('old', 1, 'x')")
        conn.execute("INSERT INTO participants (id, sessionId, nickname, runner, model, createdAt, lastSeen) "
                     "VALUES ('ana', 'old', 'Ana', 'ollama', 'm', 1, 1)")
        conn.execute("ALTER TABLE participants DROP COLUMN resumeHash")
        conn.execute("ALTER TABLE participants DROP COLUMN lastAddress")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    room = await make_room()
    pin = await room.host.new_session()
    assert (await room.runner_at(STRANGER, "ana", pin)) is not None      # no one held it yet
    assert db_rows(config.database, "PRAGMA user_version") == [{"user_version": gs.SCHEMA_VERSION}]
    assert db_rows(config.database, "SELECT nickname, lastAddress FROM participants") == [
        {"nickname": "Ana", "lastAddress": STRANGER}]


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
    """Tokens of a runner that never completes become its answer at stop (rescued = 1), shown for voting and
    voted like any other."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await bia.stream(1, ["Sim."])
    await bia.complete(1, 1)
    await ana.stream(1, WORDS)
    await eventually(lambda: saved_token_count(config.database, "ana") == len(WORDS), "ana's tokens saved")
    ana.ws.transport.abort()
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert {a["participant_id"]: a["generated_content"] for a in answers} == {"ana": "".join(WORDS), "bia": "Sim."}
    await room.host.vote(rnd["id"], "ana", 5, "v1")
    board = (await room.host.call("GET", "/scoreboard"))["scoreboard"]
    assert [(r["participant_id"], r["votes"], r["tokens"]) for r in board] == [("ana", 1, len(WORDS)), ("bia", 0, 1)]
    assert (board[0]["generated_content"], board[0]["avg_score"]) == ("".join(WORDS), 5.0)
    assert isinstance(board[0]["tps_avg"], float)
    row = metrics_row(config.database, "ana")
    assert (row["rescued"], row["generatedContent"], row["tokens"], row["tokensReceived"]) == (
        1, "".join(WORDS), len(WORDS), len(WORDS))
    assert metrics_row(config.database, "bia")["rescued"] == 0


async def test_a_new_session_mid_round_sends_old_runners_away_and_keeps_old_data(room: Room, pin: str,
                                                                                 config: gs.Config) -> None:
    """Old runners get SESSION_ENDED and a close; screens get the new session's snapshot and no one leaving; the
    old round ends with its answers (the unfinished one rescued) and stays exportable; the old PIN is gone."""
    screen = await room.screen()
    old_session = (await screen.recv("state_snapshot"))["session"]["id"]
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, ["meio"])
    await ana.sync()
    await bia.sync()
    created = await room.host.call("POST", "/session")
    assert created["disconnected_participants"] == 2
    for runner in (ana, bia):
        assert await runner.recv() == {"type": "error", "message": "A new session started; reconnect with the new PIN.",
                                       "code": "SESSION_ENDED"}
        assert await runner.closed() == (1000, "session ended")
    snapshot = await screen.recv("state_snapshot")
    assert (snapshot["session"]["id"], snapshot["round"], snapshot["participants"]) == (created["id"], None, [])
    assert "participant_disconnected" not in [m["type"] for m in await screen.quiet()]
    assert await responses_of(room, rnd) == {"ana": "".join(WORDS), "bia": "meio"}
    [old_round] = (await room.host.call("GET", f"/export-all.json?sessionId={old_session}"))["rounds"]
    assert {m["participantId"]: (m["generatedContent"], m["rescued"]) for m in old_round["metrics"]} == {
        "ana": ("".join(WORDS), 0), "bia": ("meio", 1)}
    assert await room.host.status("POST", "/rounds/stop", {"roundId": rnd["id"]}) == (
        409, {"error": "That round belongs to an earlier session", "code": "CONFLICT"})
    old = db_rows(config.database, "SELECT status FROM sessions ORDER BY createdAt")
    assert [s["status"] for s in old] == ["ended", "active"]
    [old_row] = db_rows(config.database, "SELECT endedAt, votingStatus FROM rounds")
    assert old_row["endedAt"] is not None and old_row["votingStatus"] == "closed"
    late = await room.runner("ana")
    assert await late.register(pin) == {"type": "error", "message": "Invalid PIN.", "code": "INVALID_PIN"}
    assert (await late.register(created["pin"]))["session_id"] == created["id"]


def saved_token_count(database: Path, participant_id: str) -> int:
    return db_rows(database, "SELECT COUNT(*) AS n FROM tokens WHERE participantId = ?", participant_id)[0]["n"]


async def test_sigkill_mid_round_loses_only_unsaved_tokens_and_the_round_runs_on(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """kill -9 mid-round, restart on the same file: the round still runs with the saved tokens, each runner's
    resume says where to continue, and the answers are finished, voted and exported whole."""
    database = tmp_path / "arena.db"
    words = [f"w{n} " for n in range(40)]
    killed = server_process("--flush-interval", "0.2")
    room = Room(killed.start(), http)
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await ana.stream(1, words[:20])
    await bia.stream(1, words[:20])
    await eventually(lambda: saved_token_count(database, "ana") + saved_token_count(database, "bia") == 40, "a flush")
    await ana.stream(1, words[20:25], start=20)                    # accepted; maybe not saved yet
    await ana.sync()
    assert await asyncio.to_thread(killed.stop, signal.SIGKILL) == -signal.SIGKILL
    await room.close()

    restarted = server_process("--flush-interval", "0.2")
    room = Room(restarted.start(), http)
    current = await room.host.call("GET", "/rounds/current")
    assert {**current, "liveTokens": None} == {**rnd, "liveTokens": None}
    assert (await room.host.call("GET", "/presence"))["participants"] == []
    assert current["liveTokens"]["bia"] == words[:20]
    assert current["liveTokens"]["ana"] == words[:len(current["liveTokens"]["ana"])]
    assert 20 <= len(current["liveTokens"]["ana"]) <= 25
    screen = await room.screen()
    assert (await screen.recv("state_snapshot"))["liveTokens"] == current["liveTokens"]
    for name in ("ana", "bia"):
        runner = await room.runner(name)
        registered = await runner.register(pin)
        resume = registered["resume"]
        assert registered == {"type": "registered", "session_id": rnd["sessionId"], "participant_id": name,
                              "resume_secret": SECRET, "resume": {"round": 1, "next_seq": AMOUNT, "missing": []}}
        await runner.stream(1, words[resume["next_seq"]:], start=resume["next_seq"])
        await runner.complete(1, len(words))
        assert (await screen.recv("completion"))["participant_id"] == name
    await room.host.stop(rnd["id"])
    for voter in ("v1", "v2", "v3"):
        await room.host.vote(rnd["id"], "ana", 4, voter)
        await room.host.vote(rnd["id"], "bia", 2, voter)
    board = (await room.host.call("GET", "/scoreboard"))["scoreboard"]
    assert [(r["participant_id"], r["votes"], r["total_score"]) for r in board] == [("ana", 3, 12), ("bia", 3, 6)]
    exported = await room.host.call("GET", "/export-all.json")
    assert {m["participantId"]: m["generatedContent"] for m in exported["rounds"][0]["metrics"]} == {
        "ana": "".join(words), "bia": "".join(words)}
    assert [e["eventType"] for e in exported["events"]].count("round_started") == 1
    rows = csv_rows((await export(room, "/export.csv"))[0])
    assert [(r["participant_id"], r["generated_content"], r["tokens_received"], r["seq_gaps"], r["votes"],
             r["rescued"]) for r in rows] == [(name, "".join(words), "40", "0", "3", "0") for name in ("ana", "bia")]
    await room.close()
    assert restarted.stop(signal.SIGTERM) == 0


async def test_sigterm_closes_every_socket_with_1001_and_saves_every_token(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """On SIGTERM runners and screens get 1001 (going away), the exit code is 0 and every token is on disk, so a
    restart resumes the round with all of them (and a kick still holds)."""
    database = tmp_path / "arena.db"
    process = server_process("--flush-interval", "60")             # no flush until the exit
    room = Room(process.start(), http)
    pin = await room.host.new_session()
    await room.runner("zed", pin)
    await room.host.call("POST", "/participants/kick", {"participantId": "zed"})
    screen = await room.screen()
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    words = [f"w{n} " for n in range(30)]
    await ana.stream(1, words)
    assert tokens_of([await screen.recv("token_update") for _ in words], "ana") == list(enumerate(words))
    assert saved_token_count(database, "ana") == 0
    assert await asyncio.to_thread(process.stop, signal.SIGTERM) == 0
    assert await ana.closed() == (1001, "server shutdown")
    assert await screen.closed() == (1001, "server shutdown")
    rows = db_rows(database, "SELECT seq, content FROM tokens WHERE participantId = 'ana' ORDER BY seq")
    assert [(row["seq"], row["content"]) for row in rows] == list(enumerate(words))
    assert db_rows(database, "SELECT connected FROM participants") == [{"connected": 0}] * 2
    await room.close()

    room = Room(server_process().start(), http)
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {"ana": words}
    assert (await (await room.runner("zed")).register(pin))["code"] == "KICKED"
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
    await eventually(lambda: saved_token_count(room.server.config.database, "ana") == 50, "the first tokens saved")
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
    await eventually(lambda: saved_token_count(room.server.config.database, "ana") == 300, "the backlog saved")
    assert (await room.host.call("GET", "/health"))["database"] == "ok"
    await ana.complete(1, len(words))
    await screen.recv("completion")
    await room.host.stop(rnd["id"])
    answers = (await room.host.call("GET", f"/rounds/{rnd['id']}/responses"))["responses"]
    assert answers[0]["generated_content"] == "".join(words)


# Both limits sit far above the burst a reading screen can lag behind by (a few hundred 2 kB tokens).
@pytest.mark.parametrize(("limits", "why"), [
    ({"peer_queue_limit": 512}, r"512 messages queued"),
    ({"peer_queue_bytes": 1024 * 1024}, r"\d+ bytes queued"),
], ids=["messages", "characters"])
async def test_a_screen_that_stops_reading_is_dropped_and_slows_no_one(
        make_room: Any, server_log: pytest.LogCaptureFixture, limits: dict[str, int], why: str) -> None:
    """A frozen phone's queue fills and it is cut off once; the runner and a reading screen get every token."""
    room = await make_room(max_answer_chars=10**7, max_round_chars=10**7, **limits)
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


# --- attack: writers and transactions -------------------------------------------------

def events_of(database: Path, session_id: str) -> list[tuple[str, str | None]]:
    return [(e["eventType"], e["targetId"]) for e in
            db_rows(database, "SELECT eventType, targetId FROM event_logs WHERE sessionId = ?", session_id)]


async def test_every_acknowledged_action_has_its_event_row_even_after_kill_9(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """kill -9 right after each acknowledged action, then restart: the action's event row is on disk, every time."""
    database = tmp_path / "arena.db"

    async def then_kill(act: Callable[[Room], Any]) -> Any:
        process = server_process()
        room = Room(process.start(), http)
        try:
            return await act(room)
        finally:
            process.stop(signal.SIGKILL)
            await room.close()

    async def runner_in(room: Room) -> Runner:
        return await room.runner("ana", pin)

    async def start(room: Room) -> None:
        ana = await runner_in(room)
        await room.host.start(rnd["id"])
        await ana.recv("challenge")

    async def answer_and_stop(room: Room) -> None:
        ana = await runner_in(room)
        await ana.stream(rnd["index"], WORDS)
        await ana.complete(rnd["index"], len(WORDS))
        await ana.sync()
        await room.host.stop(rnd["id"])

    def host_step(step: str) -> Callable[[Room], Any]:
        return lambda room: room.host.call("POST", f"/rounds/{rnd['id']}/{step}")

    for _ in range(2):
        pin = await then_kill(lambda room: room.host.new_session())
        [session] = db_rows(database, "SELECT id FROM sessions WHERE status = 'active'")
        rnd = await then_kill(lambda room: room.host.new_round())
        await then_kill(runner_in)
        await then_kill(start)
        await then_kill(answer_and_stop)
        await then_kill(lambda room: room.host.vote(rnd["id"], "ana", 5, "v1"))
        for step in ("close-voting", "reveal", "reveal-next"):
            await then_kill(host_step(step))
        await then_kill(lambda room: room.host.call("POST", "/participants/kick", {"participantId": "ana"}))
        recorded = events_of(database, session["id"])
        for event in [("session_created", None), ("round_created", rnd["id"]), ("participant_registered", "ana"),
                      ("round_started", rnd["id"]), ("generation_completed", rnd["id"]), ("round_stopped", rnd["id"]),
                      ("voting_opened", rnd["id"]), ("vote_cast", "ana"), ("voting_closed", rnd["id"]),
                      ("reveal_started", rnd["id"]), ("position_revealed", rnd["id"]),
                      ("participant_kicked", "ana")]:
            assert event in recorded, (event, recorded)
        tokens = db_rows(database, "SELECT COUNT(*) AS n FROM tokens WHERE roundId = ?", rnd["id"])[0]["n"]
        assert (("first_token_received", None) in recorded) == (tokens > 0)       # saved with its token


# Loaded by the server process at start-up (as sitecustomize): its sqlite connections fail, with an
# exception of a kind the server was never told about, on any statement given a value holding MARK.
SABOTAGE = '''
import sqlite3

MARK = "\\N{BOMB}"


class Sabotage(Exception):
    pass


def check(values):
    if any(isinstance(v, str) and MARK in v for v in (values.values() if isinstance(values, dict) else values)):
        raise Sabotage("this value cannot be stored")


class SabotagedConnection(sqlite3.Connection):
    def execute(self, sql, values=()):
        check(values)
        return super().execute(sql, values)

    def executemany(self, sql, rows):
        rows = list(rows)
        for values in rows:
            check(values)
        return super().executemany(sql, rows)


connect = sqlite3.connect
sqlite3.connect = lambda *args, **kwargs: connect(*args, factory=SabotagedConnection, **kwargs)
'''
BOMB = "\N{BOMB}"


async def test_writers_set_aside_what_they_cannot_write_and_lose_nothing_else(
        server_process: Any, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values no statement can store, sent among honest ones: each is set aside alone and named on /health and in
    the log; every other token, vote and event is saved, the writers go on, and SIGTERM saves all and exits 0."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SABOTAGE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    database = tmp_path / "arena.db"
    process = server_process("--flush-interval", "60")             # one batch, written when the host asks
    room = Room(process.start(), http)
    pin = await room.host.new_session()
    screen = await room.screen()
    ana, bia, eve = [await room.runner(name, pin) for name in ("ana", "bia", "eve")]
    rnd = await running_round(room, ana, bia, eve)
    sent = {"ana": WORDS, "bia": WORDS[::-1], "eve": ["a ", f"{BOMB} ", "b "]}
    for runner in (ana, eve, bia):
        await runner.stream(1, sent[runner.participant_id])
    shown = [await screen.recv("token_update") for _ in range(13)]
    for name, words in sent.items():                               # screens get every token as sent
        assert tokens_of(shown, name) == list(enumerate(words))
    await room.host.call("GET", "/export.csv")                      # the batch is written
    saved = {name: [row["content"] for row in db_rows(
        database, "SELECT content FROM tokens WHERE participantId = ? ORDER BY seq", name)] for name in sent}
    assert saved == {"ana": WORDS, "bia": WORDS[::-1], "eve": ["a ", "b "]}
    health = await room.host.call("GET", "/health")
    assert health["refused"] == ["tokens: could not write token 1 of 'eve', set it aside: "
                                 "Sabotage: this value cannot be stored"]
    assert "Sabotage" in health["writers"]["tokens"] and "Sabotage" in health["database"]

    await ana.stream(1, ["mais"], start=len(WORDS))                # the next batch is written, and clean
    await ana.sync()
    await room.host.call("GET", "/export.csv")
    assert saved_token_count(database, "ana") == len(WORDS) + 1
    assert (await room.host.call("GET", "/health"))["writers"]["tokens"] == "ok"
    await ana.complete(1, len(WORDS) + 1)
    await bia.complete(1, len(WORDS))
    await bia.sync()
    await room.host.stop(rnd["id"])                                 # eve's answer holds the bomb: set aside
    health = await room.host.call("GET", "/health")
    assert health["refused"][-1] == ("answers: could not write the answer of 'eve', set it aside: "
                                     "Sabotage: this value cannot be stored")
    vote = {"roundId": rnd["id"], "participantId": "ana", "score": 5}
    votes = await asyncio.gather(*[room.host.status("POST", "/votes", {**vote, "voterId": f"v{n}"}) for n in range(6)],
                                 room.host.status("POST", "/votes", {**vote, "voterId": "x", "userAgent": BOMB}))
    assert [status for status, _ in votes] == [200] * 6 + [500] and votes[-1][1]["code"] == "INTERNAL"
    assert len(db_rows(database, "SELECT id FROM votes")) == 6
    await eve.send({"type": "error", "round": 1, "code": "GENERATION_FAILED", "message": BOMB})
    health = await get_when(room, "/health", lambda h: h["writers"]["events"] != "ok")
    assert health["refused"][-1] == ("events: could not write record_events, set it aside: "
                                     "Sabotage: this value cannot be stored")

    rnd = await running_round(room, ana, bia, prompt="De novo")
    await ana.stream(2, WORDS)
    await bia.stream(2, WORDS)
    await bia.sync()
    process.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.process.wait, 10) == 0
    log_text = process.process.stderr.read()
    process.process.stdout.close()
    process.process.stderr.close()
    assert "tokens writer: could not write token 1 of 'eve', set it aside: Sabotage" in log_text
    assert "answers writer: could not write the answer of 'eve', set it aside: Sabotage" in log_text
    assert [row["content"] for row in db_rows(database, "SELECT content FROM tokens WHERE roundId = ? ORDER BY "
                                              "participantId, seq", rnd["id"])] == WORDS + WORDS
    answers = db_rows(database, "SELECT participantId, generatedContent FROM metrics ORDER BY participantId")
    assert answers == [{"participantId": "ana", "generatedContent": "".join(WORDS) + "mais"},
                       {"participantId": "bia", "generatedContent": "".join(WORDS[::-1])}]
    await room.close()


async def test_a_periodic_task_outlives_its_failures() -> None:
    """A failing turn of a background loop is reported, the loop goes on, and the report clears once it works."""
    writers, turns, broken = gs.Writers(), [], [True]

    async def heartbeat() -> None:
        turns.append(broken[0])
        if broken[0]:
            raise LookupError("no such peer")
    loop = asyncio.create_task(gs.repeat(0.001, heartbeat, "heartbeat", writers))
    try:
        await eventually(lambda: len(turns) > 2, "more turns after the first failure")
        assert writers.report()["heartbeat"] == "LookupError: no such peer"
        broken[0] = False
        await eventually(lambda: writers.report()["heartbeat"] == "ok", "working again")
    finally:
        loop.cancel()


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
    room = await make_room(max_answer_tokens=5)
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
    """Past RATE_LIMIT_MAX a phone gets 429 with Retry-After; other phones, the host, /health and the docs
    carry on."""
    room = await make_room(host_addresses=("127.0.0.1/32",), rate_limit_max=20)
    await room.host.new_session()
    flooder = await room.http_from(STRANGER)
    statuses = [(await flooder.status("GET", "/presence"))[0] for _ in range(25)]
    assert statuses == [200] * 20 + [429] * 5
    async with flooder.http.get(room.base + "/api/scoreboard") as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) > 0
        assert (await response.json())["code"] == "TOO_MANY_REQUESTS"
    for path in ("/health", "/docs", "/openapi.json"):
        assert (await flooder.status("GET", path))[0] == 200, path
    assert (await (await room.http_from("127.0.0.3")).status("GET", "/presence"))[0] == 200
    for _ in range(25):
        await room.host.call("GET", "/presence")


async def test_a_finished_round_leaves_memory_once_it_is_saved(make_room: Any) -> None:
    """When the next round starts, the last one's buffers are on disk and no longer referenced anywhere."""
    room = await make_room(save_interval_s=60)                     # only the start's own flush saves tokens
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    first = await running_round(room, ana, bia)
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await bia.stream(1, WORDS[:2])                                  # bia never completes: rescued at stop
    await eventually(lambda: len(room.server.arena.unsaved) == len(WORDS) + 2, "tokens accepted")
    await room.host.stop(first["id"])
    live = room.server.arena.rounds[1]
    refs = [weakref.ref(live)] + [weakref.ref(gen) for gen in live.answers.values()]
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
    assert (hub.peers, hub.by_participant, hub.screens) == (set(), {}, set())
    assert [ref() for ref in refs] == [None] * 12


# --- attack: connections and the event loop ---------------------------------------------

class Slowloris:
    """A laptop holding `slots` connections from one address, each sending a request's headers a line
    every tenth of a second, forever; it reopens every connection the server ends and sorts how each ended."""

    def __init__(self, base: str, address: str, slots: int) -> None:
        self.port = urllib.parse.urlsplit(base).port
        self.address = address
        self.refused = 0                # answered 503 TOO_MANY_CONNECTIONS at once
        self.timed_out = 0              # closed with no answer while still trickling
        self.tasks = [asyncio.create_task(self.hold()) for _ in range(slots)]

    async def hold(self) -> None:
        while True:
            answer = b""
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.address, 0))
            except OSError:
                await asyncio.sleep(0.05)       # the listener's backlog is full: a laptop would retry too
                continue
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            try:
                while not answer:
                    try:
                        # Not wait_for: on Python 3.11 it can swallow the cancel that stop() sends (when the
                        # read completes at that moment), and the laptop would trickle on for ever.
                        async with asyncio.timeout(0.1):
                            answer = await reader.read(1024) or b"closed"
                    except TimeoutError:
                        writer.write(b"X-Slow: 1\r\n")
            except ConnectionError:
                pass
            finally:
                writer.close()
            if answer.startswith(b"HTTP/1.1 503") and b"TOO_MANY_CONNECTIONS" in answer:
                self.refused += 1
            elif answer == b"closed":
                self.timed_out += 1
            await asyncio.sleep(0.05)           # never a tight loop on the test's own event loop, whatever ended it

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.gather(*self.tasks, return_exceptions=True)


def test_the_descriptor_limit_is_raised_to_the_hard_limit_at_start_up(server_process: Any) -> None:
    """Every connection is a descriptor: the server raises the soft limit (often 1024; 256 on macOS) to the
    hard one, and its banner says what it is."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip("needs a finite hard limit above 512")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))      # the server process inherits it
    try:
        server = server_process("--connections-per-address", "30")
        server.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert server.process.stdout.readline().strip() == (
        f"connections   {hard} open files; 30 per address (the host's: any number)")
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    assert re.search(rf"^Max open files +{hard} +{hard} ", limits, re.M)


async def test_strangers_on_many_addresses_cannot_use_up_the_open_files(
        server_process: Any, http: aiohttp.ClientSession) -> None:
    """With 192 open files, four addresses trickling 50 connections each are refused once the server holds all
    it can spare for strangers; the host is served, a connected runner streams on, and the log stays short."""
    server = server_process("--host-addresses", "127.0.0.1/32", "--header-timeout", "60", open_files=192)
    room = Room(server.start(), http)
    assert server.process.stdout.readline().startswith("  connections   192 open files;")
    pin = await room.host.new_session()
    screen = await room.screen()
    ana = await room.runner_at("127.0.0.9", "ana", pin)
    attacks = [Slowloris(room.base, f"127.0.0.{n}", 50) for n in (2, 3, 4, 5)]
    try:
        await eventually(lambda: sum(attack.refused for attack in attacks) > 100, "strangers refused")
        async with asyncio.timeout(TIMEOUT_S):
            assert (await room.host.call("GET", "/health"))["status"] == "ok"
        await running_round(room, ana)
        words = [f"w{n} " for n in range(200)]
        await ana.stream(1, words)
        assert tokens_of([await screen.recv("token_update") for _ in words], "ana") == list(enumerate(words))
    finally:
        for attack in attacks:
            await attack.stop()
    await room.close()
    server.process.send_signal(signal.SIGTERM)
    log = server.process.stderr.read().splitlines()
    assert server.stop() == 0
    assert len(log) < 20 and not [line for line in log if "Traceback" in line or " ERROR " in line], log
    assert [line for line in log if "CONNECTION_REFUSED" in line and "all the connections it can" in line]


def test_asyncio_socket_errors_make_a_line_every_few_seconds(caplog: pytest.LogCaptureFixture) -> None:
    """Out of descriptors, asyncio reports every failed accept: one short line per RARE_LOG_S, no traceback;
    anything else still reaches asyncio's own handler."""
    loop = asyncio.new_event_loop()
    try:
        handle = gs.quiet_socket_errors(gs.RareLog(gs.RARE_LOG_S))
        for _ in range(1000):
            handle(loop, {"message": "socket.accept() out of system resource",
                          "exception": OSError(24, "Too many open files")})
        handle(loop, {"message": "something else", "exception": ValueError("a bug")})
    finally:
        loop.close()
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records][:1] == [(
        "WARNING", "SOCKET_ERROR socket.accept() out of system resource: [Errno 24] Too many open files", None)]
    assert [r.getMessage() for r in caplog.records][1:] == ["something else"]


async def test_a_cancel_that_comes_as_a_wait_ends_is_not_lost() -> None:
    """The pong join waits for, a bot waiting to be registered again, a request's body: each wait ends on a
    cancel even when what it awaits completes in the same turn, where wait_for (Python 3.10, 3.11) returns
    the result and the task being stopped runs on."""
    arrived = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(gs.within(arrived, TIMEOUT_S))
    await asyncio.sleep(0)
    arrived.set_result("pong")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(asyncio.TimeoutError):
        await gs.within(asyncio.sleep(1), 0.01)
    assert await gs.within(asyncio.sleep(0, "done"), TIMEOUT_S) == "done"


async def test_one_address_trickling_headers_cannot_take_the_server_off_the_air(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Past CONNECTIONS_PER_ADDRESS an address is refused at once, and what it holds is closed HEADER_TIMEOUT
    after it opened however slowly it trickles; the host, a phone and a runner elsewhere are served meanwhile."""
    room = await make_room(host_addresses=("127.0.0.1/32",), connections_per_address=8, header_timeout_s=1.0)
    pin = await room.host.new_session()
    screen = await room.screen()
    ana = await room.runner_at("127.0.0.3", "ana", pin)
    attack = Slowloris(room.base, STRANGER, 30)
    held: list[int] = []
    try:
        await eventually(lambda: held.append(room.server.gate.admission.by_address.get(STRANGER, 0)) or attack.refused > 20,
                         "the laptop refused over and over")
        async with asyncio.timeout(TIMEOUT_S):
            assert (await room.host.call("GET", "/health"))["status"] == "ok"
            phone = await room.http_from("127.0.0.4")
            assert (await phone.call("GET", "/rounds/current", expect=404))["code"] == "NOT_FOUND"
        async with asyncio.timeout(TIMEOUT_S * 3):      # whatever happens, the suite does not hang here
            await running_round(room, ana)
            words = [f"w{n} " for n in range(200)]
            await ana.stream(1, words)
            assert tokens_of([await screen.recv("token_update") for _ in words], "ana") == list(enumerate(words))
        await eventually(lambda: held.append(room.server.gate.admission.by_address.get(STRANGER, 0)) or attack.timed_out >= 8,
                         "the trickling connections closed by the header timeout")
    finally:
        await attack.stop()
    assert max(held) <= 8
    await eventually(lambda: STRANGER not in room.server.gate.admission.by_address, "every connection of the laptop forgotten")
    refusals = [r for r in server_log.records if r.getMessage().startswith("CONNECTION_REFUSED")]
    assert 1 <= len(refusals) <= 3 < attack.refused                     # a line every RARE_LOG_S at most
    assert errors_logged(server_log) == [] and not any(r.exc_info for r in server_log.records)


async def test_a_slow_body_times_out_and_broken_clients_log_no_tracebacks(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """A body slower than BODY_TIMEOUT gets 408; clients hanging up mid-body and garbage on the port get
    one short line now and then, never a traceback; honest votes go on."""
    room = await make_room(body_timeout_s=0.5)
    rnd = await round_in(room, await room.host.new_session(), "open")
    port = urllib.parse.urlsplit(room.base).port
    head = b"POST /votes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"

    async def send_raw(data: bytes, hang_up: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        if hang_up:
            await writer.drain()
            writer.close()
            return b""
        async with asyncio.timeout(TIMEOUT_S):
            answer = await reader.read(4096)
        writer.close()
        return answer

    slow = await send_raw(head, hang_up=False)
    assert slow.startswith(b"HTTP/1.1 408") and json.loads(slow.split(b"\r\n\r\n", 1)[1]) == {
        "error": "The request body did not arrive within 0.5 s", "code": "REQUEST_TIMEOUT"}
    for n in range(20):
        await send_raw(head, hang_up=True)
        await send_raw(b"NOT HTTP AT ALL\r\n\r\n", hang_up=False)
        await send_raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\x00\x1b[2J garbage\r\n\r\n", hang_up=False)
        await send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)), hang_up=False)
        await room.host.vote(rnd["id"], "ana", n % 6, f"phone-{n}")
    await eventually(lambda: room.server.gate.admission.by_address.get("127.0.0.1", 0) <= 3, "the broken clients forgotten")
    assert (await room.host.call("GET", "/scoreboard"))["scoreboard"][0]["votes"] == 20
    assert errors_logged(server_log) == [] and not any(r.exc_info for r in server_log.records)
    broken = [r.getMessage() for r in server_log.records if r.getMessage().startswith("HTTP_BROKEN")]
    assert 1 <= len(broken) <= 3 and all(line.isprintable() and len(line) < 300 for line in broken)


async def test_stalled_screens_are_cut_off_and_their_writers_stop_at_once(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Screens that never read are cut off during a fast round: each one's writer is done and its queue
    dropped, nothing more is written into its socket (asyncio would warn 'socket.send() raised exception'),
    and a reading screen gets every token."""
    room = await make_room(max_answer_chars=10**7, max_round_chars=10**7, peer_queue_bytes=256 * 1024)
    pin = await room.host.new_session()
    reading = await room.screen()
    frozen = [await room.connect_from("127.0.0.3", max_queue=1) for _ in range(6)]
    for ws in frozen:
        await ws.send(json.dumps({"type": "telao_register"}))
    stalled = await eventually(lambda: (lambda found: len(found) == 6 and found)(
        [p for p in room.server.hub.screens if p.address == "127.0.0.3"]), "the stalled screens registered")
    for peer in stalled:
        peer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    ana = await room.runner("ana", pin)
    await running_round(room, ana)
    words = [f"{n:05d}" + "y" * 2000 for n in range(2000)]

    async def read_all() -> list[dict[str, Any]]:
        return [await reading.recv("token_update") for _ in words]
    reader = asyncio.create_task(read_all())
    await ana.stream(1, words)
    assert tokens_of(await reader, "ana") == list(enumerate(words))
    await eventually(lambda: all(p.writer.done() for p in stalled), "every stalled writer stopped")
    assert all(p.dropped and p.queue.empty() and not p.outbox for p in stalled)
    await eventually(lambda: not room.server.hub.peers & set(stalled), "the stalled screens forgotten")
    messages = [r.getMessage() for r in server_log.records]
    assert len([m for m in messages if m.startswith("WS_DROPPED arena (not reading")]) == 6
    assert not [m for m in messages if "socket.send() raised exception" in m]
    assert [await closed_code(ws) for ws in frozen] == [1006] * 6          # cut off: no closing handshake


async def test_a_message_flood_is_read_slowly_and_snapshots_come_no_faster_than_a_screen_needs(
        make_room: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past WS_MESSAGE_RATE a socket is told RATE_LIMITED and read more slowly, losing nothing; a stranger
    looping telao_register gets a state_snapshot once per SNAPSHOT_INTERVAL_S at most; honest peers carry on."""
    monkeypatch.setattr(gs, "SNAPSHOT_INTERVAL_S", 0.5)
    room = await make_room(host_addresses=("127.0.0.1/32",), ws_message_rate=100)
    pin = await room.host.new_session()
    screen = await room.screen()
    ana = await room.runner_at("127.0.0.3", "ana", pin)
    await running_round(room, ana)
    await ana.stream(1, WORDS)
    assert len([await screen.recv("token_update") for _ in WORDS]) == len(WORDS)
    snooper, flooder = Peer(await room.connect_from(STRANGER)), Peer(await room.connect_from("127.0.0.4"))
    started = time.monotonic()
    for _ in range(300):
        await snooper.send({"type": "telao_register"})
        await flooder.send({"type": "nonsense"})
    words = [f"w{n} " for n in range(60)]
    await ana.stream(1, words, start=len(WORDS))
    await ana.complete(1, len(WORDS) + len(words))
    seen = [await screen.recv("token_update") for _ in words]
    assert tokens_of(seen, "ana") == list(enumerate(words, len(WORDS)))
    await screen.recv("completion")
    replies: list[dict[str, Any]] = []
    while len([r for r in replies if r["code"] == "INVALID_INPUT"]) < 300:     # every one answered: none lost
        replies.append(await flooder.recv("error"))
    notices = [r for r in replies if r["code"] == "RATE_LIMITED"]
    assert notices and "nothing is lost" in notices[0]["message"]
    snapshots = [m for m in await snooper.quiet(0.3) if m["type"] == "state_snapshot"]
    assert 1 <= len(snapshots) <= 1 + (time.monotonic() - started) / 0.5
    assert snapshots[0]["liveTokens"]["ana"][:len(WORDS)] == WORDS
    snooper.ws.transport.abort()            # hundreds of its messages still wait their turn: don't wait for them
    assert [m for m in await ana.quiet(0.05) if m["type"] == "error"] == []


async def test_a_snapshot_waiting_its_turn_holds_up_nothing_else_on_its_connection(
        make_room: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stranger's telao_register within SNAPSHOT_INTERVAL_S of its last snapshot is answered at once, its
    snapshot comes when its turn does (asks meanwhile share it), and the connection's other frames are
    answered in the meantime."""
    monkeypatch.setattr(gs, "SNAPSHOT_INTERVAL_S", 30.0)
    room = await make_room(host_addresses=("127.0.0.1/32",))
    await room.host.new_session()
    watcher = Peer(await room.connect_from(STRANGER))
    await watcher.send({"type": "telao_register"})
    await watcher.recv("state_snapshot")
    for message in ({"type": "telao_register"},) * 3 + ({"type": "sync"},):
        await watcher.send(message)
    replies = [await watcher.recv() for _ in range(4)]
    assert [m["type"] for m in replies] == ["registered_telao"] * 3 + ["error"]
    assert await watcher.quiet(0.3) == []


# --- hostile and malformed input -----------------------------------------------------

TYPES = "register, telao_register, token, complete, error"


def ws_error(message: str, code: str = "INVALID_INPUT") -> dict[str, Any]:
    return {"type": "error", "message": message, "code": code}


@pytest.mark.parametrize(("frame", "reply"), [
    (b"\x00\x01binary", ws_error("Binary frames are not supported; send JSON text")),
    ("{nope", ws_error("The message is not valid JSON")),
    ("[" * 100_000 + "]" * 100_000, ws_error("The message is not valid JSON")),
    ("[1, 2]", ws_error("The message must be a JSON object")),
    ("{'type': 'token'}", ws_error("The message is not valid JSON")),
    ("42", ws_error("The message must be a JSON object")),
    ("{}", ws_error(f"Unknown message type None; expected one of {TYPES}")),
    ('{"type": 5}', ws_error(f"Unknown message type 5; expected one of {TYPES}")),
    ('{"type": "vote"}', ws_error(f"Unknown message type 'vote'; expected one of {TYPES}")),
    ('{"type": ["token"]}', ws_error(f"Unknown message type ['token']; expected one of {TYPES}")),
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
    ('{"type": "complete", "round": 1, "tokens": 3}', ws_error("Register before sending this message",
                                                               "NOT_REGISTERED")),
    ('{"type": "error", "round": 1, "code": "X", "message": "y"}', ws_error("Register before sending this message",
                                                                            "NOT_REGISTERED")),
    ('{"type": "telao_register", "view": [1]}', ws_error("'view' must be a string")),
    ('{"type": "token", "round": 1, "seq": "0", "content": "x"}', ws_error("'seq' must be an integer")),
    ('{"type": "token", "round": 1, "seq": -1, "content": "x"}', ws_error("'seq' must be at least 0")),
    ('{"type": "token", "seq": 0, "content": "x"}', ws_error("'round' is required")),
    ('{"type": "token", "round": 1, "seq": 0, "content": 5}', ws_error("'content' must be a string")),
    ('{"type": "complete", "round": 1, "tokens": 1.5}', ws_error("'tokens' must be an integer")),
    ('{"type": "telao_register", "view": 3}', ws_error("'view' must be a string")),
], ids=["binary", "not-json", "deep-nesting", "not-object", "single-quotes", "number", "no-type", "type-not-string",
        "unknown-type", "type-list", "missing-field", "wrong-type", "nan", "infinity", "bool-as-int", "huge-int",
        "negative", "infinite-float", "not-object-field", "before-register", "complete-before-register",
        "error-before-register", "screen-view", "string-as-int", "negative-seq", "no-round", "number-as-string",
        "fraction-as-int", "screen-view-number"])
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
    ("DELETE", "/session", None, 405, "/session takes GET or POST, not DELETE"),
    ("POST", "/rounds", '"prompt"', 400, "The request body must be a JSON object"),
    ("POST", "/rounds", "null", 400, "The request body must be a JSON object"),
    ("POST", "/rounds", "[" * 100_000, 400, "The request body is not valid JSON"),
    ("POST", "/rounds", {"prompt": "x", "seed": -1}, 400, "'seed' must be at least 0"),
    ("POST", "/rounds", {"prompt": "x", "deadlineMs": 1.5}, 400, "'deadline_ms' must be an integer"),
    ("POST", "/session", {"pinLength": 3}, 400, "'pin_length' must be at least 4"),
    ("POST", "/session", {"pinLength": "6"}, 400, "'pin_length' must be an integer"),
    ("POST", "/session", "[]", 400, "The request body must be a JSON object"),
    ("POST", "/rounds/start", {}, 400, "'round_id' is required"),
    ("POST", "/rounds/start", {"roundId": 5}, 400, "'round_id' must be a string"),
    ("POST", "/rounds/stop", {"round_id": ["x"]}, 400, "'round_id' must be a string"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana"}, 400, "'score' is required"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": -1}, 400, "'score' must be at least 0"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": 2.5}, 400, "'score' must be an integer"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": "5"}, 400, "'score' must be an integer"),
    ("POST", "/votes", {"roundId": "r", "participantId": "ana", "score": True}, 400, "'score' must be an integer"),
    ("POST", "/votes", {"roundId": "r", "participantId": 7, "score": 1}, 400, "'participant_id' must be a string"),
    ("POST", "/votes", {"roundId": "r", "participantId": "a", "score": 1, "responseTime": "x"}, 400,
     "'response_time' must be an integer"),
    ("POST", "/participants/kick", {}, 400, "'participant_id' is required"),
    ("GET", "/votes/mine?round_id=" + "r" * 201, None, 400, "'round_id' must be at most 200 characters"),
], ids=lambda value: value if isinstance(value, int) else None)
async def test_each_kind_of_bad_request_gets_its_4xx_as_json(room: Room, pin: str, method: str, path: str,
                                                             body: Any, status: int, error: str) -> None:
    """Malformed JSON, a non-object, a missing field, a wrong type, a value out of range, unknown ids, routes
    and methods: a 4xx with {"error", "code"} naming it, never a 500."""
    assert await room.host.status(method, path, body) == (status, {"error": error, "code": gs_code(status)})


async def test_a_body_over_the_size_limit_gets_413(room: Room, pin: str) -> None:
    """A request body over aiohttp's 1 MiB limit is refused before anything reads it."""
    body = io.BytesIO(b"x" * (1024 * 1024 + 1))
    async with room.host.http.post(room.base + "/rounds", data=body) as response:
        assert response.status == 413
        assert await response.json() == {"error": "The request body is over the limit of 1048576 bytes",
                                         "code": "REQUEST_ENTITY_TOO_LARGE"}


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
# The WebSocket error codes the README documents: the only ones a runner may ever see.
ERROR_CODES = set(re.findall(r"^\| `([A-Z_]+)` \|", (HERE / "README.md").read_text().split("Error codes (")[1]
                             .split("Close codes:")[0], re.M))
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
            @settings(FUZZ, max_examples=30)
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


PATH_SEGMENTS = st.sampled_from(["", ".", "..", "%2e%2e", "%00", "%ED%A0%80", "%FF", "%", "a" * 300, "api", "ui",
                                  "client-assets", "x.js", "assets", "index.html", "rounds", "docs", "voting", "admin",
                                  "scoreboard", "arena", "client", "health"]) | st.text(max_size=12)
QUERIES = st.just("") | st.lists(st.tuples(st.sampled_from(["roundId", "round_id", "view", "voterId", "pin", "x"])
                                           | st.text(max_size=8), PATH_SEGMENTS), max_size=3).map(
    lambda pairs: "?" + "&".join(f"{urllib.parse.quote(k, safe='%')}={urllib.parse.quote(v, safe='%')}"
                                 for k, v in pairs))


@pytest.mark.parametrize("static", [True, False], ids=["static-dir", "own-pages"])
async def test_any_path_gets_an_answer_never_a_500(make_room: Any, client_dir: Path, tmp_path: Path,
                                                   server_log: pytest.LogCaptureFixture, static: bool) -> None:
    """Random paths (.., NUL, halves of pairs, names longer than a file's, the pages' and the API's prefixes)
    and queries, from a browser or not, with CLIENT_DIR served and STATIC_DIR or our own pages: never a 5xx,
    nothing logged as an error."""
    site = tmp_path / "site"
    (site / "assets").mkdir(parents=True)
    (site / "index.html").write_text("<title>telao</title>")
    room = await make_room(static_dir=str(site) if static else "", client_dir=client_dir)
    await room.host.new_session()
    statuses: list[int] = []

    async def request(path: str, browser: bool) -> None:
        headers = {"Accept": "text/html"} if browser else {}
        async with room.host.http.get(yarl.URL(room.base + path, encoded=True), headers=headers,
                                      allow_redirects=False) as response:
            statuses.append(response.status)
            assert response.status < 500, (path, browser, response.status, await response.text(errors="replace"))

    loop = asyncio.get_running_loop()

    @settings(FUZZ, max_examples=200)
    @given(st.lists(PATH_SEGMENTS.map(lambda segment: urllib.parse.quote(segment, safe="%")), min_size=1,
                    max_size=6).map("/".join), QUERIES, st.booleans())
    def fuzz(path: str, query: str, browser: bool) -> None:
        run_on(loop, request("/" + path + query, browser))
    await asyncio.to_thread(fuzz)
    assert len(statuses) >= 200 and {200, 404} <= set(statuses)
    assert errors_logged(server_log) == [] and room.server.db.error is None


# The host's steps, each with the round it names: "latest" (the newest round), "first", "" or none at all.
HOST_STEPS: list[tuple[str, str, Callable[[str, str], Any] | None]] = [
    ("POST", "/rounds", lambda rnd, pid: {"prompt": "Diga oi", "maxTokens": 5}),
    ("POST", "/rounds/start", lambda rnd, pid: {"roundId": rnd}),
    ("POST", "/rounds/stop", lambda rnd, pid: {"roundId": rnd}),
    ("POST", "/rounds/stop", lambda rnd, pid: {}),
    ("POST", "/rounds/{id}/close-voting", None),
    ("POST", "/votes/close", lambda rnd, pid: {"roundId": rnd}),
    ("POST", "/votes/close", lambda rnd, pid: {}),
    ("POST", "/rounds/{id}/reveal", None),
    ("POST", "/rounds/{id}/reveal-next", None),
    ("POST", "/votes", lambda rnd, pid: {"roundId": rnd, "participantId": pid, "score": 4, "voterId": "v1"}),
    ("GET", "/rounds/current", None),
    ("GET", "/scoreboard?roundId={id}", None),
    ("GET", "/rounds/{id}/responses", None),
    ("POST", "/session", None),
    ("POST", "/participants/kick", lambda rnd, pid: {"participantId": pid}),
]


async def test_any_order_of_the_hosts_steps_gets_answers_never_a_500(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """The host's steps in random order, naming the newest round, the first, an empty id or none, while a
    runner answers each challenge: each step is done or refused with a 4xx, at most one round ever runs,
    nothing is logged as an error, and a full round works afterwards."""
    room = await make_room()
    pins = [await room.host.new_session()]
    statuses: list[int] = []

    async def walk(steps: list[tuple[int, str]]) -> None:
        pid = f"ana-{len(statuses)}"
        runner = await room.runner(pid, pins[-1])
        rounds: list[str] = []
        for step, which in steps:
            method, path, body = HOST_STEPS[step]
            rnd = {"latest": rounds[-1] if rounds else "", "first": rounds[0] if rounds else "x", "": ""}[which]
            status, reply = await room.host.status(method, path.replace("{id}", rnd or "none"),
                                                   body(rnd, pid) if body else None)
            statuses.append(status)
            assert status < 500, (method, path, rnd, status, reply)
            if path == "/rounds" and status == 200:
                rounds.append(reply["id"])
            elif path == "/session" and status == 200:
                pins.append(reply["pin"])
                rounds.clear()
                runner = await room.runner(pid, pins[-1])
            elif path == "/rounds/start" and status == 200:
                with contextlib.suppress(ConnectionClosed):     # kicked: its tokens go nowhere
                    await runner.stream(reply["index"], ["oi"])
            session = await room.host.call("GET", "/session")
            assert sum(bool(r["startedAt"] and not r["endedAt"]) for r in session["rounds"]) <= 1, session
        await runner.ws.close()

    loop = asyncio.get_running_loop()

    @settings(FUZZ, max_examples=40)
    @given(st.lists(st.tuples(st.integers(0, len(HOST_STEPS) - 1), st.sampled_from(["latest", "first", ""])),
                    min_size=5, max_size=25))
    def fuzz(steps: list[tuple[int, str]]) -> None:
        run_on(loop, walk(steps))
    await asyncio.to_thread(fuzz)
    assert {200, 404, 409} <= set(statuses)
    assert errors_logged(server_log) == [] and room.server.db.error is None
    await a_full_round_works(room)


RUNNER_STEPS = st.one_of(
    st.tuples(st.just("register"), st.integers(0, 2)),
    st.tuples(st.just("token"), st.integers(0, 2), st.sampled_from(["current", "other"]), st.integers(0, 6),
              st.sampled_from(["", "a", "é ", "🦙", "日本", " ", "\n"])),
    st.tuples(st.just("complete"), st.integers(0, 2), st.sampled_from(["current", "other"]), st.integers(0, 8)),
    st.tuples(st.just("drop"), st.integers(0, 2)),
    st.sampled_from(["new round", "stop", "close voting", "pause"]).map(lambda step: (step,)))


async def test_what_the_big_screen_showed_is_what_was_stored_whatever_runners_and_host_do(
        make_room: Any, server_log: pytest.LogCaptureFixture) -> None:
    """Three runners register, stream (in any seq order, repeats too, for the running round or another),
    complete, drop and come back, while the host starts, stops and closes rounds: every answer stored, and
    exported, is token for token what the big screen showed of it, and nothing is logged as an error."""
    room = await make_room(stop_grace_s=0.3)
    pin = await room.host.new_session()
    screen = await room.screen()
    shown: list[dict[str, Any]] = []
    reading = asyncio.ensure_future(collect(screen, shown))
    runners: dict[int, Any] = {}
    drains: list[asyncio.Task] = []
    rounds: dict[int, str] = {}                         # index -> id, of the rounds started

    async def drain(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    async def step(action: tuple[Any, ...]) -> None:
        kind, current = action[0], max(rounds, default=1)
        if kind == "register":
            ws = await room.connect()
            await ws.send(json.dumps({"type": "register", "participant_id": f"r{action[1]}", "pin": pin}))
            runners[action[1]] = ws
            drains.append(asyncio.ensure_future(drain(ws)))
        elif kind in ("token", "complete", "drop") and action[1] in runners:
            ws, index = runners[action[1]], current if action[2:3] != ("other",) else current + 1
            with contextlib.suppress(ConnectionClosed):
                if kind == "token":
                    await ws.send(json.dumps({"type": "token", "round": index, "participant_id": f"r{action[1]}",
                                              "seq": action[3], "content": action[4]}))
                elif kind == "complete":
                    await ws.send(json.dumps({"type": "complete", "round": index, "participant_id": f"r{action[1]}",
                                              "tokens": action[3]}))
                else:
                    ws.transport.abort()                    # a laptop that vanishes
                    del runners[action[1]]
        elif kind == "new round":
            status, row = await room.host.status("POST", "/rounds", {"prompt": "oi"})
            status, row = await room.host.status("POST", "/rounds/start", {"roundId": row["id"]})
            if status == 200:
                rounds[row["index"]] = row["id"]
        elif kind == "stop":
            await room.host.status("POST", "/rounds/stop", {})
        elif kind == "close voting":
            await room.host.status("POST", "/votes/close", {})
        else:
            await asyncio.sleep(0.1)

    async def walk(actions: list[tuple[Any, ...]]) -> None:
        for action in actions:
            await step(action)

    loop = asyncio.get_running_loop()

    @settings(FUZZ, max_examples=20)
    @given(st.lists(RUNNER_STEPS, min_size=5, max_size=40))
    def fuzz(actions: list[tuple[Any, ...]]) -> None:
        run_on(loop, walk(actions))
    await asyncio.to_thread(fuzz)
    await room.host.status("POST", "/rounds/stop", {})
    await asyncio.sleep(0.5)                                # the grace after the stop is over

    def on_screen(index: int) -> dict[str, str]:
        """Each answer as the screen showed it: its tokens by seq (a repeat shows nothing), or a completion."""
        seen: dict[str, dict[int, str]] = {}
        for m in shown:
            if m["type"] in ("token_update", "completion") and m["round"] == index:
                tokens = seen.setdefault(m["participant_id"], {})
                if m["type"] == "token_update":
                    tokens.setdefault(m["seq"], m["content"])
        return {pid: "".join(tokens[seq] for seq in sorted(tokens)) for pid, tokens in seen.items()}

    async def stored(round_id: str) -> dict[str, str]:
        answers = (await room.host.call("GET", f"/rounds/{round_id}/responses"))["responses"]
        return {a["participant_id"]: a["generated_content"] for a in answers}
    async def settled(index: int, round_id: str) -> bool:
        return await stored(round_id) == on_screen(index)
    assert rounds
    for index, round_id in rounds.items():
        with contextlib.suppress(TimeoutError):             # the assertion below shows the difference
            await eventually(lambda: settled(index, round_id), f"round {index} stored as shown", 3)
        assert await stored(round_id) == on_screen(index), index
    exported = csv_rows((await export(room, "/export.csv"))[0])
    assert {(int(row["round"]), row["participant_id"]): row["generated_content"] for row in exported} == {
        (index, pid): text for index in rounds for pid, text in on_screen(index).items()}
    reading.cancel()
    for task in drains:
        task.cancel()
    assert errors_logged(server_log) == [] and room.server.db.error is None


async def test_votes_at_once_count_exactly_what_was_accepted(make_room: Any,
                                                            server_log: pytest.LogCaptureFixture) -> None:
    """Phones vote all at once (the same vote twice, scores out of range, someone without an answer, a
    round closing under them): each vote is accepted once or refused with a 4xx, and the scoreboard adds
    up exactly the accepted ones."""
    room = await make_room()
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    await room.runner("cai", pin)                                       # connected, but gives no answer
    rounds: list[dict[str, Any]] = []
    accepted: dict[tuple[str, str], list[int]] = {}

    async def vote(round_id: str, pid: str, score: Any, voter: str) -> None:
        status, reply = await room.host.status("POST", "/votes", {"roundId": round_id, "participantId": pid,
                                                                 "score": score, "voterId": voter})
        assert status in (200, 400, 404, 409), (status, reply)
        if status == 200:
            accepted.setdefault((round_id, pid), []).append(score)

    async def walk(ballots: list[tuple[str, Any, str]], close_at: int) -> None:
        rnd = await running_round(room, ana, bia)
        for runner in (ana, bia):
            await runner.stream(rnd["index"], ["oi"])
            await runner.complete(rnd["index"], 1)
            await runner.sync()
        await room.host.stop(rnd["id"])
        rounds.append(rnd)
        votes = [vote(rnd["id"], *ballot) for ballot in ballots]
        votes.insert(close_at, room.host.status("POST", f"/rounds/{rnd['id']}/close-voting"))
        await asyncio.gather(*votes)

    loop = asyncio.get_running_loop()

    @settings(FUZZ, max_examples=12)
    @given(st.lists(st.tuples(st.sampled_from(["ana", "bia", "cai"]), st.sampled_from([0, 3, 5, 6, -1, 2.5, "4"]),
                              st.sampled_from(["v1", "v2", "v3"])), max_size=30), st.integers(0, 30))
    def fuzz(ballots: list[tuple[str, Any, str]], close_at: int) -> None:
        run_on(loop, walk(ballots, close_at))
    await asyncio.to_thread(fuzz)
    for rnd in rounds:
        board = {row["participant_id"]: row for row in
                 (await room.host.call("GET", f"/scoreboard?roundId={rnd['id']}"))["scoreboard"]}
        for pid in ("ana", "bia"):
            scores = accepted.get((rnd["id"], pid), [])
            assert (board[pid]["votes"], board[pid]["total_score"]) == (len(scores), sum(scores)), (rnd, pid)
            assert len(scores) <= 3                                     # one vote per phone per answer
    assert errors_logged(server_log) == [] and room.server.db.error is None


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


# --- attack: rounds, sessions, the database file and exports ----------------------

def file_states(database: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of the database and its write-ahead log."""
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns)
            for path in (database, Path(f"{database}-wal")) if path.exists()}


async def test_a_second_server_on_the_same_database_says_it_is_busy_and_touches_nothing(
        server_process: Callable, http: aiohttp.ClientSession) -> None:
    """One server per database: a second one started on the same file prints one line naming the file
    (its absolute path) and exits 2 before it listens or writes; the first one's session and runner go on."""
    first = server_process()
    room = Room(first.start(), http)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    session = await room.host.call("GET", "/session")
    before = file_states(first.database)
    assert not Path(f"{first.database}-shm").exists()         # the log's index is in the server's memory
    second = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(HERE / "gambiarra_server.py"), "--host", "127.0.0.1", "--port", "0",
                         "--database-url", str(first.database)], capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert second.stdout == ""
    assert second.stderr.splitlines() == [
        f"database {first.database.resolve()} is in use by another server; stop that one, "
        "or give this one another DATABASE_URL"]
    assert file_states(first.database) == before
    assert await room.host.call("GET", "/session") == session
    assert [p["id"] for p in (await room.host.call("GET", "/presence"))["participants"]] == ["ana"]
    await ana.sync()
    await room.close()


def shown_to_screens(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] in ("token_update", "completion")]


@pytest.mark.parametrize("frozen_by", ["voting closed", "grace over"])
async def test_answers_are_frozen_once_voting_closes_or_the_grace_after_stop_is_over(make_room: Any,
                                                                                     frozen_by: str) -> None:
    """After a stop, tokens and completes on their way are kept for STOP_GRACE seconds while voting is
    open; after that, or once voting closed, they get ROUND_CLOSED and the answer voted on stays as it was:
    in the database, on the voting page, in the export and on the screens."""
    room = await make_room(stop_grace_s=60.0 if frozen_by == "voting closed" else 0.2)
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    await ana.stream(1, WORDS[:2])
    await bia.stream(1, WORDS)
    await bia.complete(1, len(WORDS))
    await ana.sync()
    await bia.sync()
    await room.host.stop(rnd["id"])
    if frozen_by == "voting closed":
        await ana.token(1, 2, WORDS[2])                 # within the grace: still kept
        await ana.sync()
        await room.host.call("POST", f"/rounds/{rnd['id']}/close-voting")
        kept = WORDS[:3]
    else:
        await room.host.vote(rnd["id"], "ana", 4, "v1")
        await asyncio.sleep(0.3)                        # the grace is over (voting stays open)
        kept = WORDS[:2]
    screen = await room.screen()
    await ana.token(1, len(kept), "ANSWER CHANGED AFTER THE VOTE")
    await ana.complete(1, 99)
    await bia.stream(1, ["P.S."], start=len(WORDS))
    await bia.complete(1, len(WORDS) + 1)
    for runner in (ana, ana, bia, bia):
        assert (await runner.recv("error"))["code"] == "ROUND_CLOSED"
    assert shown_to_screens(await screen.quiet()) == []
    assert await responses_of(room, rnd) == {"ana": "".join(kept), "bia": "".join(WORDS)}
    [saved_ana, saved_bia] = sorted(csv_rows((await export(room, "/export.csv"))[0]), key=lambda r: r["participant_id"])
    assert (saved_ana["generated_content"], saved_ana["tokens_received"], saved_ana["rescued"]) == (
        "".join(kept), str(len(kept)), "1")
    assert (saved_bia["generated_content"], saved_bia["tokens"]) == ("".join(WORDS), str(len(WORDS)))
    assert db_rows(room.server.config.database, "SELECT COUNT(*) AS n FROM tokens") == [
        {"n": len(kept) + len(WORDS)}]


async def test_a_session_holds_at_most_max_participants_and_always_lets_its_own_back(make_room: Any) -> None:
    """One PIN holder registering id after id is refused with SESSION_FULL past MAX_PARTICIPANTS; a
    participant already in the session (reconnecting, from another socket) is never refused, a kicked one
    stays kicked, screens hear of no refused id, and a new session starts empty."""
    room = await make_room(max_participants=3)
    pin = await room.host.new_session()
    screen = await room.screen()
    runners = {name: await room.runner_at(STRANGER, name, pin) for name in ("ana", "bia", "caio")}
    for name in ("dani", "eli"):
        assert (await Runner(await room.connect_from(STRANGER), name).register(pin))["code"] == "SESSION_FULL"
    await runners["ana"].ws.close()
    again = await room.runner_at(STRANGER, "ana", pin)          # reconnects after a drop
    await room.runner_at(STRANGER, "bia", pin)                  # replaces its own socket
    await room.host.call("POST", "/participants/kick", {"participantId": "caio"})
    assert (await Runner(await room.connect_from(STRANGER), "caio").register(pin))["code"] == "KICKED"
    assert (await Runner(await room.connect_from(STRANGER), "dani").register(pin))["code"] == "SESSION_FULL"
    seen = [m["participant"]["id"] for m in await screen.quiet() if m["type"] == "participant_registered"]
    assert set(seen) == {"ana", "bia", "caio"}
    session = await room.host.call("GET", "/session")
    assert sorted(p["id"] for p in session["participants"]) == ["ana", "bia", "caio"]
    await again.sync()
    new_pin = await room.host.new_session()
    for name in ("dani", "eli", "fabi"):
        await room.runner_at(STRANGER, name, new_pin)


@pytest.mark.parametrize("bound", ["tokens", "characters"])
async def test_a_rounds_live_text_is_bounded_for_every_runner_together(make_room: Any, bound: str) -> None:
    """Past MAX_ROUND_TOKENS or MAX_ROUND_CHARS (every answer of the round together) a token gets
    ROUND_FULL, whoever sends it: what was kept is shown, saved and voted on whole, and completes still work."""
    room = await make_room(**({"max_round_tokens": 10} if bound == "tokens" else {"max_round_chars": 20}))
    pin = await room.host.new_session()
    screen = await room.screen()
    ana, bia, caio = [await room.runner_at(STRANGER, name, pin) for name in ("ana", "bia", "caio")]
    rnd = await running_round(room, ana, bia, caio)
    words = ["ab"] * 6                                  # 12 characters, 6 tokens each
    await ana.stream(1, words)
    await ana.sync()
    await bia.stream(1, words)
    kept_bia = 4                                         # 10 tokens, or 20 characters, in all
    assert [(await bia.recv("error"))["code"] for _ in words[kept_bia:]] == ["ROUND_FULL"] * 2
    await caio.token(1, 0, "a")
    assert (await caio.recv("error"))["code"] == "ROUND_FULL"
    current = await room.host.call("GET", "/rounds/current")
    assert current["liveTokens"] == {"ana": words, "bia": words[:kept_bia]}
    assert len(shown_to_screens(await screen.quiet())) == len(words) + kept_bia
    await ana.complete(1, len(words))
    await bia.complete(1, len(words))
    await room.host.stop(rnd["id"])
    assert await responses_of(room, rnd) == {"ana": "ab" * 6, "bia": "ab" * kept_bia}
    await room.host.vote(rnd["id"], "bia", 5, "v1")


async def test_a_database_deleted_mid_round_is_written_back_and_loses_nothing(
        server_process: Callable, http: aiohttp.ClientSession) -> None:
    """The host deletes the database file and its log mid-round: within seconds the server says so in its
    log and on /health, writes the database back from its open connection and goes on writing there; after
    the round, its votes and a SIGTERM, the file holds every token, answer, vote and event."""
    process = server_process("--flush-interval", "0.1")
    room = Room(process.start(), http)
    database = process.database
    pin = await room.host.new_session()
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await running_round(room, ana, bia)
    words = [f"w{n} " for n in range(40)]
    await ana.stream(1, words[:20])
    await eventually(lambda: saved_token_count(database, "ana") == 20, "a flush")
    database.unlink()
    Path(f"{database}-wal").unlink()
    await ana.stream(1, words[20:30], start=20)
    await bia.stream(1, words)
    health = await get_when(room, "/health", lambda body: body["database_restored_at"] is not None)
    assert (health["status"], health["database"]) == ("ok", "ok")
    await ana.stream(1, words[30:], start=30)
    for runner in (ana, bia):
        await runner.complete(1, len(words))
        await runner.sync()
    await room.host.stop(rnd["id"])
    for voter in ("v1", "v2"):
        await room.host.vote(rnd["id"], "ana", 4, voter)
        await room.host.vote(rnd["id"], "bia", 2, voter)
    await room.close()
    process.process.send_signal(signal.SIGTERM)
    _, log_text = await asyncio.to_thread(process.process.communicate, timeout=10)
    assert process.process.returncode == 0
    assert log_text.count(f"database {database.resolve()} was deleted while the server ran; written back") == 1
    for name in ("ana", "bia"):
        rows = db_rows(database, "SELECT content FROM tokens WHERE participantId = ? ORDER BY seq", name)
        assert [row["content"] for row in rows] == words
    answers = db_rows(database, "SELECT participantId, generatedContent, rescued FROM metrics ORDER BY participantId")
    assert answers == [{"participantId": name, "generatedContent": "".join(words), "rescued": 0}
                       for name in ("ana", "bia")]
    assert db_rows(database, "SELECT participantId, SUM(score) AS total FROM votes GROUP BY participantId "
                             "ORDER BY participantId") == [{"participantId": "ana", "total": 8},
                                                           {"participantId": "bia", "total": 4}]
    events = [row["eventType"] for row in db_rows(database, "SELECT eventType FROM event_logs")]
    assert {"session_created", "round_started", "round_stopped", "voting_opened"} <= set(events)
    assert events.count("vote_cast") == 4


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


async def test_exports_hold_no_formulas_and_numbers_stay_numbers(room: Room, pin: str) -> None:
    """Nicknames, ids, models and answers that a spreadsheet would run as formulas (=, +, -, @, tab,
    carriage return) are exported as text, prefixed with an apostrophe; numbers are left alone."""
    evil = Runner(await room.connect(), "-1+2")
    assert (await evil.register(pin, nickname="=HYPERLINK(\"http://evil.example\",\"prize\")",
                                model="@SUM(A1:A9)", runner="\tcmd"))["type"] == "registered"
    ana = await room.runner("ana", pin)
    rnd = await running_round(room, evil, ana)
    answer = ["+cmd|' /C calc'!A0", " and more"]
    await evil.stream(1, answer)
    await evil.complete(1, len(answer))
    await ana.stream(1, ["\r=1+1"])
    await ana.complete(1, 1)
    await evil.sync()
    await ana.sync()
    await room.host.stop(rnd["id"])
    await room.host.vote(rnd["id"], "-1+2", 5, "v1")
    rows = {row["participant_id"]: row for row in csv_rows((await export(room, "/export.csv"))[0])}
    assert set(rows) == {"'-1+2", "ana"}
    row = rows["'-1+2"]
    assert (row["nickname"], row["model"], row["runner"], row["generated_content"]) == (
        "'=HYPERLINK(\"http://evil.example\",\"prize\")", "'@SUM(A1:A9)", "'\tcmd", "'" + "".join(answer))
    assert rows["ana"]["generated_content"] == "'\r=1+1"
    assert (row["round"], row["tokens"], row["votes"], row["avg_score"]) == ("1", "2", "1", "5.00")
    events = csv_rows((await export(room, "/export-events.csv"))[0])
    assert "'-1+2" in {event["actorId"] for event in events}
    for table in (rows.values(), events):
        assert not [cell for row in table for cell in row.values() if cell.startswith(FORMULA_STARTS)]


async def test_client_text_reaches_the_log_escaped(room: Room, pin: str, server_log: pytest.LogCaptureFixture) -> None:
    """Ids, codes and messages from clients cannot forge a log line or drive the host's terminal: every
    control character (newline, carriage return, ANSI escape, C1) is written as an escape; nor fill the
    log: a long value is cut, and a flood of a runner's reports is one line (and one event row) per RARE_LOG_S."""
    forged = "ana\n2026-01-01 00:00:00 INFO WS_REGISTERED host\x1b[2J\x1b]0;owned\x07\r\x9b"
    evil = Runner(await room.connect(), forged)
    assert (await evil.register(pin))["type"] == "registered"
    rnd = await running_round(room, evil)
    await evil.send({"type": "error", "round": 1, "code": "OOPS\x1b[31m", "message": "line one\nERROR fake"})
    for _ in range(50):                                 # a flood of reports: one line per RARE_LOG_S at most
        await evil.send({"type": "error", "round": 1, "code": "AGAIN", "message": "again"})
    bia = await room.runner("bia", pin)
    await bia.send({"type": "error", "round": 1, "code": "LONG", "message": "m" * 10_000})
    await bia.sync()
    await evil.token(1, 0, "x")
    await evil.sync()
    await room.host.stop(rnd["id"])                     # rescued: logged with the id
    await evil.ws.close()
    await eventually(lambda: any("WS_DISCONNECTED" in r.getMessage() for r in server_log.records), "the leave")
    ours = [r.getMessage() for r in server_log.records if r.name == "gambiarra"]
    assert not [line for line in ours if re.search(r"[\x00-\x1f\x7f-\x9f]", line)]
    escaped = "ana\\n2026-01-01 00:00:00 INFO WS_REGISTERED host\\x1b[2J\\x1b]0;owned\\x07\\r\\x9b"
    assert [line for line in ours if line.startswith(f"WS_REGISTERED {escaped} (")]
    assert f"runner {escaped} reported OOPS\\x1b[31m: line one\\nERROR fake" in ours
    assert "runner bia reported LONG: " + "m" * gs.MAX_LOGGED + f"…({10_000 - gs.MAX_LOGGED} more)" in ours
    assert not [line for line in ours if "reported AGAIN" in line]
    events = json.loads((await export(room, "/export-all.json"))[0])["events"]
    assert [e["metadata"]["code"] for e in events if e["eventType"] == "generation_failed"] == ["OOPS\x1b[31m", "LONG"]
    assert f"WS_DISCONNECTED {escaped} from 127.0.0.1" in ours


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


# =============================================================================
# Pages: in a real browser
# =============================================================================
#
# Headless Chromium (Debian's package, driven by the playwright package) opens each
# page from the real server, while simulated runners and phones do their part; the
# tests read what a person would see. Any console error or failed load fails a test.
# Without Chromium or playwright these tests are skipped, saying which is missing.

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def browser() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("browser tests need the playwright package (pip install playwright)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("browser tests need Chromium (apt-get install chromium)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def tab(browser: Any) -> Callable:
    """Open a page in a fresh browser context (a phone of its own); at the end, fail on any error it logged
    except those the test expects (`tab.expected`: regexes, such as the status of a refusal it provokes)."""
    errors: list[str] = []
    contexts = []

    async def open_tab(url: str, width: int = 1600, height: int = 900, before: str = "") -> Any:
        """`before`: JavaScript that runs before the page's own, such as a phone's stored voter id."""
        context = await browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        if before:
            await context.add_init_script(before)
        context.set_default_timeout(TIMEOUT_S * 1000)
        page = await context.new_page()
        page.on("console", lambda message: message.type == "error" and errors.append(f"{url}: {message.text}"))
        page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
        # A request cut short by a reload or a navigation (ERR_ABORTED) is not a failure anyone sees.
        page.on("requestfailed", lambda request: request.failure == "net::ERR_ABORTED"
                or errors.append(f"{request.url}: {request.failure}"))
        await page.goto(url)
        return page
    open_tab.expected = []
    yield open_tab
    for context in contexts:
        await context.close()
    assert [e for e in errors if not any(re.search(pattern, e) for pattern in open_tab.expected)] == []


def expect(target: Any) -> Any:
    from playwright.async_api import expect as playwright_expect
    return playwright_expect(target)


async def qr_text(page: Any, selector: str) -> str | None:
    """What a phone's camera would read from the QR code drawn on the canvas `selector`."""
    zxingcpp = pytest.importorskip("zxingcpp", reason="reading the QR code needs zxing-cpp (pip install zxing-cpp)")
    side, pixels = await page.eval_on_selector(selector, """canvas => {
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        return [canvas.width, Array.from({length: data.length / 4}, (_, i) => data[i * 4])];
    }""")
    found = zxingcpp.read_barcodes(memoryview(bytes(pixels)).cast("B", (side, side)))
    return found[0].text if found else None


async def test_pages_are_html_for_browsers_while_their_routes_stay_json(room: Room, pin: str) -> None:
    """A browser gets each page, uncached and self-contained; curl and fetch() still get the API's JSON."""
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for page in gs.PAGES:
        for path in (page.path, f"/ui/{page.name}"):
            async with room.host.http.get(room.base + path, headers=html) as response:
                body = await response.text()
                assert response.status == 200 and response.content_type == "text/html", path
                assert response.headers["Cache-Control"] == "no-store"
                assert "script-src 'nonce-" in response.headers["Content-Security-Policy"]
                assert not re.search(r"""(src|href)=["']?(https?:)?//""", body), path     # nothing fetched elsewhere
    assert (await room.host.status("GET", "/scoreboard"))[0] == 404          # no round yet: the API's answer
    async with room.host.http.get(room.base + "/api/scoreboard", headers=html) as response:
        assert response.content_type == "application/json"


async def test_static_dir_serves_a_built_app_to_browsers_and_the_api_to_everyone_else(make_room: Callable,
                                                                                       tmp_path: Path) -> None:
    """With STATIC_DIR (the club's built telão) browsers get its files, and its index.html at any other path;
    the API answers at the root to clients that don't ask for HTML and under /api; our pages move to /ui/."""
    app = tmp_path / "telao"
    (app / "assets").mkdir(parents=True)
    (app / "index.html").write_text("<!doctype html><title>club telao</title>")
    (app / "assets" / "app.js").write_text("console.log('club')")
    (tmp_path / "secret.txt").write_text("not for the audience")
    room = await make_room(static_dir=str(app))
    pin = await room.host.new_session()
    html = {"Accept": "text/html"}

    async def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        async with room.host.http.get(room.base + path, headers=headers or {}) as response:
            return response.status, response.content_type, await response.text()
    for path in ("/", "/voting", "/admin", "/scoreboard", "/session", "/rounds/x/responses", "/some/route"):
        assert await get(path, html) == (200, "text/html", "<!doctype html><title>club telao</title>"), path
    assert await get("/assets/app.js") == (200, "application/javascript", "console.log('club')")
    assert (await room.host.call("GET", "/session"))["pin"] == pin             # the club's scripts, at the root
    assert (await room.host.call("GET", "/api/session"))["pin"] == pin
    rnd = await room.host.new_round()
    assert (await room.host.start(rnd["id"]))["startedAt"]
    status, kind, body = await get("/ui/voting", html)
    assert (status, kind) == (200, "text/html") and "voterId" in body
    assert '"voting":"/ui/voting"' in (await get("/ui/arena", html))[2]       # the QR code's path, too
    assert (await get("/nothing-here"))[:2] == (404, "application/json")
    for escape in ("/../secret.txt", "/%2e%2e/secret.txt", "/assets/%2e%2e/%2e%2e/secret.txt"):
        async with room.host.http.get(yarl.URL(room.base + escape, encoded=True), headers=html) as response:
            assert "not for the audience" not in await response.text(), escape
    for odd in ("/a%00b", "/" + "a" * 5000, f"/assets/{'b' * 300}.js"):       # no file can have these names
        assert (await get(odd, html))[0] == 200 and (await get(odd))[:2] == (404, "application/json"), odd


async def test_the_big_screen_shows_how_to_join_with_a_qr_code(room: Room, pin: str, tab: Callable,
                                                                tmp_path: Path) -> None:
    """Before a round: the runners' URL, the voting URL as text and as a QR code, and who is connected
    (a nickname that looks like HTML is shown as the text it is)."""
    await room.runner("ana", pin)
    page = await tab(room.base + "/")
    await expect(page.locator("#people")).to_contain_text("Ana")
    mallory = Runner(await room.connect(), "mallory")
    await mallory.register(pin, '<img src="x" onerror="document.title=1">Mal')
    await expect(page.locator("#people")).to_contain_text('<img src="x" onerror="document.title=1">Mal')
    assert await page.locator("#people img").count() == 0
    vote_url = await page.text_content("#vote-url")
    port = room.base.rsplit(":", 1)[1]
    assert re.fullmatch(rf"http://[\d.]+:{port}/voting", vote_url)
    lan = gs.lan_addresses()
    assert vote_url.split("//")[1].split(":")[0] in (lan or ["127.0.0.1"])   # a phone can't reach 127.0.0.1
    assert await page.text_content("#ws-url") == vote_url.replace("http", "ws").replace("/voting", "/ws")
    assert await qr_text(page, "#qr") == vote_url
    await page.screenshot(path=tmp_path / "arena-join.png")


async def test_the_big_screen_streams_each_answer_into_its_card(room: Room, pin: str, tab: Callable,
                                                                 tmp_path: Path) -> None:
    """During a round: one card per runner fills with the streamed text, counts its tokens, then says
    done with TTFT and tokens/s (and the engine's own tokens/s beside them), or dropped for a runner that
    went away."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    page = await tab(room.base + "/")
    await expect(page.locator("#people li")).to_have_count(2)
    rnd = await room.host.new_round("Write a haiku about llamas", max_tokens=50)
    await room.host.start(rnd["id"])
    cards = page.locator(".card")
    await expect(cards).to_have_count(2)
    await expect(page.locator("#prompt")).to_have_text("Write a haiku about llamas")
    await expect(page.locator("#round-status")).to_have_text("live")
    await ana.recv("challenge")
    await ana.stream(rnd["index"], WORDS)
    await ana.complete(rnd["index"], len(WORDS), model_info={**MODEL_INFO, "eval_count": 50,
                                                             "eval_duration": 2_000_000_000})
    await ana.sync()
    await bia.recv("challenge")
    await bia.stream(rnd["index"], WORDS[:2])
    await bia.sync()
    ana_card, bia_card = cards.filter(has_text="Ana"), cards.filter(has_text="Bia")
    await expect(ana_card.locator("pre")).to_have_text("".join(WORDS))
    await expect(ana_card.locator(".count")).to_have_text("tokens5 / 50")
    await expect(ana_card.locator(".state")).to_have_text("done")
    await expect(ana_card.locator(".stats")).to_contain_text("engine 25.0")
    await expect(bia_card.locator("pre")).to_have_text("".join(WORDS[:2]))
    await expect(bia_card.locator(".state")).to_have_text("generating")
    await expect(page.locator("#n-done")).to_have_text("1")
    await page.screenshot(path=tmp_path / "arena-streaming.png")
    await bia.ws.close()
    await expect(bia_card.locator(".state")).to_have_text("dropped")
    await page.reload()                             # the projector's tab reloaded mid-round loses nothing
    await expect(ana_card.locator("pre")).to_have_text("".join(WORDS))
    await expect(ana_card.locator(".state")).to_have_text("done")
    await expect(ana_card.locator(".stats")).to_contain_text("engine 25.0")
    await expect(bia_card.locator("pre")).to_have_text("".join(WORDS[:2]))
    await expect(bia_card.locator(".state")).to_have_text("dropped")
    await room.host.stop(rnd["id"])                 # voting opens: the header says so, with the QR code
    await expect(page.locator("#round-status")).to_have_text("voting open")
    await expect(page.locator("#vote-now")).to_be_visible()
    assert await qr_text(page, "#qr-small") == await page.text_content("#vote-url")


async def test_a_long_answer_shows_its_latest_lines(room: Room, pin: str, tab: Callable) -> None:
    """A card shows the end of a long answer, as it streams; the page keeps only that end, so the
    hundredth thousand token costs no more to draw than the first."""
    ana = await room.runner("ana", pin)
    page = await tab(room.base + "/")
    await expect(page.locator("#people li")).to_have_count(1)
    rnd = await room.host.start((await room.host.new_round(max_tokens=5000))["id"])
    words = [f"word{n:04} " for n in range(2000)]
    await answered(room, rnd, {"ana": ana}, words)
    text = page.locator(".card pre")
    await expect(text).to_contain_text("word1999")
    shown = await text.text_content()
    assert "".join(words).endswith(shown) and 1000 < len(shown) <= 4000
    await expect(page.locator(".card .count b")).to_have_text("2000")


async def test_an_svg_answer_is_drawn_and_its_script_runs_nothing(room: Room, pin: str, tab: Callable,
                                                                  tmp_path: Path) -> None:
    """An SVG round shows each drawing, also cut off mid-way, as an image, on the big screen and the phones:
    its script and handlers never run."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    page = await tab(room.base + "/")
    rnd = await room.host.new_round("Draw a llama", svg_mode=True)
    await room.host.start(rnd["id"])
    evil = ['Here: <svg viewBox="0 0 10 10"><script>document.title="pwned"</script>',
            '<rect width="10" height="10" fill="red" onload="document.title=\'pwned\'"/>', '</svg>']
    await answered(room, rnd, {"ana": ana}, evil)
    await answered(room, rnd, {"bia": bia}, ['<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10">',
                                             '<g><circle r="4" cx="5" cy="5" fill="blue"/>', '<rect x="1'])
    images = page.locator(".card img.svg-answer")
    await expect(images).to_have_count(2)
    await page.screenshot(path=tmp_path / "arena-svg.png")
    for i in range(2):
        assert await images.nth(i).evaluate("img => img.decode().then(() => img.naturalWidth > 0)")
    assert await page.title() == "Gambiarra arena"
    await room.host.stop(rnd["id"])                 # the phones show the drawings too, just as safely
    phone = await tab(room.base + "/voting", 360, 740)
    drawings = phone.locator(".answer img.svg-answer")
    await expect(drawings).to_have_count(2)
    assert await drawings.nth(0).evaluate("img => img.decode().then(() => img.naturalWidth > 0)")
    assert await phone.title() == "Vote: Gambiarra arena"


async def test_a_tap_on_the_phone_votes_and_the_vote_stays_cast(room: Room, pin: str, tab: Callable,
                                                                tmp_path: Path) -> None:
    """On a 360-px phone, voting open: every answer with buttons 0 to 5; a tap changes the scoreboard,
    and after a reload the vote still shows as cast. The page and its first data weigh under 100 KB."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.new_round()
    await room.host.start(rnd["id"])
    await answered(room, rnd, {"ana": ana, "bia": bia})
    page = await tab(room.base + "/voting", 360, 740)
    await expect(page.locator("#message")).to_contain_text("The round is on")
    loaded: list[Any] = []
    page.on("response", lambda response: loaded.append(response))
    await room.host.stop(rnd["id"])
    answer = page.locator(".answer").filter(has_text="Ana")
    await expect(page.locator(".answer")).to_have_count(2)
    assert await answer.locator("button").all_text_contents() == ["0", "1", "2", "3", "4", "5"]
    await expect(answer.locator("pre")).to_have_text("".join(WORDS))
    await answer.get_by_role("button", name="4", exact=True).click()
    await expect(answer.locator(".cast-note")).to_have_text("Your vote: 4")
    board = await get_when(room, "/scoreboard", lambda b: any(e["votes"] for e in b["scoreboard"]))
    assert [(e["nickname"], e["votes"], e["avg_score"]) for e in board["scoreboard"]] == [("Ana", 1, 4.0), ("Bia", 0, 0.0)]
    await page.screenshot(path=tmp_path / "voting.png", full_page=True)
    async with room.host.http.get(room.base + "/voting", headers={"Accept": "text/html"}) as response:
        weight = len(await response.read())
    data = sum([len(await response.body()) for response in loaded if response.request.resource_type == "fetch"])
    assert weight + data < 100_000, (weight, data)
    await page.reload()
    await expect(answer.locator(".cast-note")).to_have_text("Your vote: 4")
    await expect(answer.get_by_role("button", name="4", exact=True)).to_be_disabled()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360       # nothing wider than the phone



async def test_the_host_panel_drives_a_whole_round(room: Room, tab: Callable, tmp_path: Path) -> None:
    """From the host's laptop, without a token: a new session shows its PIN, a runner joins with it, and
    the panel's buttons start, stop, close, reveal; a refusal is shown in the API's words; a new session
    mid-evening is asked about first, and nothing happens unless the host says yes."""
    page = await tab(room.base + "/admin")
    await page.get_by_role("button", name="New session").click()
    await expect(page.locator("#pin")).to_have_text(re.compile(r"^\d{6}$"))
    ana = await room.runner("ana", await page.text_content("#pin"))
    await expect(page.locator("#people")).to_contain_text("Ana")
    for field, value in {"#prompt": "Write a haiku about llamas", "#max-tokens": "64", "#temperature": "0.5",
                         "#deadline": "30", "#seed": "42"}.items():
        await page.fill(field, value)
    await page.get_by_role("button", name="Create and start").click()
    challenge = await ana.recv("challenge")
    assert {key: challenge[key] for key in ("round", "prompt", "max_tokens", "temperature", "deadline_ms", "seed")} == {
        "round": 1, "prompt": "Write a haiku about llamas", "max_tokens": 64, "temperature": 0.5,
        "deadline_ms": 30_000, "seed": 42}
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await ana.sync()
    steps = [("Stop the round", "voting open"), ("Close voting", "voting closed"), ("Start the reveal", "(0 shown)"),
             ("Reveal next", "(1 shown)")]
    for button, shown in steps:
        await page.get_by_role("button", name=button).click()
        await expect(page.locator("#round-line")).to_contain_text(shown)
    tab.expected.append("status of 409")
    await page.get_by_role("button", name="Reveal next").click()
    await expect(page.locator("#problem")).to_have_text("Every position is already revealed")
    await page.screenshot(path=tmp_path / "admin.png")
    board = await room.host.call("GET", "/scoreboard")
    assert (board["votingStatus"], board["revealedCount"]) == ("revealed", 1)
    async with page.expect_download() as download:
        await page.get_by_role("button", name="answers.csv").click()
    file = await download.value
    assert re.fullmatch(r"session-[0-9a-f-]+\.csv", file.suggested_filename)
    assert "".join(WORDS) in Path(await file.path()).read_text()
    pin = await page.text_content("#pin")
    asked: list[str] = []

    async def answer(dialog: Any, accept: bool) -> None:
        asked.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())
    page.once("dialog", lambda dialog: answer(dialog, False))      # mid-evening, New session asks first
    await page.get_by_role("button", name="New session").click()
    await expect(page.locator("#pin")).to_have_text(pin)
    assert "every connected runner (1) is sent away" in asked[0]
    page.once("dialog", lambda dialog: answer(dialog, True))
    await page.get_by_role("button", name="New session").click()
    await expect(page.locator("#pin")).not_to_have_text(pin)
    assert await ana.closed() == (1000, "session ended")


async def test_from_another_device_the_host_panel_asks_once_for_the_admin_token(make_room: Callable,
                                                                                tab: Callable) -> None:
    """Off the host's machine the panel's first host step is refused in the API's words and asks for the
    token; with it typed, the step works, and the tab keeps it."""
    room = await make_room(host_addresses=("192.0.2.1/32",), admin_token="s3cret-token")
    tab.expected.append("status of 401")
    page = await tab(room.base + "/admin")
    await page.get_by_role("button", name="New session").click()
    await expect(page.locator("#problem")).to_contain_text("This is a host route")
    await page.fill("#token", "s3cret-token")
    await page.get_by_role("button", name="Use").click()
    await page.get_by_role("button", name="New session").click()
    await expect(page.locator("#pin")).to_have_text(re.compile(r"^\d{6}$"))
    await page.reload()
    await expect(page.locator("#pin")).to_have_text(re.compile(r"^\d{6}$"))     # the token stayed with the tab


async def test_the_scoreboard_reveals_last_place_first_then_the_winner(room: Room, pin: str, tab: Callable,
                                                                       tmp_path: Path) -> None:
    """Votes counted while voting is open; then each reveal-next adds the next place from the bottom;
    the last one shows the winner with its answer."""
    runners = {name: await room.runner(name, pin) for name in ("ana", "bia", "caio")}
    rnd = await room.host.new_round()
    await room.host.start(rnd["id"])
    await answered(room, rnd, runners)
    await room.host.stop(rnd["id"])
    page = await tab(room.base + "/scoreboard")
    for voter, scores in {"v1": {"ana": 2, "bia": 5, "caio": 3}, "v2": {"ana": 1, "bia": 4, "caio": 3}}.items():
        for name, score in scores.items():
            await room.host.vote(rnd["id"], name, score, voter)
    await expect(page.locator("#message")).to_contain_text("6 votes so far for 3 answers")
    await room.host.call("POST", f"/rounds/{rnd['id']}/close-voting")
    await room.host.call("POST", f"/rounds/{rnd['id']}/reveal")
    places = page.locator("#ranking li .name")
    for shown in (["Ana"], ["Caio", "Ana"], ["Bia", "Caio", "Ana"]):
        await room.host.call("POST", f"/rounds/{rnd['id']}/reveal-next")
        await expect(places).to_have_count(len(shown))
        assert [name.split("llama")[0] for name in await places.all_text_contents()] == shown
    await expect(page.locator("#winner h2")).to_have_text("Bia")
    await expect(page.locator("#winner pre")).to_have_text("".join(WORDS))
    await page.screenshot(path=tmp_path / "scoreboard.png")



async def test_each_phone_orders_the_answers_its_own_way_and_late_answers_join(room: Room, pin: str,
                                                                              tab: Callable) -> None:
    """No answer always comes first: phones list the answers in orders of their own, each the same after
    a reload; an answer that completes after the stop appears on the open page."""
    runners = {name: await room.runner(name, pin) for name in ("ana", "bia", "caio", "dani", "edu")}
    rnd = await room.host.new_round()
    await room.host.start(rnd["id"])
    late = runners.pop("edu")
    await answered(room, rnd, runners)
    await late.recv("challenge")
    page = await tab(room.base + "/voting", 360, 740, "localStorage.setItem('voterId', 'phone-0')")
    await room.host.stop(rnd["id"])
    await expect(page.locator(".answer")).to_have_count(4)
    first = await page.locator(".answer h2").all_text_contents()
    await late.stream(rnd["index"], WORDS)          # within STOP_GRACE: kept
    await late.complete(rnd["index"], len(WORDS))
    await expect(page.locator(".answer")).to_have_count(5)
    assert [name for name in await page.locator(".answer h2").all_text_contents() if name != "Edu"] == first
    orders = []
    for phone in range(4):
        page = await tab(room.base + "/voting", 360, 740, f"localStorage.setItem('voterId', 'phone-{phone}')")
        await expect(page.locator(".answer")).to_have_count(5)
        orders.append(await page.locator(".answer h2").all_text_contents())
    assert len({order[0] for order in orders}) > 1, orders
    await page.reload()
    await expect(page.locator(".answer")).to_have_count(5)
    assert await page.locator(".answer h2").all_text_contents() == orders[-1]


async def test_the_phone_page_survives_the_server_restarting(server_process: Callable, http: aiohttp.ClientSession,
                                                            tab: Callable) -> None:
    """The server stops and comes back on the same port: the phone says it is reconnecting, then shows
    the answers again by itself, and a tap still votes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    first = server_process("--port", port)
    room = Room(first.start(), http)
    pin = await room.host.new_session()
    ana = await room.runner("ana", pin)
    rnd = await room.host.start((await room.host.new_round())["id"])
    await answered(room, rnd, {"ana": ana})
    await room.host.stop(rnd["id"])
    page = await tab(room.base + "/voting", 360, 740)
    await expect(page.locator(".answer")).to_have_count(1)
    # While the server is away the browser reports the refused connections: expected here.
    tab.expected += ["ERR_CONNECTION_REFUSED", "WebSocket connection to .* failed"]
    await asyncio.to_thread(first.stop)
    await room.close()
    await expect(page.locator("#offline")).to_be_visible()
    server_process("--port", port).start()
    await expect(page.locator("#offline")).to_be_hidden(timeout=20_000)
    await expect(page.locator(".answer")).to_have_count(1)
    await page.get_by_role("button", name="5", exact=True).click()
    await expect(page.locator(".cast-note")).to_have_text("Your vote: 5")
    board = await room.host.call("GET", "/scoreboard")
    assert [(e["nickname"], e["votes"]) for e in board["scoreboard"]] == [("Ana", 1)]



async def test_bench_the_big_screen_with_60_cards_at_100_tokens_a_second(room: Room, pin: str, tab: Callable,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A benchmark, printed and not asserted (machines are noisy): frames per second and main-thread busy
    time of / while 60 runners stream 100 tokens/s each for 3 s, and the weight of /voting. What is
    asserted is what the room sees: every card ends with its whole text."""
    runners = [await room.runner(f"runner-{n:02}", pin) for n in range(60)]
    page = await tab(room.base + "/")
    rnd = await room.host.start((await room.host.new_round(max_tokens=1000))["id"])
    await expect(page.locator(".card")).to_have_count(60)
    for runner in runners:
        await runner.recv("challenge")
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Performance.enable")
    before = {m["name"]: m["value"] for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
    await page.evaluate("window.frames_seen = 0; (function count() { frames_seen++; requestAnimationFrame(count); })()")
    ticks, per_tick, tick_s = 60, 5, 0.05           # 5 tokens per runner every 50 ms: 100 tokens/s each
    started = time.monotonic()
    for tick in range(ticks):
        for runner in runners:
            await runner.stream(rnd["index"], ["tok "] * per_tick, tick * per_tick)
        await asyncio.sleep(max(0.0, started + (tick + 1) * tick_s - time.monotonic()))
    for runner in runners:
        await runner.sync()
    texts = page.locator(".card pre")
    await expect(texts.nth(59)).to_have_text("tok " * ticks * per_tick, timeout=20_000)
    elapsed = time.monotonic() - started
    after = {m["name"]: m["value"] for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
    frames = await page.evaluate("frames_seen")
    assert await texts.all_text_contents() == ["tok " * ticks * per_tick] * 60
    async with room.host.http.get(room.base + "/voting", headers={"Accept": "text/html"}) as response:
        weight = len(await response.read())
    with capsys.disabled():
        print(f"\n  / with 60 cards at 100 tokens/s for {elapsed:.1f} s: {frames / elapsed:.0f} frames/s, main thread "
              f"busy {100 * (after['TaskDuration'] - before['TaskDuration']) / elapsed:.0f}% (script "
              f"{after['ScriptDuration'] - before['ScriptDuration']:.2f} s, layout "
              f"{after['LayoutDuration'] - before['LayoutDuration']:.2f} s, style "
              f"{after['RecalcStyleDuration'] - before['RecalcStyleDuration']:.2f} s); /voting weighs {weight} bytes")


# =============================================================================
# The README is the front door: it names every option, route and message
# =============================================================================

def test_the_readme_documents_every_option_route_and_message() -> None:
    """A new env var, route or message type that the README does not mention fails here."""
    readme = (HERE / "README.md").read_text()
    for f in fields(gs.Config):
        env = f.metadata["env"]
        assert f"`{env}`" in readme and f"`--{env.lower().replace('_', '-')}`" in readme, env
    for route in gs.ROUTES:
        assert f"`{route.path}`" in readme, route.path
    for kind in gs.ON_MESSAGE:
        assert f"`{kind}`" in readme, kind
    test_command = next(line for line in readme.splitlines() if "-m pytest" in line)
    assert test_command in (HERE / ".ci" / "run").read_text()


# =============================================================================
# Runner: join
# =============================================================================
#
# `join` runs as a subprocess, as a participant runs it, against the real server
# and against fake engines served by aiohttp here: ollama's JSON-lines /api/chat
# and an OpenAI-compatible SSE /v1/chat/completions, frame for frame.

JOIN_TIMEOUT_S = 3 * TIMEOUT_S     # a new Python process on a busy machine: imports, engine probe, connect
ENGINE_WORDS = ["Lhamas ", "pastam ", "no ", "silício", ", ", "🦙 ", "sonham ", "com ", "GPUs", "."]
OLLAMA_DONE = {"total_duration": 900_000_000, "load_duration": 50_000_000, "prompt_eval_count": 12,
               "prompt_eval_duration": 40_000_000, "eval_count": 10, "eval_duration": 250_000_000}


class FakeEngine:
    """A local engine's HTTP API with a scripted answer; it records what it was asked."""

    def __init__(self, words: list[str] = ENGINE_WORDS, pace_s: float = 0.0, fail_after: int | None = None,
                 usage: bool = True, timings: bool = False, refuse_stream_options: bool = False,
                 odd: list[Any] = ()) -> None:
        self.words, self.pace_s, self.fail_after = words, pace_s, fail_after
        self.usage, self.timings, self.refuse_stream_options = usage, timings, refuse_stream_options
        self.odd = list(odd)            # chunks of unexpected shapes, streamed after the first word
        self.requests: list[dict[str, Any]] = []
        self.app = aiohttp.web.Application()
        self.app.router.add_get("/api/tags", self.tags)
        self.app.router.add_post("/api/chat", self.ollama_chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.openai_chat)

    async def tags(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"models": [{"name": "llama3.1:8b", "model": "llama3.1:8b", "size": 1}]})

    async def models(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"object": "list", "data": [
            {"id": "qwen2.5-7b-instruct", "object": "model", "owned_by": "llamacpp" if self.timings else "me"}]})

    async def stream(self, request: aiohttp.web.Request, frames: list[bytes], content_type: str) -> Any:
        """Write `frames` one by one at the engine's pace; cut the connection at `fail_after`."""
        response = aiohttp.web.StreamResponse(headers={"Content-Type": content_type})
        try:
            await response.prepare(request)
            for i, frame in enumerate(frames):
                if i == self.fail_after:
                    request.transport.abort()           # the engine process dies mid-answer
                    return response
                await response.write(frame)
                await asyncio.sleep(self.pace_s)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass                                        # join hung up: a new round, or the deadline
        return response

    async def ollama_chat(self, request: aiohttp.web.Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        model = body["model"]
        lines = [{"model": model, "message": {"role": "assistant", "content": w}, "done": False} for w in self.words]
        lines[1:1] = self.odd
        lines.append({"model": model, "message": {"role": "assistant", "content": ""}, "done": True,
                      "done_reason": "stop", **OLLAMA_DONE})
        return await self.stream(request, [json.dumps(line).encode() + b"\n" for line in lines],
                                 "application/x-ndjson")

    async def openai_chat(self, request: aiohttp.web.Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        if "stream_options" in body and self.refuse_stream_options:
            return aiohttp.web.json_response({"error": {"message": "Unrecognized request argument supplied: "
                                                                   "stream_options"}}, status=400)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": w}) for w in self.words]
        events[2:2] = self.odd
        events.append(chunk({}, "stop", **({"timings": {"predicted_n": 10, "predicted_per_second": 41.5}}
                                           if self.timings else {})))
        if body.get("stream_options", {}).get("include_usage") and self.usage:
            events.append({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}})
        frames = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
        return await self.stream(request, frames, "text/event-stream")


@pytest.fixture
async def engine(aiohttp_server: Any) -> Callable:
    """Start a fake engine; gives the engine and its base URL."""
    async def start(**script: Any) -> tuple[FakeEngine, str]:
        fake = FakeEngine(**script)
        server = await aiohttp_server(fake.app, host="127.0.0.1")
        return fake, str(server.make_url("")).rstrip("/")
    return start


class JoinProcess:
    """`gambiarra_server.py join` as a participant runs it; its terminal output is collected as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = ""
        self.reader = asyncio.ensure_future(self.read())

    async def read(self) -> None:
        while chunk := await self.process.stdout.read(4096):
            self.output += chunk.decode(errors="replace")

    async def says(self, text: str) -> None:
        await eventually(lambda: text in self.output, f"join says {text!r}", JOIN_TIMEOUT_S)

    async def exits(self) -> tuple[int, str]:
        """Wait for join to end by itself; its exit code and what it printed on stderr."""
        async with asyncio.timeout(JOIN_TIMEOUT_S):
            code = await self.process.wait()
            await self.reader
        return code, (await self.process.stderr.read()).decode()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        await self.reader


@pytest.fixture
async def join(tmp_path: Path) -> Callable:
    """Start `join` with some flags (and env vars); it keeps its participant ids in a temporary config folder."""
    started: list[JoinProcess] = []

    async def start(*args: str, **env: str) -> JoinProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "gambiarra_server.py"), "join", "--nickname", "Ana", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "PYTHONUNBUFFERED": "1", **env})
        started.append(JoinProcess(process))
        return started[-1]
    yield start
    for process in started:
        await process.stop()


async def stored_answer(room: Room, round_id: str, participant_id: str = "ana") -> dict[str, Any]:
    """The scoreboard row of an answer, once its `complete` has arrived."""
    async def probe() -> Any:
        board = await room.host.call("GET", f"/scoreboard?roundId={round_id}")
        return next((row for row in board["scoreboard"] if row["participant_id"] == participant_id), None)
    return await eventually(probe, "the answer is stored", JOIN_TIMEOUT_S)


async def model_info(room: Room, participant_id: str = "ana") -> dict[str, Any]:
    tree = json.loads((await export(room, "/export-all.json"))[0])
    return next(m["modelInfo"] for r in tree["rounds"] for m in r["metrics"] if m["participantId"] == participant_id)


async def test_join_answers_with_ollama_and_the_engine_metrics_are_kept(room: Room, pin: str, engine: Callable,
                                                                      join: Callable) -> None:
    """Sloppy addresses (no scheme, a trailing /api) are mended; the challenge reaches ollama as sent; the
    stored answer is exactly what ollama streamed (its empty last chunk is no token), with ollama's counters
    in model_info and its own tokens/s beside the server's on the scoreboard and in the CSV."""
    fake, engine_url = await engine()
    runner = await join("--url", room.base.removeprefix("http://"), "--pin", pin, "--participant-id", "ana",
                        "--engine", "ollama", "--engine-url", engine_url.removeprefix("http://") + "/api",
                        "--model", "llama3.1:8b")
    await runner.says("waiting for a challenge")
    rnd = await room.host.start((await room.host.new_round("Um haiku?", maxTokens=50, temperature=0.3,
                                                           seed=42))["id"])
    row = await stored_answer(room, rnd["id"])
    assert (row["generated_content"], row["tokens"]) == ("".join(ENGINE_WORDS), len(ENGINE_WORDS))
    assert row["engine_tps"] == 40.0                            # 10 tokens in 250 ms, by ollama's clock
    assert fake.requests == [{"model": "llama3.1:8b", "messages": [{"role": "user", "content": "Um haiku?"}],
                              "stream": True, "options": {"num_predict": 50, "temperature": 0.3, "seed": 42}}]
    info = await model_info(room)
    assert {key: info[key] for key in OLLAMA_DONE} == OLLAMA_DONE
    assert (info["name"], info["runner"]) == ("llama3.1:8b", "ollama") and info["os"] and info["cpu"]
    [csv_row] = csv_rows((await export(room, "/export.csv"))[0])
    assert (csv_row["tokens_received"], csv_row["seq_gaps"], csv_row["engine_tps"]) == ("10", "0", "40.0")
    await runner.says("10 tokens in")
    assert "engine 40.0 tokens/s" in runner.output and "".join(ENGINE_WORDS) in runner.output


@pytest.mark.parametrize(("script", "engine_tps", "counters"), [
    ({"timings": True}, 41.5, {"timings", "usage"}),                    # llama.cpp's server
    ({}, Like("tokens / duration_ms", lambda v: v > 0), {"usage"}),     # LM Studio, vLLM: usage on request
    ({"refuse_stream_options": True}, None, set()),                     # an older server refuses stream_options
])
async def test_join_speaks_openai_sse(room: Room, pin: str, engine: Callable, join: Callable,
                                      script: dict[str, Any], engine_tps: Any, counters: set[str]) -> None:
    """Any OpenAI-compatible SSE stream (chosen by the /v1 of its address): the answer is stored whole,
    `usage` is asked for (and asked again without it when refused), the engine's counters reach
    model_info, and the round's seed (drawn by the server when the host gave none) is passed on."""
    fake, engine_url = await engine(**script)
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana", "--engine-url",
                        engine_url + "/v1/")
    await runner.says("waiting for a challenge")
    assert f"engine: openai at {engine_url}\n" in runner.output     # the typed /v1 says which API to speak
    rnd = await room.host.start((await room.host.new_round("Um haiku?", maxTokens=30))["id"])
    row = await stored_answer(room, rnd["id"])
    assert (row["generated_content"], row["tokens"], row["engine_tps"]) == (
        "".join(ENGINE_WORDS), len(ENGINE_WORDS), engine_tps)
    info = await model_info(room)
    assert {"usage", "timings"} & set(info) == counters
    assert info["name"] == "qwen2.5-7b-instruct"                # no --model: the engine's first
    asked = fake.requests[-1]
    assert {key: asked.get(key) for key in ("max_tokens", "temperature", "seed", "stream")} == {
        "max_tokens": 30, "temperature": 0.8, "seed": rnd["seed"], "stream": True}
    assert [("stream_options" in r) for r in fake.requests] == (
        [True, False] if script.get("refuse_stream_options") else [True])


@pytest.mark.parametrize(("engine_url_path", "odd"), [
    ("", [{"message": "x"}, {"message": {"content": 5}}, {"message": None}, {"model": "m"}]),
    ("/v1", [{"choices": "x"}, {"choices": [5, {"delta": "x"}, {"delta": {"content": 7}}]}, {"usage": "x"}]),
], ids=["ollama", "openai"])
async def test_odd_shaped_chunks_from_the_engine_carry_no_text_and_break_nothing(
        room: Room, pin: str, engine: Callable, join: Callable, engine_url_path: str, odd: list[Any]) -> None:
    """An engine's chunk of an unexpected shape (a string for an object, a number for text) adds nothing to
    the answer: the rest streams, completes and is stored whole."""
    fake, engine_url = await engine(odd=odd)
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana",
                        "--engine-url", engine_url + engine_url_path)
    await runner.says("waiting for a challenge")
    rnd = await room.host.start((await room.host.new_round())["id"])
    row = await stored_answer(room, rnd["id"])
    assert (row["generated_content"], row["tokens"]) == ("".join(ENGINE_WORDS), len(ENGINE_WORDS))
    await runner.says("the arena has all 10 tokens")
    assert "internal error" not in runner.output


async def test_join_passes_on_an_emoji_its_engine_split_in_two(room: Room, pin: str, engine: Callable,
                                                                join: Callable) -> None:
    """An engine that streams 🦙 as its two UTF-16 halves (JSON escapes, as a JavaScript server may): join
    shows the emoji whole, sends the halves as they came (it used to fail every send and reconnect for
    ever), and the arena stores the emoji whole."""
    fake, engine_url = await engine(words=["Olá ", "\ud83e", "\udd99", " fim"])
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana", "--engine", "ollama",
                        "--engine-url", engine_url)
    await runner.says("waiting for a challenge")
    rnd = await room.host.start((await room.host.new_round())["id"])
    assert (await stored_answer(room, rnd["id"]))["generated_content"] == "Olá 🦙 fim"
    await runner.says("round 1: the arena has all 4 tokens")
    assert "Olá 🦙 fim" in runner.output and "internal error" not in runner.output


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, id="SIGTERM"),
                                    pytest.param(signal.SIGKILL, id="SIGKILL")])
async def test_join_loses_nothing_when_the_arena_restarts_mid_answer(server_process: Callable, engine: Callable,
                                                                     join: Callable, http: aiohttp.ClientSession,
                                                                     signum: int) -> None:
    """The arena stops mid-answer (SIGTERM: close 1001; SIGKILL: tokens of the last second unsaved) and
    comes back on the same port and database: join keeps generating meanwhile, reconnects, resends exactly
    what the arena lacks, and completes; the stored answer is the engine's, whole and without gaps."""
    words = [f"w{i} " for i in range(60)]
    fake, engine_url = await engine(words=words, pace_s=0.03)
    first = server_process()
    room = Room(first.start(), http)
    port = urllib.parse.urlsplit(room.base).port
    pin = await room.host.new_session()
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana", "--engine", "ollama",
                        "--engine-url", engine_url)
    await runner.says("waiting for a challenge")
    rnd = await room.host.start((await room.host.new_round(maxTokens=100))["id"])
    await get_when(room, "/rounds/current", lambda r: len(r["liveTokens"].get("ana", [])) >= 10)
    assert await asyncio.to_thread(first.stop, signum) == (0 if signum == signal.SIGTERM else -signum)
    room = Room(server_process("--port", str(port)).start(), http)
    row = await stored_answer(room, rnd["id"])
    assert (row["generated_content"], row["tokens"]) == ("".join(words), len(words))
    [csv_row] = csv_rows((await export(room, "/export.csv"))[0])
    assert (csv_row["tokens_received"], csv_row["seq_gaps"], csv_row["rescued"]) == (str(len(words)), "0", "0")
    assert "back in the arena" in runner.output


async def test_join_sends_back_the_resume_secret_it_was_given(aiohttp_server: Any, join: Callable) -> None:
    """An arena that gives a `resume_secret` in `registered` gets it back in the next `register`, after a
    restart (1001); the first `register` has none."""
    registers: list[dict[str, Any]] = []

    async def arena(request: aiohttp.web.Request) -> aiohttp.web.WebSocketResponse:
        ws = aiohttp.web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            registers.append(json.loads(msg.data))
            await ws.send_json({"type": "registered", "session_id": "s1", "participant_id": "ana",
                                "resume_secret": f"secret-{len(registers)}"})
            if len(registers) == 1:
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
        return ws
    app = aiohttp.web.Application()
    app.router.add_get("/ws", arena)
    server = await aiohttp_server(app, host="127.0.0.1")
    runner = await join("--url", str(server.make_url("/ws")), "--pin", "123456", "--participant-id", "ana",
                        "--engine", "mock")
    await eventually(lambda: len(registers) == 2)
    assert "resume_secret" not in registers[0] and registers[1]["resume_secret"] == "secret-1"
    await runner.says("back in the arena")


async def test_join_skips_a_challenge_it_cannot_read_and_answers_the_next(aiohttp_server: Any,
                                                                          join: Callable) -> None:
    """An arena (not ours) whose challenge has a field of another type: join says so, skips it and answers
    the next challenge whole, where the answer used to fail inside."""
    completes: list[dict[str, Any]] = []
    challenge = {"type": "challenge", "session_id": "s1", "prompt": "oi", "max_tokens": 3, "temperature": 0.5}

    async def arena(request: aiohttp.web.Request) -> aiohttp.web.WebSocketResponse:
        ws = aiohttp.web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            m = json.loads(msg.data)
            if m["type"] == "register":
                await ws.send_json({"type": "registered", "session_id": "s1", "participant_id": "ana"})
                await ws.send_json({**challenge, "round": 1, "deadline_ms": "90 s"})
                await ws.send_json({**challenge, "round": 2, "deadline_ms": 90_000})
            elif m["type"] == "complete":
                completes.append(m)
        return ws
    app = aiohttp.web.Application()
    app.router.add_get("/ws", arena)
    server = await aiohttp_server(app, host="127.0.0.1")
    runner = await join("--url", str(server.make_url("/ws")), "--pin", "123456", "--participant-id", "ana",
                        "--engine", "mock", "--mock-rate", "1000")
    await runner.says("the arena sent a challenge that join cannot read (deadline_ms missing or of another type)")
    await eventually(lambda: completes, "the next challenge answered")
    assert [c["round"] for c in completes] == [2] and 1 <= completes[0]["tokens"] <= 3    # the mock's length


async def test_an_engine_failing_mid_answer_is_explained_and_reported(room: Room, pin: str, engine: Callable,
                                                                      join: Callable) -> None:
    """The engine dies after three tokens: the participant reads why, the arena keeps the three tokens and
    gets an `error` (GENERATION_FAILED), and join stays in the game for the next round."""
    fake, engine_url = await engine(fail_after=3)
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana", "--engine-url", engine_url)
    await runner.says("waiting for a challenge")
    assert "engine: ollama at" in runner.output                 # found by asking, with no --engine
    await room.host.start((await room.host.new_round())["id"])
    await runner.says("the engine failed after 3 tokens")
    assert "the arena is told" in runner.output

    async def reported() -> Any:
        events = json.loads((await export(room, "/export-all.json"))[0])["events"]
        return [e["metadata"] for e in events if e["eventType"] == "generation_failed"]
    [failure] = await eventually(reported)
    assert (failure["roundIndex"], failure["code"]) == (1, "GENERATION_FAILED") and "stopped" in failure["message"]
    assert (await room.host.call("GET", "/rounds/current"))["liveTokens"] == {"ana": ENGINE_WORDS[:3]}
    assert runner.process.returncode is None


async def join_stopped_mid_answer(room: Room, pin: str, engine: Callable, join: Callable) -> JoinProcess:
    """join with a slow model, stopped by the host in round 1 once five tokens are in; its engine then
    answers ENGINE_WORDS."""
    fake, engine_url = await engine(words=[f"w{i} " for i in range(200)], pace_s=0.02)
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana", "--engine", "ollama",
                        "--engine-url", engine_url)
    await runner.says("waiting for a challenge")
    first = await room.host.start((await room.host.new_round(maxTokens=400))["id"])
    await get_when(room, "/rounds/current", lambda r: len(r["liveTokens"].get("ana", [])) >= 5)
    await room.host.stop(first["id"])
    fake.words = ENGINE_WORDS
    return runner


async def test_a_new_challenge_while_generating_stops_the_old_answer_first(room: Room, pin: str, engine: Callable,
                                                                           join: Callable) -> None:
    """The host stops round 1 and starts round 2 while join is still generating round 1: round 1 stops
    there (the participant is told) before round 2 starts, and round 2 is answered whole."""
    runner = await join_stopped_mid_answer(room, pin, engine, join)
    second = await room.host.start((await room.host.new_round(maxTokens=400))["id"])
    row = await stored_answer(room, second["id"])
    assert row["generated_content"] == "".join(ENGINE_WORDS)
    assert "round 2 arrived while round 1 was still generating" in runner.output
    assert runner.output.index("round 1: stopped after") < runner.output.index("round 2 · max 400 tokens")


async def test_join_stops_at_the_deadline_and_still_completes(room: Room, pin: str, engine: Callable,
                                                              join: Callable) -> None:
    """An engine slower than the round's deadline: join stops there and sends `complete` with what it has."""
    fake, engine_url = await engine(words=[f"w{i} " for i in range(500)], pace_s=0.01)
    runner = await join("--url", room.ws_url, "--pin", pin, "--participant-id", "ana", "--engine", "ollama",
                        "--engine-url", engine_url)
    await runner.says("waiting for a challenge")
    rnd = await room.host.start((await room.host.new_round(maxTokens=1000, deadlineMs=1000))["id"])
    row = await stored_answer(room, rnd["id"])
    assert 0 < row["tokens"] < 500 and row["generated_content"] == "".join(f"w{i} " for i in range(row["tokens"]))
    await runner.says("(stopped at the deadline)")


async def test_join_stops_an_answer_the_arena_no_longer_takes_and_says_so_once(make_room: Callable, engine: Callable,
                                                                              join: Callable) -> None:
    """The host stops the round while the model is still writing: once the grace is over, join stops the
    model and says so in one line (not a line per refused token), claims nothing it did not deliver, and
    answers the next round whole."""
    room = await make_room(stop_grace_s=0.3)
    runner = await join_stopped_mid_answer(room, await room.host.new_session(), engine, join)
    await runner.says("round 1: stopped after")
    assert "(the arena takes no more of it: Round 1 has ended and its answers are frozen" in runner.output
    assert "ROUND_CLOSED" not in runner.output and "the arena has all" not in runner.output
    second = await room.host.start((await room.host.new_round(maxTokens=50))["id"])
    assert (await stored_answer(room, second["id"]))["generated_content"] == "".join(ENGINE_WORDS)
    await runner.says("round 2: the arena has all 10 tokens")


@pytest.mark.parametrize(("flags", "message"), [
    (["--pin", "000000"], "join: wrong PIN: check the digits on the big screen"),
    (["--engine", "ollama", "--model", "gemma3:1b"], "join: model 'gemma3:1b' is not pulled in ollama: "
                                                     "run `ollama pull gemma3:1b` (pulled: llama3.1:8b)"),
    (["--engine-url", "127.0.0.1:9"], "join: nothing answers at http://127.0.0.1:9"),
    (["--pin", ""], "join: pass --pin"),
    (["--url", "PLACE/nothing-here"], "join: ws://PLACE/nothing-here/ws answered HTTP 404, not as the arena"),
])
async def test_join_explains_why_it_cannot_play(room: Room, pin: str, engine: Callable, join: Callable,
                                                flags: list[str], message: str) -> None:
    """A wrong PIN, a model that is not pulled, an engine that is not running, no PIN, an address that is
    not the arena's: a clear sentence, exit 1."""
    fake, engine_url = await engine()
    place = urllib.parse.urlsplit(room.base).netloc
    flags = [flag.replace("PLACE", place) for flag in flags]
    runner = await join("--url", room.ws_url, "--pin", pin, "--engine-url", engine_url, *flags)
    code, stderr = await runner.exits()
    assert code == 1 and stderr.startswith(message.replace("PLACE", place)), stderr


async def test_without_an_engine_join_looks_on_the_usual_ports(engine: Callable,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No --engine and no --engine-url: the usual ports are asked, the first that answers is used and named;
    none answering is a sentence that says what was tried and how to rehearse without a model."""
    fake, engine_url = await engine()
    monkeypatch.setattr(gs, "ENGINE_PROBES", (("ollama", 9, "ollama"),
                                              ("openai", urllib.parse.urlsplit(engine_url).port, "LM Studio")))
    said: list[str] = []
    async with aiohttp.ClientSession() as http:
        found = await gs.find_engine(http, gs.JoinOptions(), said.append)
        assert (found.kind, found.url, found.model) == ("openai", engine_url, "qwen2.5-7b-instruct")
        assert said == [f"engine: LM Studio at {engine_url}"]
        monkeypatch.setattr(gs, "ENGINE_PROBES", (("ollama", 9, "ollama"), ("openai", 9, "LM Studio")))
        with pytest.raises(gs.EngineError, match=r"^no engine answers \(ollama at http://127.0.0.1:9, LM Studio at "
                                                 r"http://127.0.0.1:9\): .* --engine mock$"):
            await gs.find_engine(http, gs.JoinOptions(), said.append)


async def test_join_leaves_when_kicked_and_says_so(room: Room, pin: str, engine: Callable, join: Callable) -> None:
    """A kick is final: join does not reconnect, and says what happened. (Its settings come from env vars.)"""
    fake, engine_url = await engine()
    runner = await join(GAMBIARRA_URL=room.ws_url, GAMBIARRA_PIN=pin, GAMBIARRA_PARTICIPANT_ID="ana",
                        GAMBIARRA_ENGINE_URL=engine_url)
    await runner.says("waiting for a challenge")
    await room.host.call("POST", "/participants/kick", {"participantId": "ana"})
    assert await runner.exits() == (1, "join: the host removed you from this session\n")


async def test_the_join_drill_restarts_the_arena_and_counts_what_was_lost() -> None:
    """join-drill: runners with the mock engine lose the arena to kill -9 mid-round; every one comes back,
    streams again and completes, and the arena holds exactly what each generated."""
    said: list[str] = []
    result = await gs.join_drill(4, 20.0, 2.0, signal.SIGKILL, said.append)
    assert result == {**result, "runners": 4, "signal": "SIGKILL", "tokens_lost": 0, "answers_differing": 0,
                      "reconnects": 4}
    assert result["tokens_generated"] >= 4 * 20 and result["back_and_streaming_s"]["max"] >= 0
    assert said[0] == "4 runners streaming; stopping the arena (SIGKILL)"


@pytest.mark.parametrize(("mend", "typed", "url"), [
    ("arena_url", "127.0.0.1:3000", "ws://127.0.0.1:3000/ws"),             # no scheme: the real incident
    ("arena_url", "192.168.0.10", "ws://192.168.0.10:3000/ws"),
    ("arena_url", "http://arena.local:3000/api", "ws://arena.local:3000/ws"),
    ("arena_url", "https://arena.example/", "wss://arena.example/ws"),
    ("arena_url", "ws://127.0.0.1:3000/ws/", "ws://127.0.0.1:3000/ws"),
    ("arena_url", "  [::1]:3000 ", "ws://[::1]:3000/ws"),
    ("engine_base_url", "127.0.0.1:1234", "http://127.0.0.1:1234"),
    ("engine_base_url", "http://127.0.0.1:1234/v1", "http://127.0.0.1:1234"),       # as LM Studio shows it
    ("engine_base_url", "http://127.0.0.1:1234/v1/", "http://127.0.0.1:1234"),
    ("engine_base_url", "localhost:11434/api", "http://localhost:11434"),
    ("engine_base_url", "http://gpu-box:8080/v1/chat/completions", "http://gpu-box:8080"),
])
def test_sloppy_addresses_are_mended(mend: str, typed: str, url: str) -> None:
    """The arena's address with no scheme, http://, a trailing /api or /, no /ws: all reach /ws. An engine's
    with or without http://, /v1 (as LM Studio and llama.cpp show it) or /api: all reach its root."""
    assert getattr(gs, mend)(typed) == url


def test_the_participant_id_is_kept_per_nickname(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart takes the same seat; another nickname on the same machine gets its own."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    ana = gs.stable_participant_id("Ana Júlia")
    assert re.fullmatch(r"ana-julia-[0-9a-f]{6}", ana)
    assert gs.stable_participant_id("Ana Júlia") == ana
    assert gs.stable_participant_id("李雷").startswith("runner-") and gs.stable_participant_id("Bia") != ana
    assert json.loads((tmp_path / "gambiarra" / "participant-ids.json").read_text())["Ana Júlia"] == ana


@pytest.mark.parametrize(("model_info", "duration_ms", "tps"), [
    ({"eval_count": 10, "eval_duration": 250_000_000}, 900, 40.0),
    ({"timings": {"predicted_per_second": 41.456}}, 900, 41.46),
    ({"usage": {"completion_tokens": 90}}, 3000, 30.0),
    ({"usage": {"completion_tokens": 90}}, None, None),
    ({"eval_count": "10", "eval_duration": 0, "timings": [], "usage": "x"}, 1000, None),
    (None, 1000, None),
])
def test_engine_tokens_per_second_come_from_the_engines_own_counters(model_info: Any, duration_ms: Any,
                                                                     tps: float | None) -> None:
    """ollama's eval counters, else llama.cpp's timings, else OpenAI usage over the runner's duration;
    anything malformed (a runner's report is free JSON) is no figure rather than an error."""
    assert gs.engine_tps(model_info, duration_ms) == tps


# =============================================================================
# Rehearsal: simulate and bench
# =============================================================================

def sim_options(room: Room, pin: str, **overrides: Any) -> gs.SimOptions:
    """A small, fast rehearsal against the test server: bots race, voters tap quickly."""
    return gs.SimOptions(**{"url": room.base, "pin": pin, "bots": 4, "rate": 300.0, "screens": 1, "phones": 3,
                            "voters": 3, "all_voters": 3, "max_tokens": 12, "deadline_ms": 20_000,
                            "vote_pace_s": 0.01, "progress": False, **overrides})


async def answers_and_votes(room: Room, round_id: str) -> dict[str, tuple[str, int, int, int]]:
    """What the server holds for a round: participant -> (content, tokens, votes, total score)."""
    board = await room.host.call("GET", f"/scoreboard?roundId={round_id}")
    return {r["participant_id"]: (r["generated_content"], r["tokens"], r["votes"], r["total_score"])
            for r in board["scoreboard"]}


def expected_scores(options: gs.SimOptions, participant_id: str) -> tuple[int, int]:
    """The votes and total score the simulated phones give an answer."""
    voters = [f"{options.prefix}-voter-{i:03d}" for i in range(options.voters)]
    return len(voters), sum(gs.vote_score(voter, participant_id) for voter in voters)


async def test_simulate_drives_rounds_that_bots_answer_and_phones_vote_on(room: Room, pin: str) -> None:
    """--drive: every bot's whole answer (resent after its drop) and every phone's vote reach the server."""
    options = sim_options(room, pin, drive=True, rounds=2, drop=1.0)
    tally = await asyncio.wait_for(gs.simulate(options), 60)
    assert tally.completes == 8 and tally.votes == 24 and tally.votes_refused == 0 and tally.errors == {}
    assert tally.drops == tally.resumes == 8
    session = await room.host.call("GET", "/session")
    assert sorted(p["id"] for p in session["participants"]) == [f"sim-{i:03d}" for i in range(4)]
    for rnd in session["rounds"]:
        held = await answers_and_votes(room, rnd["id"])
        assert sorted(held) == [f"sim-{i:03d}" for i in range(4)]
        for pid, (content, tokens, votes, total) in held.items():
            assert 1 <= tokens <= options.max_tokens
            assert content == gs.bot_answer(int(pid[-3:]), rnd["index"], tokens)
            assert (votes, total) == expected_scores(options, pid)
        assert rnd["votingStatus"] == "closed"


async def test_simulate_follows_the_host_and_stops_after_its_rounds(room: Room, pin: str) -> None:
    """Without --drive the bots answer the host's round; --rounds 1 ends once the phones have voted."""
    options = sim_options(room, pin, rounds=1, bots=3)
    rehearsal = asyncio.ensure_future(gs.simulate(options))
    async with asyncio.timeout(30):
        await get_when(room, "/presence", lambda presence: presence["connectedCount"] >= 3, timeout_s=30)
        rnd = await room.host.new_round("Um haiku, por favor", maxTokens=10)
        await room.host.start(rnd["id"])
        await get_when(room, f"/scoreboard?roundId={rnd['id']}", lambda board: len(board["scoreboard"]) >= 3,
                       timeout_s=30)
        await room.host.stop(rnd["id"])
        tally = await rehearsal
    assert tally.completes == 3 and tally.votes == 9
    for pid, (content, tokens, votes, total) in (await answers_and_votes(room, rnd["id"])).items():
        assert content == gs.bot_answer(int(pid[-3:]), 1, tokens)
        assert (votes, total) == expected_scores(options, pid)


async def test_answers_for_voting_follow_a_late_answer_and_come_gzipped(room: Room, pin: str) -> None:
    """The shared /responses body changes when an answer arrives after voting opened."""
    ana, bia = await room.runner("ana", pin), await room.runner("bia", pin)
    rnd = await room.host.new_round()
    await room.host.start(rnd["id"])
    await ana.recv("challenge")
    await ana.stream(1, WORDS)
    await ana.complete(1, len(WORDS))
    await get_when(room, f"/scoreboard?roundId={rnd['id']}", lambda board: board["scoreboard"])
    await room.host.stop(rnd["id"])
    first = await room.host.call("GET", f"/api/rounds/{rnd['id']}/responses")
    assert [r["participant_id"] for r in first["responses"]] == ["ana"]
    await bia.stream(1, ["Tarde, ", "mas ", "chegou."])
    await bia.complete(1, 3)
    await get_when(room, f"/api/rounds/{rnd['id']}/responses", lambda body: len(body["responses"]) == 2)
    async with room.host.http.get(f"{room.base}/api/rounds/{rnd['id']}/responses",
                                  headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        late = json.loads(gzip.decompress(await response.read()))
    assert {r["participant_id"]: r["generated_content"] for r in late["responses"]} == {
        "ana": "".join(WORDS), "bia": "Tarde, mas chegou."}


def test_a_batch_of_votes_refuses_each_bad_vote_on_its_own_and_numbers_the_rest(tmp_path: Path) -> None:
    """One transaction, one verdict per vote: duplicates (even within the batch) and strangers are refused."""
    conn = gs.open_db(tmp_path / "votes.db")
    try:
        session = gs.create_session(conn, "123456", "hash")
        rnd = gs.create_round(conn, session["id"], {"prompt": "p", "max_tokens": 5, "temperature": 0.8,
                                                    "deadline_ms": 1000, "seed": None, "svg_mode": False})
        for pid in ("ana", "bia", "caio"):
            gs.register_participant(conn, session["id"], {"participant_id": pid, "nickname": pid.title(),
                                                          "runner": "r", "model": "m"})
            gs.save_metrics(conn, {"id": gs.new_id(), "roundId": rnd["id"], "participantId": pid, "tokens": 1,
                                   "durationMs": 1, "createdAt": 1})
        vote = {"round_id": rnd["id"], "participant_id": "ana", "score": 4, "voter_hash": "v1",
                "response_time": None, "user_agent": "test"}
        counts = gs.VoteCounts()
        assert isinstance(gs.cast_votes(conn, [vote], counts)[0], gs.Conflict)   # voting is not open yet
        gs.update_round(conn, rnd["id"], {"votingStatus": "open", "endedAt": 2})
        results = gs.cast_votes(conn, [vote, vote, {**vote, "participant_id": "zé"}, {**vote, "voter_hash": "v2"}],
                                counts)
        assert [type(r).__name__ for r in results] == ["dict", "Conflict", "NotFound", "dict"]
        assert str(results[1]) == "Already voted for this participant"
        assert [r["voteOrder"] for r in (results[0], results[3])] == [1, 1]
        assert [e["eventType"] for e in gs.session_events(conn, session["id"])] == ["vote_cast", "vote_cast"]
        # voteOrder goes on from the counts remembered, and from the database once they are forgotten
        assert gs.cast_votes(conn, [{**vote, "participant_id": "bia"}], counts)[0]["voteOrder"] == 2
        assert gs.cast_votes(conn, [{**vote, "participant_id": "caio"}], gs.VoteCounts())[0]["voteOrder"] == 3
        # a vote that cannot be written (here its event) is undone alone, in the votes and in the counts
        conn.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON event_logs WHEN NEW.actorId = 'v2' "
                     "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        second = {**vote, "voter_hash": "v2", "participant_id": "bia"}
        results = gs.cast_votes(conn, [second, {**vote, "voter_hash": "v3"}], counts)
        assert isinstance(results[0], sqlite3.IntegrityError) and results[1]["voteOrder"] == 1
        conn.execute("DROP TRIGGER refuse")
        assert gs.cast_votes(conn, [second], counts)[0]["voteOrder"] == 2
        # a batch the database itself refuses leaves no trace in the counts either
        conn.commit()
        third = {**vote, "voter_hash": "v2", "participant_id": "caio"}
        conn.execute("PRAGMA query_only = ON")
        with pytest.raises(sqlite3.OperationalError):
            gs.cast_votes(conn, [third], counts)
        conn.rollback()
        conn.execute("PRAGMA query_only = OFF")
        assert gs.cast_votes(conn, [third], counts)[0]["voteOrder"] == 3
    finally:
        conn.close()


def test_bench_measures_a_tiny_room_end_to_end() -> None:
    """bench starts its own server and load generators and reports every figure, nothing lost."""
    preset = gs.Preset(runners=4, rate=50, screens=2, phones=1, voters=2, stream_s=1.0, vote_rate=100,
                       votes_per_voter=2, saturation_tokens=30)
    figures = asyncio.run(gs.bench(preset, affinity=False, attack=False))
    assert figures["join"]["registered"] == 4
    for phase in ("stream", "saturation"):
        assert figures[phase]["tokens"] > 0
        assert figures[phase]["lost"] == [0, 0] and figures[phase]["reordered"] == [0, 0]
        assert figures[phase]["phone_token_updates"] == 0
    assert figures["votes"]["votes"] == 4 and figures["votes"]["tallies_exact"]          # 2 voters x 2 answers
    report = gs.bench_report(figures)
    assert "bench: 4 runners" in report and "each < 0.5 s" not in report     # targets are ten-x's alone
    as_ten_x = gs.bench_report({**figures, "preset": {**vars(gs.BENCH_PRESETS["ten-x"]), "name": "ten-x"}})
    assert "each < 0.5 s" in as_ten_x and "(no targets" not in as_ten_x


def test_bench_streams_a_round_under_attack_and_reports_what_the_attackers_got() -> None:
    """Strangers on other loopback addresses attack a tiny room: the honest screens lose nothing, all is reported."""
    preset = gs.Preset(runners=4, rate=50, screens=2, phones=1, voters=2, stream_s=1.0, vote_rate=100,
                       votes_per_voter=2, stalled_screens=3, idle_connections=4, register_loops=1, wrong_pin_addresses=2)
    figures = asyncio.run(gs.bench(preset, saturation=False, affinity=False))
    attack = figures["attack"]
    assert attack["tokens"] > 0 and attack["lost"] == [0, 0] and attack["reordered"] == [0, 0]
    assert attack["phone_token_updates"] == 0
    assert attack["health_calls"] > 0 and attack["health_ms"]["p99"] is not None
    assert attack["late_runner"]["answer"] == "registered"
    got = attack["attackers"]
    assert got["stalled_opened"] == 3 and got["idle_opened"] == 4 and got["loop_opened"] >= 1
    assert got.get("loop_state_snapshot", 0) >= 1
    assert got.get("guess_INVALID_PIN", 0) + got.get("guess_PIN_THROTTLED", 0) >= 1 and "guess_registered" not in got
    rows = [line.strip() for line in gs.bench_report(figures).splitlines()]
    for name in ("under attack", "/health under attack", "late runner", "stalled screens", "idle connections",
                 "telao_register loop", "wrong PINs"):
        assert any(row.startswith(name) for row in rows), name


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(status.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_bench_stopped_with_sigterm_stops_its_server_and_load() -> None:
    """A TERM to bench (a host's `kill`, a CI timeout) leaves no server or load generator behind."""
    bench = subprocess.Popen([sys.executable, str(HERE / "gambiarra_server.py"), "bench", "--preset", "meetup",
                              "--runners", "2", "--screens", "1", "--phones", "1", "--voters", "1",
                              "--stream-s", "30", "--no-saturation", "--no-affinity"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def server_and_workers() -> list[int] | None:
        pids = children(bench.pid)
        return pids if len(pids) >= 3 else None
    try:
        started = await eventually(server_and_workers, "the server and its workers", timeout_s=60)
    finally:
        bench.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(bench.communicate, timeout=60)
    assert "interrupted" in err and "Traceback" not in err
    assert json.loads(out.splitlines()[-1])["stopped_during"] in ("start-up", "join burst")   # and what it measured
    # bench is gone; its children may take a moment to follow
    await eventually(lambda: not any(alive(pid) for pid in started), "bench's children gone", timeout_s=10)


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- rehearsal: what the host reads while it runs --------------------------------

REHEARSAL = [sys.executable, str(HERE / "gambiarra_server.py")]
TINY_MEETUP = ["bench", "--preset", "meetup", "--runners", "2", "--screens", "1", "--phones", "1", "--voters", "1",
               "--stream-s", "1", "--vote-rate", "100", "--saturation-tokens", "20", "--no-affinity"]


@pytest.mark.parametrize("pin_given", [False, True])
def test_simulate_without_a_server_says_so_in_one_line_and_how_to_start_one(pin_given: bool) -> None:
    """No server at --url (with --pin too, which used to wait for bots to give up): one line, no traceback."""
    with socket.socket() as taken:                  # bound, never listening: a port where nothing answers
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = subprocess.run([*REHEARSAL, "simulate", "--url", f"http://127.0.0.1:{port}",
                               *(["--pin", "123456"] if pin_given else [])],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"simulate: no server at http://127.0.0.1:{port} "
                           f"(start it with: python3 gambiarra_server.py --port {port})\n")


async def test_simulate_stops_with_the_reason_when_every_bot_is_refused(room: Room, pin: str) -> None:
    """A wrong --pin: the rehearsal ends with why, instead of waiting for rounds no bot can answer."""
    wrong = "1" * len(pin) if pin != "1" * len(pin) else "2" * len(pin)
    with pytest.raises(RuntimeError, match=r"^every bot was refused: INVALID_PIN x3$"):
        await asyncio.wait_for(gs.simulate(sim_options(room, wrong, bots=3, rounds=1)), 30)


async def next_line(stream: asyncio.StreamReader, wanted: str) -> list[str]:
    """Lines from a subprocess until one holding `wanted` (inclusive)."""
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not lines or wanted not in lines[-1]:
            line = await stream.readline()
            assert line, f"ended before {wanted!r}: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return lines


async def test_a_piped_simulate_prints_a_line_per_event_and_says_it_waits_for_the_host(room: Room, pin: str) -> None:
    """Without --drive and with stdout a pipe: who registered, that it waits for the host, then each step
    of the host's round as it happens, the round's line, and the summary."""
    simulate = await asyncio.create_subprocess_exec(
        *REHEARSAL, "simulate", "--url", room.base, "--pin", pin, "--bots", "3", "--rate", "200", "--voters", "2",
        "--vote-pace", "0.01", "--rounds", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert await next_line(simulate.stdout, "waiting for the host") == [
            "3/3 bots registered",
            "waiting for the host to start a round (admin page or curl; --drive plays the host)"]
        rnd = await room.host.new_round("Um haiku, por favor", maxTokens=10)
        await room.host.start(rnd["id"])
        assert await next_line(simulate.stdout, "all 3 bots answered") == [
            "round 1: challenge received, 3 bots answering",
            "round 1: all 3 bots answered; waiting for the host to stop the round"]
        await room.host.stop(rnd["id"])
        assert await next_line(simulate.stdout, "voting open") == ["round 1: voting open, 2 voters voting"]
        out, err = await asyncio.wait_for(simulate.communicate(), 30)
    finally:
        if simulate.returncode is None:
            simulate.kill()
            await simulate.wait()
    assert simulate.returncode == 0 and err == b""
    rest = out.decode().splitlines()
    assert re.fullmatch(r"round 1: 3/3 answered · \d+ tokens \(\d+/s\) · screens 100% · 0 drops \(0 resumed\) · "
                        r"6 votes", rest[0]), rest[0]
    assert rest[1].startswith("simulate: 1 round in ") and "\r" not in out.decode()


def test_bench_prints_each_phase_as_it_runs_and_what_it_measured_when_interrupted() -> None:
    """A line as each phase starts and its figures as it ends (on stderr); a Ctrl-C during the soak prints the
    table and JSON of every finished phase and of the soak rounds so far. A meetup table has no targets."""
    bench = subprocess.Popen([*REHEARSAL, *TINY_MEETUP, "--no-attack", "--soak", "5"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    progress = []
    try:
        for line in bench.stderr:
            progress.append(line.rstrip("\n"))
            if "soak round 1 " in line:
                break
    finally:
        bench.send_signal(signal.SIGINT)            # the bench alone: its server and workers stop through it
        out, err = bench.communicate(timeout=60)
    steps = [line for line in progress if line.startswith("bench: [")]
    assert steps == ["bench: [1/5] join burst: 2 runners connect and register at once",
                     steps[1],
                     "bench: [2/5] streamed round: 2 runners x 30 tok/s for 1 s, 1 arena screens watching",
                     steps[3],
                     "bench: [3/5] votes: 1 voters on 1 phones, 100 votes/s offered",
                     steps[5],
                     "bench: [4/5] flat out: each runner sends 20 tokens as fast as it can",
                     steps[7],
                     "bench: [5/5] soak: rounds back to back for 5 min, a line after each"]
    assert all(re.fullmatch(r"bench: \[\d/5\] [a-z ]+: done in \d+ s", steps[n]) for n in (1, 3, 5, 7))
    assert "bench:     lost / reordered: [0] / [0]; phones got 0 tokens" in progress
    assert err.splitlines()[-1] == "bench: interrupted; its server and load generators are stopped"
    assert bench.returncode == 1 and "Traceback" not in err
    table, figures = out.splitlines()[:-1], json.loads(out.splitlines()[-1])
    assert "STOPPED during soak: the figures of the phases before it" in table
    assert "(no targets: they are judged for the unmodified ten-x preset only)" in table
    assert not any("each < 0.5 s" in row or row.rstrip().endswith(" ok") for row in table)
    assert [row.split("  ")[0] for row in table if row.startswith(("join", "votes", "flat out"))] == [
        "join burst", "votes", "flat out"]
    assert figures["stopped_during"] == "soak" and figures["preset"]["name"] == "meetup"
    assert figures["join"]["registered"] == 2 and figures["votes"]["tallies_exact"]
    assert figures["soak"]["rounds"] >= 1 and figures["soak"]["lost_or_reordered"] == 0
