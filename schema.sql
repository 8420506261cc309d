-- AbstractGateway durable schema (SQLite, WAL).
--
-- One file holds all durable state: runs, ledgers, the command inbox, artifacts,
-- uploaded bundles, and the gateway's own bookkeeping.
--
-- Layout of this file: forward-only migrations.  Each block starts with a line
-- `-- migrate: N` and upgrades a database from user_version N-1 to N.  At open
-- time the gateway applies, in one transaction, every block above the file's
-- PRAGMA user_version, then sets user_version to the highest N.  A database
-- whose user_version is above the highest N here was written by a newer
-- gateway and is refused.  Never edit a released block: append a new one.

-- migrate: 1
-- Checkpointed RunState JSON plus the columns the gateway filters on.
CREATE TABLE runs (
  run_id        TEXT PRIMARY KEY,
  workflow_id   TEXT NOT NULL,
  status        TEXT NOT NULL,
  wait_reason   TEXT,
  wait_key      TEXT,
  wait_until    TEXT,
  parent_run_id TEXT,
  actor_id      TEXT,
  session_id    TEXT,
  created_at    TEXT NOT NULL DEFAULT '',
  updated_at    TEXT NOT NULL DEFAULT '',
  run_json      TEXT NOT NULL
);
CREATE INDEX runs_by_updated  ON runs(updated_at DESC);
CREATE INDEX runs_by_status   ON runs(status, updated_at DESC);
CREATE INDEX runs_by_workflow ON runs(workflow_id, updated_at DESC);
CREATE INDEX runs_by_session  ON runs(session_id, updated_at DESC);
CREATE INDEX runs_by_parent   ON runs(parent_run_id);
CREATE INDEX runs_by_wait_key ON runs(wait_key) WHERE status = 'waiting';
CREATE INDEX runs_due_until   ON runs(wait_until) WHERE status = 'waiting' AND wait_reason = 'until';

