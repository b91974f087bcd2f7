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
