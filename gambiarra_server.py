# /// script
# requires-python = ">=3.10"
# dependencies = ["aiohttp>=3.9", "bcrypt>=4.0"]
# ///
"""Gambiarra arena server: one file that runs a live LLM meetup.

The host runs this file on a laptop. Participants' runners (ollama, llama.cpp,
LM Studio) connect to ``ws://HOST:3000/ws`` with the session PIN, receive each
round's challenge and stream their tokens back; the big screen (telão) and the
audience's phones watch the same socket; phones vote over HTTP; the host drives
everything from the /admin page (or curl, or the club's admin page) and exports
the evening at the end.

Run it::

    pip install aiohttp bcrypt
    python gambiarra_server.py            # http://0.0.0.0:3000 and [::]:3000

A participant joins with a local model (``pip install aiohttp bcrypt websockets``)::

    python gambiarra_server.py join --url HOST:3000 --pin 123456 --nickname Ana --model llama3.1:8b

Words, each with one meaning here (and in the Python names):

    session      one evening, opened by the host; its PIN lets runners in
    round        one challenge of a session: a prompt every runner answers; its *index*
                 (0, 1, 2, ...) is what messages call ``round``, its *id* what routes take
    participant  a person taking part, with a stable id and a nickname
    runner       the program a participant runs (``join``, or the club's): it connects,
                 answers challenges and streams tokens; the participants' ``runner``
                 column names its kind (ollama, llamacpp, ...)
    seat         a participant id held by a runner across drops: its connection comes and
                 goes, the seat (and the answer streamed into it) stays
    screen       any connection that watches instead of answering (telao_register); its
                 *view* says which page it is: the arena (the telão), voting (a phone), ...
    peer         one WebSocket connection, whether a runner's or a screen's
    answer       one participant's text for one round, built from its tokens
    token        one piece of an answer, numbered by ``seq`` from 0 within the round
    vote         one phone's score for one answer
    host         the person running the evening (and their machine, trusted without a
                 token); where the server listens are its *listen addresses*, and a
                 request's Host header is the name it used for this server
    save         write to SQLite; *flush* is only ever a write to a socket

WebSocket protocol (every frame is one JSON object with a ``type``):

    runner -> server   register {participant_id, nickname, pin, runner, model, resume_secret?}
                       token    {round, participant_id, seq, content}
                       complete {round, participant_id, tokens, latency_ms_first_token?,
                                 duration_ms?, model_info?}
                       error    {round, participant_id, code, message}
    screen -> server   telao_register {view?: "arena" | "voting" | ...}
    server -> runner   registered {session_id, participant_id, resume_secret, resume?}
                       challenge {session_id, round, prompt, max_tokens, temperature,
                                  deadline_ms, seed?}
                       heartbeat {ts}
    server -> either   error {message, code}
    server -> screen   registered_telao {view}
                       state_snapshot {session, round, participants, liveTokens?}
                       participant_registered {participant}
                       participant_disconnected {participant_id, ts}
                       round_started {round, session_id}
                       round_state {round}
                       token_update {participant_id, round, seq, content, total_tokens}
                       completion {participant_id, round, tokens, duration_ms, ttft_ms, tps,
                                   engine_tps}

(The incoming frames are ON_MESSAGE's; the outgoing ones SERVER_MESSAGES'.) Every HTTP
route is served at the root and again under ``/api``; ``GET /docs`` lists them all.

The sections of this file, in order (``grep -n '^# =='``); each uses only those above
it, and says why where it cannot:

    Configuration -> Errors -> Helpers -> Input fields -> Store (sqlite) -> Live state
    -> Messages (in and out) -> Hub (fan-out) -> The server -> WebSocket -> HTTP (the API)
    -> Pages (their handlers) -> Routes and docs -> App -> Runner (join, the participant's
    side) -> Rehearsal (simulate and bench) -> Command line -> Schema -> Assets (the pages'
    text: plain data, last, although the Pages section uses it).

The pages: ``/`` the big screen, ``/voting`` the phones, ``/admin`` the host's
panel, ``/scoreboard`` the ceremony (each also at ``/ui/<name>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import difflib
import functools
import gc
import gzip
import hashlib
import hmac
import html
import importlib.util
import io
import ipaddress
import json
import logging
import logging.handlers
import math
import multiprocessing
import os
import platform
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, cast


__version__ = "1.0.0"
# A peer silent (no frame, no pong) for this many ping intervals is dropped:
# generous, because a runner's CPU is saturated by its model.
MISSED_PINGS = 3
log = logging.getLogger("gambiarra")
# One line per HTTP request, for the JSON log alone: a terminal would scroll the evening away.
access_log = logging.getLogger("gambiarra.access")
access_log.propagate = False
access_log.addHandler(logging.NullHandler())        # no JSON log: nothing, and no "last resort" echo to stderr
HERE = Path(__file__).resolve().parent


# =============================================================================
# Configuration
# =============================================================================

def option(default: Any, env: str, help: str, *, low: float | None = None, high: float | None = None,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A Config field with the environment variable (and so the --flag) that sets it.

    A number declares the range it may take (see setting_value); `parse` replaces
    the parsing its type implies, raising ValueError that says what is allowed.
    """
    return field(default=default, metadata={"env": env, "help": help, "low": low, "high": high, "parse": parse})


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def nonempty_addresses(text: str) -> tuple[str, ...]:
    """HOST: with no address the server would start and listen nowhere."""
    addresses = comma_list(text)
    if not addresses:
        raise ValueError("at least one address to listen on, such as 0.0.0.0 or 127.0.0.1")
    return addresses


def networks(text: str) -> tuple[str, ...]:
    """HOST_ADDRESSES, checked now rather than when the app is made (a traceback)."""
    items = comma_list(text)
    try:
        for item in items:
            ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError("networks such as 127.0.0.0/8 or ::1, comma-separated") from None
    return items


def origins(text: str) -> tuple[str, ...]:
    """CORS_ORIGINS: a browser's Origin is compared as text, so `http://host:5173/` would never match."""
    items = comma_list(text)
    for item in items:
        parts = urllib.parse.urlsplit(item)
        if item not in ("*", "null") and (parts.scheme not in ("http", "https") or not parts.netloc
                                          or item != f"{parts.scheme}://{parts.netloc}"):
            raise ValueError("origins such as http://192.168.0.12:5173 (no path, no trailing /), or *")
    return items


def database_path(url: str) -> Path:
    """DATABASE_URL as a path: a plain path, sqlite:///path, sqlite+<driver>:///path or file:path."""
    url = re.sub(r"^sqlite\+\w+:", "sqlite:", url)      # SQLAlchemy names a driver (aiosqlite); the file is the same
    for prefix in ("sqlite:///", "sqlite://", "file://", "file:"):
        if url.startswith(prefix):
            url = url[len(prefix):]
            break
    else:
        if "://" in url:
            raise ValueError("a SQLite file: a path, sqlite:///path, sqlite+<driver>:///path or file:path")
    return Path(url.split("?")[0]).expanduser()


# A POST /session's pinLength has the same bounds.
MIN_PIN_LENGTH, MAX_PIN_LENGTH = 4, 12


@dataclass(frozen=True)
class Config:
    """Everything a run can change; each field has an env var and a matching --flag."""

    listen_addresses: tuple[str, ...] = option(("0.0.0.0", "::"), "HOST", "addresses to listen on, comma-separated",
                                               parse=nonempty_addresses)
    port: int = option(3000, "PORT", "TCP port (0: any free port)", low=0, high=65535)
    database: Path = option(HERE / "gambiarra.db", "DATABASE_URL",
                            "SQLite file: a path, sqlite:///path, sqlite+<driver>:///path or file:path",
                            parse=database_path)
    cors_origins: tuple[str, ...] = option(("*",), "CORS_ORIGINS", "browser origins allowed, comma-separated",
                                           parse=origins)
    pin_length: int = option(6, "PIN_LENGTH", "digits in a new session's PIN", low=MIN_PIN_LENGTH, high=MAX_PIN_LENGTH)
    admin_token: str = option("", "ADMIN_TOKEN", "token for host routes from other machines "
                                                  "(default: one made at the first start and kept beside "
                                                  "the database in <database>.admin-token; printed at start-up)")
    host_addresses: tuple[str, ...] = option(("127.0.0.0/8", "::1"), "HOST_ADDRESSES",
                                             "networks trusted as the host without a token, comma-separated",
                                             parse=networks)
    trust_proxy: bool = option(False, "TRUST_PROXY", "take the client address from X-Forwarded-For")
    rate_limit_max: int = option(500, "RATE_LIMIT_MAX", "HTTP requests per address per window", low=1, high=1_000_000)
    rate_limit_window_s: float = option(60.0, "RATE_LIMIT_WINDOW", "rate-limit window in seconds", low=0.1, high=86_400)
    pin_attempts_max: int = option(10, "PIN_ATTEMPTS_MAX", "wrong PINs per address per window", low=1, high=1_000_000)
    pin_attempts_total_max: int = option(300, "PIN_ATTEMPTS_TOTAL_MAX",
                                         "wrong PINs from all addresses together per window", low=1, high=1_000_000)
    pin_attempts_window_s: float = option(60.0, "PIN_ATTEMPTS_WINDOW", "wrong-PIN window in seconds",
                                          low=0.1, high=86_400)
    allowed_hosts: tuple[str, ...] = option((), "ALLOWED_HOSTS", "names this server answers to besides its "
                                            "addresses, localhost and this machine's names, comma-separated; "
                                            "* for any")
    proxy_hops: int = option(1, "PROXY_HOPS", "with TRUST_PROXY: proxies in front of this server, each adding "
                                              "one X-Forwarded-For hop", low=1, high=16)
    ws_heartbeat_interval_s: float = option(30.0, "WS_HEARTBEAT_INTERVAL",
                                            f"seconds between pings; {MISSED_PINGS} silent intervals drop a peer",
                                            low=0.1, high=3600)
    ws_max_payload: int = option(1024 * 1024, "WS_MAX_PAYLOAD", "largest WebSocket message in bytes",
                                 low=1024, high=64 * 1024 * 1024)
    ws_connections_per_address: int = option(20, "WS_CONNECTIONS_PER_ADDRESS",
                                             "WebSocket connections one address may hold (the host's: any number)",
                                             low=1, high=100_000)
    connections_per_address: int = option(50, "CONNECTIONS_PER_ADDRESS",
                                          "TCP connections, HTTP and WebSocket together, one address may hold "
                                          "(the host's: any number)", low=1, high=100_000)
    header_timeout_s: float = option(10.0, "HEADER_TIMEOUT",
                                     "seconds a connection has to send a request's headers, from its opening or "
                                     "its last response (so also how long an idle one stays open)",
                                     low=1, high=3600)
    body_timeout_s: float = option(30.0, "BODY_TIMEOUT", "seconds a request has to send its body", low=1, high=3600)
    ws_message_rate: float = option(1000.0, "WS_MESSAGE_RATE",
                                    "messages per second a WebSocket connection may send, in bursts of as many "
                                    "again; beyond it the server reads the connection more slowly "
                                    "(the host's: any number)", low=1, high=1_000_000)
    max_answer_tokens: int = option(100_000, "MAX_TOKENS_PER_GENERATION",
                                    "tokens kept per runner per round", low=1, high=10_000_000)
    stop_grace_s: float = option(3.0, "STOP_GRACE", "seconds after a stop during which tokens and completes "
                                                    "still on their way are kept; then answers are frozen",
                                 low=0, high=3600)
    max_participants: int = option(300, "MAX_PARTICIPANTS",
                                   "participants per session (one already in it may always register again)",
                                   low=1, high=100_000)
    max_round_tokens: int = option(500_000, "MAX_ROUND_TOKENS", "tokens kept per round, all runners together",
                                   low=1, high=100_000_000)
    max_round_chars: int = option(4_000_000, "MAX_ROUND_CHARS", "characters kept per round, all runners together",
                                  low=1, high=1_000_000_000)
    max_answer_chars: int = option(1_000_000, "MAX_ANSWER_CHARS", "characters kept per runner per round",
                                   low=1, high=100_000_000)
    peer_queue_limit: int = option(8192, "PEER_QUEUE_LIMIT",
                                   "messages queued for one connection before it is dropped as not reading",
                                   low=16, high=10_000_000)
    peer_queue_bytes: int = option(8 * 1024 * 1024, "PEER_QUEUE_BYTES",
                                   "bytes queued for one connection before it is dropped as not reading",
                                   low=64 * 1024, high=1024 * 1024 * 1024)
    save_interval_s: float = option(1.0, "FLUSH_INTERVAL", "seconds between saves of streamed tokens",
                                    low=0.01, high=3600)
    bcrypt_rounds: int = option(12, "BCRYPT_ROUNDS", "bcrypt cost for PIN hashes", low=4, high=16)
    client_dir: Path = option(HERE / "client-browser", "CLIENT_DIR",
                              "the club's browser client folder (client.html, agent.html, shared/), "
                              "served at /client, /agent and /client-assets/")
    log_json: str = option("", "LOG_JSON", "also write the log to this file as JSON lines (pino's fields: "
                                           "time, level, msg), with a line per HTTP request")
    static_dir: str = option("", "STATIC_DIR", "a built web app (such as the club's telao) served at / to "
                                               "browsers; the built-in pages then live at /ui/ only")


MAX_TEXT = 200              # nickname, model, runner, ids
VOTE_LINGER_S = 0.002     # how long a batch of votes waits for more before it is written
MAX_PROMPT = 100_000
MAX_ROUND = 1_000_000       # round indexes, in messages
MAX_MS = 86_400_000         # durations a client reports: a day
SEED_RANGE = 1_000_000      # a round's seed when the host gives none: 0 to 999,999, as the club's admin page draws
SCREEN_VIEWS_WITHOUT_TOKENS = {"voting", "admin", "scoreboard"}
PIN_CHECKS_WAITING = 16     # distinct PINs waiting for bcrypt (only before the server knows the PIN); more are refused
PEER_BACKLOG_BYTES = 256 * 1024     # unsent bytes beyond which a peer's messages queue for its writer
PEER_BACKLOG_POLL_S = 0.01
PEER_FLUSH_BYTES = 16 * 1024        # gathered frames are written at the end of the turn, or at this size
# Phones (and the admin and scoreboard pages) show no tokens, so what they get can wait this long
# and go out together: 200 runners joining at once is 200 messages per phone.
UNHURRIED_FLUSH_S = 0.05
SNAPSHOT_INTERVAL_S = 2.0   # an address (not the host's) gets at most one state_snapshot this often
RATE_NOTICE_S = 10.0        # how often a connection over WS_MESSAGE_RATE is told so
RARE_LOG_S = 5.0            # a kind of line a client can cause is logged at most this often
DESCRIPTOR_RESERVE = 64     # open files no stranger's connection may take: the database's, the host's

# Keys of the club's own .env.example that mean nothing here: named once at start-up.
CLUB_ONLY_KEYS = ("ENVIRONMENT", "SESSION_TIMEOUT_MS", "MDNS_HOSTNAME")
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def fail(message: str) -> NoReturn:
    """End a start-up that cannot work: one line saying why, exit status 2 (argparse's, for bad usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def missing(modules: list[str], pip: str, uv: str) -> NoReturn:
    """Name the modules this Python lacks, with the pip command and the uv one that would run this anyway."""
    fail(f"not installed for {sys.executable}: {', '.join(modules)} (pip install {pip}, or: uv run {uv})")


def read_dotenv(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of `path` (none if it is missing); a line that is neither is warned about."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    for number, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if key.startswith("#") or not (key or sep):
            continue
        if not sep:
            log.warning("%s line %d is not KEY=VALUE; ignored", path, number)
            continue
        value = value.strip()
        if value[:1] in ("'", '"') and value[0] in value[1:]:
            values[key.strip()] = value[1:value.index(value[0], 1)]
        else:
            values[key.strip()] = value.split(" #")[0].rstrip()      # a comment may end an unquoted value
    return values


def warn_unknown_keys(dotenv: dict[str, str], path: Path) -> None:
    """One line per key of .env that is not a setting, so that a typo such as PIN_LENGHT does not pass silently."""
    known = [f.metadata["env"] for f in fields(Config)]
    if club := [key for key in dotenv if key in CLUB_ONLY_KEYS]:
        log.warning("%s: %s (from the club's .env.example) not used by this server; ignored", path, ", ".join(club))
    for key in dotenv:
        if key not in known and key not in CLUB_ONLY_KEYS:
            guess = "".join(f" (did you mean {name}?)" for name in difflib.get_close_matches(key, known, 1))
            log.warning("%s: %s is not a setting%s; ignored", path, key, guess)


def allowed(f: Any) -> str:
    """What the number or true/false Config field `f` accepts, for --help and for refusing a value."""
    low, high = f.metadata["low"], f.metadata["high"]
    if isinstance(f.default, bool):
        return "one of " + ", ".join(BOOLEANS)
    kind = "a whole number" if isinstance(f.default, int) else "a number"
    return kind + (f" from {low:,} to {high:,}" if low is not None and high is not None else "")


def setting_value(f: Any, text: str) -> Any:
    """`text` as the value of Config field `f`, or ValueError saying what is allowed.

    The one check for flags, environment variables and .env lines alike.
    """
    default, low, high = f.default, f.metadata["low"], f.metadata["high"]
    if f.metadata["parse"]:
        return f.metadata["parse"](text)
    if isinstance(default, bool):
        if (word := text.strip().lower()) not in BOOLEANS:
            raise ValueError(allowed(f))
        return BOOLEANS[word]
    if isinstance(default, (int, float)):
        try:
            value = type(default)(text.strip())
        except ValueError:
            raise ValueError(allowed(f)) from None
        if not (low is None or value >= low) or not (high is None or value <= high):     # NaN fails both
            raise ValueError(allowed(f))
        return value
    if isinstance(default, tuple):
        return comma_list(text)
    if isinstance(default, Path):
        return Path(text).expanduser()
    return text


def flag_name(env: str, env_prefix: str = "") -> str:
    return "--" + env.removeprefix(env_prefix).lower().replace("_", "-")


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of one of this file's sub-commands, named in its usage line as the user types it."""
    return argparse.ArgumentParser(prog=f"{Path(__file__).name} {command}", description=description)


def options_parser(options: type, parser: argparse.ArgumentParser, env_prefix: str = "") -> argparse.ArgumentParser:
    """A --flag per field of the dataclass `options` (named after its env var less `env_prefix`); values
    stay text, for setting_value to check wherever they come from."""
    for f in fields(options):
        env, doc, default = f.metadata["env"], f.metadata["help"], f.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        if isinstance(default, bool):
            parser.add_argument(flag_name(env, env_prefix), dest=f.name, action="store_const", const="1",
                                help=f"{doc} [{env}]")
        else:
            limits = f"; {allowed(f)}" if isinstance(default, (int, float)) else ""
            parser.add_argument(flag_name(env, env_prefix), dest=f.name, metavar=env,
                                help=f"{doc} [{env}; default: {shown or 'none'}{limits}]")
    return parser


def option_values(options: type, flags: dict[str, str | None], env_prefix: str = "",
                  dotenv: Mapping[str, str] = {}, dotenv_path: Path | None = None) -> dict[str, Any]:
    """The values of the fields of `options` that are set: from the flags, then the environment, then .env.

    An empty value counts as unset. A bad value ends the start-up with one line naming the setting
    as the user wrote it. A relative path in .env is relative to the .env's folder; elsewhere, to
    the current folder.
    """
    values = {}
    for f in fields(options):
        env = f.metadata["env"]
        sources = [(flag_name(env, env_prefix), flags[f.name], Path.cwd()), (env, os.environ.get(env), Path.cwd())]
        if dotenv_path is not None:
            sources.append((f"{env} (in {dotenv_path})", dotenv.get(env), dotenv_path.parent))
        for name, text, folder in sources:
            if text:
                try:
                    value = setting_value(f, text)
                except ValueError as exc:
                    fail(f"{name}={text!r}: expected {exc}")
                values[f.name] = folder / value if isinstance(value, Path) else value
                break
    return values


def parse_config(argv: list[str]) -> Config:
    """Config from the flags, then the environment, then .env beside this file, then the defaults."""
    dotenv_path = HERE / ".env"
    dotenv = read_dotenv(dotenv_path)
    warn_unknown_keys(dotenv, dotenv_path)
    parser = options_parser(Config, argparse.ArgumentParser(
        description="Gambiarra arena server. Every option can also be set by the environment variable named in "
                    "its help, or in a .env file beside this script.",
        epilog="Also: 'join' (a participant's runner), 'join-drill' (join runners through an arena restart), "
               "'simulate' (fake runners, screens and voters) and 'bench' (measure); see their --help."))
    return Config(**option_values(Config, vars(parser.parse_args(argv)), dotenv=dotenv, dotenv_path=dotenv_path))


def database_problem(path: Path) -> str | None:
    """Why SQLite cannot keep the database at `path` (and its -wal and -shm files beside it), or None."""
    if path.is_dir():
        return "it is a folder"
    if not path.parent.is_dir():
        return f"there is no folder {path.parent}"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return "the file is read-only"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"the folder is not writable (SQLite writes {path.name}-wal beside the file)"
    return None


# The third-party imports wait until here: the configuration above needs none of them, so
# `--help`, a bad setting and a missing dependency each get a plain answer before anything
# is installed (bottle breaks its order for its command line in the same way).
try:
    import bcrypt
    from aiohttp import (ClientConnectionError, ClientConnectorError, ClientSession, ClientTimeout,
                         ConnectionTimeoutError, TCPConnector, WSCloseCode, WSMsgType, WSServerHandshakeError, web)
    from aiohttp import ClientError as HTTPClientError      # our own ClientError is the errors a client causes
except ImportError as exc:
    if __name__ != "__main__":
        raise
    if sys.argv[1:2] not in (["simulate"], ["bench"], ["join"], ["join-drill"]):    # the commands need the packages
        parse_config(sys.argv[1:])          # answers --help, or names a bad setting first
    missing([name for name in ("aiohttp", "bcrypt") if importlib.util.find_spec(name) is None] or [str(exc.name)],
            "aiohttp bcrypt", sys.argv[0])


# =============================================================================
# Errors
# =============================================================================

class ClientError(Exception):
    """Something a client asked for that cannot be done; the edges turn it into a reply.

    A kind of refusal is a subclass that names its HTTP status and default code:
    ``class NotFound(ClientError, status=404, code="NOT_FOUND")``.
    """

    status = 400
    code = "INVALID_INPUT"

    def __init_subclass__(cls, status: int, code: str) -> None:
        cls.status, cls.code = status, code

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class Unauthorized(ClientError, status=401, code="UNAUTHORIZED"):
    """No admin token where the host's machine or its token is needed."""


class Forbidden(ClientError, status=403, code="FORBIDDEN"):
    """Known, and not allowed: a wrong token, a removed participant, a foreign page."""


class NotFound(ClientError, status=404, code="NOT_FOUND"):
    """No such thing: no active session, an unknown round or participant."""


class Conflict(ClientError, status=409, code="CONFLICT"):
    """Not in the state it is in: a round already running, an id another runner holds."""


class TooSlow(ClientError, status=408, code="REQUEST_TIMEOUT"):
    """A request body that did not arrive within BODY_TIMEOUT."""


class TooMany(ClientError, status=429, code="TOO_MANY_REQUESTS"):
    """Over a throttle: the client may try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s


# =============================================================================
# Helpers
# =============================================================================

def now_ms() -> int:
    return time.time_ns() // 1_000_000


EPOCH = datetime(1970, 1, 1)


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as the ISO-8601 UTC text the club's clients parse (by hand: strftime is slower)."""
    if ms is None:
        return None
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds") + "Z"


JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)   # one for every call: it runs per token
ASCII_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))              # \u-escapes what UTF-8 cannot carry


def dumps(obj: Any) -> str:
    return JSON_ENCODER.encode(obj)


def json_bytes(obj: Any) -> bytes:
    """`obj` as UTF-8 JSON, for every frame and JSON response.

    A token may hold half of a UTF-16 surrogate pair (a runner that cuts text by
    UTF-16 units splits an emoji in two), which UTF-8 cannot carry: then the JSON
    says it with a \\u escape, as the runner sent it. The try costs nothing otherwise.
    """
    text = JSON_ENCODER.encode(obj)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return ASCII_JSON_ENCODER.encode(obj).encode()


def json_text(obj: Any) -> str:
    """`obj` as JSON text that UTF-8 can carry, as a client sends it: `websockets` sends text frames
    as UTF-8, so half of a UTF-16 pair (an emoji an engine split in two) goes as a \\u escape."""
    text = JSON_ENCODER.encode(obj)
    return text if encodable(text) else ASCII_JSON_ENCODER.encode(obj)


def encodable(text: str) -> bool:
    """Whether UTF-8, and so sqlite, a log file or a frame, can carry `text` (no half of a UTF-16 pair)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def clean_text(text: str) -> str:
    """`text` as sqlite, a log and UTF-8 can take it: the halves of a UTF-16 surrogate pair
    joined, a lone half (or a header byte aiohttp kept as one) replaced by U+FFFD."""
    if encodable(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def new_id() -> str:
    """A version 7 UUID (RFC 9562): the time in ms, then random bits.

    Ids in creation order put each new row at the end of its table's id index
    instead of on a random page: a batch of votes writes fewer pages (README, Performance).
    """
    value = now_ms() << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76          # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62          # the RFC's variant
    return str(uuid.UUID(int=value))


MAX_LOGGED = 500    # characters of one client value in a log line
# Control characters (newlines, ANSI escapes, C1), line and bidi separators, and lone surrogates.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def loggable(value: Any) -> str:
    """A client's value as one inert field of a log line: what a terminal would act on is written as an
    escape, and a value past MAX_LOGGED characters is cut there.

    Ids, nicknames and messages are typed by anyone with the PIN (and paths and
    addresses by anyone); raw, they could forge log lines or clear the host's screen,
    and a path of 8 KB a request would fill the log.
    """
    text = str(value)
    if len(text) > MAX_LOGGED:
        text = f"{text[:MAX_LOGGED]}…({len(text) - MAX_LOGGED} more)"
    return UNPRINTABLE.sub(lambda match: ascii(match.group())[1:-1], text)


class BackgroundHandler(logging.handlers.QueueHandler):
    """Hands each record to `target` on a thread of its own.

    The event loop only renders the message and queues it; the write (a system call
    per line, a terminal that scrolls slowly, a disk that stalls) happens on the thread.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(queue.SimpleQueue())
        self.setFormatter(logging.Formatter("%(message)s"))     # the message only: `target` formats the line
        self.listener: logging.handlers.QueueListener | None = logging.handlers.QueueListener(self.queue, target)
        self.listener.start()

    def close(self) -> None:
        """Write what is queued, then stop the thread and close the target (once: logging closes it at exit too)."""
        if self.listener is not None:
            self.listener.stop()
            for target in self.listener.handlers:
                target.close()
            self.listener = None
        super().close()


PINO_LEVELS = {logging.DEBUG: 20, logging.INFO: 30, logging.WARNING: 40, logging.ERROR: 50, logging.CRITICAL: 60}
RECORD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class PinoFormatter(logging.Formatter):
    """A record as one JSON line with pino's fields, which the club's report scripts parse: `time` in
    epoch ms, a numeric `level`, `msg`, and the record's `extra` fields (`req`, `res`, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.origin = {"pid": os.getpid(), "hostname": socket.gethostname()}

    def format(self, record: logging.LogRecord) -> str:
        line = {"level": PINO_LEVELS.get(record.levelno, record.levelno), "time": int(record.created * 1000),
                **self.origin, "msg": record.getMessage()}
        line.update((key, value) for key, value in vars(record).items() if key not in RECORD_ATTRIBUTES)
        return json.dumps(line, ensure_ascii=True, default=str)     # ASCII: a lone surrogate cannot stop the writer


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)         # a few dozen field names, looked up for every message
def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `text` spells (an IPv4-mapped IPv6 one as IPv4), or None for a name."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def in_networks(address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether `address` (IPv4, IPv6 or IPv4-mapped IPv6) lies in one of `networks`."""
    ip = ip_of(address)
    return ip is not None and any(ip in net for net in networks)


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

    def count(self, key: str) -> int:
        """Events of `key` in its current window."""
        start, count = self.windows.get(key, (0.0, 0))
        return count if time.monotonic() - start < self.window_s else 0

    def forgive(self, key: str) -> None:
        """Take back one event of `key`'s current window (one that turned out to be harmless)."""
        start, count = self.windows.get(key, (0.0, 0))
        if count:
            self.windows[key] = (start, count - 1)


def positive(value: Any) -> float | None:
    """`value` if it is a finite number above zero, else None (runners' reports are free JSON)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def engine_tps(model_info: Any, duration_ms: Any) -> float | None:
    """Tokens per second by the engine's own clock, from the counters a runner put in `model_info`.

    ollama's eval_count over eval_duration (ns), else llama.cpp's timings.predicted_per_second,
    else an OpenAI usage.completion_tokens over the runner's `duration_ms`; None without any.
    """
    info = model_info if isinstance(model_info, dict) else {}
    timings, usage = info.get("timings"), info.get("usage")
    count, eval_ns = positive(info.get("eval_count")), positive(info.get("eval_duration"))
    if count and eval_ns:
        return round(count / (eval_ns / 1e9), 2)
    per_s = positive(timings.get("predicted_per_second")) if isinstance(timings, dict) else None
    if per_s:
        return round(per_s, 2)
    tokens = positive(usage.get("completion_tokens")) if isinstance(usage, dict) else None
    duration_ms = positive(duration_ms)
    return round(tokens / (duration_ms / 1000), 2) if tokens and duration_ms else None


class Pace:
    """A token bucket: `rate` events per second on average, in bursts of up to `rate`."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.level = rate
        self.at = time.monotonic()

    def wait_s(self) -> float:
        """Take one event; how long its taker should wait before acting on it (0: not at all)."""
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.at) * self.rate) - 1
        self.at = now
        return -self.level / self.rate if self.level < 0 else 0.0


class RareLog:
    """Warnings a client can cause as often as it likes: each kind (or address) at most once per `every_s`,
    the next line counting those left out."""

    def __init__(self, every_s: float) -> None:
        self.lines = Throttle(1, every_s)
        self.left_out: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: Any) -> bool:
        """Log the line unless one of its kind was logged lately; say whether it was."""
        if self.lines.wait_s(kind):
            if len(self.left_out) > 10_000:             # keys that never came back: their counts go
                self.left_out.clear()
            self.left_out[kind] = self.left_out.get(kind, 0) + 1
            return False
        self.lines.add(kind)
        left_out = self.left_out.pop(kind, 0)
        log.warning(message + (f" (and {left_out} more like it since the last such line)" if left_out else ""),
                    *args)
        return True


class Admission:
    """Open TCP connections, by address and in all, against CONNECTIONS_PER_ADDRESS and the
    connections the open-files limit leaves room for (`most`; the host's are never refused)."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self.most = math.inf
        self.by_address: dict[str, int] = {}
        self.total = 0

    def refusal(self, address: str) -> str | None:
        """Why one more connection from `address` may not stay; None if it may."""
        if self.by_address.get(address, 0) >= self.per_address:
            return f"Too many connections from your address (at most {self.per_address}); close one and try again"
        if self.total >= self.most:
            return "The server holds all the connections it can; try again in a moment"
        return None

    def add(self, address: str) -> None:
        self.by_address[address] = self.by_address.get(address, 0) + 1
        self.total += 1

    def remove(self, address: str) -> None:
        held = self.by_address.pop(address) - 1
        if held:
            self.by_address[address] = held
        self.total -= 1


def header(request: web.Request, name: str) -> str:
    """A request header as text we may store, log and send back ("" when absent).

    aiohttp keeps a header's bytes that are not UTF-8 as lone surrogates
    (surrogateescape), which sqlite, logs and responses refuse; they become U+FFFD.
    """
    return clean_text(request.headers.get(name, ""))


def host_name(header_value: str) -> str:
    """The name or address in a Host header: no port, brackets or final dot, in lower case."""
    name = header_value.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    return (name.rpartition(":")[0] if name.count(":") == 1 else name).rstrip(".")


def client_address(request: web.Request, config: Config) -> str:
    """The caller's address: the socket's, or behind a trusted proxy the X-Forwarded-For hop it added.

    Each proxy appends the address it saw, so only the last PROXY_HOPS hops are ours:
    anything to their left is whatever the client chose to send.
    """
    if config.trust_proxy:
        hops = [hop.strip() for hop in header(request, "X-Forwarded-For").split(",") if hop.strip()]
        if hops:
            return hops[max(0, len(hops) - max(1, config.proxy_hops))]
    return request.remote or ""


def allowed_origin(config: Config, origin: str) -> str | None:
    return origin if "*" in config.cors_origins or origin in config.cors_origins else None


def file_within(folder: Path, name: str) -> Path | None:
    """The file a client names under `folder`, if there is one and it is inside (no .., no link out); a
    name no file can have (a NUL byte, too long for the system) names none."""
    try:
        root = folder.resolve()
        path = (root / name).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None
    except (OSError, ValueError):
        return None


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses, for the URLs participants type."""
    found = set()
    with contextlib.suppress(OSError):
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))     # a UDP connect sends nothing; it only picks the outgoing interface
        found.add(probe.getsockname()[0])
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_unspecified)


async def within(awaitable: Awaitable[Any], timeout_s: float | None) -> Any:
    """asyncio.wait_for without its flaw on Python 3.10 and 3.11: a cancel that comes just as `awaitable`
    finishes is kept, where wait_for could return the result instead (and a loop being stopped ran on)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    finally:
        task.cancel()                       # nothing once it is done; on a timeout or a cancel, it stops too
    if not done:
        raise asyncio.TimeoutError
    return task.result()


def machine_names() -> set[str]:
    """This machine's host name and full name, each also with .local (its mDNS name), in lower case."""
    names = set()
    with contextlib.suppress(OSError):
        names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    short = {name.split(".")[0] for name in names}
    return {name.rstrip(".") for name in names | short | {f"{name}.local" for name in short} if name}


# =============================================================================
# Input fields: one description drives validation, OpenAPI and /docs
# =============================================================================

@dataclass(frozen=True)
class Field:
    """One input field of a request body, query string or WebSocket message.

    Inputs may spell the name in snake_case or camelCase; `null` counts as absent.
    Every value is bounded here, at the edge, before anything stores it: a string's
    length, a number's range (an integer's within SQLite's 64 bits), an object's
    size as JSON (`high`) and nesting (`depth`). Strings, inside objects too, are
    made storable (see clean_text); `as_sent` keeps a token's text untouched for the
    screens, and its answer is cleaned when it is joined.
    """

    name: str
    kind: type = str
    required: bool = False
    default: Any = None
    low: float | None = None
    high: float | None = None
    doc: str = ""
    depth: int | None = None
    as_sent: bool = False

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
    if f.kind is str:
        value = value if f.as_sent or value.isascii() else clean_text(value)
        size = len(value)
    elif f.kind is dict:
        value = clean_json(f, value, 1)
        size = len(dumps(value))
    else:
        size = value
    if f.low is not None and f.kind is not bool and size < f.low:
        raise ClientError(f"'{f.name}' must be at least {f.low:g}{SIZE_UNITS.get(f.kind, '')}")
    if f.high is not None and f.kind is not bool and size > f.high:
        raise ClientError(f"'{f.name}' must be at most {f.high:g}{SIZE_UNITS.get(f.kind, '')}")
    return value


SIZE_UNITS = {str: " characters", dict: " characters as JSON"}


def clean_json(f: Field, value: Any, depth: int) -> Any:
    """A value inside an object field made storable: strings cleaned, finite numbers, at most `f.depth` levels."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ClientError(f"'{f.name}' must hold finite numbers only")
    if not isinstance(value, (dict, list)):
        return value
    if depth > f.depth:
        raise ClientError(f"'{f.name}' must be at most {f.depth} levels deep")
    if isinstance(value, list):
        return [clean_json(f, item, depth + 1) for item in value]
    return {clean_text(key): clean_json(f, item, depth + 1) for key, item in value.items()}


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
# The writes open no transaction of their own: Database.call runs each one, and
# the event-log rows that record it, in one transaction (a nested `with conn:`
# would commit at its end, before the events).

SCHEMA_VERSION = 2
DB_FILE_CHECK_S = 1.0           # how often the server looks whether its database file was deleted
# Columns added since tables were first shipped: CREATE TABLE IF NOT EXISTS leaves an older
# database's table as it was, so these are added to it before schema.sql runs.
ADDED_COLUMNS = {"participants": ("resumeHash TEXT", "lastAddress TEXT")}


def add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if present and column.split()[0] not in present:      # no table yet: schema.sql makes it whole
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


class DatabaseBusy(Exception):
    """Another process holds the database file: one server per database."""


def open_db(path: Path) -> sqlite3.Connection:
    """Open `path` for this process alone, then bring its schema up to date.

    An exclusive lock keeps the write-ahead log's index in this process's memory
    instead of a shared `-shm` mmap (which kills the process with SIGBUS when that
    file cannot be written), and it keeps a second server off the file: it is
    taken before anything is written, so a second server changes nothing.
    """
    conn = sqlite3.connect(path, check_same_thread=False, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        conn.close()
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:     # the extended code's primary part
            raise DatabaseBusy(f"database {path.resolve()} is in use by another server; stop that one, "
                               "or give this one another DATABASE_URL") from None
        raise
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise SystemExit(f"{path} was written by a newer server (schema {version}); use a newer gambiarra_server.py")
    if version < SCHEMA_VERSION:
        add_missing_columns(conn)
    schema = HERE / "schema.sql"
    # SCHEMA_SQL is near the end of the file (Schema): a long text, and only the fallback.
    conn.executescript(schema.read_text() if schema.exists() else SCHEMA_SQL)
    return conn


DB_THREAD_NICENESS = 5


def lower_thread_priority() -> None:
    """Lower the database thread's OS priority below the event loop's (Linux; elsewhere nothing).

    On a busy CPU the scheduler then runs the loop first: tokens reach the screens
    on time (README, Performance), and a second's worth of tokens is saved a few
    milliseconds later instead.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DB_THREAD_NICENESS)


# What a write records in the event log: event_row rows, or a function of the write's result that makes them.
Events = Iterable[tuple] | Callable[[Any], Iterable[tuple]]


def failure_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Writers:
    """How the background writers fare, for /health and the log.

    A writer that fails is logged once, and /health names what failed until the
    writer next runs clean; an item a writer set aside is logged and listed.
    """

    NAMES = ("tokens", "answers", "votes", "events", "heartbeat")
    REFUSED_SHOWN = 20

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}
        self.refused: list[str] = []            # the latest items set aside, oldest first

    def failed(self, writer: str, what: str) -> None:
        if self.failing.get(writer) != what:
            log.error("%s writer: %s", writer, loggable(what))
        self.failing[writer] = what

    def ok(self, writer: str) -> None:
        if self.failing.pop(writer, None) is not None:
            log.info("%s writer: working again", writer)

    def refuse(self, writer: str, item: str, exc: BaseException) -> None:
        """`item` could not be written and was set aside so that the rest could be."""
        what = f"could not write {item}, set it aside: {failure_text(exc)}"
        self.failed(writer, what)
        entry = f"{writer}: {what}"                     # an item tried again (a rescue each second) is listed once
        self.refused = [*(e for e in self.refused if e != entry), entry][-self.REFUSED_SHOWN:]

    def report(self) -> dict[str, str]:
        return {name: self.failing.get(name, "ok") for name in self.NAMES}


class Database:
    """The one sqlite connection, owned by one thread; statements run in submission order."""

    def __init__(self, path: Path, writers: Writers) -> None:
        self.path = path
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite", initializer=lower_thread_priority)
        try:
            self.conn = self.executor.submit(open_db, path).result()
        except BaseException:
            self.executor.shutdown()
            raise
        self.error: str | None = None
        self.restored_at: int | None = None      # when the file was last written back after being deleted
        self.writers = writers

    async def run(self, fn: Callable[..., Any], *args: Any, events: Events = (), **keywords: Any) -> Any:
        """Run `fn(conn, *args, **keywords)` on the database thread, with the events it records; return its
        result."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.call, fn, args, keywords, events)

    def submit(self, fn: Callable[..., Any], *args: Any, events: Events = ()) -> None:
        """Queue `fn(conn, *args)` and its events without waiting; a failure is logged and shown on /health."""
        def report(future: asyncio.Future[Any]) -> None:
            if future.exception() is None:
                self.writers.ok("events")
            else:
                self.writers.refuse("events", fn.__name__, future.exception())
        future = asyncio.get_running_loop().run_in_executor(self.executor, self.call, fn, args, {}, events)
        future.add_done_callback(report)

    def call(self, fn: Callable[..., Any], args: tuple, keywords: dict[str, Any], events: Events) -> Any:
        """On the database thread: run `fn` and record its events in one transaction; keep `error` until a
        write succeeds again.

        `events` are event_row rows, or a function of `fn`'s result that makes them
        when they name what `fn` created (it runs here, so it must not read live
        state). A read that works says nothing about a full disk, so only a write
        clears the error.
        """
        changes = self.conn.total_changes
        try:
            with self.conn:
                result = fn(self.conn, *args, **keywords)
                record_events(self.conn, events(result) if callable(events) else events)
        except ClientError:
            raise
        except Exception as exc:
            self.error = failure_text(exc)
            raise
        if self.conn.total_changes != changes:
            self.error = None
        return result

    async def keep_file(self) -> None:
        """Write the database back to its path if someone deleted the file (the open connection still has it all)."""
        if not self.path.exists():
            await asyncio.get_running_loop().run_in_executor(self.executor, self.write_back)

    def write_back(self) -> None:
        """On the database thread: copy the open database to its path and go on writing there.

        While it cannot (the folder is gone too, say) `error` says why, logged once, and the
        next check tries again.
        """
        if self.path.exists():
            return
        where = self.path.resolve()
        copy = self.path.with_name(self.path.name + ".restoring")
        try:
            with contextlib.closing(sqlite3.connect(copy)) as target:
                self.conn.backup(target)
            os.replace(copy, self.path)
        except (sqlite3.Error, OSError) as exc:
            self.fail(f"the database file {where} was deleted and cannot be written back: {exc}")
            return
        self.conn.close()               # its log goes into the deleted file, and its -wal away
        try:
            self.conn = open_db(self.path)
        except (sqlite3.Error, DatabaseBusy) as exc:
            self.fail(f"the database file {where} was written back but cannot be opened again: {exc}")
            return
        self.restored_at = now_ms()
        self.error = None
        log.error("database %s was deleted while the server ran; written back from the open connection, "
                  "nothing lost, and the server goes on writing to it", where)

    def fail(self, error: str) -> None:
        """Keep `error` for /health; log it when it is news."""
        if error != self.error:
            log.error("%s", error)
        self.error = error

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
    conn.execute("UPDATE participants SET connected = 0 WHERE connected = 1")


def session_participants(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    return every(conn, "SELECT * FROM participants WHERE sessionId = ? ORDER BY createdAt", session_id)


def session_rounds(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    return every(conn, 'SELECT * FROM rounds WHERE sessionId = ? ORDER BY "index"', session_id)


def get_participant(conn: sqlite3.Connection, participant_id: str) -> dict[str, Any] | None:
    return one(conn, "SELECT * FROM participants WHERE id = ?", participant_id)


def register_participant(conn: sqlite3.Connection, session_id: str, p: dict[str, Any], *,
                         resume_hash: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Insert or update a participant, moving it into `session_id` (the club's semantics), held by its runner."""
    now = now_ms()
    conn.execute(
        """INSERT INTO participants (id, sessionId, nickname, runner, model, connected, createdAt, lastSeen,
                                     resumeHash, lastAddress)
           VALUES (:id, :session, :nickname, :runner, :model, 1, :now, :now, :resume_hash, :address)
           ON CONFLICT (id) DO UPDATE SET
             kicked = CASE WHEN sessionId = :session THEN kicked ELSE 0 END,
             sessionId = :session, nickname = :nickname, runner = :runner, model = :model,
             connected = 1, lastSeen = :now, resumeHash = :resume_hash, lastAddress = :address""",
        {"id": p["participant_id"], "session": session_id, "nickname": p["nickname"],
         "runner": p["runner"], "model": p["model"], "now": now, "resume_hash": resume_hash, "address": address})
    return get_participant(conn, p["participant_id"])


def check_room_for(conn: sqlite3.Connection, session_id: str, participant_id: str, limit: int) -> None:
    """Refuse a participant new to the session once it holds `limit`; one already in it is always let back."""
    row = one(conn, "SELECT COUNT(*) AS n, COALESCE(MAX(id = ?), 0) AS known FROM participants WHERE sessionId = ?",
              participant_id, session_id)
    if not row["known"] and row["n"] >= limit:
        raise ClientError(f"This session is full: it has its {limit} participants", "SESSION_FULL")


def require_holder(pid: str, row: dict[str, Any] | None, *, address: str, secret: str | None,
                   connected_elsewhere: bool) -> None:
    """Let a register take `pid` only from the runner that holds it.

    Ids are public (they are on the screen) and an id's answers carry the nickname of
    whoever registers it last. Its runner proves itself with the resume_secret it was
    given, or (the club's clients send none) by coming back from the address it last used;
    an id no one holds (new, or released by the host) is anyone's.
    """
    held = row is not None and row["resumeHash"] is not None
    if held and secret is not None and secret.isascii() and hmac.compare_digest(sha256_hex(secret),
                                                                                 row["resumeHash"]):
        return
    if connected_elsewhere:
        raise Conflict(f"'{pid}' is connected from another machine; choose another participant id", "ID_IN_USE")
    if held and row["lastAddress"] != address:
        raise Conflict(f"'{pid}' belongs to another runner: reconnect from its machine or with its resume_secret, "
                       "choose another participant id, or ask the host to release it", "ID_IN_USE")


def claim_participant(conn: sqlite3.Connection, session_id: str, p: dict[str, Any], *, resume_hash: str,
                      address: str, connected_elsewhere: bool, max_participants: int) -> dict[str, Any]:
    """Register `p` for the runner at `address` if it holds the id (see require_holder) and the session has
    room for it (see check_room_for), in one database call."""
    pid = p["participant_id"]
    require_holder(pid, get_participant(conn, pid), address=address, secret=p["resume_secret"],
                   connected_elsewhere=connected_elsewhere)
    check_room_for(conn, session_id, pid, max_participants)
    return register_participant(conn, session_id, p, resume_hash=resume_hash, address=address)


def set_connected(conn: sqlite3.Connection, participant_id: str, connected: bool) -> None:
    conn.execute("UPDATE participants SET connected = ?, lastSeen = ? WHERE id = ?",
                 (int(connected), now_ms(), participant_id))


def kick_participant(conn: sqlite3.Connection, session_id: str, participant_id: str) -> dict[str, Any]:
    cursor = conn.execute("UPDATE participants SET kicked = 1, connected = 0 WHERE id = ? AND sessionId = ?",
                          (participant_id, session_id))
    if cursor.rowcount == 0:
        raise NotFound(f"Participant {participant_id} is not in this session")
    return get_participant(conn, participant_id)


def release_participant(conn: sqlite3.Connection, participant_id: str) -> None:
    """Forget who holds an id, so that any runner with the PIN may take it."""
    cursor = conn.execute("UPDATE participants SET resumeHash = NULL, lastAddress = NULL WHERE id = ?",
                          (participant_id,))
    if cursor.rowcount == 0:
        raise NotFound(f"No participant {participant_id}")


def kicked_ids(conn: sqlite3.Connection, session_id: str) -> set[str]:
    return {r["id"] for r in every(conn, "SELECT id FROM participants WHERE sessionId = ? AND kicked = 1", session_id)}


def create_round(conn: sqlite3.Connection, session_id: str, r: dict[str, Any]) -> dict[str, Any]:
    round_id = new_id()
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


def voting_status(row: dict[str, Any]) -> str:
    """A round's `votingStatus` as clients are told it. The column holds "closed" from creation until the
    stop opens voting (the club's schema); before the stop it is "pending" (never started) or "running"."""
    if row["startedAt"] is None:
        return "pending"
    return "running" if row["endedAt"] is None else row["votingStatus"]


def update_round(conn: sqlite3.Connection, round_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    assignments = ", ".join(f"{column} = :{column}" for column in changes)
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
    conn.execute(f"INSERT INTO metrics ({columns}) VALUES ({', '.join(':' + c for c in m)}) "
                 f"ON CONFLICT (roundId, participantId) DO UPDATE SET {updates}", m)


def token_column(content: str) -> str | bytes:
    """A token as the tokens table keeps it: its text, or, for a token holding half of a UTF-16
    surrogate pair (which sqlite cannot take as text), that text's bytes with the half kept,
    as a BLOB, so that a restart joins the pair again (see token_text)."""
    return content if encodable(content) else content.encode(errors="surrogatepass")


def token_text(column: str | bytes) -> str:
    return column.decode(errors="surrogatepass") if isinstance(column, bytes) else column


# SQLite's names for "the database cannot write now", as against "this statement cannot be written".
DATABASE_FAILURES = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED",
                     "SQLITE_NOMEM", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_CORRUPT", "SQLITE_NOTADB",
                     "SQLITE_PROTOCOL")


def is_database_failure(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot write now (full, read-only, locked, broken): then a whole
    batch waits for the next try. Any other failure is about one item, which is set aside alone."""
    if not isinstance(exc, sqlite3.Error):
        return False
    name = getattr(exc, "sqlite_errorname", None)
    if name is None:                                # Python 3.10 names no code: assume the disk
        return isinstance(exc, sqlite3.OperationalError)
    return name.startswith(DATABASE_FAILURES)


@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """Undo what the block wrote if it fails, and only that: the caller's transaction goes on."""
    if not conn.in_transaction:
        conn.execute("BEGIN")       # else the SAVEPOINT starts a transaction that its RELEASE commits
    conn.execute("SAVEPOINT item")
    try:
        yield
    except BaseException:
        if conn.in_transaction:     # a full disk can end the whole transaction at once
            conn.execute("ROLLBACK TO item")
            conn.execute("RELEASE item")
        raise
    conn.execute("RELEASE item")


def execute_each(conn: sqlite3.Connection, sql: str, rows: list[tuple]) -> list[tuple[tuple, Exception]]:
    """Run `sql` for every row in the caller's transaction; return the rows that failed, each with why.

    The rows go in one call; if one fails, they go again one by one, so that the others are
    written (SQLite undoes just the statement that failed). A database failure is raised.
    """
    if not rows:
        return []
    try:
        with savepoint(conn):
            conn.executemany(sql, rows)
        return []
    except Exception as exc:
        if is_database_failure(exc):
            raise
    failed = []
    for row in rows:
        try:
            conn.execute(sql, row)
        except Exception as exc:
            if is_database_failure(exc):
                raise
            failed.append((row, exc))
    return failed


TOKEN_INSERT = ("INSERT OR IGNORE INTO tokens (roundId, participantId, seq, content, receivedAt) "
                "VALUES (?, ?, ?, ?, ?)")
CONTENT_UPDATE = ("UPDATE metrics SET generatedContent = ?, tokensReceived = ?, seqGaps = ? "
                  "WHERE roundId = ? AND participantId = ?")


def save_tokens(conn: sqlite3.Connection, rows: list[tuple], contents: list[tuple],
                events: list[tuple]) -> list[tuple[str, Exception]]:
    """Write a batch of accepted tokens, refresh the content of already-saved answers and record the
    batch's events; return what could not be written, each with why. The rest is written."""
    rows = [(round_id, pid, seq, token_column(content), at) for round_id, pid, seq, content, at in rows]
    failed = [(f"token {row[2]} of {row[1]!r}", exc) for row, exc in execute_each(conn, TOKEN_INSERT, rows)]
    failed += [(f"the saved answer of {row[4]!r}", exc) for row, exc in execute_each(conn, CONTENT_UPDATE, contents)]
    failed += [(f"a {row[3]} event", exc) for row, exc in execute_each(conn, EVENT_INSERT, events)]
    return failed


def round_tokens(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    rows = every(conn, "SELECT participantId, seq, content, receivedAt FROM tokens WHERE roundId = ? "
                       "ORDER BY participantId, seq", round_id)
    return [{**row, "content": token_text(row["content"])} for row in rows]


def round_metrics(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    return every(conn, "SELECT * FROM metrics WHERE roundId = ? ORDER BY createdAt", round_id)


EVENT_INSERT = ("INSERT INTO event_logs (id, sessionId, timestamp, eventType, actorType, actorId, targetType, "
                "targetId, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


SYSTEM: tuple[str, str | None] = ("system", None)          # who acts, as (actorType, actorId)
ADMIN: tuple[str, str | None] = ("admin", None)
NO_TARGET: tuple[str | None, str | None] = (None, None)


def event_row(session_id: str | None, event_type: str, *, actor: tuple[str, str | None] = SYSTEM,
              target: tuple[str | None, str | None] = NO_TARGET, metadata: dict[str, Any] | None = None) -> tuple:
    """The values of one event-log row, for EVENT_INSERT; `actor` and `target` are (type, id) pairs."""
    return (new_id(), session_id, now_ms(), event_type, *actor, *target, None if metadata is None else dumps(metadata))


def record_events(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Add rows made by event_row to the event log."""
    conn.executemany(EVENT_INSERT, rows)


@dataclass
class VoteCounts:
    """How many votes each voter has cast in the round last voted in: the next voteOrder, without a query.

    Only the round last voted in is kept, so memory does not grow round after
    round; a voter it does not know costs one query, so forgetting is safe.
    """

    round_id: str | None = None
    by_voter: dict[str, int] = field(default_factory=dict)

    def next_order(self, conn: sqlite3.Connection, round_id: str, voter: str) -> int:
        if round_id != self.round_id:
            self.round_id, self.by_voter = round_id, {}
        if voter not in self.by_voter:
            self.by_voter[voter] = conn.execute("SELECT COUNT(*) FROM votes WHERE roundId = ? AND voterHash = ?",
                                                (round_id, voter)).fetchone()[0]
        return self.by_voter[voter] + 1

    def counted(self, voter: str) -> None:
        """A vote of `voter` was inserted in the round last voted in."""
        self.by_voter[voter] += 1

    def forget(self) -> None:
        """Drop every count: some were of votes that were rolled back."""
        self.by_voter.clear()


def cast_votes(conn: sqlite3.Connection, votes: list[dict[str, Any]],
               counts: VoteCounts) -> list[dict[str, Any] | Exception]:
    """Record a batch of immutable votes in one transaction: each gets its row, or why it was refused.

    One commit per batch, not per vote: a commit (and the checkpoints the
    write-ahead log then needs) costs far more than the vote itself. A vote that
    cannot be written for a reason of its own (anything but a database failure)
    undoes the batch, which is written again with each vote on a savepoint: then
    that vote alone is refused.
    """
    try:
        try:
            with savepoint(conn):
                return insert_votes(conn, votes, counts, alone=False)
        except Exception as exc:
            if is_database_failure(exc):
                raise
            counts.forget()                     # some counted votes were just undone
        return insert_votes(conn, votes, counts, alone=True)
    except Exception:
        counts.forget()
        raise


def insert_votes(conn: sqlite3.Connection, votes: list[dict[str, Any]], counts: VoteCounts,
                 alone: bool) -> list[dict[str, Any] | Exception]:
    """Insert each vote, or say why not; `alone`: each on a savepoint, where any failure undoes just that vote."""
    read: dict[tuple, Any] = {}          # what this batch has read: rounds and answers
    results: list[dict[str, Any] | Exception] = []
    for v in votes:
        try:
            with savepoint(conn) if alone else contextlib.nullcontext():
                results.append(insert_vote(conn, v, read, counts))
        except ClientError as exc:
            results.append(exc)
        except Exception as exc:
            if not alone or is_database_failure(exc):
                raise
            counts.forget()                 # it may have counted the vote just undone
            results.append(exc)
    return results


def insert_vote(conn: sqlite3.Connection, v: dict[str, Any], read: dict[tuple, Any],
                counts: VoteCounts) -> dict[str, Any]:
    """Insert one vote and its event, checked against its round and participant, in the caller's transaction."""
    round_id, voter = v["round_id"], v["voter_hash"]
    if ("round", round_id) not in read:
        read["round", round_id] = get_round(conn, round_id)
    if read["round", round_id]["votingStatus"] != "open":
        raise Conflict("Voting is not open for this round")
    if ("answer", round_id, v["participant_id"]) not in read:
        read["answer", round_id, v["participant_id"]] = one(
            conn, "SELECT 1 FROM metrics WHERE roundId = ? AND participantId = ?", round_id, v["participant_id"])
    if not read["answer", round_id, v["participant_id"]]:
        raise NotFound("Participant not found")
    vote = {"id": new_id(), "roundId": round_id, "voterHash": voter, "participantId": v["participant_id"],
            "score": v["score"], "createdAt": now_ms(), "voteOrder": counts.next_order(conn, round_id, voter),
            "responseTime": v["response_time"], "userAgent": v["user_agent"]}
    if not conn.execute("""INSERT INTO votes (id, roundId, voterHash, participantId, score, createdAt, voteOrder,
                                              responseTime, userAgent)
                           VALUES (:id, :roundId, :voterHash, :participantId, :score, :createdAt, :voteOrder,
                                   :responseTime, :userAgent)
                           ON CONFLICT (roundId, voterHash, participantId) DO NOTHING""", vote).rowcount:
        raise Conflict("Already voted for this participant")
    conn.execute(EVENT_INSERT, event_row(
        read["round", round_id]["sessionId"], "vote_cast", actor=("voter", voter),
        target=("participant", vote["participantId"]),
        metadata={"participantId": vote["participantId"], "score": vote["score"], "voteOrder": vote["voteOrder"],
                  "responseTime": vote["responseTime"]}))
    counts.counted(voter)
    return vote


def voter_votes(conn: sqlite3.Connection, round_id: str, voter_hash: str) -> list[dict[str, Any]]:
    get_round(conn, round_id)           # an unknown round is a 404, not "you have not voted"
    return every(conn, "SELECT participantId, score FROM votes WHERE roundId = ? AND voterHash = ? "
                       "ORDER BY createdAt", round_id, voter_hash)


def stored_engine_tps(model_info: str | None, client_duration_ms: float | None) -> float | None:
    """engine_tps of a metrics row, whose modelInfo is JSON text."""
    return engine_tps(json.loads(model_info) if model_info else None, client_duration_ms)


def scoreboard(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
    """One row per answer, best average first, then most votes (the order the reveal uses), with the
    engine's own tokens/s beside the server's."""
    rows = every(conn, """
        SELECT m.participantId AS participant_id, p.nickname, m.tokens,
               m.latencyFirstTokenMs AS latency_first_token_ms, m.durationMs AS duration_ms,
               COALESCE(m.tpsAvg, 0.0) AS tps_avg, COUNT(v.id) AS votes,
               COALESCE(AVG(v.score), 0.0) AS avg_score, COALESCE(SUM(v.score), 0) AS total_score,
               m.generatedContent AS generated_content, p.model, p.runner,
               m.modelInfo AS model_info, m.clientDurationMs AS client_duration_ms
        FROM metrics m JOIN participants p ON p.id = m.participantId
        LEFT JOIN votes v ON v.roundId = m.roundId AND v.participantId = m.participantId
        WHERE m.roundId = ?
        GROUP BY m.id
        ORDER BY avg_score DESC, votes DESC, m.createdAt""", round_id)
    for row in rows:
        model_info, duration_ms = row.pop("model_info"), row.pop("client_duration_ms")
        row["engine_tps"] = stored_engine_tps(model_info, duration_ms)
    return rows


def scoreboard_round(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    """The scoreboard's default round: the latest ended one, else the running one."""
    row = one(conn, 'SELECT * FROM rounds WHERE sessionId = ? AND endedAt IS NOT NULL ORDER BY "index" DESC LIMIT 1',
              session_id) or one(conn, 'SELECT * FROM rounds WHERE sessionId = ? AND startedAt IS NOT NULL '
                                       'ORDER BY "index" DESC LIMIT 1', session_id)
    if row is None:
        raise NotFound("No round found")
    return row


def round_answers(conn: sqlite3.Connection, round_id: str) -> list[dict[str, Any]]:
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
    """Every answer of a session with its round, participant, votes and engine tokens/s: the CSV's rows."""
    rows = every(conn, """
        SELECT m.*, r."index" AS roundIndex, r.startedAt AS roundStartedAt, r.endedAt AS roundEndedAt,
               p.nickname, p.model, p.runner, COUNT(v.id) AS votes, COALESCE(AVG(v.score), 0.0) AS avgScore
        FROM metrics m JOIN rounds r ON r.id = m.roundId JOIN participants p ON p.id = m.participantId
        LEFT JOIN votes v ON v.roundId = m.roundId AND v.participantId = m.participantId
        WHERE r.sessionId = ? GROUP BY m.id ORDER BY r."index", m.createdAt""", session_id)
    return [{**row, "engineTps": stored_engine_tps(row["modelInfo"], row["clientDurationMs"])} for row in rows]


def session_tree(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    """A whole session, nested, without its PIN: the JSON export."""
    session = session_row(conn, session_id)
    rounds = []
    for row in session_rounds(conn, session_id):
        metrics = [{**m, "modelInfo": json.loads(m["modelInfo"]) if m["modelInfo"] else None}
                   for m in round_metrics(conn, row["id"])]
        votes = every(conn, "SELECT * FROM votes WHERE roundId = ? ORDER BY createdAt", row["id"])
        rounds.append({**row, "votingStatus": voting_status(row), "metrics": metrics, "votes": votes})
    events = [{**e, "metadata": json.loads(e["metadata"]) if e["metadata"] else None}
              for e in session_events(conn, session_id)]
    participants = [{k: v for k, v in row.items() if k not in ("resumeHash", "lastAddress")}
                    for row in session_participants(conn, session_id)]
    return {**{k: v for k, v in session.items() if k not in ("pin", "pinHash")},
            "participants": participants, "rounds": rounds, "events": events}


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
class LiveAnswer:
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
        """The answer as stored: an emoji split across two tokens is one character again."""
        return clean_text("".join(self.ordered()))

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
    answers: dict[str, LiveAnswer] = field(default_factory=dict)
    tokens: int = 0              # kept for all runners together, to bound a round's memory
    chars: int = 0

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def index(self) -> int:
        return self.row["index"]

    @property
    def running(self) -> bool:
        return self.row["endedAt"] is None

    def answer(self, participant_id: str) -> LiveAnswer:
        answer = self.answers.get(participant_id)
        if answer is None:
            answer = self.answers[participant_id] = LiveAnswer(participant_id)
        return answer

    def keep(self, answer: LiveAnswer, seq: int, content: str, at: int) -> bool:
        """Add a token to one of this round's answers; say whether it was new."""
        if not answer.add(seq, content, at):
            return False
        self.tokens += 1
        self.chars += len(content)
        return True

    def check_room(self, chars: int, max_tokens: int, max_chars: int) -> None:
        """Refuse a token that would take the text of all answers together past the round's bounds."""
        if self.tokens >= max_tokens or self.chars + chars > max_chars:
            raise ClientError(f"Round {self.index} holds all the text a round may ({max_tokens} tokens, "
                              f"{max_chars} characters, every runner together); the rest is ignored", "ROUND_FULL")

    def check_open(self, grace_ms: float) -> None:
        """Refuse a token or `complete` once the answers are frozen: the grace after the stop is over, or
        voting has closed. Frames already on their way at the stop still count; later ones would change
        the answers the room votes on."""
        ended = self.row["endedAt"]
        if ended is not None and (self.row["votingStatus"] != "open" or now_ms() - ended > grace_ms):
            raise ClientError(f"Round {self.index} has ended and its answers are frozen; this is not kept",
                              "ROUND_CLOSED")


@dataclass
class SessionState:
    """The active session as the live code needs it."""

    id: str
    created_at: int
    pin_hash: bytes
    kicked: set[str] = field(default_factory=set)
    # The PIN once this server made it or saw it match the hash: candidates are then compared, not hashed.
    known_pin: str | None = None
    # Until then, bcrypt checks in flight per candidate, shared by every register that asks at once.
    pin_checks: dict[str, asyncio.Future[bool]] = field(default_factory=dict)


def pin_bytes(pin: str) -> bytes:
    # A lone surrogate (valid JSON) cannot be UTF-8; kept as its own bytes, it simply matches nothing.
    return pin.encode("utf-8", "surrogatepass")


def pin_matches(candidate: str, pin_hash: bytes) -> bool:
    """bcrypt's verdict (slow on purpose: call it off the loop); a malformed hash matches nothing."""
    try:
        return bcrypt.checkpw(pin_bytes(candidate), pin_hash)
    except ValueError:
        return False


class Arena:
    """The live state of the evening: the active session and its live rounds."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.session: SessionState | None = None
        self.rounds: dict[int, LiveRound] = {}          # by index
        self.unsaved: list[tuple] = []                   # token rows waiting for the next save
        self.bcrypt_turn = asyncio.Semaphore(1)          # one bcrypt check at a time: guesses cannot fill the CPU
        self.unsaved_events: list[tuple] = []            # and the events they record (first_token_received)

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
        """Whether `candidate` is the session's PIN: compared once the PIN is known, else bcrypt,
        one check at a time and once per distinct candidate in flight."""
        if session.known_pin is not None:
            return hmac.compare_digest(pin_bytes(candidate), pin_bytes(session.known_pin))
        check = session.pin_checks.get(candidate)
        if check is None:
            check = session.pin_checks[candidate] = asyncio.ensure_future(self.bcrypt_check(session, candidate))
        return await asyncio.shield(check)

    async def bcrypt_check(self, session: SessionState, candidate: str) -> bool:
        try:
            async with self.bcrypt_turn:
                ok = await asyncio.to_thread(pin_matches, candidate, session.pin_hash)
        finally:
            session.pin_checks.pop(candidate, None)
        if ok:
            session.known_pin = candidate
        return ok

    def accept_token(self, participant_id: str, index: int, seq: int, content: str, *,
                     config: Config) -> LiveAnswer | None:
        """Buffer one token within the round's and the answer's bounds; return its answer if it was new,
        None for a duplicate."""
        live = self.live_round(index)
        live.check_open(config.stop_grace_s * 1000)
        live.check_room(len(content), config.max_round_tokens, config.max_round_chars)
        answer = live.answer(participant_id)
        limit, chars_limit = config.max_answer_tokens, config.max_answer_chars
        # seq is bounded too: a resume reply lists the seqs missing below the highest one.
        if len(answer.tokens) >= limit or seq >= limit:
            raise ClientError(f"An answer keeps at most {limit} tokens (seq 0 to {limit - 1}); the rest is ignored",
                              "TOO_MANY_TOKENS")
        if answer.chars + len(content) > chars_limit:
            raise ClientError(f"An answer keeps at most {chars_limit} characters; the rest is ignored",
                              "ANSWER_TOO_LONG")
        at = now_ms()
        if not live.keep(answer, seq, content, at):
            return None
        self.unsaved.append((live.id, participant_id, seq, content, at))
        return answer

    def take_unsaved(self) -> tuple[list[tuple], list[tuple], list[tuple]]:
        """Hand over the tokens, refreshed contents and events that the next save writes."""
        rows, self.unsaved = self.unsaved, []
        events, self.unsaved_events = self.unsaved_events, []
        contents = []
        for live in self.rounds.values():
            for answer in live.answers.values():
                if answer.stale:
                    answer.stale = False
                    contents.append((answer.content, len(answer.tokens), answer.gaps, live.id, answer.participant_id))
        return rows, contents, events

    def give_back(self, rows: list[tuple], contents: list[tuple], events: list[tuple]) -> None:
        """Keep what a failed save took, so the next save tries again."""
        self.unsaved[:0] = rows
        self.unsaved_events[:0] = events
        for _, _, _, round_id, participant_id in contents:
            for live in self.rounds.values():
                if live.id == round_id:
                    live.answer(participant_id).stale = True


def answer_metrics(live: LiveRound, answer: LiveAnswer, report: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics row of an answer: server-clock figures, with the runner's own report beside them.

    `report` is the runner's `complete` message; None means the answer is rescued at stop.
    """
    now = now_ms()
    started, first = live.row["startedAt"], answer.first_token_at
    client = report or {}
    client_tokens, client_ttft = client.get("tokens"), client.get("latency_ms_first_token")
    client_duration = client.get("duration_ms")
    received = len(answer.tokens)
    tokens = received if client_tokens is None else client_tokens
    if first is not None and now > first:
        tps = received / ((now - first) / 1000)
    elif client_duration:
        tps = tokens / (client_duration / 1000)
    else:
        tps = 0.0                                       # never null: the telão calls toFixed on it
    return {
        "id": new_id(), "roundId": live.id, "participantId": answer.participant_id, "tokens": tokens,
        "latencyFirstTokenMs": first - started if first is not None else client_ttft, "durationMs": now - started,
        "tpsAvg": round(tps, 3), "modelInfo": dumps(client["model_info"]) if client.get("model_info") else None,
        "generatedContent": answer.content, "createdAt": now,
        "generationStartedAt": first - client_ttft if first is not None and client_ttft is not None else started,
        "generationEndedAt": now, "firstTokenAt": first, "tokensReceived": received, "seqGaps": answer.gaps,
        "clientLatencyFirstTokenMs": client_ttft, "clientDurationMs": client_duration,
        "rescued": int(report is None),
    }


# =============================================================================
# Messages: the frames clients send, and the JSON shapes they read
# =============================================================================
#
# The casing is the club's contract: database rows travel camelCase, hand-built
# payloads and every participant message snake_case.

ROUND_STATE_KEYS = ("id", "index", "prompt", "maxTokens", "temperature", "deadlineMs", "svgMode", "startedAt",
                    "endedAt", "votingStatus", "revealedCount")


def is_time(key: str) -> bool:
    return key.endswith("At") or key in ("lastSeen", "timestamp")


FLAG_COLUMNS = {"connected", "kicked", "svgMode", "rescued"}     # 0/1 in sqlite, true/false in JSON


def iso_times(data: Any) -> Any:
    """`data` with every time column, at any depth, as ISO text instead of epoch milliseconds,
    and every flag column as true or false."""
    if isinstance(data, list):
        return [iso_times(item) for item in data]
    if isinstance(data, dict):
        return {key: iso(value) if is_time(key) and isinstance(value, int)
                else bool(value) if key in FLAG_COLUMNS and isinstance(value, int) else iso_times(value)
                for key, value in data.items()}
    return data


def round_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**iso_times(row), "votingStatus": voting_status(row)}


def participant_json(row: dict[str, Any], connected: bool) -> dict[str, Any]:
    return {"id": row["id"], "sessionId": row["sessionId"], "nickname": row["nickname"], "runner": row["runner"],
            "model": row["model"], "connected": connected, "createdAt": iso(row["createdAt"]),
            "lastSeen": iso(row["lastSeen"])}


def session_json(row: dict[str, Any], with_pin: bool) -> dict[str, Any]:
    body = {"id": row["id"], "createdAt": iso(row["createdAt"]), "endedAt": iso(row["endedAt"]),
            "status": row["status"]}
    return {**body, "pin": row["pin"]} if with_pin else body


def vote_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "createdAt": iso(row["createdAt"])}


# What clients send: the fields of each incoming frame (ON_MESSAGE, in the WebSocket section, pairs
# each with its handler).

REGISTER = (
    Field("participant_id", str, True, low=1, high=MAX_TEXT, doc="stable id of this runner"),
    Field("nickname", str, high=MAX_TEXT, doc="shown on the screen (default: participant_id)"),
    Field("pin", str, True, high=64, doc="the session PIN"),
    Field("runner", str, default="", high=MAX_TEXT, doc="ollama, llamacpp, lmstudio, ..."),
    Field("model", str, default="", high=MAX_TEXT, doc="model name, free text"),
    Field("resume_secret", str, high=MAX_TEXT, doc="the resume_secret of an earlier registered: takes this id "
                                                   "back from another machine"),
)
TELAO_REGISTER = (
    Field("view", str, default="arena", high=32, doc='"arena" (default), "voting" (no token_update), ...'),
)
TOKEN = (
    Field("round", int, True, low=0, high=MAX_ROUND, doc="round index from the challenge"),
    Field("participant_id", str, high=MAX_TEXT, doc="must be the registered one"),
    Field("seq", int, True, low=0, high=10_000_000, doc="0, 1, 2, ... per round"),
    Field("content", str, default="", high=1_000_000, as_sent=True,
          doc="the token text; may be empty, or hold half of an emoji (joined with the next token's half)"),
)
COMPLETE = (
    Field("round", int, True, low=0, high=MAX_ROUND, doc="round index"),
    Field("participant_id", str, high=MAX_TEXT, doc="must be the registered one"),
    Field("tokens", int, low=0, high=10_000_000, doc="tokens generated, as the runner counts them"),
    Field("latency_ms_first_token", float, low=0, high=MAX_MS, doc="runner's own time to first token"),
    Field("duration_ms", float, low=0, high=MAX_MS, doc="runner's own generation time"),
    Field("model_info", dict, high=10_000, depth=8,
          doc="{name, runner, device?}: at most 10000 characters as JSON, 8 levels deep"),
)
RUNNER_ERROR = (
    Field("round", int, low=0, high=MAX_ROUND, doc="round index"),
    Field("participant_id", str, high=MAX_TEXT, doc="must be the registered one"),
    Field("code", str, default="", high=MAX_TEXT, doc="e.g. GENERATION_FAILED"),
    Field("message", str, default="", high=10_000, doc="what went wrong"),
)


# What the server sends: each frame is built by one function here.

def msg_error(message: str, code: str) -> dict[str, Any]:
    return {"type": "error", "message": message, "code": code}


def msg_registered(session_id: str, participant_id: str, resume_secret: str, *, live: LiveRound | None,
                   answer: LiveAnswer | None) -> dict[str, Any]:
    """A runner's welcome; during a round, `resume` says where its answer stands (what to send next, what is
    missing)."""
    message = {"type": "registered", "session_id": session_id, "participant_id": participant_id,
               "resume_secret": resume_secret}
    if live is not None and answer is not None:
        message["resume"] = {"round": live.index, "next_seq": answer.next_seq, "missing": answer.missing()}
    return message


def msg_registered_telao(view: str | None) -> dict[str, Any]:
    return {"type": "registered_telao", "view": view}


def msg_heartbeat() -> dict[str, Any]:
    return {"type": "heartbeat", "ts": now_ms()}


def msg_challenge(session_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """The challenge runners answer. The club's runners put `seed` into ollama's options as it is, so it is
    never null: a round saved before seeds were drawn goes without the key, as the club's server sends it."""
    seed = {} if row["seed"] is None else {"seed": row["seed"]}
    return {"type": "challenge", "session_id": session_id, "round": row["index"], "prompt": row["prompt"],
            "max_tokens": row["maxTokens"], "temperature": row["temperature"], "deadline_ms": row["deadlineMs"],
            **seed}


def msg_round_state(row: dict[str, Any]) -> dict[str, Any]:
    state = round_json(row)
    return {"type": "round_state", "round": {key: state[key] for key in ROUND_STATE_KEYS}}


def msg_participant_registered(row: dict[str, Any]) -> dict[str, Any]:
    return {"type": "participant_registered", "participant": participant_json(row, True)}


def msg_participant_disconnected(participant_id: str) -> dict[str, Any]:
    return {"type": "participant_disconnected", "participant_id": participant_id, "ts": now_ms()}


def msg_completion(index: int, m: dict[str, Any]) -> dict[str, Any]:
    return {"type": "completion", "participant_id": m["participantId"], "round": index, "tokens": m["tokens"],
            "duration_ms": m["durationMs"], "ttft_ms": m["latencyFirstTokenMs"], "tps": m["tpsAvg"],
            "engine_tps": stored_engine_tps(m["modelInfo"], m["clientDurationMs"])}


def live_tokens(live: LiveRound) -> dict[str, list[str]]:
    return {pid: answer.ordered() for pid, answer in live.answers.items()}


def msg_state_snapshot(session: SessionState, shown: dict[str, Any] | None, participants: list[dict[str, Any]],
                       live: LiveRound | None) -> dict[str, Any]:
    """What a screen needs when it (re)connects: the shown round and, while one runs, every token so far."""
    message = {"type": "state_snapshot",
               "session": {"id": session.id, "createdAt": iso(session.created_at), "status": "active"},
               "round": round_json(shown) if shown else None, "participants": participants}
    if live is not None:
        message["liveTokens"] = live_tokens(live)
    return message


def msg_round_started(index: int, session_id: str) -> dict[str, Any]:
    return {"type": "round_started", "round": index, "session_id": session_id}


def msg_token_update(participant_id: str, index: int, seq: int, content: str, total_tokens: int) -> dict[str, Any]:
    # Bench's screens match this key order as text (TOKEN_UPDATE): they must keep up on a shared CPU.
    return {"type": "token_update", "participant_id": participant_id, "round": index, "seq": seq,
            "content": content, "total_tokens": total_tokens}


# Every frame the server sends, by type: who gets it and its fields (`?`: sometimes absent). /docs and
# the module docstring list these; the msg_* functions above are the only places that build them.
SERVER_MESSAGES: dict[str, tuple[str, str]] = {
    "registered": ("runner", "session_id, participant_id, resume_secret, resume?"),
    "challenge": ("runner", "session_id, round, prompt, max_tokens, temperature, deadline_ms, seed?"),
    "heartbeat": ("runner", "ts"),
    "error": ("runner or screen", "message, code"),
    "registered_telao": ("screen", "view"),
    "state_snapshot": ("screen", "session, round, participants, liveTokens?"),
    "participant_registered": ("screen", "participant"),
    "participant_disconnected": ("screen", "participant_id, ts"),
    "round_started": ("screen", "round, session_id"),
    "round_state": ("screen", "round"),
    "token_update": ("screen", "participant_id, round, seq, content, total_tokens"),
    "completion": ("screen", "participant_id, round, tokens, duration_ms, ttft_ms, tps, engine_tps"),
}


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


def text_frame(data: bytes, masked: bool = False) -> bytes:
    """`data` as one unfragmented WebSocket text frame (RFC 6455, 5.2): unmasked as a server sends it,
    or masked with the all-zero key, which a client may use (bench's flat-out runners)."""
    size, mask_bit = len(data), 0x80 if masked else 0
    if size < 126:
        head = bytes((0x81, mask_bit | size))
    elif size < 65536:
        head = bytes((0x81, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, mask_bit | 127)) + size.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if masked else b"") + data


class Peer:
    """One WebSocket connection: a runner, a screen, or not yet either.

    A publisher never awaits a socket. Messages to a peer that keeps up are
    framed once, gathered during the event loop's turn and written together at
    its end (or every PEER_FLUSH_BYTES; a voting phone's after
    UNHURRIED_FLUSH_S): a few system calls per peer per turn, not one per
    message, and no task switch per message. Behind a backlog they wait in a
    queue for the peer's writer task, bounded in messages and in bytes (fan-out
    multiplies a big token by the screens); a peer whose queue fills up is not
    reading: it is cut off, and everyone else carries on.

    Text frames are written to the transport ready-made (text_frame), past
    aiohttp's writer: one frame is built per message and shared by every screen,
    and aiohttp would frame it again per peer, with an await each. So the socket
    is opened with compression off (a compressed frame is per connection and
    could not be shared) and autoping off (ws_endpoint sees every ping and pong,
    and any frame, a pong too, proves the peer alive). Pings and closes are rare
    and stateful (a close waits for the peer's), so they go through aiohttp.
    """

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, address: str, queue_limit: int,
                 queue_bytes: int) -> None:
        self.ws = ws
        self.transport = request.transport
        self.address = address
        self.participant_id: str | None = None          # set for registered runners
        self.row: dict[str, Any] = {}                   # ... with their participant row
        self.view: str | None = None                    # set for screens
        self.snapshot_due: asyncio.Task | None = None   # the state_snapshot on its way to this screen
        self.closing = False
        self.dropped = False
        self.last_heard = time.monotonic()
        self.told_to_slow_down = -math.inf              # when it was last told it is over WS_MESSAGE_RATE
        self.outbox: list[bytes] = []                   # frames for the end of this turn
        self.outbox_bytes = 0
        self.queue: asyncio.Queue[bytes | Control] = asyncio.Queue(queue_limit)
        self.queue_bytes = queue_bytes
        self.queued_bytes = 0
        self.writer = asyncio.create_task(self.write_all())

    def send(self, item: bytes | Control) -> None:
        """Send a frame made by text_frame (to share one among many peers), or a control."""
        if self.dropped:
            return
        if isinstance(item, bytes) and self.queue.empty() and self.keeping_up():
            if not self.outbox and self.view in SCREEN_VIEWS_WITHOUT_TOKENS:
                asyncio.get_running_loop().call_later(UNHURRIED_FLUSH_S, self.flush)
            elif not self.outbox:
                asyncio.get_running_loop().call_soon(self.flush)
            self.outbox.append(item)
            self.outbox_bytes += len(item)
            if self.outbox_bytes >= PEER_FLUSH_BYTES:
                self.flush()                    # a flood can bring thousands of tokens in one turn
            return
        size = len(item) if isinstance(item, bytes) else 0
        if self.queued_bytes and self.queued_bytes + size > self.queue_bytes:
            self.cut_off(f"not reading ({self.queued_bytes} bytes queued)")
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.cut_off(f"not reading ({self.queue.maxsize} messages queued)")
            return
        self.queued_bytes += size

    def send_json(self, message: dict[str, Any]) -> None:
        self.send(text_frame(json_bytes(message)))

    def keeping_up(self) -> bool:
        """Whether the socket takes what it is given (else messages queue for the writer)."""
        return (not self.closing and self.transport is not None and not self.transport.is_closing()
                and self.transport.get_write_buffer_size() < PEER_BACKLOG_BYTES)

    def flush(self) -> None:
        """Write the frames gathered this turn."""
        if self.outbox:
            frames, self.outbox, self.outbox_bytes = b"".join(self.outbox), [], 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(frames)

    def close(self, code: int, reason: str) -> None:
        """Close after everything already queued (an error message, say) has gone out."""
        self.send(Control("close", code, reason))

    def cut_off(self, why: str) -> None:
        """Drop the connection at once, without a closing handshake it would not read."""
        if self.dropped:
            return                      # publishers keep finding the queue full until the handler leaves
        self.dropped = True
        log.warning("WS_DROPPED %s (%s)", loggable(self.participant_id or self.view or self.address), why)
        # What it had not read goes with it: writing on into the aborted socket made
        # asyncio log a warning per write, on the loop that serves everyone else.
        self.writer.cancel()
        self.outbox, self.outbox_bytes = [], 0
        self.queue, self.queued_bytes = asyncio.Queue(), 0
        if self.transport is not None:
            self.transport.abort()

    async def write_all(self) -> None:
        if self.transport is None:
            return                                      # the connection is gone already
        try:
            while True:
                item = await self.queue.get()
                self.flush()                            # what was gathered before this item goes first
                if isinstance(item, bytes):
                    self.queued_bytes -= len(item)
                    while (not self.transport.is_closing()
                           and self.transport.get_write_buffer_size() >= PEER_BACKLOG_BYTES):
                        await asyncio.sleep(PEER_BACKLOG_POLL_S)
                    if self.transport.is_closing():
                        return                          # it hung up: nothing more goes out
                    self.transport.write(item)
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
        self.by_participant: dict[str, Peer] = {}             # registered participants by id
        self.screens: set[Peer] = set()
        self.arena_screens: list[Peer] = []            # the screens that show tokens (not the voting phones)

    def add_screen(self, peer: Peer) -> None:
        self.screens.add(peer)
        self.arena_screens = [s for s in self.screens if s.view not in SCREEN_VIEWS_WITHOUT_TOKENS]

    def drop_screen(self, peer: Peer) -> None:
        if peer in self.screens:
            self.screens.discard(peer)
            self.arena_screens = [s for s in self.screens if s.view not in SCREEN_VIEWS_WITHOUT_TOKENS]

    def publish_screens(self, message: dict[str, Any], tokens: bool = False) -> None:
        """Send to every screen; `tokens` messages skip screens that don't show tokens."""
        frame = text_frame(json_bytes(message))         # encoded and framed once for everyone
        for peer in self.arena_screens if tokens else self.screens:
            peer.send(frame)

    def publish_runners(self, message: dict[str, Any]) -> None:
        frame = text_frame(json_bytes(message))
        for peer in self.by_participant.values():
            peer.send(frame)

    def add_runner(self, peer: Peer, row: dict[str, Any]) -> None:
        """Make `peer` the connection of participant `row`, closing any older one first."""
        old = self.by_participant.get(row["id"])
        if old is not None and old is not peer:
            log.info("WS_DEDUP %s", loggable(row["id"]))
            old.close(WSCloseCode.OK, "replaced by a newer connection")
        self.drop_screen(peer)
        peer.participant_id, peer.row = row["id"], row
        self.by_participant[row["id"]] = peer

    def presence(self) -> list[dict[str, Any]]:
        """The connected runners, oldest participant first."""
        rows = sorted((peer.row for peer in self.by_participant.values()), key=lambda row: row["createdAt"])
        return [participant_json(row, True) for row in rows]


# =============================================================================
# The server: live state, database and connections, kept consistent together
# =============================================================================

class VoteWriter:
    """Votes on their way to the database, written in batches.

    A batch waits VOTE_LINGER_S for the votes already on their way, and a
    vote that arrives while a batch is being written waits for the next one:
    a room voting in a burst shares a few transactions instead of paying a
    commit per phone.
    """

    def __init__(self) -> None:
        self.waiting: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self.writer: asyncio.Task | None = None
        self.counts = VoteCounts()          # for cast_votes: only the database thread touches it

    async def cast(self, db: Database, vote: dict[str, Any]) -> dict[str, Any]:
        """Record a vote and return its row; raise the ClientError that refused it."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((vote, future))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.ensure_future(self.write_all(db))
        return await future

    async def write_all(self, db: Database) -> None:
        """Write batches while votes wait; each vote's request gets its row or its error, whatever fails."""
        while self.waiting:
            await asyncio.sleep(VOTE_LINGER_S)
            batch, self.waiting = self.waiting, []
            try:
                results: list[Any] = await db.run(cast_votes, [vote for vote, _ in batch], self.counts)
            except Exception as exc:
                db.writers.failed("votes", f"could not write {len(batch)} votes: {failure_text(exc)}")
                results = [exc] * len(batch)
            else:
                refused = [(vote, result) for (vote, _), result in zip(batch, results)
                           if isinstance(result, Exception) and not isinstance(result, ClientError)]
                for vote, exc in refused:
                    db.writers.refuse("votes", f"a vote for {vote['participant_id']!r}", exc)
                if not refused:
                    db.writers.ok("votes")
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue                            # the phone gave up waiting
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


@dataclass(frozen=True)
class Resumed:
    """What a start picked up from the database, for the banner."""

    session: dict[str, Any]                 # the active session's row
    pin: str | None                         # its PIN, if the server knows it (a club database keeps only the hash)
    round: dict[str, Any] | None            # its running round's row, if one runs
    participants: list[dict[str, Any]]      # who may register again: the session's participants, less the kicked
    kicked: int


class Gate:
    """Who may do what: which requests are the host's, which names are this server's, and the throttles
    that keep one address (or all of them, guessing PINs) from taking the evening."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pin_throttle = Throttle(config.pin_attempts_max, config.pin_attempts_window_s)
        # Every address together: however many addresses a guesser has, 10**6 PINs take days.
        self.pin_total_throttle = Throttle(config.pin_attempts_total_max, config.pin_attempts_window_s)
        self.http_throttle = Throttle(config.rate_limit_max, config.rate_limit_window_s)
        self.snapshot_throttle = Throttle(1, SNAPSHOT_INTERVAL_S)
        self.admission = Admission(config.connections_per_address)
        host_networks = [ipaddress.ip_network(net, strict=False) for net in config.host_addresses]
        # Asked on every HTTP request, where parsing the address would cost more than routing it.
        self.is_host = functools.lru_cache(maxsize=4096)(lambda address: in_networks(address, host_networks))
        self.own_addresses: set[str] = set()             # this machine's LAN addresses, found at start-up
        self.own_names = {"localhost"}                   # with this machine's names, found at start-up
        self.allowed_hosts = {host_name(name) for name in config.allowed_hosts}
        # Refusals a host wants to see, but not once per request: one line per address a minute.
        self.refusal_log = RareLog(60.0)

    def acts_as_host(self, request: web.Request) -> bool:
        """The request comes from the host's machine, and not from a page of another site open in its browser.

        Browsers name a page's site in Origin. Without this check any web page the host opens
        (or a DNS-rebinding name) could reach 127.0.0.1 and act as the host: read the PIN, end
        the session. curl sends no Origin; the club's pages run on localhost or this machine.
        """
        if not self.is_host(client_address(request, self.config)):
            return False
        origin = header(request, "Origin")
        if not origin or origin in self.config.cors_origins:
            return True
        try:
            hostname = urllib.parse.urlsplit(origin).hostname or ""
        except ValueError:
            return False
        return hostname == "localhost" or self.is_host(hostname) or hostname in self.own_addresses

    def is_named(self, host_header: str, local_address: str) -> bool:
        """Whether a Host header names this server, reached at `local_address`.

        That is an address of this machine, localhost, this machine's names (and their .local
        form, which phones use with mDNS) or ALLOWED_HOSTS. Any other name is a site that pointed
        its name at this machine (DNS rebinding), so that its pages could read it as their own.
        """
        name = host_name(host_header)
        if name in self.own_names or name in self.allowed_hosts or "*" in self.allowed_hosts:
            return True
        ip = ip_of(name)
        return ip is not None and (ip.is_loopback or ip == ip_of(local_address) or str(ip) in self.own_addresses)

    def require_host(self, request: web.Request) -> None:
        """Host routes answer the host's own machine, or anyone holding the admin token.

        A token that is sent must be right, wherever it comes from: a screen given a wrong one is
        caught at the rehearsal on the host's laptop, not on the evening on another machine.
        """
        authorization = header(request, "Authorization").strip()
        if not authorization:
            if self.acts_as_host(request):
                return
            if self.is_host(client_address(request, self.config)):
                raise Forbidden("A page from another site cannot act as the host: open it from this machine, list "
                                "its origin in CORS_ORIGINS, or send 'Authorization: Bearer <admin token>'",
                                "FOREIGN_ORIGIN")
            raise Unauthorized("This is a host route: call it from the host's machine or send "
                               "'Authorization: Bearer <admin token>'")
        scheme, _, token = authorization.partition(" ")
        expected = self.config.admin_token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            address = client_address(request, self.config)
            self.refusal_log.warning(f"token {address}", "wrong admin token from %s on %s %s (logged once a minute)",
                                     loggable(address), loggable(request.method), loggable(request.path))
            raise Forbidden("Wrong admin token")

    def is_host_request(self, request: web.Request) -> bool:
        """Whether the caller may see what only the host sees (the plain PIN): the same rule as host routes."""
        try:
            self.require_host(request)
        except ClientError:
            return False
        return True


@dataclass
class Server:
    """What every handler works with; one per app, so tests get a fresh one each.

    Its one job: keep the live state, the database and the connections consistent
    with each other (a token accepted is shown and later saved; a runner that leaves
    is announced and marked). Who may do what is the gate's.
    """

    config: Config                                   # as the app was made (with its admin token)
    db: Database = field(init=False)                 # opened when the app starts (running_server)
    arena: Arena = field(default_factory=Arena)      # the session, its live round and its unsaved tokens
    hub: Hub = field(default_factory=Hub)            # the connections, by role
    vote_writer: VoteWriter = field(default_factory=VoteWriter)     # votes, batched into the database
    writers: Writers = field(default_factory=Writers)   # how the background writers fare, for /health
    answers_version: int = 0                         # bumped whenever an answer, or a name beside it, changes
    rare_log: RareLog = field(default_factory=lambda: RareLog(RARE_LOG_S))  # lines a client can cause, rationed
    gate: Gate = field(init=False)                   # the host check and the throttles, made from config

    def __post_init__(self) -> None:
        self.gate = Gate(self.config)

    def event(self, event_type: str, *, actor: tuple[str, str | None] = SYSTEM,
              target: tuple[str | None, str | None] = NO_TARGET, metadata: dict[str, Any] | None = None) -> tuple:
        """An event-log row of the active session, for the write it records (`events=` of Database.run)."""
        session_id = self.arena.session.id if self.arena.session else None
        return event_row(session_id, event_type, actor=actor, target=target, metadata=metadata)

    async def load(self) -> None:
        """Pick up where a previous run stopped: the active session and its live round."""
        row = await self.db.run(active_session)
        if row is None:
            return
        await self.db.run(disconnect_everyone)
        session = self.arena.start_session(row, await self.db.run(kicked_ids, row["id"]))
        # One bcrypt check now spares every runner reconnecting after the restart its own.
        if await asyncio.to_thread(pin_matches, row["pin"], session.pin_hash):
            session.known_pin = row["pin"]
        log.info("restarted: session %s (PIN %s) goes on; its runners may register again", row["id"], row["pin"])
        shown = await self.db.run(shown_round, row["id"])
        if shown is None:
            return
        live = self.arena.start_round(shown)
        for token in await self.db.run(round_tokens, live.id):
            live.keep(live.answer(token["participantId"]), token["seq"], token["content"], token["receivedAt"])
        for m in await self.db.run(round_metrics, live.id):
            answer = live.answer(m["participantId"])
            answer.saved, answer.completed, answer.stale = True, not m["rescued"], False
        log.info("resumed session %s, round %d (%d answers in memory)", row["id"], live.index, len(live.answers))

    async def resumed(self) -> Resumed | None:
        """The active session this start picked up (see load), or None."""
        session = self.arena.session
        if session is None:
            return None
        row = await self.db.run(session_row, session.id)
        participants = await self.db.run(session_participants, session.id)
        live = self.arena.running_round()
        return Resumed(row, session.known_pin, live.row if live else None,
                       [p for p in participants if not p["kicked"]], sum(p["kicked"] for p in participants))

    async def save_streamed(self) -> None:
        """Write the tokens accepted since the last save, and the events they record. Never raises.

        What cannot be written is set aside (logged, and shown on /health) and the rest
        is written; if the database itself fails, everything waits for the next save.
        """
        rows, contents, events = self.arena.take_unsaved()
        if not rows and not contents and not events:
            return
        try:
            refused = await self.db.run(save_tokens, rows, contents, events)
        except Exception as exc:
            self.writers.failed("tokens", f"could not save {len(rows)} tokens (will retry): {failure_text(exc)}")
            self.arena.give_back(rows, contents, events)
            return
        for item, exc in refused:
            self.writers.refuse("tokens", item, exc)
        if not refused:
            self.writers.ok("tokens")
        if contents:
            self.answers_version += 1

    async def save_answer(self, live: LiveRound, answer: LiveAnswer, report: dict[str, Any] | None) -> dict[str, Any]:
        """Write an answer's metrics row and its event: on `complete` (with its report), or rescued at stop."""
        metrics = answer_metrics(live, answer, report)
        pid = answer.participant_id
        if report is None:
            event = self.event("generation_rescued", target=("participant", pid),
                               metadata={"roundIndex": live.index, "tokens": len(answer.tokens)})
        else:
            event = self.event("generation_completed", actor=("participant", pid), target=("round", live.id),
                               metadata={"roundIndex": live.index, "tokens": metrics["tokens"],
                                         "durationMs": metrics["durationMs"],
                                         "latencyFirstTokenMs": metrics["latencyFirstTokenMs"],
                                         "tpsAvg": metrics["tpsAvg"]})
        await self.db.run(save_metrics, metrics, events=[event])
        self.answers_version += 1
        answer.saved, answer.stale = True, False
        answer.completed = answer.completed or report is not None
        return metrics

    async def rescue(self, live: LiveRound) -> int:
        """Save every answer that streamed tokens but never completed (the runner dropped); say how many.

        An answer that cannot be written is set aside, so that the others are saved and the round
        can stop; a database failure is raised (the host's request then says so).
        """
        refused, saved = False, 0
        for answer in live.answers.values():
            if answer.tokens and not answer.saved:
                try:
                    await self.save_answer(live, answer, None)
                except Exception as exc:
                    if is_database_failure(exc):
                        raise
                    self.writers.refuse("answers", f"the answer of {answer.participant_id!r}", exc)
                    refused = True
                    continue
                log.info("Flushed buffered tokens for %s: %d tokens", loggable(answer.participant_id), len(answer.tokens))
                saved += 1
        if not refused:
            self.writers.ok("answers")
        return saved

    async def rescue_ended(self) -> None:
        """Rescue again in every stopped round still in memory: an answer whose first token came in the
        grace after the stop was not there for the stop's rescue. The caller holds Arena.lock."""
        for live in list(self.arena.rounds.values()):
            if not live.running and await self.rescue(live):
                await self.publish_round(live.row)      # the phones voting fetch the answers again

    async def save_turn(self) -> None:
        """The saver's turn, every FLUSH_INTERVAL: the tokens streamed since the last, and late answers."""
        await self.save_streamed()
        async with self.arena.lock:
            await self.rescue_ended()

    async def snapshot(self) -> dict[str, Any] | None:
        """The state a screen needs when it (re)connects."""
        session = self.arena.session
        if session is None:
            return None
        shown = await self.db.run(shown_round, session.id)
        return msg_state_snapshot(session, shown, self.hub.presence(), self.arena.running_round())

    async def publish_round(self, row: dict[str, Any]) -> None:
        """Tell screens a round changed; keep the live copy of its row in step."""
        live = self.arena.rounds.get(row["index"])
        if live is not None and live.id == row["id"]:
            live.row = row
        self.hub.publish_screens(msg_round_state(row))

    async def keep_alive(self) -> None:
        """Heartbeat the runners and ping everyone; drop peers silent for MISSED_PINGS intervals."""
        interval_s = self.config.ws_heartbeat_interval_s
        self.hub.publish_runners(msg_heartbeat())
        silent_since = time.monotonic() - interval_s * MISSED_PINGS
        for peer in list(self.hub.peers):
            if peer.last_heard < silent_since:
                peer.cut_off(f"silent for {interval_s * MISSED_PINGS:g} s")
            else:
                peer.send(PING)

    async def leave(self, peer: Peer) -> None:
        """Forget a closed connection; a runner's departure is announced unless it was replaced."""
        self.hub.peers.discard(peer)
        self.hub.drop_screen(peer)
        if not peer.closing:
            peer.writer.cancel()
        if peer.snapshot_due is not None:
            peer.snapshot_due.cancel()
        pid = peer.participant_id
        if pid is not None and self.hub.by_participant.get(pid) is peer:
            del self.hub.by_participant[pid]
            log.info("WS_DISCONNECTED %s from %s", loggable(pid), loggable(peer.address))
            self.hub.publish_screens(msg_participant_disconnected(pid))
            self.db.submit(set_connected, pid, False, events=[
                self.event("participant_disconnected", actor=("participant", pid), target=("participant", pid))])


server_key = web.AppKey("server", Server)      # the app's one Server, for handlers that get only the request


# =============================================================================
# WebSocket: /ws for runners and screens
# =============================================================================

def require_runner(peer: Peer, m: dict[str, Any]) -> str:
    """The participant this socket registered as, which is the only one it may speak for."""
    if peer.participant_id is None:
        raise ClientError("Register before sending this message", "NOT_REGISTERED")
    if m["participant_id"] not in (None, peer.participant_id):
        raise Forbidden(f"This connection is registered as {peer.participant_id}, not {m['participant_id']}",
                        "WRONG_PARTICIPANT")
    return peer.participant_id


def pin_network(address: str) -> str:
    """Whom a wrong PIN is counted against: the address, or for IPv6 its /64, any of which one machine can take."""
    ip = ip_of(address)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip and ip.version == 6 else address


async def check_pin(server: Server, peer: Peer, session: SessionState, candidate: str) -> None:
    """Refuse a wrong PIN, and a caller that guessed wrong too often, with a clear error.

    Only a PIN found wrong counts: PIN_ATTEMPTS_MAX per address (an IPv6 /64), and
    PIN_ATTEMPTS_TOTAL_MAX from everyone together. Past the total, an address that already
    guessed wrong in the window waits it out, but one that did not is still checked: strangers
    filling the total cannot lock out a runner that types the right PIN.
    """
    throttle, everyone, key = server.gate.pin_throttle, server.gate.pin_total_throttle, pin_network(peer.address)
    wait_s = throttle.wait_s(key) or (everyone.wait_s("") if throttle.count(key) else 0.0)
    if wait_s:
        whose = "from your address" if throttle.wait_s(key) else "on this server, yours among them"
        raise TooMany(f"Too many wrong PINs {whose}; try again in {math.ceil(wait_s)} s", wait_s, "PIN_THROTTLED")
    # Count a guess before bcrypt answers, or guesses sent at once on many connections would all be
    # checked before the first failure counted; a register joining a check in flight is not a new guess.
    counted = candidate not in session.pin_checks
    if counted and session.known_pin is None and len(session.pin_checks) >= PIN_CHECKS_WAITING:
        raise TooMany("The server is busy checking other PINs; try again in 1 s", 1.0, "PIN_THROTTLED")
    if counted:
        throttle.add(key)
        everyone.add("")
    if await server.arena.verify_pin(session, candidate):
        if counted:
            throttle.forgive(key)                       # the right PIN is not a guess
            everyone.forgive("")
        return
    raise ClientError("Invalid PIN.", "INVALID_PIN")


async def on_register(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    if peer.participant_id not in (None, m["participant_id"]):
        # One connection speaks for one participant; a second identity would leave the first
        # one listed as present on a socket that no longer answers for it.
        raise Conflict(f"This connection is registered as {peer.participant_id}; open another connection "
                       f"for {m['participant_id']}", "ALREADY_REGISTERED")
    arena = server.arena
    session = arena.require_session()
    await check_pin(server, peer, session, m["pin"])
    pid = m["participant_id"]
    async with arena.lock:
        if arena.session is not session:
            raise ClientError("A new session started; reconnect with the new PIN.", "SESSION_ENDED")
        if pid in session.kicked:
            raise Forbidden("The host removed you from this session", "KICKED")
        holder = server.hub.by_participant.get(pid)
        elsewhere = holder is not None and holder is not peer and holder.address != peer.address
        secret = secrets.token_urlsafe(16)
        nickname = m["nickname"] or pid
        row = await server.db.run(claim_participant, session.id, {**m, "nickname": nickname},
                                  resume_hash=sha256_hex(secret), address=peer.address, connected_elsewhere=elsewhere,
                                  max_participants=server.config.max_participants, events=[
            server.event("participant_registered", actor=("participant", pid), target=("participant", pid),
                         metadata={"nickname": nickname, "runner": m["runner"], "model": m["model"]})])
        server.answers_version += 1                     # the nickname beside an answer may have changed
        server.hub.add_runner(peer, row)
    live = arena.running_round()
    # Only a read: a runner with no tokens yet gets no empty card in liveTokens.
    answer = (live.answers.get(pid) or LiveAnswer(pid)) if live is not None else None
    peer.send_json(msg_registered(session.id, pid, secret, live=live, answer=answer))
    log.info("WS_REGISTERED %s (%s) from %s", loggable(pid), loggable(row["nickname"]), loggable(peer.address))
    server.hub.publish_screens(msg_participant_registered(row))


async def on_telao_register(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    peer.view = m["view"]
    server.hub.add_screen(peer)
    peer.send_json(msg_registered_telao(peer.view))
    if peer.snapshot_due is None or peer.snapshot_due.done():
        peer.snapshot_due = asyncio.create_task(send_snapshot(server, peer))
    # Else the snapshot on its way answers this ask too: it is the state as it is when it goes.


async def send_snapshot(server: Server, peer: Peer) -> None:
    """Send `peer` a state_snapshot. It holds every live token: a screen needs one when it (re)connects,
    and an address (not the host's) asking for more gets one per SNAPSHOT_INTERVAL_S. The wait is this
    task's, not the connection's: its other messages are read and answered meanwhile."""
    if not server.gate.is_host(peer.address):
        while wait_s := server.gate.snapshot_throttle.wait_s(peer.address):
            await asyncio.sleep(wait_s)
        server.gate.snapshot_throttle.add(peer.address)
    try:
        snapshot = await server.snapshot()
    except Exception as exc:            # its telao_register was answered already: say it here
        log.error("state_snapshot for %s failed: %s", loggable(peer.address), loggable(failure_text(exc)))
        peer.send_json(msg_error("The server could not send the state; send telao_register again", "SERVER_BUSY"))
        return
    if snapshot is not None:
        peer.send_json(snapshot)


async def on_token(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    pid = require_runner(peer, m)
    answer = server.arena.accept_token(pid, m["round"], m["seq"], m["content"], config=server.config)
    if answer is None:
        return                                          # a duplicate seq: already shown
    if len(answer.tokens) == 1:                         # saved with the token, by the next save
        server.arena.unsaved_events.append(
            server.event("first_token_received", actor=("participant", pid), metadata={"round": m["round"]}))
    server.hub.publish_screens(msg_token_update(pid, m["round"], m["seq"], m["content"], len(answer.tokens)),
                               tokens=True)


async def on_complete(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    pid = require_runner(peer, m)
    report = {**m, **{key: round(m[key]) for key in ("latency_ms_first_token", "duration_ms") if m[key] is not None}}
    async with server.arena.lock:
        live = server.arena.live_round(m["round"])
        live.check_open(server.config.stop_grace_s * 1000)
        metrics = await server.save_answer(live, live.answer(pid), report)
    log.info("WS_COMPLETE %s round %d: %d tokens", loggable(pid), live.index, metrics["tokensReceived"])
    server.hub.publish_screens(msg_completion(live.index, metrics))


async def on_error(server: Server, peer: Peer, m: dict[str, Any]) -> None:
    pid = require_runner(peer, m)
    # A runner reports a failure once an answer; a flood of reports is one line and one event row per
    # RARE_LOG_S (the line counts the rest).
    if server.rare_log.warning(f"reported {pid}", "runner %s reported %s: %s", loggable(pid), loggable(m["code"]),
                               loggable(m["message"])):
        server.db.submit(record_events, [
            server.event("generation_failed", actor=("participant", pid), target=("participant", pid),
                         metadata={"roundIndex": m["round"], "code": m["code"], "message": m["message"]})])


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
        if kind == "register":
            log_refusal(server, peer, message, exc)
        peer.send_json(msg_error(str(exc), exc.code))
    except sqlite3.Error as exc:
        log.error("database error on a %s message: %s", loggable(kind), loggable(exc))
        peer.send_json(msg_error("The server could not save this; please send it again", "SERVER_BUSY"))
    except Exception:
        # A bug must not leave a runner's socket open and unread in the middle of a round.
        log.exception("unexpected error on a %s message", loggable(repr(kind)))
        peer.send_json(msg_error("Internal error; the server log has the details", "INTERNAL"))


def log_refusal(server: Server, peer: Peer, message: dict[str, Any], exc: ClientError) -> None:
    """One line per refused register: who, from where, why. A throttled address's are one line a minute."""
    args = (loggable(message.get("participant_id")), loggable(peer.address), exc.code, loggable(exc))
    if isinstance(exc, TooMany):
        server.gate.refusal_log.warning(f"pin {peer.address}", "WS_REFUSED register %s from %s: %s (%s); logged "
                                        "once a minute", *args)
    else:
        log.warning("WS_REFUSED register %s from %s: %s (%s)", *args)


def turned_away(server: Server, peer: Peer) -> bool:
    """Send away a connection beyond WS_CONNECTIONS_PER_ADDRESS, with an error it can show; say if it was.

    The host's addresses are exempt: a proxy or the club's load test there speaks for many.
    """
    limit = server.config.ws_connections_per_address
    if server.gate.is_host(peer.address) or sum(p.address == peer.address for p in server.hub.peers) <= limit:
        return False
    log.warning("WS_REFUSED %s: more than %d connections", loggable(peer.address), limit)
    peer.send_json(msg_error(f"Too many connections from your address (at most {limit}); close one and "
                             "try again", "TOO_MANY_CONNECTIONS"))
    peer.close(WSCloseCode.TRY_AGAIN_LATER, "too many connections from your address")
    return True


async def slow_down(peer: Peer, wait_s: float, rate: float) -> None:
    """Read a connection over WS_MESSAGE_RATE later: its own sends wait for it, and none is lost."""
    now = time.monotonic()
    if now - peer.told_to_slow_down >= RATE_NOTICE_S:
        peer.told_to_slow_down = now
        peer.send_json(msg_error(f"More than {rate:g} messages per second: the server reads this connection more "
                                 "slowly for now; nothing is lost", "RATE_LIMITED"))
    await asyncio.sleep(wait_s)


def check_origin(request: web.Request, config: Config) -> None:
    """Refuse a browser WebSocket from a page on another origin that CORS_ORIGINS does not allow."""
    origin = header(request, "Origin")
    if origin and not allowed_origin(config, origin) and origin.split("://")[-1] != request.host:
        log.warning("WS_REFUSED %s: a page on %s (not in CORS_ORIGINS)", loggable(client_address(request, config)),
                    loggable(origin))
        raise Forbidden("Cross-origin WebSocket connection rejected")


async def ws_endpoint(request: web.Request) -> web.WebSocketResponse:
    """One connection: read frames in order until it closes, then forget it."""
    server = request.app[server_key]
    config = server.config
    check_origin(request, config)
    ws = web.WebSocketResponse(autoping=False, compress=False, max_msg_size=config.ws_max_payload, timeout=1.0)
    await ws.prepare(request)
    peer = Peer(ws, request, client_address(request, config), config.peer_queue_limit, config.peer_queue_bytes)
    server.hub.peers.add(peer)
    pace = None if server.gate.is_host(peer.address) else Pace(config.ws_message_rate)
    try:
        if turned_away(server, peer):
            await asyncio.wait([peer.writer])           # the error, then the close (bounded by `timeout`)
            return ws
        async for msg in ws:
            peer.last_heard = time.monotonic()
            if pace is not None and (wait_s := pace.wait_s()):
                await slow_down(peer, wait_s, config.ws_message_rate)
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
    return web.Response(body=json_bytes(data), status=status, content_type="application/json", charset="utf-8")


async def session_round(server: Server, round_id: str) -> dict[str, Any]:
    row = await server.db.run(get_round, round_id)
    if row["sessionId"] != server.arena.require_session().id:
        raise Conflict("That round belongs to an earlier session")
    return row


# --- session and presence ----------------------------------------------------

async def get_health(server: Server, request: web.Request, p: Params) -> web.Response:
    writers = server.writers.report()
    failing = next((f"{name} writer: {what}" for name, what in writers.items() if what != "ok"), None)
    return json_response({"status": "ok", "timestamp": now_ms(), "version": __version__,
                          "database": server.db.error or failing or "ok", "database_restored_at": iso(server.db.restored_at),
                          "connections": len(server.hub.peers), "writers": writers, "refused": server.writers.refused})


async def post_session(server: Server, request: web.Request, p: Params) -> web.Response:
    """Start a new session with a fresh PIN; the previous session's runners are sent away."""
    pin = "".join(secrets.choice("0123456789") for _ in range(p["pin_length"] or server.config.pin_length))
    pin_hash = await asyncio.to_thread(bcrypt.hashpw, pin.encode(), bcrypt.gensalt(server.config.bcrypt_rounds))
    arena, hub = server.arena, server.hub
    async with arena.lock:
        live = arena.running_round()
        if live is not None:
            await server.rescue(live)
        await server.save_streamed()
        sent_away = list(hub.by_participant.values())
        row = await server.db.run(create_session, pin, pin_hash.decode(), events=lambda row: [
            event_row(row["id"], "session_created", actor=ADMIN,
                      metadata={"disconnectedPreviousParticipants": len(sent_away)})])
        hub.by_participant.clear()
        # This server just made the PIN: registers compare against it instead of paying bcrypt.
        arena.start_session(row).known_pin = pin
    for peer in sent_away:
        peer.participant_id = None
        peer.send_json(msg_error("A new session started; reconnect with the new PIN.", "SESSION_ENDED"))
        peer.close(WSCloseCode.OK, "session ended")
    log.info("session %s created, PIN %s (%d runners of the previous one sent away)", row["id"], pin, len(sent_away))
    hub.publish_screens(await server.snapshot())
    return json_response({"session_id": row["id"], "id": row["id"], "pin": pin, "created_at": iso(row["createdAt"]),
                          "status": "active", "disconnected_participants": len(sent_away)})


async def get_session(server: Server, request: web.Request, p: Params) -> web.Response:
    session = server.arena.require_session()
    row = await server.db.run(session_row, session.id)
    participants = await server.db.run(session_participants, session.id)
    rounds = await server.db.run(session_rounds, session.id)
    with_pin = server.gate.is_host_request(request)
    return json_response({**session_json(row, with_pin),
                          "participants": [participant_json(r, r["id"] in server.hub.by_participant) for r in participants],
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
        await server.db.run(kick_participant, session.id, pid, events=[
            server.event("participant_kicked", actor=ADMIN, target=("participant", pid))])
        session.kicked.add(pid)
        peer = server.hub.by_participant.pop(pid, None)
    if peer is not None:
        peer.participant_id = None
        peer.send_json(msg_error("The host removed you from this session", "KICKED"))
        peer.close(WSCloseCode.POLICY_VIOLATION, "kicked by the host")
        server.hub.publish_screens(msg_participant_disconnected(pid))
    log.info("kicked %s (%s)", loggable(pid), f"was connected from {loggable(peer.address)}" if peer else "not connected")
    return json_response({"status": "ok", "participant_id": pid, "was_connected": peer is not None})


async def post_participants_release(server: Server, request: web.Request, p: Params) -> web.Response:
    """Let any runner with the PIN take this id (its laptop changed); a connection holding it keeps it."""
    pid = p["participant_id"]
    async with server.arena.lock:                       # not between a register's check and its write
        await server.db.run(release_participant, pid, events=[
            server.event("participant_released", actor=ADMIN, target=("participant", pid))])
    return json_response({"status": "ok", "participant_id": pid, "connected": pid in server.hub.by_participant})


# --- rounds --------------------------------------------------------------------

async def post_rounds(server: Server, request: web.Request, p: Params) -> web.Response:
    """Create the next round; without a seed one is drawn and kept, so the round can be run again alike."""
    if p["seed"] is None:
        p = {**p, "seed": random.randrange(SEED_RANGE)}
    async with server.arena.lock:
        session_id = server.arena.require_session().id
        row = await server.db.run(create_round, session_id, p, events=lambda row: [
            event_row(session_id, "round_created", actor=ADMIN, target=("round", row["id"]),
                      metadata={"index": row["index"], "prompt": row["prompt"], "maxTokens": row["maxTokens"],
                                "temperature": row["temperature"], "deadlineMs": row["deadlineMs"],
                                "svgMode": p["svg_mode"]})])
    log.info("round %d created (%s), seed %d", row["index"], row["id"], row["seed"])
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
        await server.save_streamed()                            # the previous round leaves memory only once saved
        await server.rescue_ended()
        row = await server.db.run(update_round, row["id"], {"startedAt": now_ms()}, events=[
            server.event("round_started", actor=ADMIN, target=("round", row["id"]), metadata={"index": row["index"]})])
        arena.start_round(row)
    session_id = arena.require_session().id
    server.hub.publish_runners(msg_challenge(session_id, row))
    server.hub.publish_screens(msg_round_started(row["index"], session_id))
    await server.publish_round(row)
    body = round_json(row)
    if server.hub.by_participant:
        log.info("round %d started: the challenge went to %d runners", row["index"], len(server.hub.by_participant))
    else:
        body["warning"] = ("No runner is connected: nobody got the challenge. Runners that register while the "
                           "round runs get it then; or stop the round and start another once they are here.")
        log.warning("round %d started with no runner connected", row["index"])
    return json_response(body)


async def post_rounds_stop(server: Server, request: web.Request, p: Params) -> web.Response:
    """Stop a round: rescue unfinished answers, then open voting (even with no answers)."""
    arena = server.arena
    async with arena.lock:
        arena.require_session()
        running = arena.running_round()
        if not p["round_id"] and running is None:     # an empty roundId counts as none given
            raise Conflict("No round is running")
        row = await session_round(server, p["round_id"] or running.id)
        if row["startedAt"] is None:
            raise Conflict("Round has not started")
        if row["endedAt"] is not None:
            raise Conflict("Round already ended")
        await server.rescue(arena.rounds[row["index"]])
        answers = len(await server.db.run(round_metrics, row["id"]))
        target = ("round", row["id"])
        row = await server.db.run(update_round, row["id"], {"endedAt": now_ms(), "votingStatus": "open"}, events=[
            server.event("round_stopped", actor=ADMIN, target=target, metadata={"index": row["index"],
                                                                               "responses": answers}),
            server.event("voting_opened", target=target)])
        await server.publish_round(row)
    log.info("round %d stopped with %d answers; voting opened", row["index"], answers)
    return json_response(round_json(row))


async def get_rounds_current(server: Server, request: web.Request, p: Params) -> web.Response:
    server.arena.require_session()
    live = server.arena.running_round()
    if live is None:
        raise NotFound("No active round")
    return json_response({**round_json(live.row), "liveTokens": live_tokens(live)})


async def encode_answers(server: Server, row: dict[str, Any]) -> tuple[bytes, bytes]:
    """The voting page's JSON for a round, plain and gzipped (compressed off the event loop)."""
    body = json_bytes({"responses": await server.db.run(round_answers, row["id"]), "svgMode": bool(row["svgMode"]),
                       "votingStatus": voting_status(row), "prompt": row["prompt"], "round_id": row["id"]})
    return body, await asyncio.to_thread(gzip.compress, body, 5)


# The voting page's answers as last sent: (round id, voting status, answers_version) -> JSON, plain and gzipped.
answers_cache_key = web.AppKey("answers_cache", dict[tuple, asyncio.Future[tuple[bytes, bytes]]])


async def get_round_responses(server: Server, request: web.Request, p: Params) -> web.Response:
    """A round's answers for the voting page.

    Every phone asks the moment voting opens, and the answers are long: the body
    is built once per change and shared, including by requests that arrive while
    it is being built; gzipped for the phones that accept it (every browser),
    since a room's wifi is slower than its server.
    """
    await server.save_streamed()                                # tokens that trailed their `complete`
    row = await server.db.run(get_round, request.match_info["round_id"])
    key = (row["id"], voting_status(row), server.answers_version)
    cache = request.app[answers_cache_key]              # one entry: the latest body
    built = cache.get(key)
    if built is None or (built.done() and built.exception()):
        cache.clear()
        built = cache[key] = asyncio.ensure_future(encode_answers(server, row))
    body, zipped = await asyncio.shield(built)
    if "gzip" in header(request, "Accept-Encoding"):
        return web.Response(body=zipped, content_type="application/json", charset="utf-8",
                            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return web.Response(body=body, content_type="application/json", charset="utf-8", headers={"Vary": "Accept-Encoding"})


# --- voting and the reveal -------------------------------------------------------

Change = tuple[dict[str, Any], dict[str, Any] | None]        # the columns to change, and the event's metadata
Check = Callable[[dict[str, Any], list[dict[str, Any]]], Change]   # vets a round against its ranking


async def change_round(server: Server, round_id: str | None, check: Check,
                       event_type: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One step of the voting ceremony: `check` vets the round against its ranking and says what to change
    and record; return the changed round and its ranking."""
    async with server.arena.lock:
        session = server.arena.require_session()
        row = await (session_round(server, round_id) if round_id else server.db.run(voting_round, session.id))
        ranking = await server.db.run(scoreboard, row["id"])
        changes, metadata = check(row, ranking)
        row = await server.db.run(update_round, row["id"], changes, events=[
            server.event(event_type, actor=ADMIN, target=("round", row["id"]), metadata=metadata)])
        await server.publish_round(row)
    return row, ranking


def closing_vote(row: dict[str, Any], ranking: list[dict[str, Any]]) -> Change:
    if row["votingStatus"] != "open":
        raise Conflict("Voting is not open for this round")
    return {"votingStatus": "closed"}, None


def starting_reveal(row: dict[str, Any], ranking: list[dict[str, Any]]) -> Change:
    if row["endedAt"] is None:
        raise Conflict("The round has not ended yet")
    if row["votingStatus"] == "open":
        raise Conflict("Close voting before the reveal")
    return {"votingStatus": "revealed", "revealedCount": 0}, None


def last_revealed(revealed_count: int, ranking: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The position revealed last (the reveal goes from last place up) and its ranking row."""
    position = len(ranking) - revealed_count + 1
    return position, ranking[position - 1]


def revealing_next(row: dict[str, Any], ranking: list[dict[str, Any]]) -> Change:
    if row["votingStatus"] != "revealed":
        raise Conflict("Start the reveal first")
    if row["revealedCount"] >= len(ranking):
        raise Conflict("Every position is already revealed")
    revealed = row["revealedCount"] + 1
    position, entry = last_revealed(revealed, ranking)
    return {"revealedCount": revealed}, {"position": position, "revealedCount": revealed,
                                         "totalParticipants": len(ranking), "participantId": entry["participant_id"]}


async def close_voting(server: Server, round_id: str | None) -> web.Response:
    row, _ = await change_round(server, round_id, closing_vote, "voting_closed")
    log.info("round %d: voting closed", row["index"])
    return json_response(round_json(row))


async def post_close_voting(server: Server, request: web.Request, p: Params) -> web.Response:
    return await close_voting(server, request.match_info["round_id"])


async def post_votes_close(server: Server, request: web.Request, p: Params) -> web.Response:
    return await close_voting(server, p["round_id"])


async def post_reveal(server: Server, request: web.Request, p: Params) -> web.Response:
    row, _ = await change_round(server, request.match_info["round_id"], starting_reveal, "reveal_started")
    log.info("round %d: reveal started", row["index"])
    return json_response(round_json(row))


async def post_reveal_next(server: Server, request: web.Request, p: Params) -> web.Response:
    """Reveal the next position; the answer says who holds it."""
    row, ranking = await change_round(server, request.match_info["round_id"], revealing_next, "position_revealed")
    position, entry = last_revealed(row["revealedCount"], ranking)
    log.info("round %d: position %d revealed: %s (%s), average %.2f from %d votes", row["index"], position,
             loggable(entry["nickname"]), loggable(entry["participant_id"]), entry["avg_score"], entry["votes"])
    return json_response({**round_json(row), "revealed": {
        "position": position, "participant_id": entry["participant_id"], "nickname": entry["nickname"],
        "score": entry["avg_score"], "votes": entry["votes"]}})


def voter_hash(server: Server, request: web.Request, voter_id: str | None) -> str:
    """Votes are keyed by a hash of the phone's voter id (or of its address, without one)."""
    return sha256_hex(voter_id or client_address(request, server.config))


async def post_votes(server: Server, request: web.Request, p: Params) -> web.Response:
    vote = await server.vote_writer.cast(server.db, {
        **p, "voter_hash": voter_hash(server, request, p["voter_id"]),
        "user_agent": p["user_agent"] or header(request, "User-Agent")[:MAX_TEXT]})
    return json_response(vote_json(vote))


async def get_votes_mine(server: Server, request: web.Request, p: Params) -> web.Response:
    votes = await server.db.run(voter_votes, p["round_id"], voter_hash(server, request, p["voter_id"]))
    return json_response(votes)


async def get_scoreboard(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.save_streamed()
    if p["round_id"]:
        row = await server.db.run(get_round, p["round_id"])
    else:
        row = await server.db.run(scoreboard_round, server.arena.require_session().id)
    return json_response({"scoreboard": await server.db.run(scoreboard, row["id"]), "round_id": row["id"],
                          "round_index": row["index"], "svgMode": bool(row["svgMode"]),
                          "votingStatus": voting_status(row), "revealedCount": row["revealedCount"]})


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
    ("rescued", "rescued"), ("engine_tps", "engineTps"),
)
EVENT_COLUMNS = ("id", "timestamp", "eventType", "actorType", "actorId", "targetType", "targetId", "metadata")


# A spreadsheet runs a cell starting with one of these as a formula (OWASP's CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(column: str, value: Any) -> Any:
    if column.endswith("At") or column == "timestamp":
        return iso(value) or ""
    if column in ("tpsAvg", "avgScore"):
        return f"{value or 0:.2f}"
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value              # shown as the text it is; numbers are never text here
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
    await server.save_streamed()
    session_id = await server.db.run(find_session, p["session_id"])
    rows = await server.db.run(session_answers, session_id)
    header, columns = zip(*ANSWER_COLUMNS)
    return attachment(csv_text(header, columns, rows, False), "text/csv", f"session-{session_id}.csv")


async def get_export_events_csv(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.save_streamed()                                # first_token_received is saved with its token
    session_id = await server.db.run(find_session, p["session_id"])
    rows = await server.db.run(session_events, session_id)
    return attachment(csv_text(EVENT_COLUMNS, EVENT_COLUMNS, rows, True), "text/csv", f"events-{session_id}.csv")


async def get_export_all_json(server: Server, request: web.Request, p: Params) -> web.Response:
    await server.save_streamed()                                # include the tokens of the last second
    session_id = await server.db.run(find_session, p["session_id"])
    tree = await server.db.run(session_tree, session_id)
    return attachment(dumps(iso_times(tree)), "application/json", f"session-{session_id}.json")


# =============================================================================
# Pages: the big screen, the phones' voting page, the host panel, the scoreboard
# =============================================================================
#
# Each page is one self-contained HTML response put together from ASSETS (at the
# end of the file): no other file, font or CDN, since the meetup's wifi is often
# offline, and never cached, since a stale page once drew blank SVGs. The pages
# talk to the server like any client: the WebSocket for what happens, the HTTP
# routes above for what the host and the phones do.

@dataclass(frozen=True)
class Page:
    name: str
    path: str                       # at the root; every page is also at /ui/<name>, which no route shares
    title: str
    scripts: tuple[str, ...]        # assets run after base.js, in order


PAGES = (
    Page("arena", "/", "Gambiarra arena", ("qr.js", "arena.js")),
    Page("voting", "/voting", "Vote: Gambiarra arena", ("voting.js",)),
    Page("admin", "/admin", "Host: Gambiarra arena", ("admin.js",)),
    Page("scoreboard", "/scoreboard", "Scoreboard: Gambiarra arena", ("scoreboard.js",)),
)
PAGE_PART = re.compile(r"\{\{(\w+)\}\}")


def page_paths(config: Config) -> dict[str, str]:
    """Where each page is, by name: its own path, or /ui/<name> when STATIC_DIR holds the root."""
    return {page.name: f"/ui/{page.name}" if config.static_dir else page.path for page in PAGES}


def wants_html(request: web.Request) -> bool:
    """Whether the caller is a browser opening a page: fetch(), curl and the club's scripts don't ask for HTML."""
    return "text/html" in header(request, "Accept")


def join_base(server: Server, request: web.Request) -> str:
    """The base URL phones and runners type: this machine's LAN address when the page was opened
    as localhost (the projector is often plugged into the host's laptop), else the one it was opened at."""
    name = request.url.host or ""
    with contextlib.suppress(ValueError):
        name = "localhost" if ipaddress.ip_address(name).is_loopback else name
    if name != "localhost":
        return f"http://{request.host}"
    lan = sorted(server.gate.own_addresses)
    return f"http://{lan[0]}:{request.url.port}" if lan else f"http://{request.host}"


def page_html(page: Page, boot: dict[str, Any], nonce: str) -> str:
    """`page` as one HTML document; `boot` is the JSON its scripts start from."""
    parts = {"title": page.title, "name": page.name, "nonce": nonce, "body": ASSETS[f"{page.name}.html"],
             "css": ASSETS["base.css"] + ASSETS[f"{page.name}.css"],
             "js": "\n".join(ASSETS[script] for script in ("base.js", *page.scripts)),
             "boot": dumps(boot).replace("<", "\\u003c")}          # no "</script>" can end it early
    return PAGE_PART.sub(lambda match: parts[match[1]], ASSETS["page.html"])


RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page_endpoint(page: Page) -> RequestHandler:
    async def handle(request: web.Request) -> web.Response:
        server = request.app[server_key]
        nonce = secrets.token_urlsafe(12)
        boot = {"page": page.name, "join": join_base(server, request), "paths": page_paths(server.config)}
        # Only our own scripts run, and the page can reach nothing but this server.
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src data:; "
                  "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return web.Response(text=page_html(page, boot, nonce), content_type="text/html",
                            headers={"Cache-Control": "no-store", "Content-Security-Policy": policy,
                                     "X-Content-Type-Options": "nosniff"})
    return handle


def html_or(page: RequestHandler, api: RequestHandler) -> RequestHandler:
    """One path for a page and a route: the page for a browser, the route's JSON for everyone else."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await (page if wants_html(request) else api)(request)
    return handle


async def get_static(request: web.Request) -> web.StreamResponse:
    """A file of STATIC_DIR; for a browser, its index.html at any other path (the app routes by itself)."""
    root = Path(request.app[server_key].config.static_dir)
    path = file_within(root, request.match_info.get("path", ""))
    if path is not None:
        return web.FileResponse(path)
    if wants_html(request):
        return web.FileResponse(root / "index.html", headers={"Cache-Control": "no-store"})
    raise NotFound(f"No route GET {request.path}")


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
    Route("GET", "/health", get_health, "Liveness, version, database state and how each background writer "
          "fares."),
    Route("POST", "/session", post_session, "Start a new session with a new PIN; ends the previous one "
          "and disconnects its runners.", True,
          (Field("pin_length", int, low=MIN_PIN_LENGTH, high=MAX_PIN_LENGTH, doc="digits in the PIN (default: PIN_LENGTH)"),)),
    Route("GET", "/session", get_session, "The active session with its participants and rounds "
          "(the PIN only for the host)."),
    Route("GET", "/presence", get_presence, "The runners connected right now."),
    Route("POST", "/rounds", post_rounds, "Create the session's next round.", True, (
        Field("prompt", str, True, low=1, high=MAX_PROMPT, doc="the challenge"),
        Field("max_tokens", int, default=400, low=1, high=1_000_000, doc="token budget per runner"),
        Field("temperature", float, default=0.8, low=0, high=2, doc="sampling temperature"),
        Field("deadline_ms", int, default=90_000, low=1000, high=86_400_000, doc="advisory time limit"),
        Field("seed", int, low=0, high=2**53, doc="sampling seed sent to every runner (default: one drawn "
                                                          "and stored with the round)"),
        Field("svg_mode", bool, default=False, doc="answers are SVG drawings"))),
    Route("POST", "/rounds/start", post_rounds_start, "Start a round: the challenge goes to every runner "
          "(a warning when none is connected).", True,
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
          "last place first; says who it was (revealed).", True),
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
    Route("POST", "/participants/release", post_participants_release, "Let another machine take a participant "
          "id (its runner lost its laptop or address); a connection holding it keeps it.", True,
          (Field("participant_id", str, True, high=MAX_TEXT, doc="who"),)),
)


def with_pages(api: list[tuple[str, str, RequestHandler]], config: Config) -> list[tuple[str, str, RequestHandler]]:
    """The routes served at the root: `api`, then the pages. A path that a page and a route share
    answers the page to browsers and JSON to everyone else.

    Each page is at /ui/<name>, and also at its own path, unless STATIC_DIR is served there:
    then every path at the root gives browsers the static app.
    """
    pages = {page.path: page_endpoint(page) for page in PAGES}
    fallback: list[tuple[str, str, RequestHandler]] = []
    if config.static_dir:
        pages = {route.path: get_static for route in ROUTES if route.method == "GET"}
        fallback = [("GET", "/{path:.*}", get_static)]         # last, since it matches every path
    root = [(method, path, html_or(pages.pop(path), handler) if method == "GET" and path in pages else handler)
            for method, path, handler in api]
    root += [("GET", path, handler) for path, handler in pages.items()]
    return root + [("GET", f"/ui/{page.name}", page_endpoint(page)) for page in PAGES] + fallback


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The request's body, which must arrive within BODY_TIMEOUT and whole."""
    try:
        return await within(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise TooSlow(f"The request body did not arrive within {timeout_s:g} s") from None
    except (ConnectionError, web.RequestPayloadError) as exc:
        raise ClientError(f"The request body was cut short or malformed ({type(exc).__name__})",
                          "BODY_INCOMPLETE") from None


def endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler for a route: host check, then body and query validation."""
    async def handle(request: web.Request) -> web.StreamResponse:
        server = request.app[server_key]
        if route.host:
            server.gate.require_host(request)
        params: Params = {}
        if route.body:
            body = await read_body(request, server.config.body_timeout_s)
            params.update(parse_fields(parse_json_object(body, "The request body"), route.body))
        if route.query:
            params.update(parse_fields(request.query, route.query, from_text=True))
        return await route.handler(server, request, params)
    return handle


FIELD_SCHEMAS = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
                 bool: {"type": "boolean"}, dict: {"type": "object"}}


def field_schema(f: Field) -> dict[str, Any]:
    schema = {**FIELD_SCHEMAS[f.kind], "description": f.doc}
    # JSON Schema has no size for an object as JSON: its doc says it.
    limits = {str: ("minLength", "maxLength"), int: ("minimum", "maximum"), float: ("minimum", "maximum")}
    schema.update({key: value for key, value in zip(limits.get(f.kind, ()), (f.low, f.high)) if value is not None})
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
    sent = "".join(f"<tr><td><code>{kind}</code></td><td>to a {to}: {html.escape(names)}</td></tr>"
                   for kind, (to, names) in SERVER_MESSAGES.items())
    style = ("body{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em}"
             "td{border-top:1px solid #ccc;padding:.4em;vertical-align:top}ul{margin:.2em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Gambiarra arena API</title>"
            f"<style>{style}</style></head><body><h1>Gambiarra arena server {__version__}</h1>"
            f"<p>Every route is also served under <code>/api</code>. Host routes answer the host's own machine, or "
            f"<code>Authorization: Bearer &lt;admin token&gt;</code>. Errors are <code>{{\"error\": ...}}</code>. "
            f"Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"
            f"<h2>HTTP</h2><table>{routes}</table>"
            f"<h2>WebSocket <code>/ws</code>: messages to the server</h2><table>{messages}</table>"
            f"<h2>WebSocket <code>/ws</code>: messages from the server</h2><table>{sent}</table></body></html>")


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi())


async def get_docs(request: web.Request) -> web.Response:
    return web.Response(text=docs_page(), content_type="text/html")


async def get_redoc(request: web.Request) -> web.Response:
    raise web.HTTPFound("/docs")


STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def static_file(folder: Path, name: str) -> web.Response:
    """A page of the club's browser client, never cached (a stale client once drew blank SVGs)."""
    path = file_within(folder, name)
    if path is None:
        raise NotFound(f"{name} is not installed on this server (see CLIENT_DIR)")
    return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix], charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def get_client_page(request: web.Request) -> web.Response:
    page = "client.html" if request.path == "/client" else "agent.html"
    return static_file(request.app[server_key].config.client_dir, page)


async def get_client_asset(request: web.Request) -> web.Response:
    return static_file(request.app[server_key].config.client_dir / "shared", request.match_info["name"])


# =============================================================================
# App: middlewares, lifecycle and the route table
# =============================================================================

MAX_BODY_BYTES = 1024 * 1024
UNTHROTTLED_PATHS = {"/ws", "/docs", "/redoc", "/openapi.json", "/health", "/client", "/agent"}


@web.middleware
async def cors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Answer preflights and label responses for the origins CORS_ORIGINS allows."""
    config = request.app[server_key].config
    origin = header(request, "Origin")
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
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = " or ".join(sorted(exc.allowed_methods - {"HEAD"}))     # HEAD comes with GET
            message = f"{request.path} takes {allowed}, not {request.method}"
            headers["Allow"] = exc.headers["Allow"]
        elif exc.status == 404:
            message = f"No route {request.method} {request.path}"
        elif exc.status == 413:
            message = f"The request body is over the limit of {MAX_BODY_BYTES} bytes"
        else:
            message = exc.reason
        response = json_response({"error": message, "code": exc.reason.upper().replace(" ", "_")}, exc.status)
        response.headers.update(headers)
        return response
    except sqlite3.Error as exc:
        log.error("database error on %s %s: %s", loggable(request.method), loggable(request.path), loggable(exc))
        return json_response({"error": f"The database refused the write ({exc}); check the disk and the "
                                       "database file. Live rounds keep streaming.", "code": "DATABASE_ERROR"}, 503)
    except Exception:
        log.exception("unexpected error on %s %s", loggable(request.method), loggable(request.path))
        return json_response({"error": "Internal error; the server log has the details", "code": "INTERNAL"}, 500)


@web.middleware
async def host_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Refuse every request (WebSocket upgrades too) whose Host does not name this server.

    A client without a Host header (HTTP/1.0, curl-like tools) is not a browser page, so it passes.
    """
    host = request.headers.get("Host")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if host is not None and not request.app[server_key].gate.is_named(host, sockname[0] if sockname else ""):
        raise Forbidden("This server does not answer to that name (the Host header): use its address or this "
                        "machine's name, or list the name in ALLOWED_HOSTS", "UNKNOWN_HOST")
    return await handler(request)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """A generous per-address HTTP limit; never for the host's addresses, WebSockets or docs."""
    server = request.app[server_key]
    address = client_address(request, server.config)
    path = request.path.removeprefix("/api")
    if path not in UNTHROTTLED_PATHS and not path.startswith("/client-assets/") and not server.gate.is_host(address):
        wait_s = server.gate.http_throttle.wait_s(address)
        if wait_s:
            access_log.warning("HTTP_429 %s %s", loggable(address), loggable(request.path))
            server.gate.refusal_log.warning(f"429 {address}", "throttled: %s is over %d HTTP requests in %g s and "
                                            "gets 429 until its window ends", loggable(address),
                                            server.config.rate_limit_max, server.config.rate_limit_window_s)
            raise TooMany(f"Too many requests from your address; try again in {math.ceil(wait_s)} s", wait_s)
        server.gate.http_throttle.add(address)
    return await handler(request)


@web.middleware
async def request_log_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """The JSON log's two lines per HTTP request, as pino-http writes them; a WebSocket is one request
    (its upgrade), completed when it closes, and its frames are not requests."""
    address = client_address(request, request.app[server_key].config)
    access_log.info("incoming request", extra={"req": {"method": request.method, "url": loggable(request.path_qs),
                                                       "remoteAddress": loggable(address)}})
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:                    # a redirect
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499                                    # the client went away first (nginx's code)
        raise
    finally:
        access_log.info("request completed", extra={"res": {"statusCode": status},
                                                    "responseTime": round((time.perf_counter() - started) * 1000, 3)})



async def repeat(interval_s: float, action: Callable[[], Awaitable[None]], writer: str, writers: Writers) -> None:
    """Run `action` every `interval_s` until cancelled; a failure is logged and shown on /health, and the
    loop goes on (one bad turn must not end the saving or the heartbeat for the rest of the evening)."""
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception as exc:
            writers.failed(writer, failure_text(exc))
            failing = True
        else:
            if failing:             # clear only what this loop reported: `action` may report on its own
                writers.ok(writer)
            failing = False


async def running_server(app: web.Application) -> Any:
    """Open the database and resume, run the background loops, and save everything at exit."""
    server = app[server_key]
    server.db = Database(server.config.database, server.writers)
    server.gate.own_names |= await asyncio.to_thread(machine_names)     # name lookups may wait on DNS
    server.gate.own_addresses.update(await asyncio.to_thread(lan_addresses))
    await server.load()
    loops = [asyncio.create_task(repeat(server.config.save_interval_s, server.save_turn, "tokens", server.writers)),
             asyncio.create_task(repeat(server.config.ws_heartbeat_interval_s, server.keep_alive, "heartbeat",
                                        server.writers)),
             asyncio.create_task(repeat(DB_FILE_CHECK_S, server.db.keep_file, "database file", server.writers))]
    yield
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    await server.save_turn()
    server.db.close()


async def json_log(app: web.Application) -> Any:
    """Write the log to LOG_JSON too, from the app's start to its very end."""
    path = Path(app[server_key].config.log_json).expanduser()
    try:
        target = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"LOG_JSON {path.resolve()}: cannot write there ({exc.strerror})") from None
    target.setFormatter(PinoFormatter())
    handler = BackgroundHandler(target)
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)                      # the file has the info lines whatever the terminal shows
    for logger in (log, access_log):
        logger.addHandler(handler)
    yield
    for logger in (log, access_log):
        logger.removeHandler(handler)
    log.setLevel(level)
    handler.close()


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
    logged = [request_log_middleware] if config.log_json else []
    app = web.Application(middlewares=[*logged, cors_middleware, error_middleware, host_middleware,
                                       rate_limit_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[server_key] = Server(config)
    app[answers_cache_key] = {}
    if config.log_json:
        app.cleanup_ctx.append(json_log)
    app.cleanup_ctx.append(running_server)
    app.on_shutdown.append(close_connections)
    table = [web.get("/ws", ws_endpoint), web.get("/client", get_client_page), web.get("/agent", get_client_page),
             web.get(r"/client-assets/{name:[\w.-]+\.(?:js|css)}", get_client_asset)]
    api = [("GET", "/openapi.json", get_openapi), ("GET", "/docs", get_docs), ("GET", "/redoc", get_redoc)]
    api += [(route.method, route.path, endpoint(route)) for route in ROUTES]
    table += [web.route(method, "/api" + path, handler) for method, path, handler in api]
    table += [web.route(method, path, handler) for method, path, handler in with_pages(api, config)]
    app.add_routes(table)
    return app


def refuse(transport: asyncio.Transport, why: str) -> None:
    """Answer a connection that may not stay without reading it, and close it."""
    body = dumps({"error": why, "code": "TOO_MANY_CONNECTIONS"}).encode()
    transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    transport.close()


class Connection(web.RequestHandler):
    """aiohttp's HTTP connection (a WebSocket's too), counted against its address from accept to close.

    aiohttp's keep-alive timer starts when a connection opens and again after each
    response, and when it fires it closes a connection still waiting for a request's
    headers, however slowly they trickle in: with HEADER_TIMEOUT it is the header
    timeout aiohttp has no option for. Bodies have BODY_TIMEOUT (read_body).
    """

    def __init__(self, manager: web.Server, server: Server) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), access_log=None,
                         keepalive_timeout=server.config.header_timeout_s)
        self.server = server
        self.address: str | None = None                 # set once admitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else ""
        server = self.server
        refusal = None if server.gate.is_host(address) else server.gate.admission.refusal(address)
        if refusal:
            server.rare_log.warning("refused", "CONNECTION_REFUSED %s: %s", address, refusal)
            refuse(cast(asyncio.Transport, transport), refusal)
            return
        server.gate.admission.add(address)
        self.address = address
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.address is None:
            return                                      # refused: aiohttp never knew of it
        self.server.gate.admission.remove(self.address)
        super().connection_lost(exc)

    def log_exception(self, message: str, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        """Garbage on the port or a client gone mid-request: a short line now and then, not a traceback."""
        what = f"{type(exc_info).__name__}: {exc_info}" if isinstance(exc_info, BaseException) else message % args
        self.server.rare_log.warning("broken", "HTTP_BROKEN %s: %r", self.address, what.strip()[:120])


class Site(web.BaseSite):
    """A TCP listener whose connections are `Connection`s (aiohttp's TCPSite makes plain ones)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, server: Server) -> None:
        super().__init__(runner)
        self.host, self.port, self.server = host, port, server

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        manager = self._runner.server
        self._server = await asyncio.get_running_loop().create_server(lambda: Connection(manager, self.server),
                                                                      self.host, self.port)


def quiet_socket_errors(rare_log: RareLog) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """A loop exception handler: asyncio's reports of broken sockets, out of descriptors included,
    become a short line now and then; anything else is reported as asyncio would."""
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError):
            rare_log.warning("socket", "SOCKET_ERROR %s: %s", context.get("message"), exc)
        else:
            loop.default_exception_handler(context)
    return handle


async def start(app: web.Application, addresses: Iterable[str], port: int,
                open_files: int | None) -> tuple[web.AppRunner, list[str], dict[str, str]]:
    """Run `app` on `port` of each of `addresses` it can listen on; the runner, those addresses, and why
    each of the others refused.

    serve() and the tests start the app here, so both get the same connections. Of
    `open_files` (None: no limit), DESCRIPTOR_RESERVE stay for the database, the
    listeners and the host's connections.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    server = app[server_key]
    if open_files is not None:
        server.gate.admission.most = open_files - DESCRIPTOR_RESERVE
    asyncio.get_running_loop().set_exception_handler(quiet_socket_errors(server.rare_log))
    listening, refused = [], {}
    for address in addresses:
        try:
            await Site(runner, address, port, server).start()
            listening.append(address)
        except OSError as exc:      # asyncio words a busy port at length; the system's words say it
            refused[address] = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
    return runner, listening, refused


# =============================================================================
# Runner: join, the participant's side
# =============================================================================
#
# `join` answers the arena's challenges with a local model: ollama, any
# OpenAI-compatible server (LM Studio, llama.cpp, vLLM, LocalAI), or a mock for
# rehearsals. Generating and delivering are kept apart: the engine writes each
# token into the answer's buffer, and one sender per connection sends from that
# buffer in seq order, the `complete` only after the last token. A dropped
# connection therefore only delays tokens: the model goes on writing, and after
# the reconnect `registered.resume` says what the arena lacks, which goes first.
# The connection kept across drops is a Seat, which simulate's bots sit in too.
# Like simulate and bench, it imports `websockets` only when it runs.

JOIN_REFUSALS = {   # the arena's refusals that no reconnect can mend, said as what to do about them
    "INVALID_PIN": "wrong PIN: check the digits on the big screen and run join again with --pin",
    "KICKED": "the host removed you from this session",
    "SESSION_ENDED": "the host started a new session: ask for the new PIN and run join again with it",
    "NO_SESSION": "the arena has no session open: ask the host to start one, then run join again",
    "ID_IN_USE": "this participant id is connected from another machine: run join again with another "
                 "--participant-id",
}
# The arena's refusals of a token or `complete` that mean it takes no more of that answer: the round was
# stopped (or has left), or the answer or the round is as long as the arena keeps.
ANSWER_OVER = {"ROUND_CLOSED", "UNKNOWN_ROUND", "ROUND_FULL", "TOO_MANY_TOKENS", "ANSWER_TOO_LONG"}
# What join reads of a challenge, each with its type (the seed: a whole number or none).
CHALLENGE_FIELDS = {"round": int, "prompt": str, "max_tokens": int, "temperature": (int, float),
                    "deadline_ms": (int, float), "seed": (int, type(None))}
ENGINE_PROBES = (   # where local engines listen by default, tried in this order
    ("ollama", 11434, "ollama"), ("openai", 1234, "LM Studio"), ("openai", 8080, "llama.cpp or LocalAI"),
    ("openai", 8000, "vLLM"), ("openai", 1337, "Jan"), ("openai", 5001, "KoboldCpp"),
)
ENGINE_URL_SUFFIXES = ("/api/chat", "/api/generate", "/api/tags", "/api", "/v1/chat/completions",
                       "/v1/completions", "/v1/models", "/v1")
OLLAMA_COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                   "eval_duration")
MOCK_WORDS = ("Era ", "uma ", "vez ", "uma ", "lhama ", "que ", "rodava ", "modelos ", "num ", "laptop ", "velho",
              ", ", "e ", "cada ", "token ", "chegava ", "inteiro", ". ", "🦙 ", "\n")
PROBE_TIMEOUT_S = 2.0
RECONNECT_BASE_S = 0.2      # reconnect waits double from here up to the cap, each drawn from [half, whole]:
RECONNECT_CAP_S = 2.0       # a room of runners comes back spread out, and soon after the arena does
DELIVERY_WAIT_S = 30.0      # how long a `complete` waits for the pong that proves the arena read it
WAIT_STEP_S = 0.05          # how often wait_until (and a simulation waiting for a round) looks again


def socket_gone() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a `websockets` connection failed or ended."""
    from websockets.exceptions import InvalidHandshake, WebSocketException
    return (OSError, asyncio.TimeoutError, InvalidHandshake, WebSocketException)


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; say whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(WAIT_STEP_S)
    return True


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class NoServer(RuntimeError):
    """Nothing answers at the server's address: say where, and how to start one there."""

    def __init__(self, url: str) -> None:
        port = urllib.parse.urlsplit(url).port
        flag = f" --port {port}" if port and port != Config.port else ""
        super().__init__(f"no server at {url.rstrip('/')} (start it with: python3 {Path(__file__).name}{flag})")


@contextlib.contextmanager
def reaching(url: str) -> Any:
    """Turn a connection refused, an unknown host or a connect timeout into NoServer."""
    try:
        yield
    except (ClientConnectorError, ConnectionTimeoutError):
        raise NoServer(url) from None


class HostClient:
    """The host's HTTP calls, made as curl makes them: what join-drill, simulate and bench ask of the arena."""

    def __init__(self, http: ClientSession, url: str, admin_token: str = "") -> None:
        self.http, self.url = http, url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One call; a refusal raises RuntimeError with the server's words, no server NoServer."""
        with reaching(self.url):
            async with self.http.request(method, self.url + path, json=body, headers=self.headers) as response:
                data = await response.json(content_type=None)
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {data.get('error', data)}")
            return data


def runner_connection(url: str) -> Any:
    """A runner's WebSocket to the arena, as join and simulate's bots open it (`async with`): the arena
    compresses nothing, and a runner reads every message it is sent."""
    from websockets.asyncio.client import connect
    return connect(url, open_timeout=10, compression=None, max_queue=None)


def register_message(participant_id: str, pin: str, *, nickname: str | None = None, runner: str | None = None,
                     model: str | None = None, resume_secret: str | None = None) -> str:
    """A runner's `register`, as sent by join, simulate's bots and bench; a field left None is not sent."""
    optional = {"nickname": nickname, "runner": runner, "model": model, "resume_secret": resume_secret}
    return json_text({"type": "register", "participant_id": participant_id, "pin": pin,
                      **{key: value for key, value in optional.items() if value is not None}})


def token_message(round_index: int, participant_id: str, seq: int, content: str) -> str:
    return json_text({"type": "token", "round": round_index, "participant_id": participant_id, "seq": seq,
                      "content": content})


class Seat:
    """A runner's place in the arena, kept across drops: join's runner and each of simulate's bots is one.

    It connects, registers (after a drop, with the resume secret the arena gave), hands each message
    to `on_registered`, `on_challenge` or `on_error`, and after a drop connects again with a jittered
    backoff, until the arena refuses it for good or `staying` says no. Subclasses answer the challenges.
    """

    final: Mapping[str, str] = {}       # error codes no reconnect mends, each with what it means ("": as said)
    give_up_after: int | None = None    # failed connections in a row that mean no arena (None: never give up)

    def __init__(self, url: str, participant_id: str, pin: str, *, nickname: str, runner: str, model: str,
                 rng: random.Random) -> None:
        self.url = url
        self.participant_id = participant_id
        self.pin = pin
        self.nickname, self.runner, self.model = nickname, runner, model
        self.rng = rng                          # for the reconnect jitter
        self.ws: Any = None                     # the current connection
        self.ready = asyncio.Event()            # registered on the current connection
        self.dialed_at = 0.0                    # monotonic: when the current connection was opened
        self.registrations = 0
        self.resume_secret: str | None = None
        self.retry = False                      # the current connection is to be dropped and redone
        self.refused: str | None = None         # the code that ended the stay (UNREACHABLE: no arena)...
        self.refusal = ""                       # ...and what it means, in the participant's terms

    @property
    def reconnects(self) -> int:
        return max(0, self.registrations - 1)

    def staying(self) -> bool:
        return self.refused is None

    def refuse(self, code: str, why: str) -> None:
        """Leave for good: no reconnect mends this."""
        self.refused, self.refusal = code, why

    async def run(self) -> None:
        """Stay in the arena until refused or told to leave, connecting again after every drop."""
        failures = 0
        while self.staying():
            self.retry, registrations, self.dialed_at = False, self.registrations, time.monotonic()
            self.connecting()
            try:
                async with runner_connection(self.url) as ws:
                    self.ws = ws
                    await self.converse(ws)
                why = self.closed(ws)
            except socket_gone() as exc:
                why = self.unreachable(exc)
            self.ready.clear()
            failures = 0 if self.registrations > registrations else failures + 1
            if self.give_up_after is not None and failures >= self.give_up_after and self.refused is None:
                self.refuse("UNREACHABLE", f"no arena answers at {self.url}")
            if not self.staying():
                break
            delay = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** failures)
            delay = self.rng.uniform(delay / 2, delay)
            self.dropped(why, delay)
            await asyncio.sleep(delay)

    async def converse(self, ws: Any) -> None:
        """One connection: register, then read the arena's messages until it ends."""
        await ws.send(register_message(self.participant_id, self.pin, nickname=self.nickname, runner=self.runner,
                                       model=self.model, resume_secret=self.resume_secret))
        async for text in ws:
            with contextlib.suppress(ValueError, LookupError, AttributeError, TypeError):   # not the arena's shape
                self.on_message(json.loads(text))
            if self.refused is not None or self.retry:
                await ws.close()

    def closed(self, ws: Any) -> str:
        """What a connection's end means; a normal close we did not ask for is the arena's decision: a newer
        connection took this seat."""
        if ws.close_code == WSCloseCode.OK and self.refused is None and not self.retry:
            self.refuse("SEAT_TAKEN", f"the arena closed this seat: {ws.close_reason or 'no reason given'}")
        said = " ".join(str(part) for part in (ws.close_code, ws.close_reason) if part)
        return f"the arena closed the connection ({said})"

    def unreachable(self, exc: BaseException) -> str:
        """What a failed connection means; a web server refusing the upgrade outright is not the arena."""
        status = getattr(getattr(exc, "response", None), "status_code", 0)
        if 400 <= status < 500 and status not in (408, 429):      # not a timeout, not a throttle: final
            self.refuse("NOT_AN_ARENA", f"{self.url} answered HTTP {status}, not as the arena: check the address "
                                        "the host shows")
        return f"no connection ({exc or type(exc).__name__})"

    def on_message(self, m: dict[str, Any]) -> None:
        kind = m.get("type")
        if kind == "registered":
            self.on_registered(m)
        elif kind == "challenge":
            self.on_challenge(m)
        elif kind == "error":
            self.on_error(m)

    def on_registered(self, m: dict[str, Any]) -> None:
        """Registered (again): keep the resume secret for the next connection."""
        self.resume_secret = m.get("resume_secret") or self.resume_secret
        self.registrations += 1
        self.ready.set()

    def on_challenge(self, m: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_error(self, m: dict[str, Any]) -> None:
        """A refusal for good ends the stay; an error answering the register (busy, throttled) means retry."""
        code = m.get("code", "")
        if code in self.final:
            self.refuse(code, self.final[code] or str(m.get("message")))
        elif not self.ready.is_set():
            self.retry = True

    def connecting(self) -> None:
        """About to connect (again)."""

    def dropped(self, why: str, delay_s: float) -> None:
        """The connection ended; the next one is tried in `delay_s`."""


@dataclass
class JoinOptions:
    """What `join` is told; each field has an env var and a matching --flag."""

    url: str = option("ws://127.0.0.1:3000/ws", "GAMBIARRA_URL",
                      "the arena, as the host shows it: ws://HOST:3000/ws (HOST:PORT or http://... work too)")
    pin: str = option("", "GAMBIARRA_PIN", "the session PIN shown on the big screen")
    nickname: str = option("", "GAMBIARRA_NICKNAME", "your name on the big screen (default: your login name)")
    model: str = option("", "GAMBIARRA_MODEL", "the model to run (default: the engine's first)")
    engine: str = option("", "GAMBIARRA_ENGINE", "ollama, openai or mock (default: look on the usual local ports)")
    engine_url: str = option("", "GAMBIARRA_ENGINE_URL", "the engine's address, e.g. http://127.0.0.1:11434 or "
                                                         "http://127.0.0.1:1234/v1 (default: its usual port)")
    participant_id: str = option("", "GAMBIARRA_PARTICIPANT_ID",
                                 "your seat in the arena (default: one kept in your config folder)")
    mock_rate: float = option(20.0, "GAMBIARRA_MOCK_RATE", "tokens per second of --engine mock", low=0.1, high=10_000)
    quiet: bool = option(False, "GAMBIARRA_QUIET", "do not print the answer as it streams")


class EngineError(Exception):
    """The local model cannot answer; the message says why, in the participant's terms."""


class EngineRefused(EngineError):
    """The engine answered a generation request with an HTTP error (before any token)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def arena_url(text: str) -> str:
    """The arena's WebSocket address from what a participant typed.

    A bare HOST or HOST:PORT gets ws:// (and port 3000), http(s) becomes ws(s), and a
    path ending in /api or lacking /ws ends in /ws.
    """
    text = text.strip()
    bare = "://" not in text
    parts = urllib.parse.urlsplit("ws://" + text if bare else text)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"'{text}' is not an arena address; expected ws://HOST:3000/ws")
    netloc = parts.netloc + (":3000" if bare and parts.port is None else "")
    path = parts.path.rstrip("/").removesuffix("/ws").removesuffix("/api") + "/ws"
    return urllib.parse.urlunsplit((scheme, netloc, path, parts.query, ""))


def engine_base_url(text: str) -> str:
    """An engine's base address from what a participant typed: http:// added, API paths taken off."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    for suffix in ENGINE_URL_SUFFIXES:
        if text.endswith(suffix):
            text = text[:-len(suffix)]
            break
    return text.rstrip("/")


def config_folder() -> Path:
    """This user's folder for gambiarra's settings, where each platform keeps such things."""
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "gambiarra"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "gambiarra"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "gambiarra"


def stable_participant_id(nickname: str) -> str:
    """This machine's participant id for `nickname`, made once and kept, so a restart takes the same seat."""
    path = config_folder() / "participant-ids.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(nickname), str):
        return known[nickname]
    ascii_name = unicodedata.normalize("NFKD", nickname).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")[:24] or "runner"
    known[nickname] = f"{slug}-{secrets.token_hex(3)}"
    with contextlib.suppress(OSError):          # a read-only home still runs, with a seat for this run only
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, ensure_ascii=False))
    return known[nickname]


def cpu_name() -> str:
    """The processor's marketing name where it is cheap to read, else its architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=2).stdout.strip() or platform.machine()
    return platform.processor() or platform.machine()


def gpu_name(cpu: str) -> str | None:
    """The GPU's name where one command says it (nvidia-smi; an Apple chip's own GPU), else None."""
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=3).stdout.strip().splitlines()
            if found:
                return ", ".join(found)
    if sys.platform == "darwin" and cpu.startswith("Apple"):
        return f"{cpu} GPU"
    return None


def machine_info() -> dict[str, str]:
    """The machine behind an answer, for model_info: OS, CPU, GPU when known, and the device that ran it."""
    cpu = cpu_name()
    gpu = gpu_name(cpu)
    info = {"os": f"{platform.system()} {platform.release()}".strip(), "cpu": cpu, "device": gpu or cpu}
    if gpu:
        info["gpu"] = gpu
    return info


def error_text(body: str) -> str:
    """The sentence inside an engine's error reply ({"error": "..."}, {"error": {"message": ...}}), or the body."""
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        if isinstance(data, dict):
            inner = data.get("error", data.get("message", data.get("detail")))
            inner = inner.get("message", inner) if isinstance(inner, dict) else inner
            if inner:
                return str(inner)
    return body.strip()[:300] or "no details"


def engine_json(text: str | bytes, engine: str) -> dict[str, Any]:
    """One JSON object of an engine's stream; anything else is the engine's failure, said as such."""
    with contextlib.suppress(ValueError):
        chunk = json.loads(text)
        if isinstance(chunk, dict):
            return chunk
    raise EngineError(f"{engine} sent a line that is not a JSON object")


def dig(data: Any, *keys: str) -> Any:
    """data[key][key]...; None where a level is missing or not an object (an engine's JSON is not ours)."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def piece_text(value: Any) -> str:
    """A streamed piece's text; a piece of another type carries none."""
    return value if isinstance(value, str) else ""


async def response_lines(response: Any) -> AsyncIterator[bytes]:
    """The lines of a streamed HTTP body, however long (a final JSON line can be large)."""
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending


class Engine:
    """A local model behind HTTP. Subclasses speak one API; `stream` yields the answer's pieces."""

    kind = ""
    listing = ("", "")      # the path that lists the models, and the key of the list in its JSON

    def __init__(self, http: ClientSession, url: str, model: str) -> None:
        self.http = http
        self.url = url
        self.model = model
        self.runner = self.kind         # what the arena shows: ollama, lmstudio, llamacpp, ...

    async def listed(self) -> list[dict[str, Any]]:
        """The engine's model listing; EngineError says when nothing (or something else) answers."""
        path, key = self.listing
        try:
            async with self.http.get(self.url + path, timeout=ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
                data = await response.json(content_type=None) if response.status == 200 else None
        except (HTTPClientError, asyncio.TimeoutError, ValueError) as exc:
            raise EngineError(f"nothing answers at {self.url} ({exc or type(exc).__name__}): is the engine "
                              "running?") from None
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise EngineError(f"{self.url} answers, but not as {self.kind} does ({path})")
        return [item for item in data[key] if isinstance(item, dict)]

    async def post_lines(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """POST a generation request and yield its streamed lines; failures become EngineError."""
        try:
            async with self.http.post(self.url + path, json=body) as response:
                if response.status >= 400:
                    raise EngineRefused(f"the engine refused the request (HTTP {response.status}): "
                                        f"{error_text(await response.text())}", response.status)
                async for line in response_lines(response):
                    yield line
        except (HTTPClientError, asyncio.TimeoutError) as exc:
            raise EngineError(f"the engine at {self.url} stopped answering ({exc or type(exc).__name__})") from None

    async def prepare(self) -> None:
        """Check that the engine answers and has the model (choosing one if none was given)."""
        raise NotImplementedError

    def stream(self, challenge: dict[str, Any], counters: dict[str, Any]) -> AsyncIterator[str]:
        """The answer's text pieces; the engine's own counters go into `counters` at the end."""
        raise NotImplementedError


class Ollama(Engine):
    """ollama's streaming /api/chat (JSON lines); the model must be pulled."""

    kind = "ollama"
    listing = ("/api/tags", "models")

    async def prepare(self) -> None:
        names = [m.get("name") or m.get("model", "") for m in await self.listed()]
        if not names:
            raise EngineError("ollama has no models yet: pull one, e.g. `ollama pull llama3.2:1b`")
        if not self.model:
            self.model = names[0]
        elif self.model not in names and f"{self.model}:latest" not in names:
            raise EngineError(f"model '{self.model}' is not pulled in ollama: run `ollama pull {self.model}` "
                              f"(pulled: {', '.join(names)})")

    async def stream(self, challenge: dict[str, Any], counters: dict[str, Any]) -> AsyncIterator[str]:
        options = {"num_predict": challenge["max_tokens"], "temperature": challenge["temperature"]}
        if challenge.get("seed") is not None:
            options["seed"] = challenge["seed"]
        body = {"model": self.model, "messages": [{"role": "user", "content": challenge["prompt"]}],
                "stream": True, "options": options}
        try:
            async for line in self.post_lines("/api/chat", body):
                if not line.strip():
                    continue
                chunk = engine_json(line, "ollama")
                if chunk.get("error"):
                    raise EngineError(f"ollama: {chunk['error']}")
                yield piece_text(dig(chunk, "message", "content"))
                if chunk.get("done"):
                    counters.update({key: chunk[key] for key in OLLAMA_COUNTERS if key in chunk})
                    return
        except EngineRefused as exc:
            if exc.status == 404:
                raise EngineError(f"model '{self.model}' is not pulled in ollama: run `ollama pull {self.model}`") \
                    from None
            raise
        raise EngineError("ollama stopped mid-answer (the stream ended before done)")


class OpenAICompatible(Engine):
    """Any OpenAI-compatible /v1/chat/completions SSE stream: LM Studio, llama.cpp, vLLM, LocalAI."""

    kind = "openai"
    listing = ("/v1/models", "data")

    def __init__(self, http: ClientSession, url: str, model: str) -> None:
        super().__init__(http, url, model)
        self.include_usage = True       # until the server refuses stream_options

    async def prepare(self) -> None:
        models = await self.listed()
        owners = {m.get("owned_by") for m in models}
        port = urllib.parse.urlsplit(self.url).port
        self.runner = ("llamacpp" if "llamacpp" in owners else "vllm" if "vllm" in owners
                       else "lmstudio" if port == 1234 else "openai")
        ids = [str(m.get("id")) for m in models]
        if not self.model:
            if not ids:
                raise EngineError(f"{self.url} lists no models: load one in the engine, or pass --model")
            self.model = ids[0]
        elif ids and self.model not in ids:
            log.warning("model '%s' is not in the engine's list (%s); asking for it anyway", self.model,
                        ", ".join(ids))

    async def stream(self, challenge: dict[str, Any], counters: dict[str, Any]) -> AsyncIterator[str]:
        body = {"model": self.model, "messages": [{"role": "user", "content": challenge["prompt"]}],
                "stream": True, "max_tokens": challenge["max_tokens"], "temperature": challenge["temperature"]}
        if challenge.get("seed") is not None:
            body["seed"] = challenge["seed"]
        try:
            async for piece in self.events({**body, "stream_options": {"include_usage": True}} if self.include_usage
                                           else body, counters):
                yield piece
        except EngineRefused as exc:
            if not self.include_usage or exc.status not in (400, 422):
                raise
            self.include_usage = False  # an older server that knows no stream_options: ask again without
            async for piece in self.events(body, counters):
                yield piece

    async def events(self, body: dict[str, Any], counters: dict[str, Any]) -> AsyncIterator[str]:
        """The pieces of one SSE stream; `usage` and llama.cpp's `timings` go into `counters`."""
        finished = False
        async for line in self.post_lines("/v1/chat/completions", body):
            data = line.decode(errors="replace").strip()
            if not data.startswith("data:"):
                continue                # blank lines, comments and event names
            data = data[5:].strip()
            if data == "[DONE]":
                return
            chunk = engine_json(data, "the engine")
            if chunk.get("error"):
                raise EngineError(f"the engine failed: {error_text(data)}")
            counters.update({key: chunk[key] for key in ("usage", "timings") if isinstance(chunk.get(key), dict)})
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else []:
                finished = finished or bool(dig(choice, "finish_reason"))
                yield piece_text(dig(choice, "delta", "content"))
        if not finished:
            raise EngineError("the engine stopped mid-answer (the stream ended before its last event)")


class Mock(Engine):
    """Words at --mock-rate tokens per second, for rehearsing without a model (the same seed, the same text)."""

    kind = "mock"

    def __init__(self, http: ClientSession | None, url: str, model: str, rate: float = 20.0) -> None:
        super().__init__(http, url, model or "mock")
        self.rate = rate

    async def prepare(self) -> None:
        return

    async def stream(self, challenge: dict[str, Any], counters: dict[str, Any]) -> AsyncIterator[str]:
        seed = challenge.get("seed")
        rng = random.Random(seed) if seed is not None else random.Random()
        budget, start = challenge["max_tokens"], rng.randrange(len(MOCK_WORDS))
        due = time.monotonic()
        for seq in range(rng.randint(max(1, budget // 2), budget)):
            due += rng.uniform(0.5, 1.5) / self.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield MOCK_WORDS[(start + seq) % len(MOCK_WORDS)]


ENGINES: dict[str, type[Engine]] = {"ollama": Ollama, "openai": OpenAICompatible, "mock": Mock}


async def find_engine(http: ClientSession, options: JoinOptions, say: Callable[[str], None]) -> Engine:
    """The engine to use: the one named, else the first that answers on the usual ports; ready to generate."""
    if options.engine and options.engine not in ENGINES:
        raise EngineError(f"unknown --engine '{options.engine}': use one of {', '.join(ENGINES)}")
    if options.engine == "mock":
        return Mock(http, "", options.model, options.mock_rate)
    if options.engine_url:
        url = engine_base_url(options.engine_url)
        kinds = [options.engine] if options.engine else ["ollama", "openai"]
        if "/v1" in options.engine_url:
            kinds.reverse()         # a typed /v1 means the OpenAI-compatible API (ollama serves one too)
        candidates = [(kind, url, kind) for kind in kinds]
    else:
        candidates = [(kind, f"http://127.0.0.1:{port}", label) for kind, port, label in ENGINE_PROBES
                      if options.engine in ("", kind)]
    engines = [ENGINES[kind](http, url, options.model) for kind, url, _ in candidates]
    answers = await asyncio.gather(*(engine.listed() for engine in engines), return_exceptions=True)
    found = [(engine, label) for engine, (_, _, label), answer in zip(engines, candidates, answers)
             if not isinstance(answer, BaseException)]
    if not found:
        if options.engine_url:
            raise answers[-1]
        tried = ", ".join(f"{label} at {url}" for _, url, label in candidates)
        raise EngineError(f"no engine answers ({tried}): start one (e.g. `ollama serve`) or pass --engine-url; "
                          "to rehearse without a model: --engine mock")
    engine, label = found[0]
    others = "".join(f"; also found {label} at {e.url}" for e, label in found[1:] if e.url != engine.url)
    say(f"engine: {label} at {engine.url}{others}")
    await engine.prepare()
    return engine


class Terminal:
    """What the participant reads: one timed line per event, and the answer as it streams."""

    def __init__(self, echo: bool = True, enabled: bool = True) -> None:
        self.echo = echo and enabled
        self.enabled = enabled
        self.mid_line = False
        self.half = ""          # the first half of a UTF-16 pair (an emoji split in two), until its second

    def say(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.mid_line else "") + time.strftime("[%H:%M:%S] ") + clean_text(text), flush=True)
            self.mid_line = False

    def stream(self, piece: str) -> None:
        if self.echo:
            text, self.half = self.half + piece, ""
            if text and "\ud800" <= text[-1] <= "\udbff":
                text, self.half = text[:-1], text[-1]
            sys.stdout.write(clean_text(text))
            sys.stdout.flush()
            self.mid_line = not text.endswith("\n")


@dataclass
class Answer:
    """One round's answer: every token the engine wrote, and how far the current connection has sent it."""

    challenge: dict[str, Any]
    began: float                                    # monotonic, when the challenge arrived
    tokens: list[str] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)   # the engine's own figures
    first_at: float | None = None
    next_seq: int = 0                               # the first token not yet sent on this connection
    resend: list[int] = field(default_factory=list)  # seqs the arena reported missing, sent first
    ending: dict[str, Any] | None = None            # the `complete` or `error`, once generation ended
    delivered: bool = False                         # the arena has read `ending` (a pong came after it)
    over: bool = False                              # the arena takes no more of it (ANSWER_OVER)
    cut: str = ""                                   # why generation stopped early, if it did
    stop: asyncio.Event = field(default_factory=asyncio.Event)   # set to drop the answer unfinished

    @property
    def round(self) -> int:
        return self.challenge["round"]

    @property
    def owed(self) -> bool:
        """Something of it is still to reach the arena."""
        return not self.delivered and not self.over

    def resume_from(self, resume: dict[str, Any] | None) -> int:
        """Take the arena's view after a reconnect; return how many tokens are to be sent again."""
        if self.over:
            return 0
        if resume is not None and resume["round"] == self.round:
            self.resend = [seq for seq in resume["missing"] if seq < len(self.tokens)]
            self.next_seq = min(resume["next_seq"], len(self.tokens))
        elif not self.delivered:
            # No word on this round (it ended): offer every token; the arena ignores the seqs it holds.
            self.resend, self.next_seq = [], 0
        owed = len(self.resend) + len(self.tokens) - self.next_seq
        if owed:
            self.delivered = False
        return owed


class Join(Seat):
    """The participant's runner: one seat in the arena, kept across drops, answering with one engine."""

    final = JOIN_REFUSALS

    def __init__(self, options: JoinOptions, engine: Engine, machine: dict[str, str], out: Terminal,
                 participant_id: str) -> None:
        super().__init__(arena_url(options.url), participant_id, options.pin,
                         nickname=options.nickname or participant_id, runner=engine.runner, model=engine.model,
                         rng=random.Random())
        self.engine = engine
        self.machine = machine
        self.out = out
        self.answer: Answer | None = None
        self.generating: asyncio.Task | None = None
        self.queued: dict[str, Any] | None = None       # a challenge waiting for the running one to stop
        self.wake = asyncio.Event()                     # something new to send
        self.back_at: float | None = None               # monotonic: the latest re-registration
        self.streaming_at: float | None = None          # monotonic: the first token sent after it

    async def run(self) -> str:
        """Stay in the arena until refused; return why it ended."""
        await super().run()
        self.stop_generating("stopped")
        return self.refusal

    def refuse(self, code: str, why: str) -> None:
        if code == "INVALID_PIN" and self.registrations:
            why = "the PIN no longer works: the host probably started a new session; ask for the new PIN"
        super().refuse(code, why)
        self.stop_generating("refused")

    def connecting(self) -> None:
        self.out.say(f"connecting to {self.url} ...")

    def dropped(self, why: str, delay_s: float) -> None:
        kept = f"; {len(self.answer.tokens)} tokens of round {self.answer.round} kept here" \
            if self.answer is not None and self.answer.owed else ""
        self.out.say(f"{why}{kept}; reconnecting in {delay_s:.1f} s")

    async def converse(self, ws: Any) -> None:
        """One connection, with a sender delivering the answer beside the reading."""
        sender = asyncio.ensure_future(self.deliver_loop(ws))
        try:
            await super().converse(ws)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, *socket_gone()):
                await sender

    def on_error(self, m: dict[str, Any]) -> None:
        super().on_error(m)
        if self.refused is not None:
            return
        if m.get("code") in ANSWER_OVER and self.answer is not None:
            self.answer_over(self.answer, str(m.get("message")))
        else:
            self.out.say(f"arena: {m.get('message')} ({m.get('code', '')})")

    def answer_over(self, answer: Answer, said: str) -> None:
        """The arena takes no more of this answer: stop generating and sending it, and say so once (the
        tokens already on their way get the same refusal)."""
        if answer.over:
            return
        answer.over = True
        if self.generating is not None and not self.generating.done():
            self.stop_generating(f"the arena takes no more of it: {said}")
        else:
            self.out.say(f"round {answer.round}: the arena takes no more of this answer: {said}")

    def on_registered(self, m: dict[str, Any]) -> None:
        """Registered (again): take the arena's word on what it holds of the answer."""
        super().on_registered(m)
        resume, answer = m.get("resume"), self.answer
        if self.registrations == 1:
            self.out.say(f"in the arena as '{self.nickname}' (id {self.participant_id}, {self.runner} {self.model}): "
                         "waiting for a challenge")
        else:
            self.back_at, self.streaming_at = time.monotonic(), None
            owed = answer.resume_from(resume) if answer is not None else 0
            self.out.say(f"back in the arena; {owed} tokens to send again" if owed else "back in the arena")
        if resume is not None and (answer is None or answer.round != resume["round"]):
            self.out.say(f"round {resume['round']} is running, but its challenge came before you joined: you "
                         "answer from the next round")
        self.wake.set()

    def on_challenge(self, m: dict[str, Any]) -> None:
        """A new round: answer it; one generation at a time, the newest challenge waiting for the old to stop."""
        odd = [key for key, kind in CHALLENGE_FIELDS.items() if not isinstance(m.get(key), kind)
               or isinstance(m.get(key), bool)]
        if odd:
            self.out.say(f"the arena sent a challenge that join cannot read ({', '.join(odd)} missing or of "
                         "another type): it is skipped")
        elif self.answer is not None and self.answer.round == m["round"]:
            self.out.say(f"round {m['round']} again: already answering it, so this copy is ignored")
        elif self.generating is not None and not self.generating.done():
            self.out.say(f"round {m['round']} arrived while round {self.answer.round} was still generating: "
                         f"the host has moved on, so round {self.answer.round} stops here and round {m['round']} "
                         "starts next")
            self.queued = m
            self.stop_generating("a new round")
        else:
            self.start(m)

    def start(self, challenge: dict[str, Any]) -> None:
        self.answer = Answer(challenge, time.monotonic())
        self.generating = asyncio.ensure_future(self.generate(self.answer))
        self.generating.add_done_callback(self.generated)

    def generated(self, task: asyncio.Task) -> None:
        """Say so if a generation ended by a bug rather than by the engine, or the answer would just stop."""
        if not task.cancelled() and task.exception() is not None:
            self.out.say(f"internal error while answering: {task.exception()!r}")
            log.error("generation failed", exc_info=task.exception())

    def stop_generating(self, why: str) -> None:
        """End the running generation now (the arena moved on, or refused us)."""
        if self.generating is not None and not self.generating.done() and self.answer is not None:
            self.answer.cut = self.answer.cut or why
            self.answer.stop.set()

    async def generate(self, answer: Answer) -> None:
        """Write the engine's answer into the buffer until it ends, the budget or the deadline; then close it."""
        c = answer.challenge
        self.out.say(f"round {answer.round} · max {c['max_tokens']} tokens · {c['deadline_ms'] / 1000:g} s\n"
                     f"prompt: {c['prompt']}")
        writing, stop = asyncio.ensure_future(self.write(answer)), asyncio.ensure_future(answer.stop.wait())
        done, _ = await asyncio.wait({writing, stop}, timeout=c["deadline_ms"] / 1000,
                                     return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if writing not in done:
            answer.cut = answer.cut or "the deadline"
            writing.cancel()
            await asyncio.wait({writing})
        failure = writing.exception() if not writing.cancelled() else None
        if failure is not None and not isinstance(failure, EngineError):
            raise failure
        if answer.stop.is_set():                        # dropped, not finished: the arena has moved on
            self.out.say(f"round {answer.round}: stopped after {len(answer.tokens)} tokens ({answer.cut})")
        else:
            self.end(answer, failure and str(failure))
        if self.queued is not None:
            challenge, self.queued = self.queued, None
            self.start(challenge)

    async def write(self, answer: Answer) -> None:
        """The engine's pieces into the answer, up to the budget; an empty chunk (a stream's last) is no token."""
        async with contextlib.aclosing(self.engine.stream(answer.challenge, answer.counters)) as pieces:
            async for piece in pieces:
                if piece:
                    self.take(answer, piece)
                if len(answer.tokens) >= answer.challenge["max_tokens"]:
                    return

    def take(self, answer: Answer, piece: str) -> None:
        """One more token into the buffer, shown and handed to the sender."""
        if answer.first_at is None:
            answer.first_at = time.monotonic()
        answer.tokens.append(piece)
        self.out.stream(piece)
        self.wake.set()

    def end(self, answer: Answer, failure: str | None) -> None:
        """Close the answer with the `error` or `complete` the arena gets after its last token."""
        frame = {"round": answer.round, "participant_id": self.participant_id}
        elapsed_s = time.monotonic() - answer.began
        if failure is not None:
            self.out.say(f"round {answer.round}: the engine failed after {len(answer.tokens)} tokens: {failure}; "
                         "the arena is told")
            answer.ending = {"type": "error", **frame, "code": "GENERATION_FAILED", "message": failure}
        else:
            model_info = {"name": self.engine.model, "runner": self.engine.runner, **self.machine,
                          **answer.counters}
            answer.ending = {"type": "complete", **frame, "tokens": len(answer.tokens),
                             "duration_ms": round(elapsed_s * 1000), "model_info": model_info}
            if answer.first_at is not None:
                answer.ending["latency_ms_first_token"] = round((answer.first_at - answer.began) * 1000)
            figures = f"{len(answer.tokens)} tokens in {elapsed_s:.1f} s, " \
                      f"{len(answer.tokens) / max(elapsed_s, 1e-3):.1f} tokens/s"
            own = engine_tps(model_info, answer.ending["duration_ms"])
            cut = f" (stopped at {answer.cut})" if answer.cut else ""
            self.out.say(f"round {answer.round}: {figures}{f', engine {own:.1f} tokens/s' if own else ''}{cut}")
        self.wake.set()

    async def deliver_loop(self, ws: Any) -> None:
        """Send what the arena lacks, in seq order, for as long as this connection lives."""
        await self.ready.wait()
        while True:
            self.wake.clear()
            if self.answer is not None:
                await self.deliver(ws, self.answer)
            await self.wake.wait()

    async def deliver(self, ws: Any, answer: Answer) -> None:
        """The missing tokens first, then the unsent ones, then the ending, proven read by a pong."""
        def sending() -> bool:
            return answer is self.answer and answer.owed
        while sending() and answer.resend:
            seq = answer.resend[0]
            await ws.send(self.token_frame(answer, seq))
            answer.resend.pop(0)
        while sending() and answer.next_seq < len(answer.tokens):
            await ws.send(self.token_frame(answer, answer.next_seq))
            answer.next_seq += 1
            if self.streaming_at is None:
                self.streaming_at = time.monotonic()
        if sending() and answer.ending is not None:
            await ws.send(json_text(answer.ending))
            # The arena answers a ping after the frames before it, so the pong proves it read the ending.
            with contextlib.suppress(asyncio.TimeoutError):
                await within(await ws.ping(), DELIVERY_WAIT_S)
                answer.delivered = True
                if answer.ending["type"] == "complete":
                    self.out.say(f"round {answer.round}: the arena has all {len(answer.tokens)} tokens")

    def token_frame(self, answer: Answer, seq: int) -> str:
        return token_message(answer.round, self.participant_id, seq, answer.tokens[seq])


async def join(options: JoinOptions, out: Terminal) -> str:
    """Find the engine, then take the seat and answer until the arena refuses us; return why it ended."""
    if not options.pin:
        raise ValueError("pass --pin: the session PIN shown on the big screen")
    url = arena_url(options.url)
    if url != options.url.strip():
        out.say(f"arena: {url} (from '{options.url}')")
    nickname = clean_text(options.nickname or os.environ.get("USER") or os.environ.get("USERNAME") or "runner")
    options = replace(options, nickname=nickname)
    participant_id = clean_text(options.participant_id) or stable_participant_id(nickname)
    async with ClientSession(timeout=ClientTimeout(total=None, sock_connect=5)) as http:
        engine = await find_engine(http, options, out.say)
        machine = await asyncio.to_thread(machine_info)
        return await Join(options, engine, machine, out, participant_id).run()


def join_command(argv: list[str]) -> None:
    """`join`: the participant's runner."""
    parser = options_parser(JoinOptions, command_parser(
        "join", "Take part in the arena with a local model: answer each challenge and stream the tokens, keeping "
                "them through dropped connections and server restarts. Every option can also be set by the "
                "environment variable named in its help."), "GAMBIARRA_")
    options = JoinOptions(**option_values(JoinOptions, vars(parser.parse_args(argv)), "GAMBIARRA_"))
    with contextlib.suppress(AttributeError):           # a console that cannot show an emoji shows "?"
        sys.stdout.reconfigure(errors="replace")
    out = Terminal(echo=not options.quiet)
    try:
        why = asyncio.run(join(options, out))
    except KeyboardInterrupt:
        out.say("stopped (Ctrl-C)")
        return
    except (EngineError, ValueError) as exc:
        raise SystemExit(f"join: {exc}") from None
    except ModuleNotFoundError as exc:
        raise SystemExit(f"join: it needs {exc.name}: pip install aiohttp bcrypt websockets") from None
    raise SystemExit(f"join: {why}")


@dataclass
class DrillServer:
    """The arena as a process of its own on a fixed loopback port, so the drill can kill and restart it."""

    port: int
    database: Path
    # The drill's runners share one address, where a room's laptops have one each: a restart
    # has them all send the PIN at once, counted as guesses until bcrypt says it is right.
    pin_attempts: int
    process: subprocess.Popen | None = None

    async def start(self, http: ClientSession) -> None:
        """Start the arena; return once it answers (its banner can come later: it looks up LAN addresses)."""
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--host", "127.0.0.1", "--port", str(self.port),
             "--database-url", str(self.database), "--pin-attempts-max", str(self.pin_attempts)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1000):
            with contextlib.suppress(HTTPClientError):
                async with http.get(f"http://127.0.0.1:{self.port}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.01)
        raise RuntimeError("the arena did not start")

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)
        self.process.wait(timeout=30)


async def join_drill(runners: int, rate: float, answer_s: float, signum: int,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """`runners` join runners (mock engine) answer a round; the arena is stopped mid-round and started again.

    Measures how long after the arena is back every runner is back and streaming, and compares each
    answer the arena stored with what its runner generated (tokens lost: the goal is 0).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        server = DrillServer(port, Path(folder) / "drill.db", runners + 10)
        base = f"http://127.0.0.1:{port}"
        async with ClientSession() as http:
            await server.start(http)
            pin = (await HostClient(http, base).call("POST", "/session", {}))["pin"]
            machine = await asyncio.to_thread(machine_info)
            seats = [Join(JoinOptions(url=base, pin=pin, nickname=f"drill {i}"), Mock(None, "", "mock", rate),
                          machine, Terminal(enabled=False), f"drill-{i:03d}") for i in range(runners)]
            tasks = [asyncio.ensure_future(seat.run()) for seat in seats]
            try:
                return await drill_round(seats, server, http, base, rate, answer_s, signum, say)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.to_thread(server.stop)


async def drill_round(seats: list[Join], server: DrillServer, http: ClientSession, base: str, rate: float,
                      answer_s: float, signum: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The drill's round: all streaming, the arena down and up again, every answer delivered and compared."""
    if not await wait_until(lambda: all(seat.registrations for seat in seats), 60):
        raise RuntimeError("not every runner registered")
    host = HostClient(http, base)
    rnd = await host.call("POST", "/rounds", {"prompt": "drill", "maxTokens": round(rate * answer_s),
                                              "deadlineMs": 120_000})
    await host.call("POST", "/rounds/start", {"roundId": rnd["id"]})
    await wait_until(lambda: all(seat.answer and len(seat.answer.tokens) >= rate for seat in seats), 60)
    say(f"{len(seats)} runners streaming; stopping the arena ({signal.Signals(signum).name})")
    down = time.monotonic()
    await asyncio.to_thread(server.stop, signum)
    await server.start(http)
    up = time.monotonic()
    say(f"the arena is back after {up - down:.2f} s")
    def streaming_again(seat: Join) -> bool:
        return seat.back_at is not None and seat.back_at > down and bool(seat.streaming_at or seat.answer.delivered)
    if not await wait_until(lambda: all(streaming_again(seat) for seat in seats), 60):
        raise RuntimeError("not every runner came back")
    back = [(seat.streaming_at or seat.back_at) - up for seat in seats]
    if not await wait_until(lambda: all(seat.answer.delivered for seat in seats), 120):
        raise RuntimeError("not every answer was completed")
    await host.call("POST", "/rounds/stop", {"roundId": rnd["id"]})
    tree = await host.call("GET", "/export-all.json")
    stored = {m["participantId"]: m for r in tree["rounds"] for m in r["metrics"]}
    lost = differ = 0
    for seat in seats:
        row = stored.get(seat.participant_id, {})
        lost += len(seat.answer.tokens) - row.get("tokensReceived", 0)
        differ += row.get("generatedContent") != "".join(seat.answer.tokens)
    return {"runners": len(seats), "signal": signal.Signals(signum).name, "restart_s": round(up - down, 2),
            "back_and_streaming_s": {"p50": round(quantile(back, 0.5), 2), "max": round(max(back), 2)},
            "tokens_generated": sum(len(seat.answer.tokens) for seat in seats), "tokens_lost": lost,
            "answers_differing": differ, "reconnects": sum(seat.reconnects for seat in seats)}


def join_drill_command(argv: list[str]) -> None:
    """`join-drill`: many join runners lose the arena to a restart mid-round; print what it cost."""
    parser = command_parser(
        "join-drill", "Start an arena on a free loopback port and a temporary database, seat join runners with the "
                      "mock engine, stop the arena mid-round and start it again; print how long until every runner "
                      "was back and streaming, and how many tokens were lost (the goal: none).")
    parser.add_argument("--runners", type=int, default=200, help="join runners (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=10.0, help="tokens/s of each runner (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=12.0,
                        help="the longest answer; each is half to all of it (default: %(default)s)")
    parser.add_argument("--kill", action="store_true", help="stop the arena with SIGKILL, not SIGTERM")
    a = parser.parse_args(argv)
    out = Terminal()
    result = asyncio.run(join_drill(a.runners, a.rate, a.seconds, signal.SIGKILL if a.kill else signal.SIGTERM,
                                    out.say))
    back = result["back_and_streaming_s"]
    out.say(f"{result['runners']} runners back and streaming {back['p50']:.2f} s (median) and {back['max']:.2f} s "
            f"(last) after the arena was; {result['tokens_generated']} tokens generated, "
            f"{result['tokens_lost']} lost, {result['answers_differing']} answers differing")
    print(dumps(result))


# =============================================================================
# Rehearsal: simulate and bench
# =============================================================================
#
# `simulate` plays the evening against a running server: runner bots that stream
# answers, arena screens, and voting phones. `bench` starts a server of its own on
# loopback, drives it with the same actors from worker processes, and measures it.
# Both import `websockets` (the client the club's Python runners use) only when
# they run: the server itself needs aiohttp and bcrypt alone.

BOT_WORDS = ("Lhamas ", "pastam ", "no ", "silício ", "🦙 ", "e ", "sonham ", "com ", "pão ", "de ", "queijo",
             ". ", "Ação! ", "Coração ", "über ", "naïve ", "日本語 ", "Ωμέγα ", "🔥", "🚀 ", "gambiarra ",
             "é ", "arte", ", ", "ñandú ", "😅 ", "—", "\n", "Çà ", "va? ", "✨ ", "São ", "João ", "🎉")
BOT_NAMES = ("Açaí", "Jurema", "Zé Mané", "Björk", "Ñandú", "Ωmega", "李雷", "Lhama 🦙", "Cuscuz", "Tapioca",
             "Maracujá", "Pedrin Matador Testando o tamanho dos nicks")
BOT_MODELS = (("ollama", "llama3.1:8b"), ("llamacpp", "qwen2.5-7b-instruct-q4_k_m"), ("lmstudio", "gemma-3-4b-it"),
              ("ollama", "smollm2:135m"), ("ollama", "deepseek-coder:6.7b"), ("ollama", "qwen3.5:9b"))
# A meetup's laptops: a quarter crawl (a big model on a CPU), a quarter fly (a
# small model on a GPU). Pairs of (share of the bots, multiple of --rate); mean 1.
BOT_PACES = ((0.25, 0.4), (0.5, 1.0), (0.25, 1.6))
WARM_UP_S = (0.1, 0.8)          # a model reads the prompt before its first token
PROMPTS = ("Escreva um haiku sobre lhamas.", "Explain recursion to a five-year-old, with emoji.",
           "Desenhe um gato em SVG.", "Write a limerick about a GPU that overheats.")
REFUSALS = {"INVALID_PIN", "PIN_THROTTLED", "SESSION_ENDED", "KICKED", "NO_SESSION", "SESSION_FULL"}
# Bench's tokens read "<send time>|<word>": the time in µs modulo 2**32 (71 minutes),
# in hex, so stamps stay short and the answers near their real size.
STAMP_MARK = "|"
STAMP_WRAP_US = 2**32
RECONNECT_TRIES = 20
FLOOD_BURST = 16                # tokens per write when a bot sends flat out
# A token_update as the server writes it (on_token), matched without decoding the JSON:
# bench's screens must keep up with the server on a shared CPU. Anything else is decoded.
TOKEN_UPDATE = re.compile(r'\{"type":"token_update","participant_id":"((?:[^"\\]|\\.)*)","round":(\d+),"seq":(\d+),'
                          r'"content":"(?:([0-9a-f]+)\|)?')


def bot_word(bot: int, round_index: int, seq: int) -> str:
    """A bot's token: fixed by (bot, round, seq), so it can resend exactly what the server missed."""
    return BOT_WORDS[(bot * 7 + round_index * 13 + seq * (1 + bot % 5)) % len(BOT_WORDS)]


def bot_answer(bot: int, round_index: int, tokens: int) -> str:
    """The whole answer of a bot that sent `tokens` tokens: what the server should hold."""
    return "".join(bot_word(bot, round_index, seq) for seq in range(tokens))


def vote_score(voter_id: str, participant_id: str) -> int:
    """The score a simulated phone gives an answer: fixed, so tallies can be checked exactly."""
    return int(hashlib.sha256(f"{voter_id}/{participant_id}".encode()).hexdigest()[:8], 16) % 6


def websocket_url(base: str) -> str:
    """The /ws address of a server's base URL (http -> ws, https -> wss)."""
    return "ws" + base.rstrip("/").removeprefix("http") + "/ws"


def pick_pace(rng: random.Random) -> float:
    """A bot's speed as a multiple of --rate, drawn from BOT_PACES with some spread."""
    draw = rng.random()
    for share, pace in BOT_PACES:
        if draw < share:
            break
        draw -= share
    return pace * rng.uniform(0.85, 1.15)


def bump(counter: dict[Any, int], key: Any) -> None:
    """Count one more `key`."""
    counter[key] = counter.get(key, 0) + 1


def counts_text(counter: dict[str, int]) -> str:
    """Counts for the host to read: "INVALID_PIN x3, KICKED x1"."""
    return ", ".join(f"{key} x{n}" for key, n in sorted(counter.items()))


@dataclass
class SimOptions:
    """What a simulation plays; `bench` gives each worker process a slice of it."""

    url: str = "http://127.0.0.1:3000"
    pin: str | None = None
    admin_token: str = ""
    bots: int = 10
    first_bot: int = 0                  # bench splits the bots between processes
    rate: float = 20.0                  # mean tokens/s of a bot; 0: as fast as it can
    drop: float = 0.0                   # chance that a bot drops once during an answer
    screens: int = 1
    first_screen: int = 0
    phones: int = 0                     # voting sockets; each wakes its voters when voting opens
    voters: int = 0
    first_voter: int = 0
    all_voters: int = 0                 # voters in every process: bench's vote schedule
    rounds: int = 0                     # 0: until the duration or Ctrl-C
    duration_s: float = 0.0
    drive: bool = False                 # also play the host: create, start and stop the rounds
    max_tokens: int = 150
    deadline_ms: int = 60_000
    vote_pace_s: float = 0.6            # a phone's think time between votes
    vote_rate: float = 0.0              # bench: votes/s of all voters together, on a schedule
    votes_per_voter: int = 0            # 0: every answer
    fill: bool = False                  # bench: stream up to max_tokens, not a natural length
    stamp: bool = False                 # bench: put the send time in each token
    stalled_screens: int = 0            # bench's attackers (Attackers): screens that never read,
    idle_connections: int = 0           # half-sent HTTP requests from one address,
    register_loops: int = 0             # sockets asking for snapshots flat out,
    wrong_pin_addresses: int = 0        # and addresses guessing PINs
    prefix: str = "sim"
    seed: int = 1
    progress: bool = True


@dataclass
class Measures:
    """What one process's actors did and saw; `bench` adds up its workers' measures."""

    register_s: list[float] = field(default_factory=list)      # a bot's connect -> first `registered`
    registered_at: list[float] = field(default_factory=list)   # monotonic
    challenged_at: list[float] = field(default_factory=list)   # monotonic, one per challenge received
    sent_at: list[float] = field(default_factory=list)         # monotonic, a round's first token of a bot
    tokens_sent: int = 0
    completes: int = 0
    drops: int = 0
    resumes: int = 0
    resent: int = 0
    seen: dict[int, int] = field(default_factory=dict)         # token_updates per screen number
    out_of_order: dict[int, int] = field(default_factory=dict)
    seen_at: dict[int, float] = field(default_factory=dict)    # monotonic, each screen's latest token
    latency_ms: list[float] = field(default_factory=list)      # token sent -> arena screen (stamped only)
    votes: int = 0
    fetch_ms: list[float] = field(default_factory=list)        # a phone's download of the answers
    vote_ms: list[float] = field(default_factory=list)         # vote due -> answered
    voted_at: list[float] = field(default_factory=list)        # monotonic, each vote answered
    votes_refused: int = 0
    scores: dict[str, list[int]] = field(default_factory=dict)  # participant -> [votes, total score]
    errors: dict[str, int] = field(default_factory=dict)       # error codes the server sent
    attack: dict[str, int] = field(default_factory=dict)       # what bench's attackers achieved (Attackers)

    def add(self, other: Measures) -> None:
        """Fold another process's measures into this one."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, dict):         # counters add up; per-screen entries never meet (distinct numbers)
                for key, value in theirs.items():
                    if key not in mine:
                        mine[key] = value
                    elif isinstance(value, list):
                        mine[key] = [a + b for a, b in zip(mine[key], value)]
                    else:
                        mine[key] += value
            else:
                setattr(self, f.name, mine + theirs)


class Actor:
    """One of a simulation's people, numbered, with a random source of its own: the same run after run."""

    def __init__(self, sim: Simulation, index: int, name: str) -> None:
        self.sim = sim
        self.index = index
        self.rng = random.Random(f"{sim.options.seed}/{name}")


class Bot(Actor, Seat):
    """A runner: registers, answers each challenge at its own pace, and may drop and come back."""

    final = dict.fromkeys(REFUSALS, "")
    give_up_after = RECONNECT_TRIES

    def __init__(self, sim: Simulation, index: int) -> None:
        participant_id = f"{sim.options.prefix}-{index:03d}"
        Actor.__init__(self, sim, index, participant_id)
        runner, model = BOT_MODELS[index % len(BOT_MODELS)]
        Seat.__init__(self, sim.ws_url, participant_id, sim.pin, runner=runner, model=model, rng=self.rng,
                      nickname=f"{BOT_NAMES[index % len(BOT_NAMES)]} {index}")
        self.pace = pick_pace(self.rng)
        self.registered_at: float | None = None
        self.resume: dict[str, Any] | None = None
        self.answering: int | None = None       # the round of the latest challenge
        self.answered: set[int] = set()
        self.task: asyncio.Task | None = None   # the answer being streamed

    def settled(self, round_index: int) -> bool:
        """Done with a round: answered it, or out of the game."""
        return round_index in self.answered or self.refused is not None

    def staying(self) -> bool:
        return not self.sim.stopping and super().staying()

    def refuse(self, code: str, why: str) -> None:
        super().refuse(code, why)
        self.sim.note(f"{self.participant_id} is out: {why}")

    def on_challenge(self, m: dict[str, Any]) -> None:
        """Start answering; the host moved on from the previous round, so does the bot."""
        self.sim.measures.challenged_at.append(time.monotonic())
        if self.task is not None:
            self.task.cancel()
        self.answering = m["round"]
        self.sim.progress.begin(m["round"])
        self.task = asyncio.ensure_future(self.answer(m))

    def on_error(self, m: dict[str, Any]) -> None:
        bump(self.sim.measures.errors, m.get("code", "ERROR"))
        super().on_error(m)

    def on_registered(self, m: dict[str, Any]) -> None:
        """Note the first registration's timing; after a drop, learn where to resume."""
        super().on_registered(m)
        now = time.monotonic()
        if self.registered_at is None:
            self.registered_at = now
            self.sim.measures.register_s.append(now - self.dialed_at)
            self.sim.measures.registered_at.append(now)
        resume = m.get("resume")
        if resume and resume["round"] == self.answering and self.answering not in self.answered:
            self.resume = resume

    def answer_length(self, max_tokens: int) -> int:
        """How many tokens this answer has: the budget when filling, else a natural length within it."""
        if self.sim.options.fill:
            return max_tokens
        return self.rng.randint(max(1, max_tokens // 3), max_tokens)

    async def answer(self, challenge: dict[str, Any]) -> None:
        """Stream an answer until it is done, out of budget or out of time; then `complete`."""
        round_index, began = challenge["round"], time.monotonic()
        try:
            if self.sim.options.rate > 0:
                tokens, first_at = await self.stream(challenge, began)
            else:
                tokens, first_at = await self.flood(challenge)
            report = {"type": "complete", "round": round_index, "participant_id": self.participant_id,
                      "tokens": tokens, "duration_ms": round((time.monotonic() - began) * 1000),
                      "model_info": {"name": self.model, "runner": self.runner}}
            if first_at is not None:
                report["latency_ms_first_token"] = round((first_at - began) * 1000)
            await self.settle_up(round_index, tokens)
            while not await self.send(json_text(report)):
                await self.settle_up(round_index, tokens)
        except asyncio.TimeoutError:
            return                              # the connection never came back: the answer is lost
        self.answered.add(round_index)
        self.sim.measures.completes += 1
        self.sim.progress.answered(round_index)

    async def stream(self, challenge: dict[str, Any], began: float) -> tuple[int, float | None]:
        """Generate the tokens at this bot's pace, sending those the connection lets through."""
        round_index, deadline = challenge["round"], began + challenge["deadline_ms"] / 1000
        length = self.answer_length(challenge["max_tokens"])
        drop_at = self.rng.randrange(1, length) if length > 1 and self.rng.random() < self.sim.options.drop else -1
        await asyncio.sleep(self.rng.uniform(*WARM_UP_S))
        seq, first_at, due = 0, None, time.monotonic()
        while seq < length and time.monotonic() < deadline:
            due = await self.wait_turn(due)
            if self.resume is not None:
                await self.catch_up(round_index, seq)
            if seq == drop_at and self.ready.is_set():
                self.drop()
            elif self.ready.is_set() and await self.send(self.token(round_index, seq)):
                if first_at is None:
                    first_at = time.monotonic()
                    self.sim.measures.sent_at.append(first_at)
                self.sim.measures.tokens_sent += 1
            seq += 1                            # a model goes on generating while the wifi is down
        return seq, first_at

    async def flood(self, challenge: dict[str, Any]) -> tuple[int, float]:
        """Flat out (bench's saturation round): every token at once, in bursts written to the socket.

        The websockets library's cost per message would make the load generator,
        not the server, the limit. The frames are the ones it would send (masked,
        with the all-zero key), so the server does the same work for each.
        """
        round_index, length = challenge["round"], self.answer_length(challenge["max_tokens"])
        ws, first_at = self.ws, time.monotonic()
        self.sim.measures.sent_at.append(first_at)
        for start in range(0, length, FLOOD_BURST):
            if ws.transport.is_closing():
                return start, first_at
            burst = range(start, min(start + FLOOD_BURST, length))
            ws.transport.write(b"".join(text_frame(self.token(round_index, seq).encode(), masked=True) for seq in burst))
            self.sim.measures.tokens_sent += len(burst)
            await ws.drain()                    # websockets' own flow control: waits while the server is behind
            await asyncio.sleep(0)              # let the other bots in
        return length, first_at

    async def settle_up(self, round_index: int, tokens: int) -> None:
        """Be connected again, and resend whatever the server lacks of the first `tokens` tokens."""
        while not self.ready.is_set() or self.resume is not None:
            await within(self.ready.wait(), RECONNECT_TRIES * 2)
            if self.resume is not None:
                await self.catch_up(round_index, tokens)

    async def catch_up(self, round_index: int, seq: int) -> None:
        """After a reconnect, resend the gaps the server reports and what went out while offline."""
        resume, self.resume = self.resume, None
        self.sim.measures.resumes += 1
        for missing in resume["missing"] + list(range(resume["next_seq"], seq)):
            if await self.send(self.token(round_index, missing)):
                self.sim.measures.tokens_sent += 1
                self.sim.measures.resent += 1

    def token(self, round_index: int, seq: int) -> str:
        """The `token` message for one seq (stamped with its send time in bench)."""
        content = bot_word(self.index, round_index, seq)
        if self.sim.options.stamp:
            content = f"{time.monotonic_ns() // 1000 % STAMP_WRAP_US:x}{STAMP_MARK}{content}"
        return token_message(round_index, self.participant_id, seq, content)

    async def wait_turn(self, due: float) -> float:
        """Sleep until the next token is due at this bot's pace, with jitter; return the next due time."""
        rate = self.sim.options.rate * self.pace
        due += self.rng.uniform(0.5, 1.5) / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        return due

    async def send(self, text: str) -> bool:
        """Send on the current connection; False if it has just died (the run loop reconnects)."""
        ws = self.ws
        try:
            await ws.send(text)
            return True
        except socket_gone():
            if ws is self.ws:
                self.ready.clear()
            return False

    def drop(self) -> None:
        """Vanish mid-answer as a laptop on bad wifi does: no closing handshake."""
        self.sim.measures.drops += 1
        self.ready.clear()
        self.ws.transport.abort()


class Screen:
    """A telão tab (view "arena") or a voting phone (view "voting"), which wakes its voters.

    Screens use aiohttp's client (a browser, not a Python runner, is what they
    stand for): it reads frames in C, at half the CPU of `websockets`, and the
    screens must read faster than the server can write for `bench` to measure it.
    """

    def __init__(self, sim: Simulation, number: int, view: str, voters: list[Voter]) -> None:
        self.sim = sim
        self.number = number
        self.view = view
        self.voters = voters
        self.ready = asyncio.Event()
        self.round: int | None = None
        self.expected: dict[str, int] = {}      # next seq per participant in this round

    async def run(self) -> None:
        """Watch until the simulation ends, reconnecting if the connection drops."""
        for _ in range(RECONNECT_TRIES):
            try:
                async with self.sim.http.ws_connect(self.sim.ws_url, compress=0, max_msg_size=0) as ws:
                    await ws.send_str(dumps({"type": "telao_register", "view": self.view}))
                    async for message in ws:
                        if message.type is WSMsgType.TEXT:
                            self.on_message(message.data)
            except (OSError, asyncio.TimeoutError, ClientConnectionError, WSServerHandshakeError):
                pass
            if self.sim.stopping:
                return
            await asyncio.sleep(0.5)

    def on_message(self, text: str) -> None:
        """Count a token update, or note a round change that may open voting."""
        now_us = time.monotonic_ns() // 1000
        token = TOKEN_UPDATE.match(text)
        if token:
            self.on_token(token[1], int(token[2]), int(token[3]), token[4], now_us)
            return
        m = json.loads(text)
        kind = m["type"]
        if kind == "token_update":
            stamp, mark, _ = m["content"].partition(STAMP_MARK)
            self.on_token(m["participant_id"], m["round"], m["seq"], stamp if mark else None, now_us)
        elif kind in ("round_state", "state_snapshot") and m["round"]:
            self.sim.round_ids[m["round"]["index"]] = m["round"]["id"]
            if m["round"]["votingStatus"] == "open" and self.sim.may_vote(m["round"]["id"]):
                if kind == "round_state":               # as it happens, not a snapshot's past
                    self.sim.progress.voting_opened(m["round"]["index"])
                for voter in self.voters:
                    voter.start(m["round"])
        elif kind == "registered_telao":
            self.ready.set()

    def on_token(self, pid: str, round_index: int, seq: int, stamp: str | None, now_us: int) -> None:
        """Count a token, check its order, and time it when the bot stamped it."""
        measures = self.sim.measures
        measures.seen[self.number] = measures.seen.get(self.number, 0) + 1
        if round_index != self.round:
            self.round = round_index
            self.expected.clear()
        expected = self.expected.get(pid, 0)
        if seq < expected:
            bump(measures.out_of_order, self.number)
        else:
            self.expected[pid] = seq + 1
        if stamp:
            measures.latency_ms.append((now_us - int(stamp, 16)) % STAMP_WRAP_US / 1000)
        measures.seen_at[self.number] = now_us / 1e6


class HttpLink:
    """A phone's keep-alive HTTP/1.1 connection, just enough to POST JSON.

    aiohttp's client spends about as much CPU on a request as the server does,
    which would make the load generator, not the server, the limit of `bench`.
    """

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or (443 if self.tls else 80)
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        """POST `body`; return the status and the decoded JSON answer. One retry on a stale connection."""
        payload = dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        for attempt in range(2):
            try:
                return await within(self.exchange(request), 30)
            except (OSError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def exchange(self, request: bytes) -> tuple[int, Any]:
        """Write one request and read its response on the kept-alive connection."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)
        reader, writer = self.streams
        writer.write(request)
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
        body = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status_line.split()[1]), json.loads(body)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class Voter(Actor):
    """A person with a phone: votes for every answer (or some) once voting opens."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.voter_id = f"{sim.options.prefix}-voter-{index:03d}"
        super().__init__(sim, index, self.voter_id)
        self.rounds: dict[str, asyncio.Task] = {}
        self.link = HttpLink(sim.options.url)

    def start(self, row: dict[str, Any]) -> None:
        """Start voting in a round, once."""
        if row["id"] not in self.rounds:
            self.rounds[row["id"]] = asyncio.ensure_future(self.vote(row["id"]))
            self.sim.tasks.append(self.rounds[row["id"]])

    def settled(self, round_id: str) -> bool:
        task = self.rounds.get(round_id)
        return task is not None and task.done()

    async def vote(self, round_id: str) -> None:
        """Read the answers, then vote on them one by one, as a thumb on a phone does."""
        targets = await self.sim.answers(round_id)
        opened = time.monotonic()
        self.rng.shuffle(targets)
        for turn, pid in enumerate(targets[:self.sim.options.votes_per_voter or None]):
            due = await self.wait_turn(opened, turn)
            score = vote_score(self.voter_id, pid)
            try:
                status, answer = await self.link.post_json("/api/votes", {
                    "roundId": round_id, "participantId": pid, "score": score, "voterId": self.voter_id})
                # As the telão's voting page: "already voted" means an earlier try got through.
                accepted = status == 200 or answer.get("error") == "Already voted for this participant"
                refusal = f"{status} {answer.get('error')}"
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError) as exc:
                accepted, refusal = False, type(exc).__name__
            done = time.monotonic()
            measures = self.sim.measures
            measures.vote_ms.append((done - due) * 1000)
            measures.voted_at.append(done)
            if accepted:
                measures.votes += 1
                measures.scores[pid] = [a + b for a, b in zip(measures.scores.get(pid, [0, 0]), (1, score))]
            else:
                measures.votes_refused += 1
                self.sim.note(f"a vote was refused: {refusal}")

    async def wait_turn(self, opened: float, turn: int) -> float:
        """Wait for this vote's moment: bench's schedule (open loop), else a thumb's pace. Return it."""
        options = self.sim.options
        if options.vote_rate:
            due = opened + (self.index + turn * max(options.all_voters, 1)) / options.vote_rate
        else:
            due = time.monotonic() + options.vote_pace_s * self.rng.uniform(0.5, 1.5)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        return due


class Simulation:
    """Bots, screens and voters sharing one event loop, one HTTP session and one set of measures."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.ws_url = websocket_url(options.url)
        self.pin = options.pin or ""
        self.measures = Measures()
        self.stopping = False
        self.http: ClientSession | None = None
        self.host: HostClient | None = None     # the host's calls, on the same session
        self.voters = [Voter(self, options.first_voter + i) for i in range(options.voters)]
        # Phones are numbered -1: a token_update reaching one (it should not) shows up as seen[-1].
        self.screens = ([Screen(self, options.first_screen + i, "arena", []) for i in range(options.screens)]
                        + [Screen(self, -1, "voting", self.voters[i::options.phones]) for i in range(options.phones)])
        self.bots = [Bot(self, options.first_bot + i) for i in range(options.bots)]
        self.tasks: list[asyncio.Task] = []
        self.notes: dict[str, None] = {}        # one-off remarks for the summary, in order
        self.round_ids: dict[int, str] = {}
        self.progress = Progress(self, options.progress)
        self.voting_rounds: set[str] | None = None     # bench: the only rounds voters vote in (None: every round)
        self.answers_read: tuple[bytes, list[str]] = (b"", [])

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        """An HTTP session while the simulation runs; every actor stops at the end."""
        async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=30)) as self.http:
            self.host = HostClient(self.http, self.options.url, self.options.admin_token)
            try:
                yield self
            finally:
                self.stopping = True
                tasks = self.tasks + [bot.task for bot in self.bots if bot.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for voter in self.voters:
                    voter.link.close()

    def may_vote(self, round_id: str) -> bool:
        return self.voting_rounds is None or round_id in self.voting_rounds

    def note(self, text: str) -> None:
        """A remark for the summary; once the bots have joined, also a line as it happens."""
        if text not in self.notes and self.progress.joined_said:
            self.progress.event(text)
        self.notes[text] = None

    def take_measures(self) -> Measures:
        """Hand over the measures so far and start anew."""
        measures, self.measures = self.measures, Measures()
        return measures

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One HTTP call as the host, on this simulation's HTTP session (see HostClient)."""
        return await self.host.call(method, path, body)

    async def answers(self, round_id: str) -> list[str]:
        """Download a round's answers as a phone does (gzipped); return who answered.

        Every phone downloads them, but identical downloads are unpacked once:
        that is each phone's own work, not the server's.
        """
        started = time.monotonic()
        with reaching(self.options.url):
            async with self.http.get(self.options.url.rstrip("/") + f"/api/rounds/{round_id}/responses",
                                     headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as response:
                raw = await response.read()
                packed = response.headers.get("Content-Encoding") == "gzip"
        if response.status != 200:
            raise RuntimeError(f"GET /api/rounds/{round_id}/responses: {response.status}")
        if raw != self.answers_read[0]:
            body = json.loads(gzip.decompress(raw) if packed else raw)
            self.answers_read = (raw, [answer["participant_id"] for answer in body["responses"]])
        self.measures.fetch_ms.append((time.monotonic() - started) * 1000)
        return list(self.answers_read[1])

    async def find_pin(self) -> str:
        """--pin, else the active session's (shown to the host's machine), else a new session's with --drive."""
        if self.options.pin:
            return self.options.pin
        try:
            session = await self.call("GET", "/session")
        except RuntimeError:
            if not self.options.drive:
                raise RuntimeError("No active session: start one (curl -X POST .../session) or use --drive") from None
            session = await self.call("POST", "/session")
            print(f"started a new session, PIN {session['pin']}", flush=True)
        if not session.get("pin"):
            raise RuntimeError("The server shows the PIN only to the host's own machine: pass --pin")
        return session["pin"]

    async def start_screens(self, timeout_s: float = 15.0) -> None:
        self.tasks += [asyncio.ensure_future(screen.run()) for screen in self.screens]
        await wait_until(lambda: all(screen.ready.is_set() for screen in self.screens), timeout_s)

    def start_bots(self) -> None:
        """Seat the bots, with the PIN found by now."""
        for bot in self.bots:
            bot.pin = self.pin
        self.tasks += [asyncio.ensure_future(bot.run()) for bot in self.bots]

    def joined(self) -> bool:
        return all(bot.registered_at is not None or bot.refused for bot in self.bots)

    def answered(self, round_index: int) -> bool:
        return all(bot.settled(round_index) for bot in self.bots)

    def voted(self, round_id: str) -> bool:
        return all(voter.settled(round_id) for voter in self.voters)

    def seen(self, tokens: int) -> bool:
        """Every arena screen here has seen `tokens` tokens since the measures were last taken."""
        return all(self.measures.seen.get(s.number, 0) >= tokens for s in self.screens if s.view == "arena")

    def refusals(self) -> dict[str, int]:
        """Why bots are out of the game (a refusal's code, or UNREACHABLE), each with how many."""
        out: dict[str, int] = {}
        for bot in self.bots:
            if bot.refused:
                bump(out, bot.refused)
        return out

    def check_bots(self) -> None:
        """Stop when every bot is out of the game: the server is gone, or it refused them all."""
        out = self.refusals()
        if not self.bots or sum(out.values()) < len(self.bots):
            return
        if list(out) == ["UNREACHABLE"]:
            raise NoServer(self.options.url)
        raise RuntimeError(f"every bot was refused: {counts_text(out)}")

    def current_round(self) -> int | None:
        """The latest round a bot was challenged with."""
        return max((bot.answering for bot in self.bots if bot.answering is not None), default=None)

    def finished(self, round_index: int) -> bool:
        """Every bot answered the round and, once voting opened, every voter voted."""
        if not self.answered(round_index):
            return False
        return not self.voters or (round_index in self.round_ids and self.voted(self.round_ids[round_index]))


class Progress:
    """One live line per round: answers, tokens, screens, drops and votes since its first challenge.

    On a terminal the line is redrawn in place; piped, it is printed when the round
    ends. Either way each event that matters (the bots joined, a round started, all
    answered, voting opened, a refusal) gets a line of its own as it happens.
    """

    def __init__(self, sim: Simulation, enabled: bool) -> None:
        self.sim = sim
        self.enabled = enabled
        self.live = sys.stdout.isatty()
        self.joined_said = False
        self.told: set[tuple[int, str]] = set()     # (round, event) already printed
        self.round: int | None = None
        self.ended: set[int] = set()
        self.mark = Measures()
        self.began = self.streamed = time.monotonic()
        self.tokens = 0

    def begin(self, round_index: int) -> None:
        """A bot got a challenge: a new round ends the previous round's line and starts counting."""
        if round_index == self.round or round_index in self.ended:
            return
        self.end()
        t = self.sim.measures
        self.mark = Measures(tokens_sent=t.tokens_sent, drops=t.drops, resumes=t.resumes, votes=t.votes, seen=dict(t.seen))
        self.round, self.began, self.streamed, self.tokens = round_index, time.monotonic(), time.monotonic(), 0
        self.event(f"round {round_index}: challenge received, {len(self.sim.bots)} bots answering")

    def event(self, text: str) -> None:
        """A line of its own, above the live line on a terminal."""
        if self.enabled:
            print(("\r\x1b[K" if self.live else "") + text, flush=True)

    def once(self, round_index: int, what: str, text: str) -> None:
        """An event of a round, printed the first time only."""
        if (round_index, what) not in self.told:
            self.told.add((round_index, what))
            self.event(text)

    def bots_joined(self) -> None:
        """How many bots registered, and why the others were refused."""
        bots, refused = self.sim.bots, counts_text(self.sim.refusals())
        self.event(f"{sum(bot.registered_at is not None for bot in bots)}/{len(bots)} bots registered"
                   + (f"; refused: {refused}" if refused else ""))
        self.joined_said = True

    def wait_for_host(self) -> None:
        self.event("waiting for the host to start a round (admin page or curl; --drive plays the host)")

    def voting_opened(self, round_index: int) -> None:
        voters = len(self.sim.voters)
        self.once(round_index, "voting", f"round {round_index}: voting open" + (f", {voters} voters voting"
                                                                                  if voters else ""))

    def observe(self) -> None:
        """Note when tokens last flowed: the line's rate is over the streaming, not the voting after it."""
        tokens = self.sim.measures.tokens_sent - self.mark.tokens_sent
        if tokens != self.tokens:
            self.tokens, self.streamed = tokens, time.monotonic()

    def line(self) -> str:
        """The current round's progress line."""
        sim, t, m = self.sim, self.sim.measures, self.mark
        self.observe()
        tokens = self.tokens
        arena = [s.number for s in sim.screens if s.view == "arena"]
        shown = min((t.seen.get(n, 0) - m.seen.get(n, 0) for n in arena), default=0)
        screens = f" · screens {shown / tokens:.0%}" if arena and tokens else ""
        answered = sum(bot.settled(self.round) for bot in sim.bots)
        return (f"round {self.round}: {answered}/{len(sim.bots)} answered · {tokens:,} tokens "
                f"({tokens / max(self.streamed - self.began, 1e-3):,.0f}/s){screens} · {t.drops - m.drops} drops "
                f"({t.resumes - m.resumes} resumed) · {t.votes - m.votes} votes")

    def show(self) -> None:
        """Redraw the line in place (on a terminal only)."""
        if self.enabled and self.live and self.round is not None:
            print("\r" + self.line() + "\x1b[K", end="", flush=True)

    def end(self) -> None:
        """Finish the current round's line for good."""
        if self.enabled and self.round is not None:
            print(("\r" if self.live else "") + self.line() + ("\x1b[K" if self.live else ""), flush=True)
        if self.round is not None:
            self.ended.add(self.round)
            self.round = None

    def answered(self, round_index: int) -> None:
        """A bot has answered: say so once every bot has."""
        if self.sim.answered(round_index):
            waiting = "" if self.sim.options.drive else "; waiting for the host to stop the round"
            self.once(round_index, "answered", f"round {round_index}: all {len(self.sim.bots)} bots answered{waiting}")

    async def run(self) -> None:
        """Refresh the line every half second."""
        while True:
            self.observe()
            self.show()
            await asyncio.sleep(0.5)


async def wait_for_bots(sim: Simulation) -> None:
    """Wait for the bots to register (30 s at most), say how many did, and stop if none is left to play."""
    await wait_until(sim.joined, 30)
    sim.progress.bots_joined()
    sim.check_bots()


async def follow_rounds(sim: Simulation) -> None:
    """Answer the rounds the host runs; with --rounds, stop once that many are answered and voted."""
    await wait_for_bots(sim)
    sim.progress.wait_for_host()
    finished: set[int] = set()
    while not sim.options.rounds or len(finished) < sim.options.rounds:
        await asyncio.sleep(WAIT_STEP_S)
        sim.check_bots()
        current = sim.current_round()
        if current is not None and current not in finished and sim.finished(current):
            finished.add(current)
            sim.progress.end()
            if len(finished) != sim.options.rounds:
                sim.progress.wait_for_host()


async def drive_rounds(sim: Simulation) -> None:
    """Play the host too: each round from challenge to closed voting, --rounds times (3 by default)."""
    options = sim.options
    await wait_for_bots(sim)
    for n in range(options.rounds or 3):
        row = await sim.call("POST", "/rounds", {"prompt": PROMPTS[n % len(PROMPTS)], "maxTokens": options.max_tokens,
                                                 "deadlineMs": options.deadline_ms})
        await sim.call("POST", "/rounds/start", {"roundId": row["id"]})
        await wait_until(lambda: sim.answered(row["index"]), options.deadline_ms / 1000 + 10)
        await sim.call("POST", "/rounds/stop", {"roundId": row["id"]})
        votes = len(sim.bots) if not options.votes_per_voter else min(options.votes_per_voter, len(sim.bots))
        await wait_until(lambda: sim.voted(row["id"]), 10 + 2 * votes * options.vote_pace_s)
        await sim.call("POST", f"/rounds/{row['id']}/close-voting")
        sim.progress.end()


async def simulate(options: SimOptions) -> Measures:
    """Play the evening against a running server until --rounds, --duration or Ctrl-C; print a summary."""
    sim = Simulation(options)
    began = time.monotonic()
    async with sim.running():
        await sim.call("GET", "/health")            # no server: say so now, not once the bots give up
        sim.pin = await sim.find_pin()
        await sim.start_screens()
        sim.start_bots()
        sim.tasks.append(asyncio.ensure_future(sim.progress.run()))
        play = drive_rounds if options.drive else follow_rounds
        try:
            await within(play(sim), options.duration_s or None)
        except asyncio.TimeoutError:
            pass                                # --duration is up
        finally:
            sim.progress.end()
            if options.progress:
                print(simulation_summary(sim, time.monotonic() - began), flush=True)
    return sim.measures


def figure_ms(values: list[float], scale: float = 1.0) -> str:
    """The median and 99th percentile of `values` (milliseconds once scaled), or "-" when there are none."""
    if not values:
        return "-"
    return f"p50 {quantile(values, 0.5) * scale:,.1f} ms, p99 {quantile(values, 0.99) * scale:,.1f} ms"


def simulation_summary(sim: Simulation, elapsed_s: float) -> str:
    """What the rehearsal did, for the host: bots, tokens, screens, votes, errors."""
    t = sim.measures
    registered = sum(bot.registered_at is not None for bot in sim.bots)
    refused = sum(bot.refused is not None for bot in sim.bots)
    arena = [s.number for s in sim.screens if s.view == "arena"]
    seen = sorted(t.seen.get(n, 0) for n in arena)
    rounds = len(sim.progress.ended)
    lines = [f"simulate: {rounds} round{'' if rounds == 1 else 's'} in {elapsed_s:.0f} s against {sim.options.url}",
             f"  bots     {registered}/{len(sim.bots)} registered ({figure_ms(t.register_s, 1000)}), {refused} refused",
             f"  tokens   {t.tokens_sent:,} sent, {t.completes} answers completed; {t.drops} drops, "
             f"{t.resumes} resumed, {t.resent} tokens resent"]
    if arena:
        lines.append(f"  screens  {len(arena)} arena screen{'' if len(arena) == 1 else 's'} saw {seen[0]:,}" + (f"-{seen[-1]:,}" if seen[-1] != seen[0]
                     else "") + f" tokens; {sum(t.out_of_order.values())} arrived out of order (resent after a drop)")
    if sim.voters:
        lines.append(f"  votes    {t.votes:,} accepted ({figure_ms(t.vote_ms)}), {t.votes_refused} refused")
    lines.append("  errors   " + (counts_text(t.errors) or "none"))
    lines += [f"  note     {text}" for text in list(sim.notes)[:5]]
    return "\n".join(lines)


# --- bench: the server in its own process, measured under simulated load ------

@dataclass(frozen=True)
class Preset:
    """A room to measure: how many of each actor, and how hard they push."""

    runners: int
    rate: float                         # mean tokens/s of a runner
    screens: int                        # arena screens (telão tabs)
    phones: int                         # voting phones: sockets on the voting view
    voters: int                         # people voting (several may share a phone)
    stream_s: float = 20.0              # how long the measured round streams
    vote_rate: float = 2500.0           # votes/s offered by all voters together
    votes_per_voter: int = 0            # 0: every answer
    saturation_tokens: int = 1000       # tokens per runner in the flat-out round
    stalled_screens: int = 60           # under attack: screens that register and never read
    idle_connections: int = 300         # ... half-sent HTTP requests, all from one address
    register_loops: int = 1             # ... sockets sending telao_register as fast as they are answered
    wrong_pin_addresses: int = 31       # ... addresses registering with wrong PINs


BENCH_PRESETS = {
    "meetup": Preset(runners=60, rate=30, screens=5, phones=30, voters=30, vote_rate=500, saturation_tokens=2000),
    # Offered 10% above the 2,000 votes/s target: a server offered exactly the target can only fall short of it.
    "ten-x": Preset(runners=200, rate=20, screens=3, phones=50, voters=200, vote_rate=2200, votes_per_voter=50),
}
RUNNERS_PER_WORKER = 100
LOAD_NICENESS = 10
ATTACK_SLACK_S = 60.0           # the attackers stop by themselves this long after the round's deadline
HEALTH_PROBE_S = 0.1            # the pause between two of the host's /health calls under attack


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) a process has used, from /proc; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    ticks = stat.rsplit(")", 1)[1].split()          # the command name may hold spaces
    return (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")


def process_wait_s(pid: int) -> float:
    """Seconds a process's threads have waited for a CPU while ready to run (Linux schedstat; 0 elsewhere)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(task.read_text().split()[1])
    return total / 1e9


def process_rss_mb(pid: int) -> float | None:
    """A process's resident memory in MB, from /proc; None elsewhere."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)


def split_cpus(affinity: bool) -> tuple[set[int], set[int]] | None:
    """One CPU for the server, the rest for the load generators; None where that cannot be done."""
    if not affinity or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else None


class BenchServer:
    """The server under test: its own process, a temporary database and a free loopback port."""

    def __init__(self, folder: Path, cpus: set[int] | None) -> None:
        self.folder = folder
        self.cpus = cpus
        self.base = ""

    def __enter__(self) -> BenchServer:
        """Start the server and wait for its "listening on" line."""
        # Only 127.0.0.1 is the host's: bench's attackers come from other loopback addresses, as strangers.
        command = [sys.executable, str(Path(__file__).resolve()), "--host", "127.0.0.1", "--port", "0",
                   "--database-url", str(self.folder / "bench.db"), "--host-addresses", "127.0.0.1/32"]
        self.log = open(self.folder / "server.log", "w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if self.cpus:
            os.sched_setaffinity(self.process.pid, self.cpus)   # before it starts its threads: they inherit
        for line in self.process.stdout:
            if "listening on" in line:
                self.base = f"http://127.0.0.1:{int(line.split('port ')[1].split()[0])}"
                return self
        self.__exit__()
        raise RuntimeError(f"the server did not start:\n{self.log_tail()}")

    def __exit__(self, *exc_info: Any) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.close()

    def log_tail(self) -> str:
        """The end of the server's log (its stderr), to show why it stopped."""
        return (self.folder / "server.log").read_text()[-2000:]

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid) or 0.0

    def rss_mb(self) -> float | None:
        return process_rss_mb(self.process.pid)


# Bench's attackers: strangers on loopback addresses other than the host's 127.0.0.1,
# one /24 per kind of attack (127.0.<net>.<n+1>).
ATTACK_NETS = {"stalled": 1, "idle": 2, "loop": 3, "guess": 4}
STALLED_PER_ADDRESS = 15        # under the server's default WS_CONNECTIONS_PER_ADDRESS (20)
STALLED_RECEIVE_BYTES = 4096    # a stalled screen's receive buffer: the server's writes back up at once
TRICKLE_S = 2.0                 # how often half the idle connections send one more header line
ATTACK_CONNECT_S = 10.0
ANSWER_WAIT_S = 1.0             # a register loop with no snapshot this soon asks again; a refused attacker retries
GUESS_PAUSE_S = 0.05            # a PIN guesser's pause between an answer and its next guess
CLOSED_WITHIN_S = 1.0           # at the end, a connection whose close has not arrived by then is still open
LATE_RUNNER_ADDRESS = "127.0.5.1"   # a participant's laptop joining mid-attack: neither the host nor an attacker
LATE_RUNNER_WAIT_S = 30.0
MESSAGE_TYPE = re.compile(r'\{"type":"(\w+)"')
STALLED_KEY = "dGhlIHNhbXBsZSBub25jZQ=="   # RFC 6455's sample Sec-WebSocket-Key: a server cannot tell it is reused


def attacker_address(kind: str, n: int) -> str:
    return f"127.0.{ATTACK_NETS[kind]}.{n + 1}"


async def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Whether the other end has closed or reset a connection we stopped reading: read (and drop) what it
    sent until its end, for `within_s` at most. A server's close comes after what its kernel still held."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within_s):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:                        # first: it is an OSError too
        return False
    except OSError:
        return True
    return True


class Attackers:
    """Strangers attacking the server at once, from their own loopback addresses (bench's attack phase).

    Stalled screens register and never read; idle connections send half an HTTP
    request and then trickle or stay silent; register loops ask for a screen's
    snapshot as fast as they are answered; guessers register with wrong PINs.
    Each is bounded in connections and in time (`stop`, or `max_s` at the latest).
    What they achieved is counted per kind: connections opened, refused, and
    closed by the server, and the answers they got.
    """

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        parts = urllib.parse.urlsplit(sim.options.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.until = 0.0
        self.counts: dict[str, int] = {}
        self.sockets: dict[str, list[socket.socket]] = {"stalled": [], "idle": []}
        self.tasks: list[asyncio.Task] = []

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def left_s(self) -> float:
        return max(0.0, self.until - time.monotonic())

    async def start(self, max_s: float) -> None:
        """Open the stalled screens and the idle connections, then set the loops going."""
        o, self.until = self.sim.options, time.monotonic() + max_s
        await asyncio.gather(*(self.stall(attacker_address("stalled", i // STALLED_PER_ADDRESS))
                               for i in range(o.stalled_screens)),
                             *(self.idle(attacker_address("idle", 0)) for _ in range(o.idle_connections)))
        self.tasks = [asyncio.ensure_future(self.trickle())]
        self.tasks += [asyncio.ensure_future(self.from_address("loop", attacker_address("loop", i), self.ask_snapshots))
                       for i in range(o.register_loops)]
        self.tasks += [asyncio.ensure_future(self.from_address("guess", attacker_address("guess", i), self.guess_pins))
                       for i in range(o.wrong_pin_addresses)]
        self.sim.tasks += self.tasks            # cancelled with the simulation if bench ends early

    async def stop(self) -> dict[str, int]:
        """End every attack; count the connections the server closed meanwhile, close the rest; return the counts."""
        self.until = 0.0
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for kind, socks in self.sockets.items():
            closed = await asyncio.gather(*(closed_by_peer(sock, CLOSED_WITHIN_S) for sock in socks))
            self.count(f"{kind}_closed", sum(closed))
            for sock in socks:
                sock.close()
        return self.counts

    async def connect(self, address: str, receive_bytes: int = 0) -> socket.socket:
        """A TCP connection to the server from `address`, with a small receive buffer if asked."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if receive_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_bytes)   # before the handshake
            sock.bind((address, 0))
            await within(asyncio.get_running_loop().sock_connect(sock, (self.host, self.port)), ATTACK_CONNECT_S)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stall(self, address: str) -> None:
        """A screen that registers and then never reads again."""
        loop = asyncio.get_running_loop()
        try:
            sock = await self.connect(address, STALLED_RECEIVE_BYTES)
        except (OSError, asyncio.TimeoutError):
            self.count("stalled_refused")
            return
        try:
            await loop.sock_sendall(sock, (f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                                           f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                           f"Sec-WebSocket-Key: {STALLED_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                                           ).encode())
            head = await within(loop.sock_recv(sock, 4096), ATTACK_CONNECT_S)
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionRefusedError(head[:40])
            await loop.sock_sendall(sock, text_frame(dumps({"type": "telao_register"}).encode(), masked=True))
        except (OSError, asyncio.TimeoutError):
            sock.close()
            self.count("stalled_refused")
            return
        self.sockets["stalled"].append(sock)
        self.count("stalled_opened")

    async def idle(self, address: str) -> None:
        """A connection that starts an HTTP request and never finishes it (slowloris)."""
        try:
            sock = await self.connect(address)
            await asyncio.get_running_loop().sock_sendall(
                sock, f"GET /health HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n".encode())
        except (OSError, asyncio.TimeoutError):
            self.count("idle_refused")
            return
        self.sockets["idle"].append(sock)
        self.count("idle_opened")

    async def trickle(self) -> None:
        """Every other idle connection sends one more header line now and then; the rest stay silent."""
        while self.left_s():
            await asyncio.sleep(min(TRICKLE_S, self.left_s()))
            for sock in self.sockets["idle"][::2]:
                with contextlib.suppress(OSError):
                    sock.send(b"X-Trickle: 1\r\n")

    async def from_address(self, kind: str, address: str,
                           talk: Callable[[Any, random.Random], Awaitable[None]]) -> None:
        """Keep a WebSocket open from `address` until the attack ends, `talk`ing on it; if it is refused or
        closed, try again a moment later."""
        rng = random.Random(address)
        async with ClientSession(connector=TCPConnector(local_addr=(address, 0)),
                                 timeout=ClientTimeout(total=ATTACK_CONNECT_S)) as http:
            while self.left_s():
                opened = False
                with contextlib.suppress(OSError, asyncio.TimeoutError, ClientConnectionError, WSServerHandshakeError):
                    async with http.ws_connect(self.sim.ws_url, compress=0, max_msg_size=0) as ws:
                        opened = True
                        self.count(f"{kind}_opened")
                        await talk(ws, rng)
                if self.left_s():
                    self.count(f"{kind}_closed" if opened else f"{kind}_refused")
                    await asyncio.sleep(min(ANSWER_WAIT_S, self.left_s()))

    async def ask_snapshots(self, ws: Any, rng: random.Random) -> None:
        """telao_register, with no PIN, again as soon as the last one is answered."""
        while self.left_s() and not ws.closed:
            await ws.send_str(dumps({"type": "telao_register"}))
            self.count("loop_sent")
            answer = await self.answer(ws, "loop", ("state_snapshot", "error"), ANSWER_WAIT_S)
            if answer is None:
                return
            self.count(f"loop_{answer}")

    async def guess_pins(self, ws: Any, rng: random.Random) -> None:
        """Register with a wrong PIN, again after each answer (a guess the server sits on is waited for)."""
        pin = self.sim.pin
        while self.left_s() and not ws.closed:
            guess = pin
            while guess == pin:
                guess = "".join(rng.choice("0123456789") for _ in pin)
            await ws.send_str(register_message(f"guesser-{rng.randrange(10**6)}", guess))
            self.count("guess_sent")
            answer = await self.answer(ws, "guess", ("registered", "error"), self.left_s())
            if answer is None:
                return
            self.count(f"guess_{answer}")
            await asyncio.sleep(GUESS_PAUSE_S)

    async def answer(self, ws: Any, kind: str, wanted: tuple[str, ...], wait_s: float) -> str | None:
        """The next message of a `wanted` type (an error's code for an error), or "unanswered" after `wait_s`
        (or at the attack's end); None once the socket is closed. Everything read is counted in bytes."""
        try:
            async with asyncio.timeout(min(wait_s, self.left_s())):
                async for message in ws:
                    if message.type is not WSMsgType.TEXT:
                        continue
                    self.count(f"{kind}_bytes", len(message.data))
                    match = MESSAGE_TYPE.match(message.data)
                    if match and match[1] in wanted:
                        return json.loads(message.data).get("code", "error") if match[1] == "error" else match[1]
        except asyncio.TimeoutError:
            return "unanswered"
        return None


def bench_worker(conn: Any, options: SimOptions, cpus: set[int] | None) -> None:
    """A load-generator process: plays its slice of the evening on bench's orders."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    if not options.screens and hasattr(os, "nice"):
        os.nice(LOAD_NICENESS)          # the screens time the tokens: they go first on a shared CPU
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(obey(conn, options))


async def obey(conn: Any, options: SimOptions) -> None:
    """Start the screens, then carry out orders until "stop"; each reply is the measures since the last."""
    sim = Simulation(options)
    sim.voting_rounds = set()
    attackers = Attackers(sim)
    gc.disable()                        # a collector pause here would count as the server's latency
    async with sim.running():
        await sim.start_screens()
        reply = None
        while True:
            # Collect between phases, before answering: bench starts the next phase
            # (a challenge, a token's clock) only once every worker has answered.
            gc.collect()
            conn.send(reply)
            order, args, timeout_s = await asyncio.to_thread(conn.recv)
            if order == "stop":
                return
            if order == "join":
                sim.start_bots()
                await wait_until(sim.joined, timeout_s)
            elif order == "rate":
                sim.options.rate = args[0]
            elif order == "vote_in":
                sim.voting_rounds.add(args[0])
            elif order in ("answered", "voted", "seen"):
                await wait_until(lambda: getattr(sim, order)(*args), timeout_s)
            elif order == "attack":
                await attackers.start(*args)
            elif order == "calm":
                sim.measures.attack = await attackers.stop()
            elif order != "measures":           # which only asks for the reply every order gets
                raise ValueError(f"bench gave an unknown order: {order!r}")
            reply = vars(sim.take_measures())


class Workers:
    """The load-generator processes, each taking orders over its own pipe."""

    def __init__(self, slices: list[tuple[str, SimOptions]], cpus: set[int] | None) -> None:
        context = multiprocessing.get_context("spawn")     # a fresh interpreter: no inherited loop or threads
        self.pipes: list[tuple[str, Any]] = []
        self.processes = []
        for role, options in slices:
            ours, theirs = context.Pipe()
            process = context.Process(target=bench_worker, args=(theirs, options, cpus), daemon=True)
            process.start()
            self.pipes.append((role, ours))
            self.processes.append(process)

    @staticmethod
    def reply(conn: Any, timeout_s: float) -> Any:
        """One worker's answer, or an error if it went silent or died."""
        try:
            if conn.poll(timeout_s):
                return conn.recv()
        except EOFError:
            pass
        raise RuntimeError("a load generator stopped answering (its traceback, if any, is above)")

    async def ready(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(self.reply, conn, 60) for _, conn in self.pipes))

    async def order(self, role: str | None, order: str, *args: Any, timeout_s: float = 30) -> Measures:
        """Give an order to every worker of `role` (None: all) and add up their measures."""
        pipes = [conn for r, conn in self.pipes if role in (None, r)]
        for conn in pipes:
            conn.send((order, args, timeout_s))
        total = Measures()
        for reply in await asyncio.gather(*(asyncio.to_thread(self.reply, conn, timeout_s + 30) for conn in pipes)):
            total.add(Measures(**reply))
        return total

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each role's processes."""
        used: dict[str, float] = {}
        for (role, _), process in zip(self.pipes, self.processes):
            used[role] = used.get(role, 0.0) + (process_cpu_s(process.pid) or 0.0)
        return used

    def close(self) -> None:
        """Tell every worker to stop, and make sure it does."""
        for _, conn in self.pipes:
            with contextlib.suppress(OSError):
                conn.send(("stop", (), 0))
        deadline = time.monotonic() + 10        # for all: a worker busy with an order reads "stop" only after it
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()


def worker_slices(preset: Preset, base: str, pin: str, attack: bool) -> list[tuple[str, SimOptions]]:
    """The load split into processes: runners by the hundred, the arena screens, the phones and voters,
    and the attackers."""
    common = {"url": base, "pin": pin, "prefix": "bench", "fill": True, "stamp": True, "rate": preset.rate,
              "screens": 0, "bots": 0, "all_voters": preset.voters, "vote_rate": preset.vote_rate,
              "votes_per_voter": preset.votes_per_voter, "progress": False}
    slices = [("runners", SimOptions(**{**common, "bots": min(RUNNERS_PER_WORKER, preset.runners - first),
                                        "first_bot": first}))
              for first in range(0, preset.runners, RUNNERS_PER_WORKER)]
    slices.append(("screens", SimOptions(**{**common, "screens": preset.screens})))
    slices.append(("phones", SimOptions(**{**common, "phones": max(preset.phones, 1 if preset.voters else 0),
                                           "voters": preset.voters})))
    if attack:
        slices.append(("attackers", SimOptions(**{**common, **{name: getattr(preset, name) for name in (
            "stalled_screens", "idle_connections", "register_loops", "wrong_pin_addresses")}})))
    return slices


def spread(values_ms: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of some milliseconds, rounded for the report."""
    pick = {"p50": quantile(values_ms, 0.5), "p99": quantile(values_ms, 0.99),
            "max": max(values_ms) if values_ms else None}
    return {key: None if value is None else round(value, 2) for key, value in pick.items()}


class Meter:
    """CPU used by the server and by the load generators over a phase, as shares of one CPU.

    `server_wait_share` is the time the server's threads were ready but not
    running: other processes on its CPU (or its own two threads on one CPU).
    """

    def __init__(self, server: BenchServer, workers: Workers) -> None:
        self.server, self.workers = server, workers
        self.began, self.server_s, self.load_s = time.monotonic(), server.cpu_s(), workers.cpu_s()
        self.wait_s = process_wait_s(server.process.pid)

    def read(self) -> dict[str, float]:
        """The shares of CPU used and waited for since the meter started."""
        wall_s = time.monotonic() - self.began
        server_s = self.server.cpu_s() - self.server_s
        load = {role: round((used - self.load_s[role]) / wall_s, 2) for role, used in self.workers.cpu_s().items()}
        return {"server_cpu_s": round(server_s, 3), "server_cpu_share": round(server_s / wall_s, 2),
                "server_wait_share": round((process_wait_s(self.server.process.pid) - self.wait_s) / wall_s, 2),
                "load_cpu_share": round(sum(load.values()), 2), "load_cpu_by_role": load}


class Bench:
    """One bench run: the server, its load generators, the host's HTTP calls, and memory watch."""

    def __init__(self, preset: Preset, server: BenchServer, workers: Workers, host: Simulation) -> None:
        self.preset = preset
        self.server = server
        self.workers = workers
        self.host = host
        self.rss_max_mb = 0.0

    async def watch_memory(self) -> None:
        """Track the server's peak RSS."""
        while True:
            self.rss_max_mb = max(self.rss_max_mb, self.server.rss_mb() or 0.0)
            await asyncio.sleep(0.5)

    async def join(self) -> dict[str, Any]:
        """Every runner connects and registers at once."""
        meter, began = Meter(self.server, self.workers), time.monotonic()
        t = await self.workers.order("runners", "join", timeout_s=60)
        return {"runners": self.preset.runners, "registered": len(t.registered_at),
                "wall_s": round(max(t.registered_at) - began, 3) if t.registered_at else None,
                "p50_s": quantile(t.register_s, 0.5), "p99_s": quantile(t.register_s, 0.99),
                "max_s": max(t.register_s, default=None), **meter.read(), "errors": t.errors}

    async def stream(self, rate: float, max_tokens: int, deadline_ms: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """One round streamed at `rate` tokens/s per runner (0: flat out); return its figures and row."""
        await self.workers.order(None, "rate", rate)        # every order also clears the measures
        row = await self.host.call("POST", "/rounds", {"prompt": "bench", "maxTokens": max_tokens,
                                                       "deadlineMs": deadline_ms})
        meter, began = Meter(self.server, self.workers), time.monotonic()
        await self.host.call("POST", "/rounds/start", {"roundId": row["id"]})
        runners = await self.workers.order("runners", "answered", row["index"], timeout_s=deadline_ms / 1000 + 60)
        screens = await self.workers.order("screens", "seen", runners.tokens_sent, timeout_s=30)
        cpu = meter.read()
        phones = await self.workers.order("phones", "measures")
        sent = runners.tokens_sent
        span_s = max(screens.seen_at.values(), default=began) - min(runners.sent_at, default=began)
        return {"tokens": sent, "tokens_per_s": round(sent / span_s) if span_s > 0 else None,
                "fanout_ms": spread([(t - began) * 1000 for t in runners.challenged_at]),
                "latency_ms": spread(screens.latency_ms),
                "lost": [sent - screens.seen.get(n, 0) for n in range(self.preset.screens)],
                "reordered": [screens.out_of_order.get(n, 0) for n in range(self.preset.screens)],
                "phone_token_updates": phones.seen.get(-1, 0), **cpu,
                "cpu_s_per_1000_tokens": round(cpu["server_cpu_s"] / sent * 1000, 4) if sent else None,
                "errors": runners.errors}, row

    async def votes(self, row: dict[str, Any]) -> dict[str, Any]:
        """Stop the round; the phones see voting open and their voters vote; check the tallies."""
        await self.workers.order(None, "vote_in", row["id"])
        await self.host.call("POST", "/rounds/stop", {"roundId": row["id"]})
        opened, meter = time.monotonic(), Meter(self.server, self.workers)
        answers = len((await self.host.call("GET", f"/rounds/{row['id']}/responses"))["responses"])
        expected = self.preset.voters * min(answers, self.preset.votes_per_voter or answers)
        t = await self.workers.order("phones", "voted", row["id"],
                                     timeout_s=expected / self.preset.vote_rate + 60)
        cpu = meter.read()
        board = await self.host.call("GET", f"/scoreboard?roundId={row['id']}")
        await self.host.call("POST", f"/rounds/{row['id']}/close-voting")
        counted = {r["participant_id"]: [r["votes"], r["total_score"]] for r in board["scoreboard"] if r["votes"]}
        first_due = min((done - ms / 1000 for done, ms in zip(t.voted_at, t.vote_ms)), default=opened)
        span_s = max(t.voted_at, default=opened) - first_due
        return {"votes": t.votes, "expected": expected, "offered_per_s": self.preset.vote_rate,
                "per_s": round(t.votes / span_s) if span_s > 0 else None, "latency_ms": spread(t.vote_ms),
                "answers_fetch_ms": spread(t.fetch_ms),
                "refused": t.votes_refused, "tallies_exact": t.votes == expected and counted == t.scores, **cpu}

    async def finish(self, row: dict[str, Any]) -> None:
        """Stop a round nobody votes on."""
        await self.host.call("POST", "/rounds/stop", {"roundId": row["id"]})
        await self.host.call("POST", f"/rounds/{row['id']}/close-voting")

    async def under_attack(self) -> dict[str, Any]:
        """A streamed round while strangers attack the server; the honest screens' figures and /health's time."""
        pin = (await self.host.call("GET", "/session"))["pin"]
        await self.workers.order("attackers", "attack", self.preset.stream_s + ATTACK_SLACK_S, timeout_s=60)
        health_ms: list[float | None] = []
        probe = asyncio.ensure_future(self.probe_health(health_ms))
        late = asyncio.ensure_future(self.late_runner(pin, self.preset.stream_s / 2))
        try:
            figures, row = await self.stream(self.preset.rate, 10**6, round(self.preset.stream_s * 1000))
            late_runner = await late
        finally:
            probe.cancel()
            late.cancel()
        attackers = await self.workers.order("attackers", "calm", timeout_s=60)
        await self.finish(row)
        answered = [ms for ms in health_ms if ms is not None]
        return {**figures, "health_ms": spread(answered), "health_calls": len(health_ms),
                "health_failed": len(health_ms) - len(answered), "late_runner": late_runner,
                "attackers": attackers.attack}

    async def late_runner(self, pin: str, after_s: float) -> dict[str, Any]:
        """A runner joining mid-attack with the right PIN from its own address: the answer it got, and when."""
        await asyncio.sleep(after_s)
        began, answer = time.monotonic(), "closed"
        try:
            async with asyncio.timeout(LATE_RUNNER_WAIT_S), \
                    ClientSession(connector=TCPConnector(local_addr=(LATE_RUNNER_ADDRESS, 0))) as http, \
                    http.ws_connect(websocket_url(self.server.base)) as ws:
                await ws.send_str(register_message("bench-late", pin))
                async for message in ws:
                    m = json.loads(message.data) if message.type is WSMsgType.TEXT else {}
                    if m.get("type") in ("registered", "error"):
                        answer = m.get("code", m["type"])
                        break
        except (OSError, asyncio.TimeoutError, ClientConnectionError, WSServerHandshakeError) as exc:
            answer = type(exc).__name__
        return {"answer": answer, "after_s": round(time.monotonic() - began, 3)}

    async def probe_health(self, times_ms: list[float | None]) -> None:
        """The host's GET /health again and again: each call's time, or None when it failed."""
        while True:
            began = time.monotonic()
            try:
                await self.host.call("GET", "/health")
                times_ms.append((time.monotonic() - began) * 1000)
            except (OSError, asyncio.TimeoutError, ClientConnectionError, RuntimeError):
                times_ms.append(None)
            await asyncio.sleep(HEALTH_PROBE_S)

    async def soak(self, minutes: float, figures: dict[str, Any]) -> None:
        """Meetup rounds back to back for `minutes`, sampling the server's memory after each; the figures
        (`figures["soak"]`) and a progress line are brought up to date after every round."""
        began = time.monotonic()
        k = figures["soak"] = {"minutes": minutes, "rounds": 0, "rss_mb": [[0.0, self.server.rss_mb()]],
                               "lost_or_reordered": 0, "worst_latency_p99_ms": 0.0, "tallies_exact": True}
        while time.monotonic() - began < minutes * 60:
            stream, row = await self.stream(self.preset.rate, 10**6, round(self.preset.stream_s * 1000))
            votes = await self.votes(row)
            k["rounds"] += 1
            k["lost_or_reordered"] += sum(stream["lost"]) + sum(stream["reordered"])
            k["worst_latency_p99_ms"] = max(k["worst_latency_p99_ms"], stream["latency_ms"]["p99"] or 0.0)
            k["tallies_exact"] = k["tallies_exact"] and votes["tallies_exact"]
            k["rss_mb"].append([round((time.monotonic() - began) / 60, 2), self.server.rss_mb()])
            bench_says(f"    soak round {k['rounds']} at {k['rss_mb'][-1][0]:g} min: RSS {k['rss_mb'][-1][1] or 0:.1f} MB, "
                f"lost or reordered {k['lost_or_reordered']}, tallies {'exact' if k['tallies_exact'] else 'WRONG'}")


def bench_says(text: str) -> None:
    """One of bench's progress lines, on stderr: stdout holds the table and the JSON line alone."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def bench(preset: Preset, saturation: bool = True, soak_minutes: float = 0.0, affinity: bool = True,
                attack: bool = True, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start a server on loopback, measure it under `preset`, stop it; return the figures.

    `figures` fills up as the phases end, so a run stopped midway keeps what it
    measured; meanwhile its "running" key names the phase under way.
    """
    cpus = split_cpus(affinity)
    figures = {} if figures is None else figures
    figures.update({"running": "start-up", "preset": vars(preset).copy(), "machine": {
        "cpus": os.cpu_count(), "server_cpus": sorted(cpus[0]) if cpus else None,
        "load_generator_cpus": sorted(cpus[1]) if cpus else None, "python": sys.version.split()[0],
        "load_before": [round(x, 2) for x in os.getloadavg()]}})
    bench_says("starting a server on a temporary database and a free loopback port")
    try:
        with tempfile.TemporaryDirectory(prefix="gambiarra-bench-") as folder, \
                BenchServer(Path(folder), cpus[0] if cpus else None) as server:
            host = Simulation(SimOptions(url=server.base, bots=0, screens=0, progress=False))
            async with host.running():
                figures["rss_mb"] = {"before": server.rss_mb()}
                pin = (await host.call("POST", "/session"))["pin"]
                slices = worker_slices(preset, server.base, pin, attack)
                figures["machine"]["load_generator_processes"] = len(slices)
                bench_says(f"server at {server.base} on CPU {figures['machine']['server_cpus'] or 'any'}; starting "
                    f"{len(slices)} load-generator processes on CPU {figures['machine']['load_generator_cpus'] or 'any'}")
                workers = Workers(slices, cpus[1] if cpus else None)
                run = Bench(preset, server, workers, host)
                watch = asyncio.ensure_future(run.watch_memory())
                try:
                    await workers.ready()
                    await run_phases(run, figures, saturation, soak_minutes, attack)
                except NoServer:
                    raise RuntimeError(f"its server stopped answering; its log ends:\n{server.log_tail()}") from None
                finally:
                    watch.cancel()
                    workers.close()
                figures["rss_mb"].update(after=server.rss_mb(), max=round(run.rss_max_mb, 1))
    finally:
        figures["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures


class PhaseLog:
    """bench's progress: a line as each phase starts, and its figures as it ends."""

    def __init__(self, figures: dict[str, Any], phases: int) -> None:
        self.figures = figures
        self.phases = phases
        self.number = 0

    @contextlib.contextmanager
    def phase(self, name: str, plan: str, key: str | None = None) -> Any:
        """Say what the phase does; when it ends, how long it took and, if `key` names its figures, their rows."""
        self.number += 1
        step, began = f"[{self.number}/{self.phases}] {name}", time.monotonic()
        self.figures["running"] = name
        bench_says(f"{step}: {plan}")
        yield
        del self.figures["running"]
        bench_says(f"{step}: done in {time.monotonic() - began:.0f} s")
        for figure, text, *_ in phase_rows(self.figures, key) if key else []:
            bench_says(f"    {figure}: {text}")


async def run_phases(run: Bench, figures: dict[str, Any], saturation: bool, soak_minutes: float,
                     attack: bool) -> None:
    """The preset's evening (join, a streamed round, its votes), then the flat-out round, the round under
    attack, and the soak."""
    p = run.preset
    log = PhaseLog(figures, 3 + saturation + attack + bool(soak_minutes))
    with log.phase("join burst", f"{p.runners} runners connect and register at once", "join"):
        figures["join"] = await run.join()
    with log.phase("streamed round", f"{p.runners} runners x {p.rate:g} tok/s for {p.stream_s:g} s, "
                                     f"{p.screens} arena screens watching", "stream"):
        figures["stream"], row = await run.stream(p.rate, 10**6, round(p.stream_s * 1000))
    with log.phase("votes", f"{p.voters} voters on {p.phones} phones, {p.vote_rate:g} votes/s offered", "votes"):
        figures["votes"] = await run.votes(row)
        figures["rss_mb"]["preset_max"] = round(run.rss_max_mb, 1)
    if saturation:
        with log.phase("flat out", f"each runner sends {p.saturation_tokens:,} tokens as fast as it can",
                       "saturation"):
            figures["saturation"], row = await run.stream(0, p.saturation_tokens, 600_000)
            await run.finish(row)
            figures["rss_mb"]["saturation_max"] = round(run.rss_max_mb, 1)
    if attack:
        with log.phase("under attack", f"strangers attack while the runners stream for {p.stream_s:g} s", "attack"):
            figures["attack"] = await run.under_attack()
            figures["rss_mb"]["attack_max"] = round(run.rss_max_mb, 1)
    if soak_minutes:
        with log.phase("soak", f"rounds back to back for {soak_minutes:g} min, a line after each"):
            await run.soak(soak_minutes, figures)


def verdict(ok: bool | None) -> str:
    """A figure's verdict against its target: ok, MISSED, or nothing when not judged."""
    return "" if ok is None else "ok" if ok else "MISSED"


def cpu_note(phase: dict[str, Any]) -> str:
    """How busy the server and the load were during a phase: says what limited its figure."""
    return (f"server {phase['server_cpu_share']:.0%} busy, {phase['server_wait_share']:.0%} waiting; "
            f"load {phase['load_cpu_share']:.0%}")


Row = tuple[str, str, str, bool | None, str]       # figure, measured, target, met?, CPU during it
PHASES = ("join", "stream", "votes", "saturation", "attack")   # bench's figures, in the table's order


def report_rows(f: dict[str, Any]) -> list[Row]:
    """Each row of bench's table, for the phases measured (all, unless the run was interrupted)."""
    rows = [row for phase in PHASES if phase in f for row in phase_rows(f, phase)]
    if "stream" in f:
        rows.append(("server CPU", f"{f['stream']['cpu_s_per_1000_tokens']} s per 1,000 tokens streaming" +
                     (f", {f['saturation']['cpu_s_per_1000_tokens']} s flat out" if "saturation" in f else ""),
                     "", None, ""))
    return rows


def phase_rows(f: dict[str, Any], phase: str) -> list[Row]:
    """The rows of one phase's figures."""
    rss = f["rss_mb"]
    if phase == "join":
        j = f["join"]
        return [("join burst", f"{j['registered']}/{j['runners']}, each within {j['max_s']:.3f} s of connecting "
                               f"(p50 {j['p50_s']:.3f} s); the last {j['wall_s']} s after the first",
                 "each < 0.5 s", j["registered"] == j["runners"] and j["max_s"] < 0.5, cpu_note(j))]
    if phase == "stream":
        s = f["stream"]
        return [("challenge fan-out", f"p50 {s['fanout_ms']['p50']} ms, p99 {s['fanout_ms']['p99']} ms", "", None, ""),
                ("token -> screen", f"p50 {s['latency_ms']['p50']} ms, p99 {s['latency_ms']['p99']} ms, max "
                                    f"{s['latency_ms']['max']} ms at {s['tokens_per_s']:,} tok/s", "p99 < 20 ms",
                 s["latency_ms"]["p99"] is not None and s["latency_ms"]["p99"] < 20, cpu_note(s)),
                ("lost / reordered", f"{s['lost']} / {s['reordered']}; phones got {s['phone_token_updates']} tokens",
                 "0 / 0", not any(s["lost"] + s["reordered"]), "")]
    if phase == "votes":
        v = f["votes"]
        return [("votes", f"{v['votes']:,} at {v['per_s']:,}/s (offered {v['offered_per_s']:,.0f}), p50 "
                          f"{v['latency_ms']['p50']} ms, p99 {v['latency_ms']['p99']} ms, tallies "
                          f"{'exact' if v['tallies_exact'] else 'WRONG'}", ">= 2,000/s, p99 < 100 ms",
                 (v["per_s"] or 0) >= 2000 and (v["latency_ms"]["p99"] or 1e9) < 100 and v["tallies_exact"],
                 cpu_note(v)),
                ("server RSS", f"{rss['before']:.1f} MB idle, max {rss['preset_max']} MB", "< 100 MB",
                 rss["preset_max"] < 100, "")]
    if phase == "saturation":
        t = f["saturation"]
        return [("flat out", f"{t['tokens_per_s']:,} tok/s to {len(t['lost'])} screens, lost {t['lost']}, "
                             f"reordered {t['reordered']}; RSS max {rss['saturation_max']} MB",
                 ">= 20,000 tok/s, 0 lost", (t["tokens_per_s"] or 0) >= 20_000 and not any(t["lost"] + t["reordered"]),
                 cpu_note(t))]
    return attack_rows(f["attack"], rss["attack_max"])


ATTACK_KINDS = {"stalled": "stalled screens", "idle": "idle connections", "loop": "telao_register loop",
                "guess": "wrong PINs"}


def attack_rows(a: dict[str, Any], rss_max_mb: float) -> list[Row]:
    """The round under attack: the honest screens' latency and losses, /health's time, each attacker's haul."""
    latency, health, late = a["latency_ms"], a["health_ms"], a["late_runner"]
    rows = [("under attack", f"token -> screen p50 {latency['p50']} ms, p99 {latency['p99']} ms, max "
                             f"{latency['max']} ms at {a['tokens_per_s'] or 0:,} tok/s; lost {a['lost']}, reordered "
                             f"{a['reordered']}; RSS max {rss_max_mb} MB", "p99 < 50 ms, 0 lost",
             latency["p99"] is not None and latency["p99"] < 50 and not any(a["lost"] + a["reordered"]),
             f"{cpu_note(a)} (attackers {a['load_cpu_by_role'].get('attackers', 0):.0%})"),
            ("/health under attack", f"p50 {health['p50']} ms, p99 {health['p99']} ms, max {health['max']} ms over "
                                     f"{a['health_calls']} calls, {a['health_failed']} failed", "", None, ""),
            ("late runner", f"{late['answer']} {late['after_s']} s after connecting (right PIN, from "
                            f"{LATE_RUNNER_ADDRESS}, mid-attack)", "registered", late["answer"] == "registered", "")]
    return rows + [(f"  {name}", attack_outcome(a["attackers"], kind), "", None, "")
                   for kind, name in ATTACK_KINDS.items()]


def attack_outcome(counts: dict[str, int], kind: str) -> str:
    """What one kind of attacker achieved: connections opened, refused and closed by the server; answers; bytes."""
    mine = {key.removeprefix(f"{kind}_"): n for key, n in counts.items() if key.startswith(f"{kind}_")}
    text = (f"{mine.pop('opened', 0):,} opened, {mine.pop('refused', 0):,} refused, {mine.pop('closed', 0):,} closed "
            "by the server")
    read_bytes, sent = mine.pop("bytes", 0), mine.pop("sent", None)
    if sent is not None:
        text += f"; {sent:,} sent"
    if mine:
        text += "; answers: " + ", ".join(f"{n:,} {answer}" for answer, n in sorted(mine.items()))
    return text + (f"; {read_bytes / 1e6:,.2f} MB read" if read_bytes else "")


def bench_report(f: dict[str, Any]) -> str:
    """The figures as a table, with the CPU each was measured under and, for ten-x, the targets and whether
    each was met. A run stopped midway shows the phases it finished."""
    p, m = f["preset"], f["machine"]
    judged = {k: v for k, v in p.items() if k != "name"} == vars(BENCH_PRESETS["ten-x"])
    rows = [(name, text, target, verdict(ok), cpu) if judged else (name, text, cpu)    # the targets are ten-x's
            for name, text, target, ok, cpu in report_rows(f)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] if rows else []
    lines = [f"bench: {p['runners']} runners x {p['rate']:g} tok/s, {p['screens']} arena screens, {p['phones']} voting "
             f"phones, {p['voters']} voters",
             f"server on CPU {m['server_cpus']}, {m.get('load_generator_processes', 0)} load-generator processes on "
             f"CPU {m['load_generator_cpus']}; load average {m['load_before'][0]} before, {m['load_after'][0]} after"]
    if "stopped_during" in f:
        lines.append(f"STOPPED during {f['stopped_during']}: the figures of the phases before it")
    if not judged:
        lines.append("(no targets: they are judged for the unmodified ten-x preset only)")
    lines += [""] + ["  ".join([*(f"{cell:{width}}" for cell, width in zip(row, widths)), row[-1]]).rstrip()
                     for row in rows]
    if "soak" in f:
        k = f["soak"]
        lines += ["", f"soak: {k['rounds']} rounds in {k['minutes']:g} min; lost or reordered {k['lost_or_reordered']}; "
                      f"worst p99 {k['worst_latency_p99_ms']} ms; tallies {'exact' if k['tallies_exact'] else 'WRONG'}",
                  "  RSS (minute: MB)  " + "  ".join(f"{t:g}: {mb:.1f}" for t, mb in k["rss_mb"])]
    return "\n".join(lines)


def simulate_command(argv: list[str]) -> None:
    """`simulate`: fake runners, screens and phones against a running server."""
    parser = command_parser(
        "simulate", "Rehearse the evening: bots that register and stream answers, arena screens, and phones that "
                    "vote, against a running server. The host runs the rounds (curl, admin page) unless --drive is "
                    "given. Stops after --rounds, --duration or Ctrl-C.")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the server (default: %(default)s)")
    parser.add_argument("--pin", help="the session PIN (default: the active session's, read from the server)")
    parser.add_argument("--admin-token", default="", help="for --drive against another machine's server")
    parser.add_argument("--bots", type=int, default=10, help="runners (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="mean tokens/s of a bot; some crawl at 0.4x, some fly at 1.6x; 0: as fast as they can "
                             "(default: %(default)s)")
    parser.add_argument("--drop", type=float, default=0.0,
                        help="chance that a bot drops mid-answer and comes back (default: %(default)s)")
    parser.add_argument("--screens", type=int, default=1, help="arena screens (default: %(default)s)")
    parser.add_argument("--voters", type=int, default=0, help="phones that vote when voting opens (default: 0)")
    parser.add_argument("--vote-pace", type=float, default=0.6, help="seconds a voter takes per vote (default: 0.6)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (default: 3 with "
                                                              "--drive, else no limit)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: none)")
    parser.add_argument("--drive", action="store_true", help="also play the host: create, start and stop rounds, "
                                                             "close voting (and start a session if none is active)")
    parser.add_argument("--max-tokens", type=int, default=150, help="with --drive: each round's budget "
                                                                     "(default: %(default)s)")
    parser.add_argument("--deadline-ms", type=int, default=60_000, help="with --drive: each round's deadline "
                                                                       "(default: %(default)s)")
    parser.add_argument("--prefix", default="sim", help="participant ids are PREFIX-000, PREFIX-001, ...")
    parser.add_argument("--seed", type=int, default=1, help="same seed, same bots (default: %(default)s)")
    a = parser.parse_args(argv)
    options = SimOptions(url=a.url, pin=a.pin, admin_token=a.admin_token, bots=a.bots, rate=a.rate, drop=a.drop,
                         screens=a.screens, phones=a.voters, voters=a.voters, all_voters=a.voters, rounds=a.rounds,
                         duration_s=a.duration, drive=a.drive, max_tokens=a.max_tokens, deadline_ms=a.deadline_ms,
                         vote_pace_s=a.vote_pace, prefix=a.prefix, seed=a.seed)
    try:
        asyncio.run(simulate(options))
    except KeyboardInterrupt:
        pass                                    # the summary is printed already
    except (RuntimeError, OSError, ValueError) as exc:
        raise SystemExit(f"simulate: {exc}") from None


def bench_command(argv: list[str]) -> None:
    """`bench`: measure a fresh server on loopback under a preset load; print a table and a JSON line."""
    parser = command_parser(
        "bench", "Start a server on a temporary database and a free loopback port, drive it with simulated runners, "
                 "screens and phones from other processes, and measure it. With two or more CPUs the server gets one "
                 "to itself and the load generators the rest.")
    parser.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="ten-x", help="default: %(default)s")
    for f in fields(Preset):
        parser.add_argument("--" + f.name.replace("_", "-"), type={"int": int, "float": float}[f.type],
                            help="override the preset's value")
    parser.add_argument("--no-saturation", action="store_true", help="skip the flat-out round")
    parser.add_argument("--no-attack", action="store_true", help="skip the round under attack")
    parser.add_argument("--soak", type=float, default=0.0, metavar="MINUTES",
                        help="then run rounds back to back for MINUTES, sampling the server's memory")
    parser.add_argument("--no-affinity", action="store_true", help="do not pin the server and the load to CPUs")
    a = parser.parse_args(argv)
    preset = replace(BENCH_PRESETS[a.preset], **{f.name: getattr(a, f.name) for f in fields(Preset)
                                                 if getattr(a, f.name) is not None})
    if preset.stream_s < 1:
        parser.error("--stream-s must be at least 1: a round's deadline is at least a second")
    if max(preset.wrong_pin_addresses, preset.register_loops, -(-preset.stalled_screens // STALLED_PER_ADDRESS)) > 254:
        parser.error(f"the attackers have 254 addresses of each kind ({STALLED_PER_ADDRESS} stalled screens on each)")
    # TERM stops a run as Ctrl-C does: asyncio cancels it at its next await, never midway through
    # starting a process (a KeyboardInterrupt raised there leaves a half-spawned worker behind).
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    figures: dict[str, Any] = {}
    failure = None
    try:
        asyncio.run(bench(preset, not a.no_saturation, a.soak, not a.no_affinity, not a.no_attack, figures))
    except KeyboardInterrupt:
        failure = "interrupted; its server and load generators are stopped"
    except RuntimeError as exc:
        failure = str(exc)
    if "preset" in figures:                     # what was measured, even when stopped midway
        if failure:
            figures["stopped_during"] = figures.pop("running", "the clean-up after the last phase")
        figures["preset"]["name"] = a.preset
        print(bench_report(figures))
        print(dumps(figures), flush=True)
    if failure:
        raise SystemExit(f"bench: {failure}")


# =============================================================================
# Command line
# =============================================================================

MACOS_OPEN_MAX = 10240


def raise_descriptor_limit() -> int | None:
    """Raise the soft limit on open files (each connection is one) to the hard limit; the limit now.

    None where there is no such limit (Windows, or unlimited).
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):       # macOS: the hard limit says unlimited, but OPEN_MAX is the most
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, MACOS_OPEN_MAX), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


# The pages a browser opens here, and who opens each, as the banner names them (those the app serves).
PAGE_AUDIENCES = {"arena": "big screen", "voting": "phones", "admin": "host"}     # the pages the banner names
BANNER_NAMES = 160          # characters of participants' names the banner lists before it counts the rest


def admin_token_file(database: Path) -> Path:
    """Where a token the server made is kept from one start to the next: beside the database."""
    return database.resolve().with_name(database.name + ".admin-token")


def kept_admin_token(path: Path) -> str:
    """The admin token an earlier start kept in `path`, or "" if there is none yet."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the admin token kept in {path}: {exc}")


def keep_admin_token(path: Path, token: str) -> None:
    """Write `token` to `path`, readable by this user alone (mode 0600), whole or not at all."""
    draft = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        draft.unlink()                      # made anew, so that no looser mode of an old one stays
    with open(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
        file.write(token + "\n")
    os.replace(draft, path)


def token_origin(given: str, kept: str, token: str, path: Path) -> str:
    """Where the admin token comes from, for the banner; a new one is kept in `path` first."""
    if given:
        return "set by ADMIN_TOKEN"
    if kept:
        return f"kept in {path}"
    try:
        keep_admin_token(path, token)
    except OSError as exc:
        return f"new, and it could not be kept in {path} ({exc.strerror}): another one at the next start"
    return f"new, kept in {path}"


def served_pages(config: Config) -> list[tuple[str, str]]:
    """The pages the banner names, as (path, who opens it); the club's client when CLIENT_DIR holds it."""
    paths = page_paths(config)
    pages = [(paths[name], audience) for name, audience in PAGE_AUDIENCES.items()]
    client = [("/client", "runners in a browser")] if (config.client_dir / "client.html").is_file() else []
    return pages + client


def clip(text: str, most: int) -> str:
    """`text` on one line, at most `most` characters, escaped for the terminal."""
    text = " ".join(text.split())
    return loggable(text if len(text) <= most else text[:most - 1] + "…")


def duration_text(ms: int) -> str:
    """A duration as the host reads it: 2 min 41 s, 1 h 5 min."""
    seconds = max(ms, 0) // 1000
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def who_may_reconnect(resumed: Resumed) -> str:
    """How many participants may register again, and as many of their ids (and nicknames) as fit a line."""
    people = resumed.participants
    kicked = f" ({resumed.kicked} kicked may not)" if resumed.kicked else ""
    if not people:
        return f"none yet{kicked}"
    names: list[str] = []
    for p in people:
        name = clip(p["id"], 24) + ("" if p["nickname"] == p["id"] else f" ({clip(p['nickname'], 24)})")
        if names and sum(len(n) + 2 for n in names) + len(name) > BANNER_NAMES:
            break
        names.append(name)
    more = f" and {len(people) - len(names)} more" if len(names) < len(people) else ""
    return f"{len(people)} may register again{kicked}: {', '.join(names)}{more}"


def room_lines(resumed: Resumed | None, port: int) -> list[str]:
    """The banner's session, round, participants and next step.

    A start on a database whose session is active is a restart mid-evening: the
    next step then never ends the session (a new one would disconnect everyone).
    """
    local = f"http://127.0.0.1:{port}"
    if resumed is None:
        return [f"  next step     curl -X POST {local}/session"]
    session, live = resumed.session, resumed.round
    started = datetime.fromtimestamp(session["createdAt"] / 1000).strftime("%Y-%m-%d %H:%M")
    pin = f"PIN {resumed.pin}" if resumed.pin else "its PIN is not known here: only its hash is kept"
    lines = [f"  session       {session['id']} ({pin}), active since {started}; it goes on"]
    if live is None:
        lines.append("  round         none running")
        step = f"the session and its rounds: curl {local}/session"
    else:
        lines.append(f"  round         {live['index']} running for {duration_text(now_ms() - live['startedAt'])}: "
                     f"\"{clip(live['prompt'], 60)}\"")
        step = f"when its answers are in: curl -X POST {local}/rounds/stop"
    return lines + [f"  participants  {who_may_reconnect(resumed)}",
                    f"  next step     runners reconnect by themselves; {step}"]


def banner(app: web.Application, listening: list[str], port: int, descriptors: int | None, token_from: str,
           resumed: Resumed | None) -> str:
    config = app[server_key].config
    lan = [address for address in lan_addresses() if "0.0.0.0" in listening or address in listening]
    limit = "no limit" if descriptors is None else f"{descriptors} open files"
    pages = served_pages(config)
    lines = [f"Gambiarra arena server {__version__}", f"  database      {config.database.resolve()}",
             f"  listening on  port {port} of {', '.join(listening)}",
             f"  connections   {limit}; {config.connections_per_address} per address (the host's: any number)"]
    lines += [f"  runners       ws://{address}:{port}/ws" for address in lan] or [
        f"  runners       ws://127.0.0.1:{port}/ws (no LAN address to listen on: runners on this machine only)"]
    for address in [*lan, "localhost"] if pages else []:
        lines.append("  pages         " + "  ".join(f"http://{address}:{port}{path} ({audience})"
                                                  for path, audience in pages))
    lines.append(f"  admin token   {config.admin_token}   ({token_from}; host routes from other machines: "
                 "'Authorization: Bearer <token>')")
    return "\n".join(lines + room_lines(resumed, port))


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then close every socket, save every token and exit."""
    stop = asyncio.Event()              # set up first: a signal during start-up still ends the run cleanly
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):      # Windows: Ctrl-C raises instead
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    descriptors = raise_descriptor_limit()
    token_file = admin_token_file(config.database)
    kept = "" if config.admin_token else kept_admin_token(token_file)
    app = make_app(replace(config, admin_token=config.admin_token or kept))
    try:
        runner, listening, refused = await start(app, config.listen_addresses, config.port, descriptors)
    except sqlite3.Error as exc:            # a file that is not a database, a full disk
        fail(f"cannot use the database {config.database}: {exc}")
    if not listening:
        await runner.cleanup()
        fail(f"could not listen on port {config.port} of {', '.join(refused)}: {'; '.join(set(refused.values()))}"
             " (another port: --port N or PORT=N)")
    for address, reason in refused.items():
        log.warning("cannot listen on %s port %d: %s", address, config.port, reason)
    port = runner.addresses[0][1]
    for address in listening:
        log.info("Server listening at http://%s:%d", f"[{address}]" if ":" in address else address, port)
    # The collector's full passes then skip what start-up made (the modules): mid-round
    # pauses become short (README, Performance).
    gc.collect()
    gc.freeze()
    server = app[server_key]
    token_from = token_origin(config.admin_token, kept, server.config.admin_token, token_file)
    print(banner(app, listening, port, descriptors, token_from, await server.resumed()), flush=True)
    try:
        await stop.wait()
    finally:
        print("shutting down: closing connections and saving tokens", flush=True)
        await runner.cleanup()


COMMANDS: dict[str, Callable[[list[str]], None]] = {"simulate": simulate_command, "bench": bench_command,
                                                    "join": join_command, "join-drill": join_drill_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        if importlib.util.find_spec("websockets") is None:
            missing(["websockets"], "websockets", f"--with websockets {sys.argv[0]} {argv[0]}")
        COMMANDS[argv[0]](argv[1:])
        return
    config = parse_config(argv)
    if problem := database_problem(config.database):
        fail(f"cannot use the database {config.database}: {problem}")
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[BackgroundHandler(terminal)])
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config))
    except DatabaseBusy as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


# =============================================================================
# Schema: the text of schema.sql, for when this file runs alone
# =============================================================================
#
# open_db runs schema.sql when it is beside this file, else this copy of it (a
# test says when the two differ, and what to paste here).

SCHEMA_SQL = """\
-- The Gambiarra arena database.
--
-- Run by the server at every start-up, so every statement is idempotent. Tables and
-- columns keep the club's names (camelCase columns, INTEGER epoch-millisecond times),
-- so the club's post-meetup SQL and report scripts read this file unchanged.
-- Columns the club's schema lacks are marked "ours".

CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    createdAt   INTEGER NOT NULL,
    endedAt     INTEGER,
    pin         TEXT NOT NULL DEFAULT '000000',   -- shown to the host only
    pinHash     TEXT NOT NULL,                    -- bcrypt; what runners are checked against
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended'))
);

-- A participant id is global: the row moves to the newest session it registers in.
CREATE TABLE IF NOT EXISTS participants (
    id          TEXT PRIMARY KEY,
    sessionId   TEXT NOT NULL REFERENCES sessions (id),
    nickname    TEXT NOT NULL,
    runner      TEXT NOT NULL,
    model       TEXT NOT NULL,
    connected   INTEGER NOT NULL DEFAULT 0,
    createdAt   INTEGER NOT NULL,
    lastSeen    INTEGER NOT NULL,
    kicked      INTEGER NOT NULL DEFAULT 0,       -- ours: refused in sessionId until it changes
    resumeHash  TEXT,                             -- ours: sha256 of the resume secret its runner holds
    lastAddress TEXT                              -- ours: where its runner last registered from
);

CREATE TABLE IF NOT EXISTS rounds (
    id            TEXT PRIMARY KEY,
    sessionId     TEXT NOT NULL REFERENCES sessions (id),
    "index"       INTEGER NOT NULL,               -- 1-based within the session
    prompt        TEXT NOT NULL,
    maxTokens     INTEGER NOT NULL DEFAULT 400,
    temperature   REAL NOT NULL DEFAULT 0.8,
    deadlineMs    INTEGER NOT NULL DEFAULT 90000,
    seed          INTEGER,
    svgMode       INTEGER NOT NULL DEFAULT 0,
    startedAt     INTEGER,
    endedAt       INTEGER,
    votingStatus  TEXT NOT NULL DEFAULT 'closed' CHECK (votingStatus IN ('closed', 'open', 'revealed')),
    revealedCount INTEGER NOT NULL DEFAULT 0,
    createdAt     INTEGER,                        -- ours
    UNIQUE (sessionId, "index")
);

-- One row per (round, participant) that answered: completed, or rescued at stop.
CREATE TABLE IF NOT EXISTS metrics (
    id                        TEXT PRIMARY KEY,
    roundId                   TEXT NOT NULL REFERENCES rounds (id),
    participantId             TEXT NOT NULL REFERENCES participants (id),
    tokens                    INTEGER NOT NULL,   -- as the client reported it (received, if rescued)
    latencyFirstTokenMs       INTEGER,            -- server clock: first token - round start
    durationMs                INTEGER NOT NULL,   -- server clock: complete - round start
    tpsAvg                    REAL,               -- received tokens / (complete - first token)
    modelInfo                 TEXT,               -- JSON
    generatedContent          TEXT,               -- the tokens in seq order
    createdAt                 INTEGER NOT NULL,
    generationStartedAt       INTEGER,
    generationEndedAt         INTEGER,
    firstTokenAt              INTEGER,
    tokensReceived            INTEGER NOT NULL DEFAULT 0,  -- ours
    seqGaps                   INTEGER NOT NULL DEFAULT 0,  -- ours: seqs below the highest never received
    clientLatencyFirstTokenMs INTEGER,                     -- ours
    clientDurationMs          INTEGER,                     -- ours
    rescued                   INTEGER NOT NULL DEFAULT 0,  -- ours: 1 = saved at stop, no complete yet
    UNIQUE (roundId, participantId)
);

CREATE TABLE IF NOT EXISTS votes (
    id            TEXT PRIMARY KEY,
    roundId       TEXT NOT NULL REFERENCES rounds (id),
    voterHash     TEXT NOT NULL,                  -- sha256 of the voter id; the id itself is never stored
    participantId TEXT NOT NULL REFERENCES participants (id),
    score         INTEGER NOT NULL CHECK (score BETWEEN 0 AND 5),
    createdAt     INTEGER NOT NULL,
    voteOrder     INTEGER,
    responseTime  INTEGER,
    userAgent     TEXT,
    UNIQUE (roundId, voterHash, participantId)
);

CREATE TABLE IF NOT EXISTS event_logs (
    id         TEXT PRIMARY KEY,
    sessionId  TEXT,
    timestamp  INTEGER NOT NULL,
    eventType  TEXT NOT NULL,
    actorType  TEXT NOT NULL,                     -- admin | participant | voter | system
    actorId    TEXT,
    targetType TEXT,
    targetId   TEXT,
    metadata   TEXT                               -- JSON
);
CREATE INDEX IF NOT EXISTS event_logs_session ON event_logs (sessionId);
CREATE INDEX IF NOT EXISTS event_logs_type ON event_logs (eventType);
CREATE INDEX IF NOT EXISTS event_logs_timestamp ON event_logs (timestamp);

-- Ours: every accepted token, written in batches about once a second. It is what a
-- restart resumes from, and a per-token timing trace for the club's report.
CREATE TABLE IF NOT EXISTS tokens (
    roundId       TEXT NOT NULL,
    participantId TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    content       TEXT NOT NULL,
    receivedAt    INTEGER NOT NULL,
    PRIMARY KEY (roundId, participantId, seq)
) WITHOUT ROWID;

PRAGMA user_version = 2;
"""


# =============================================================================
# Assets: the pages' HTML, CSS and JavaScript
# =============================================================================
#
# Plain data, kept last although the Pages section above uses it: a reader meets the
# server's logic first and the page text after it (bottle keeps its error page
# template near its end for the same reason). Plain strings, not f-strings, so the
# JavaScript's braces need no escaping; page_html() fills in the {{name}} holes of
# page.html only.

ASSETS = {
    "page.html": r'''<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' height='16' rx='4' fill='%23ff8a3d'/%3E%3Cpath d='M11 5H6v6h5V8H8.5' stroke='%230d1020' stroke-width='2' fill='none'/%3E%3C/svg%3E">
<style>{{css}}</style>
<script type="application/json" id="boot">{{boot}}</script>
</head><body class="{{name}}">
{{body}}
<div id="offline" class="offline" hidden>Reconnecting to the server…</div>
<script nonce="{{nonce}}">{{js}}</script>
</body></html>
''',
    "base.css": r''':root{--bg:#0d1020;--panel:#161a30;--line:#2b3152;--text:#e9ecf8;--dim:#8d94b4;--accent:#ff8a3d;--done:#3ddc84;
--live:#ff4f8b;--info:#38d3ea;--warn:#ffd166;color-scheme:dark;
font:16px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;
color:var(--text);background:var(--bg)}
*{box-sizing:border-box}
body{margin:0;min-height:100vh;padding:1rem}
h1,h2,h3,p{margin:0}
[hidden]{display:none!important}
button{font:inherit;color:var(--text);background:var(--panel);border:1px solid var(--line);border-radius:.5rem;
padding:.5em 1em;cursor:pointer}
button:disabled{opacity:.45;cursor:default}
input,select,textarea{font:inherit;color:var(--text);background:#0a0d1a;border:1px solid var(--line);
border-radius:.4rem;padding:.4em}
.panel{background:var(--panel);border:1px solid var(--line);border-radius:.8rem;padding:1rem}
.dim{color:var(--dim)}
.mono,pre,code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0}
.badge{display:inline-block;border:1px solid currentColor;border-radius:.4rem;padding:.1em .6em;font-size:.85em;
font-weight:700;letter-spacing:.05em;text-transform:uppercase}
.live{color:var(--live)}.done{color:var(--done)}.info{color:var(--info)}.warn{color:var(--warn)}
.brand{font-family:ui-monospace,"DejaVu Sans Mono",monospace;color:var(--accent);letter-spacing:.08em;
text-shadow:0 0 18px rgba(255,138,61,.5)}
.svg-answer{display:block;max-width:100%;max-height:100%;margin:auto;background:#fff;border-radius:.4rem}
.error{color:#ff6b6b}
.offline{position:fixed;bottom:.6rem;right:.6rem;background:#402030;color:var(--warn);border-radius:.5rem;
padding:.3em .8em;font-size:.9rem}
''',
    "base.js": r'''"use strict";
// What every page shares: the server's JSON API, the live socket, element building, drawing per frame.
const BOOT = JSON.parse(document.getElementById("boot").textContent);
const $ = (id) => document.getElementById(id);

// An element with properties (class, on<event> listeners, attributes) and children (text stays text).
function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

// The host's admin token, once typed on another device, is kept for this tab only.
function authHeaders() {
  const token = sessionStorage.getItem("adminToken");
  return token ? {Authorization: "Bearer " + token} : {};
}

// Call the API; a refusal throws an Error with the API's own sentence (and its status and code).
async function api(method, path, body) {
  const options = {method, headers: authHeaders()};
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw Object.assign(new Error(data.error || response.status + " " + response.statusText),
                        {status: response.status, code: data.code});
  }
  return data;
}

// Run `job` once before the next paint, however often it is asked for in between.
const frameJobs = new Set();
function onFrame(job) {
  if (!frameJobs.size) {
    requestAnimationFrame(() => {
      const jobs = [...frameJobs];
      frameJobs.clear();
      jobs.forEach((run) => run());
    });
  }
  frameJobs.add(job);
}

// Watch the server as a screen: `onMessage` gets every frame. The socket comes back by itself
// (waiting longer after each failure); while it is down, `poll` runs every few seconds instead.
function watch(view, onMessage, poll) {
  let delay = 500, pollTimer = null;
  const down = (isDown) => {
    $("offline").hidden = !isDown;
    if (isDown && !pollTimer && poll) pollTimer = setInterval(() => poll().catch(() => {}), 5000);
    if (!isDown && pollTimer) { clearInterval(pollTimer); pollTimer = null; }
  };
  const connect = () => {
    const socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    socket.onopen = () => { delay = 500; down(false); socket.send(JSON.stringify({type: "telao_register", view})); };
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    socket.onclose = () => { down(true); setTimeout(connect, delay); delay = Math.min(delay * 2, 8000); };
  };
  connect();
}

// An answer's SVG as the source of an <img>: in an image a browser runs no script, no event
// handler and fetches nothing, whatever the SVG says. A cut-off drawing is closed so it shows
// what it has. null when the answer holds no SVG.
function svgSource(text) {
  const start = text.search(/<svg[\s>]/i);
  if (start < 0) return null;
  let svg = text.slice(start);
  const end = /<\/svg\s*>/i.exec(svg);
  if (end) svg = svg.slice(0, end.index + end[0].length);
  else {
    svg = svg.slice(0, svg.lastIndexOf(">") + 1);
    const open = [];
    for (const tag of svg.matchAll(/<(\/?)([A-Za-z][\w:.-]*)(?:[^>"']|"[^"]*"|'[^']*')*?(\/?)>/g)) {
      const at = tag[1] ? open.lastIndexOf(tag[2]) : -1;
      if (at >= 0) open.length = at;
      else if (!tag[1] && !tag[3]) open.push(tag[2]);
    }
    svg += open.reverse().map((name) => "</" + name + ">").join("");
  }
  if (!/^<svg[^>]*\sxmlns\s*=/i.test(svg)) svg = svg.replace(/^<svg/i, '<svg xmlns="http://www.w3.org/2000/svg"');
  return "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svg);
}

// An answer as people read it: the drawing for an SVG round, else the text (monospace, wrapped).
function answerView(text, svgMode) {
  const source = svgMode && svgSource(text);
  return source ? h("img", {class: "svg-answer", src: source, alt: "the drawing"}) : h("pre", {}, text);
}
''',
    "qr.js": r'''// A QR code encoder (byte mode, error correction level M, versions 1 to 10: up to 213 bytes),
// small enough to live here: the page draws its own code, with nothing fetched.
const QR = (() => {
  // Per version: error correction codewords per block, then [blocks, data codewords] per group.
  const BLOCKS = [null, [10, [1, 16]], [16, [1, 28]], [26, [1, 44]], [18, [2, 32]], [24, [2, 43]],
    [16, [4, 27]], [18, [4, 31]], [22, [2, 38], [2, 39]], [22, [3, 36], [2, 37]], [26, [4, 43], [1, 44]]];
  const ALIGN = [null, [], [6, 18], [6, 22], [6, 26], [6, 30], [6, 34], [6, 22, 38], [6, 24, 42], [6, 26, 46],
    [6, 28, 50]];
  const EXP = new Uint8Array(512), LOG = new Uint8Array(256);
  for (let i = 0, x = 1; i < 255; i++, x = (x << 1) ^ (x & 0x80 ? 0x11d : 0)) { EXP[i] = x; LOG[x] = i; }
  for (let i = 255; i < 512; i++) EXP[i] = EXP[i - 255];
  const mul = (a, b) => (a && b ? EXP[LOG[a] + LOG[b]] : 0);

  function errorCorrection(data, degree) {
    let gen = [1];                                  // the product of (x - 2^i) for i < degree
    for (let i = 0; i < degree; i++) {
      const next = new Array(gen.length + 1).fill(0);
      gen.forEach((c, j) => { next[j] ^= c; next[j + 1] ^= mul(c, EXP[i]); });
      gen = next;
    }
    const rest = new Array(degree).fill(0);
    for (const byte of data) {
      const factor = byte ^ rest.shift();
      rest.push(0);
      for (let j = 0; j < degree; j++) rest[j] ^= mul(gen[j + 1], factor);
    }
    return rest;
  }

  function codewords(bytes, version) {
    const [ecLength, ...groups] = BLOCKS[version];
    const capacity = groups.reduce((sum, [n, k]) => sum + n * k, 0);
    const bits = [];
    const put = (value, length) => { for (let i = length - 1; i >= 0; i--) bits.push((value >>> i) & 1); };
    put(4, 4);                                      // byte mode
    put(bytes.length, version < 10 ? 8 : 16);
    bytes.forEach((b) => put(b, 8));
    put(0, Math.min(4, capacity * 8 - bits.length));
    while (bits.length % 8) bits.push(0);
    const data = [];
    for (let i = 0; i < bits.length; i += 8) data.push(parseInt(bits.slice(i, i + 8).join(""), 2));
    for (let pad = 0xec; data.length < capacity; pad ^= 0xec ^ 0x11) data.push(pad);
    const blocks = [];
    let at = 0;
    for (const [n, k] of groups) for (let b = 0; b < n; b++, at += k) blocks.push(data.slice(at, at + k));
    const ecs = blocks.map((block) => errorCorrection(block, ecLength));
    const out = [];
    for (let i = 0; i < Math.max(...blocks.map((b) => b.length)); i++) {
      blocks.forEach((b) => i < b.length && out.push(b[i]));
    }
    for (let i = 0; i < ecLength; i++) ecs.forEach((e) => out.push(e[i]));
    return out;
  }

  function bch(value, poly, shift) {               // value followed by its remainder modulo poly
    let rest = value << shift;
    for (let top = 31 - Math.clz32(poly); 31 - Math.clz32(rest) >= top;) rest ^= poly << (31 - Math.clz32(rest) - top);
    return (value << shift) | rest;
  }

  const MASKS = [(x, y) => (x + y) % 2 === 0, (x, y) => y % 2 === 0, (x) => x % 3 === 0, (x, y) => (x + y) % 3 === 0,
    (x, y) => (Math.floor(x / 3) + Math.floor(y / 2)) % 2 === 0, (x, y) => (x * y) % 2 + (x * y) % 3 === 0,
    (x, y) => ((x * y) % 2 + (x * y) % 3) % 2 === 0, (x, y) => ((x + y) % 2 + (x * y) % 3) % 2 === 0];

  function build(version, data, mask) {
    const size = version * 4 + 17;
    const dark = Array.from({length: size}, () => new Array(size).fill(false));
    const fixed = Array.from({length: size}, () => new Array(size).fill(false));
    const set = (x, y, on) => { dark[y][x] = on; fixed[y][x] = true; };
    for (let i = 0; i < size; i++) { set(6, i, i % 2 === 0); set(i, 6, i % 2 === 0); }
    for (const [cx, cy] of [[3, 3], [size - 4, 3], [3, size - 4]]) {      // finders and their separators
      for (let dy = -4; dy <= 4; dy++) for (let dx = -4; dx <= 4; dx++) {
        const x = cx + dx, y = cy + dy, ring = Math.max(Math.abs(dx), Math.abs(dy));
        if (x >= 0 && y >= 0 && x < size && y < size) set(x, y, ring !== 2 && ring !== 4);
      }
    }
    const align = ALIGN[version];
    const last = align[align.length - 1];
    for (const cy of align) for (const cx of align) {
      if ((cx === 6 && (cy === 6 || cy === last)) || (cx === last && cy === 6)) continue;   // under the finders
      for (let dy = -2; dy <= 2; dy++) {
        for (let dx = -2; dx <= 2; dx++) set(cx + dx, cy + dy, Math.max(Math.abs(dx), Math.abs(dy)) !== 1);
      }
    }
    const format = bch(mask, 0x537, 10) ^ 0x5412;   // level M is 00
    const bit = (value, i) => ((value >>> i) & 1) === 1;
    for (let i = 0; i < 6; i++) set(8, i, bit(format, i));
    set(8, 7, bit(format, 6)); set(8, 8, bit(format, 7)); set(7, 8, bit(format, 8));
    for (let i = 9; i < 15; i++) set(14 - i, 8, bit(format, i));
    for (let i = 0; i < 8; i++) set(size - 1 - i, 8, bit(format, i));
    for (let i = 8; i < 15; i++) set(8, size - 15 + i, bit(format, i));
    set(8, size - 8, true);
    if (version >= 7) {
      const info = bch(version, 0x1f25, 12);
      for (let i = 0; i < 18; i++) {
        const a = size - 11 + (i % 3), b = Math.floor(i / 3);
        set(a, b, bit(info, i));
        set(b, a, bit(info, i));
      }
    }
    let i = 0;
    for (let right = size - 1; right >= 1; right -= 2) {             // two columns at a time, zigzagging
      if (right === 6) right = 5;
      for (let v = 0; v < size; v++) for (let j = 0; j < 2; j++) {
        const x = right - j, y = ((right + 1) & 2) === 0 ? size - 1 - v : v;
        if (fixed[y][x]) continue;
        const on = i < data.length * 8 && bit(data[i >> 3], 7 - (i & 7));
        i++;
        dark[y][x] = on !== MASKS[mask](x, y);
      }
    }
    return dark;
  }

  function penalty(m) {                             // the standard's four rules, to pick the mask
    const size = m.length;
    let score = 0, darkCount = 0;
    const lines = [];
    for (let y = 0; y < size; y++) { lines.push(m[y]); lines.push(m.map((row) => row[y])); }
    for (const line of lines) {
      for (let x = 0, run = 0; x <= size; x++) {
        if (x < size && x > 0 && line[x] === line[x - 1]) run++;
        else { if (run >= 4) score += run - 1; run = 0; }
      }
      const text = line.map((on) => (on ? "1" : "0")).join("");
      score += 40 * ((text.match(/(?=10111010000|00001011101)/g) || []).length);
    }
    for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) {
      if (m[y][x]) darkCount++;
      if (x && y && m[y][x] === m[y - 1][x] && m[y][x] === m[y][x - 1] && m[y][x] === m[y - 1][x - 1]) score += 3;
    }
    return score + 10 * Math.floor(Math.abs(darkCount * 20 - size * size * 10) / (size * size));
  }

  function encode(text) {
    const bytes = Array.from(new TextEncoder().encode(text));
    let version = 1;
    const fits = (v) => BLOCKS[v].slice(1).reduce((s, [n, k]) => s + n * k, 0) >= bytes.length + (v < 10 ? 2 : 3);
    while (version <= 10 && !fits(version)) version++;
    if (version > 10) throw new Error("Too long for a QR code here: " + text);
    const data = codewords(bytes, version);
    let best = null, bestScore = Infinity;
    for (let mask = 0; mask < 8; mask++) {
      const m = build(version, data, mask), score = penalty(m);
      if (score < bestScore) { best = m; bestScore = score; }
    }
    return best;
  }

  // Draw `text` on `canvas`, `scale` pixels a module, with the four-module quiet zone.
  function draw(canvas, text, scale) {
    const m = encode(text), side = (m.length + 8) * scale;
    canvas.width = canvas.height = side;
    const g = canvas.getContext("2d");
    g.fillStyle = "#fff";
    g.fillRect(0, 0, side, side);
    g.fillStyle = "#000";
    m.forEach((row, y) => row.forEach((on, x) => on && g.fillRect((x + 4) * scale, (y + 4) * scale, scale, scale)));
  }
  return {encode, draw};
})();
''',
    "arena.html": r'''<header class="top"><h1 class="brand">GAMBIARRA ARENA</h1><span class="pill" id="connected">0 connected</span></header>
<section id="join" class="join">
  <div class="panel how">
    <h2>Runners</h2>
    <p class="dim">point your runner at</p>
    <p class="url mono" id="ws-url"></p>
    <p class="dim">with the session PIN the host gives you.</p>
    <h2>Everyone</h2>
    <p class="dim">vote on your phone at</p>
    <p class="url mono" id="vote-url"></p>
    <p class="dim" id="waiting">Waiting for the host to start a session.</p>
  </div>
  <div class="panel qr"><canvas id="qr" aria-label="QR code of the voting page"></canvas></div>
  <div class="panel who"><h2 id="people-title">Connected</h2><ul id="people" class="people"></ul></div>
</section>
<section id="live" hidden>
  <div class="panel round">
    <div class="round-text"><span class="badge info" id="round-no"></span> <span class="badge" id="round-status"></span>
      <p id="prompt" class="prompt"></p></div>
    <div class="fact"><b id="max-tokens"></b><small>max tokens</small></div>
    <div class="fact"><b id="countdown"></b><small>left</small></div>
    <div class="fact vote-now" id="vote-now" hidden>
      <canvas id="qr-small" aria-label="QR code of the voting page"></canvas><small>vote</small></div>
  </div>
  <div class="panel progress">
    <div class="legend"><span><b class="done" id="n-done">0</b> done</span>
      <span><b class="live" id="n-generating">0</b> generating</span>
      <span><b class="dim" id="n-waiting">0</b> waiting</span></div>
    <div class="bar"><i class="bar-done" id="bar-done"></i><i class="bar-generating" id="bar-generating"></i></div>
  </div>
  <div id="cards" class="cards"></div>
</section>
''',
    "arena.css": r'''body.arena{font-size:clamp(14px,1.1vw,22px)}
.top{display:flex;justify-content:space-between;align-items:center;margin-bottom:1rem}
.top h1{font-size:2.6em}
.pill{border:1px solid var(--line);border-radius:.5rem;padding:.3em .8em;background:var(--panel)}
.join{display:grid;grid-template-columns:1.3fr auto 1fr;gap:1rem;align-items:start}
.how h2{font-size:1.5em;margin-top:.6em}.how h2:first-child{margin-top:0}
.url{font-size:2em;color:var(--info);overflow-wrap:anywhere;margin:.1em 0 .2em}
.qr{display:flex;justify-content:center}.qr canvas{width:min(34vw,60vh);image-rendering:pixelated;border-radius:.4rem}
.people{list-style:none;padding:0;margin:.6em 0 0;display:flex;flex-wrap:wrap;gap:.4em}
.people li{background:#0f1326;border:1px solid var(--line);border-radius:.4rem;padding:.2em .6em}
.people li small{color:var(--dim);margin-left:.4em}
.round{display:flex;gap:1rem;align-items:center;margin-bottom:1rem;border-top:3px solid var(--accent)}
.round-text{flex:1;min-width:0}
.prompt{font-size:1.6em;margin-top:.3em;overflow-wrap:anywhere;max-height:4.2em;overflow:hidden}
.fact{display:flex;flex-direction:column;align-items:center;border:1px solid var(--line);border-radius:.6rem;
padding:.4em .8em;min-width:6em}
.fact b{font-size:1.8em;color:var(--info)}.fact small{color:var(--dim);text-transform:uppercase;font-size:.75em}
.vote-now canvas{width:7em;image-rendering:pixelated}
.progress{margin-bottom:1rem}.legend{display:flex;gap:1.5em;margin-bottom:.4em}
.bar{display:flex;height:.7em;background:#0a0d1a;border-radius:.35em;overflow:hidden}
.bar i{display:block;height:100%}.bar-done{background:var(--done)}.bar-generating{background:var(--live)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(20em,1fr));gap:1rem}
/* Each card lays itself out alone: 60 of them change every frame. */
.card{display:flex;flex-direction:column;gap:.5em;border-top:3px solid var(--dim);height:22em;contain:strict}
.card.is-generating{border-top-color:var(--live)}.card.is-done{border-top-color:var(--done)}
.card.is-dropped,.card.is-stopped{border-top-color:var(--warn)}
.card header{display:flex;gap:.6em;align-items:center}
.avatar{flex:none;width:2.2em;height:2.2em;border-radius:50%;display:grid;place-items:center;font-weight:700;
background:linear-gradient(135deg,var(--accent),var(--live));color:#111}
.who-is{flex:1;min-width:0}.who-is h3{font-size:1.2em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.who-is small{color:var(--dim);display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.state{font-size:.75em}
.card.is-waiting .state{color:var(--dim)}.card.is-generating .state{color:var(--live)}
.card.is-done .state{color:var(--done)}
.card.is-dropped .state,.card.is-stopped .state{color:var(--warn)}
.count{display:flex;justify-content:space-between;font-size:.85em;color:var(--dim)}.count b{color:var(--info)}
.card .bar{height:.4em}.card .bar i{background:var(--info)}
.text{flex:1;min-height:0;overflow:hidden;display:flex;flex-direction:column-reverse;background:#0a0d1a;
border-radius:.5rem;padding:.5em .7em;font-size:.9em}
.stats{font-size:.85em;color:var(--dim);min-height:1.4em}.stats b{color:var(--text)}
''',
    "arena.js": r'''// The big screen: how to join before a round, then one card per runner, fed by the socket.
const voteUrl = BOOT.join + BOOT.paths.voting;
const state = {session: null, round: null, people: new Map(), cards: new Map()};
$("ws-url").textContent = BOOT.join.replace(/^http/, "ws") + "/ws";
$("vote-url").textContent = voteUrl;
QR.draw($("qr"), voteUrl, 10);
QR.draw($("qr-small"), voteUrl, 4);

const running = () => Boolean(state.round && state.round.startedAt && !state.round.endedAt);

function person(p) {
  state.people.set(p.id, {id: p.id, nickname: p.nickname, model: p.model, connected: p.connected !== false});
}

// A runner's card for this round; made on first need (a runner connected at the start, or its first token).
function card(id) {
  let c = state.cards.get(id);
  if (!c) {
    c = {id, tokens: 0, pending: [], full: "", done: false, ttft: null, tps: null, engineTps: null, node: null};
    state.cards.set(id, c);
  }
  return c;
}

function cardState(c) {
  if (c.done) return "done";
  const p = state.people.get(c.id);
  if (!p || !p.connected) return "dropped";
  if (!running()) return c.tokens ? "stopped" : "waiting";
  return c.tokens ? "generating" : "waiting";
}

function makeCard(c) {
  const p = state.people.get(c.id) || {nickname: c.id, model: ""};
  const text = document.createTextNode("");
  const node = h("article", {class: "panel card"},
    h("header", {}, h("span", {class: "avatar"}, (p.nickname || "?").slice(0, 1).toUpperCase()),
      h("div", {class: "who-is"}, h("h3", {}, p.nickname), h("small", {}, p.model)),
      h("span", {class: "badge state"})),
    h("div", {class: "count"}, h("span", {}, "tokens"), h("span", {}, h("b", {}), " / " + state.round.maxTokens)),
    h("div", {class: "bar"}, h("i", {})),
    h("div", {class: "text"}, h("pre", {}, text)),
    h("div", {class: "stats"}));
  c.node = node;
  c.text = text;
  [c.stateNode, c.countNode, c.barNode, c.textBox, c.statsNode] =
    [".state", ".count b", ".bar i", ".text", ".stats"].map((selector) => node.querySelector(selector));
  c.svgShownAt = -Infinity;
  $("cards").append(node);
}

// Bring a card's DOM up to date: the new text is appended, never the whole text rewritten.
function drawCard(c) {
  if (!c.node) makeCard(c);
  const name = cardState(c);
  if (c.node.dataset.state !== name) {
    c.node.dataset.state = name;
    c.node.className = "panel card is-" + name;
    c.stateNode.textContent = name;
  }
  if (c.pending.length) {
    const chunk = c.pending.join("");
    c.pending.length = 0;
    c.full += chunk;
    // Only an answer's end is in view: the page holds its last few thousand characters,
    // so a long answer costs no more to lay out than a short one.
    if (c.text.length + chunk.length > 4000) c.text.data = c.full.slice(-2000);
    else c.text.appendData(chunk);
  }
  if (c.shownTokens !== c.tokens) {
    c.shownTokens = c.tokens;
    c.countNode.textContent = c.tokens;
    c.barNode.style.width = Math.min(100, (100 * c.tokens) / state.round.maxTokens) + "%";
  }
  if (c.ttft !== null && !c.statsNode.firstChild) {
    // The engine's own clock beside the arena's: a laptop far faster by one than by the other stands out.
    const engine = c.engineTps ? [" · engine ", h("b", {}, c.engineTps.toFixed(1))] : [];
    c.statsNode.replaceChildren("TTFT ", h("b", {}, Math.round(c.ttft) + " ms"),
      " · ", h("b", {}, (c.tps || 0).toFixed(1)), " tokens/s", ...engine);
  }
  if (state.round.svgMode) drawSvg(c);
}

// An image per drawing costs a decode: a streaming drawing is redrawn twice a second at most,
// and once more after its last token.
function drawSvg(c) {
  const wait = c.svgShownAt + 500 - performance.now();
  if (wait > 0 && !c.done) {
    c.svgTimer = c.svgTimer || setTimeout(() => { c.svgTimer = null; touch(c.id); }, wait);
    return;
  }
  c.svgShownAt = performance.now();
  const source = svgSource(c.full);
  if (source) c.textBox.replaceChildren(h("img", {class: "svg-answer", src: source, alt: "drawing"}));
}

function drawProgress() {
  let done = 0, generating = 0, waiting = 0;
  for (const c of state.cards.values()) {
    const name = cardState(c);
    if (name === "done") done++;
    else if (name === "generating") generating++;
    else if (name === "waiting") waiting++;
  }
  const total = Math.max(1, state.cards.size);
  $("n-done").textContent = done;
  $("n-generating").textContent = generating;
  $("n-waiting").textContent = waiting;
  $("bar-done").style.width = (100 * done) / total + "%";
  $("bar-generating").style.width = (100 * generating) / total + "%";
}

const dirty = new Set();
function paintCards() {
  for (const id of dirty) drawCard(card(id));
  dirty.clear();
  drawProgress();
}
function touch(id) {
  dirty.add(id);
  onFrame(paintCards);
}

const STATUS = {open: ["voting open", "done"], closed: ["voting closed", "warn"], revealed: ["results", "info"]};

// The header, the join panel and who is connected: redrawn once per frame however many runners
// join in it (a room's worth connect together when the host says go).
function drawRound() {
  const r = state.round, started = Boolean(r && r.startedAt);
  $("join").hidden = started;
  $("live").hidden = !started;
  $("waiting").textContent = state.session ? "" : "Waiting for the host to start a session.";
  const connected = [...state.people.values()].filter((p) => p.connected);
  $("connected").textContent = connected.length + " connected";
  $("people-title").textContent = connected.length ? connected.length + " connected" : "Nobody connected yet";
  $("people").replaceChildren(...connected.map((p) => h("li", {}, p.nickname, h("small", {}, p.model))));
  if (!started) return;
  $("round-no").textContent = "round " + r.index;
  const [label, tone] = running() ? ["live", "live"] : STATUS[r.votingStatus] || ["ended", "dim"];
  $("round-status").textContent = label;
  $("round-status").className = "badge " + tone;
  $("prompt").textContent = r.prompt;
  $("max-tokens").textContent = r.maxTokens;
  $("vote-now").hidden = r.votingStatus !== "open";
  tick();
  if (running()) for (const p of connected) card(p.id);
  for (const id of state.cards.keys()) touch(id);
}

// The deadline is advisory (the host stops the round): it counts down to zero and waits there.
function tick() {
  const r = state.round;
  if (!r || !r.startedAt) return;
  const left = r.endedAt ? 0 : Math.max(0, Date.parse(r.startedAt) + r.deadlineMs - Date.now());
  $("countdown").textContent = Math.ceil(left / 1000) + "s";
}
setInterval(tick, 250);

function newRound(r) {
  state.cards.clear();
  dirty.clear();
  $("cards").replaceChildren();
  state.round = r;
}

// A screen that (re)connects mid-round or after it gets the text streamed so far in the snapshot;
// the answers already complete (every saved one, once the round is over) and the names of runners
// no longer connected come from the scoreboard and the session.
async function catchUp(r) {
  const [session, board] = await Promise.all([api("GET", "/session"),
    api("GET", "/scoreboard?round_id=" + encodeURIComponent(r.id))]);
  if (!state.round || state.round.id !== r.id) return;
  for (const p of session.participants) if (!state.people.has(p.id)) person(p);
  for (const e of board.scoreboard) {
    const c = card(e.participant_id);
    if (!c.tokens && !c.pending.length) c.pending.push(e.generated_content);
    Object.assign(c, {done: true, tokens: e.tokens, ttft: e.latency_first_token_ms, tps: e.tps_avg,
                      engineTps: e.engine_tps});
  }
  onFrame(drawRound);
}

const ON = {
  state_snapshot(m) {
    state.session = m.session;
    state.people.clear();
    m.participants.forEach(person);
    newRound(m.round);
    for (const [id, tokens] of Object.entries(m.liveTokens || {})) {
      const c = card(id);
      c.pending.push(tokens.join(""));
      c.tokens = tokens.length;
    }
    onFrame(drawRound);
    if (m.round && m.round.startedAt) catchUp(m.round);
  },
  participant_registered(m) { person(m.participant); onFrame(drawRound); },
  participant_disconnected(m) {
    const p = state.people.get(m.participant_id);
    if (p) p.connected = false;
    onFrame(drawRound);
  },
  round_started(m) { newRound(null); },
  round_state(m) {
    if (!state.round || state.round.id !== m.round.id) newRound(m.round);
    state.round = m.round;
    onFrame(drawRound);
  },
  token_update(m) {
    if (!state.round || m.round !== state.round.index) return;
    const c = card(m.participant_id);
    c.pending.push(m.content);
    c.tokens = m.total_tokens;
    touch(c.id);
  },
  completion(m) {
    if (!state.round || m.round !== state.round.index) return;
    const c = card(m.participant_id);
    Object.assign(c, {done: true, tokens: m.tokens, ttft: m.ttft_ms, tps: m.tps, engineTps: m.engine_tps});
    touch(c.id);
  },
};

// While the socket is down: who is connected, and the running round's text so far.
async function poll() {
  const session = await api("GET", "/session");
  const current = await api("GET", "/rounds/current").catch(() => null);
  const shown = current || session.rounds.filter((r) => r.startedAt).pop() || null;
  const liveTokens = current && current.liveTokens;
  ON.state_snapshot({session, participants: session.participants, round: shown, liveTokens});
}

watch("arena", (m) => ON[m.type] && ON[m.type](m), poll);
drawRound();
''',
    "voting.html": r'''<header class="head"><h1 class="brand">VOTE</h1><p id="round-line" class="dim"></p><p id="prompt" class="prompt"></p>
  <p id="progress" class="progress"></p></header>
<p id="message" class="message panel"></p>
<p id="problem" class="error" hidden></p>
<main id="answers" class="answers"></main>
''',
    "voting.css": r'''body.voting{max-width:40rem;margin:0 auto;padding:.75rem}
.head{text-align:center;margin-bottom:.75rem}.head h1{font-size:1.8rem}
.prompt{margin-top:.3rem;overflow-wrap:anywhere}
.progress{margin-top:.3rem;color:var(--info)}
.message{text-align:center;margin-bottom:.75rem}.message:empty{display:none}
.answers{display:flex;flex-direction:column;gap:.75rem}
.answer h2{font-size:1.1rem;color:var(--accent);margin-bottom:.4rem;overflow-wrap:anywhere}
.answer pre{background:#0a0d1a;border-radius:.5rem;padding:.6rem;max-height:60vh;overflow:auto;font-size:.9rem}
.answer .svg-answer{max-height:60vh}
.scores{display:grid;grid-template-columns:repeat(6,1fr);gap:.35rem;margin-top:.6rem}
.scores button{padding:.7em 0;font-size:1.15rem;font-weight:700}
.scores button.chosen{background:var(--done);color:#0d1020;border-color:var(--done);opacity:1}
.answer.cast{border-color:var(--done)}
.cast-note{margin-top:.4rem;color:var(--done);font-size:.9rem}
''',
    "voting.js": r'''// The phone: the answers of the round with voting open, each with scores 0 to 5.
const voterId = localStorage.getItem("voterId") || (() => {
  // An anonymous id that stays with this phone; crypto.randomUUID needs https, this does not.
  const id = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  localStorage.setItem("voterId", id);
  return id;
})();
let round = null, answers = [], mine = new Map(), loading = null;

// A stable order per phone: no answer always comes first, and a late answer slots in
// without moving the others.
function rank(participantId) {
  let hash = 2166136261;
  for (const ch of voterId + ":" + participantId) hash = Math.imul(hash ^ ch.charCodeAt(0), 16777619);
  return hash >>> 0;
}

function say(text) {
  $("message").textContent = text;
}

function problem(error) {
  $("problem").hidden = !error;
  $("problem").textContent = error ? error.message : "";
}

async function vote(answer, score, node) {
  try {
    await api("POST", "/votes", {roundId: round.id, participantId: answer.participant_id, score, voterId});
    mine.set(answer.participant_id, score);
    problem(null);
  } catch (error) {
    if (error.status === 409 && error.message.startsWith("Already voted")) return refresh();
    problem(error);
  }
  node.replaceWith(answerCard(answer));           // the rest of the list stays as it is, scrolled as it was
  $("progress").textContent = mine.size + " of " + answers.length + " voted";
}

function answerCard(answer) {
  const cast = mine.get(answer.participant_id);
  const buttons = [0, 1, 2, 3, 4, 5].map((score) => h("button", {
    class: cast === score ? "chosen" : "", onclick: () => vote(answer, score, node)}, String(score)));
  if (cast !== undefined || round.votingStatus !== "open") buttons.forEach((b) => { b.disabled = true; });
  const node = h("article", {class: "panel answer" + (cast !== undefined ? " cast" : "")},
    h("h2", {}, answer.nickname), answerView(answer.generated_content, round.svgMode),
    h("div", {class: "scores"}, ...buttons),
    cast !== undefined && h("p", {class: "cast-note"}, "Your vote: " + cast));
  return node;
}

function draw() {
  const r = round, open = Boolean(r && r.votingStatus === "open" && r.endedAt);
  $("round-line").textContent = r ? "Round " + r.index : "";
  $("prompt").textContent = r && r.startedAt ? r.prompt : "";
  if (!r || !r.startedAt) say("Waiting for the next round to start.");
  else if (!r.endedAt) say("The round is on: answers stream on the big screen. Voting opens when the host stops it.");
  else if (r.votingStatus === "closed") say("Voting is closed. The results are coming on the big screen.");
  else if (r.votingStatus === "revealed") say("The results are on the big screen.");
  else if (open && !answers.length) say("No answers to vote on yet.");
  else say("");
  const shown = open ? [...answers].sort((a, b) => rank(a.participant_id) - rank(b.participant_id)) : [];
  $("progress").textContent = open && answers.length ? mine.size + " of " + answers.length + " voted" : "";
  $("answers").replaceChildren(...shown.map(answerCard));
}

// Fetch the answers and this phone's votes for the round with voting open (one fetch at a time).
async function refresh() {
  if (!round || !round.endedAt || round.votingStatus !== "open") return draw();
  if (loading) return loading;
  const id = round.id;
  loading = (async () => {
    try {
      const [body, votes] = await Promise.all([api("GET", "/rounds/" + id + "/responses"),
        api("GET", "/votes/mine?round_id=" + encodeURIComponent(id) + "&voter_id=" + encodeURIComponent(voterId))]);
      if (round && round.id === id) {
        answers = body.responses;
        mine = new Map(votes.map((v) => [v.participantId, v.score]));
      }
      problem(null);
    } catch (error) {
      problem(error);
    } finally {
      loading = null;
    }
    draw();
  })();
  return loading;
}

function show(r) {
  if (!r || !round || r.id !== round.id) { answers = []; mine = new Map(); }
  round = r;
  refresh();
}

const ON = {
  state_snapshot: (m) => show(m.round),
  round_state: (m) => show(m.round),
  completion: () => refresh(),              // an answer that completes after the stop joins the list
};

async function poll() {
  const session = await api("GET", "/session");
  show(session.rounds.filter((r) => r.startedAt).pop() || null);
}

watch("voting", (m) => ON[m.type] && ON[m.type](m), poll);
draw();
''',
    "admin.html": r'''<header class="top"><h1 class="brand">HOST PANEL</h1><a data-page="arena" target="_blank">big screen</a> ·
  <a data-page="scoreboard" target="_blank">scoreboard</a> · <a data-page="voting" target="_blank">voting</a></header>
<p id="problem" class="error panel" hidden></p>
<form id="token-form" class="panel" hidden><label>Admin token (printed by the server at start-up)
  <input id="token" autocomplete="off" required></label> <button>Use</button></form>
<div class="grid">
  <section class="panel">
    <h2>Session</h2>
    <p>PIN <b id="pin" class="pin mono">none</b></p>
    <p class="dim" id="session-line"></p>
    <button id="new-session">New session</button>
  </section>
  <section class="panel">
    <h2>Round</h2>
    <form id="round-form">
      <textarea id="prompt" rows="3" required placeholder="The challenge, e.g. Write a haiku about llamas"></textarea>
      <div class="fields">
        <label>max tokens <input id="max-tokens" type="number" min="1" value="400"></label>
        <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
        <label>deadline (s) <input id="deadline" type="number" min="1" value="90"></label>
        <label>seed <input id="seed" type="number" min="0" placeholder="none"></label>
        <label><input id="svg-mode" type="checkbox"> SVG drawings</label>
      </div>
      <button id="start-round">Create and start</button>
    </form>
    <div class="actions"><button id="stop">Stop the round</button> <button id="close-voting">Close voting</button>
      <button id="reveal">Start the reveal</button> <button id="reveal-next">Reveal next</button></div>
    <p class="dim" id="round-line"></p>
  </section>
  <section class="panel">
    <h2 id="people-title">Connected</h2>
    <ul id="people" class="people"></ul>
  </section>
  <section class="panel">
    <h2>Rounds</h2>
    <ol id="rounds" class="rounds"></ol>
    <h2>Exports</h2>
    <div class="actions"><button data-export="/export.csv">answers.csv</button>
      <button data-export="/export-events.csv">events.csv</button>
      <button data-export="/export-all.json">everything.json</button></div>
  </section>
</div>
''',
    "admin.css": r'''.top{display:flex;gap:1rem;align-items:baseline;flex-wrap:wrap;margin-bottom:1rem}.top a{color:var(--info)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:1rem}
.grid h2{font-size:1.2rem;margin-bottom:.6rem}
.pin{font-size:3.5rem;color:var(--warn);letter-spacing:.1em}
textarea{width:100%}
.fields{display:flex;flex-wrap:wrap;gap:.6rem;margin:.6rem 0}.fields input[type=number]{width:6.5em}
.actions{display:flex;flex-wrap:wrap;gap:.5rem;margin:.8rem 0}
.people,.rounds{padding-left:1.2rem}.people li{margin:.3rem 0}.people button{margin-left:.6rem;padding:.1em .6em}
#problem{margin-bottom:1rem}
#token-form{margin-bottom:1rem}
''',
    "admin.js": r'''// The host panel: every button is one API call, and every refusal is shown in the API's words.
// The socket sends a snapshot only once a session exists; until then there is nothing to read.
let session = null, sessionExists = false;
for (const link of document.querySelectorAll("[data-page]")) link.href = BOOT.paths[link.dataset.page];

function problem(error) {
  $("problem").hidden = !error;
  $("problem").textContent = error ? error.message : "";
  // From another device host routes need the admin token: ask for it once, keep it for this tab.
  const refused = error && (error.status === 401 || (error.status === 403 && error.code === "FORBIDDEN"));
  if (refused) $("token-form").hidden = false;
}

async function act(step) {
  try {
    await step();
    problem(null);
  } catch (error) {
    problem(error);
  }
  await load();
}

const latest = () => (session ? session.rounds[session.rounds.length - 1] || null : null);

function stage(round) {
  if (!round.startedAt) return "created";
  if (!round.endedAt) return "running";
  const shown = round.votingStatus === "revealed" ? " (" + round.revealedCount + " shown)" : "";
  return "voting " + round.votingStatus + shown;
}

function draw() {
  const r = latest();
  $("pin").textContent = (session && session.pin) || (session ? "hidden" : "none");
  $("session-line").textContent =
    session ? "started " + new Date(session.createdAt).toLocaleTimeString() : "No session yet.";
  const connected = session ? session.participants.filter((p) => p.connected) : [];
  $("people-title").textContent = connected.length + " connected";
  $("people").replaceChildren(...connected.map((p) => h("li", {}, p.nickname + " · " + p.model,
    h("button", {onclick: () => act(() => api("POST", "/participants/kick", {participantId: p.id}))}, "kick"))));
  $("rounds").replaceChildren(...(session ? session.rounds : []).map((round) =>
    h("li", {}, round.prompt.slice(0, 60) + " · " + stage(round))));
  $("round-line").textContent = r ? "Round " + r.index + ": " + stage(r) : "";
}

async function load() {
  if (!sessionExists) return draw();
  try {
    session = await api("GET", "/session");
  } catch (error) {
    session = null;
    if (error.status !== 404) problem(error);
  }
  draw();
}

$("new-session").onclick = () => {
  // A new session mid-evening sends every runner away: the club's hosts pressed it by mistake.
  const runners = session ? session.participants.filter((p) => p.connected).length : 0;
  if (session && !confirm("A new session ends this one: its PIN stops working and every connected runner (" +
      runners + ") is sent away. Start a new session?")) return;
  act(async () => {
    await api("POST", "/session");
    sessionExists = true;
  });
};
$("round-form").onsubmit = (event) => {
  event.preventDefault();
  const seed = $("seed").value;
  act(async () => {
    const round = await api("POST", "/rounds", {prompt: $("prompt").value, maxTokens: Number($("max-tokens").value),
      temperature: Number($("temperature").value), deadlineMs: Math.round(Number($("deadline").value) * 1000),
      seed: seed === "" ? null : Number(seed), svgMode: $("svg-mode").checked});
    await api("POST", "/rounds/start", {roundId: round.id});
  });
};
$("stop").onclick = () => act(() => api("POST", "/rounds/stop"));
$("close-voting").onclick = () => act(() => api("POST", "/votes/close"));
$("reveal").onclick = () => act(() => api("POST", "/rounds/" + (latest() || {}).id + "/reveal"));
$("reveal-next").onclick = () => act(() => api("POST", "/rounds/" + (latest() || {}).id + "/reveal-next"));
$("token-form").onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem("adminToken", $("token").value.trim());
  $("token-form").hidden = true;
  load();
};
for (const button of document.querySelectorAll("[data-export]")) {
  // A download with the token in a header, which a plain link cannot send.
  button.onclick = () => act(async () => {
    const response = await fetch(button.dataset.export, {headers: authHeaders()});
    if (!response.ok) throw Object.assign(new Error((await response.json()).error), {status: response.status});
    const link = h("a", {href: URL.createObjectURL(await response.blob()),
      download: (/filename="([^"]+)"/.exec(response.headers.get("Content-Disposition")) || [])[1] || "export"});
    link.click();
    URL.revokeObjectURL(link.href);
  });
}

// Whatever happens (a session, a runner, a round) the panel reads the session again, once per burst.
let pending = null;
watch("admin", (m) => {
  if (m.type === "state_snapshot") sessionExists = true;
  if (m.type !== "registered_telao") pending = pending || setTimeout(() => { pending = null; load(); }, 300);
}, load);
draw();
''',
    "scoreboard.html": r'''<header class="top"><h1 class="brand">SCOREBOARD</h1><p id="round-line" class="dim"></p></header>
<p id="message" class="message"></p>
<section id="winner" class="panel winner" hidden></section>
<ol id="ranking" class="ranking"></ol>
''',
    "scoreboard.css": r'''body.scoreboard{font-size:clamp(14px,1.2vw,24px);max-width:90rem;margin:0 auto}
.top{display:flex;justify-content:space-between;align-items:baseline;margin-bottom:1rem}.top h1{font-size:2.4em}
.message{font-size:1.4em;margin-bottom:1rem}
.winner{margin-bottom:1rem;border-top:4px solid var(--warn)}.winner h2{font-size:2.4em;color:var(--warn)}
.winner pre{max-height:40vh;overflow:hidden;background:#0a0d1a;border-radius:.5rem;padding:.7em;margin-top:.6em}
.winner .svg-answer{max-height:40vh}
.ranking{list-style:none;padding:0;display:flex;flex-direction:column;gap:.5rem}
.ranking li{display:grid;grid-template-columns:3em 1fr 12em 5em 6em 6em;gap:1em;align-items:center;
background:var(--panel);border:1px solid var(--line);border-radius:.6rem;padding:.5em 1em}
.ranking .place{font-size:1.6em;font-weight:700;color:var(--accent)}.ranking .name{font-size:1.3em}
.ranking .avg{height:.6em;background:#0a0d1a;border-radius:.3em;overflow:hidden}
.ranking .avg i{display:block;height:100%;background:var(--done)}
.ranking small{color:var(--dim);display:block}
''',
    "scoreboard.js": r'''// The ceremony: votes coming in, then the ranking revealed last place first, then the winner.
let board = null, timer = null;

function row(entry, place) {
  return h("li", {}, h("span", {class: "place"}, "#" + place),
    h("span", {class: "name"}, entry.nickname, h("small", {}, entry.model || "")),
    h("span", {class: "avg"}, h("i", {style: "width:" + (entry.avg_score / 5) * 100 + "%"})),
    h("span", {}, entry.avg_score.toFixed(2), h("small", {}, entry.votes + " votes")),
    h("span", {}, entry.tps_avg.toFixed(1), h("small", {}, entry.engine_tps ?
      "tokens/s (engine " + entry.engine_tps.toFixed(1) + ")" : "tokens/s")),
    h("span", {}, entry.latency_first_token_ms === null ? "–" : entry.latency_first_token_ms + " ms",
      h("small", {}, "TTFT")));
}

function draw() {
  const b = board, entries = b ? b.scoreboard : [];
  $("round-line").textContent = b ? "Round " + b.round_index : "";
  $("winner").hidden = true;
  let shown = [];
  if (!b) $("message").textContent = "No round has ended yet.";
  else if (b.votingStatus === "open") {
    const votes = entries.reduce((sum, e) => sum + e.votes, 0);
    $("message").textContent = "Voting is open: " + votes + " votes so far for " + entries.length + " answers.";
  } else if (b.votingStatus !== "revealed") $("message").textContent = "Voting is closed. The reveal is next.";
  else {
    // Best first; the reveal shows the last `revealedCount` places.
    shown = entries.map((e, i) => [e, i + 1]).slice(entries.length - b.revealedCount);
    const all = b.revealedCount >= entries.length && entries.length > 0;
    $("message").textContent = all ? "" : b.revealedCount + " of " + entries.length + " places revealed.";
    if (all) {
      const w = entries[0];
      $("winner").replaceChildren(h("p", {class: "dim"}, "The winner"), h("h2", {}, w.nickname),
        h("p", {class: "dim"}, (w.model || "") + " · " + w.avg_score.toFixed(2) + " average, " + w.votes + " votes"),
        answerView(w.generated_content, b.svgMode));
      $("winner").hidden = false;
    }
  }
  $("ranking").replaceChildren(...shown.map(([entry, place]) => row(entry, place)));
}

async function load(roundId) {
  try {
    board = await api("GET", "/scoreboard" + (roundId ? "?round_id=" + encodeURIComponent(roundId) : ""));
  } catch (error) {
    if (error.status !== 404) throw error;
    board = null;
  }
  draw();
  // Votes are not announced on the socket: while voting is open the count is fetched every 2 s.
  clearTimeout(timer);
  if (board && board.votingStatus === "open") timer = setTimeout(() => load(board.round_id).catch(() => {}), 2000);
}

const ON = {
  state_snapshot: (m) => (m.round && m.round.endedAt ? load(m.round.id) : draw()),
  round_state: (m) => (m.round.endedAt ? load(m.round.id) : null),
};

watch("scoreboard", (m) => ON[m.type] && Promise.resolve(ON[m.type](m)).catch(() => {}), () => load());
''',
}


if __name__ == "__main__":
    main()