-- Append-only ledger: seq is 1-based and gapless per run (the HTTP cursor space).
CREATE TABLE ledger (
  run_id      TEXT NOT NULL,
  seq         INTEGER NOT NULL,
  record_json TEXT NOT NULL,
  PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

-- Durable command inbox: a global, strictly increasing seq; idempotent by command_id.
CREATE TABLE commands (
  seq          INTEGER PRIMARY KEY AUTOINCREMENT,
  command_id   TEXT NOT NULL UNIQUE,
  run_id       TEXT NOT NULL,
  type         TEXT NOT NULL,
  payload_json TEXT NOT NULL,
  ts           TEXT NOT NULL,
  client_id    TEXT
);
CREATE INDEX commands_by_run ON commands(run_id, seq);

-- Consumer cursors over the inbox (the runner's is 'gateway_runner').
CREATE TABLE command_cursors (
  consumer_id TEXT PRIMARY KEY,
  cursor      INTEGER NOT NULL,
  updated_at  TEXT NOT NULL
);

-- Artifacts: metadata per artifact, content deduplicated by sha256 in artifact_blobs.
CREATE TABLE artifact_blobs (
  sha256  TEXT PRIMARY KEY,
  content BLOB NOT NULL
);
CREATE TABLE artifacts (
  artifact_id  TEXT PRIMARY KEY,
  run_id       TEXT,
  content_type TEXT NOT NULL,
  size_bytes   INTEGER NOT NULL,
  created_at   TEXT NOT NULL,
  sha256       TEXT NOT NULL REFERENCES artifact_blobs(sha256),
  tags_json    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX artifacts_by_run ON artifacts(run_id, created_at DESC);
CREATE INDEX artifacts_by_created ON artifacts(created_at DESC);

-- Uploaded .flow bundles (the bytes live here, not on disk).
CREATE TABLE bundles (
  bundle_id      TEXT NOT NULL,
  bundle_version TEXT NOT NULL,
  content        BLOB NOT NULL,
  sha256         TEXT NOT NULL,
  uploaded_at    TEXT NOT NULL,
  PRIMARY KEY (bundle_id, bundle_version)
);

-- Named leases (the runner's single-ticker lease is 'runner').
CREATE TABLE leases (
  name         TEXT PRIMARY KEY,
  owner        TEXT NOT NULL,
  acquired_at  REAL NOT NULL,
  heartbeat_at REAL NOT NULL,
  expires_at   REAL NOT NULL
);

-- migrate: 2
-- Outcome of every applied (or refused) inbox command, written in the same
-- transaction as the command's effect: this is what makes application exactly-once.
CREATE TABLE command_outcomes (
  seq        INTEGER PRIMARY KEY,
  command_id TEXT NOT NULL,
  run_id     TEXT NOT NULL,
  status     TEXT NOT NULL CHECK (status IN ('applied', 'failed')),
  error      TEXT,
  applied_at TEXT NOT NULL
);
CREATE INDEX command_outcomes_by_run ON command_outcomes(run_id, seq);

-- Workflow deprecations (flow_id '*' = every entrypoint of the bundle).
CREATE TABLE deprecations (
  bundle_id     TEXT NOT NULL,
  flow_id       TEXT NOT NULL,
  reason        TEXT,
  deprecated_at TEXT NOT NULL,
  PRIMARY KEY (bundle_id, flow_id)
);

-- Gateway-generated workflows (schedule wrappers), so schedules survive restarts.
CREATE TABLE dynamic_flows (
  workflow_id TEXT PRIMARY KEY,
  flow_json   TEXT NOT NULL,
  created_at  TEXT NOT NULL,
  updated_at  TEXT NOT NULL
);

-- Small key/value settings (e.g. the generated API token).
CREATE TABLE settings (
  key        TEXT PRIMARY KEY,
  value      TEXT NOT NULL,
  updated_at TEXT NOT NULL
);

-- Audit log of write requests, size-bounded by the gateway.
CREATE TABLE audit_log (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  ts          TEXT NOT NULL,
  request_id  TEXT NOT NULL,
  client_ip   TEXT,
  method      TEXT NOT NULL,
  path        TEXT NOT NULL,
  status      INTEGER NOT NULL,
  duration_ms REAL NOT NULL,
  token_fp    TEXT,
  headers_json TEXT NOT NULL DEFAULT '{}'
);

-- migrate: 3
-- Lease fencing: every acquisition by a new holder bumps the epoch, and a runner's
-- writes commit only while (owner, epoch) still match, so a runner that stalled past
-- its lease can never write after another took over.
ALTER TABLE leases ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;

-- migrate: 4
-- Per-run counters behind `GET /runs?include_metrics=true`, so listing runs never parses ledgers.
-- SqliteLedgerStore adds each appended record's counts in the same transaction as the insert
-- (`SqliteLedgerStore.count_step`); this block backfills them from the ledgers already there.
-- Counted like the original gateway: completed records, their llm_call effects, the tool calls of
-- tool_calls effects, and the llm_call results' usage.total_tokens.
CREATE TABLE run_metrics (
  run_id       TEXT PRIMARY KEY,
  steps        INTEGER NOT NULL DEFAULT 0,
  llm_calls    INTEGER NOT NULL DEFAULT 0,
  tool_calls   INTEGER NOT NULL DEFAULT 0,
  tokens_total INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO run_metrics (run_id, steps, llm_calls, tool_calls, tokens_total)
SELECT run_id, COUNT(*),
       SUM(json_extract(record_json, '$.effect.type') IS 'llm_call'),
       SUM(CASE WHEN json_extract(record_json, '$.effect.type') IS 'tool_calls'
                THEN COALESCE(json_array_length(record_json, '$.effect.payload.tool_calls'), 0) ELSE 0 END),
       SUM(CASE WHEN json_extract(record_json, '$.effect.type') IS 'llm_call'
                THEN COALESCE(CAST(json_extract(record_json, '$.result.usage.total_tokens') AS INTEGER), 0) ELSE 0 END)
FROM ledger
WHERE json_valid(record_json) AND json_extract(record_json, '$.status') = 'completed'
GROUP BY run_id;

-- The original gateway's audit fields (its JSONL lines are what `GET /audit/tail` serves).
ALTER TABLE audit_log ADD COLUMN query TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN auth_required INTEGER NOT NULL DEFAULT 0;
ALTER TABLE audit_log ADD COLUMN origin TEXT;
ALTER TABLE audit_log ADD COLUMN user_agent TEXT;
ALTER TABLE audit_log ADD COLUMN bytes_in INTEGER;
ALTER TABLE audit_log ADD COLUMN error TEXT;

-- migrate: 5
-- Reports inbox: bug reports and feature requests filed by thin clients, kept as
-- Markdown documents in the database (not as loose files). `filename` is the stable
-- handle clients use (`<date>_<slug>.md`, unique per report type).
CREATE TABLE reports (
  report_type   TEXT NOT NULL CHECK (report_type IN ('bug', 'feature')),
  filename      TEXT NOT NULL,
  title         TEXT NOT NULL,
  created_at    TEXT NOT NULL,
  session_id    TEXT NOT NULL,
  workflow_id   TEXT NOT NULL DEFAULT '',
  active_run_id TEXT NOT NULL DEFAULT '',
  content       TEXT NOT NULL,
  PRIMARY KEY (report_type, filename)
);
CREATE INDEX reports_by_created ON reports(report_type, created_at DESC);

-- migrate: 6
-- Before each effect the runtime looks for a completed step with the same idempotency key, to reuse
-- its result instead of doing the effect again (`SqliteLedgerStore.completed_record`). This index
-- finds it without reading the run's whole ledger, which made a long-lived run (a schedule firing
-- for months) slower with every step. Records that are not JSON are left out, so they can't fail.
CREATE INDEX ledger_completed_by_key ON ledger (run_id, json_extract(record_json, '$.idempotency_key'))
  WHERE json_valid(record_json, 2) AND json_extract(record_json, '$.status') = 'completed';

-- migrate: 7
-- A resume of a run that waits with a key (an answer, an approval, an event, a subflow's end) looks
-- for the tool-call wait it answers among the run's waiting records with that key (`Runtime.resume`,
-- through `SqliteLedgerStore.waiting_records`). This index finds them without reading the run's whole
-- ledger, which made each execution of a long-lived schedule slower than the last.
CREATE INDEX ledger_waiting_by_key ON ledger (run_id, json_extract(record_json, '$.result.wait.wait_key'))
  WHERE json_valid(record_json, 2) AND json_extract(record_json, '$.status') = 'waiting';
