"""Tests for gambiarra_server.py: the real app on a loopback port, a real SQLite file,
and the clients a meetup has (runners and screens over `websockets`, the host and
the phones over HTTP). Sections mirror the server's, from pure code to the edges.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
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
        while (await room.host.call("GET", "/presence"))["connectedCount"] < 3:
            await asyncio.sleep(0.05)
        rnd = await room.host.new_round("Um haiku, por favor", maxTokens=10)
        await room.host.start(rnd["id"])
        while len((await room.host.call("GET", f"/scoreboard?roundId={rnd['id']}"))["scoreboard"]) < 3:
            await asyncio.sleep(0.05)
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
    async with asyncio.timeout(TIMEOUT_S):
        while len((await room.host.call("GET", f"/scoreboard?roundId={rnd['id']}"))["scoreboard"]) < 1:
            await asyncio.sleep(0.02)
    await room.host.stop(rnd["id"])
    first = await room.host.call("GET", f"/api/rounds/{rnd['id']}/responses")
    assert [r["participant_id"] for r in first["responses"]] == ["ana"]
    await bia.stream(1, ["Tarde, ", "mas ", "chegou."])
    await bia.complete(1, 3)
    async with asyncio.timeout(TIMEOUT_S):
        while len((await room.host.call("GET", f"/api/rounds/{rnd['id']}/responses"))["responses"]) < 2:
            await asyncio.sleep(0.02)
    async with room.host.http.get(f"{room.base}/api/rounds/{rnd['id']}/responses",
                                  headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        late = json.loads(gzip.decompress(await response.read()))
    assert {r["participant_id"]: r["generated_content"] for r in late["responses"]} == {
        "ana": "".join(WORDS), "bia": "Tarde, mas chegou."}


def test_a_batch_of_votes_refuses_each_bad_vote_on_its_own(tmp_path: Path) -> None:
    """One transaction, one verdict per vote: duplicates (even within the batch) and strangers are refused."""
    conn = gs.open_db(tmp_path / "votes.db")
    try:
        session = gs.create_session(conn, "123456", "hash")
        rnd = gs.create_round(conn, session["id"], {"prompt": "p", "max_tokens": 5, "temperature": 0.8,
                                                    "deadline_ms": 1000, "seed": None, "svg_mode": False})
        gs.register_participant(conn, session["id"], {"participant_id": "ana", "nickname": "Ana", "runner": "r",
                                                      "model": "m"})
        gs.save_metrics(conn, {"id": gs.new_id(), "roundId": rnd["id"], "participantId": "ana", "tokens": 1,
                               "durationMs": 1, "createdAt": 1})
        vote = {"round_id": rnd["id"], "participant_id": "ana", "score": 4, "voter_hash": "v1",
                "response_time": None, "user_agent": "test"}
        assert isinstance(gs.cast_votes(conn, [vote])[0], gs.Conflict)          # voting is not open yet
        gs.update_round(conn, rnd["id"], {"votingStatus": "open", "endedAt": 2})
        results = gs.cast_votes(conn, [vote, vote, {**vote, "participant_id": "zé"}, {**vote, "voter_hash": "v2"}])
        assert [type(r).__name__ for r in results] == ["dict", "Conflict", "NotFound", "dict"]
        assert str(results[1]) == "Already voted for this participant"
        assert [r["voteOrder"] for r in (results[0], results[3])] == [1, 1]
        assert [e["eventType"] for e in gs.session_events(conn, session["id"])] == ["vote_cast", "vote_cast"]
    finally:
        conn.close()


def test_bench_measures_a_tiny_room_end_to_end() -> None:
    """bench starts its own server and load generators and reports every figure, nothing lost."""
    preset = gs.Preset(runners=4, rate=50, screens=2, phones=1, voters=2, stream_s=1.0, vote_rate=100,
                       votes_per_voter=2, saturation_tokens=30)
    figures = asyncio.run(gs.bench(preset, affinity=False))
    assert figures["join"]["registered"] == 4
    for phase in ("stream", "saturation"):
        assert figures[phase]["tokens"] > 0
        assert figures[phase]["lost"] == [0, 0] and figures[phase]["reordered"] == [0, 0]
        assert figures[phase]["phone_token_updates"] == 0
    assert figures["votes"]["votes"] == 4 and figures["votes"]["tallies_exact"]          # 2 voters x 2 answers
    assert "bench: 4 runners" in gs.bench_report(figures)
