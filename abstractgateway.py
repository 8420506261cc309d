"""AbstractGateway: a durable run gateway for AbstractRuntime workflows, in one module.

Contents, in dependency order (each section uses only what stands above it):

1. Config      -- `SETTINGS` (env var, CLI flag, default, help: one table drives both) and `Config`.
2. Storage     -- 2.1 the engine: `Database` (apsw, WAL, per-thread connections, group commit,
                  `Signals`, storage errors, refusal of damaged files), `LeaseStore` (fencing epochs);
                  2.2 the store interfaces both backends implement (`RunStorage`, `LedgerStorage`,
                  `CommandStorage`, `CursorStorage`, `ArtifactStorage`); 2.3 the SQLite stores the
                  runtime accepts (`SqliteRunStore`, `SqliteLedgerStore`, `SqliteCommandStore`,
                  `SqliteCommandCursorStore`, `SqliteArtifactStore`); 2.4 the gateway's own stores
                  (bundles, command outcomes, deprecations, settings, audit, reports); 2.5 the file-store
                  adapter and `open_stores`; 2.6 `UnitOfWork` (a runtime step's writes collected and
                  committed together); 2.7 the migrator and check (backup is `Database.backup_to`).
3. Workflows   -- `read_bundle` (hostile-input-safe .flow parsing), `WorkflowHost` (load, compile,
                  resolve, deprecate; also the runtime's workflow registry), `LLMEffects` (LLM,
                  agent and tool effects wired from abstractruntime's AbstractCore integration, the
                  `llm` extra), schedules (definition, update, wrapper workflow) and provider discovery.
4. Runner      -- `Gateway` (start runs, ticks, subflow parents), `CommandInbox` (durable commands
                  applied exactly once, in batches), `Runner` (lease-held thread pool woken by
                  commits), and the services thin clients call: `Workspace` (confined file reads),
                  session attachments, the reports inbox, `KnowledgeGraph` (AbstractMemory's triple
                  store).
5. HTTP        -- `ROUTES` (drives dispatch, `openapi_document()`, each route's security and
                  limits, and what the server may do cheaper: quick reads, shared commits;
                  `route_match` matches a request once), `GatewayApp` (WSGI),
                  `LedgerStream` (push-based SSE with resume), the offline `/docs` page, the operator
                  console (files beside this module, served with a strict CSP), `HttpServer`
                  (keep-alive, selector + worker pool, quick reads on the selector, commands
                  acknowledged by one shared commit, one SSE stream-writer thread).
6. Security    -- WSGI middlewares (CORS, request id, audit, origin, lockout, auth, body limit,
                  concurrency), `SecurityPolicy`, `secure_app`/`build_wsgi`, token bootstrap.
7. CLI         -- `main()`: `serve`, `runner`, `doctor`, `token`, `audit`, `migrate`, `backup`, `check`.

The DDL lives in `schema.sql` beside this file (forward-only migrations keyed by
`PRAGMA user_version`).
"""

from __future__ import annotations

import argparse
import base64
import contextvars
import errno
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import stat
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import weakref
import zlib
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Protocol,
                    Sequence, Tuple, TypeVar, runtime_checkable)

import apsw
from abstractruntime.core.models import EffectType, RunState, RunStatus, StepRecord, StepStatus, WaitReason
from abstractruntime.core.run_lifecycle import run_lifecycle_index_fields
from abstractruntime.storage.artifacts import (
    Artifact,
    ArtifactMetadata,
    ArtifactStore,
    FileArtifactStore,
    compute_artifact_id,
    validate_artifact_id,
)
from abstractruntime.storage.base import LedgerStore, RunStore
from abstractruntime.storage.commands import (
    CommandAppendResult,
    CommandRecord,
    JsonFileCommandCursorStore,
    JsonlCommandStore,
)
from abstractruntime.storage.json_files import JsonFileRunStore, JsonlLedgerStore
from abstractruntime.storage.sqlite import _runstate_from_dict as run_from_dict
from abstractruntime.workflow_bundle.registry import _pick_latest_version

__version__ = "0.1.0"

T = TypeVar("T")


def utc_now_iso() -> str:
    """Current UTC time as an ISO-8601 string (the runtime's timestamp format)."""
    return datetime.now(timezone.utc).isoformat()


# =====================================================================================
# 1. Config
# =====================================================================================


@dataclass(frozen=True)
class Setting:
    """One configuration value: its env var, CLI flag, type, default and help text."""

    name: str
    env: str
    kind: str  # str | int | float | bool | path | dir | choice | mounts
    default: Any
    help: str
    flag: Optional[str] = None
    choices: Tuple[str, ...] = ()
    minimum: float = 1  # numeric settings below this are refused
    default_doc: str = ""  # how to describe a computed default
    legacy: Tuple[str, ...] = ()  # older names read when `env` is unset (AbstractFlow's gateway), besides
    # `ABSTRACTFLOW_GATEWAY_<X>`, which every setting but the audit log's takes, as on the original

    def env_names(self) -> Tuple[str, ...]:
        """`env`, then the older names it replaces."""
        generic = self.env.replace("ABSTRACTGATEWAY_", "ABSTRACTFLOW_GATEWAY_", 1)
        return (self.env, *self.legacy, *(() if self.name.startswith("audit_") else (generic,)))

    def describe_default(self) -> str:
        if self.default_doc:
            return self.default_doc
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        return str(self.default) if self.default != "" else "(unset)"


def _default_data_dir(_values: Dict[str, Any]) -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("abstractgateway", appauthor=False))


SETTINGS: Tuple[Setting, ...] = (
    Setting(name="data_dir", env="ABSTRACTGATEWAY_DATA_DIR", flag="--data-dir", kind="path", default=_default_data_dir,
            help="Directory for the database, uploaded flows and run workspaces.",
            default_doc="the platform's user data dir (e.g. ~/.local/share/abstractgateway)",
            legacy=("ABSTRACTFLOW_RUNTIME_DIR",)),
    Setting(name="db_path", env="ABSTRACTGATEWAY_DB_PATH", flag="--db-path", kind="path",
            default=lambda v: v["data_dir"] / "gateway.sqlite3", help="The SQLite file that holds all durable state.",
            default_doc="<data dir>/gateway.sqlite3"),
    Setting(name="store_backend", env="ABSTRACTGATEWAY_STORE_BACKEND", flag="--store-backend", kind="choice",
            default="sqlite", choices=("sqlite", "file"),
            help="Where runs, ledgers, commands and artifacts live: `sqlite` (one file) or `file` "
                 "(the upstream JSON/JSONL layout under the data dir)."),
    Setting(name="synchronous", env="ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS", flag="--synchronous", kind="choice",
            default="FULL", choices=("FULL", "NORMAL"),
            help="SQLite durability: FULL survives power loss for every acknowledged write; NORMAL is faster "
                 "but may lose the last commits on power loss (never corrupts)."),
    Setting(name="busy_timeout_s", env="ABSTRACTGATEWAY_SQLITE_BUSY_TIMEOUT_S", kind="float", default=5.0, minimum=0.05,
            help="How long a write waits for another writer (e.g. a stalled process) before it is answered 503 "
                 "`database_busy`."),
    Setting(name="flows_dir", env="ABSTRACTGATEWAY_FLOWS_DIR", flag="--flows-dir", kind="path",
            default=lambda v: v["data_dir"] / "flows",
            help="A directory of `.flow` bundles (or one `.flow` file) loaded next to the uploaded ones. A `.flow` "
                 "there that is not a regular file of at most 200 MiB (a FIFO, a device) is a load error, never read.",
            default_doc="<data dir>/flows",
            legacy=("ABSTRACTFRAMEWORK_WORKFLOWS_DIR", "ABSTRACTFLOW_FLOWS_DIR")),
    Setting(name="workflow_source", env="ABSTRACTGATEWAY_WORKFLOW_SOURCE", flag="--workflow-source", kind="choice",
            default="bundle", choices=("bundle", "visualflow"),
            help="`bundle` (.flow bundles) or `visualflow` (a flows dir of VisualFlow `*.json`)."),
    Setting(name="runner", env="ABSTRACTGATEWAY_RUNNER", kind="bool", default=True,
            help="Run the runner (command application and ticks) inside `serve`."),
    Setting(name="poll_s", env="ABSTRACTGATEWAY_POLL_S", flag="--poll-s", kind="float", default=0.25, minimum=0.001,
            help="Fallback poll interval for work written by another process (in-process work wakes the runner at "
                 "once)."),
    Setting(name="tick_workers", env="ABSTRACTGATEWAY_TICK_WORKERS", flag="--tick-workers", kind="int", default=4,
            help="Runner threads that tick runs."),
    Setting(name="tick_max_steps", env="ABSTRACTGATEWAY_TICK_MAX_STEPS", kind="int", default=100,
            help="Nodes executed per tick."),
    Setting(name="command_batch_limit", env="ABSTRACTGATEWAY_COMMAND_BATCH_LIMIT", kind="int", default=200,
            help="Commands applied per runner iteration."),
    Setting(name="run_scan_limit", env="ABSTRACTGATEWAY_RUN_SCAN_LIMIT", kind="int", default=200,
            help="Runs considered for ticking per runner iteration."),
    Setting(name="schedule_min_interval_s", env="ABSTRACTGATEWAY_SCHEDULE_MIN_INTERVAL_S", kind="float", default=0.1,
            minimum=0.001,
            help="Shortest interval a schedule may repeat at (a shorter one is refused with 422, so one schedule "
                 "cannot flood the gateway with child runs)."),
    Setting(name="provider", env="ABSTRACTGATEWAY_PROVIDER", flag="--provider", kind="str", default="",
            help="Default LLM provider (e.g. `openai`, `lmstudio`, `ollama`) for LLM and agent nodes that pin none. "
                 "Unset: inferred from the loaded flows' pinned nodes. Base URLs and keys come from each provider's "
                 "own env vars (OPENAI_BASE_URL, OPENAI_API_KEY, LMSTUDIO_BASE_URL, OLLAMA_BASE_URL, ...).",
            legacy=("ABSTRACTFLOW_PROVIDER",)),
    Setting(name="model", env="ABSTRACTGATEWAY_MODEL", flag="--model", kind="str", default="",
            help="Default model for LLM and agent nodes that pin none (with ABSTRACTGATEWAY_PROVIDER).",
            legacy=("ABSTRACTFLOW_MODEL",)),
    Setting(name="llm_concurrency", env="ABSTRACTGATEWAY_LLM_CONCURRENCY", flag="--llm-concurrency", kind="int",
            default=128,
            help="Model calls in flight at once across all runs (1 for a single local model on a small machine)."),
    Setting(name="llm_timeout_s", env="ABSTRACTGATEWAY_LLM_TIMEOUT_S", kind="float", default=600.0,
            help="A model call not answered after this long fails its step (the run fails, saying why) and frees "
                 "its slot (the model server is taken for stalled); it is also the provider's request timeout and "
                 "retry budget."),
    Setting(name="llm_attempts", env="ABSTRACTGATEWAY_LLM_ATTEMPTS", kind="int", default=3,
            help="Attempts per model call, as on the original: a call that fails (the model server errs, or does "
                 "not answer within ABSTRACTGATEWAY_LLM_TIMEOUT_S) is made again after 1 s, then 2 s, each attempt "
                 "recorded in the ledger; 1 makes no second attempt."),
    Setting(name="tool_mode", env="ABSTRACTGATEWAY_TOOL_MODE", flag="--tool-mode", kind="choice", default="passthrough",
            choices=("passthrough", "local"),
            help="`passthrough`: a tool call becomes a durable approval wait a client answers; `local`: the gateway "
                 "runs the runtime's default tools itself (shell, files, web: DANGEROUS, see docs/security.md)."),
    Setting(name="allow_local_tools_on_network", env="ABSTRACTGATEWAY_ALLOW_LOCAL_TOOLS_ON_NETWORK", kind="bool",
            default=False,
            help="Let `serve` bind a non-loopback address with ABSTRACTGATEWAY_TOOL_MODE=local (refused otherwise)."),
    Setting(name="host", env="ABSTRACTGATEWAY_HOST", flag="--host", kind="str", default="127.0.0.1",
            help="Address `serve` binds to."),
    Setting(name="port", env="ABSTRACTGATEWAY_PORT", flag="--port", kind="int", default=8080, minimum=0,
            help="Port `serve` listens on (0 picks a free one)."),
    Setting(name="console", env="ABSTRACTGATEWAY_CONSOLE", kind="bool", default=True,
            help="Serve the operator console (a web page driving the API with the bearer token) at `/` and "
                 "`/console`; 0 turns it off (404)."),
    Setting(name="security", env="ABSTRACTGATEWAY_SECURITY", kind="bool", default=True,
            help="Enable the security middleware on /api/gateway/* (auth, origins, limits, lockout, audit)."),
    Setting(name="auth_token", env="ABSTRACTGATEWAY_AUTH_TOKEN", kind="str", default="",
            help="Bearer token(s), comma-separated. Unset: a strong token is generated on first `serve` and kept in "
                 "the database (`abstractgateway token show`)."),
    Setting(name="auth_tokens", env="ABSTRACTGATEWAY_AUTH_TOKENS", kind="str", default="",
            help="More bearer tokens, comma-separated."),
    Setting(name="protect_read", env="ABSTRACTGATEWAY_PROTECT_READ", kind="bool", default=True,
            help="Require the token for GET/HEAD."),
    Setting(name="protect_write", env="ABSTRACTGATEWAY_PROTECT_WRITE", kind="bool", default=True,
            help="Require the token for writes."),
    Setting(name="dev_read_no_auth", env="ABSTRACTGATEWAY_DEV_READ_NO_AUTH", kind="bool", default=False,
            help="Let loopback clients read without a token (development only)."),
    Setting(name="allowed_origins", env="ABSTRACTGATEWAY_ALLOWED_ORIGINS", kind="str",
            default="http://localhost:*,http://127.0.0.1:*",
            help="Browser origins allowed (comma-separated; `*`, `?`, `[` are glob patterns; `*` alone allows all)."),
    Setting(name="max_body_bytes", env="ABSTRACTGATEWAY_MAX_BODY_BYTES", kind="int", default=256_000,
            help="Cap on a write request's body (413 above it)."),
    Setting(name="max_upload_body_bytes", env="ABSTRACTGATEWAY_MAX_UPLOAD_BODY_BYTES", kind="int", default=0, minimum=0,
            help="Extra cap on upload bodies (0: the endpoint cap plus 2 MiB of multipart overhead)."),
    Setting(name="max_attachment_bytes", env="ABSTRACTGATEWAY_MAX_ATTACHMENT_BYTES", kind="int", default=26_214_400,
            help="Largest attachment (upload or workspace ingest), in bytes; upload bodies may add 2 MiB of "
                 "multipart."),
    Setting(name="workspace_dir", env="ABSTRACTGATEWAY_WORKSPACE_DIR", kind="dir", default="",
            help="The workspace root the files routes and attachment ingest read: a client names its files by "
                 "paths relative to it (as on the original). None by default (not the working directory): with "
                 "no root and no mount, those routes are refused."),
    Setting(name="workspace_mounts", env="ABSTRACTGATEWAY_WORKSPACE_MOUNTS", kind="mounts", default="",
            help="More directories the files routes and attachment ingest may read, named `mount/...` by clients: "
                 "`name=/abs/dir` entries separated by newlines or `;` (names `[A-Za-z0-9_-]`, at most 32 chars)."),
    Setting(name="max_bundle_bytes", env="ABSTRACTGATEWAY_MAX_BUNDLE_BYTES", kind="int", default=78_643_200,
            help="Cap on an uploaded `.flow` bundle."),
    Setting(name="max_concurrency", env="ABSTRACTGATEWAY_MAX_CONCURRENCY", kind="int", default=64,
            help="Concurrent non-SSE API requests (429 above it). The HTTP workers bound them too: past 4 x "
                 "ABSTRACTGATEWAY_HTTP_WORKERS, requests wait for a worker instead."),
    Setting(name="max_sse", env="ABSTRACTGATEWAY_MAX_SSE", kind="int", default=32,
            help="Concurrent SSE streams (429 above it)."),
    Setting(name="lockout_after", env="ABSTRACTGATEWAY_LOCKOUT_AFTER", kind="int", default=5,
            help="Auth failures before an IP is locked out."),
    Setting(name="lockout_base_s", env="ABSTRACTGATEWAY_LOCKOUT_BASE_S", kind="float", default=1.0, minimum=0,
            help="First lockout length; doubles with each further failure."),
    Setting(name="lockout_max_s", env="ABSTRACTGATEWAY_LOCKOUT_MAX_S", kind="float", default=60.0, minimum=0,
            help="Longest lockout (0: uncapped)."),
    Setting(name="lockout_decay_s", env="ABSTRACTGATEWAY_LOCKOUT_DECAY_S", kind="float", default=900.0,
            help="Half-life of an IP's failure count, so old mistakes fade."),
    Setting(name="trust_proxy", env="ABSTRACTGATEWAY_TRUST_PROXY", kind="bool", default=False,
            help="Take the client IP from X-Forwarded-For (only behind a proxy that overwrites it)."),
    Setting(name="audit_log", env="ABSTRACTGATEWAY_AUDIT_LOG", kind="bool", default=True,
            help="Record every write request in the audit log."),
    Setting(name="audit_log_max_bytes", env="ABSTRACTGATEWAY_AUDIT_LOG_MAX_BYTES", kind="int", default=52_428_800,
            minimum=0, help="Audit log size per generation (0: unbounded)."),
    Setting(name="audit_log_rotations", env="ABSTRACTGATEWAY_AUDIT_LOG_ROTATIONS", kind="int", default=10, minimum=0,
            help="Older generations kept: the log holds about max_bytes x (rotations + 1)."),
    Setting(name="audit_log_headers", env="ABSTRACTGATEWAY_AUDIT_LOG_HEADERS", kind="str",
            default="x-client-id,x-client-version,x-forwarded-for",
            help="Request headers copied into audit rows (comma-separated, never Authorization)."),
    Setting(name="request_timeout_s", env="ABSTRACTGATEWAY_REQUEST_TIMEOUT_S", kind="float", default=15.0, minimum=0.1,
            help="A request's headers must arrive within this long of its first byte, and its body must not stall "
                 "this long (408); an SSE client that reads nothing this long while data waits is dropped."),
    Setting(name="max_threads", env="ABSTRACTGATEWAY_MAX_THREADS", kind="int", default=256,
            help="Requests in progress at once (headers being read or being served); more get an immediate 503. "
                 "Idle connections do not count."),
    Setting(name="idle_timeout_s", env="ABSTRACTGATEWAY_IDLE_TIMEOUT_S", kind="float", default=5.0, minimum=0.1,
            help="A connection with no request in progress (new, or kept alive after one) is closed after this long."),
    Setting(name="http_workers", env="ABSTRACTGATEWAY_HTTP_WORKERS", kind="int", default=8,
            help="Worker threads that serve requests (long-lived, each with a warm database connection). While "
                 "requests wait behind slow ones on all of them, more are started, up to four times this many; "
                 "each extra one ends after 10 s without work."),
    Setting(name="max_connections", env="ABSTRACTGATEWAY_MAX_CONNECTIONS", kind="int", default=4096,
            help="Open connections (SSE streams aside); when full, the longest-idle one is closed to admit a new "
                 "client (503 only when none is idle)."),
    Setting(name="sse_max_buffer_bytes", env="ABSTRACTGATEWAY_SSE_MAX_BUFFER_BYTES", kind="int", default=1_048_576,
            help="Unsent bytes an SSE stream may hold before it gets no more records until its client reads."),
    Setting(name="lease_ttl_s", env="ABSTRACTGATEWAY_RUNNER_LEASE_TTL_S", kind="float", default=5.0, minimum=0.1,
            help="Seconds before a silent runner's lease expires and another runner takes over."),
)


def settings_table(markdown: bool = True) -> str:
    """The settings as a Markdown table (docs/configuration.md) or plain text (`--help`)."""
    if markdown:
        rows = ["| env var | CLI flag | default | meaning |", "|---|---|---|---|"]
        for st in SETTINGS:
            rows.append(f"| `{st.env}` | {f'`{st.flag}`' if st.flag else ''} | `{st.describe_default()}` | "
                        f"{st.help.replace('|', '/')} |")
        return "\n".join(rows)
    return "\n".join(f"  {st.env:<40} {st.describe_default()}" for st in SETTINGS)


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


# The words pydantic takes for a boolean (as the original parses its query flags and JSON fields).
_TRUE_WORDS = frozenset(("1", "true", "t", "yes", "y", "on"))
_FALSE_WORDS = frozenset(("0", "false", "f", "no", "n", "off"))


def _parse_flag(text: str) -> bool:
    word = text.lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise ValueError(f"expected a boolean, got {text!r}")


def _setting_flag(raw: Any) -> bool:
    """A flag setting: the words a request flag takes (`_parse_flag`), around spaces; empty is off."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip()
    return bool(text) and _parse_flag(text)


def _existing_dir(raw: Any) -> str:
    """An existing directory other than `/`, resolved; unset stays "" (never the working directory)."""
    text = str(raw or "").strip()
    if text and not Path(text).expanduser().is_dir():
        raise ValueError(f"{text!r} is not a directory")
    real = os.path.realpath(Path(text).expanduser()) if text else ""
    if real == os.path.sep:
        raise ValueError("the filesystem root would expose /proc, /etc and every user's files")
    return real


def _parse_setting(setting: Setting, raw: Any) -> Any:
    if setting.kind == "choice":
        text = str(raw).strip()
        for choice in setting.choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(setting.choices)}, got {raw!r}")
    parse = {"mounts": parse_workspace_mounts, "dir": _existing_dir, "path": lambda r: Path(str(r)).expanduser(),
             "int": int, "float": float, "bool": _setting_flag}.get(setting.kind, str)
    return parse(raw)


def parse_workspace_mounts(raw: Any) -> Dict[str, Path]:
    """`name=/abs/dir` entries (newline- or `;`-separated) -> {name: resolved dir}.

    Refuses, rather than skips, a bad entry: a mount silently missing would only show up
    later as files the operator expected clients to reach.
    """
    if isinstance(raw, dict):
        return dict(raw)
    mounts: Dict[str, Path] = {}
    for entry in str(raw or "").replace(";", "\n").splitlines():
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, path_text = entry.partition("=")
        name, path_text = name.strip(), path_text.strip()
        if not sep or not name or len(name) > 32 or not all(ch.isascii() and (ch.isalnum() or ch in "_-")
                                                            for ch in name):
            raise ValueError(f"expected name=/abs/dir with a name of [A-Za-z0-9_-]{{1,32}}, got {entry!r}")
        path = Path(path_text).expanduser()
        if not path.is_absolute():
            raise ValueError(f"mount {name!r}: the path must be absolute, got {path_text!r}")
        if not path.is_dir():
            raise ValueError(f"mount {name!r}: {path_text!r} is not a directory")
        if os.path.realpath(path) == os.path.sep:
            raise ValueError(f"mount {name!r}: the filesystem root would expose /proc, /etc and every user's files")
        if name in mounts:
            raise ValueError(f"mount {name!r} is given twice")
        mounts[name] = Path(os.path.realpath(path))
    return mounts


class Config:
    """Resolved settings, each an attribute named after `Setting.name`.

    `sources[name]` says where a value came from: `default`, `env` or `flag`.
    """

    def __init__(self, values: Dict[str, Any], sources: Dict[str, str]) -> None:
        self.__dict__.update(values)
        self.sources = dict(sources)

    @classmethod
    def load(cls, environ: Optional[Dict[str, str]] = None, overrides: Optional[Dict[str, Any]] = None) -> "Config":
        """Resolve every setting: CLI overrides win over the environment, which wins over defaults."""
        env = os.environ if environ is None else environ
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        values: Dict[str, Any] = {}
        sources: Dict[str, str] = {}
        for setting in SETTINGS:
            if setting.name in flags:
                raw, source = flags[setting.name], "flag"
            elif (name := next((n for n in setting.env_names() if env.get(n, "") != ""), None)) is not None:
                raw, source = env[name], "env" if name == setting.env else f"env ({name})"
            else:
                default = setting.default
                raw, source = (default(values) if callable(default) else default), "default"
            try:
                values[setting.name] = _parse_setting(setting, raw)
            except ValueError as exc:
                raise ConfigError(f"{setting.env}: {exc}") from None
            if setting.kind == "float" and not math.isfinite(values[setting.name]):
                raise ConfigError(f"{setting.env}: must be a finite number, got {raw!r}")
            if setting.kind in ("int", "float") and values[setting.name] < setting.minimum:
                raise ConfigError(f"{setting.env}: must be at least {setting.minimum:g}, got {raw!r}")
            sources[setting.name] = source
        return cls(values, sources)

    def replace(self, **changes: Any) -> "Config":
        """A copy with `changes` (setting name -> value, already parsed) applied."""
        names = {setting.name for setting in SETTINGS}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"not settings: {', '.join(unknown)}")
        return Config({**{name: getattr(self, name) for name in names}, **changes}, self.sources)


# =====================================================================================
# 2. Storage
# =====================================================================================


# -- 2.1 Engine: storage errors, schema, Signals, Database, leases ---------------------------------

SCHEMA_PATHS = ("schema.sql", "abstractgateway_schema.sql")
TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value})
LIVE_STATUSES = tuple(sorted(status.value for status in RunStatus if status.value not in TERMINAL_STATUSES))


class SchemaError(RuntimeError):
    """The database file cannot be used with this version of the gateway."""


class StorageError(RuntimeError):
    """The database could not take a read or write; `code` says why (the HTTP section picks a status).

    Raised instead of apsw's own errors so callers can tell a passing condition (busy, disk
    full) from a bug, and so the message never carries SQL or a traceback.
    """

    code = "storage_error"
    retry_after_s: Optional[int] = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class DatabaseBusy(StorageError):
    code, retry_after_s = "database_busy", 1


class DiskFull(StorageError):
    code, retry_after_s = "disk_full", 5


def storage_error(exc: BaseException) -> StorageError:
    """The `StorageError` that stands for an apsw error (or `exc` itself if it is one already)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (apsw.BusyError, apsw.LockedError)):
        return DatabaseBusy("The database is busy (another writer holds it); retry shortly.")
    if isinstance(exc, apsw.FullError) or getattr(exc, "system_errno", None) in _DISK_FULL_ERRNOS:
        return DiskFull("The disk holding the database is full; nothing was written. Free space and retry.")
    if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
        return StorageError("The database file is damaged; run `abstractgateway check` and restore from a backup.")
    if isinstance(exc, (apsw.IOError, apsw.CantOpenError, apsw.ReadOnlyError)):
        return StorageError("The database could not be read or written (I/O error); nothing was written.")
    return StorageError(f"Database error: {type(exc).__name__}.")


WRITE_FAILURE_MEMORY_S = 10.0  # how long health keeps reporting a failed write after commits succeed again
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # EFBIG: a file-size limit
_STORAGE_FAILURES = (apsw.BusyError, apsw.LockedError, apsw.FullError, apsw.IOError, apsw.CorruptError,
                     apsw.NotADBError, apsw.CantOpenError, apsw.ReadOnlyError)


def _read_schema_text() -> str:
    here = Path(__file__).resolve().parent
    for name in SCHEMA_PATHS:
        candidate = here / name
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    loader = globals().get("__loader__")
    get_data = getattr(loader, "get_data", None)
    if get_data is not None:  # running from a zip (the .pyz)
        for name in SCHEMA_PATHS:
            try:
                return get_data(str(here / name)).decode("utf-8")
            except OSError:
                continue
    raise SchemaError(f"schema.sql not found beside {__file__}")


def schema_migrations() -> List[Tuple[int, str]]:
    """The `(version, sql)` blocks of schema.sql, in ascending version order."""
    blocks: List[Tuple[int, List[str]]] = []
    for line in _read_schema_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("-- migrate:"):
            blocks.append((int(stripped.split(":", 1)[1]), []))
        elif blocks:
            blocks[-1][1].append(line)
    versions = [v for v, _ in blocks]
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"schema.sql migrations must be numbered 1..N in order, got {versions}")
    return [(v, "\n".join(lines)) for v, lines in blocks]


SCHEMA_VERSION = len(schema_migrations())


def apply_schema(conn: apsw.Connection, *, target: Optional[int] = None) -> int:
    """Upgrade `conn`'s database to `target` (default: latest) in one transaction; return the version."""
    migrations = schema_migrations()
    latest = migrations[-1][0]
    target = latest if target is None else target
    _begin_immediate(conn)
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > latest:
            raise SchemaError(
                f"database schema version {current} is newer than this gateway supports ({latest}); "
                "upgrade abstractgateway or open a backup made by this version"
            )
        for version, sql in migrations:
            if current < version <= target:
                conn.execute(sql)
        if target > current:
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise
    return max(current, target)


def _begin_immediate(conn: apsw.Connection, deadline_s: float = 10.0) -> None:
    """BEGIN IMMEDIATE, retrying past the connection's busy timeout until `deadline_s`; then BusyError.

    Bounded: a writer stopped while holding the lock (SIGSTOP, a hung disk) must turn into a
    `database_busy` answer, not into requests that wait forever."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except apsw.BusyError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.01)


@dataclass
class _Topic:
    """One watched topic: its version (bumped per commit), who waits on it and who is called back."""

    changed: threading.Condition
    version: int = 0
    subscribers: int = 0  # live `subscribe`/`watch` interests; the topic is dropped at zero
    callbacks: List[Callable[[str], None]] = field(default_factory=list)


class Signals:
    """In-process wake-ups keyed by topic (`ledger:<run_id>`, `work`).

    Only topics somebody subscribed to are tracked, so the table stays small. A subscriber
    snapshots `version` before reading the database and waits for it to change, so a commit
    that lands between the read and the wait is never missed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._topics: Dict[str, _Topic] = {}

    def bump(self, topics: Iterable[str]) -> None:
        calls = []
        with self._lock:
            for name in topics:
                topic = self._topics.get(name)
                if topic is not None:
                    topic.version += 1
                    topic.changed.notify_all()
                    calls.extend((callback, name) for callback in topic.callbacks)
        for callback, name in calls:
            callback(name)

    def _enter(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic(threading.Condition(self._lock))
        topic.subscribers += 1
        return topic

    def _leave(self, name: str, topic: _Topic) -> None:
        topic.subscribers -= 1
        if topic.subscribers == 0:
            self._topics.pop(name, None)

    def watch(self, topic: str, callback: Callable[[str], None]) -> None:
        """Call `callback(topic)` after each commit that touches `topic` (it must be quick and never block)."""
        with self._lock:
            self._enter(topic).callbacks.append(callback)

    def unwatch(self, topic: str, callback: Callable[[str], None]) -> None:
        with self._lock:
            entry = self._topics.get(topic)
            if entry is not None and callback in entry.callbacks:
                entry.callbacks.remove(callback)
                self._leave(topic, entry)

    @contextmanager
    def subscribe(self, topic: str) -> Iterator["Subscription"]:
        with self._lock:
            entry = self._enter(topic)
        try:
            yield Subscription(self._lock, entry)
        finally:
            with self._lock:
                self._leave(topic, entry)


class Subscription:
    """A live interest in one topic (see `Signals.subscribe`)."""

    def __init__(self, lock: threading.Lock, topic: _Topic) -> None:
        self._lock = lock
        self._topic = topic

    @property
    def version(self) -> int:
        with self._lock:
            return self._topic.version

    def wait(self, seen: int, timeout: float) -> bool:
        """Block until the version differs from `seen` or `timeout` passes; True if it changed."""
        with self._lock:
            if self._topic.version == seen:
                self._topic.changed.wait(timeout)
            return self._topic.version != seen


class _PendingWrite:
    """One queued write; `wake` is held until the write is committed or its thread is made leader."""

    __slots__ = ("fn", "topics", "single_statement", "result", "error", "done", "wake")

    def __init__(self, fn: Callable[[apsw.Connection], Any], topics: Sequence[str], single_statement: bool) -> None:
        self.fn = fn
        self.topics = topics
        self.single_statement = single_statement
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.done = False
        self.wake = threading.Lock()
        self.wake.acquire()


class _Transaction:
    __slots__ = ("conn", "topics", "isolated")

    def __init__(self, conn: apsw.Connection, isolated: bool = False) -> None:
        self.conn = conn
        self.topics: List[str] = []
        self.isolated = isolated  # each write joining it runs in a savepoint of its own (see `transaction`)


_SQLITE_HEADER = b"SQLite format 3\x00"
_RESTORE_HINT = "Run `abstractgateway check` for details, then restore from a backup (docs/operations.md)."


def _refuse_on_a_full_disk(path: Path, exc: Exception) -> None:
    """An I/O error opening a sound file on a full disk (SQLite needs room for its `-wal` and `-shm`)
    is said to be that, not damage: told to restore a backup, an operator may overwrite a good file."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < 1 << 20:
        raise SchemaError(f"The disk holding {path} is full ({free} bytes free): SQLite needs room beside the "
                          f"file to open it ({exc}). Free some space and start again; nothing was changed.") from None


def _stray_wal_hint(path: Path) -> str:
    """A file restored from a copy beside the old file's WAL reads as damaged: say so first."""
    wal = Path(f"{path}-wal")
    if not wal.exists() or wal.stat().st_size == 0:  # (an empty one is the failed open's own)
        return ""
    return (f"If it was just restored from a copy, the WAL beside it may be the old file's: move {path.name}-wal "
            f"and {path.name}-shm aside and start again (nothing was changed). Otherwise: ")


def _refuse_foreign_file(path: Path) -> None:
    """Refuse an existing file that is not an SQLite database: never initialise over it.

    An empty file is refused too: this gateway creates its databases whole (`_create_database`),
    so a 0-byte file is somebody else's, or what a failed copy or a full disk left behind."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise SchemaError(f"cannot read {path}: {exc.strerror}") from None
    if not head:
        raise SchemaError(f"{path} exists but is empty (0 bytes); refusing to initialise over it. If it is meant "
                          f"to be a new database, delete it; otherwise restore it from a backup.")
    if head != _SQLITE_HEADER:
        raise SchemaError(f"{path} is not an SQLite database; refusing to use or overwrite it. {_RESTORE_HINT}")


def _create_database(path: Path, synchronous: str) -> None:
    """Create a new database file whole: built beside it, then linked into place.

    So a crash while creating never leaves a half-made (or 0-byte) file at `path`, and two
    processes starting on the same fresh path never replace each other's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.new")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # owner-only: it will hold the token
    try:
        conn = apsw.Connection(str(tmp))
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            conn.execute(f"PRAGMA synchronous={synchronous}")
            apply_schema(conn)
        finally:
            conn.close()  # the last connection checkpoints and removes the WAL
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _remove_dead_leftovers(directory: Path, prefix: str, suffix: str) -> None:
    """Remove what a process killed while writing a file whole left behind: `{prefix}{pid}.{hex}{suffix}`
    (and its SQLite side files) of a pid that is gone (`_create_database`, `Database.backup_to`), and
    untouched for a minute (a process in another pid namespace, sharing the directory, may be writing it)."""
    name = re.compile(re.escape(prefix) + r"([0-9]{1,9})\.[0-9a-f]{6}" + re.escape(suffix) + r"(-wal|-shm|-journal)?")
    for leftover in directory.glob(f"{glob.escape(prefix)}[0-9]*{suffix}*"):
        match = name.fullmatch(leftover.name)
        try:
            idle_s = time.time() - leftover.stat().st_mtime
        except OSError:
            continue
        if match and idle_s > 60 and not _process_exists(int(match.group(1))):
            leftover.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """Make a rename or link in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WAL_MAGIC = (0x377F0682, 0x377F0683)  # the low bit: checksums over big-endian words


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> Tuple[int, int]:
    """SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(path: Path) -> Optional[str]:
    """Why the database's WAL holds committed transactions SQLite will not read, or None.

    SQLite reads a WAL up to its first frame whose salt or checksum does not match and silently
    drops the rest. After a crash that is only the tail of a transaction that never committed
    (frames are written in order, its commit frame last). A commit frame of this WAL beyond that
    point, or a header that does not check out in front of frames, means the file was damaged:
    acknowledged writes are gone once SQLite opens it (and its next write reuses the file).
    Another process may be writing the WAL meanwhile (restarting it under our read): damage is
    only reported if a second read, a moment later, finds it too."""
    first = _wal_damage_now(path)
    if first is None:
        return None
    time.sleep(0.05)
    return _wal_damage_now(path)


def _wal_damage_now(path: Path) -> Optional[str]:
    wal = Path(f"{path}-wal")
    try:
        info = wal.stat()
        if info.st_size <= 32 or not stat.S_ISREG(info.st_mode):
            return None
        with open(wal, "rb") as f:  # read frame by frame: a WAL can be as large as the largest transaction
            return _wal_walk(f, info.st_size)
    except OSError:
        return None


def _wal_walk(f: Any, size: int) -> Optional[str]:
    header = f.read(32)
    magic, version, page_size, _seq, salt1, salt2, c0, c1 = struct.unpack(">8I", header)
    big_endian = magic & 1 == 1
    if (magic not in _WAL_MAGIC or version != 3007000 or not 512 <= page_size <= 65536
            or page_size & (page_size - 1) or _wal_checksum(header[:24], big_endian, 0, 0) != (c0, c1)):
        return f"its header is damaged: SQLite will ignore all of it ({size} bytes)"  # one write: never torn
    frame_size = 24 + page_size
    frames = (size - 32) // frame_size
    s0, s1 = c0, c1
    read = 0  # frames SQLite reads (up to the first that does not check out); only these are checksummed
    for index in range(frames):
        frame = f.read(frame_size)
        if len(frame) < frame_size:  # the file shrank under us (restarted by a writer)
            frames = index
            break
        _page, _commit, f_salt1, f_salt2, f_c0, f_c1 = struct.unpack_from(">6I", frame)
        if (f_salt1, f_salt2) != (salt1, salt2):
            break
        s0, s1 = _wal_checksum(frame[:8], big_endian, s0, s1)
        s0, s1 = _wal_checksum(frame[24:], big_endian, s0, s1)
        if (s0, s1) != (f_c0, f_c1):
            break
        read = index + 1
    # Commit frames of this WAL (its salts) past the one that does not check out: that one may be a
    # crash's (its header written, not yet its page), but nothing after it was written after a crash.
    # Only their headers are read.
    commits_after = 0
    for index in range(read + 1, frames):
        f.seek(32 + index * frame_size)
        head = f.read(16)
        if len(head) < 16:
            break
        _page, commit, f_salt1, f_salt2 = struct.unpack(">4I", head)
        commits_after += bool(commit) and (f_salt1, f_salt2) == (salt1, salt2)
    if commits_after:
        return f"frame {read + 1} of {frames} does not check out, and {commits_after} commit(s) after it cannot be read"
    return None


def _keep_a_copy(path: Path) -> Optional[str]:
    """Copy `path` aside (`<name>.damaged-<UTC time>`) for a later rescue; its path, or None if it can't be."""
    copy = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}")
    try:
        shutil.copy2(path, copy)
    except OSError:
        return None
    return str(copy)


def _refuse_damaged(path: Path, conn: apsw.Connection) -> None:
    """`PRAGMA quick_check` on open: a damaged file is refused with a clear message, not served."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    except apsw.Error as exc:
        rows = [f"{type(exc).__name__}: {exc}"]
    if rows != ["ok"]:
        raise SchemaError(f"{path} is damaged ({'; '.join(rows[:3])}). {_stray_wal_hint(path)}{_RESTORE_HINT}")


def _missing_from_schema(conn: apsw.Connection, kind: str = "table") -> List[str]:
    """Tables (or indexes) schema.sql creates that the file lacks (a file from another program, or mangled)."""
    pattern = r"CREATE TABLE (\w+)" if kind == "table" else r"CREATE (?:UNIQUE )?INDEX (\w+)"
    expected = set(re.findall(pattern, _read_schema_text()))
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))}
    return sorted(expected - present)


def _with_attached(fn: Callable[[apsw.Connection], T], attached: Callable[[apsw.Connection], None]
                   ) -> Callable[[apsw.Connection], T]:
    def _both(conn: apsw.Connection) -> T:
        result = fn(conn)
        attached(conn)
        return result

    return _both


class Database:
    """One SQLite file: per-thread apsw connections, WAL, group commit and change signals.

    Writes go through `write(fn)`: concurrent writers are batched into one transaction (one
    fsync), each in its own savepoint so one failing write never undoes another, and `write`
    returns only after the batch is committed, so an acknowledged write is durable. A thread
    inside `transaction()` writes straight into that open transaction instead, which is how
    several store calls (a command's effect and its outcome) commit atomically.
    """

    def __init__(self, path: Path | str, *, synchronous: str = "FULL", busy_timeout_ms: int = 10_000,
                 migrate: bool = True) -> None:
        self.path = Path(path).expanduser().resolve()
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ConfigError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        if not migrate and not self.path.is_file():
            raise SchemaError(f"no database at {self.path}")
        if self.path.exists():
            _refuse_foreign_file(self.path)
        elif migrate:
            _create_database(self.path, synchronous.upper())
        if migrate:
            _remove_dead_leftovers(self.path.parent, f".{self.path.name}.", ".new")
        self.inspect_only = not migrate
        self._identity: Optional[Tuple[int, int]] = None  # the file this gateway opened (see `file_problem`)
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.signals = Signals()
        self._local = threading.local()
        # Weak: a thread's connection lives in its thread-local and closes when the thread ends
        # (short-lived threads, e.g. the migrator's or a test's, must not pile connections up).
        self._all_connections: "weakref.WeakSet[apsw.Connection]" = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        # One writer at a time in this process: threads queue here instead of inside SQLite, whose
        # busy handler sleeps in growing steps (a group commit behind a runner transaction would
        # sleep milliseconds after the lock is free).
        self._write_mutex = threading.Lock()
        self._queue: List[_PendingWrite] = []
        self._leader_busy = False
        self._last_failure: Optional[Dict[str, Any]] = None
        self._failed_at = self._succeeded_at = 0.0  # monotonic times of the last failed / good commit
        self.wal_damage: Optional[Dict[str, Any]] = None  # found on open: what, and where a copy was kept
        if migrate:
            damage = wal_damage(self.path)
            if damage is not None:  # SQLite drops what it cannot read, and its next write reuses the file
                self.wal_damage = {"detail": damage, "copy": _keep_a_copy(Path(f"{self.path}-wal"))}
            try:
                conn = self.connection()
                _refuse_damaged(self.path, conn)
                self.schema_version = apply_schema(conn)
                missing = _missing_from_schema(conn)
            except (apsw.CorruptError, apsw.NotADBError, apsw.IOError) as exc:
                self.close(checkpoint=False)
                _refuse_on_a_full_disk(self.path, exc)
                raise SchemaError(f"{self.path} is damaged ({exc}). "
                                  f"{_stray_wal_hint(self.path)}{_RESTORE_HINT}") from None
            except SchemaError:
                self.close(checkpoint=False)
                raise
            if missing:
                self.close(checkpoint=False)
                raise SchemaError(f"{self.path} is not a usable gateway database: tables {', '.join(missing)} are "
                                  f"missing. Run `abstractgateway check`, then restore from a backup.")
        else:  # inspection only (check, backup, doctor): never write to the file
            try:
                self.schema_version = self.connection().execute("PRAGMA user_version").fetchone()[0]
            except apsw.IOError as exc:
                self.close()
                _refuse_on_a_full_disk(self.path, exc)
                raise
        # Taken once the file is open: an overlay filesystem gives a file a new inode when it is first
        # opened for writing (copied up from an image's layer), which is not a replaced file.
        self._identity = self._file_identity()

    # -- connections -------------------------------------------------------------------

    def connection(self) -> apsw.Connection:
        """This thread's connection (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open_connection()
            self._local.conn = conn
        return conn

    def _open_connection(self) -> apsw.Connection:
        if self.inspect_only:  # read-only: not even a checkpoint of a leftover WAL on close
            conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
            conn.set_busy_timeout(self.busy_timeout_ms)
            return conn
        # Never created here (a file deleted under a running gateway is not replaced by an empty one),
        # never to a file put in the place of the one this gateway opened (it would read that file
        # through the old file's WAL, and fold the WAL into it on close), and never kept read-only:
        # SQLite opens a write-protected file read-only without a word, and the thread would keep
        # that connection, failing every write, after the file is writable again.
        problem = self.file_problem()
        if problem is not None:
            raise StorageError(problem)
        try:
            conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READWRITE)
        except apsw.CantOpenError:
            problem = self.file_problem()
            if problem is not None:
                raise StorageError(problem) from None
            raise
        if conn.readonly("main"):
            conn.close()
            raise StorageError(f"The database file {self.path} (or its directory) is read-only; nothing was "
                               "written. Make it writable: the gateway uses it again at once.")
        conn.set_busy_timeout(self.busy_timeout_ms)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SchemaError(f"could not switch {self.path} to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._connections_lock:
            self._all_connections.add(conn)
        return conn

    def close(self, *, checkpoint: bool = True) -> None:
        """Checkpoint the WAL into the main file and close every connection.

        A file refused on open is closed without the checkpoint: it stays exactly as it was, its WAL
        beside it (a WAL left from another copy of the file would be folded in, and then deleted)."""
        with self._connections_lock:
            conns, self._all_connections = list(self._all_connections), weakref.WeakSet()
        for conn in conns:
            try:
                if not checkpoint:
                    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                conn.close()
            except apsw.Error:
                pass
        self._local = threading.local()

    def _file_identity(self) -> Optional[Tuple[int, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def file_problem(self) -> Optional[str]:
        """Why the file at `path` is no longer the one this gateway opened (deleted or replaced), else
        None: its connections would go on writing to the old file, which no restart sees again."""
        if self._identity is None or self._file_identity() == self._identity:
            return None
        return (f"The database file was deleted or replaced while the gateway ran; nothing was written. Stop the "
                f"gateway, delete {self.path}-wal and {self.path}-shm (they belong to the old file), put the file "
                "to use in place (a backup, if it was deleted) and start the gateway again.")

    def _refuse_a_replaced_file(self) -> None:
        """Before a write transaction: refuse it when the file is not the one opened (see `file_problem`)."""
        problem = self.file_problem()
        if problem is not None:
            err = StorageError(problem)
            self._last_failure = {"code": err.code, "detail": err.detail, "at": utc_now_iso()}
            self._failed_at = time.monotonic()
            raise err

    def checkpoint(self) -> Optional[str]:
        """Fold the WAL back into the database file and truncate it; the reason when it could not (a
        full disk, a read-only file): the WAL then stays, and SQLite folds it in on the next open."""
        try:
            self.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except apsw.Error as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    # -- reads ---------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        """All rows of one statement, read on this thread's connection."""
        return self.connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> Optional[Tuple[Any, ...]]:
        return self.connection().execute(sql, params).fetchone()

    def data_version(self) -> int:
        """Changes when another connection (e.g. another process) commits."""
        return self.connection().execute("PRAGMA data_version").fetchone()[0]

    # -- writes ---------------------------------------------------------------------------

    def write(self, fn: Callable[[apsw.Connection], T], topics: Sequence[str] = (), *,
              single_statement: bool = False) -> T:
        """Run `fn(conn)` in a committed write transaction; wake `topics` after commit.

        `single_statement=True` promises `fn` executes exactly one writing statement: SQLite undoes
        a failed statement by itself, so it needs no savepoint inside a batch.
        """
        attached = getattr(self._local, "attached", None)
        if attached is not None:  # see attach_to_next_write
            self._local.attached = None
            fn, single_statement = _with_attached(fn, attached), False
        tx: Optional[_Transaction] = getattr(self._local, "tx", None)
        if tx is not None:
            if tx.conn.get_autocommit():  # SQLite rolled the transaction back (an error somebody caught):
                raise StorageError("The transaction was abandoned by the database; nothing was written.")
            if tx.isolated and not single_statement:
                with tx.conn:  # nested in the transaction, apsw makes this a savepoint
                    result = fn(tx.conn)
            else:
                result = fn(tx.conn)
            tx.topics.extend(topics)
            return result
        item = _PendingWrite(fn, topics, single_statement)
        with self._queue_lock:
            self._queue.append(item)
            leader = not self._leader_busy
            self._leader_busy = True
        if not leader:
            item.wake.acquire()  # woken once: committed by a leader, or handed the leadership
        if not item.done:
            self._lead()
        if item.error is not None:
            if isinstance(item.error, _STORAGE_FAILURES):
                raise storage_error(item.error) from item.error
            raise item.error
        return item.result

    def _note_failure(self, exc: BaseException, conn: Optional[apsw.Connection]) -> None:
        """Remember a commit that failed for a storage reason (health reports it until a commit succeeds).

        The OS error behind an I/O error (ENOSPC, EFBIG) is kept on the exception: SQLite reports a
        file-size limit as a plain I/O error, but for the operator it is a full disk."""
        if isinstance(exc, apsw.IOError) and conn is not None:
            exc.system_errno = conn.system_errno  # type: ignore[attr-defined]
        if isinstance(exc, (StorageError, *_STORAGE_FAILURES)):
            err = storage_error(exc)
            self._last_failure = {"code": err.code, "detail": err.detail, "at": utc_now_iso()}
            self._failed_at = time.monotonic()

    @property
    def write_failure(self) -> Optional[Dict[str, Any]]:
        """The last commit that failed for a storage reason, while it is news: until a commit
        succeeds and `WRITE_FAILURE_MEMORY_S` have passed (a full disk often still takes small
        writes, so one success is no proof the trouble is over)."""
        if self._last_failure is None:
            return None
        if self._succeeded_at > self._failed_at and time.monotonic() - self._failed_at > WRITE_FAILURE_MEMORY_S:
            return None
        return self._last_failure

    def attach_to_next_write(self, fn: Optional[Callable[[apsw.Connection], None]]) -> None:
        """Run `fn(conn)` right after this thread's next `write`, in its transaction and group commit
        (None: forget a pending one). Bookkeeping rows, such as a request's audit row, then ride on the
        write they describe instead of costing a durable transaction of their own."""
        self._local.attached = fn

    def _lead(self) -> None:
        """Commit everything queued (this thread's write included) in one transaction, wake exactly
        those writers, then hand the leadership to the first writer that queued meanwhile."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        try:
            self._commit_batch(batch)
        finally:
            for pending in batch:  # all done now, whatever happened
                if pending.wake.locked():
                    pending.wake.release()
            with self._queue_lock:
                if self._queue:
                    self._queue[0].wake.release()  # next leader
                else:
                    self._leader_busy = False

    def _commit_batch(self, batch: List[_PendingWrite]) -> None:
        """Run the batch in one transaction. Whatever fails, every write ends done (with its error),
        so no waiting writer can hang."""
        conn = None
        tx, committed = None, False
        try:
            self._acquire_write_mutex()
        except DatabaseBusy as busy:
            for item in batch:
                item.error, item.done = busy, True
            return
        try:
            self._refuse_a_replaced_file()
            conn = self.connection()
            _begin_immediate(conn, self.busy_timeout_ms / 1000)
            # Store writes that a batched function makes (on this, the leader's, thread) join the batch.
            tx = self._local.tx = _Transaction(conn)
            if len(batch) == 1:  # alone in the batch: its failure may roll the whole transaction back
                batch[0].result = batch[0].fn(conn)
            else:
                self._run_batch_items(conn, tx, batch)
            conn.execute("COMMIT")
            committed = True
            self._succeeded_at = time.monotonic()
        except BaseException as exc:
            self._note_failure(exc, conn)
            for item in batch:
                if item.error is None:
                    item.error = exc
            try:
                if conn is not None and not conn.get_autocommit():
                    conn.execute("ROLLBACK")
            except apsw.Error:
                pass
        finally:
            self._local.tx = None
            self._write_mutex.release()
            for item in batch:
                item.done = True
        topics = [t for item in batch if item.error is None for t in item.topics]
        if committed:
            topics.extend(tx.topics)
        if topics:
            self.signals.bump(topics)

    def _acquire_write_mutex(self) -> None:
        """Take the in-process writers' turn, or give up as busy after the busy timeout (a writer that
        holds it that long is stuck: callers get 503 `database_busy`, not a request that hangs)."""
        if not self._write_mutex.acquire(timeout=self.busy_timeout_ms / 1000):
            busy = DatabaseBusy("The database is busy (another writer holds it); retry shortly.")
            self._last_failure = {"code": busy.code, "detail": busy.detail, "at": utc_now_iso()}
            self._failed_at = time.monotonic()
            raise busy

    @staticmethod
    def _run_batch_items(conn: apsw.Connection, tx: _Transaction, batch: List[_PendingWrite]) -> None:
        """Run each write of a shared transaction in its own savepoint (a lone statement needs none),
        so one failing write never undoes another; raise if SQLite abandoned the whole transaction."""
        for item in batch:
            nested_topics = len(tx.topics)
            if item.single_statement:
                try:
                    item.result = item.fn(conn)
                except Exception as exc:  # the failed statement undid itself; the rest commits
                    if conn.get_autocommit():  # ...unless SQLite abandoned the whole transaction
                        raise
                    item.error = exc
                continue
            conn.execute("SAVEPOINT gateway_write")
            try:
                item.result = item.fn(conn)
                conn.execute("RELEASE gateway_write")
            except Exception as exc:  # the caller gets it; the rest of the batch commits
                if conn.get_autocommit():  # SQLite abandoned the whole transaction (disk full, I/O)
                    raise
                conn.execute("ROLLBACK TO gateway_write")
                conn.execute("RELEASE gateway_write")
                item.error = exc
                del tx.topics[nested_topics:]

    @contextmanager
    def transaction(self, *, isolate_writes: bool = False) -> Iterator[_Transaction]:
        """An explicit write transaction on this thread; store writes inside it join it.

        `isolate_writes=True` keeps each joining `write` all-or-nothing, as in a group commit: one
        that fails undoes only its own statements and the transaction goes on (independent requests
        sharing one commit, see `HttpServer`). Otherwise a failure is meant to end the transaction.
        """
        tx: Optional[_Transaction] = getattr(self._local, "tx", None)
        if tx is not None:
            if tx.isolated:  # all-or-nothing within the shared transaction, as a write is
                with tx.conn:
                    yield tx
            else:
                yield tx
            return
        conn = self.connection()
        self._acquire_write_mutex()
        try:
            try:
                self._refuse_a_replaced_file()
                _begin_immediate(conn, self.busy_timeout_ms / 1000)
            except _STORAGE_FAILURES as exc:
                self._note_failure(exc, conn)
                raise storage_error(exc) from exc
            tx = self._local.tx = _Transaction(conn, isolate_writes)
            try:
                yield tx
                if conn.get_autocommit():  # rolled back under a caught error: its writes are gone, say so
                    raise StorageError("The transaction was abandoned by the database; nothing was written.")
                conn.execute("COMMIT")
                self._succeeded_at = time.monotonic()
            except BaseException as exc:
                self._note_failure(exc, conn)
                try:
                    if not conn.get_autocommit():
                        conn.execute("ROLLBACK")
                except apsw.Error:
                    pass
                if isinstance(exc, _STORAGE_FAILURES):
                    raise storage_error(exc) from exc
                raise
            finally:
                self._local.tx = None
        finally:
            self._write_mutex.release()
        if tx.topics:
            self.signals.bump(tx.topics)

    # -- operations -------------------------------------------------------------------------

    def backup_to(self, dest: Path | str) -> Path:
        """Online copy of the database to `dest` (a consistent snapshot; writers keep going)."""
        dest_path = Path(dest).expanduser().resolve()
        if dest_path == self.path:
            raise ValueError("backup destination is the live database")
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two backups to one destination never write (or delete) each other's copy, and
        # the last to finish replaces `dest` whole. Owner-only, as the live file: it holds the token.
        _remove_dead_leftovers(dest_path.parent, f".{dest_path.name}.", ".partial")
        tmp = dest_path.with_name(f".{dest_path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.partial")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        source = self._open_connection()
        target = apsw.Connection(str(tmp))
        done = False
        try:
            with target.backup("main", source, "main") as job:
                job.step(-1)  # one read transaction: a consistent snapshot while WAL lets writers go on
            problems = integrity_problems(target)
            if problems:
                raise SchemaError(f"backup failed integrity_check: {problems[:3]}")
            done = True
        except (apsw.FullError, apsw.IOError) as exc:  # (SQLite's message here is often "not an error")
            why = ("its disk is full" if isinstance(exc, apsw.FullError)
                   else "a write failed: a full disk or a file size limit?")
            raise StorageError(f"The backup could not be written to {dest_path.parent} ({why}); nothing was kept "
                               "there. Free space or choose another destination.") from None
        finally:
            target.close()
            with self._connections_lock:
                self._all_connections.discard(source)
            source.close()
            if not done:  # no partial copy left behind to be mistaken for a backup
                for leftover in (tmp, *(Path(f"{tmp}-{side}") for side in ("journal", "wal", "shm"))):
                    leftover.unlink(missing_ok=True)
        os.replace(tmp, dest_path)
        try:
            _fsync_dir(dest_path.parent)
        except OSError:  # a file system that cannot sync a directory (some network mounts): the copy is whole
            pass
        return dest_path


def integrity_problems(conn: apsw.Connection) -> List[str]:
    """`PRAGMA integrity_check` messages; empty when the file is sound."""
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return [] if rows == ["ok"] else rows


def table_counts(db: Database) -> Dict[str, int]:
    """Row counts of the main tables (for `check`, `doctor` and the migrator's report)."""
    names = ("runs", "ledger", "commands", "command_cursors", "artifacts", "bundles")
    return {name: db.query_one(f"SELECT COUNT(*) FROM {name}")[0] for name in names}


@dataclass(frozen=True)
class LeaseToken:
    """Proof of holding a lease: the owner and the epoch its acquisition was given."""

    owner: str
    epoch: int


class LeaseStore:
    """Named leases with owner, heartbeat, expiry and a fencing epoch: at most one live holder per name."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def acquire(self, name: str, owner: str, ttl_s: float) -> Optional[LeaseToken]:
        """Take or renew `name` for `owner` unless another owner holds an unexpired lease.

        A renewal keeps the epoch; a new acquisition (even by an owner that lost the lease)
        bumps it, which invalidates every token handed out before.
        """
        def _acquire(conn: apsw.Connection) -> Optional[LeaseToken]:
            now = time.time()
            row = conn.execute("SELECT owner, expires_at, epoch, heartbeat_at FROM leases WHERE name = ?",
                               (name,)).fetchone()
            if row is not None and row[0] != owner and row[3] > now + 1.0:
                # A heartbeat in the future: the wall clock stepped back since (or the holder died with it
                # ahead). Its time left is counted from now, or a dead holder would keep it for the step.
                conn.execute("UPDATE leases SET heartbeat_at = ?, expires_at = ? WHERE name = ?",
                             (now, now + (row[1] - row[3]), name))
                return None
            if row is not None and row[0] != owner and row[1] > now:
                return None
            if row is not None and row[0] == owner and row[1] > now:
                conn.execute("UPDATE leases SET heartbeat_at = ?, expires_at = ? WHERE name = ?",
                             (now, now + ttl_s, name))
                return LeaseToken(owner, row[2])
            epoch = (row[2] if row is not None else 0) + 1
            conn.execute("INSERT OR REPLACE INTO leases (name, owner, acquired_at, heartbeat_at, expires_at, epoch)"
                         " VALUES (?,?,?,?,?,?)", (name, owner, now, now, now + ttl_s, epoch))
            return LeaseToken(owner, epoch)

        return self.db.write(_acquire)

    def holds(self, name: str, token: LeaseToken) -> bool:
        """True if `token` is still the current, unexpired holding of `name`.

        Read inside the caller's write transaction, this fences the transaction: nobody can
        take the lease over between this check and the commit.
        """
        row = self.db.query_one("SELECT 1 FROM leases WHERE name = ? AND owner = ? AND epoch = ? AND expires_at > ?",
                                (name, token.owner, token.epoch, time.time()))
        return row is not None

    def release(self, name: str, owner: str) -> None:
        """Let the lease go at once (expired, not deleted: the epoch keeps counting up)."""
        self.db.write(lambda conn: conn.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND owner = ?",
                                                (name, owner)))

    def holder(self, name: str) -> Optional[Dict[str, Any]]:
        row = self.db.query_one("SELECT owner, acquired_at, heartbeat_at, expires_at, epoch FROM leases WHERE name = ?",
                                (name,))
        if row is None:
            return None
        now = time.time()
        return {"owner": row[0], "acquired_at": row[1], "heartbeat_at": row[2], "expires_at": row[3], "epoch": row[4],
                "live": row[3] > now, "age_s": round(now - row[1], 3), "heartbeat_age_s": round(now - row[2], 3)}


# -- 2.2 Store interfaces: what the gateway needs from each store, whatever the backend ------------


class RunPage(NamedTuple):
    """One page of the run list: its runs (a row that no longer reads is left out), and the keyset
    position `(updated_at, run_id)` the next page starts after, or None on the last page."""

    runs: List[RunState]
    next_before: Optional[Tuple[str, str]]


@runtime_checkable
class RunStorage(Protocol):
    """What the gateway needs from a run store (`SqliteRunStore`, or `FileRunStore` on the file backend).

    A superset of the runtime's `RunStore` and its queryable extensions, like huey's `BaseStorage`:
    callers use these methods and never ask which backend they hold."""

    def save(self, run: RunState) -> None: ...
    def save_row(self, row: Tuple[Any, ...]) -> None: ...
    def load(self, run_id: str) -> Optional[RunState]: ...
    def load_json(self, run_id: str) -> Optional[str]: ...
    def exists(self, run_id: str) -> bool: ...
    def delete(self, run_id: str) -> bool: ...
    def status_of(self, run_id: str) -> Optional[str]: ...
    def adopt_own_session(self, run_id: str) -> None: ...
    def runnable_ids(self, *, now_iso: str, limit: int) -> List[str]: ...
    def ids_waiting_on(self, wait_key: str, *, limit: int = 10_000) -> List[str]: ...
    def child_ids(self, parent_run_id: str) -> List[str]: ...
    def live_children(self) -> List[Tuple[str, str]]: ...
    def parent_id(self, run_id: str) -> Optional[str]: ...

    def list_runs(self, *, status: Optional[RunStatus] = None, wait_reason: Optional[WaitReason] = None,
                  workflow_id: Optional[str] = None, limit: int = 100) -> List[RunState]: ...

    def list_due_wait_until(self, *, now_iso: str, limit: int = 100) -> List[RunState]: ...
    def list_children(self, *, parent_run_id: str, status: Optional[RunStatus] = None) -> List[RunState]: ...

    def list_run_index(self, *, status: Optional[RunStatus] = None, workflow_id: Optional[str] = None,
                       session_id: Optional[str] = None, root_only: bool = False, limit: int = 100,
                       before: Optional[Tuple[str, str]] = None, exclude_internal: bool = False
                       ) -> List[Dict[str, Any]]: ...

    def list_run_page(self, *, status: Optional[RunStatus] = None, workflow_id: Optional[str] = None,
                      session_id: Optional[str] = None, root_only: bool = False, limit: int = 100,
                      before: Optional[Tuple[str, str]] = None, exclude_internal: bool = False
                      ) -> "RunPage": ...


@runtime_checkable
class LedgerStorage(Protocol):
    """What the gateway needs from a ledger store: appends, range reads by 1-based position, counters."""

    def append(self, record: StepRecord) -> None: ...
    def append_json(self, run_id: str, record_json: str) -> int: ...
    def list(self, run_id: str) -> List[Dict[str, Any]]: ...
    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]: ...
    def page_json(self, run_id: str, after: int, limit: int) -> List[str]: ...
    def completed_record(self, run_id: str, idempotency_key: str) -> Optional[Dict[str, Any]]: ...
    def waiting_records(self, run_id: str, wait_key: str) -> List[Dict[str, Any]]: ...
    def count(self, run_id: str) -> int: ...
    def count_many(self, run_ids: Sequence[str]) -> Dict[str, int]: ...
    def metrics_many(self, run_ids: Sequence[str]) -> Dict[str, Dict[str, int]]: ...
    def delete(self, run_id: str) -> int: ...


@runtime_checkable
class CommandStorage(Protocol):
    """What the gateway needs from the command inbox: idempotent appends, reads by seq, id and run."""

    def append(self, record: CommandRecord) -> CommandAppendResult: ...
    def list_after(self, *, after: int, limit: int = 1000) -> Tuple[List[CommandRecord], int]: ...
    def get(self, command_id: str) -> Optional[CommandRecord]: ...
    def for_run(self, run_id: str, *, limit: int = 200) -> List[CommandRecord]: ...
    def get_last_seq(self) -> int: ...
    def delete_by_run(self, run_id: str) -> int: ...


@runtime_checkable
class CursorStorage(Protocol):
    """The runner's durable position in the command inbox."""

    def load(self) -> int: ...
    def save(self, cursor: int) -> None: ...


@runtime_checkable
class ArtifactStorage(Protocol):
    """What the gateway needs from an artifact store: the runtime's `ArtifactStore` plus range reads."""

    def store(self, content: bytes, *, content_type: str = "application/octet-stream", run_id: Optional[str] = None,
              tags: Optional[Dict[str, str]] = None, artifact_id: Optional[str] = None) -> ArtifactMetadata: ...

    def load(self, artifact_id: str) -> Optional[Artifact]: ...
    def read_range(self, artifact_id: str, start: int, length: int) -> bytes: ...
    def get_metadata(self, artifact_id: str) -> Optional[ArtifactMetadata]: ...
    def exists(self, artifact_id: str) -> bool: ...
    def delete(self, artifact_id: str) -> bool: ...
    def list_by_run(self, run_id: str) -> List[ArtifactMetadata]: ...
    def list_all(self, *, limit: int = 1000) -> List[ArtifactMetadata]: ...


# -- 2.3 SQLite stores (the runtime's stores, in the gateway's database) ---------------------------


# One encoder each, made once: `json.dumps` with options builds a new encoder per call (a third of
# the cost of a small body). Encoders keep no state between calls, so threads share them.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json_dumps(value: Any) -> str:
    return _JSON_ENCODER.encode(value)


def _is_waiting_on(record: Any, wait_key: str) -> bool:
    """Whether a ledger record is a waiting one whose wait has `wait_key` (as `waiting_records` selects)."""
    result = record.get("result") if isinstance(record, dict) else None
    wait = result.get("wait") if isinstance(result, dict) else None
    return record.get("status") == "waiting" and isinstance(wait, dict) and wait.get("wait_key") == wait_key


_FIELD_NAMES: Dict[type, Tuple[str, ...]] = {}


def _dataclass_fields(value: Any) -> Dict[str, Any]:
    names = _FIELD_NAMES.get(type(value))
    if names is None:
        if not dataclasses.is_dataclass(value) or isinstance(value, type):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        names = _FIELD_NAMES[type(value)] = tuple(f.name for f in dataclasses.fields(value))
    return {name: getattr(value, name) for name in names}


_DATACLASS_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_dataclass_fields)


def dataclass_json(value: Any) -> str:
    """JSON of a (nested) dataclass, same text as `json.dumps(asdict(value))` without asdict's
    deep copy (6x cheaper on a typical ledger record: the hot path of every append)."""
    return _DATACLASS_ENCODER.encode(value)


def _enum_value(value: Any) -> Optional[str]:
    return None if value is None else str(getattr(value, "value", value))


def _as_utc(text: Any) -> Optional[datetime]:
    """The instant an ISO-8601 time names (read as UTC when it gives no offset), or None."""
    try:
        value = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError):  # not a time, or one whose UTC falls outside years 1-9999
        return None


def _utc_text(text: Any) -> str:
    """A time as the runtime writes its own (UTC, `isoformat`), so that times compare as text; else as given."""
    instant = _as_utc(text)
    return instant.isoformat() if instant is not None else str(text)


def _run_index_columns(run: RunState) -> Tuple[Any, ...]:
    waiting = run.waiting
    reason = _enum_value(waiting.reason) if waiting is not None else None
    return (
        str(run.run_id),
        str(run.workflow_id),
        _enum_value(run.status),
        reason,
        (waiting.wait_key if waiting is not None else None),
        (str(waiting.until) if waiting is not None and waiting.until and reason == "until" else None),
        run.parent_run_id or None,
        run.actor_id or None,
        run.session_id or None,
        str(run.created_at or ""),
        str(run.updated_at or ""),
    )


def run_row(run: RunState) -> Tuple[Any, ...]:
    """A run serialised for storage: its index columns, then its JSON (taken now, so later
    changes to the object don't leak into a buffered save)."""
    return (*_run_index_columns(run), dataclass_json(run))


def _run_rows_to_states(rows: Iterable[Tuple[Any, ...]]) -> List[RunState]:
    out: List[RunState] = []
    for (payload,) in rows:
        try:
            out.append(run_from_dict(json.loads(payload)))
        except (ValueError, TypeError, KeyError):
            continue
    return out


class SqliteRunStore(RunStore):
    """RunStore + QueryableRunStore + QueryableRunIndexStore + delete, on the `runs` table."""

    _UPSERT = (
        "INSERT INTO runs (run_id, workflow_id, status, wait_reason, wait_key, wait_until, parent_run_id,"
        " actor_id, session_id, created_at, updated_at, run_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(run_id) DO UPDATE SET workflow_id=excluded.workflow_id, status=excluded.status,"
        " wait_reason=excluded.wait_reason, wait_key=excluded.wait_key, wait_until=excluded.wait_until,"
        " parent_run_id=excluded.parent_run_id, actor_id=excluded.actor_id, session_id=excluded.session_id,"
        " updated_at=excluded.updated_at, run_json=excluded.run_json"
    )
    _INSERT_IF_ABSENT = (
        "INSERT OR IGNORE INTO runs (run_id, workflow_id, status, wait_reason, wait_key, wait_until, parent_run_id,"
        " actor_id, session_id, created_at, updated_at, run_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    )
    _INDEX_COLUMNS = (
        "run_id, workflow_id, status, wait_reason, wait_until, parent_run_id, actor_id, session_id,"
        " created_at, updated_at, run_json"
    )

    def __init__(self, db: Database) -> None:
        self.db = db

    def save(self, run: RunState) -> None:
        self.save_row(run_row(run))

    def save_row(self, row: Tuple[Any, ...]) -> None:
        """Save a run already serialised by `run_row` (a step's buffered checkpoint)."""
        self.db.write(lambda conn: conn.execute(self._UPSERT, row), topics=("runs",), single_statement=True)

    def load(self, run_id: str) -> Optional[RunState]:
        text = self.load_json(run_id)
        states = _run_rows_to_states([(text,)]) if text is not None else []
        return states[0] if states else None

    def load_json(self, run_id: str) -> Optional[str]:
        """The run's checkpoint as stored (its exact text: a step compares it to detect a concurrent change)."""
        row = self.db.query_one("SELECT run_json FROM runs WHERE run_id = ?", (str(run_id or ""),))
        return row[0] if row else None

    def exists(self, run_id: str) -> bool:
        return self.db.query_one("SELECT 1 FROM runs WHERE run_id = ?", (str(run_id or ""),)) is not None

    def adopt_own_session(self, run_id: str) -> None:
        """Make a run without a session its own session, in SQL (no state parsed and re-serialised)."""
        self.db.write(lambda conn: conn.execute(
            "UPDATE runs SET session_id = run_id, run_json = json_set(run_json, '$.session_id', run_id)"
            " WHERE run_id = ? AND session_id IS NULL", (str(run_id),)), topics=("runs",), single_statement=True)

    def status_of(self, run_id: str) -> Optional[str]:
        """The run's status without loading its state (None if unknown)."""
        row = self.db.query_one("SELECT status FROM runs WHERE run_id = ?", (str(run_id or ""),))
        return row[0] if row else None

    def runnable_ids(self, *, now_iso: str, limit: int) -> List[str]:
        """Ids of RUNNING runs and due UNTIL waits, not paused, oldest first (no starvation)."""
        rows = self.db.query(
            "SELECT run_id FROM (SELECT run_id, updated_at AS due FROM runs WHERE status = 'running'"
            " UNION ALL SELECT run_id, wait_until AS due FROM runs"
            " WHERE status = 'waiting' AND wait_reason = 'until' AND wait_until <= ?)"
            " WHERE run_id NOT IN (SELECT run_id FROM runs WHERE status IN ('running', 'waiting')"
            " AND json_extract(run_json, '$.vars._runtime.control.paused') = 1)"
            " ORDER BY due LIMIT ?", (now_iso, int(limit)))
        return [r[0] for r in rows]

    def delete(self, run_id: str) -> bool:
        def _delete(conn: apsw.Connection) -> bool:
            conn.execute("DELETE FROM runs WHERE run_id = ?", (str(run_id or ""),))
            return conn.changes() > 0

        return self.db.write(_delete)

    def list_runs(
        self,
        *,
        status: Optional[RunStatus] = None,
        wait_reason: Optional[WaitReason] = None,
        workflow_id: Optional[str] = None,
        limit: int = 100,
    ) -> List[RunState]:
        where, params = _where(status=_enum_value(status), wait_reason=_enum_value(wait_reason),
                               workflow_id=workflow_id)
        rows = self.db.query(
            f"SELECT run_json FROM runs {where} ORDER BY updated_at DESC LIMIT ?", (*params, max(1, int(limit or 100)))
        )
        return _run_rows_to_states(rows)

    def list_due_wait_until(self, *, now_iso: str, limit: int = 100) -> List[RunState]:
        rows = self.db.query(
            "SELECT run_json FROM runs WHERE status = 'waiting' AND wait_reason = 'until' AND wait_until <= ?"
            " ORDER BY wait_until ASC LIMIT ?",
            (str(now_iso), max(1, int(limit or 100))),
        )
        return _run_rows_to_states(rows)

    def list_children(self, *, parent_run_id: str, status: Optional[RunStatus] = None) -> List[RunState]:
        where, params = _where(parent_run_id=str(parent_run_id or ""), status=_enum_value(status))
        rows = self.db.query(f"SELECT run_json FROM runs {where} ORDER BY created_at ASC, run_id ASC", params)
        return _run_rows_to_states(rows)

    def ids_waiting_on(self, wait_key: str, *, limit: int = 10_000) -> List[str]:
        """Ids of WAITING runs whose wait key equals `wait_key` (event delivery, subflow parents)."""
        rows = self.db.query("SELECT run_id FROM runs WHERE status = 'waiting' AND wait_key = ? ORDER BY created_at"
                             " LIMIT ?", (wait_key, int(limit)))
        return [r[0] for r in rows]

    def child_ids(self, parent_run_id: str) -> List[str]:
        """Ids of a run's children, oldest first (no state is loaded)."""
        rows = self.db.query("SELECT run_id FROM runs WHERE parent_run_id = ? ORDER BY created_at, run_id",
                             (str(parent_run_id),))
        return [r[0] for r in rows]

    def live_children(self) -> List[Tuple[str, str]]:
        """(id, parent id) of every run that has a parent and has not finished (by the status index:
        finished runs are not read)."""
        marks = ", ".join("?" * len(LIVE_STATUSES))
        return [(r[0], r[1]) for r in self.db.query(
            f"SELECT run_id, parent_run_id FROM runs WHERE status IN ({marks}) AND parent_run_id IS NOT NULL",
            tuple(LIVE_STATUSES))]

    def parent_id(self, run_id: str) -> Optional[str]:
        row = self.db.query_one("SELECT parent_run_id FROM runs WHERE run_id = ?", (str(run_id),))
        return row[0] if row else None

    def list_run_index(
        self,
        *,
        status: Optional[RunStatus] = None,
        workflow_id: Optional[str] = None,
        session_id: Optional[str] = None,
        root_only: bool = False,
        limit: int = 100,
        before: Optional[Tuple[str, str]] = None,
        exclude_internal: bool = False,
    ) -> List[Dict[str, Any]]:
        """Run summaries, most recently updated first.

        `before=(updated_at, run_id)` continues after the last row of a previous page (keyset
        pagination); `exclude_internal` drops bookkeeping runs whose workflow id starts with `__`.
        """
        rows = self._page(self._INDEX_COLUMNS, status=status, workflow_id=workflow_id, session_id=session_id,
                          root_only=root_only, limit=limit, before=before, exclude_internal=exclude_internal)
        out = []
        for (rid, wid, st, reason, until, parent, actor, sid, created, updated, payload) in rows:
            try:
                run_vars = json.loads(payload).get("vars")
            except (ValueError, AttributeError):
                run_vars = None
            out.append({
                "run_id": rid, "workflow_id": wid, "status": st, "wait_reason": reason, "wait_until": until,
                "parent_run_id": parent, "actor_id": actor, "session_id": sid,
                "created_at": created or None, "updated_at": updated or None,
                **run_lifecycle_index_fields(run_vars),
            })
        return out

    def list_run_page(self, *, status: Optional[RunStatus] = None, workflow_id: Optional[str] = None,
                      session_id: Optional[str] = None, root_only: bool = False, limit: int = 100,
                      before: Optional[Tuple[str, str]] = None, exclude_internal: bool = False) -> RunPage:
        """The runs of `list_run_index`'s page (same filters, order and keyset), read in one query."""
        rows = self._page("updated_at, run_id, run_json", status=status, workflow_id=workflow_id,
                          session_id=session_id, root_only=root_only, limit=limit + 1, before=before,
                          exclude_internal=exclude_internal)
        page = rows[:limit]
        more = (page[-1][0], page[-1][1]) if len(rows) > limit and page else None
        return RunPage(_run_rows_to_states((payload,) for _, _, payload in page), more)

    def _page(self, columns: str, *, status: Optional[RunStatus] = None, workflow_id: Optional[str] = None,
              session_id: Optional[str] = None, root_only: bool = False, limit: int = 100,
              before: Optional[Tuple[str, str]] = None, exclude_internal: bool = False) -> List[Tuple[Any, ...]]:
        where, params = _where(status=_enum_value(status), workflow_id=workflow_id, session_id=session_id)
        clauses = [where[len("WHERE "):]] if where else []
        if root_only:
            clauses.append("(parent_run_id IS NULL OR parent_run_id = '')")
        if exclude_internal:
            clauses.append("workflow_id NOT LIKE '\\_\\_%' ESCAPE '\\'")
        if before is not None:
            clauses.append("(updated_at < ? OR (updated_at = ? AND run_id < ?))")
            params = [*params, before[0], before[0], before[1]]
        sql_where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self.db.query(
            f"SELECT {columns} FROM runs {sql_where} ORDER BY updated_at DESC, run_id DESC LIMIT ?",
            (*params, max(1, int(limit or 100))),
        )


def _where(**filters: Any) -> Tuple[str, List[Any]]:
    clauses, params = [], []
    for column, value in filters.items():
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def ledger_topic(run_id: str) -> str:
    """The signal topic bumped after a commit that appended to `run_id`'s ledger."""
    return f"ledger:{run_id}"


def step_counts(status: Any, effect: Any, result: Any) -> Optional[Tuple[int, int, int]]:
    """What one ledger record adds to its run's metrics, `(llm_calls, tool_calls, tokens_total)`, or
    None if it is not a completed step. The original gateway's rules: every completed record is a
    step; an `llm_call` effect is an LLM call and brings its `result.usage.total_tokens`; a
    `tool_calls` effect brings the length of its `payload.tool_calls`."""
    if _enum_value(status) != "completed":
        return None
    kind = _enum_value(effect.get("type")) if isinstance(effect, dict) else None
    if kind == "tool_calls":
        payload = effect.get("payload")
        calls = payload.get("tool_calls") if isinstance(payload, dict) else None
        return 0, len(calls) if isinstance(calls, list) else 0, 0
    if kind == "llm_call":
        usage = result.get("usage") if isinstance(result, dict) else None
        try:
            tokens = int((usage.get("total_tokens") if isinstance(usage, dict) else 0) or 0)
        except (TypeError, ValueError, OverflowError):
            tokens = 0
        return 1, 0, tokens
    return 0, 0, 0


def _first_completed(records: Iterable[Dict[str, Any]], idempotency_key: str) -> Optional[Dict[str, Any]]:
    """The first completed record with `idempotency_key` (the runtime's rule for reusing a result)."""
    for record in records:
        if record.get("idempotency_key") == idempotency_key and record.get("status") == StepStatus.COMPLETED.value:
            return record
    return None


def _step_counts_of_json(record_json: str) -> Optional[Tuple[int, int, int]]:
    if '"completed"' not in record_json:  # most records that are not completed steps skip the parse
        return None
    try:
        record = json.loads(record_json)
    except ValueError:
        return None
    return step_counts(record.get("status"), record.get("effect"), record.get("result")) \
        if isinstance(record, dict) else None


class SqliteLedgerStore(LedgerStore):
    """Append-only ledger with a gapless 1-based `seq` per run, read by range; keeps `run_metrics`."""

    _APPEND = ("INSERT INTO ledger (run_id, seq, record_json)"
               " SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2 FROM ledger WHERE run_id = ?1 RETURNING seq")
    _INSERT = "INSERT INTO ledger (run_id, seq, record_json) VALUES (?, ?, ?)"
    _PAGE = "SELECT record_json FROM ledger WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
    # By the partial index `ledger_completed_by_key` (schema.sql; the planner, left alone, walks the run's
    # records by primary key instead). Validity first, so a damaged record is skipped, not an error,
    # in the scan that stands in when the index is missing (which `check` reports).
    _COMPLETED_SCAN = ("SELECT record_json FROM ledger WHERE run_id = ?2 AND json_valid(record_json, 2)"
                       " AND json_extract(record_json, '$.status') = 'completed'"
                       " AND json_extract(record_json, '$.idempotency_key') = ?1 ORDER BY seq LIMIT 1")
    _COMPLETED = _COMPLETED_SCAN.replace("FROM ledger", "FROM ledger INDEXED BY ledger_completed_by_key")
    _WAITING_SCAN = ("SELECT record_json FROM ledger WHERE run_id = ?2 AND json_valid(record_json, 2)"
                     " AND json_extract(record_json, '$.status') = 'waiting'"
                     " AND json_extract(record_json, '$.result.wait.wait_key') = ?1 ORDER BY seq")
    _WAITING = _WAITING_SCAN.replace("FROM ledger", "FROM ledger INDEXED BY ledger_waiting_by_key")
    _COUNT = ("INSERT INTO run_metrics (run_id, steps, llm_calls, tool_calls, tokens_total) VALUES (?, 1, ?, ?, ?)"
              " ON CONFLICT(run_id) DO UPDATE SET steps = steps + 1, llm_calls = llm_calls + excluded.llm_calls,"
              " tool_calls = tool_calls + excluded.tool_calls, tokens_total = tokens_total + excluded.tokens_total")

    def __init__(self, db: Database) -> None:
        self.db = db

    def append(self, record: StepRecord) -> None:
        run_id = str(record.run_id or "").strip()
        if not run_id:
            raise ValueError("StepRecord.run_id must be non-empty")
        self._append(run_id, dataclass_json(record), step_counts(record.status, record.effect, record.result))

    def append_json(self, run_id: str, record_json: str) -> int:
        """Append an already-serialised record; return its seq."""
        return self._append(run_id, record_json, _step_counts_of_json(record_json))

    def _append(self, run_id: str, record_json: str, counts: Optional[Tuple[int, int, int]]) -> int:
        def _write(conn: apsw.Connection) -> int:
            seq = conn.execute(self._APPEND, (run_id, record_json)).fetchall()[0][0]
            self.count_step(conn, run_id, counts)
            return seq

        return self.db.write(_write, topics=(ledger_topic(run_id),), single_statement=counts is None)

    @classmethod
    def count_step(cls, conn: apsw.Connection, run_id: str, counts: Optional[Tuple[int, int, int]]) -> None:
        """Add one record's `step_counts` to its run's `run_metrics` row, inside the transaction that
        inserts the record. Every path that inserts ledger rows calls this (appends, migration)."""
        if counts is not None:
            conn.execute(cls._COUNT, (run_id, *counts))

    def list(self, run_id: str) -> List[Dict[str, Any]]:
        return self.page(run_id, 0, 1 << 62)

    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]:
        """Records with seq in (after, after+limit], in order (`after` = records already consumed)."""
        rows = self.db.query(self._PAGE, (str(run_id), max(0, int(after)), max(1, int(limit))))
        return [json.loads(r[0]) for r in rows]

    def page_json(self, run_id: str, after: int, limit: int) -> List[str]:
        """Like `page` but the records' stored JSON text, unparsed (for streaming to clients)."""
        rows = self.db.query(self._PAGE, (str(run_id), max(0, int(after)), max(1, int(limit))))
        return [r[0] for r in rows]

    def _by_index(self, indexed: str, scan: str, key: str, run_id: str) -> List[Dict[str, Any]]:
        """The records `indexed` selects through its index; without it, `scan` (`check` reports it missing)."""
        params = (str(key), str(run_id))
        try:
            rows = self.db.query(indexed, params)
        except apsw.SQLError:  # no such index, or one of that name that cannot serve it
            rows = self.db.query(scan, params)
        return [json.loads(r[0]) for r in rows]

    def waiting_records(self, run_id: str, wait_key: str) -> List[Dict[str, Any]]:
        """The run's waiting records whose wait has `wait_key`, in order, by the index schema.sql keeps
        for them."""
        return self._by_index(self._WAITING, self._WAITING_SCAN, wait_key, run_id)

    def completed_record(self, run_id: str, idempotency_key: str) -> Optional[Dict[str, Any]]:
        """The run's first completed record with `idempotency_key`, by the index schema.sql keeps for
        it: one record read, however long the ledger."""
        return _first_completed(self._by_index(self._COMPLETED, self._COMPLETED_SCAN, idempotency_key, run_id),
                                idempotency_key)

    def count(self, run_id: str) -> int:
        return self.db.query_one("SELECT COALESCE(MAX(seq), 0) FROM ledger WHERE run_id = ?", (str(run_id),))[0]

    def count_many(self, run_ids: Sequence[str]) -> Dict[str, int]:
        out: Dict[str, int] = {}
        ids = [r for r in run_ids if r]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.query(f"SELECT run_id, MAX(seq) FROM ledger WHERE run_id IN ({marks}) GROUP BY run_id",
                                 chunk)
            out.update({rid: n for rid, n in rows})
        return out

    def metrics_many(self, run_ids: Sequence[str]) -> Dict[str, Dict[str, int]]:
        """Per-run `steps`, `llm_calls`, `tool_calls`, `tokens_total` (runs with no completed step are
        absent), read from the `run_metrics` counters kept at append time."""
        out: Dict[str, Dict[str, int]] = {}
        ids = [r for r in run_ids if r]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self.db.query("SELECT run_id, steps, llm_calls, tool_calls, tokens_total FROM run_metrics"
                                 f" WHERE run_id IN ({','.join('?' * len(chunk))})", chunk)
            out.update({rid: {"steps": steps, "llm_calls": llm, "tool_calls": tools, "tokens_total": tokens}
                        for rid, steps, llm, tools, tokens in rows})
        return out

    def delete(self, run_id: str) -> int:
        def _delete(conn: apsw.Connection) -> int:
            conn.execute("DELETE FROM ledger WHERE run_id = ?", (str(run_id),))
            removed = conn.changes()
            conn.execute("DELETE FROM run_metrics WHERE run_id = ?", (str(run_id),))
            return removed

        return self.db.write(_delete)


COMMANDS_TOPIC = "work"  # bumped when a command or a new run needs the runner


def _is_json_object(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return isinstance(value, dict)


class SqliteCommandStore:
    """CommandStore + DeletableCommandStore over the `commands` table (idempotent by command_id)."""

    _COLUMNS = "seq, command_id, run_id, type, payload_json, ts, client_id"

    def __init__(self, db: Database) -> None:
        self.db = db

    def append(self, record: CommandRecord) -> CommandAppendResult:
        command_id = str(record.command_id or "").strip() or uuid.uuid4().hex
        run_id = str(record.run_id or "").strip()
        kind = str(record.type or "").strip()
        payload = dict(record.payload or {})
        if not run_id:
            raise ValueError("CommandRecord.run_id must be non-empty")
        if not kind:
            raise ValueError("CommandRecord.type must be non-empty")
        if not _is_json_object(payload):
            raise ValueError("CommandRecord.payload must be a JSON-serializable dict")
        ts = str(record.ts or "").strip() or utc_now_iso()
        client_id = str(record.client_id).strip() if isinstance(record.client_id, str) and record.client_id else None
        row = (command_id, run_id, kind, _json_dumps(payload), ts, client_id)

        def _append(conn: apsw.Connection) -> CommandAppendResult:
            conn.execute(
                "INSERT OR IGNORE INTO commands (command_id, run_id, type, payload_json, ts, client_id)"
                " VALUES (?,?,?,?,?,?)", row)
            if conn.changes() == 1:
                return CommandAppendResult(accepted=True, duplicate=False, seq=conn.last_insert_rowid())
            seq = conn.execute("SELECT seq FROM commands WHERE command_id = ?", (command_id,)).fetchone()[0]
            return CommandAppendResult(accepted=False, duplicate=True, seq=seq)

        return self.db.write(_append, topics=(COMMANDS_TOPIC,))

    def list_after(self, *, after: int, limit: int = 1000) -> Tuple[List[CommandRecord], int]:
        after = int(after or 0)
        rows = self.db.query(
            f"SELECT {self._COLUMNS} FROM commands WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, max(1, int(limit or 1000)))
        )
        records = [_command_from_row(r) for r in rows]
        return records, (records[-1].seq if records else after)

    def get(self, command_id: str) -> Optional[CommandRecord]:
        row = self.db.query_one(f"SELECT {self._COLUMNS} FROM commands WHERE command_id = ?", (command_id,))
        return _command_from_row(row) if row else None

    def for_run(self, run_id: str, *, limit: int = 200) -> List[CommandRecord]:
        """The newest commands addressed to `run_id`, newest first."""
        rows = self.db.query(f"SELECT {self._COLUMNS} FROM commands WHERE run_id = ? ORDER BY seq DESC LIMIT ?",
                             (run_id, int(limit)))
        return [_command_from_row(r) for r in rows]

    def get_last_seq(self) -> int:
        return self.db.query_one("SELECT COALESCE(MAX(seq), 0) FROM commands")[0]

    def delete_by_run(self, run_id: str) -> int:
        def _delete(conn: apsw.Connection) -> int:
            conn.execute("DELETE FROM commands WHERE run_id = ?", (str(run_id),))
            return conn.changes()

        return self.db.write(_delete)


def _command_from_row(row: Tuple[Any, ...]) -> CommandRecord:
    seq, command_id, run_id, kind, payload_json, ts, client_id = row
    try:
        payload = json.loads(payload_json)
    except ValueError:
        payload = {}
    return CommandRecord(
        command_id=command_id, run_id=run_id, type=kind, payload=payload if isinstance(payload, dict) else {},
        ts=ts, client_id=client_id or None, seq=seq,
    )


class SqliteCommandCursorStore:
    """CommandCursorStore: one consumer's durable position in the inbox."""

    def __init__(self, db: Database, consumer_id: str = "gateway_runner") -> None:
        self.db = db
        self.consumer_id = consumer_id

    def load(self) -> int:
        row = self.db.query_one("SELECT cursor FROM command_cursors WHERE consumer_id = ?", (self.consumer_id,))
        return int(row[0]) if row else 0

    def save(self, cursor: int) -> None:
        row = (self.consumer_id, int(cursor or 0), utc_now_iso())
        self.db.write(lambda conn: conn.execute(
            "INSERT INTO command_cursors (consumer_id, cursor, updated_at) VALUES (?,?,?)"
            " ON CONFLICT(consumer_id) DO UPDATE SET cursor=excluded.cursor, updated_at=excluded.updated_at", row))


class SqliteArtifactStore(ArtifactStore):
    """The runtime's ArtifactStore with content as BLOBs in the same file (deduplicated by sha256)."""

    _META = "SELECT artifact_id, content_type, size_bytes, created_at, sha256, run_id, tags_json FROM artifacts"

    def __init__(self, db: Database) -> None:
        self.db = db

    def store(
        self,
        content: bytes,
        *,
        content_type: str = "application/octet-stream",
        run_id: Optional[str] = None,
        tags: Optional[Dict[str, str]] = None,
        artifact_id: Optional[str] = None,
    ) -> ArtifactMetadata:
        content = bytes(content)
        if artifact_id is None:
            artifact_id = compute_artifact_id(content, run_id=run_id)
        validate_artifact_id(artifact_id)
        meta = ArtifactMetadata(
            artifact_id=artifact_id, content_type=content_type, size_bytes=len(content), created_at=utc_now_iso(),
            blob_id=hashlib.sha256(content).hexdigest(), run_id=run_id, tags=dict(tags or {}),
        )
        self.db.write(lambda conn: self._insert(conn, meta, content))
        return meta

    @staticmethod
    def _insert(conn: apsw.Connection, meta: ArtifactMetadata, content: bytes) -> None:
        conn.execute("INSERT OR IGNORE INTO artifact_blobs (sha256, content) VALUES (?, ?)", (meta.blob_id, content))
        conn.execute(
            "INSERT OR REPLACE INTO artifacts"
            " (artifact_id, run_id, content_type, size_bytes, created_at, sha256, tags_json)"
            " VALUES (?,?,?,?,?,?,?)",
            (meta.artifact_id, meta.run_id, meta.content_type, meta.size_bytes, meta.created_at, meta.blob_id,
             _json_dumps(meta.tags or {})),
        )

    def load(self, artifact_id: str) -> Optional[Artifact]:
        meta = self.get_metadata(artifact_id)
        if meta is None:
            return None
        row = self.db.query_one("SELECT content FROM artifact_blobs WHERE sha256 = ?", (meta.blob_id,))
        return Artifact(metadata=meta, content=bytes(row[0])) if row else None

    def read_range(self, artifact_id: str, start: int, length: int) -> bytes:
        """`length` bytes of the content from offset `start` (no full load: for streaming)."""
        row = self.db.query_one(
            "SELECT substr(b.content, ?, ?) FROM artifacts a JOIN artifact_blobs b ON b.sha256 = a.sha256"
            " WHERE a.artifact_id = ?", (int(start) + 1, int(length), artifact_id))
        return bytes(row[0]) if row and row[0] is not None else b""

    def get_metadata(self, artifact_id: str) -> Optional[ArtifactMetadata]:
        try:
            validate_artifact_id(artifact_id)
        except ValueError:
            return None
        row = self.db.query_one(self._META + " WHERE artifact_id = ?", (artifact_id,))
        return _artifact_meta(row) if row else None

    def exists(self, artifact_id: str) -> bool:
        return self.get_metadata(artifact_id) is not None

    def delete(self, artifact_id: str) -> bool:
        def _delete(conn: apsw.Connection) -> bool:
            conn.execute("DELETE FROM artifacts WHERE artifact_id = ?", (artifact_id,))
            removed = conn.changes() > 0
            conn.execute("DELETE FROM artifact_blobs WHERE sha256 NOT IN (SELECT sha256 FROM artifacts)")
            return removed

        return self.db.write(_delete)

    def list_by_run(self, run_id: str) -> List[ArtifactMetadata]:
        rows = self.db.query(self._META + " WHERE run_id = ? ORDER BY created_at DESC", (str(run_id),))
        return [_artifact_meta(r) for r in rows]

    def list_all(self, *, limit: int = 1000) -> List[ArtifactMetadata]:
        rows = self.db.query(self._META + " ORDER BY created_at DESC LIMIT ?", (max(1, int(limit)),))
        return [_artifact_meta(r) for r in rows]


def _artifact_meta(row: Tuple[Any, ...]) -> ArtifactMetadata:
    artifact_id, content_type, size, created_at, sha256, run_id, tags_json = row
    return ArtifactMetadata(
        artifact_id=artifact_id, content_type=content_type, size_bytes=size, created_at=created_at,
        blob_id=sha256, run_id=run_id, tags=json.loads(tags_json or "{}"),
    )


# -- 2.4 The gateway's own stores (bundles, outcomes, deprecations, settings, audit, reports) ------


@dataclass(frozen=True)
class StoredBundle:
    """An uploaded `.flow` file as kept in the database."""

    bundle_id: str
    bundle_version: str
    content: bytes
    sha256: str
    uploaded_at: str


class BundleStore:
    """Uploaded `.flow` bundles, bytes and all, in the `bundles` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, bundle_id: str, bundle_version: str, content: bytes, *, overwrite: bool = False) -> StoredBundle:
        """Store a bundle; raise `FileExistsError` if that version exists and not `overwrite`."""
        bundle = StoredBundle(bundle_id, bundle_version, bytes(content), hashlib.sha256(content).hexdigest(),
                              utc_now_iso())

        def _put(conn: apsw.Connection) -> None:
            exists = conn.execute("SELECT 1 FROM bundles WHERE bundle_id = ? AND bundle_version = ?",
                                  (bundle_id, bundle_version)).fetchone()
            if exists and not overwrite:
                raise FileExistsError(f"Bundle already installed: {bundle_id}@{bundle_version}")
            conn.execute("INSERT OR REPLACE INTO bundles (bundle_id, bundle_version, content, sha256, uploaded_at)"
                         " VALUES (?,?,?,?,?)",
                         (bundle_id, bundle_version, bundle.content, bundle.sha256, bundle.uploaded_at))

        self.db.write(_put)
        return bundle

    def list(self) -> List[StoredBundle]:
        rows = self.db.query("SELECT bundle_id, bundle_version, content, sha256, uploaded_at FROM bundles"
                             " ORDER BY bundle_id, bundle_version")
        return [StoredBundle(a, b, bytes(c), d, e) for a, b, c, d, e in rows]

    def delete(self, bundle_id: str, bundle_version: Optional[str] = None) -> int:
        def _delete(conn: apsw.Connection) -> int:
            if bundle_version is None:
                conn.execute("DELETE FROM bundles WHERE bundle_id = ?", (bundle_id,))
            else:
                conn.execute("DELETE FROM bundles WHERE bundle_id = ? AND bundle_version = ?",
                             (bundle_id, bundle_version))
            return conn.changes()

        return self.db.write(_delete)


class CommandOutcomeStore:
    """What happened to each inbox command: `applied`, or `failed` with the reason."""

    _COLUMNS = "seq, command_id, run_id, status, error, applied_at"

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, command: CommandRecord, status: str, error: Optional[str] = None) -> None:
        row = (command.seq, command.command_id, command.run_id, status, error, utc_now_iso())
        self.db.write(lambda conn: conn.execute(
            f"INSERT OR REPLACE INTO command_outcomes ({self._COLUMNS}) VALUES (?,?,?,?,?,?)", row))

    def exists(self, seq: int) -> bool:
        return self.db.query_one("SELECT 1 FROM command_outcomes WHERE seq = ?", (int(seq),)) is not None

    def get(self, command_id: str) -> Optional[Dict[str, Any]]:
        row = self.db.query_one(f"SELECT {self._COLUMNS} FROM command_outcomes WHERE command_id = ?", (command_id,))
        return self._as_dict(row) if row else None

    def for_run(self, run_id: str, *, limit: int = 200) -> List[Dict[str, Any]]:
        rows = self.db.query(f"SELECT {self._COLUMNS} FROM command_outcomes WHERE run_id = ? ORDER BY seq DESC LIMIT ?",
                             (run_id, int(limit)))
        return [self._as_dict(r) for r in rows]

    @staticmethod
    def _as_dict(row: Tuple[Any, ...]) -> Dict[str, Any]:
        return dict(zip(("seq", "command_id", "run_id", "status", "error", "applied_at"), row, strict=True))


class DeprecationStore:
    """Deprecated bundle entrypoints (`flow_id` `*` covers the whole bundle)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def set(self, bundle_id: str, flow_id: str, reason: Optional[str]) -> str:
        at = utc_now_iso()
        self.db.write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO deprecations (bundle_id, flow_id, reason, deprecated_at) VALUES (?,?,?,?)",
            (bundle_id, flow_id, reason, at)))
        return at

    def clear(self, bundle_id: str, flow_id: str) -> bool:
        def _clear(conn: apsw.Connection) -> bool:
            conn.execute("DELETE FROM deprecations WHERE bundle_id = ? AND flow_id = ?", (bundle_id, flow_id))
            return conn.changes() > 0

        return self.db.write(_clear)

    def all(self) -> Dict[Tuple[str, str], Dict[str, Any]]:
        rows = self.db.query("SELECT bundle_id, flow_id, reason, deprecated_at FROM deprecations")
        return {(b, f): {"reason": r, "deprecated_at": at} for b, f, r, at in rows}


class DynamicFlowStore:
    """Gateway-generated workflow definitions (schedule wrappers), so they survive restarts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, workflow_id: str, definition: Dict[str, Any]) -> None:
        now = utc_now_iso()
        row = (workflow_id, _json_dumps(definition), now, now)
        self.db.write(lambda conn: conn.execute(
            "INSERT INTO dynamic_flows (workflow_id, flow_json, created_at, updated_at) VALUES (?,?,?,?)"
            " ON CONFLICT(workflow_id) DO UPDATE SET flow_json=excluded.flow_json, updated_at=excluded.updated_at",
            row))

    def all(self) -> Dict[str, Dict[str, Any]]:
        return {wid: json.loads(text)
                for wid, text in self.db.query("SELECT workflow_id, flow_json FROM dynamic_flows")}

    def get(self, workflow_id: str) -> Optional[Dict[str, Any]]:
        row = self.db.query_one("SELECT flow_json FROM dynamic_flows WHERE workflow_id = ?", (workflow_id,))
        return json.loads(row[0]) if row else None


class SettingsStore:
    """Small key/value settings in the database (the generated API token lives here)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, key: str) -> Optional[str]:
        row = self.db.query_one("SELECT value FROM settings WHERE key = ?", (key,))
        return row[0] if row else None

    def set(self, key: str, value: str) -> None:
        self.db.write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO settings (key, value, updated_at) VALUES (?,?,?)", (key, value, utc_now_iso())))

    def set_if_absent(self, key: str, value: str) -> bool:
        """Store `value` unless `key` has one; whether it was stored (two first starts: one wins)."""
        def _insert(conn: apsw.Connection) -> bool:
            conn.execute("INSERT OR IGNORE INTO settings (key, value, updated_at) VALUES (?,?,?)",
                         (key, value, utc_now_iso()))
            return conn.changes() == 1

        return self.db.write(_insert)


class AuditStore:
    """Write-request audit rows in the database, kept to a size budget (oldest dropped first)."""

    _COLUMNS = ("ts, request_id, client_ip, method, path, status, duration_ms, token_fp, headers_json, query,"
                " auth_required, origin, user_agent, bytes_in, error")
    _KEYS = ("id", "ts", "request_id", "client_ip", "method", "path", "status", "duration_ms", "token_fp", "headers",
             "query", "auth_required", "origin", "user_agent", "bytes_in", "error")
    _MARKS = ",".join("?" * len(_COLUMNS.split(",")))
    _ROW_OVERHEAD = 120  # bytes per row besides path and headers, for the size estimate

    def __init__(self, db: Database, max_bytes: int = 0, prune_every: int = 100) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.prune_every = prune_every
        self._writes = 0

    def append(self, row: Tuple[Any, ...]) -> None:
        """Insert one row: the values of `_COLUMNS`, in order."""
        self.db.write(lambda conn: conn.execute(
            f"INSERT INTO audit_log ({self._COLUMNS}) VALUES ({self._MARKS})", row))
        self._counted()

    def append_with_next_write(self, make_row: Callable[[], Tuple[Any, ...]]) -> List[int]:
        """Insert `make_row()` inside this thread's next database write (same transaction, same commit).

        Returns a box holding the row id once the row is written (empty until then, or if that write
        never happens); `settle` then fixes the row if the request ended otherwise than assumed.
        """
        box: List[int] = []

        def _insert(conn: apsw.Connection) -> None:
            conn.execute(f"INSERT INTO audit_log ({self._COLUMNS}) VALUES ({self._MARKS})", make_row())
            box.append(conn.last_insert_rowid())

        self.db.attach_to_next_write(_insert)
        return box

    def settle(self, box: List[int], row: Tuple[Any, ...], assumed_status: int) -> None:
        """Finish a request's audit row: written with its write and right, fixed, or (never written) appended."""
        self.db.attach_to_next_write(None)
        if not box:
            self.append(row)
            return
        self._counted()
        status, duration_ms, error = row[5], row[6], row[-1]
        if status == assumed_status and error is None:
            return

        def _fix(conn: apsw.Connection) -> None:  # the write was rolled back or the request failed after it
            # (the request id too: a rolled-back row's id may since belong to another request's row)
            conn.execute("UPDATE audit_log SET status = ?, duration_ms = ?, error = ? WHERE id = ? AND request_id = ?",
                         (status, duration_ms, error, box[0], row[1]))
            if conn.changes() == 0:
                conn.execute(f"INSERT INTO audit_log ({self._COLUMNS}) VALUES ({self._MARKS})", row)

        self.db.write(_fix)

    def _counted(self) -> None:
        self._writes += 1
        if self.max_bytes and self._writes % self.prune_every == 0:
            self.prune()

    def prune(self) -> int:
        """Drop the oldest rows until the estimated size fits `max_bytes`; return how many."""
        def _prune(conn: apsw.Connection) -> int:
            total = conn.execute(f"SELECT COALESCE(SUM(length(path) + length(headers_json) + {self._ROW_OVERHEAD}), 0),"
                                 " COUNT(*) FROM audit_log").fetchone()
            size, count = total
            if size <= self.max_bytes or not count:
                return 0
            drop = count - int(count * self.max_bytes / size)
            conn.execute("DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log ORDER BY id LIMIT ?)", (drop,))
            return conn.changes()

        return self.db.write(_prune)

    def tail(self, limit: int = 100, before_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """The newest rows (older than `before_id` if given), newest first."""
        where, params = ("", [int(limit)]) if before_id is None else ("WHERE id < ?", [int(before_id), int(limit)])
        rows = self.db.query(f"SELECT id, {self._COLUMNS} FROM audit_log {where} ORDER BY id DESC LIMIT ?", params)
        out = []
        for row in rows:
            item = dict(zip(self._KEYS, row, strict=True))
            item["headers"], item["auth_required"] = json.loads(item["headers"]), bool(item["auth_required"])
            out.append(item)
        return out

    @staticmethod
    def jsonl_entry(row: Dict[str, Any]) -> Dict[str, Any]:
        """A row as one line of the original gateway's `audit_log.jsonl` (its field names; optional
        fields only when set)."""
        entry = {"ts": row["ts"], "request_id": row["request_id"], "ip": row["client_ip"], "method": row["method"],
                 "path": row["path"], "query": row["query"], "status": row["status"],
                 "duration_ms": int(row["duration_ms"]), "auth_required": row["auth_required"]}
        optional = {"auth_token_fp": row["token_fp"], "origin": row["origin"], "user_agent": row["user_agent"],
                    "bytes_in": row["bytes_in"], "headers": row["headers"] or None, "error": row["error"]}
        entry.update({k: v for k, v in optional.items() if v is not None})
        return entry


class ReportStore:
    """The reports inbox: bug reports and feature requests as Markdown rows, one per filename."""

    _LIST = "report_type, filename, title, created_at, session_id, workflow_id, active_run_id"

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, report_type: str, stem: str, *, title: str, created_at: str, session_id: str, workflow_id: str,
            active_run_id: str, content: str) -> str:
        """Store a report under the first free `<stem>.md`, `<stem>_2.md`, ... and return that filename."""
        def _add(conn: apsw.Connection) -> str:
            taken = {r[0] for r in conn.execute(
                "SELECT filename FROM reports WHERE report_type = ? AND (filename = ? OR filename LIKE ? ESCAPE '\\')",
                (report_type, f"{stem}.md", stem.replace("_", "\\_") + "\\_%.md"))}
            filename = f"{stem}.md"
            n = 1
            while filename in taken:
                n += 1
                filename = f"{stem}_{n}.md"
            conn.execute("INSERT INTO reports (report_type, filename, title, created_at, session_id, workflow_id,"
                         " active_run_id, content) VALUES (?,?,?,?,?,?,?,?)",
                         (report_type, filename, title, created_at, session_id, workflow_id, active_run_id, content))
            return filename

        return self.db.write(_add)

    def list(self, report_type: str, limit: int = 1000) -> List[Dict[str, Any]]:
        rows = self.db.query(f"SELECT {self._LIST} FROM reports WHERE report_type = ?"
                             " ORDER BY created_at DESC, filename DESC LIMIT ?", (report_type, int(limit)))
        return [dict(zip(self._LIST.split(", "), r, strict=True)) for r in rows]

    def content(self, report_type: str, filename: str) -> Optional[str]:
        row = self.db.query_one("SELECT content FROM reports WHERE report_type = ? AND filename = ?",
                                (report_type, filename))
        return row[0] if row else None


# -- 2.5 File-store adapter (the upstream JSON/JSONL layout) and opening the stores ----------------


def _is_paused(run: RunState) -> bool:
    control = (run.vars or {}).get("_runtime", {}) if isinstance(run.vars, dict) else {}
    control = control.get("control") if isinstance(control, dict) else None
    return bool(isinstance(control, dict) and control.get("paused") is True)


class FileRunStore(JsonFileRunStore):
    """The runtime's JSON run store plus the queries the gateway adds (`RunStorage`), by scanning files."""

    _ALL = 1 << 30  # "no limit" for the upstream queries, which take one

    def load_json(self, run_id: str) -> Optional[str]:
        try:
            return self._path(str(run_id)).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def save_row(self, row: Tuple[Any, ...]) -> None:
        self.save(run_from_dict(json.loads(row[-1])))

    def exists(self, run_id: str) -> bool:
        return self._path(str(run_id)).exists()

    def status_of(self, run_id: str) -> Optional[str]:
        run = self.load(run_id)
        return _enum_value(run.status) if run is not None else None

    def adopt_own_session(self, run_id: str) -> None:
        run = self.load(run_id)
        if run is not None and not run.session_id:
            run.session_id = run_id
            self.save(run)

    def ids_waiting_on(self, wait_key: str, *, limit: int = 10_000) -> List[str]:
        runs = self.list_runs(status=RunStatus.WAITING, limit=limit)
        return [r.run_id for r in runs if r.waiting is not None and r.waiting.wait_key == wait_key]

    def child_ids(self, parent_run_id: str) -> List[str]:
        return [r.run_id for r in self.list_children(parent_run_id=parent_run_id)]

    def live_children(self) -> List[Tuple[str, str]]:
        return [(r.run_id, r.parent_run_id) for status in LIVE_STATUSES
                for r in self.list_runs(status=RunStatus(status), limit=self._ALL) if r.parent_run_id]

    def parent_id(self, run_id: str) -> Optional[str]:
        run = self.load(run_id)
        return run.parent_run_id if run is not None else None

    def runnable_ids(self, *, now_iso: str, limit: int) -> List[str]:
        """RUNNING runs, then due UNTIL waits, not paused (filtered before `limit` applies, as in SQL)."""
        everything = sys.maxsize  # the file store reads every run file anyway
        running = self.list_runs(status=RunStatus.RUNNING, limit=everything)
        due = self.list_due_wait_until(now_iso=now_iso, limit=everything)
        seen, out = set(), []
        for run in [*running, *due]:
            if run.run_id not in seen and not _is_paused(run):
                seen.add(run.run_id)
                out.append(run.run_id)
        return out[:limit]

    def list_run_index(
        self,
        *,
        status: Optional[RunStatus] = None,
        workflow_id: Optional[str] = None,
        session_id: Optional[str] = None,
        root_only: bool = False,
        limit: int = 100,
        before: Optional[Tuple[str, str]] = None,
        exclude_internal: bool = False,
    ) -> List[Dict[str, Any]]:
        """Like `SqliteRunStore.list_run_index` (same order and keyset paging), from every run file."""
        rows = super().list_run_index(status=status, workflow_id=workflow_id, session_id=session_id,
                                      root_only=root_only, limit=self._ALL)
        rows = [r for r in rows if not (exclude_internal and str(r["workflow_id"]).startswith("__"))
                and (before is None or ((r["updated_at"] or ""), r["run_id"]) < before)]
        rows.sort(key=lambda r: ((r["updated_at"] or ""), r["run_id"]), reverse=True)
        return rows[:max(1, int(limit or 100))]

    def list_run_page(self, *, status: Optional[RunStatus] = None, workflow_id: Optional[str] = None,
                      session_id: Optional[str] = None, root_only: bool = False, limit: int = 100,
                      before: Optional[Tuple[str, str]] = None, exclude_internal: bool = False) -> RunPage:
        """The runs of `list_run_index`'s page, each loaded from its file."""
        rows = self.list_run_index(status=status, workflow_id=workflow_id, session_id=session_id, root_only=root_only,
                                   limit=limit + 1, before=before, exclude_internal=exclude_internal)
        page = rows[:limit]
        more = ((page[-1]["updated_at"] or ""), page[-1]["run_id"]) if len(rows) > limit and page else None
        runs = (self.load(row["run_id"]) for row in page)
        return RunPage([run for run in runs if run is not None], more)


class FileLedgerStore(JsonlLedgerStore):
    """The runtime's JSONL ledger plus range reads and append signals."""

    def __init__(self, base_dir: Path, signals: Signals) -> None:
        super().__init__(base_dir)
        self.signals = signals

    def append(self, record: StepRecord) -> None:
        super().append(record)
        self.signals.bump((ledger_topic(record.run_id),))

    def append_json(self, run_id: str, record_json: str) -> int:
        with self._path(run_id).open("a", encoding="utf-8") as f:
            f.write(record_json + "\n")
        self.signals.bump((ledger_topic(run_id),))
        return self.count(run_id)

    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]:
        after = max(0, int(after))
        return self.list(run_id)[after:after + max(1, int(limit))]

    def page_json(self, run_id: str, after: int, limit: int) -> List[str]:
        return [_json_dumps(r) for r in self.page(run_id, after, limit)]

    def completed_record(self, run_id: str, idempotency_key: str) -> Optional[Dict[str, Any]]:
        return _first_completed(self.list(run_id), idempotency_key)

    def waiting_records(self, run_id: str, wait_key: str) -> List[Dict[str, Any]]:
        return [r for r in self.list(run_id) if _is_waiting_on(r, wait_key)]

    def count_many(self, run_ids: Sequence[str]) -> Dict[str, int]:
        """Record counts of the runs that have any (like the SQLite store)."""
        counts = {rid: self.count(rid) for rid in run_ids if rid}
        return {rid: n for rid, n in counts.items() if n}

    def metrics_many(self, run_ids: Sequence[str]) -> Dict[str, Dict[str, int]]:
        """Counted from each listed run's ledger (the SQLite backend keeps counters instead): the same
        answer, slower; runs with no completed step are absent."""
        out: Dict[str, Dict[str, int]] = {}
        for run_id in filter(None, run_ids):
            for record in self.list(run_id):
                counts = step_counts(record.get("status"), record.get("effect"), record.get("result"))
                if counts is None:
                    continue
                totals = out.setdefault(run_id, dict.fromkeys(("steps", "llm_calls", "tool_calls", "tokens_total"), 0))
                totals["steps"] += 1
                for key, n in zip(("llm_calls", "tool_calls", "tokens_total"), counts, strict=True):
                    totals[key] += n
        return out


class FileCommandStore(JsonlCommandStore):
    """The runtime's JSONL inbox plus lookup by command id and wake-ups for the runner."""

    def __init__(self, base_dir: Path, signals: Signals) -> None:
        super().__init__(base_dir)
        self.signals = signals

    def append(self, record: CommandRecord) -> CommandAppendResult:
        result = super().append(record)
        self.signals.bump((COMMANDS_TOPIC,))
        return result

    def _all(self) -> Iterator[CommandRecord]:
        after = 0
        while True:
            records, after = self.list_after(after=after, limit=1000)
            if not records:
                return
            yield from records

    def get(self, command_id: str) -> Optional[CommandRecord]:
        return next((rec for rec in self._all() if rec.command_id == command_id), None)

    def for_run(self, run_id: str, *, limit: int = 200) -> List[CommandRecord]:
        return [rec for rec in self._all() if rec.run_id == run_id][::-1][:limit]


def _is_artifact_id(artifact_id: str) -> bool:
    try:
        validate_artifact_id(artifact_id)
    except ValueError:
        return False
    return True


class RangedFileArtifactStore(FileArtifactStore):
    """The runtime's file artifact store plus range reads (`ArtifactStorage`), answering like the
    SQLite store: an invalid id is an unknown one (upstream raises), a run's artifacts newest first."""

    def read_range(self, artifact_id: str, start: int, length: int) -> bytes:
        """`length` bytes of the content from offset `start`, read from its file (no full load)."""
        path = self.content_path(artifact_id) if _is_artifact_id(artifact_id) else None
        if path is None:
            return b""
        with path.open("rb") as handle:
            handle.seek(max(0, int(start)))
            return handle.read(max(0, int(length)))

    def get_metadata(self, artifact_id: str) -> Optional[ArtifactMetadata]:
        return super().get_metadata(artifact_id) if _is_artifact_id(artifact_id) else None

    def load(self, artifact_id: str) -> Optional[Artifact]:
        return super().load(artifact_id) if _is_artifact_id(artifact_id) else None

    def delete(self, artifact_id: str) -> bool:
        return super().delete(artifact_id) if _is_artifact_id(artifact_id) else False

    def list_by_run(self, run_id: str) -> List[ArtifactMetadata]:
        return sorted(super().list_by_run(run_id), key=lambda meta: meta.created_at, reverse=True)


@dataclass
class Stores:
    """Everything durable, behind one set of interfaces whatever the backend.

    `db` always exists: with the file backend it still holds the gateway's own state
    (uploaded bundles, leases, command outcomes, ...), while runs, ledgers, the inbox, the
    cursor and artifacts stay in the upstream on-disk layout.
    """

    backend: str
    location: Path  # the database file, or the data dir holding the file backend's runs
    db: Database
    runs: RunStorage
    ledger: LedgerStorage
    commands: CommandStorage
    cursor: CursorStorage
    artifacts: ArtifactStorage
    bundles: BundleStore
    leases: LeaseStore
    outcomes: CommandOutcomeStore
    deprecations: DeprecationStore
    dynamic_flows: DynamicFlowStore
    settings: SettingsStore
    audit: AuditStore
    reports: ReportStore
    # Whether one `db` transaction also covers runs, ledgers and the inbox cursor (SQLite). With the file
    # backend their files are written at once: work that must stay all-or-nothing goes one piece at a time.
    atomic: bool = True
    # Whether a run or a command is read by its key in about constant time (SQLite's indexes); the file
    # backend finds a command by scanning its inbox file.
    keyed_reads: bool = True

    def describe(self) -> Dict[str, str]:
        """Which backend holds the runs, and where (health and ping tell operators)."""
        return {"backend": self.backend, "db_path": str(self.location)}

    def close(self) -> None:
        self.db.close()


def open_stores(config: Config, *, inspect_only: bool = False) -> Stores:
    """Open the configured backend (`sqlite` by default, or the upstream `file` layout).

    `inspect_only` (doctor): never create, migrate or write the database file."""
    db = Database(config.db_path, synchronous=config.synchronous, migrate=not inspect_only,
                  busy_timeout_ms=int(config.busy_timeout_s * 1000))
    if config.store_backend == "file":
        base = Path(config.data_dir)
        return Stores(
            backend="file", atomic=False, keyed_reads=False, location=base, db=db, runs=FileRunStore(base),
            ledger=FileLedgerStore(base, db.signals), commands=FileCommandStore(base, db.signals),
            cursor=JsonFileCommandCursorStore(base / "commands_cursor.json"),
            artifacts=RangedFileArtifactStore(base), **_gateway_stores(db),
        )
    return Stores(
        backend="sqlite", location=Path(config.db_path), db=db, runs=SqliteRunStore(db),
        ledger=SqliteLedgerStore(db), commands=SqliteCommandStore(db), cursor=SqliteCommandCursorStore(db),
        artifacts=SqliteArtifactStore(db), **_gateway_stores(db),
    )


def _gateway_stores(db: Database) -> Dict[str, Any]:
    return {"bundles": BundleStore(db), "leases": LeaseStore(db), "outcomes": CommandOutcomeStore(db),
            "deprecations": DeprecationStore(db), "dynamic_flows": DynamicFlowStore(db), "settings": SettingsStore(db),
            "audit": AuditStore(db), "reports": ReportStore(db)}


# -- 2.6 Unit of work: a runtime step's writes, committed together ---------------------------------


@dataclass
class StepWrites:
    """The run saves and ledger appends one thread made inside `UnitOfWork.collect()`.

    `runs` holds the last save of each run (serialised when saved); `ledger` the appends in
    order; `base` the stored text of each run the step read before saving it, so the commit
    can tell whether somebody else changed that run meanwhile.
    """

    runs: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    ledger: List[Tuple[str, str]] = field(default_factory=list)
    base: Dict[str, Optional[str]] = field(default_factory=dict)
    loaded: Dict[str, Optional[str]] = field(default_factory=dict)  # see _BufferedRunStore.stored_as_first_loaded
    mid_step_commits: bool = False  # a tick's: its writes may be committed before a slow call
    lease: Any = None  # the lease the step runs under (a `LeaseToken`), for such a commit
    published: int = 0  # appends committed mid-step (see `Gateway._publish_before_call`): gone from `ledger`
    _saved: List[Dict[str, Tuple[Any, ...]]] = field(default_factory=list)

    def mark(self) -> Tuple[int, int]:
        """A point to `rollback` to (the writes of the steps before it stay), where a new step starts
        (see `_BufferedRunStore.stored_as_first_loaded`)."""
        self._saved.append(dict(self.runs))
        self.loaded.clear()
        return self.published + len(self.ledger), len(self._saved) - 1

    def rollback(self, mark: Tuple[int, int]) -> None:
        del self.ledger[max(0, mark[0] - self.published):]  # (what was committed mid-step stays)
        self.runs = self._saved[mark[1]]
        del self._saved[mark[1]:]
        self.loaded.clear()


class UnitOfWork:
    """Wraps the run and ledger stores the runtime is given, so a step's writes can be held in memory.

    Outside `collect()` the wrappers pass every call straight through (commands and starts use
    `Database.transaction()` instead). Inside it, this thread's saves and appends are buffered
    and its reads see them; nothing touches the database until the caller commits the
    `StepWrites`, in one transaction, at the step boundary. So no transaction or lock is held
    while a node executes, and a crash leaves a whole step or none of it.
    """

    def __init__(self, runs: RunStorage, ledger: LedgerStorage) -> None:
        self._local = threading.local()
        self.runs = _BufferedRunStore(runs, self._local)
        self.ledger = _BufferedLedgerStore(ledger, self._local)

    def current(self) -> Optional[StepWrites]:
        """The writes this thread is collecting, if it is."""
        return getattr(self._local, "writes", None)

    @contextmanager
    def collect(self, writes: Optional[StepWrites] = None) -> Iterator[StepWrites]:
        """Buffer this thread's run saves and ledger appends into `writes` (a new one by default)."""
        writes = self._local.writes = writes if writes is not None else StepWrites()
        try:
            yield writes
        finally:
            self._local.writes = None


class _BufferedRunStore:
    def __init__(self, inner: Any, local: threading.local) -> None:
        self._inner = inner
        self._local = local

    def __getattr__(self, name: str) -> Any:  # other queries, unbuffered
        return getattr(self._inner, name)

    # Spelled out: the runtime checks `isinstance(store, QueryableRunStore)`, which on Python 3.12+
    # looks attributes up statically and does not see `__getattr__`.
    def list_runs(self, **kwargs: Any) -> List[RunState]:
        return self._inner.list_runs(**kwargs)

    def list_due_wait_until(self, **kwargs: Any) -> List[RunState]:
        return self._inner.list_due_wait_until(**kwargs)

    def list_children(self, **kwargs: Any) -> List[RunState]:
        return self._inner.list_children(**kwargs)

    def save(self, run: RunState) -> None:
        writes: Optional[StepWrites] = getattr(self._local, "writes", None)
        if writes is None:
            self._inner.save(run)
        else:
            writes.runs[str(run.run_id)] = run_row(run)

    def load(self, run_id: str) -> Optional[RunState]:
        """Inside `collect()`: the run as this thread's step left it, else as stored (a fresh object)."""
        writes: Optional[StepWrites] = getattr(self._local, "writes", None)
        if writes is None:
            return self._inner.load(run_id)
        key = str(run_id)
        text = self._text(writes, key)
        writes.loaded.setdefault(key, text)
        if text is None:
            return None
        states = _run_rows_to_states([(text,)])
        return states[0] if states else None

    def stored_as_first_loaded(self, run_id: str) -> bool:
        """Inside `collect()`: whether the run is stored (or buffered) exactly as this step first
        loaded it (see `_runtime_type`'s `get_state`)."""
        writes: Optional[StepWrites] = getattr(self._local, "writes", None)
        key = str(run_id)
        if writes is None or writes.loaded.get(key) is None:
            return False
        return self._text(writes, key) == writes.loaded[key]

    def _text(self, writes: StepWrites, key: str) -> Optional[str]:
        row = writes.runs.get(key)
        if row is not None:
            return row[-1]
        text = self._inner.load_json(key)
        writes.base.setdefault(key, text)
        return text


class _BufferedLedgerStore:
    def __init__(self, inner: Any, local: threading.local) -> None:
        self._inner = inner
        self._local = local

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def append(self, record: StepRecord) -> None:
        writes: Optional[StepWrites] = getattr(self._local, "writes", None)
        if writes is None:
            self._inner.append(record)
            return
        run_id = str(record.run_id or "").strip()
        if not run_id:
            raise ValueError("StepRecord.run_id must be non-empty")
        writes.ledger.append((run_id, dataclass_json(record)))

    def list(self, run_id: str) -> List[Dict[str, Any]]:
        """The run's records, stored then buffered; for `Runtime.resume`, only those it can use.

        Each resume of a run that waits with a key (an answer, an approval, an event, a subflow's end)
        reads the run's whole ledger to look for a tool-call wait with that key: a cost that grows with
        every step of a long-lived run (a schedule's parent is resumed once per execution). That
        search only picks records that name the key, and then the completed records of that record's
        idempotency key, so it is given those (`_records_of_wait`) and makes the same choice."""
        caller = sys._getframe(1)
        if caller.f_code is _resume_search_code():  # its one `list`: that search
            wait_key = caller.f_locals.get("wait_key_str")
            if isinstance(wait_key, str) and wait_key:
                return self._records_of_wait(run_id, wait_key)
        records = self._inner.list(run_id)
        writes: Optional[StepWrites] = getattr(self._local, "writes", None)
        if writes is not None:
            records.extend(json.loads(text) for rid, text in writes.ledger if rid == run_id)
        return records

    def _buffered_holding(self, run_id: str, key: str) -> Iterator[Dict[str, Any]]:
        """This thread's buffered records of `run_id` whose text holds `key` (as JSON, by the one encoder
        that wrote them: an exact test), decoded; the others are not."""
        writes: Optional[StepWrites] = getattr(self._local, "writes", None)
        quoted = _json_dumps(key)
        return (json.loads(text) for rid, text in (writes.ledger if writes is not None else ())
                if rid == run_id and quoted in text)

    def _records_of_wait(self, run_id: str, wait_key: str) -> List[Dict[str, Any]]:
        records = self._inner.waiting_records(run_id, wait_key)
        records.extend(r for r in self._buffered_holding(run_id, wait_key) if _is_waiting_on(r, wait_key))
        for key in {str(r.get("idempotency_key") or "") for r in records if isinstance(r, dict)} - {""}:
            completed = self.completed_record(run_id, key)
            if completed is not None and completed not in records:
                records.append(completed)
        return records

    def completed_record(self, run_id: str, idempotency_key: str) -> Optional[Dict[str, Any]]:
        """As stored, else among this thread's buffered appends (which come after the stored ones)."""
        record = self._inner.completed_record(run_id, idempotency_key)
        if record is not None:
            return record
        return _first_completed(self._buffered_holding(run_id, idempotency_key), idempotency_key)


# -- 2.7 Migrator and check ------------------------------------------------------------------------

MIGRATION_KINDS = ("runs", "ledger", "commands", "cursor", "artifacts")


@dataclass
class MigrationReport:
    """Per-kind counts of one migration; `ok` when the destination holds every valid source item."""

    source: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIGRATION_KINDS, 0))
    imported: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIGRATION_KINDS, 0))
    present: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIGRATION_KINDS, 0))
    skipped: List[str] = field(default_factory=list)  # "file:line: reason"
    mismatches: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def render(self) -> str:
        lines = [f"{'kind':<10} {'source':>8} {'imported':>9} {'present':>8}"]
        for kind in MIGRATION_KINDS:
            lines.append(f"{kind:<10} {self.source[kind]:>8} {self.imported[kind]:>9} {self.present[kind]:>8}")
        lines.append(f"skipped corrupt items: {len(self.skipped)}")
        lines.extend(f"  {s}" for s in self.skipped)
        lines.append("verification: " + ("ok" if self.ok else "FAILED"))
        lines.extend(f"  {m}" for m in self.mismatches)
        return "\n".join(lines)


class _Progress:
    def __init__(self, stream: Any, every_s: float = 0.5) -> None:
        self.stream = stream
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, kind: str, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self._last < self.every_s):
            return
        self._last = now
        print(f"migrate: {kind} {done}/{total}", file=self.stream, flush=True)


def _read_jsonl(path: Path, report: MigrationReport) -> List[Dict[str, Any]]:
    """Valid JSON objects of a JSONL file; corrupt/truncated lines are reported and skipped."""
    out = []
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                report.skipped.append(f"{path}:{lineno}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                report.skipped.append(f"{path}:{lineno}: not a JSON object")
                continue
            out.append(obj)
    return out


def migrate(source: str, dest: Stores, *, data_dir: Optional[Path] = None, source_db: Optional[Path] = None,
            progress: Any = sys.stderr) -> MigrationReport:
    """Import an upstream data dir (`source="file"`) or an upstream SQLite DB (`"sqlite-upstream"`).

    Idempotent and resumable: every item is keyed (run id, ledger position, command seq, artifact
    id) and skipped when already present, and work is committed in small batches. Source files
    are only read.
    """
    if dest.backend != "sqlite":
        raise ValueError("the migration destination must be the sqlite backend")
    report = MigrationReport()
    tick = _Progress(progress)
    reader = _migration_reader(source, report, data_dir, source_db)
    _migrate_runs(reader, dest, report, tick)
    _migrate_ledgers(reader, dest, report, tick)
    taken, wanted_ids = _migrate_commands(reader, dest, report, tick)
    _migrate_cursor(reader, dest, report, taken, wanted_ids)
    _migrate_artifacts(reader, dest, report, tick)
    for kind in ("runs", "commands", "cursor", "artifacts"):
        if report.present[kind] < report.source[kind]:
            report.mismatches.append(f"{kind}: destination has {report.present[kind]} of {report.source[kind]}")
    return report


def _migration_reader(source: str, report: MigrationReport, data_dir: Optional[Path],
                      source_db: Optional[Path]) -> _FileLayoutReader | _UpstreamSqliteReader:
    """The reader for `source`, once its input is known to exist."""
    if source == "file":
        if data_dir is None or not Path(data_dir).is_dir():
            raise FileNotFoundError(f"source data dir not found: {data_dir}")
        return _FileLayoutReader(Path(data_dir), report)
    if source == "sqlite-upstream":
        if source_db is None or not Path(source_db).is_file():
            raise FileNotFoundError(f"source database not found: {source_db}")
        return _UpstreamSqliteReader(Path(source_db), report)
    raise ValueError(f"unknown migration source {source!r} (expected file or sqlite-upstream)")


def _migrate_runs(reader: _FileLayoutReader | _UpstreamSqliteReader, dest: Stores, report: MigrationReport,
                  tick: _Progress) -> None:
    """Insert runs the destination does not have yet (a run already there is left as it is)."""
    db = dest.db
    runs = reader.runs()
    report.source["runs"] = len(runs)
    for i in range(0, len(runs), 200):
        chunk = runs[i:i + 200]
        added = db.write(lambda conn, chunk=chunk: _insert_missing_runs(conn, chunk, report))
        report.imported["runs"] += added
        tick("runs", min(i + 200, len(runs)), len(runs))
    report.present["runs"] = sum(1 for rid, _ in runs if dest.runs.exists(rid))


def _migrate_ledgers(reader: _FileLayoutReader | _UpstreamSqliteReader, dest: Stores, report: MigrationReport,
                     tick: _Progress) -> None:
    """Append each run's missing tail of ledger records (positions already present are kept)."""
    db = dest.db
    ledgers = reader.ledger_run_ids()
    for n, run_id in enumerate(ledgers, 1):
        records = reader.ledger(run_id)
        report.source["ledger"] += len(records)
        have = dest.ledger.count(run_id)
        missing = records[have:]
        if missing:
            def _append_all(conn: apsw.Connection, rid: str = run_id, start: int = have, recs: list = missing) -> None:
                conn.executemany(SqliteLedgerStore._INSERT,
                                 [(rid, start + k, _json_dumps(r)) for k, r in enumerate(recs, 1)])
                for r in recs:
                    if isinstance(r, dict):
                        SqliteLedgerStore.count_step(conn, rid, step_counts(r.get("status"), r.get("effect"),
                                                                            r.get("result")))
            db.write(_append_all)
            report.imported["ledger"] += len(missing)
        report.present["ledger"] += dest.ledger.count(run_id)
        if dest.ledger.count(run_id) < len(records):
            report.mismatches.append(f"ledger of {run_id}: {dest.ledger.count(run_id)} < {len(records)} source records")
        tick("ledger", n, len(ledgers))


def _migrate_commands(reader: _FileLayoutReader | _UpstreamSqliteReader, dest: Stores, report: MigrationReport,
                      tick: _Progress) -> Tuple[Dict[int, str], set]:
    """Import commands by seq; returns the destination's seq -> command id and the source's ids."""
    db = dest.db
    commands = reader.commands()
    report.source["commands"] = len(commands)

    def _insert_commands(conn: apsw.Connection) -> int:
        before = conn.total_changes()
        conn.executemany(
            "INSERT OR IGNORE INTO commands (seq, command_id, run_id, type, payload_json, ts, client_id)"
            " VALUES (?,?,?,?,?,?,?)", commands)
        return conn.total_changes() - before

    report.imported["commands"] = db.write(_insert_commands) if commands else 0
    wanted_ids = {c[1] for c in commands}
    present_ids = {r[0] for r in db.query("SELECT command_id FROM commands")}
    report.present["commands"] = len(wanted_ids & present_ids)
    tick("commands", len(commands), len(commands), force=bool(commands))

    taken = {seq: cid for seq, cid in db.query("SELECT seq, command_id FROM commands")}
    for row in commands:
        if taken.get(row[0]) not in (None, row[1]):
            report.mismatches.append(f"command seq {row[0]} ({row[1]}) is taken by another command in the destination")
    return taken, wanted_ids


def _migrate_cursor(reader: _FileLayoutReader | _UpstreamSqliteReader, dest: Stores, report: MigrationReport,
                    taken: Dict[int, str], wanted_ids: set) -> None:
    """Carry the source's command cursor over, never past a destination command still to apply."""
    cursor = reader.cursor()
    if cursor is not None:
        report.source["cursor"] = 1
        local = [seq for seq, cid in taken.items() if seq <= cursor and cid not in wanted_ids]
        if local:  # never skip the destination's own commands that are still to be applied
            report.mismatches.append(f"cursor kept below local command seq {min(local)} (not from the source)")
            cursor = min(local) - 1
        current = dest.cursor.load()
        if cursor > current:
            dest.cursor.save(cursor)
            report.imported["cursor"] = 1
        report.present["cursor"] = 1 if dest.cursor.load() >= cursor else 0


def _migrate_artifacts(reader: _FileLayoutReader | _UpstreamSqliteReader, dest: Stores, report: MigrationReport,
                       tick: _Progress) -> None:
    """Copy artifacts by id; one whose content is missing in the source is reported and skipped."""
    db = dest.db
    artifacts = reader.artifact_ids()
    report.source["artifacts"] = len(artifacts)
    for n, artifact_id in enumerate(artifacts, 1):
        if not dest.artifacts.exists(artifact_id):
            artifact = reader.artifact(artifact_id)
            if artifact is None:
                report.skipped.append(f"artifact {artifact_id}: content missing")
                report.source["artifacts"] -= 1
                continue
            db.write(lambda conn, a=artifact: SqliteArtifactStore._insert(conn, a.metadata, a.content))
            report.imported["artifacts"] += 1
        report.present["artifacts"] += 1
        tick("artifacts", n, len(artifacts))


def _insert_missing_runs(conn: apsw.Connection, runs: List[Tuple[str, RunState]], report: MigrationReport) -> int:
    before = conn.total_changes()
    for _run_id, run in runs:
        conn.execute(SqliteRunStore._INSERT_IF_ABSENT, (*_run_index_columns(run), dataclass_json(run)))
    return conn.total_changes() - before


class _FileLayoutReader:
    """Reads the upstream file layout without modifying it."""

    def __init__(self, base: Path, report: MigrationReport) -> None:
        self.base = base
        self.report = report

    def runs(self) -> List[Tuple[str, RunState]]:
        out = []
        for path in sorted(self.base.glob("run_*.json")):
            try:
                run = run_from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError, KeyError) as exc:
                self.report.skipped.append(f"{path}:1: unreadable run checkpoint ({exc})")
                continue
            out.append((run.run_id, run))
        return out

    def ledger_run_ids(self) -> List[str]:
        return sorted(p.name[len("ledger_"):-len(".jsonl")] for p in self.base.glob("ledger_*.jsonl"))

    def ledger(self, run_id: str) -> List[Dict[str, Any]]:
        return _read_jsonl(self.base / f"ledger_{run_id}.jsonl", self.report)

    def commands(self) -> List[Tuple[Any, ...]]:
        path = self.base / "commands.jsonl"
        if not path.exists():
            return []
        out = []
        for obj in _read_jsonl(path, self.report):
            try:
                seq = int(obj["seq"])
                out.append((seq, str(obj["command_id"]), str(obj["run_id"]), str(obj["type"]),
                            _json_dumps(obj.get("payload") or {}), str(obj.get("ts") or utc_now_iso()),
                            obj.get("client_id") or None))
            except (KeyError, TypeError, ValueError):
                self.report.skipped.append(f"{path}: command without seq/command_id/run_id/type: {str(obj)[:80]}")
        return out

    def cursor(self) -> Optional[int]:
        path = self.base / "commands_cursor.json"
        if not path.exists():
            return None
        try:
            return int(json.loads(path.read_text(encoding="utf-8")).get("cursor") or 0)
        except (ValueError, AttributeError) as exc:
            self.report.skipped.append(f"{path}:1: unreadable cursor ({exc})")
            return None

    def _artifact_store(self) -> Optional[FileArtifactStore]:
        if not (self.base / "artifacts").is_dir():
            return None
        # The store adds empty blobs/ and refs/ dirs to a layout that predates them (legacy v0) and reads both.
        return FileArtifactStore(self.base)

    def artifact_ids(self) -> List[str]:
        root = self.base / "artifacts"
        if not root.is_dir():
            return []
        ids = {p.stem for p in root.glob("*.meta")} | {p.stem for p in (root / "refs").glob("*.meta")}
        return sorted(ids)

    def artifact(self, artifact_id: str) -> Optional[Artifact]:
        store = self._artifact_store()
        try:
            return store.load(artifact_id) if store else None
        except (OSError, ValueError, KeyError) as exc:
            self.report.skipped.append(f"artifact {artifact_id}: {exc}")
            return None


class _UpstreamSqliteReader:
    """Reads a database written by abstractruntime's own `SqliteDatabase` (read-only)."""

    def __init__(self, path: Path, report: MigrationReport) -> None:
        self.conn = apsw.Connection(f"file:{path}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        self.path = path
        self.report = report

    def runs(self) -> List[Tuple[str, RunState]]:
        out = []
        for run_id, payload in self.conn.execute("SELECT run_id, run_json FROM runs ORDER BY run_id"):
            try:
                out.append((run_id, run_from_dict(json.loads(payload))))
            except (ValueError, TypeError, KeyError) as exc:
                self.report.skipped.append(f"{self.path}:runs[{run_id}]: unreadable ({exc})")
        return out

    def ledger_run_ids(self) -> List[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT run_id FROM ledger ORDER BY run_id")]

    def ledger(self, run_id: str) -> List[Dict[str, Any]]:
        out = []
        for seq, payload in self.conn.execute("SELECT seq, record_json FROM ledger WHERE run_id = ? ORDER BY seq",
                                              (run_id,)):
            try:
                out.append(json.loads(payload))
            except ValueError:
                self.report.skipped.append(f"{self.path}:ledger[{run_id}#{seq}]: invalid JSON")
        return out

    def commands(self) -> List[Tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(
            "SELECT seq, command_id, run_id, type, payload_json, ts, client_id FROM commands ORDER BY seq")]

    def cursor(self) -> Optional[int]:
        row = self.conn.execute("SELECT cursor FROM command_cursors WHERE consumer_id = 'gateway_runner'").fetchone()
        return int(row[0]) if row else None

    def artifact_ids(self) -> List[str]:
        return []  # the upstream SQLite store keeps artifacts on disk; migrate them with --from=file

    def artifact(self, artifact_id: str) -> Optional[Artifact]:
        return None


def check_database(db: Database) -> Tuple[Dict[str, Any], List[str]]:
    """Integrity, schema version, ledger gaps and counts; returns (facts, problems).

    Each check runs on its own: one that the damage makes fail becomes a problem line, and the
    others still run (a damaged file must be reported, not crash the report)."""
    problems: List[str] = []
    facts: Dict[str, Any] = {"path": str(db.path)}

    def _checked(what: str, fn: Callable[[], T]) -> Optional[T]:
        try:
            return fn()
        except apsw.Error as exc:
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    damage = wal_damage(db.path)
    if damage is not None:
        problems.append(f"the WAL ({db.path}-wal) is damaged: {damage}")
    problems.extend(_checked("integrity_check", lambda: integrity_problems(db.connection())) or [])
    version = _checked("schema version", lambda: db.query_one("PRAGMA user_version")[0])
    facts["schema_version"] = version
    if version is not None and version != SCHEMA_VERSION:
        problems.append(f"schema version {version}, expected {SCHEMA_VERSION}")
    missing = _checked("tables", lambda: _missing_from_schema(db.connection())) or []
    problems.extend(f"table {name} is missing" for name in missing)
    problems.extend(f"index {name} is missing (queries that use it are slow)"
                    for name in _checked("indexes", lambda: _missing_from_schema(db.connection(), "index")) or [])
    if "ledger" not in missing:
        gaps = _checked("ledger gaps", lambda: db.query(
            "SELECT run_id, COUNT(*), MAX(seq) FROM ledger GROUP BY run_id HAVING COUNT(*) != MAX(seq)")) or []
        problems.extend(f"ledger of {rid} has gaps ({n} records, max seq {mx})" for rid, n, mx in gaps)
    facts["journal_mode"] = _checked("journal mode", lambda: db.query_one("PRAGMA journal_mode")[0])
    facts["counts"] = _checked("counts", lambda: table_counts(db)) if not missing else {}
    return facts, problems


# =====================================================================================
# 3. Workflows
# =====================================================================================

# Node types whose effects need the LLM integration (abstractcore): without it they fail mid-run.
LLM_NODE_TYPES = frozenset({
    "llm_call", "agent", "model_residency", "generate_image", "edit_image", "image_to_image", "generate_video",
    "text_to_video", "image_to_video", "generate_voice", "generate_music", "transcribe_audio", "listen_voice",
    "tool_calls", "call_tool", "model_catalog", "provider_catalog", "provider_models",
})
LLM_EXTRA = "abstractruntime[abstractcore]"
# Node types that also need one of abstractcore's capability plugins: type -> (what, package providing it).
CAPABILITY_PACKAGES = {
    **dict.fromkeys(("generate_image", "edit_image", "image_to_image"), ("image generation", "abstractvision")),
    **dict.fromkeys(("generate_video", "text_to_video", "image_to_video"), ("video generation", "abstractvision")),
    **dict.fromkeys(("generate_voice", "transcribe_audio", "listen_voice"), ("voice", "abstractvoice")),
    "generate_music": ("music generation", "abstractmusic"),
}
# Node types that talk to a text model, so need a provider and model.
TEXT_LLM_NODE_TYPES = frozenset({"llm_call", "agent"})
LLM_SETTINGS_HINT = "set ABSTRACTGATEWAY_PROVIDER and ABSTRACTGATEWAY_MODEL (or pin a provider and model on the node)"
MAX_BUNDLE_FILES = 2_000
MAX_BUNDLE_UNCOMPRESSED = 200 * 1024 * 1024
MAX_BUNDLE_RATIO = 200
_SAFE_ID = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class GatewayError(Exception):
    """A request the gateway refuses, with a machine-readable `code`.

    No HTTP status here: the HTTP section maps codes (and these classes) to statuses (`error_status`).
    """

    code = "bad_request"

    def __init__(self, detail: str, *, code: Optional[str] = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class NotFound(GatewayError):
    code = "not_found"


def run_not_found(run_id: str) -> NotFound:
    return NotFound(f"Run '{run_id}' not found", code="run_not_found")


class Conflict(GatewayError):
    code = "conflict"


class Unprocessable(GatewayError):
    """Well-formed but unusable input (a value out of range, a missing extra or setting)."""

    code = "invalid"


def llm_integration_available() -> bool:
    """True when abstractruntime's abstractcore integration and abstractagent are installed (the `llm`
    extra). Checked without importing them: that takes about a second, paid at first use instead."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("abstractcore", "abstractagent", "abstractruntime.integrations.abstractcore"))
    except (ImportError, ValueError):
        return False


def missing_capabilities(node_types: Iterable[str]) -> Dict[str, List[str]]:
    """Packages the node types need that are not importable here: package -> node types."""
    import importlib.util

    missing: Dict[str, List[str]] = {}
    for node_type in sorted(set(node_types)):
        if node_type in CAPABILITY_PACKAGES:
            package = CAPABILITY_PACKAGES[node_type][1]
            if importlib.util.find_spec(package) is None:
                missing.setdefault(package, []).append(node_type)
    return missing


def pinned_llms(flow: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(provider, model) pairs a VisualFlow pins, most specific first: llm_call / agent node configs
    (what the original gateway infers its default from), then any node's pin defaults (e.g. the start
    node's `provider` and `model` inputs)."""
    configs, pins = [], []
    for node in flow.get("nodes") or []:
        data = node.get("data") if isinstance(node, dict) else None
        if not isinstance(data, dict):
            continue
        node_type = str(node.get("type"))
        key = {"llm_call": "effectConfig", "agent": "agentConfig"}.get(node_type)
        start_pins = data.get("pinDefaults") if key or node_type == "on_flow_start" else None
        for source, out in ((data.get(key) if key else None, configs), (start_pins, pins)):
            if isinstance(source, dict):
                provider, model = source.get("provider"), source.get("model")
                if isinstance(provider, str) and provider.strip() and isinstance(model, str) and model.strip():
                    out.append((provider.strip().lower(), model.strip()))
    return configs + pins


def _is_safe_id(text: str, extra: str = "") -> bool:
    return bool(text) and all(ch in _SAFE_ID or ch in extra for ch in text)


def workflow_id_for(bundle_id: str, bundle_version: str, flow_id: str) -> str:
    """The registered id of a bundle flow: `bundle_id@bundle_version:flow_id`."""
    return f"{bundle_id}@{bundle_version}:{flow_id}"


@dataclass
class LoadedBundle:
    """A bundle as the host sees it: manifest facts, its flows, and why it cannot run (if so)."""

    bundle_id: str
    bundle_version: str
    created_at: str
    origin: str  # "upload" or the .flow file path
    sha256: str
    manifest: Any = None
    flows: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # flow_id -> VisualFlow JSON as authored
    load_error: Optional[str] = None
    needs: List[str] = field(default_factory=list)  # LLM node types found in the flows

    @property
    def ref(self) -> str:
        return f"{self.bundle_id}@{self.bundle_version}"

    @property
    def entrypoints(self) -> List[Any]:
        return list(self.manifest.entrypoints) if self.manifest is not None else []

    @property
    def default_entrypoint(self) -> Optional[str]:
        return self.manifest.default_entrypoint if self.manifest is not None else None


def read_flow_file(path: Path, limit: int = MAX_BUNDLE_UNCOMPRESSED) -> bytes:
    """The bytes of a file found in the flows dir, if it is a regular file of at most `limit` bytes.

    Anything else is an `OSError` (reported as that file's load error): a FIFO (whose open would
    block), a device such as a symlink to /dev/zero (endless), or a huge file never hangs a reload
    or exhausts memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        data = file.read(limit + 1)
    if len(data) > limit:  # it grew while read
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


def read_bundle(content: bytes, origin: str) -> LoadedBundle:
    """Parse `.flow` bytes into a LoadedBundle (flows as authored); raise GatewayError if unusable.

    Hostile input is expected: entry names must be plain relative paths, no symlinks, and the
    total/ratio of uncompressed bytes is capped before anything is decompressed.
    """
    import io
    import zipfile

    if not content:
        raise GatewayError("Bundle content is empty", code="bundle_empty")
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        raise GatewayError("Bundle is not a valid .flow (zip) file", code="bundle_invalid") from None
    try:
        with archive:
            return _read_bundle_archive(archive, content, origin)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise GatewayError(f"Bundle is damaged: {exc}", code="bundle_invalid") from None


def _check_archive_entries(archive: Any, content: bytes) -> None:
    """Refuse an archive before reading any entry: too many files, unsafe paths, symlinks, zip bombs."""
    import stat

    infos = archive.infolist()
    if len(infos) > MAX_BUNDLE_FILES:
        raise GatewayError(f"Bundle has too many files ({len(infos)} > {MAX_BUNDLE_FILES})", code="bundle_unsafe")
    total = 0
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
            raise GatewayError(f"Bundle entry has an unsafe path: {name!r}", code="bundle_unsafe")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise GatewayError(f"Bundle entry is a symlink: {name!r}", code="bundle_unsafe")
        total += info.file_size
    if total > MAX_BUNDLE_UNCOMPRESSED or total > MAX_BUNDLE_RATIO * max(len(content), 1024):
        raise GatewayError("Bundle expands to too many bytes (zip bomb?)", code="bundle_unsafe")


def _read_bundle_archive(archive: Any, content: bytes, origin: str) -> LoadedBundle:
    from abstractruntime.workflow_bundle import workflow_bundle_manifest_from_dict

    _check_archive_entries(archive, content)
    try:
        manifest = workflow_bundle_manifest_from_dict(json.loads(archive.read("manifest.json")))
    except KeyError:
        raise GatewayError("Bundle has no manifest.json", code="bundle_invalid") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise GatewayError(f"Bundle manifest is invalid: {exc}", code="bundle_invalid") from None
    if not _is_safe_id(manifest.bundle_id):
        raise GatewayError(f"Unsafe bundle_id {manifest.bundle_id!r} (allowed: letters, digits, _ and -)",
                           code="bundle_invalid")
    if not _is_safe_id(manifest.bundle_version, "."):
        raise GatewayError(f"Unsafe bundle_version {manifest.bundle_version!r} (allowed: letters, digits, _ . -)",
                           code="bundle_invalid")
    bundle = LoadedBundle(
        bundle_id=manifest.bundle_id, bundle_version=manifest.bundle_version, created_at=manifest.created_at or "",
        origin=origin, sha256=hashlib.sha256(content).hexdigest(), manifest=manifest,
    )
    needs: set = set()
    for flow_id, relpath in manifest.flows.items():
        try:
            flow = json.loads(archive.read(relpath))
        except KeyError:
            raise GatewayError(f"Bundle flow {flow_id!r} is missing ({relpath})", code="bundle_invalid") from None
        except ValueError as exc:
            raise GatewayError(f"Bundle flow {flow_id!r} is not valid JSON: {exc}", code="bundle_invalid") from None
        if not isinstance(flow, dict):
            raise GatewayError(f"Bundle flow {flow_id!r} is not a VisualFlow object", code="bundle_invalid")
        bundle.flows[flow_id] = flow
        needs |= {str(n.get("type")) for n in flow.get("nodes") or [] if isinstance(n, dict)} & LLM_NODE_TYPES
    bundle.needs = sorted(needs)
    return bundle


def agent_nodes(bundle: LoadedBundle) -> Dict[str, List[str]]:
    """The ReAct subworkflow id each Agent node of `bundle` starts -> the tools that node allows."""
    from abstractruntime.visualflow_compiler.visual.agent_ids import visual_react_workflow_id

    out: Dict[str, List[str]] = {}
    for flow_id, flow in bundle.flows.items():
        registered = workflow_id_for(bundle.bundle_id, bundle.bundle_version, flow_id)  # the id it is compiled as
        for node in flow.get("nodes") or []:
            if not isinstance(node, dict) or node.get("type") != "agent" or not node.get("id"):
                continue
            config = (node.get("data") or {}).get("agentConfig") or {}
            workflow_id = str(config.get("_react_workflow_id") or "").strip() or visual_react_workflow_id(
                flow_id=registered, node_id=str(node["id"]))
            out[workflow_id] = [t.strip() for t in config.get("tools") or [] if isinstance(t, str) and t.strip()]
    return out


def react_workflow(workflow_id: str, allowed_tools: List[str]) -> Any:
    """abstractagent's ReAct workflow for one Agent node (as the original gateway registers them): the
    model sees the runtime's default tools plus the agent builtins, and may call `allowed_tools`."""
    from abstractagent.adapters.react_runtime import create_react_workflow

    return create_react_workflow(logic=_react_logic(), workflow_id=workflow_id, allowed_tools=allowed_tools)


@functools.lru_cache(maxsize=1)
def _react_logic() -> Any:
    """The ReAct logic every agent shares (its tool catalogue is the same for all)."""
    from abstractagent.logic import builtins
    from abstractagent.logic.react import ReActLogic
    from abstractcore.tools import ToolDefinition
    from abstractruntime.integrations.abstractcore.default_tools import list_default_tool_specs

    tools = [ToolDefinition(name=str(spec["name"]), description=str(spec.get("description") or ""),
                            parameters=dict(spec.get("parameters") or {}))
             for spec in list_default_tool_specs() if isinstance(spec, dict) and spec.get("name")]
    names = {t.name for t in tools}
    for name in ("ASK_USER_TOOL", "RECALL_MEMORY_TOOL", "INSPECT_VARS_TOOL", "REMEMBER_TOOL",
                 "COMPACT_MEMORY_TOOL", "DELEGATE_AGENT_TOOL"):
        tool = getattr(builtins, name, None)
        if tool is not None and tool.name not in names:
            tools.append(tool)
            names.add(tool.name)
    return ReActLogic(tools=tools)


def _namespace_flow(flow: Dict[str, Any], bundle: LoadedBundle, flow_id: str,
                    flow_ids: Iterable[str]) -> Dict[str, Any]:
    """A copy of `flow` registered as `bundle@version:flow_id`, internal subflow refs rewritten alike."""
    flow = json.loads(json.dumps(flow))
    flow["id"] = workflow_id_for(bundle.bundle_id, bundle.bundle_version, flow_id)
    local = set(flow_ids)
    for node in flow.get("nodes") or []:
        data = node.get("data") if isinstance(node, dict) else None
        if isinstance(data, dict):
            for key in ("subflowId", "flowId", "workflowId", "workflow_id"):  # every key the executor reads
                ref = data.get(key)
                if isinstance(ref, str) and ref in local:
                    data[key] = workflow_id_for(bundle.bundle_id, bundle.bundle_version, ref)
    return flow


# An LLM node that names no provider and no model runs on the gateway's default (`LLMEffects._llm_call`
# adds it to the call). For such a node the runtime's compiler leaves out what else its pins ask for,
# a structured-output schema (`resp_schema`) above all, which the original's runtime keeps. Given this
# placeholder pair it keeps them, and `_without_placeholder` takes the pair out of the node's effect
# again before the runtime records or runs it.
_NO_LLM_PINNED = "__gateway_default__"


def _compile_flow(compile_visualflow: Callable[[Dict[str, Any]], Any], flow: Dict[str, Any]) -> Any:
    """The runtime's compilation of `flow` (a copy of its own), its LLM nodes that pin no model given the
    placeholder pair (see `_NO_LLM_PINNED`)."""
    placeheld = []
    for node in flow.get("nodes") or []:
        data = node.get("data") if isinstance(node, dict) else None
        if node.get("type") == "llm_call" and isinstance(data, dict):
            config = data.get("effectConfig") if isinstance(data.get("effectConfig"), dict) else {}
            if not config.get("provider") and not config.get("model"):
                data["effectConfig"] = {**config, "provider": _NO_LLM_PINNED, "model": _NO_LLM_PINNED}
                placeheld.append(node.get("id"))
    spec = compile_visualflow(flow)
    for node_id in placeheld:
        if node_id in spec.nodes:
            spec.nodes[node_id] = _without_placeholder(spec.nodes[node_id])
    return spec


def _without_placeholder(node: Callable[[RunState, Any], Any]) -> Callable[[RunState, Any], Any]:
    """`node`, its LLM call stripped of the placeholder pair: of the model and provider, and of what only a
    node that names its model gets (`max_input_tokens`), as the runtime makes such a call itself."""
    def step(run: RunState, ctx: Any) -> Any:
        plan = node(run, ctx)
        effect = getattr(plan, "effect", None)
        payload = getattr(effect, "payload", None)
        if isinstance(payload, dict) and _NO_LLM_PINNED in (payload.get("provider"), payload.get("model")):
            payload = {k: v for k, v in payload.items() if k not in ("provider", "model", "max_input_tokens")}
            plan = dataclasses.replace(plan, effect=dataclasses.replace(effect, payload=payload))
        return plan

    return step


# -- schedules: a parent run that starts the target flow as child runs on a timetable --------------

SCHEDULE_PREFIX = "scheduled:"
MAX_SCHEDULE_EXECUTIONS = 10_000
_INTERVAL_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_INTERVAL_S = 100 * 365 * 86400.0


def parse_interval(text: str) -> float:
    """Seconds in a relative duration such as `500ms`, `30s`, `15m`, `1.5h`, `1d` (units in any case)."""
    match = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*(ms|s|m|h|d)\s*", str(text or ""), re.IGNORECASE)
    seconds = float(match.group(1)) * _INTERVAL_UNITS[match.group(2).lower()] if match else 0.0
    if not 0 < seconds <= MAX_INTERVAL_S:  # past the bound, dates overflow (year 9999)
        raise GatewayError(f"Invalid interval {str(text)[:80]!r} (expected e.g. 500ms, 30s, 15m, 1h, 1d; "
                           "at most 100 years)", code="invalid_interval")
    return seconds


def schedule_interval_s(interval: str, floor_s: float) -> float:
    """Seconds of a schedule `interval`, refused below `floor_s` (`schedule_min_interval_s`: a 1 ms
    schedule would spawn child runs as fast as the runner can tick)."""
    seconds = parse_interval(interval)
    if seconds < floor_s:
        raise Unprocessable(f"Interval {interval!r} is shorter than the minimum of {floor_s:g}s "
                            "(ABSTRACTGATEWAY_SCHEDULE_MIN_INTERVAL_S)", code="interval_too_short")
    return seconds


def _iso_after(seconds: float) -> str:
    from datetime import timedelta

    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def _parse_time(text: Optional[str], name: str) -> datetime:
    value = _as_utc(text)
    if value is None:
        raise GatewayError(f"{name} must be an ISO-8601 time, got {str(text)[:80]!r}", code="invalid_schedule")
    return value


def schedule_definition(target: str, *, start_at: Optional[str], interval: Optional[str],
                        repeat_count: Optional[int], repeat_until: Optional[str], share_context: bool,
                        min_interval_s: float) -> Dict[str, Any]:
    """The checked definition of a schedule of workflow `target` (kept in the parent run's
    `vars._meta.schedule`, where `schedule_spec` reads it).

    `start_at` is a time or a duration from now (`10s`), kept as given, as on the original; the
    wait reads `start_at_utc`, the time it names. A blank interval is none (a one-shot schedule).
    """
    start_at = str(start_at or "").strip() or None
    start = None
    if start_at is not None and start_at.lower() != "now":
        relative = re.fullmatch(r"\d[\d.]*\s*[a-zA-Z]{1,2}", start_at)
        start = (datetime.fromisoformat(_iso_after(parse_interval(start_at))) if relative
                 else _parse_time(start_at, "start_at"))
    interval = str(interval or "").strip() or None
    seconds = schedule_interval_s(interval, min_interval_s) if interval else None
    if repeat_count is not None and repeat_count <= 0:
        raise GatewayError("repeat_count must be >= 1", code="invalid_schedule")
    if repeat_count is not None and repeat_count > 1 and seconds is None:
        raise GatewayError("repeat_count > 1 needs an interval", code="invalid_schedule")
    if repeat_until:
        if seconds is None or repeat_count is not None:
            raise GatewayError("repeat_until needs an interval and excludes repeat_count", code="invalid_schedule")
        until, begin = _parse_time(repeat_until, "repeat_until"), start or datetime.now(timezone.utc)
        if until < begin:
            raise GatewayError("repeat_until is before the start", code="invalid_schedule")
        repeat_count = 1 + int((until - begin).total_seconds() // seconds)
    if repeat_count is not None and repeat_count > MAX_SCHEDULE_EXECUTIONS:
        raise GatewayError(f"schedule would run {repeat_count} times (max {MAX_SCHEDULE_EXECUTIONS})",
                           code="invalid_schedule")
    if repeat_count == 1:
        interval = None
    target_ref, _, target_flow = target.partition(":")
    target_bundle, _, target_version = target_ref.partition("@")
    now = utc_now_iso()
    return {
        "kind": "scheduled_run", "target_workflow_id": target, "target_bundle_id": target_bundle,
        "target_bundle_version": target_version, "target_bundle_ref": target_ref, "target_flow_id": target_flow,
        "start_at": start_at if start else None, "start_at_utc": start.isoformat() if start else None,
        "interval": interval, "repeat_count": repeat_count,
        "repeat_until": repeat_until or None, "share_context": bool(share_context), "created_at": now,
        "updated_at": now,
    }


def schedule_of(run: RunState) -> Optional[Dict[str, Any]]:
    """The schedule definition of a scheduled parent run, else None."""
    meta = run.vars.get("_meta") if isinstance(run.vars, dict) else None
    sched = meta.get("schedule") if isinstance(meta, dict) else None
    return sched if isinstance(sched, dict) and sched.get("kind") == "scheduled_run" else None


def schedule_root(runs: Any, run_id: str) -> RunState:
    """The scheduled parent run `run_id` belongs to (itself or an ancestor)."""
    run = runs.load(run_id)
    if run is None:
        raise run_not_found(run_id)
    seen = set()
    while run is not None and schedule_of(run) is None and run.run_id not in seen:  # (a damaged parent loop)
        seen.add(run.run_id)
        run = runs.load(run.parent_run_id) if run.parent_run_id else None
    if run is not None and schedule_of(run) is None:
        run = None
    if run is None:
        raise GatewayError(f"Run '{run_id}' is not part of a scheduled run", code="not_scheduled")
    return run


def update_schedule(stores: Stores, record: CommandRecord, min_interval_s: float) -> None:
    """Apply an `update_schedule` command: a new interval for the schedule `record.run_id` belongs to,
    taking effect on the wait in progress unless `apply_immediately` is false."""
    payload = record.payload or {}
    interval = str(payload.get("interval") or payload.get("schedule") or "").strip()
    if not interval:
        raise GatewayError("update_schedule needs payload.interval", code="invalid_payload")
    seconds = schedule_interval_s(interval, min_interval_s)
    root = schedule_root(stores.runs, record.run_id)
    sched = root.vars["_meta"]["schedule"]
    if not sched.get("interval"):
        raise GatewayError(f"Run '{root.run_id}' is a one-shot schedule (no interval to update)",
                           code="not_recurrent")
    now = utc_now_iso()
    sched.update(interval=interval, updated_at=now)
    waiting = root.waiting
    if (payload.get("apply_immediately", True) and _enum_value(root.status) == "waiting" and waiting is not None
            and _enum_value(waiting.reason) == "until" and root.current_node == "wait_interval"):
        waiting.until = _iso_after(seconds)
    root.vars.setdefault("_runtime", {})["last_schedule_update"] = {
        "command_id": record.command_id, "interval": interval, "updated_at": now,
        "requested_run_id": record.run_id, "scheduled_root_run_id": root.run_id}
    root.updated_at = now
    stores.runs.save(root)
    stores.dynamic_flows.put(root.workflow_id, sched)


def fire_schedule_now(runs: Any, run_id: str) -> None:
    """Resuming a recurrent schedule that waits for its next slot runs the next execution at once."""
    run = runs.load(run_id)
    sched = schedule_of(run)
    if sched and sched.get("interval") and run.waiting is not None and _enum_value(run.waiting.reason) == "until":
        run.waiting.until = utc_now_iso()
        run.updated_at = utc_now_iso()
        runs.save(run)


SCHEDULE_TRACES_KEPT = 5  # trace entries kept per node of a schedule's wrapper: its latest executions


def _keep_recent_traces(run: RunState, keep: int) -> None:
    """Drop all but the latest `keep` entries of each node trace of `run`. The runtime keeps 100, each
    with its effect's payload: for a schedule that fires forever, 100 copies of the target's input
    in the parent run, decoded and encoded again on each of its steps (a 100 kB input made a 10 MB
    run, and a 100 ms schedule could fire only once a second)."""
    traces = (run.vars.get("_runtime") or {}).get("node_traces") or {}
    for trace in traces.values():
        steps = trace.get("steps") if isinstance(trace, dict) else None
        if isinstance(steps, list) and len(steps) > keep:
            del steps[:-keep]


def schedule_spec(workflow_id: str) -> Any:
    """The wrapper workflow of a schedule, built on the runtime's WAIT_UNTIL and subworkflow effects.

    Everything it needs is read from the parent run's `vars._meta.schedule`, so `update_schedule`
    takes effect by editing the run. Node ids follow the original gateway's contract:
    start -> wait_start -> run_target -> after_run -> (wait_interval -> run_target ...) -> end.
    """
    from abstractruntime import Effect, EffectType, StepPlan, WorkflowSpec

    def definition(run: RunState) -> Dict[str, Any]:
        return run.vars["_meta"]["schedule"]

    def start(run: RunState, ctx: Any) -> Any:
        run.vars.setdefault("_schedule_state", {"executions": 0, "last": None})
        return StepPlan(node_id="start", next_node="wait_start")

    def wait_start(run: RunState, ctx: Any) -> Any:
        sched = definition(run)  # (schedules made before start_at_utc kept their start normalised in start_at)
        until = sched.get("start_at_utc") or sched.get("start_at") or utc_now_iso()
        return StepPlan(node_id="wait_start", effect=Effect(type=EffectType.WAIT_UNTIL, payload={"until": until}),
                        next_node="run_target")

    def run_target(run: RunState, ctx: Any) -> Any:
        sched = definition(run)
        index = run.vars["_schedule_state"]["executions"]
        session = run.session_id if sched.get("share_context", True) else f"{run.run_id}:{index}"
        child_vars = {**(run.vars.get("vars") or {}), "_schedule": {"parent_run_id": run.run_id, "index": index}}
        payload = {"workflow_id": sched["target_workflow_id"], "vars": child_vars, "async": True, "wait": True,
                   "session_id": session}
        return StepPlan(node_id="run_target", next_node="after_run",
                        effect=Effect(type=EffectType.START_SUBWORKFLOW, payload=payload, result_key="_schedule_last"))

    def after_run(run: RunState, ctx: Any) -> Any:
        sched, state = definition(run), run.vars["_schedule_state"]
        _keep_recent_traces(run, SCHEDULE_TRACES_KEPT)
        state["executions"] += 1
        state["last"] = run.vars.pop("_schedule_last", None)
        count = sched.get("repeat_count")
        finished = not sched.get("interval") or (count is not None and state["executions"] >= count)
        return StepPlan(node_id="after_run", next_node="end" if finished else "wait_interval")

    def wait_interval(run: RunState, ctx: Any) -> Any:
        until = _iso_after(parse_interval(definition(run)["interval"]))
        return StepPlan(node_id="wait_interval", effect=Effect(type=EffectType.WAIT_UNTIL, payload={"until": until}),
                        next_node="run_target")

    def end(run: RunState, ctx: Any) -> Any:
        state = run.vars["_schedule_state"]
        return StepPlan(node_id="end", complete_output={"executions": state["executions"], "last": state["last"]})

    nodes = {"start": start, "wait_start": wait_start, "run_target": run_target, "after_run": after_run,
             "wait_interval": wait_interval, "end": end}
    return WorkflowSpec(workflow_id=workflow_id, entry_node="start", nodes=nodes)


def schedule_visualflow(workflow_id: str, definition: Dict[str, Any]) -> Dict[str, Any]:
    """The VisualFlow document of a schedule wrapper, for editors and run views.

    It draws what `schedule_spec` executes, with the same node ids (so the ledger's node ids light up
    its nodes) and the original gateway's node shapes: `wait_start` and `wait_interval` are
    `on_schedule` waits, `run_target` a `subflow` of the target, `after_run` the repeat decision.
    """
    def node(node_id: str, kind: str, x: int, y: int, label: str, inputs: List[Dict[str, Any]],
             outputs: List[Dict[str, Any]], **data: Any) -> Dict[str, Any]:
        return {"id": node_id, "type": kind, "position": {"x": float(x), "y": float(y)},
                "data": {"nodeType": kind, "label": label, "inputs": inputs, "outputs": outputs, **data}}

    def edge(edge_id: str, source: str, source_handle: str, target: str, target_handle: str) -> Dict[str, Any]:
        return {"id": edge_id, "source": source, "sourceHandle": source_handle, "target": target,
                "targetHandle": target_handle}

    exec_in, exec_out = ({"id": "exec-in", "label": "", "type": "execution"},
                         {"id": "exec-out", "label": "", "type": "execution"})
    interval, count = definition.get("interval"), definition.get("repeat_count")
    nodes = [
        node("start", "on_flow_start", 0, 0, "On Flow Start", [],
             [exec_out, {"id": "vars", "label": "vars", "type": "object"}]),
        node("wait_start", "on_schedule", 220, 0, "Wait (start)", [exec_in], [exec_out],
             eventConfig={"schedule": definition.get("start_at") or "0s", "recurrent": False}),
        node("run_target", "subflow", 440, 0, "Run workflow",
             [exec_in, {"id": "vars", "label": "vars", "type": "object"}],
             [exec_out], subflowId=definition.get("target_workflow_id")),
        node("after_run", "if", 660, 0, "Run again?",
             [exec_in, {"id": "condition", "label": "condition", "type": "boolean"}],
             [{"id": "true", "label": "true", "type": "execution"},
              {"id": "false", "label": "false", "type": "execution"}],
             pinDefaults={"condition": bool(interval)}),
    ]
    edges = [edge("e1", "start", "exec-out", "wait_start", "exec-in"),
             edge("e2", "wait_start", "exec-out", "run_target", "exec-in"),
             edge("e3", "run_target", "exec-out", "after_run", "exec-in"),
             edge("d_vars", "start", "vars", "run_target", "vars")]
    if interval:
        nodes.append(node("wait_interval", "on_schedule", 660, 140, "Wait (interval)", [exec_in], [exec_out],
                          eventConfig={"schedule": interval, "recurrent": False}))
        edges += [edge("e4", "after_run", "true", "wait_interval", "exec-in"),
                  edge("e5", "wait_interval", "exec-out", "run_target", "exec-in")]
    if not interval or count is not None:  # a schedule repeating forever never ends
        nodes.append(node("end", "on_flow_end", 880, 0, "On Flow End", [exec_in], []))
        edges.append(edge("e6", "after_run", "false", "end", "exec-in"))
    return {"id": workflow_id, "name": "scheduled",
            "description": f"Runs {definition.get('target_workflow_id')} on a schedule",
            "nodes": nodes, "edges": edges, "entryNode": "start"}


@dataclass
class _Catalog:
    bundles: Dict[str, Dict[str, LoadedBundle]] = field(default_factory=dict)  # id -> version -> bundle
    specs: Dict[str, Any] = field(default_factory=dict)  # workflow_id -> WorkflowSpec
    flows: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # workflow_id -> VisualFlow JSON
    blocked: Dict[str, GatewayError] = field(default_factory=dict)  # workflow_id -> why it cannot start
    errors: List[str] = field(default_factory=list)
    agents: Dict[str, List[str]] = field(default_factory=dict)  # ReAct workflow id -> allowed tools (built on use)
    default_llms: Dict[str, Optional[Tuple[str, str]]] = field(default_factory=dict)  # bundle ref -> default pair


class WorkflowHost:
    """Loads bundles (flows dir + uploads in the DB), compiles them, and resolves what to start.

    It is also the runtime's workflow registry (`get`, `get_or_raise`). `reload()` builds a new
    catalog off to the side and swaps it in with one assignment, so readers never see half of one.
    """

    def __init__(self, stores: Stores, *, flows_dir: Path, source: str = "bundle",
                 llm_default: Tuple[str, str] = ("", "")) -> None:
        self.stores = stores
        self.flows_dir = Path(flows_dir)
        self.source = source
        self.llm_available = llm_integration_available()
        self.llm_default = (llm_default[0].strip().lower(), llm_default[1].strip())
        self._catalog = _Catalog()
        self._reload_lock = threading.Lock()
        self._agents_lock = threading.Lock()

    # -- registry protocol (used by the runtime) -----------------------------------------------

    def get(self, workflow_id: str) -> Any:
        catalog = self._catalog
        spec = catalog.specs.get(workflow_id)
        if spec is None and workflow_id in catalog.agents:  # built when first started: abstractagent loads slowly
            with self._agents_lock:
                spec = catalog.specs.get(workflow_id)
                if spec is None:
                    spec = catalog.specs[workflow_id] = react_workflow(workflow_id, catalog.agents[workflow_id])
        return spec

    def get_or_raise(self, workflow_id: str) -> Any:
        spec = self.get(workflow_id)
        if spec is None:
            raise KeyError(f"Workflow '{workflow_id}' not found")
        return spec

    # -- loading ----------------------------------------------------------------------------------

    def reload(self) -> _Catalog:
        """Rebuild everything from the flows dir and the database, then swap atomically."""
        with self._reload_lock:
            catalog = _Catalog()
            if self.source == "visualflow":
                self._load_visualflow_dir(catalog)
            else:
                for origin, content in self._bundle_sources(catalog):
                    self._add_bundle(catalog, origin, content)
            for workflow_id in self.stores.dynamic_flows.all():
                catalog.specs[workflow_id] = schedule_spec(workflow_id)
            self._catalog = catalog
            return catalog

    def _bundle_sources(self, catalog: _Catalog) -> Iterator[Tuple[str, bytes]]:
        paths: List[Path] = []
        if self.flows_dir.is_file():
            paths = [self.flows_dir]
        elif self.flows_dir.is_dir():
            paths = sorted(self.flows_dir.glob("*.flow"))
        for path in paths:
            try:
                yield str(path), read_flow_file(path)
            except OSError as exc:
                catalog.errors.append(f"{path}: {exc}")
        for stored in self.stores.bundles.list():
            yield "upload", stored.content

    def _add_bundle(self, catalog: _Catalog, origin: str, content: bytes) -> None:
        from abstractruntime.visualflow_compiler import compile_visualflow

        try:
            bundle = read_bundle(content, origin)
        except GatewayError as exc:
            name = Path(origin).stem if origin != "upload" else "upload"
            bundle_id, _, version = name.partition("@")
            catalog.errors.append(f"{origin}: {exc.detail}")
            bundle = LoadedBundle(bundle_id=bundle_id or name, bundle_version=version or "?", created_at="",
                                  origin=origin, sha256=hashlib.sha256(content).hexdigest(), load_error=exc.detail)
            catalog.bundles.setdefault(bundle.bundle_id, {})[bundle.bundle_version] = bundle
            return
        versions = catalog.bundles.setdefault(bundle.bundle_id, {})
        if bundle.bundle_version in versions and origin == "upload":
            pass  # an upload of the same version wins over the flows dir copy
        elif bundle.bundle_version in versions:
            return
        specs = {}
        try:
            for flow_id, flow in bundle.flows.items():  # compiled from the namespaced copy; served as authored
                specs[workflow_id_for(bundle.bundle_id, bundle.bundle_version, flow_id)] = _compile_flow(
                    compile_visualflow, _namespace_flow(flow, bundle, flow_id, bundle.flows))
        except Exception as exc:  # noqa: BLE001 - the compiler raises many types; one bad bundle must not stop others
            bundle.load_error = f"compile failed: {type(exc).__name__}: {exc}"
            catalog.errors.append(f"{origin}: {bundle.load_error}")
            specs = {}
        versions[bundle.bundle_version] = bundle
        for flow_id, flow in bundle.flows.items():
            wid = workflow_id_for(bundle.bundle_id, bundle.bundle_version, flow_id)
            catalog.flows[wid] = flow
            if wid in specs:
                catalog.specs[wid] = specs[wid]
            missing = missing_capabilities(bundle.needs)
            if bundle.load_error:
                catalog.blocked[wid] = Unprocessable(f"Bundle '{bundle.ref}' failed to load: {bundle.load_error}",
                                                     code="bundle_load_error")
            elif bundle.needs and not self.llm_available:
                catalog.blocked[wid] = Unprocessable(
                    f"Workflow '{wid}' needs the LLM integration ({', '.join(bundle.needs)} nodes); install the "
                    f"'{LLM_EXTRA}' extra (pip install 'abstractgateway[llm]') to run it", code="llm_extra_required")
            elif missing:  # known now rather than failing in the middle of the run
                catalog.blocked[wid] = Unprocessable(
                    f"Workflow '{wid}' needs capabilities this gateway lacks: " + "; ".join(
                        f"{package} for {', '.join(types)} nodes" for package, types in missing.items())
                    + " (pip install the package next to the gateway)", code="capability_missing")
        if specs and self.llm_available and "agent" in bundle.needs:
            catalog.agents.update(agent_nodes(bundle))

    def _load_visualflow_dir(self, catalog: _Catalog) -> None:
        from abstractruntime.visualflow_compiler import compile_visualflow

        for path in sorted(self.flows_dir.glob("*.json")) if self.flows_dir.is_dir() else []:
            try:
                flow = json.loads(read_flow_file(path).decode("utf-8"))
                spec = _compile_flow(compile_visualflow, json.loads(json.dumps(flow)))  # (served as authored)
            except Exception as exc:  # noqa: BLE001 - report and keep loading the others
                catalog.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            catalog.specs[spec.workflow_id] = spec
            catalog.flows[spec.workflow_id] = flow

    # -- queries ----------------------------------------------------------------------------------

    @property
    def catalog(self) -> _Catalog:
        return self._catalog

    def require_bundle_source(self) -> None:
        if self.source != "bundle":
            raise GatewayError("Bundle workflow source is not enabled on this gateway", code="not_bundle_source")

    def latest(self, bundle_id: str) -> LoadedBundle:
        versions = self._catalog.bundles.get(bundle_id)
        if not versions:
            raise NotFound(f"Bundle '{bundle_id}' not found", code="bundle_not_found")
        return versions[_pick_latest_version(versions)]  # abstractruntime's bundle registry rule

    def bundle(self, bundle_id: str, version: Optional[str] = None) -> LoadedBundle:
        """Look up `bundle_id` (which may embed `@version`) at `version` or the latest."""
        bundle_id, version = split_bundle_ref(bundle_id, version)
        if version is None:
            return self.latest(bundle_id)
        found = self._catalog.bundles.get(bundle_id, {}).get(version)
        if found is None:
            if bundle_id not in self._catalog.bundles:
                raise NotFound(f"Bundle '{bundle_id}' not found", code="bundle_not_found")
            raise NotFound(f"Bundle '{bundle_id}@{version}' not found", code="bundle_not_found")
        return found

    def default_bundle_id(self) -> Optional[str]:
        ids = list(self._catalog.bundles)
        return ids[0] if len(ids) == 1 else None

    def deprecation(self, bundle_id: str, flow_id: str) -> Optional[Dict[str, Any]]:
        marks = self.stores.deprecations.all()
        return marks.get((bundle_id, flow_id)) or marks.get((bundle_id, "*"))

    def resolve(self, *, bundle_id: Optional[str], bundle_version: Optional[str], flow_id: Optional[str]) -> str:
        """The workflow id a start request names (the original gateway's resolution rules)."""
        bundle_id = (bundle_id or "").strip() or None
        bundle_version = (bundle_version or "").strip() or None
        flow_id = (flow_id or "").strip() or None
        if bundle_id is not None:
            bundle_id, bundle_version = split_bundle_ref(bundle_id, bundle_version)
        if flow_id is None:
            return self._resolve_entrypoint(bundle_id, bundle_version)
        if ":" in flow_id:
            return self._resolve_qualified(flow_id, bundle_id, bundle_version)
        if self.source == "visualflow":
            if flow_id not in self._catalog.specs:
                raise NotFound(f"Flow '{flow_id}' not found", code="flow_not_found")
            return flow_id
        target_id = bundle_id or self.default_bundle_id()
        if target_id is None:
            raise GatewayError("bundle_id is required when several bundles are loaded", code="bundle_id_required")
        return self._flow_in(self.bundle(target_id, bundle_version), flow_id)

    def _resolve_entrypoint(self, bundle_id: Optional[str], bundle_version: Optional[str]) -> str:
        """No flow_id: the named (or only/default) bundle's single entrypoint or its default_entrypoint."""
        target_id = bundle_id or self.default_bundle_id()
        if target_id is None:
            raise GatewayError("flow_id is required (or provide bundle_id to start a bundle entrypoint)",
                               code="flow_id_required")
        bundle = self._loaded(self.bundle(target_id, bundle_version))
        entry = [e.flow_id for e in bundle.entrypoints]
        chosen = entry[0] if len(entry) == 1 else bundle.default_entrypoint
        if not chosen:
            raise GatewayError(f"Bundle '{bundle.ref}' has {len(entry)} entrypoints and no default_entrypoint; "
                               "pass flow_id", code="flow_id_required")
        return workflow_id_for(bundle.bundle_id, bundle.bundle_version, chosen)

    def _resolve_qualified(self, flow_id: str, bundle_id: Optional[str], bundle_version: Optional[str]) -> str:
        """A `prefix:local` flow_id: a flow of the loaded bundle the prefix names, else a registered flow id."""
        prefix, _, local = flow_id.partition(":")
        prefix_id, prefix_version = split_bundle_ref(prefix, None)
        if prefix_id in self._catalog.bundles:
            if bundle_id is not None and bundle_id != prefix_id:
                raise GatewayError(f"flow_id '{flow_id}' belongs to bundle '{prefix_id}', not '{bundle_id}'")
            if prefix_version and bundle_version and prefix_version != bundle_version:
                raise GatewayError(f"bundle_version '{bundle_version}' conflicts with flow_id '{flow_id}'")
            bundle = self.bundle(prefix_id, prefix_version or bundle_version)
            return self._flow_in(bundle, local)
        if bundle_id is not None or bundle_version is not None:
            raise GatewayError(f"flow_id '{flow_id}' is not a flow of a loaded bundle; do not pass bundle_id")
        if flow_id not in self._catalog.specs:
            raise NotFound(f"Flow '{flow_id}' not found", code="flow_not_found")
        return flow_id

    @staticmethod
    def _loaded(bundle: LoadedBundle) -> LoadedBundle:
        if bundle.load_error:
            raise Unprocessable(f"Bundle '{bundle.ref}' failed to load: {bundle.load_error}", code="bundle_load_error")
        return bundle

    def _flow_in(self, bundle: LoadedBundle, flow_id: str) -> str:
        self._loaded(bundle)
        if flow_id not in bundle.flows:
            raise NotFound(f"Flow '{flow_id}' not found in bundle '{bundle.ref}'", code="flow_not_found")
        return workflow_id_for(bundle.bundle_id, bundle.bundle_version, flow_id)

    def default_llm(self, workflow_id: str) -> Optional[Tuple[str, str]]:
        """The (provider, model) for nodes of `workflow_id` that pin none: the settings, else the first pair
        pinned in the workflow's own bundle, else in any loaded bundle (in id order), else None."""
        if all(self.llm_default):
            return self.llm_default
        catalog = self._catalog
        ref = workflow_id.split(":", 1)[0]
        if ref not in catalog.default_llms:  # computed once per catalog (it is asked at every model call)
            own = [flow for wid, flow in catalog.flows.items() if wid.split(":", 1)[0] == ref]
            others = [catalog.flows[wid] for wid in sorted(catalog.flows) if wid.split(":", 1)[0] != ref]
            pairs = [pair for flow in [*own, *others] for pair in pinned_llms(flow)[:1]]
            catalog.default_llms[ref] = pairs[0] if pairs else None
        return catalog.default_llms[ref]

    def startable_spec(self, workflow_id: str) -> Any:
        """The compiled spec of `workflow_id`, or the GatewayError that says why it cannot start."""
        blocked = self._catalog.blocked.get(workflow_id)
        if blocked is not None:
            raise blocked
        bundle_id, _, version = workflow_id.split(":", 1)[0].partition("@")
        bundle = self._catalog.bundles.get(bundle_id, {}).get(version)
        flow = self._catalog.flows.get(workflow_id) or {}
        types = bundle.needs if bundle is not None else [n.get("type") for n in flow.get("nodes") or []
                                                          if isinstance(n, dict)]
        text_llm = set(types) & TEXT_LLM_NODE_TYPES
        if text_llm and self.default_llm(workflow_id) is None:
            raise Unprocessable(f"Workflow '{workflow_id}' has {', '.join(sorted(text_llm))} nodes and no provider "
                                f"or model is known for them: {LLM_SETTINGS_HINT}", code="llm_not_configured")
        if ":" in workflow_id and "@" in workflow_id.split(":", 1)[0]:
            ref, _, flow_id = workflow_id.partition(":")
            bundle_id = ref.split("@", 1)[0]
            mark = self.deprecation(bundle_id, flow_id)
            if mark is not None:
                reason = f": {mark['reason']}" if mark.get("reason") else ""
                raise Conflict(f"Workflow '{bundle_id}:{flow_id}' is deprecated{reason}", code="deprecated")
        spec = self.get(workflow_id)
        if spec is None:
            raise NotFound(f"Workflow '{workflow_id}' not found", code="workflow_not_found")
        return spec

    def register_schedule(self, workflow_id: str, definition: Dict[str, Any]) -> Any:
        """Persist a schedule wrapper's definition and make its workflow available now."""
        self.stores.dynamic_flows.put(workflow_id, definition)
        with self._reload_lock:
            spec = schedule_spec(workflow_id)
            self._catalog.specs[workflow_id] = spec
        return spec

    def install(self, content: bytes, *, overwrite: bool = False) -> LoadedBundle:
        """Validate an uploaded bundle and store its bytes in the database (not yet loaded)."""
        self.require_bundle_source()
        bundle = read_bundle(content, "upload")
        try:
            self.stores.bundles.put(bundle.bundle_id, bundle.bundle_version, content, overwrite=overwrite)
        except FileExistsError as exc:  # 400, as the original's registry errors
            raise GatewayError(str(exc), code="bundle_exists") from None
        return bundle

    def remove(self, bundle_id: str, version: Optional[str] = None) -> int:
        """Delete a bundle (every version, or one) wherever it was installed; return how many copies.

        Uploads leave the database. Files leave the flows dir under the original gateway's rules:
        only `*.flow` files directly in that directory (a flows dir that is a single file is never
        touched), recognised by the manifest they hold rather than their name, and a symlink is
        unlinked without touching what it points to.
        """
        self.require_bundle_source()
        removed = 0
        paths = sorted(self.flows_dir.glob("*.flow")) if self.flows_dir.is_dir() else []
        for path in paths:  # first what may fail (a read-only flows dir): then a failure deletes no upload
            try:
                found = read_bundle(read_flow_file(path), str(path))
            except (GatewayError, OSError):
                continue  # not a readable bundle: never ours to delete
            if found.bundle_id != bundle_id or (version is not None and found.bundle_version != version):
                continue
            try:
                path.unlink()
            except OSError as exc:
                raise GatewayError(f"Failed removing {path.name} from the flows dir: {exc.strerror}",
                                   code="bundle_remove_failed") from None
            removed += 1
        return removed + self.stores.bundles.delete(bundle_id, version)


def split_bundle_ref(bundle_id: str, bundle_version: Optional[str]) -> Tuple[str, Optional[str]]:
    """`id@ver` -> (id, ver); a separate `bundle_version` must agree with an embedded one."""
    text = (bundle_id or "").strip()
    embedded = None
    if "@" in text:
        text, embedded = text.split("@", 1)
        embedded = embedded.strip() or None
        if not text.strip():
            raise GatewayError("bundle_id is required", code="bundle_id_required")
    if embedded and bundle_version and embedded != bundle_version:
        raise GatewayError(f"bundle_version '{bundle_version}' conflicts with bundle_id '{bundle_id}'",
                           code="version_conflict")
    return text, embedded or (bundle_version or None)


# Each provider's own environment variables (base URL first); a key's value is never shown anywhere.
PROVIDER_ENV = {
    "openai": ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
    "openai-compatible": ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
    "anthropic": ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
    "lmstudio": ("LMSTUDIO_BASE_URL",),
    "ollama": ("OLLAMA_BASE_URL", "OLLAMA_HOST"),
    "vllm": ("VLLM_BASE_URL",),
    "openrouter": ("OPENROUTER_BASE_URL", "OPENROUTER_API_KEY"),
    "portkey": ("PORTKEY_BASE_URL", "PORTKEY_API_KEY"),
}


def configured_providers(environ: Optional[Dict[str, str]] = None) -> Dict[str, List[str]]:
    """Providers whose own env vars are set: name -> the names of those variables (never their values)."""
    env = os.environ if environ is None else environ
    return {name: [var for var in variables if env.get(var, "").strip()]
            for name, variables in PROVIDER_ENV.items() if any(env.get(var, "").strip() for var in variables)}


def provider_models(provider: str, timeout_s: float = 10.0) -> List[str]:
    """The models `provider` lists right now (asks the provider; raises on no answer within `timeout_s`)."""
    from concurrent.futures import ThreadPoolExecutor

    from abstractcore.providers.registry import get_available_models_for_provider

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")
    try:
        models = pool.submit(get_available_models_for_provider, provider, raise_on_error=True).result(timeout_s)
    finally:
        pool.shutdown(wait=False)
    return sorted(str(m) for m in models or [] if isinstance(m, str) and m.strip())


def provider_catalog(include_models: bool = False) -> List[Dict[str, Any]]:
    """abstractcore's providers (name, status, features...; with `include_models`, their model lists, which
    asks every provider), sorted by name."""
    from abstractcore.providers.registry import get_all_providers_with_models

    items = [dict(p) for p in get_all_providers_with_models(include_models=include_models) or []
             if isinstance(p, dict) and str(p.get("name") or "").strip()]
    return sorted(items, key=lambda p: str(p["name"]))


def tool_specs() -> List[Dict[str, Any]]:
    """The runtime's default tools (what `local` tool mode runs and agents are offered)."""
    from abstractruntime.integrations.abstractcore.default_tools import list_default_tool_specs

    return [dict(spec) for spec in list_default_tool_specs() if isinstance(spec, dict) and spec.get("name")]


def capabilities() -> Dict[str, Dict[str, Any]]:
    """Which optional capabilities this gateway can run, each with its package and an install hint."""
    import importlib.metadata
    import importlib.util

    def package(name: str, hint: str) -> Dict[str, Any]:
        if importlib.util.find_spec(name) is None:
            return {"installed": False, "package": name, "install_hint": hint}
        try:
            version: Optional[str] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"installed": True, "package": name, "version": version}

    llm_hint = "pip install 'abstractgateway[llm]'"
    caps = {"llm": dict(package("abstractcore", llm_hint), installed=llm_integration_available()),
            "agents": package("abstractagent", llm_hint)}
    for what, name in (("vision", "abstractvision"), ("voice", "abstractvoice"), ("music", "abstractmusic")):
        caps[what] = package(name, f"pip install {name}")
    caps["tools"] = {"installed": caps["llm"]["installed"],
                     "count": len(tool_specs()) if caps["llm"]["installed"] else 0}
    return caps


class LLMCallAbandoned(RuntimeError):
    """A model call the gateway stopped waiting for: it did not answer within `llm_timeout_s`."""


def _answer_within(call: Callable[..., Any], kwargs: Dict[str, Any], timeout_s: float) -> Any:
    """`call(**kwargs)` made on a thread of its own while this one waits, at most `timeout_s`.

    Past that the model server is taken for stalled (a server that accepts a request and never
    answers, or trickles bytes, passes any per-read timeout): the caller gets `LLMCallAbandoned`
    and the call is left to end unheard. The call's progress events (`params["on_progress"]`,
    which append ledger records) are handed back and run here, on the step's own thread: its
    writes stay in the step, and none come from an abandoned call.
    """
    import queue

    box: Dict[str, Any] = {}
    events: "queue.SimpleQueue[Optional[Tuple[tuple, dict]]]" = queue.SimpleQueue()
    as_given = kwargs
    params = kwargs.get("params")
    on_progress = params.get("on_progress") if isinstance(params, dict) else None
    if callable(on_progress):
        kwargs = {**kwargs, "params": {**params, "on_progress": lambda *a, **kw: events.put((a, kw))}}

    context = contextvars.copy_context()  # the call sees the step thread's context variables, as it would there

    def work() -> None:
        try:
            box["result"] = context.run(call, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            box["error"] = exc
        finally:
            events.put(None)

    try:
        threading.Thread(target=work, name="llm-call", daemon=True).start()
    except RuntimeError:  # no thread to be had (a process or memory limit): made here, without the deadline
        return call(**as_given)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            event = events.get(timeout=min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX))
        except queue.Empty:
            raise LLMCallAbandoned(f"the model did not answer within {timeout_s:g}s "
                                   "(ABSTRACTGATEWAY_LLM_TIMEOUT_S)") from None
        if event is None:
            break
        on_progress(*event[0], **event[1])
    if "error" in box:
        raise box["error"]
    return box["result"]


class _LazyLLMClient:
    """abstractruntime's MultiLocalAbstractCoreLLMClient, built on first use, its calls guarded.

    Building it loads the default provider, which may contact the provider: a gateway must start
    (and run workflows without LLM nodes) while no model server is up. `generate` (the one method
    the runtime's handlers call) goes through `guard`, which bounds how long a step waits.
    """

    def __init__(self, build: Callable[[], Any], guard: Callable[[Callable[..., Any], Dict[str, Any]], Any]) -> None:
        self._build = build
        self._guard = guard
        self._client: Any = None
        self._lock = threading.Lock()

    def generate(self, **kwargs: Any) -> Any:
        return self._guard(lambda **kw: self._get().generate(**kw), kwargs)

    def _get(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build()
        return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)


class LLMEffects:
    """The runtime's LLM, model-residency and tool effects, wired from abstractruntime's abstractcore
    integration (its effect handlers, multi-provider LLM client and tool executors) -- no LLM code here.

    Around the runtime's LLM handler it adds two things: nodes that pin no provider or model get the
    workflow's default (`WorkflowHost.default_llm`), and a semaphore bounds the provider calls in flight
    (`llm_concurrency`), so many waiting runs never flood one model server. The integration is imported
    at the first effect that needs it (importing it takes about a second). In `local` tool mode this
    object is also the runtime's executor for `{"approved": true}` resumes.
    """

    def __init__(self, config: Config, host: WorkflowHost, *, artifact_store: Any, run_store: Any) -> None:
        self.host = host
        self.tool_mode = config.tool_mode
        self.timeout_s = config.llm_timeout_s
        self.slots = threading.BoundedSemaphore(config.llm_concurrency)
        self.waiting = 0  # threads waiting on a model now, for its slot or its answer (a stop need not wait)
        self._waiting_lock = threading.Lock()
        self._counted = threading.local()
        self._artifact_store, self._run_store = artifact_store, run_store
        self._data_dir = Path(config.data_dir)
        self._built: Dict[Any, Any] = {}
        self._tools: Any = None
        self._lock = threading.Lock()
        self.client = _LazyLLMClient(self._build_client, self._guarded)
        self.handlers = {EffectType.LLM_CALL: self._llm_call, EffectType.MODEL_RESIDENCY: self._model_residency,
                         EffectType.TOOL_CALLS: self._tool_calls}
        self.before_call: Callable[[RunState], None] = lambda run: None  # see `Gateway._publish_before_call`
        self.resume_tools = self if self.tool_mode == "local" else None

    def _integration(self) -> Dict[Any, Any]:
        """abstractruntime's effect handlers on our client and tool executor, built once."""
        with self._lock:
            if not self._built:
                from abstractruntime.integrations.abstractcore.effect_handlers import build_effect_handlers
                from abstractruntime.integrations.abstractcore.tool_executor import (
                    MappingToolExecutor, PassthroughToolExecutor)

                if self.tool_mode == "local":
                    from abstractruntime.integrations.abstractcore.default_tools import build_default_tool_map

                    self._tools = MappingToolExecutor(build_default_tool_map())
                else:  # a tool call becomes a durable approval wait; nothing runs in the gateway
                    self._tools = PassthroughToolExecutor(mode="approval_required")
                self._built = build_effect_handlers(llm=self.client, tools=self._tools,
                                                    artifact_store=self._artifact_store, run_store=self._run_store)
        return self._built

    def _build_client(self) -> Any:
        from abstractruntime.integrations.abstractcore.llm_client import MultiLocalAbstractCoreLLMClient

        provider, model = self.host.default_llm("") or ("", "")
        if not provider or not model:
            raise RuntimeError(f"no LLM provider or model is configured: {LLM_SETTINGS_HINT}")
        return MultiLocalAbstractCoreLLMClient(
            provider=provider, model=model, artifact_store=self._artifact_store,
            llm_kwargs=self._provider_options(),
            bloc_root_dir=self._data_dir / "llm" / "blocs",
            prompt_cache_export_root_dir=self._data_dir / "llm" / "prompt_cache")

    def _provider_options(self) -> Dict[str, Any]:
        """abstractcore provider settings: its request timeout (its own default is two hours) and, where
        it has one, a wall-clock budget for its retries, both `llm_timeout_s`, so a call the gateway
        stopped waiting for ends soon after. Its trace ring (the last 50 requests and answers of each
        provider, whole) serves no route here and held 300 MB after a few 3 MB answers: kept empty
        (answers still carry their trace ids)."""
        options: Dict[str, Any] = {"timeout": self.timeout_s, "max_traces": 0}
        try:
            from abstractcore.core.retry import RetryConfig
        except ImportError:  # another abstractcore layout: its own retries, unbudgeted
            return options
        if "max_total_wall_clock_s" in {f.name for f in dataclasses.fields(RetryConfig)}:
            options["retry_wall_clock_budget_s"] = self.timeout_s
        return options

    def _guarded(self, call: Callable[..., Any], kwargs: Dict[str, Any]) -> Any:
        """A model call, waited for at most `llm_timeout_s` (see `_answer_within`)."""
        with self._waiting_for_a_model():
            return _answer_within(call, kwargs, self.timeout_s)

    @contextmanager
    def _waiting_for_a_model(self) -> Iterator[None]:
        """Count this thread among those waiting on a model (`waiting`), once however deeply nested."""
        nested = getattr(self._counted, "yes", False)
        if not nested:
            self._counted.yes = True
            with self._waiting_lock:
                self.waiting += 1
        try:
            yield
        finally:
            if not nested:
                self._counted.yes = False
                with self._waiting_lock:
                    self.waiting -= 1

    def _llm_call(self, run: RunState, effect: Any, default_next_node: Optional[str]) -> Any:
        payload = dict(effect.payload or {})
        provider = str(payload.get("provider") or "").strip().lower()
        if not provider or not str(payload.get("model") or "").strip():
            default = self.host.default_llm(run.workflow_id)
            if default is not None and (not provider or provider == default[0]):
                payload["provider"], payload["model"] = default[0], payload.get("model") or default[1]
                effect = dataclasses.replace(effect, payload=payload)
        handler = self._integration()[EffectType.LLM_CALL]
        self.before_call(run)
        with self._waiting_for_a_model():  # from before the slot: one queued behind a stalled call waits on it too
            with self.slots:
                return handler(run, effect, default_next_node)

    def _model_residency(self, run: RunState, effect: Any, default_next_node: Optional[str]) -> Any:
        return self._integration()[EffectType.MODEL_RESIDENCY](run, effect, default_next_node)

    def _tool_calls(self, run: RunState, effect: Any, default_next_node: Optional[str]) -> Any:
        if self.tool_mode == "local":  # the tools run here (else the call is an approval wait: no time)
            self.before_call(run)
        elif not (effect.payload or {}).get("wait_key"):
            # One key per approval, as on the original: the runtime's own (`tool_calls:<run>:<node>`) is the
            # same for every tool step of an agent, so an answer sent again for the step before (a retry, a
            # second click) would approve the next step's calls unseen.
            key = f"tool_approval:{run.run_id}:{run.current_node}:{uuid.uuid4().hex}"
            effect = dataclasses.replace(effect, payload={**(effect.payload or {}), "wait_key": key})
        return self._integration()[EffectType.TOOL_CALLS](run, effect, default_next_node)

    def execute(self, *, tool_calls: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Run approved tool calls (the runtime calls this on `{"approved": true}` resumes, local mode only)."""
        self._integration()
        return self._tools.execute(tool_calls=tool_calls)

    def generate(self, *, provider: str, model: str, system_prompt: str, messages: List[Dict[str, Any]]) -> str:
        """One model answer outside any run (observer summaries and chats), in the same concurrency bound."""
        with self.slots:
            result = self.client.generate(prompt="", messages=messages, system_prompt=system_prompt,
                                          params={"temperature": 0.2, "_provider": provider, "_model": model})
        if isinstance(result, dict) and result.get("error") and not result.get("content"):
            raise RuntimeError(str(result["error"]))
        return str((result or {}).get("content") or "").strip()


# =====================================================================================
# 4. Runner
# =====================================================================================

COMMAND_TYPES = ("pause", "resume", "cancel", "emit_event", "update_schedule", "compact_memory")


class LeaseLost(RuntimeError):
    """This runner's lease expired or was taken over: it must stop applying and ticking."""


ACTOR_ID = "gateway"
RUNNER_LEASE = "runner"  # the lease whose holder applies commands and ticks runs


def _log(message: str) -> None:
    print(f"abstractgateway: {message}", file=sys.stderr, flush=True)


SESSION_MEMORY_WORKFLOW = "__session_memory__"


def session_memory_run_id(session_id: str) -> str:
    """The internal run that owns a session's attachments and memory (the runtime's naming scheme)."""
    sid = session_id.strip()
    if _is_safe_id(sid):
        return f"session_memory_{sid}"
    return "session_memory_sha_" + hashlib.sha256(sid.encode("utf-8")).hexdigest()[:32]


def ensure_session_memory_run(runs: Any, session_id: str) -> str:
    """Create the session's owner run (an empty completed run) if missing; return its id."""
    run_id = session_memory_run_id(session_id)
    if not runs.exists(run_id):
        now = utc_now_iso()
        runs.save(RunState(
            run_id=run_id, workflow_id=SESSION_MEMORY_WORKFLOW, status=RunStatus.COMPLETED, current_node="done",
            vars={"context": {"task": "", "messages": []}, "scratchpad": {}, "_runtime": {"memory_spans": []},
                  "_temp": {}, "_limits": {}},
            waiting=None, output={"messages": []}, error=None, created_at=now, updated_at=now, actor_id=None,
            session_id=session_id.strip(), parent_run_id=None))
    return run_id


class TripleStoreHandle:
    """AbstractMemory's SQLite triple store in the data dir (`abstractmemory/kg.sqlite3`), opened on first use.

    The knowledge graph `memory_kg_*` nodes write and `/kg/query` reads. AbstractMemory's own store
    (stdlib sqlite3, no extra dependency) in a file of its own: its schema is AbstractMemory's, so it
    stays out of the gateway's database and migrations. Opened lazily: most gateways never touch it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._store: Any = None

    def _open(self) -> Any:
        with self._lock:
            if self._store is None:
                from abstractmemory import SQLiteTripleStore

                self._store = SQLiteTripleStore(self.path)
            return self._store

    def add(self, assertions: Iterable[Any]) -> List[str]:
        return self._open().add(assertions)

    def query(self, query: Any) -> List[Any]:
        return self._open().query(query)

    def __getattr__(self, name: str) -> Any:  # the rest of AbstractMemory's store API (resolve, keywords)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._open(), name)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def effect_handlers(self, runs: Any) -> Dict[Any, Callable[..., Any]]:
        """The runtime's `memory_kg_*` effect handlers over this store, built on first use
        (importing AbstractMemory costs ~150 ms of start-up that most gateways never need)."""
        from abstractruntime.core.models import EffectType

        built: Dict[Any, Callable[..., Any]] = {}

        def handler_for(effect_type: Any) -> Callable[..., Any]:
            def handle(run: RunState, effect: Any, default_next_node: Optional[str]) -> Any:
                with self._lock:
                    if not built:
                        from abstractruntime.integrations.abstractmemory.effect_handlers import (
                            build_memory_kg_effect_handlers,
                        )

                        built.update(build_memory_kg_effect_handlers(store=self, run_store=runs, now_iso=utc_now_iso))
                return built[effect_type](run, effect, default_next_node)

            return handle

        return {t: handler_for(t) for t in (EffectType.MEMORY_KG_ASSERT, EffectType.MEMORY_KG_QUERY,
                                            EffectType.MEMORY_KG_RESOLVE)}


# A batch of commands holds the database's write turn at most about this long (see `_apply_batch`).
COMMAND_BATCH_S = 0.05
# While commands arrive faster than they are applied, the runner waits this long before the next batch:
# each batch costs a transaction, a durable commit and the inbox queries, whatever its size.
COMMAND_GATHER_S = 0.01


def _is_compaction(record: CommandRecord) -> bool:
    return record.type.lower() == "compact_memory"


# A compact_memory without a target looks for the conversation in at most this many runs of its tree.
COMPACTION_SEARCH_RUNS = 1000


def _has_messages(run: RunState) -> bool:
    context = run.vars.get("context") if isinstance(run.vars, dict) else None
    messages = context.get("messages") if isinstance(context, dict) else None
    return isinstance(messages, list) and bool(messages)


def _command_failure(record: CommandRecord, exc: Exception) -> str:
    """The reason a command failed, as recorded in its outcome (an unexpected failure is also logged)."""
    reason = exc.detail if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, (GatewayError, ValueError, KeyError)):
        _log(f"command {record.command_id} ({record.type}) failed unexpectedly: {reason}")
    return reason


class CommandInbox:
    """The durable command inbox: commands appended by clients, applied exactly once by the runner.

    A command's effect, its outcome row and the cursor advance commit together (on SQLite), in
    batches (`_apply_batch`). Effects go through the gateway's runtime, under the per-run locks
    that keep a tick and a command on the same run from interleaving (`Gateway.runs_locked`).
    """

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.stores, self.config = gateway.stores, gateway.config
        self.runtime, self.host, self.llm, self.uow = gateway.runtime, gateway.host, gateway.llm, gateway.uow

    def submit(self, *, command_id: str, run_id: str, type: str, payload: Optional[Dict[str, Any]] = None,
               ts: Optional[str] = None, client_id: Optional[str] = None) -> CommandAppendResult:
        """Append to the durable inbox (idempotent on `command_id`); application is asynchronous.

        A blank `command_id` gets a generated one, as on the original: that command has no idempotency."""
        type = str(type or "").strip()  # " pause " is a pause, as on the original
        if type not in COMMAND_TYPES:
            raise GatewayError(f"type must be one of {'|'.join(COMMAND_TYPES)}", code="invalid_command_type")
        record = CommandRecord(command_id=command_id, run_id=run_id, type=type, payload=dict(payload or {}),
                               ts=ts or utc_now_iso(), client_id=client_id)
        try:
            return self.stores.commands.append(record)
        except ValueError as exc:
            raise GatewayError(f"Failed to append command: {exc}", code="invalid_command") from None

    def status(self, command_id: str, record: Optional[CommandRecord] = None) -> Dict[str, Any]:
        record = record or self.stores.commands.get(command_id)
        if record is None:
            raise NotFound(f"Command '{command_id}' not found", code="command_not_found")
        outcome = self.stores.outcomes.get(command_id)
        return {"command_id": record.command_id, "seq": record.seq, "run_id": record.run_id, "type": record.type,
                "ts": record.ts, "status": outcome["status"] if outcome else "pending",
                "error": outcome["error"] if outcome else None,
                "applied_at": outcome["applied_at"] if outcome else None}

    def apply_pending(self, lease: Optional[LeaseToken] = None) -> int:
        """Apply the inbox commands after the cursor, in seq order; return how many were read.

        They are applied in batches, each one transaction (one durable commit) with a savepoint
        per command (see `_apply_batch`). A `compact_memory` command waits on a model first, so it
        ends the batch before it and is applied in a batch of its own, its model call made outside
        any lock or transaction. With `lease`, commands are applied only while that lease is held.
        No wake-up signal: the runner's loop looks for runnable runs right after calling this.
        """
        pending, _ = self.stores.commands.list_after(after=self.stores.cursor.load(),
                                                     limit=self.config.command_batch_limit)
        read = len(pending)
        while pending:
            if _is_compaction(pending[0]):
                applied = self._apply_batch(pending[:1], lease, self._prepare_compaction(pending[0]))
            else:
                batch = list(itertools.takewhile(lambda r: not _is_compaction(r), pending))
                # one at a time where a rolled-back batch would leave its earlier commands' files written
                applied = self._apply_batch(batch if self.stores.atomic else batch[:1], lease)
            pending = pending[applied:]
        return read

    def _apply_batch(self, batch: List[CommandRecord], lease: Optional[LeaseToken],
                     effect: Optional[Callable[[CommandRecord, List[str]], None]] = None) -> int:
        """Apply commands exactly once in one transaction; return how many (at least one).

        Each command's effect and outcome are written in a savepoint of their own: a failing command
        rolls back only its own writes and is recorded as failed in the same transaction. A command
        that already has an outcome is skipped. The lease is checked once, inside the transaction
        (`LeaseLost`: a runner that stalled past its lease can never apply a command the new holder
        applies too); that holds for the whole batch, as taking the lease over is a write, which
        waits for this transaction to end. `LeaseLost` and storage errors roll the whole batch back:
        its commands stay pending, not the commands' fault. The cursor advance commits with the batch.

        Locking: the per-run locks of every run the batch may change are taken first, all at once
        and in stripe order (`_targets_locked`), then the transaction (the database's write turn).
        Ticks take the same two in the same order, one run's lock then the write turn, and no one
        takes a run lock while holding the write turn, so there is no cycle to deadlock in. The batch
        stops after `COMMAND_BATCH_S`, letting writers waiting for the write turn (acknowledgements
        of new commands, ticks) go between batches.
        """
        effect = effect or self._apply_effect
        applied = 0
        cancelled: List[str] = []
        with self._targets_locked(batch) as targets, self.stores.db.transaction() as tx:
            self.gateway.check_lease(lease)
            started, cursor = time.monotonic(), self.stores.cursor.load()
            for record in batch:
                if applied and time.monotonic() - started >= COMMAND_BATCH_S:
                    break
                applied += 1
                if self.stores.outcomes.exists(record.seq):
                    continue
                topics = len(tx.topics)
                try:
                    with tx.conn:  # nested in the transaction, apsw makes this a savepoint
                        effect(record, targets[record.seq])
                        self.stores.outcomes.record(record, "applied")
                    if record.type.lower() == "cancel":
                        cancelled.append(record.run_id)
                except (LeaseLost, StorageError):
                    raise
                except _STORAGE_FAILURES as exc:
                    raise storage_error(exc) from exc
                except Exception as exc:  # noqa: BLE001 - every failure is recorded, none wedges the inbox
                    if tx.conn.get_autocommit():  # SQLite abandoned the whole transaction: nothing is written
                        raise StorageError("The transaction was abandoned by the database; nothing was written.") \
                            from exc
                    del tx.topics[topics:]
                    self.stores.outcomes.record(record, "failed", _command_failure(record, exc))
            self.stores.cursor.save(max(cursor, batch[applied - 1].seq))
        for run_id in cancelled:  # a parent waiting on a run cancelled alone goes on now, not at the next repair
            child = self.stores.runs.load(run_id)
            if child is not None and child.parent_run_id and _enum_value(child.status) in TERMINAL_STATUSES:
                self.gateway.resume_parent_of(child, lease)
        return applied

    def _prepare_compaction(self, record: CommandRecord) -> Callable[[CommandRecord, List[str]], None]:
        """Run a `compact_memory` command's model work now, outside any lock or transaction (no writer
        waits on the model); return the effect that commits it, or re-raises its failure, in the batch."""
        failure: Optional[Exception] = None
        compaction = None
        if not self.stores.outcomes.exists(record.seq):  # applied already: don't pay for the model again
            try:
                compaction = self._run_compaction(record)
            except (LeaseLost, StorageError):
                raise
            except _STORAGE_FAILURES as exc:
                raise storage_error(exc) from exc
            except Exception as exc:  # noqa: BLE001 - recorded as the command's failure
                failure = exc

        def commit(command: CommandRecord, targets: List[str]) -> None:
            if failure is not None:
                raise failure
            self._commit_compaction(command, compaction, targets)

        return commit

    @contextmanager
    def _targets_locked(self, records: Sequence[CommandRecord]) -> Iterator[Dict[int, List[str]]]:
        """Lock the runs the commands target; yield each command's targets (by seq), read under the locks.

        The first guess is each command's own run; the targets are read under the locks taken so far
        until no new one turns up (a tick may have started a child meanwhile: it must be locked too
        before it is changed).
        """
        locked: set = set()
        wanted = {record.seq: [record.run_id] for record in records}
        while True:
            locked |= {run_id for ids in wanted.values() for run_id in ids}
            with self.gateway.runs_locked(locked):
                wanted = {record.seq: self._command_targets(record) for record in records}
                if all(locked.issuperset(ids) for ids in wanted.values()):
                    yield wanted
                    return

    def _command_targets(self, record: CommandRecord) -> List[str]:
        """The runs a command may change, known before it is applied (so their locks come first)."""
        kind = record.type.lower()
        if kind == "emit_event":
            try:
                return self.stores.runs.ids_waiting_on(self._event_wait_key(record))
            except GatewayError:
                return []
        if kind == "update_schedule":
            try:
                return [schedule_root(self.stores.runs, record.run_id).run_id]
            except GatewayError:
                return []
        if kind == "compact_memory":
            try:
                root, target = self._compaction_runs(record)
            except GatewayError:
                return []
            return list(dict.fromkeys([root.run_id, target]))
        return self.gateway.live_tree_ids(record.run_id)

    def _apply_effect(self, record: CommandRecord, targets: List[str]) -> None:
        payload = record.payload or {}
        kind = record.type.lower()
        if kind == "emit_event":
            self._emit_event(record, targets)
            return
        if kind == "update_schedule":
            update_schedule(self.stores, record, self.config.schedule_min_interval_s)
            return
        if not targets:  # the run tree, root first (locked), is empty: the command's run does not exist
            raise run_not_found(record.run_id)
        if kind == "pause":  # the runtime leaves finished and already-paused runs as they are
            for run_id in targets:
                self.runtime.pause_run(run_id, reason=payload.get("reason"))
        elif kind == "cancel":  # ...and finished runs, here
            for run_id in targets:
                self.runtime.cancel_run(run_id, reason=payload.get("reason") or "Cancelled")
        elif kind == "resume":
            self._resume(targets, payload)
        else:
            raise GatewayError(f"Unknown command type '{record.type}'", code="invalid_command_type")

    def _resume(self, tree: List[str], payload: Dict[str, Any]) -> None:
        """`resume` with a payload answers the root's wait; without one it unpauses the whole tree."""
        if "payload" in payload:
            self._resume_waiting(self.runtime.get_state(tree[0]), payload)
            return
        for run_id in tree:  # the runtime leaves finished and unpaused runs as they are
            self.runtime.resume_run(run_id)
        fire_schedule_now(self.stores.runs, tree[0])

    def _compaction_runs(self, record: CommandRecord) -> Tuple[RunState, str]:
        """(the scheduled root, the run to compact) of a `compact_memory` command.

        As on the original gateway, memory is compacted in scheduled run trees only (a schedule's
        runs are the ones whose conversation grows without end), and on `payload.target_run_id`
        if given, else on the run of the tree that holds the conversation (`_conversation_in`)."""
        try:
            root = schedule_root(self.stores.runs, record.run_id)
        except GatewayError as exc:
            if exc.code != "not_scheduled":
                raise
            raise GatewayError("compact_memory is only supported for scheduled runs (or runs inside a scheduled "
                               "run tree)", code="not_scheduled") from None
        payload = record.payload or {}
        target = payload.get("target_run_id") or payload.get("targetRunId")
        if isinstance(target, str) and target.strip():
            if not self.stores.runs.exists(target.strip()):
                raise run_not_found(target.strip())
            return root, target.strip()
        found = self._conversation_in(root)
        if found is None:
            raise Unprocessable("No compactable run found (no context.messages in the scheduled run tree)",
                                code="nothing_to_compact")
        return root, found

    def _conversation_in(self, root: RunState) -> Optional[str]:
        """The run of `root`'s tree whose `context.messages` a compaction shortens: `root` itself if it has
        messages, else down the chain of subflows it waits on, else its newest descendant that has some
        (loading at most `COMPACTION_SEARCH_RUNS` runs: a schedule may have thousands of finished ones)."""
        runs, budget = self.stores.runs, [COMPACTION_SEARCH_RUNS]

        def search(run: RunState) -> Optional[str]:
            if _has_messages(run):
                return run.run_id
            seen, current = set(), run
            while current is not None and current.run_id not in seen:
                seen.add(current.run_id)
                details = current.waiting.details if current.waiting is not None else None
                sub_run_id = details.get("sub_run_id") if isinstance(details, dict) else None
                current = runs.load(sub_run_id) if isinstance(sub_run_id, str) and sub_run_id else None
                if current is not None and _has_messages(current):
                    return current.run_id
            for child_id in reversed(runs.child_ids(run.run_id)):
                budget[0] -= 1
                child = runs.load(child_id) if budget[0] >= 0 else None
                found = search(child) if child is not None else None
                if found or budget[0] < 0:
                    return found
            return None

        return search(root)

    def _run_compaction(self, record: CommandRecord) -> Tuple[StepWrites, str, str]:
        """Run the runtime's MEMORY_COMPACT effect of a `compact_memory` command on its target run, out of
        band, as the original does: its `started` and `completed` records go to the target's ledger (node
        `compact_memory`), its summary model call to a child run of the target. Return the collected
        writes, the scheduled root's id and the target's id; nothing is written here: `_commit_compaction`
        commits it with the command's outcome.

        It needs no LLM when there is nothing to compact; otherwise the runtime asks the workflow's
        default model: without the LLM extra or a model the command fails with that reason."""
        from abstractruntime import Effect, EffectType

        root, target = self._compaction_runs(record)
        p = record.payload or {}
        preserve = p.get("preserve_recent")
        try:  # read as the original reads them: anything unreadable is the default
            preserve = max(0, int(p.get("preserveRecent") if preserve is None else preserve))
        except (TypeError, ValueError, OverflowError):
            preserve = 6
        mode = str(p.get("compression_mode") or p.get("compressionMode") or "standard").strip().lower()
        focus = p.get("focus").strip() if isinstance(p.get("focus"), str) else ""
        effect = Effect(type=EffectType.MEMORY_COMPACT, result_key="_temp.command.compact_memory", payload={
            "preserve_recent": preserve, "compression_mode": mode if mode in ("light", "standard", "heavy") else
            "standard", **({"focus": focus} if focus else {})})
        with self.uow.collect() as writes:
            state = self.runtime.run_store.load(target)
            outcome = self.runtime._execute_effect_with_retry(
                run=state, node_id="compact_memory", effect=effect, default_next_node=None,
                idempotency_key=f"command:compact_memory:{record.command_id}")
            state.updated_at = utc_now_iso()
            self.runtime.run_store.save(state)
        if outcome.status == "failed":
            needs_llm = self.llm is None and "llm_call" in str(outcome.error or "")
            raise Unprocessable(
                f"compact_memory needs an LLM to summarise; install the '{LLM_EXTRA}' extra" if needs_llm
                else f"compact_memory failed: {outcome.error}",
                code="llm_extra_required" if needs_llm else "compact_failed")
        return writes, root.run_id, target

    def _commit_compaction(self, record: CommandRecord, compaction: Tuple[StepWrites, str, str],
                           locked: List[str]) -> None:
        """Inside the command's transaction: commit a compaction unless a run it rewrote changed meanwhile,
        and note it on the scheduled root (`vars._runtime.last_compact_memory`)."""
        writes, root_id, target = compaction
        changed = [rid for rid, text in writes.base.items()
                   if rid in writes.runs and self.stores.runs.load_json(rid) != text]
        if changed or not {root_id, target} <= set(locked):
            raise Conflict(f"Run '{(changed or [target])[0]}' changed while its memory was being compacted; send "
                           "the command again", code="compact_conflict")
        for run_id, text in writes.ledger:
            self.stores.ledger.append_json(run_id, text)
        for row in writes.runs.values():
            self.stores.runs.save_row(row)
        root = self.stores.runs.load(root_id)
        root.updated_at = utc_now_iso()
        root.vars.setdefault("_runtime", {})["last_compact_memory"] = {
            "command_id": record.command_id, "updated_at": utc_now_iso(), "requested_run_id": record.run_id,
            "scheduled_root_run_id": root_id, "target_run_id": target}
        self.stores.runs.save(root)

    def _resume_waiting(self, run: RunState, payload: Dict[str, Any]) -> None:
        body = payload.get("payload")
        if not isinstance(body, dict):
            raise GatewayError("resume payload.payload must be an object", code="invalid_payload")
        if _is_paused(run):
            raise Conflict(f"Run '{run.run_id}' is paused; resume it first", code="run_paused")
        if _enum_value(run.status) != "waiting" or run.waiting is None:
            raise Conflict(f"Run '{run.run_id}' is not waiting (status {_enum_value(run.status)}): nothing to "
                           "answer, or the wait was already answered", code="not_waiting")
        wait_key = payload.get("wait_key", payload.get("waitKey"))
        if wait_key is not None and run.waiting.wait_key is not None and wait_key != run.waiting.wait_key:
            raise Conflict(f"wait_key mismatch: run waits on '{run.waiting.wait_key}', got '{wait_key}'",
                           code="wait_key_mismatch")
        details = run.waiting.details if isinstance(run.waiting.details, dict) else {}
        if details.get("mode") == "approval_required":
            _check_tool_answer(run.run_id, details, body)
        spec = self.host.get(run.workflow_id)
        if spec is None:
            raise NotFound(f"Workflow '{run.workflow_id}' is not loaded", code="workflow_not_found")
        self.runtime.resume(workflow=spec, run_id=run.run_id, wait_key=wait_key, payload=body, max_steps=0)

    @staticmethod
    def _event_wait_key(record: CommandRecord) -> str:
        from abstractruntime.core.event_keys import build_event_wait_key

        p = record.payload or {}
        name = str(p.get("name") or "").strip()
        if not name:
            raise GatewayError("emit_event needs payload.name", code="invalid_payload")
        scope = str(p.get("scope") or "session").strip().lower()
        if scope not in ("session", "workflow", "run", "global"):
            raise GatewayError("emit_event scope must be session, workflow, run or global", code="invalid_payload")
        return build_event_wait_key(scope=scope, name=name,
                                    session_id=p.get("session_id") or p.get("sessionId") or record.run_id,
                                    workflow_id=p.get("workflow_id") or p.get("workflowId"),
                                    run_id=p.get("run_id") or p.get("runId") or record.run_id)

    def _emit_event(self, record: CommandRecord, waiting_run_ids: List[str]) -> None:
        p = record.payload or {}
        wait_key = self._event_wait_key(record)
        name = str(p["name"]).strip()
        scope = str(p.get("scope") or "session").strip().lower()
        session_id = p.get("session_id") or p.get("sessionId") or record.run_id
        body = p.get("payload")
        envelope = {
            "event_id": p.get("event_id") or p.get("eventId") or record.command_id, "name": name, "scope": scope,
            "session_id": session_id, "payload": body if isinstance(body, dict) else {"value": body},
            "emitted_at": p.get("emitted_at") or p.get("emittedAt") or utc_now_iso(),
            "emitter": {"source": "external", "client_id": record.client_id},
        }
        for run_id in waiting_run_ids:  # the runs found (and locked) before the transaction began
            run = self.stores.runs.load(run_id)
            if run is None or run.waiting is None or run.waiting.wait_key != wait_key or _is_paused(run):
                continue
            spec = self.host.get(run.workflow_id)
            if spec is not None:
                self.runtime.resume(workflow=spec, run_id=run_id, wait_key=wait_key, payload=envelope, max_steps=0)


MAX_SUBFLOW_DEPTH = 64  # runs nested in runs: far past any real flow, reached at once by one that calls itself


@functools.lru_cache(maxsize=None)
def _resume_search_code() -> Optional[Any]:
    """The code of `Runtime.resume`, whose one ledger `list` is its search for the tool-call wait a
    resume answers (see `_BufferedLedgerStore.list`); None if it no longer has that search's variables
    (then the search reads the whole ledger, as the runtime does)."""
    code = _runtime_type().resume.__code__
    return code if {"wait_key_str", "records", "waiting_rec", "already_completed"} <= set(code.co_varnames) else None


_PAUSE_PROBE_NAMES = ("get_state", "Exception", "status", "RunStatus", "CANCELLED", "_is_paused_run_vars", "vars")


def _pause_probe_code(runtime_type: type) -> Optional[Any]:
    """The code of `Runtime.tick`'s pause probe: a closure that loads the run, reads only its `status`
    and `vars`, and returns it only if it is cancelled or paused. None if this runtime has no such
    closure, or one that uses other names than that (then every probe loads the run)."""
    return next((const for const in runtime_type.tick.__code__.co_consts
                 if getattr(const, "co_name", None) == "_abort_if_externally_controlled"
                 and const.co_names == _PAUSE_PROBE_NAMES), None)


@functools.lru_cache(maxsize=None)
def _runtime_type() -> type:
    """abstractruntime's `Runtime`, with what a long-lived gateway needs. Built once, as the runtime is
    imported lazily.

    - Before each effect the runtime looks for a completed record with the effect's idempotency key,
      by reading and decoding the run's whole ledger: a cost that grows with every step of a
      long-lived run (5,000 records: 120 ms a step, holding the GIL). The ledger store answers the
      same question with one indexed read (`completed_record`).
    - A flow that starts itself as a subflow (or A -> B -> A) would start child runs without end (200
      a second, until the disk is full); a subflow nested `MAX_SUBFLOW_DEPTH` runs deep fails instead,
      and with it each run above it.
    - A step loads its run three times: once to work on, then twice more (`tick`'s pause probe) to see
      whether a pause or cancel was stored while its node ran. A probe of a run still stored as the
      step first loaded it is answered without decoding it again (about 8% of a timer step's CPU):
      `tick` (or `resume`, which calls it) went on from that load, so it was neither paused nor
      cancelled, and the probe reads nothing else. A run stored anew is decoded, and the probe sees
      the pause.

    - The runtime, the run index and the runner compare wait times as text, which orders only UTC
      times written alike: `…T10:00-05:00` would fire five hours early, `…T10:00+05:00` would be due
      by the clock but not by the text (the runner re-polled it without pause). A wait's time is
      stored as the UTC instant it names, in the runtime's own format.

    (And `resume`'s search of the ledger is answered by an index: see `_BufferedLedgerStore.list`.)
    """
    from abstractruntime import Runtime
    from abstractruntime.core.runtime import EffectOutcome

    pause_probe = _pause_probe_code(Runtime)

    class GatewayRuntime(Runtime):
        def get_state(self, run_id: str) -> RunState:
            if sys._getframe(1).f_code is pause_probe and self._run_store.stored_as_first_loaded(run_id):
                return RunState(run_id=run_id, workflow_id="", status=RunStatus.RUNNING, current_node="")
            run = self._run_store.load(run_id)
            if run is None:
                raise KeyError(f"Unknown run_id: {run_id}")
            return run

        def _find_prior_completed_result(self, run_id: str, idempotency_key: str) -> Optional[Dict[str, Any]]:
            record = self._ledger_store.completed_record(run_id, idempotency_key)
            return record.get("result") if record is not None else None

        def _handle_wait_until(self, run: RunState, effect: Any, default_next_node: Optional[str]) -> Any:
            until = effect.payload.get("until")
            utc = _utc_text(until) if until else until
            if utc != until:
                effect = dataclasses.replace(effect, payload={**effect.payload, "until": utc})
            return super()._handle_wait_until(run, effect, default_next_node)

        def _handle_start_subworkflow(self, run: RunState, effect: Any, default_next_node: Optional[str]) -> Any:
            depth, parent_id = 1, run.parent_run_id
            while parent_id and depth < MAX_SUBFLOW_DEPTH:
                parent = self._run_store.load(parent_id)
                depth, parent_id = depth + 1, parent.parent_run_id if parent is not None else None
            if depth >= MAX_SUBFLOW_DEPTH:
                return EffectOutcome.failed(f"subflows are nested {MAX_SUBFLOW_DEPTH} runs deep: does a flow "
                                            "start itself (directly or through another flow)?")
            return super()._handle_start_subworkflow(run, effect, default_next_node)

    return GatewayRuntime


def _path_list(raw: Any) -> List[str]:
    """Paths given as a list, a JSON list or one per line."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip().startswith("[") else raw.splitlines()
        except (ValueError, RecursionError):  # (a hostile `[[[[...` nests past the decoder's limit)
            raw = raw.splitlines()
    return [item.strip() for item in raw if isinstance(item, str) and item.strip()] if isinstance(raw, list) else []


def _workspace_scope_within(input_data: Dict[str, Any], roots: List[Path]) -> Dict[str, Any]:
    """A run's workspace settings (the directory its tool calls are scoped to, and what else they may
    reach) kept within the operator's `roots` (the workspace dir and mounts), as the original clamps
    them: a client could otherwise scope a run's proposed tool calls to `/etc`. A root outside is
    dropped (the run gets its own), `all_except_ignored` becomes `workspace_only`, allowed paths
    outside are dropped; camelCase spellings are read too."""
    data = dict(input_data)

    def take(name: str, camel: str) -> Any:
        value, camel_value = data.pop(name, None), data.pop(camel, None)
        return camel_value if value is None else value

    def resolved(text: str, base: Path) -> Optional[Path]:
        try:
            path = Path(text.strip()).expanduser()
            return Path(os.path.realpath(path if path.is_absolute() else base / path))
        except (ValueError, RuntimeError, OSError):  # a NUL byte, `~nosuchuser`: no path at all
            return None

    def within(path: Optional[Path]) -> bool:
        return path is not None and any(path == root or root in path.parents for root in roots)

    base = roots[0] if roots else Path(os.path.sep)
    root = data.pop("workspace_root", None)
    root = resolved(root, base) if isinstance(root, str) and root.strip() else None
    if within(root):
        base = root
        data["workspace_root"] = str(root)
    mode = take("workspace_access_mode", "workspaceAccessMode")
    if mode is not None:
        mode = str(mode).strip().lower()
        data["workspace_access_mode"] = mode if mode in ("workspace_only", "workspace_or_allowed") else "workspace_only"
    allowed = take("workspace_allowed_paths", "workspaceAllowedPaths")
    kept = [str(path) for path in (resolved(p, base) for p in _path_list(allowed)) if within(path)]
    if kept:
        data["workspace_allowed_paths"] = kept if isinstance(allowed, list) else "\n".join(kept)
    ignored = _path_list(take("workspace_ignored_paths", "workspaceIgnoredPaths"))
    if ignored:
        data["workspace_ignored_paths"] = "\n".join(ignored)
    return data


def _media_items(raw: Any) -> List[Any]:
    """The usable media references in `raw`: paths, and objects naming an artifact."""
    items = []
    for item in raw if isinstance(raw, (list, tuple)) else ():
        if isinstance(item, str) and item.strip():
            items.append(item.strip())
        elif isinstance(item, dict) and any(isinstance(item.get(k), str) and item[k].strip()
                                            for k in ("$artifact", "artifact_id")):
            items.append(dict(item))
    return items


def _media_in_context(input_data: Dict[str, Any]) -> Dict[str, Any]:
    """Gather media a client attached beside the inputs (`attachments`, `media`) or on the context's
    messages into `context.attachments`, where the runtime's agents and LLM nodes read them (else the
    model never sees them), once each, as the original does; a valid `context.attachments` is kept."""
    context = dict(input_data["context"]) if isinstance(input_data.get("context"), dict) else None
    found: List[Any] = []
    if context is not None:
        found += _media_items(context.get("attachments")) + _media_items(context.get("media"))
        for message in context.get("messages") if isinstance(context.get("messages"), list) else ():
            if isinstance(message, dict):
                found += _media_items(message.get("attachments")) + _media_items(message.get("media"))
    found += _media_items(input_data.get("attachments")) + _media_items(input_data.get("media"))
    if not found:
        return input_data
    unique, seen = [], set()
    for item in found:
        key = ("path", item) if isinstance(item, str) else (
            "artifact", str(item.get("$artifact") or item.get("artifact_id")).strip())
        if key not in seen:
            seen.add(key)
            unique.append(item)
    context = context if context is not None else {}
    if not _media_items(context.get("attachments")):
        context["attachments"] = unique
    return {**input_data, "context": context}


class Gateway:
    """The service every front end drives: start runs, accept and apply commands, tick runs.

    Owns the stores, the workflow host and one `Runtime`. Command application is exactly-once
    on SQLite: a command's effect, its outcome row and the cursor advance commit together.
    """

    def __init__(self, config: Config, stores: Optional[Stores] = None) -> None:
        self.config = config
        self.stores = stores or open_stores(config)
        self.host = WorkflowHost(self.stores, flows_dir=config.flows_dir, source=config.workflow_source,
                                 llm_default=(config.provider, config.model))
        # The runtime writes through a unit of work, so each step's writes commit together (see `tick`).
        self.uow = UnitOfWork(self.stores.runs, self.stores.ledger)
        self.knowledge_graph = TripleStoreHandle(Path(config.data_dir) / "abstractmemory" / "kg.sqlite3")
        self.llm = (LLMEffects(config, self.host, artifact_store=self.stores.artifacts, run_store=self.uow.runs)
                    if self.host.llm_available else None)
        from abstractruntime.core.policy import RetryPolicy

        # Model calls are tried `llm_attempts` times (the runtime records each attempt); a tool call the
        # gateway runs itself is not repeated: its first attempt's side effects may have happened.
        self.runtime = _runtime_type()(run_store=self.uow.runs, ledger_store=self.uow.ledger,
                                       artifact_store=self.stores.artifacts, workflow_registry=self.host,
                                       effect_policy=RetryPolicy(llm_max_attempts=config.llm_attempts,
                                                                 tool_max_attempts=1),
                                       effect_handlers={**self.knowledge_graph.effect_handlers(self.uow.runs),
                                                        **(self.llm.handlers if self.llm else {})})
        if self.llm is not None:
            self.runtime.set_tool_executor_for_resume(self.llm.resume_tools)
            self.llm.before_call = self._publish_before_call
        self.host.reload()
        self._last_lazy_reload = 0.0
        self._stripes = [threading.Lock() for _ in range(64)]
        self.inbox = CommandInbox(self)

    def close(self) -> None:
        self.knowledge_graph.close()
        self.stores.close()

    def wake_runner(self) -> None:
        self.stores.db.signals.bump((COMMANDS_TOPIC,))

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, *, bundle_id: Optional[str] = None, bundle_version: Optional[str] = None,
                  flow_id: Optional[str] = None, input_data: Optional[Dict[str, Any]] = None,
                  session_id: Optional[str] = None) -> str:
        """Create a RUNNING run (durable before this returns); the runner executes it."""
        workflow_id = self.host.resolve(bundle_id=bundle_id, bundle_version=bundle_version, flow_id=flow_id)
        spec = self.host.startable_spec(workflow_id)
        run_vars = _media_in_context(dict(input_data or {}))
        if self.config.tool_mode != "local":  # tools the gateway does not run: the client gets no say
            roots = [Path(self.config.workspace_dir)] if self.config.workspace_dir else []
            run_vars = _workspace_scope_within(run_vars, roots + list(self.config.workspace_mounts.values()))
        if not run_vars.get("workspace_root"):  # the run's own; the runtime's tools make it when they first need it
            run_vars["workspace_root"] = str(Path(self.config.data_dir) / "workspaces" / uuid.uuid4().hex)
        return self._start(spec, run_vars, session_id)

    def _start(self, spec: Any, run_vars: Dict[str, Any], session_id: Optional[str]) -> str:
        session = (session_id or "").strip() or None
        with self.stores.db.transaction():
            run_id = self.runtime.start(workflow=spec, vars=run_vars, actor_id=ACTOR_ID, session_id=session)
            if session is None:  # like the original gateway, a run without a session is its own session
                self.stores.runs.adopt_own_session(run_id)
            else:  # the session's attachment and memory owner, as the original creates it
                ensure_session_memory_run(self.stores.runs, session)
            self._persist_snapshot(run_id, spec.workflow_id)
        self.wake_runner()
        return run_id

    def _persist_snapshot(self, run_id: str, workflow_id: str) -> None:
        """Keep the flow a run started from with the run (history bundles replay from it, as on the original)."""
        from abstractruntime import persist_workflow_snapshot

        flow = self.host.catalog.flows.get(workflow_id)
        if flow is None or workflow_id.startswith(SCHEDULE_PREFIX):
            return
        ref, _, flow_id = workflow_id.rpartition(":")
        bundle_id, _, version = ref.partition("@")
        bundle = self.host.catalog.bundles.get(bundle_id, {}).get(version)
        if bundle is not None:  # the copy that ran, as the original keeps it: ids namespaced like the run's
            flow = _namespace_flow(flow, bundle, flow_id, bundle.flows)
        persist_workflow_snapshot(run_store=self.stores.runs, artifact_store=self.stores.artifacts, run_id=run_id,
                                  workflow_id=workflow_id, format="visualflow_json",
                                  snapshot={"kind": "visualflow_json", "bundle_ref": ref or None,
                                            "flow_id": flow_id, "visualflow": flow})

    def schedule_run(self, *, bundle_id: Optional[str], flow_id: Optional[str], bundle_version: Optional[str] = None,
                     input_data: Optional[Dict[str, Any]] = None, start_at: Optional[str] = None,
                     interval: Optional[str] = None, repeat_count: Optional[int] = None,
                     repeat_until: Optional[str] = None, share_context: bool = True,
                     session_id: Optional[str] = None) -> str:
        """Start a scheduled parent run that executes the target flow as child runs on a timetable."""
        if not (bundle_id or "").strip():
            raise GatewayError("bundle_id is required", code="bundle_id_required")
        if not (flow_id or "").strip():
            raise GatewayError("flow_id is required", code="flow_id_required")
        target = self.host.resolve(bundle_id=bundle_id, bundle_version=bundle_version, flow_id=flow_id)
        self.host.startable_spec(target)
        definition = schedule_definition(target, start_at=start_at, interval=interval, repeat_count=repeat_count,
                                         repeat_until=repeat_until, share_context=share_context,
                                         min_interval_s=self.config.schedule_min_interval_s)
        spec = self.host.register_schedule(f"{SCHEDULE_PREFIX}{uuid.uuid4()}", definition)
        return self._start(spec, {"vars": dict(input_data or {}), "_meta": {"schedule": definition}}, session_id)

    def load_run(self, run_id: str) -> RunState:
        state = self.stores.runs.load(run_id)
        if state is None:
            raise run_not_found(run_id)
        return state

    def live_tree_ids(self, run_id: str) -> List[str]:
        """`run_id` and those of its descendants that have not finished, nearest first (no state is loaded).

        A pause, resume or cancel leaves finished runs as they are, and a schedule's finished children
        grow by the thousand a day: walking, locking and loading each of them made such a command
        slower with every execution (20 s at 150,000), holding the runs' locks meanwhile. So the walk
        goes up from each live run that has a parent instead, to see whether `run_id` is above it."""
        if not self.stores.runs.exists(run_id):
            return []
        runs = self.stores.runs
        parents: Dict[str, Optional[str]] = dict(runs.live_children())
        depth: Dict[str, Optional[int]] = {run_id: 0}  # distance below run_id; None: not below it
        for live in parents:
            path, current = [], live
            while current not in depth and current is not None and len(path) <= MAX_SUBFLOW_DEPTH:
                path.append(current)
                current = parents[current] if current in parents else runs.parent_id(current)
            base = depth.get(current) if current is not None else None
            for steps, rid in enumerate(reversed(path), 1):
                depth[rid] = None if base is None else base + steps
        below = sorted((d, rid) for rid, d in depth.items() if d and rid in parents)
        return [run_id, *(rid for _, rid in below)]

    def run_tree_ids(self, run_id: str, limit: Optional[int] = None) -> List[str]:
        """`run_id` and its descendants' ids, breadth first (no state is loaded); with `limit`, the first
        `limit` of them, each run's newest children first (a schedule's latest executions)."""
        if not self.stores.runs.exists(run_id):
            return []
        out, queue = [run_id], [run_id]
        while queue and (limit is None or len(out) < limit):
            children = self.stores.runs.child_ids(queue.pop(0))
            if limit is not None:
                children = children[::-1][:limit - len(out)]
            out.extend(children)
            queue.extend(children)
        return out

    # -- observer: LLM answers grounded on a run's ledger ----------------------------------------------

    def observer_model(self, run: RunState, provider: Optional[str], model: Optional[str]) -> Tuple[str, str]:
        """The (provider, model) an observer request uses: its own, else the run's workflow default."""
        if self.llm is None:
            raise Unprocessable(f"Observer answers need the LLM integration; install the '{LLM_EXTRA}' extra "
                                "(pip install 'abstractgateway[llm]')", code="llm_extra_required")
        default = self.host.default_llm(run.workflow_id) or ("", "")
        chosen = ((provider or "").strip().lower() or default[0], (model or "").strip() or default[1])
        if not all(chosen):
            raise Unprocessable(f"No provider or model for this request: {LLM_SETTINGS_HINT}",
                                code="llm_not_configured")
        return chosen

    OBSERVER_RUNS_MAX = 50  # runs a digest describes: the run and its nearest, newest descendants

    def run_digest(self, run_id: str, include_subruns: bool = True) -> Dict[str, Any]:
        """What a model needs to know about a run (and its subruns): status, prompt, and slimmed ledger records."""
        run = self.load_run(run_id)
        runs: Dict[str, Any] = {}
        # A bounded prompt from a bounded read: a schedule that fired for months has a million subruns.
        for rid in self.run_tree_ids(run_id, self.OBSERVER_RUNS_MAX) if include_subruns else [run_id]:
            records = self.stores.ledger.list(rid)
            state = self.stores.runs.load(rid)
            runs[rid] = {"workflow_id": state.workflow_id if state else None,
                         "status": _enum_value(state.status) if state else None,
                         "error": state.error if state else None, "ledger_len": len(records),
                         "records": [_slim_record(r) for r in (records if len(records) <= 120
                                                                else records[:30] + records[-90:])]}
        prompt = run.vars.get("prompt") if isinstance(run.vars, dict) else None
        return {"run_id": run_id, "workflow_id": run.workflow_id, "status": _enum_value(run.status),
                "prompt": prompt if isinstance(prompt, str) else None, "runs": runs}

    def _observer_record(self, run: RunState, name: str, payload: Dict[str, Any]) -> None:
        """Append an `abstract.*` observer event to the run's ledger (as the original gateway records them)."""
        from abstractruntime import Effect, EffectType

        effect = Effect(type=EffectType.EMIT_EVENT, payload={"name": name, "scope": "run", "run_id": run.run_id,
                                                             "payload": payload})
        record = StepRecord.start(run=run, node_id="observer", effect=effect,
                                  idempotency_key=f"observer:{name.split('.')[-1]}:{uuid.uuid4().hex}")
        self.stores.ledger.append(record.finish_success({"emitted": True, "name": name, "payload": payload}))

    def _observer_answer(self, provider: str, model: str, system_prompt: str, messages: List[Dict[str, Any]]) -> str:
        try:
            return self.llm.generate(provider=provider, model=model, system_prompt=system_prompt, messages=messages)
        except Exception as exc:  # noqa: BLE001 - any provider failure is the provider's, reported as such
            raise GatewayError(f"The model did not answer ({provider}/{model}): {type(exc).__name__}: {exc}",
                               code="llm_failed") from None

    def summarize_run(self, run_id: str, *, provider: Optional[str] = None, model: Optional[str] = None,
                      include_subruns: bool = True) -> Dict[str, Any]:
        """Ask the model for a short summary of what the run did; append it as an `abstract.summary` record."""
        run = self.load_run(run_id)
        provider, model = self.observer_model(run, provider, model)
        digest = self.run_digest(run_id, include_subruns)
        text = self._observer_answer(provider, model, OBSERVER_SUMMARY_PROMPT,
                                     [{"role": "user", "content": _clip(_json_dumps(digest), 180_000)}])
        generated_at = utc_now_iso()
        self._observer_record(run, "abstract.summary", {
            "text": text, "generated_at": generated_at, "provider": provider, "model": model,
            "source": {"run_id": run_id, "include_subruns": include_subruns,
                       "ledger_len_by_run": {rid: r["ledger_len"] for rid, r in digest["runs"].items()}}})
        return {"ok": True, "run_id": run_id, "provider": provider, "model": model, "generated_at": generated_at,
                "summary": text}

    def chat_about_run(self, run_id: str, messages: List[Dict[str, Any]], *, provider: Optional[str] = None,
                       model: Optional[str] = None, include_subruns: bool = True,
                       persist: bool = False) -> Dict[str, Any]:
        """Answer the chat's last question from the run's ledger only (the run is not touched); with
        `persist`, the question and answer are appended as an `abstract.chat` record."""
        run = self.load_run(run_id)
        provider, model = self.observer_model(run, provider, model)
        # As the original reads a chat: roles in any case, other roles and empty or non-text contents
        # dropped; no messages at all asks about the run itself.
        turns = [{"role": role, "content": _clip(m["content"].strip(), 12_000)} for m in messages
                 if isinstance(m, dict) and (role := str(m.get("role") or "").strip().lower()) in ("user", "assistant")
                 and isinstance(m.get("content"), str) and m["content"].strip()]
        context = _clip(_json_dumps(self.run_digest(run_id, include_subruns)), 180_000)
        answer = self._observer_answer(provider, model, OBSERVER_CHAT_PROMPT,
                                       [{"role": "user", "content": f"RUN_CONTEXT:\n{context}"}, *turns])
        generated_at = utc_now_iso()
        if persist:
            self._observer_record(run, "abstract.chat", {
                "generated_at": generated_at, "provider": provider, "model": model,
                "question": next((t["content"] for t in reversed(turns) if t["role"] == "user"), ""),
                "answer": answer, "source": {"run_id": run_id, "include_subruns": include_subruns}})
        return {"ok": True, "run_id": run_id, "provider": provider, "model": model, "generated_at": generated_at,
                "answer": answer}

    # -- commands ----------------------------------------------------------------------------

    def submit_command(self, *, command_id: str, run_id: str, type: str, payload: Optional[Dict[str, Any]] = None,
                       ts: Optional[str] = None, client_id: Optional[str] = None) -> CommandAppendResult:
        """Append to the durable inbox (idempotent on `command_id`); the runner applies it (see `CommandInbox`)."""
        return self.inbox.submit(command_id=command_id, run_id=run_id, type=type, payload=payload, ts=ts,
                                 client_id=client_id)

    def command_status(self, command_id: str, record: Optional[CommandRecord] = None) -> Dict[str, Any]:
        return self.inbox.status(command_id, record)

    def apply_pending_commands(self, lease: Optional[LeaseToken] = None) -> int:
        return self.inbox.apply_pending(lease)

    def check_lease(self, lease: Optional[LeaseToken]) -> None:
        """Inside a write transaction: raise `LeaseLost` unless `lease` (if given) is still held."""
        if lease is not None and not self.stores.leases.holds(RUNNER_LEASE, lease):
            raise LeaseLost(f"runner {lease.owner} no longer holds the lease (epoch {lease.epoch})")

    @contextmanager
    def runs_locked(self, run_ids: Iterable[str]) -> Iterator[None]:
        """Hold the per-run locks of `run_ids` (striped, taken in order: no deadlock between holders).

        A tick and a command on the same run never interleave, so a tick cannot overwrite the
        cancel or pause that was applied while it ran. Take these before any transaction.
        """
        stripes = sorted({zlib.crc32(rid.encode()) % len(self._stripes) for rid in run_ids})
        for index in stripes:
            self._stripes[index].acquire()
        try:
            yield
        finally:
            for index in reversed(stripes):
                self._stripes[index].release()

    # -- ticks ------------------------------------------------------------------------------------

    def tick(self, run_id: str, lease: Optional[LeaseToken] = None) -> Optional[RunState]:
        """Advance one run by up to `tick_max_steps` steps; a run never stays RUNNING on an error.

        Each step is one `runtime.tick(max_steps=1)` whose store writes are collected in memory
        and committed in one lease-fenced transaction (`_commit_step`): a crash at any instant
        leaves whole steps or none, and no transaction or lock is held while a node runs. Quick
        steps share a commit (see `STEP_BATCH_S`); a step that took longer (a model call) ends one.
        """
        state = self.stores.runs.load(run_id)
        if state is None:
            return None
        spec = self.host.get(state.workflow_id) or self._reload_for(state.workflow_id)
        if spec is None or state.workflow_id in self.host.catalog.blocked:
            blocked = self.host.catalog.blocked.get(state.workflow_id)
            reason = blocked.detail if blocked else f"Workflow '{state.workflow_id}' is not loaded on this gateway"
            return self._fail_run(run_id, reason, lease) if _enum_value(state.status) == "running" else state
        state = self._run_steps(spec, run_id, lease)
        if state is not None and _enum_value(state.status) in TERMINAL_STATUSES:
            self.resume_parent_of(state, lease)
        return state

    def _run_steps(self, spec: Any, run_id: str, lease: Optional[LeaseToken]) -> Optional[RunState]:
        """The step loop of `tick`: run, collect, commit (quick steps together), stop when the run can't go on."""
        writes: Optional[StepWrites] = None
        batch_started = 0.0
        state: Optional[RunState] = None
        for _ in range(self.config.tick_max_steps):
            writes = writes if writes is not None else StepWrites(mid_step_commits=True, lease=lease)
            if not writes.ledger and not writes.runs:
                batch_started = time.monotonic()
            try:
                state, failure = self._run_one_step(spec, run_id, writes)
            except StorageError:
                if writes.ledger or writes.runs:  # the steps before it are done: keep them if the disk lets us
                    self._commit_step(run_id, writes, lease)
                raise
            if failure is None and _continues(state) and time.monotonic() - batch_started < STEP_BATCH_S:
                continue  # a quick step: committed with the next ones (whole steps, still atomically)
            committed = self._commit_step(run_id, writes, lease)
            writes = None
            if not committed:
                return self.stores.runs.load(run_id)  # changed meanwhile (pause, cancel): its state wins
            if failure is not None:
                return self._fail_run(run_id, f"{type(failure).__name__}: {failure}", lease)
            if not _continues(state):
                return state
        if writes is not None and not self._commit_step(run_id, writes, lease):  # tick_max_steps ran out
            return self.stores.runs.load(run_id)
        return state

    def _run_one_step(self, spec: Any, run_id: str, writes: StepWrites) -> Tuple[Any, Optional[Exception]]:
        """One `runtime.tick(max_steps=1)` collected into `writes`; a failing step's writes are rolled back."""
        with self.uow.collect(writes):
            mark = writes.mark()
            try:
                return self.runtime.tick(workflow=spec, run_id=run_id, max_steps=1), None
            except (StorageError, *_STORAGE_FAILURES) as exc:  # the disk's fault, not the run's: retried
                writes.rollback(mark)
                raise storage_error(exc) from exc
            except Exception as exc:  # noqa: BLE001 - the run is failed with the reason, the runner goes on
                writes.rollback(mark)
                return None, exc

    def _commit_step(self, run_id: str, writes: StepWrites, lease: Optional[LeaseToken]) -> bool:
        """Commit one step's writes atomically, fenced by `lease`; False if the run changed meanwhile.

        A command (pause, cancel) may land while the step's node runs. Then the step's checkpoint
        is dropped so the command wins, and only its completed model and tool calls are kept (with
        their `started` records): the runtime reuses them by idempotency key when the run goes on,
        so an answer that was paid for is not asked for again and no record is duplicated.
        """
        def _write(_conn: apsw.Connection) -> bool:
            self.check_lease(lease)
            changed = self._changed_since_read(run_id, writes)
            records = writes.ledger if not changed else _paid_calls(run_id, writes.ledger)
            for rid, text in records:
                self.stores.ledger.append_json(rid, text)
            if not changed:
                for row in writes.runs.values():
                    self.stores.runs.save_row(row)
            return not changed

        if not writes.ledger and not writes.runs:
            return True
        with self.runs_locked([run_id]):
            return self.stores.db.write(_write)

    def _changed_since_read(self, run_id: str, writes: StepWrites) -> bool:
        """Inside the step's transaction: whether a run the step read (or found missing) and then saved,
        or the stepped run itself, is no longer stored as the step read it (a command landed)."""
        return any(self.stores.runs.load_json(rid) != text
                   for rid, text in writes.base.items() if rid == run_id or rid in writes.runs)

    def _publish_before_call(self, run: RunState) -> None:
        """Commit what a step has written so far, ending with its call's `started` record, before a
        model or tool call (a local model may take minutes): clients see which call is running and
        where the run stands, as on the original, instead of nothing until it returns.

        Only whole steps come before that record (quick steps batched before this one), so a crash
        during the call leaves the run as after those steps, with the `started` record of a call
        that was cut short: run again, the step writes the same record, which is then not appended
        twice. If a command changed the run meanwhile, nothing is committed here (`_commit_step`
        settles it when the call returns), nor when the commit fails (the step's own commit, after
        the call, then writes it all, or fails and is retried, as always)."""
        writes = self.uow.current()
        if (writes is None or not writes.mid_step_commits  # (a compaction's writes commit with its command)
                or not writes.ledger or writes.ledger[-1][0] != run.run_id):
            return

        def _write(_conn: apsw.Connection) -> bool:
            self.check_lease(writes.lease)
            if self._changed_since_read(run.run_id, writes):
                return False
            # Published before a crash, and run again: this step's records of the attempts made then (a
            # model call is tried up to `llm_attempts` times, two records each) are already stored.
            count = self.stores.ledger.count(run.run_id)
            window = 2 * self.config.llm_attempts + 2
            stored = {_attempt_of(json.loads(text)) for text in
                      self.stores.ledger.page_json(run.run_id, max(0, count - window), window)} if count else set()
            records = [(rid, text) for rid, text in writes.ledger
                       if rid != run.run_id or _attempt_of(json.loads(text)) not in stored - {None}]
            for rid, text in records:
                self.stores.ledger.append_json(rid, text)
            for row in writes.runs.values():
                self.stores.runs.save_row(row)
            return True

        try:
            with self.runs_locked([run.run_id]):
                if not self.stores.db.write(_write):
                    return
        except (StorageError, *_STORAGE_FAILURES) as exc:  # nothing was written
            # Raised here, inside the runtime's effect handler, it would fail the run's call; left in
            # `writes`, everything commits (or the same failure is retried) with the step. (A lost
            # lease is raised: the call is not made, and the step's commit is fenced all the same.)
            _log(f"showing the call of {run.run_id} failed: {type(exc).__name__}: {exc}")
            return
        for rid in writes.runs:  # as now stored (the file backend writes its own text, not the row's)
            writes.base[rid] = self.stores.runs.load_json(rid)
        writes.published += len(writes.ledger)
        writes.ledger.clear()
        writes.runs.clear()

    def _reload_for(self, workflow_id: str) -> Any:
        """Reload bundles once (at most every 2 s) for a workflow another process may have added."""
        now = time.monotonic()
        if now - self._last_lazy_reload < 2.0:
            return None
        self._last_lazy_reload = now
        self.host.reload()
        return self.host.get(workflow_id)

    def _fail_run(self, run_id: str, reason: str, lease: Optional[LeaseToken]) -> Optional[RunState]:
        """Fail a RUNNING run with a ledger record saying why (one fenced transaction)."""
        with self.runs_locked([run_id]), self.stores.db.transaction():
            self.check_lease(lease)
            state = self.stores.runs.load(run_id)
            if state is None or _enum_value(state.status) != "running":
                return state  # a command got there first (cancel, pause): it wins
            record = StepRecord.start(run=state, node_id=state.current_node or "", effect=None,
                                      idempotency_key=f"system:tick_exception:{run_id}")
            record.finish_failure(reason)
            state.status = RunStatus.FAILED
            state.error = reason
            state.waiting = None
            state.updated_at = utc_now_iso()
            self.stores.ledger.append(record)
            self.stores.runs.save(state)
        return state

    def resume_parent_of(self, child: RunState, lease: Optional[LeaseToken] = None) -> None:
        """Resume the parent waiting on `child` (now terminal) with the child's outcome."""
        if not child.parent_run_id:
            return
        wait_key = f"subworkflow:{child.run_id}"
        for parent_id in self.stores.runs.ids_waiting_on(wait_key):
            with self.runs_locked([parent_id]), self.stores.db.transaction():
                self.check_lease(lease)
                parent = self.stores.runs.load(parent_id)  # read under the lock
                if parent is None or parent.waiting is None or parent.waiting.wait_key != wait_key:
                    continue
                self._resume_parent_locked(parent, child, wait_key)

    def _resume_parent_locked(self, parent: RunState, child: RunState, wait_key: str) -> None:
        spec = self.host.get(parent.workflow_id)
        if spec is None or _is_paused(parent):
            return
        output = child.output if isinstance(child.output, dict) else {"result": child.output}
        payload: Dict[str, Any] = {"sub_run_id": child.run_id, "output": output}
        status = _enum_value(child.status)
        if status != "completed":
            payload.update(success=False, error=child.error, **({"cancelled": True} if status == "cancelled" else {}))
        self.runtime.resume(workflow=spec, run_id=parent.run_id, wait_key=wait_key, payload=payload, max_steps=0)
        self.wake_runner()

    def repair_subworkflow_parents(self, lease: Optional[LeaseToken] = None, limit: int = 2000) -> int:
        """Resume parents whose child ended while nobody was watching (e.g. across a restart)."""
        repaired = 0
        for parent in self.stores.runs.list_runs(status=RunStatus.WAITING, wait_reason=WaitReason.SUBWORKFLOW,
                                                 limit=limit):
            child_id = _awaited_child_id(parent)
            child = self.stores.runs.load(child_id) if child_id else None
            if child is not None and _enum_value(child.status) in TERMINAL_STATUSES:
                self.resume_parent_of(child, lease)
                repaired += 1
        return repaired

    def runnable_run_ids(self) -> List[str]:
        """RUNNING runs and due UNTIL waits, bounded by the scan limit."""
        return self.stores.runs.runnable_ids(now_iso=utc_now_iso(), limit=self.config.run_scan_limit)


OBSERVER_SUMMARY_PROMPT = (
    "You summarise a workflow run for its operator from a digest of its append-only ledger. First line: the "
    "outcome (success, failure, cancelled, waiting or unknown). Then 3 to 8 short bullets: what it did, notable "
    "files, commands and URLs, LLM and tool activity, problems (an LLM call without a response is one), and for "
    "a failed run the likely reason. Mention the original prompt. State only what the digest shows.")
OBSERVER_CHAT_PROMPT = (
    "You answer questions about one workflow run. RUN_CONTEXT is a digest of its append-only ledger. Answer the "
    "latest question from RUN_CONTEXT only; say so when it does not tell, and label any guess as a guess. Be "
    "brief. This chat is read-only: never suggest running tools.")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + " ...[clipped]"


def _slim_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """One ledger record cut down to what an observer model needs (prompts, answers, tool calls, errors)."""
    effect = record.get("effect") if isinstance(record.get("effect"), dict) else {}
    payload = effect.get("payload") if isinstance(effect.get("payload"), dict) else {}
    result = record.get("result")
    out: Dict[str, Any] = {"node_id": record.get("node_id"), "status": record.get("status"),
                           "effect": effect.get("type"), "at": record.get("ended_at") or record.get("started_at")}
    if record.get("error"):
        out["error"] = _clip(str(record["error"]), 400)
    if effect.get("type") == "llm_call":
        answer = result.get("content") if isinstance(result, dict) else result
        out.update(provider=payload.get("provider"),
                   model=payload.get("model") or (result.get("model") if isinstance(result, dict) else None),
                   prompt=_clip(str(payload.get("prompt") or ""), 2400),
                   response=_clip(str(answer or ""), 2400), missing_response=not answer)
    elif effect.get("type") == "tool_calls":
        out["tool_calls"] = [{"name": c.get("name"), "arguments": c.get("arguments")}
                             for c in payload.get("tool_calls") or [] if isinstance(c, dict)][:20]
        if isinstance(result, dict) and isinstance(result.get("results"), list):
            out["results"] = [{"name": r.get("name"), "success": r.get("success"),
                               "output": _clip(_json_dumps(r.get("output")), 4000), "error": r.get("error")}
                              for r in result["results"][:20] if isinstance(r, dict)]
    elif payload or result is not None:
        out["detail"] = _clip(_json_dumps({"payload": payload, "result": result}), 1500)
    return out


# Quick steps (transitions, zero-length waits) are committed together until this much time has passed
# since the first of them: one commit (one fsync) for many steps, each still whole or absent.
STEP_BATCH_S = 0.02


def _unblocked_by(run: RunState) -> List[str]:
    """Runs a tick that left `run` waiting on a child, or ended it, may have made runnable: its new child
    run, or its parent (resumed by `resume_parent_of`). The runner ticks them at once instead of at its
    next poll."""
    if _enum_value(run.status) in TERMINAL_STATUSES:
        return [run.parent_run_id] if run.parent_run_id else []
    child_id = _awaited_child_id(run)
    return [child_id] if child_id else []


def _awaited_child_id(run: RunState) -> Optional[str]:
    """The child run `run` waits on (its wait key is `subworkflow:<child id>`), if it waits on one."""
    key = (run.waiting.wait_key or "") if run.waiting is not None else ""
    return key.split(":", 1)[1] or None if key.startswith("subworkflow:") else None


def _continues(run: RunState) -> bool:
    """True when the run can take its next step right away (running, or a wait that is already due)."""
    status = _enum_value(run.status)
    if status == "running":
        return True
    waiting = run.waiting
    return (status == "waiting" and waiting is not None and _enum_value(waiting.reason) == "until"
            and bool(waiting.until) and str(waiting.until) <= utc_now_iso() and not _is_paused(run))


# Effects whose whole outcome is their result (nothing else written to the stores): a completed
# record of one can stand alone, and the runtime reuses its result instead of paying again.
_REUSABLE_EFFECTS = frozenset({"llm_call", "tool_calls"})


def _attempt_of(record: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
    """What names one record of one attempt of an effect (None for a record of no effect attempt)."""
    key = record.get("idempotency_key")
    return (key, record.get("status"), record.get("attempt"), record.get("node_id")) if key else None


def _paid_calls(run_id: str, ledger: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The records of `run_id`'s completed model and tool calls, each with its `started` record (a
    client pairs them) and those of its failed attempts, in order: what is kept of a step whose
    checkpoint is dropped (`_commit_step`)."""
    records = [(rid, text, json.loads(text)) for rid, text in ledger if rid == run_id]
    paid = {r.get("idempotency_key") for _, _, r in records
            if r.get("status") == "completed" and (r.get("effect") or {}).get("type") in _REUSABLE_EFFECTS
            and not str(r.get("idempotency_key") or "").startswith("system:")}
    return [(rid, text) for rid, text, r in records
            if r.get("idempotency_key") in paid and r.get("status") in ("started", "completed", "failed")]


def _check_tool_answer(run_id: str, details: Dict[str, Any], body: Dict[str, Any]) -> None:
    """Refuse tool results for calls the current approval wait does not have.

    Each tool step waits on a key of its own (`LLMEffects._tool_calls`), but an answer that names no
    key, or a wait made by an older version (whose key the agent's next tool step reused), would
    otherwise take a late duplicate answer meant for the step before; `runtime_call_id` names one
    step's call. A bare `{"approved": ...}` answer names the calls it decides in `runtime_call_ids`.
    """
    pending = {str(tc.get("runtime_call_id")) for tc in details.get("tool_calls") or [] if isinstance(tc, dict)}
    results = body.get("results") if isinstance(body.get("results"), list) else []
    named = body.get("runtime_call_ids") if isinstance(body.get("runtime_call_ids"), list) else []
    answered = [r.get("runtime_call_id") for r in results if isinstance(r, dict)] + named
    for call in answered:
        if call and str(call) not in pending:
            raise Conflict(f"Run '{run_id}' has no pending tool call '{str(call)[:200]}': that call was already "
                           "answered", code="tool_call_not_pending")


class Runner:
    """Applies commands and ticks runs on a thread pool, while it holds the runner lease.

    Wakes at once on in-process work (new command, new run), at the due time of the earliest
    timer wait it knows (a heap, no scanning), and polls every `poll_s` for work written by
    another process. A tick that ends with its run able to go on (steps ran out, a due wait),
    or that was asked for again while it ran, is resubmitted directly: a tick's end never
    costs a scan. Only the lease holder ticks, and every write it makes is
    fenced by its lease token, so a holder that stalled past its lease writes nothing after
    another runner took over; it stands down when it notices.
    """

    LEASE = RUNNER_LEASE

    def __init__(self, gateway: Gateway) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.gateway = gateway
        self.config = gateway.config
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(max_workers=self.config.tick_workers + self.config.llm_concurrency,
                                        thread_name_prefix="tick")  # a tick blocked on a model holds a thread
        self._in_flight: set = set()
        self._again: set = set()  # in-flight runs submitted again meanwhile: ticked once more after
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as ticks end (`stop` waits for none in flight)
        self._stop = threading.Event()
        self._loop_ended = threading.Event()  # set (and `_idle` notified) as `_loop` returns: `stop` waits on it
        self._heartbeat_stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._timers: List[Tuple[float, str]] = []  # heap of (due epoch seconds, run_id)
        self.lease: Optional[LeaseToken] = None
        self.last_error: Optional[str] = None

    @property
    def has_lease(self) -> bool:
        return self.lease is not None

    def start(self) -> "Runner":
        self._renew_lease()
        for target, name in ((self._heartbeat, "runner-lease"), (self._loop, "runner")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    STOP_LIMIT_S = 60.0  # the longest a stop waits for work that is not a model wait (a tool, a subflow)

    def stop(self, timeout: float = 5.0) -> int:
        """Stop taking work, let in-flight ticks and commands finish, release the lease; return how
        many are left behind.

        The lease is renewed while they finish, so none loses its commit and no other runner takes
        over meanwhile. A step waiting on a model (bounded only by `llm_timeout_s`) is left behind
        once `timeout` has passed and only such steps are left; anything else is waited for up to
        `STOP_LIMIT_S`. What is left behind commits nothing once the lease is released: its step runs
        again on the next start, as after a crash, and the caller may exit at once.
        """
        self._stop.set()
        self.gateway.wake_runner()
        started = time.monotonic()
        self._pool.shutdown(wait=False, cancel_futures=True)  # queued ticks never start (see `_submit`)
        loop = [t for t in self._threads if t.name == "runner"]

        def busy() -> int:
            return len(self._in_flight) + (1 if loop and not self._loop_ended.is_set() else 0)

        while True:
            with self._idle:
                self._idle.wait_for(lambda: not busy(), 0.1)
                left = busy()
            waiting = self.gateway.llm.waiting if self.gateway.llm is not None else 0
            spent = time.monotonic() - started
            if not left or (spent >= timeout and left <= waiting) or spent >= self.STOP_LIMIT_S:
                break
        self._heartbeat_stop.set()
        for thread in self._threads:
            if thread not in loop:
                thread.join(1.0)
        if left:
            _log(f"runner {self.owner}: stopping with {left} step(s) unfinished ({min(left, waiting)} waiting on "
                 "a model); they are not committed and run again on the next start")
        if self.lease is not None:
            try:
                self.gateway.stores.leases.release(self.LEASE, self.owner)
            except StorageError as exc:
                _log(f"lease release failed: {exc.detail}")
            self.lease = None
        return left

    def _renew_lease(self) -> None:
        try:
            token = self.gateway.stores.leases.acquire(self.LEASE, self.owner, self.config.lease_ttl_s)
        except Exception as exc:  # noqa: BLE001 - out of memory too: the heartbeat thread must live on
            _log(f"lease renewal failed: {type(exc).__name__}: {exc}")
            token = None
        if token is not None and token != self.lease:
            self.gateway.wake_runner()  # just took over: look for work now
        self.lease = token

    def _stand_down(self, lease: Optional[LeaseToken], exc: LeaseLost) -> None:
        with self._lock:
            if self.lease is not None and self.lease == lease:
                self.lease = None
                self._timers.clear()  # the new holder finds these runs by its own scan
                _log(f"runner {self.owner}: {exc}; standing by")

    def _heartbeat(self) -> None:
        """Renew the lease on its own thread, so a long tick or command never lets it lapse (nor the
        ones a stop lets finish: it has its own stop, set once they have)."""
        while not self._heartbeat_stop.wait(self.config.lease_ttl_s / 3):
            self._renew_lease()

    def _loop(self) -> None:
        try:
            self._loop_until_stopped()
        finally:
            with self._idle:
                self._loop_ended.set()
                self._idle.notify_all()

    def _loop_until_stopped(self) -> None:
        signals = self.gateway.stores.db.signals
        last_repair = 0.0
        with signals.subscribe(COMMANDS_TOPIC) as work:
            while not self._stop.is_set():
                seen = work.version
                lease = self.lease
                try:
                    if lease is not None:
                        self._apply_commands(lease, work)
                        if time.monotonic() - last_repair > 5.0:
                            self.gateway.repair_subworkflow_parents(lease)
                            last_repair = time.monotonic()
                        for run_id in self.gateway.runnable_run_ids():
                            self._submit(run_id, lease)
                        self._submit_due_timers(lease)
                    self.last_error = None
                except LeaseLost as exc:
                    self._stand_down(lease, exc)
                except Exception as exc:  # noqa: BLE001 - keep the loop alive, report on /api/health
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    _log(f"runner loop error: {self.last_error}")
                work.wait(seen, self._next_wait())

    def _apply_commands(self, lease: LeaseToken, work: Any) -> None:
        """Apply pending commands until none is left. When the inbox was signalled during a batch
        (new commands, mostly), wait `COMMAND_GATHER_S` before the next, so one transaction applies
        several; a command that comes alone is applied at once."""
        while not self._stop.is_set():
            before = work.version
            if not self.gateway.apply_pending_commands(lease):
                return
            if work.version != before:
                self._stop.wait(COMMAND_GATHER_S)

    def _next_wait(self) -> float:
        """Sleep until the poll interval passes or the earliest known timer is due."""
        with self._lock:
            due = self._timers[0][0] if self._timers and self.lease is not None else None
        wait = self.config.poll_s
        return wait if due is None else max(0.0, min(wait, due - time.time()))

    def _submit_due_timers(self, lease: LeaseToken) -> None:
        import heapq

        now, due = time.time(), []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[1])
        for run_id in due:
            self._submit(run_id, lease)

    def _note_timer(self, state: Optional[RunState]) -> None:
        """Remember when a run waiting until a time is due, so the loop wakes for it then."""
        import heapq

        waiting = state.waiting if state is not None else None
        if waiting is None or _enum_value(waiting.reason) != "until" or not waiting.until:
            return
        instant = _as_utc(waiting.until)
        if instant is None:
            return
        due = instant.timestamp()
        with self._lock:
            heapq.heappush(self._timers, (due, state.run_id))
            earliest = self._timers[0][1] == state.run_id
        if earliest:  # the loop sleeps until the timer it knew of: wake it to sleep no longer than this
            self.gateway.wake_runner()

    def _submit(self, run_id: str, lease: LeaseToken) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if run_id in self._in_flight:
                self._again.add(run_id)  # its tick may have read the run before what asked for this
                return
            self._in_flight.add(run_id)
        try:
            future = self._pool.submit(self._tick, run_id, lease)
        except RuntimeError:  # the pool was shut down meanwhile (stopping)
            self._settled(run_id)
            return
        future.add_done_callback(lambda f: self._settled(run_id) if f.cancelled() else None)

    def _settled(self, run_id: str) -> None:
        """A tick that will not run (cancelled in the queue by `stop`) is in flight no more."""
        with self._lock:
            self._in_flight.discard(run_id)
            self._again.discard(run_id)
            self._idle.notify_all()

    def _tick(self, run_id: str, lease: LeaseToken) -> None:
        goes_on = False
        state: Optional[RunState] = None
        try:
            if self.lease == lease and not self._stop.is_set():
                state = self.gateway.tick(run_id, lease)
                goes_on = state is not None and _continues(state) and not _is_paused(state)
                if not goes_on and not (state is not None and _is_paused(state)):  # a resume submits it again
                    self._note_timer(state)
        except LeaseLost as exc:
            self._stand_down(lease, exc)
        except Exception as exc:  # noqa: BLE001 - the run is found again by the next poll
            _log(f"tick of {run_id} failed: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._in_flight.discard(run_id)
                again = run_id in self._again
                self._again.discard(run_id)
                self._idle.notify_all()
            if again and not goes_on:
                goes_on = self._still_runnable(run_id)
            if goes_on and self.lease == lease:
                self._submit(run_id, lease)
            elif state is not None and self.lease == lease:
                for other in _unblocked_by(state):  # the child it started, or the parent it ended for
                    if self._still_runnable(other):
                        self._submit(other, lease)

    def _still_runnable(self, run_id: str) -> bool:
        """Whether a run asked for during its tick can go on now (read, not ticked: most have ended)."""
        try:
            state = self.gateway.stores.runs.load(run_id)
        except (apsw.Error, StorageError):
            return True  # the tick finds out (and reports) what is wrong
        return state is not None and _continues(state) and not _is_paused(state)


# -- thin-client services: workspace files, session attachments, reports, knowledge graph ----------

FILES_READ_MAX_LINES = 2_000  # lines one read returns; more is labelled as truncated
FILES_READ_MAX_BYTES = 120_000  # bytes one read returns (a minified file can be one huge line)
FILES_SCAN_MAX_BYTES = 16 * 1024 * 1024  # bytes a read or skim scans before it stops
FILES_SKIM_MAX_LINES = 200  # excerpts one skim returns
FILES_SKIM_SCAN_LINES = 200_000  # lines a skim considers
FILES_SKIM_EXCERPT = 240  # characters kept per skimmed line
FILES_INDEX_MAX = 50_000  # files one search looks at
FILES_INDEX_TTL_S = 5.0  # how long a search reuses the list of files it walked
_BINARY_PROBE = 8192
_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__"})


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: a non-UTF-8 file name, or a hostile JSON escape
        return False
    return True


class _LineScanner:
    """Lines of a binary file, each cut to `keep` bytes, stopping after `budget` bytes scanned.

    Never holds more than one (cut) line in memory, whatever the file looks like; `exhausted`
    tells the caller the budget ran out before the end of the file.
    """

    def __init__(self, fh: Any, keep: int, budget: int) -> None:
        self.fh, self.keep, self.budget = fh, keep, budget
        self.scanned = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[Tuple[bytes, bool]]:
        while True:
            if self.scanned >= self.budget:
                self.exhausted = bool(self.fh.read(1))
                return
            raw = self.fh.readline(self.keep)
            if not raw:
                return
            self.scanned += len(raw)
            cut = len(raw) == self.keep and not raw.endswith(b"\n")
            while cut and self.scanned < self.budget:  # skip the rest of an over-long line
                rest = self.fh.readline(65_536)
                self.scanned += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield raw.rstrip(b"\r\n"), cut


def _joined(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


class Workspace:
    """Read-only access to the operator's workspace: its root and mounts; every path is confined to one.

    A client names a file `rel/path` under the root (`ABSTRACTGATEWAY_WORKSPACE_DIR`), `mount/rel/path`
    in a mount, or by an absolute path inside either. The path is resolved with symlinks followed and
    must still lie inside the same directory afterwards, so neither `..`, an absolute path elsewhere,
    nor a symlink pointing out reaches another file. Like the original, a file that is missing or
    binary is reported inside `content`, not as an error.
    """

    def __init__(self, mounts: Dict[str, Path], root: str = "", private: Sequence[Path] = ()) -> None:
        self.mounts = {name: Path(os.path.realpath(path)) for name, path in mounts.items()}
        self.root = Path(os.path.realpath(Path(root).expanduser())) if str(root or "").strip() else None
        self.private = [Path(os.path.realpath(path)) for path in private]  # never read (the gateway's data)
        self._index_lock = threading.Lock()
        self._indexed: Optional[Tuple[float, List[Tuple[str, str, str, str]]]] = None

    def _private(self, path: Path) -> bool:
        return any(_is_within(path, private) for private in self.private)

    def _places(self) -> List[Tuple[str, Path]]:
        """(name, directory) of the mounts, then the root (named "": its files need no prefix)."""
        return [*self.mounts.items(), *([("", self.root)] if self.root is not None else [])]

    def resolve(self, raw_path: str) -> Tuple[Path, str]:
        """(real path, `mount/rel` name) of a client-supplied path; a 4xx GatewayError if it may not be read."""
        text = str(raw_path or "").strip()
        if text.startswith("@"):  # `@file` mentions
            text = text[1:].lstrip()
        if not text:
            raise GatewayError("path is required", code="validation_error")
        if "\x00" in text or not _is_utf8(text):
            raise GatewayError("path must be valid UTF-8 text without NUL characters", code="invalid_path")
        if not self.mounts and self.root is None:
            raise GatewayError("No workspace is configured on this gateway (ABSTRACTGATEWAY_WORKSPACE_DIR, "
                               "ABSTRACTGATEWAY_WORKSPACE_MOUNTS)", code="workspace_not_configured")
        text = text.replace("\\", "/")
        try:
            name, place, real = self._absolute(text) if text.startswith("/") else self._relative(text)
        except (OSError, ValueError):
            raise GatewayError("invalid path", code="invalid_path") from None
        if self._private(real):
            raise GatewayError("path is inside the gateway's own data directory", code="path_outside_workspace")
        relative = real.relative_to(place)
        if not name and relative.parts and relative.parts[0] in self.mounts:  # its name would read the mount
            raise GatewayError("path is under the workspace root where a mount of the same name is read instead",
                               code="path_outside_workspace")
        rel = relative.as_posix()
        return real, "/".join(part for part in (name, "" if rel == "." else rel) if part) or "."

    def _absolute(self, text: str) -> Tuple[str, Path, Path]:
        """(name, directory, real path) of an absolute path: it must lie inside the root or a mount."""
        real = Path(os.path.realpath(text))
        inside = [(name, place) for name, place in self._places() if _is_within(real, place)]
        if not inside:
            raise GatewayError("path is outside workspace roots", code="path_outside_workspace")
        name, place = max(inside, key=lambda item: len(str(item[1])))
        return name, place, real

    def _relative(self, text: str) -> Tuple[str, Path, Path]:
        """(name, directory, real path) of `mount/rel` or (with a root) `rel`, confined to its directory."""
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise GatewayError("path escapes workspace root", code="path_escape")
        if parts and parts[0] in self.mounts:
            name, place, parts = parts[0], self.mounts[parts[0]], parts[1:]
        elif self.root is not None:
            name, place = "", self.root
        else:
            raise GatewayError(f"path must start with a workspace mount name ({', '.join(sorted(self.mounts))})",
                               code="path_outside_workspace")
        real = Path(os.path.realpath(place.joinpath(*parts)))
        if not _is_within(real, place):  # a symlink pointing out of its directory
            raise GatewayError("path escapes workspace root", code="path_escape")
        return name, place, real

    def search(self, query: str, limit: int) -> List[Dict[str, Any]]:
        """Files whose path contains `query` (case-insensitive): name-prefix hits first, then shorter paths."""
        needle = query.strip().lower()
        if not needle:
            return []
        scored: List[Tuple[int, int, str, str, str]] = []
        for virtual, filename, name, full in self._index():
            lower_name = filename.lower()
            if lower_name.startswith(needle):
                score = 0
            elif needle in lower_name:
                score = 1
            elif needle in virtual.lower():
                score = 2
            else:
                continue
            scored.append((score, len(virtual), virtual, name, full))
        scored.sort()
        items = []
        for _score, _length, virtual, name, full in scored[:limit]:
            item: Dict[str, Any] = {"path": virtual, **({"mount": name} if name else {})}
            try:
                item["size_bytes"] = os.stat(full).st_size
            except OSError:  # removed since the walk
                pass
            items.append(item)
        return items

    def _index(self) -> List[Tuple[str, str, str, str]]:
        """(virtual path, file name, mount, real path) of the mounts' files, re-walked at most every few
        seconds: a client searches on each keystroke of an `@file` mention."""
        with self._index_lock:
            if self._indexed is not None and time.monotonic() - self._indexed[0] < FILES_INDEX_TTL_S:
                return self._indexed[1]
        files = list(itertools.islice(self._walk(), FILES_INDEX_MAX))
        with self._index_lock:
            self._indexed = (time.monotonic(), files)
        return files

    def _walk(self) -> Iterator[Tuple[str, str, str, str]]:
        for name, root in self._places():
            pending = [(str(root), name)]
            while pending:
                folder, virtual_dir = pending.pop()
                subdirs: List[Tuple[str, str]] = []
                yield from self._files_in(folder, virtual_dir, name, root, subdirs)
                pending.extend(reversed(subdirs))

    def _files_in(self, folder: str, virtual_dir: str, name: str, root: Path,
                  subdirs: List[Tuple[str, str]]) -> Iterator[Tuple[str, str, str, str]]:
        """The files of one folder (symlinks only when they stay inside `root`, never descended); its
        subfolders to walk next are added to `subdirs` (hidden and skipped ones left out)."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not _is_utf8(entry.name):
                continue  # a non-UTF-8 name cannot be named in a URL
            if not virtual_dir and entry.name in self.mounts:
                continue  # the root's own `name/...` files: that name reads the mount instead
            if self._private(Path(entry.path)):
                continue  # the gateway's own data (never read, so never listed)
            try:
                if entry.is_symlink():
                    target = Path(os.path.realpath(entry.path))
                    if _is_within(target, root) and target.is_file() and not self._private(target):
                        yield _joined(virtual_dir, entry.name), entry.name, name, entry.path
                elif entry.is_dir():
                    if not entry.name.startswith(".") and entry.name not in _SKIPPED_DIRS:
                        subdirs.append((entry.path, _joined(virtual_dir, entry.name)))
                elif entry.is_file():
                    yield _joined(virtual_dir, entry.name), entry.name, name, entry.path
            except OSError:
                continue

    @staticmethod
    def _problem(real: Path, name: str) -> Optional[str]:
        if not real.exists():
            return f"Error: File '{name}' does not exist"
        if not real.is_file():
            return f"Error: '{name}' is not a file"
        return None

    @staticmethod
    def _binary(name: str) -> str:
        return f"Error: Cannot read '{name}' - file appears to be binary"

    def read(self, raw_path: str, start_line: int = 1, end_line: Optional[int] = None) -> Dict[str, str]:
        """`{path, content}`: the file's lines, numbered, within the per-call caps (truncation is labelled)."""
        real, name = self.resolve(raw_path)
        return {"path": name, "content": self._read(real, name, start_line, end_line)}

    def _read(self, real: Path, name: str, start_line: int, end_line: Optional[int]) -> str:
        problem = self._problem(real, name)
        if problem:
            return problem
        if end_line is not None and end_line < start_line:
            return f"Error: start_line ({start_line}) cannot be greater than end_line ({end_line})"
        try:
            with open(real, "rb") as fh:
                if b"\x00" in fh.read(_BINARY_PROBE):
                    return self._binary(name)
                fh.seek(0)
                lines, line_no, more = self._line_window(fh, start_line, end_line)
        except UnicodeDecodeError:
            return self._binary(name)
        except OSError as exc:
            return f"Error: Failed to read '{name}': {exc.strerror or exc}"
        if not lines:
            if more:
                return f"Error: '{name}' is larger than the {FILES_SCAN_MAX_BYTES} bytes a read scans"
            return f"Error: Start line {start_line} exceeds file length ({line_no} lines)"
        width = len(str(lines[-1][0]))
        body = "\n".join(f"{n:>{width}}: {text}" for n, text in lines)
        out = f"File: {name} ({len(lines)} lines)\n\n{body}"
        if more:
            out += (f"\n\n[truncated: the file continues after line {lines[-1][0]}; "
                    f"read again with start_line={lines[-1][0] + 1}]")
        return out

    @staticmethod
    def _line_window(fh: Any, start_line: int, end_line: Optional[int]) -> Tuple[List[Tuple[int, str]], int, bool]:
        """(line number, text) of lines start_line..end_line within the read caps, the last line number
        scanned, and whether the file goes on past what was returned. UnicodeDecodeError: not UTF-8."""
        lines: List[Tuple[int, str]] = []
        used = line_no = 0
        more = False
        scanner = _LineScanner(fh, FILES_READ_MAX_BYTES, FILES_SCAN_MAX_BYTES)
        for raw, cut in scanner:
            line_no += 1
            if line_no < start_line:
                continue
            if end_line is not None and line_no > end_line:
                break
            if len(lines) >= FILES_READ_MAX_LINES or (lines and used + len(raw) > FILES_READ_MAX_BYTES):
                more = True
                break
            used += len(raw)
            text = raw.decode("utf-8", "ignore" if cut else "strict")
            lines.append((line_no, text + (f" [line cut at {FILES_READ_MAX_BYTES} bytes]" if cut else "")))
        more = more or (scanner.exhausted and (end_line is None or line_no < end_line))
        return lines, line_no, more

    def skim(self, raw_path: str, target_percent: float = 8.0, head_lines: int = 25,
             tail_lines: int = 25) -> Dict[str, str]:
        """`{path, content}`: numbered excerpts (head, tail, headings, evenly spaced lines) of a text file."""
        real, name = self.resolve(raw_path)
        problem = self._problem(real, name)
        if problem:
            return {"path": name, "content": problem}
        texts: List[str] = []
        try:
            with open(real, "rb") as fh:
                if b"\x00" in fh.read(_BINARY_PROBE):
                    return {"path": name, "content": self._binary(name)}
                fh.seek(0)
                scanner = _LineScanner(fh, FILES_SKIM_EXCERPT * 4, FILES_SCAN_MAX_BYTES)
                for raw, cut in scanner:
                    texts.append(raw.decode("utf-8", "ignore" if cut else "strict")[:FILES_SKIM_EXCERPT])
                    if len(texts) >= FILES_SKIM_SCAN_LINES:
                        scanner.exhausted = True
                        break
        except UnicodeDecodeError:
            return {"path": name, "content": self._binary(name)}
        except OSError as exc:
            return {"path": name, "content": f"Error: Failed to read '{name}': {exc.strerror or exc}"}
        total = len(texts)
        chosen = self._skim_picks(texts, target_percent, head_lines, tail_lines)
        width = len(str(chosen[-1] + 1)) if chosen else 1
        out, previous = [], -1
        for i in chosen:
            if previous >= 0 and i != previous + 1:
                out.append(" " * width + "  …")
            out.append(f"{i + 1:>{width}}: {texts[i]}")
            previous = i
        scope = f"first {total} lines" if scanner.exhausted else f"{total} lines"
        header = f"File: {name} ({scope}; {len(chosen)} sampled)"
        return {"path": name, "content": header + ("\n\n" + "\n".join(out) if out else "\n\n(empty file)")}

    @staticmethod
    def _skim_picks(texts: List[str], target_percent: float, head_lines: int, tail_lines: int) -> List[int]:
        """Sorted indexes of the lines a skim shows."""
        total = len(texts)
        # `target_percent` of the lines (at least a dozen), a third at most from each end, then
        # headings, then evenly spaced lines
        budget = min(FILES_SKIM_MAX_LINES, total, max(12, math.ceil(total * target_percent / 100)))
        third = math.ceil(budget / 3)
        picked = set(range(min(head_lines, third, total))) | set(range(total - min(tail_lines, third, total), total))
        for i, text in enumerate(texts):
            if len(picked) >= budget:
                break
            if text.lstrip().startswith(("#", "def ", "class ")):
                picked.add(i)
        spare = budget - len(picked)
        if spare > 0:
            picked.update(int(total * k / (spare + 1)) for k in range(1, spare + 1))
        return sorted(picked)


def store_attachment(stores: Stores, *, session_id: str, content: bytes, filename: str, content_type: str,
                     target: str, source: str, path: str) -> Dict[str, Any]:
    """Store bytes as an artifact of the session's owner run, tagged as an attachment; return the client's ref."""
    import mimetypes

    content_type = content_type.strip().lower() or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    sha256 = hashlib.sha256(content).hexdigest()
    with stores.db.transaction():
        run_id = ensure_session_memory_run(stores.runs, session_id)
        meta = stores.artifacts.store(content, content_type=content_type, run_id=run_id, tags={
            "kind": "attachment", "target": target, "source": source, "path": path, "filename": filename,
            "session_id": session_id, "sha256": sha256})
    return {"ok": True, "run_id": run_id, "metadata": meta.to_dict(),
            "attachment": {"$artifact": meta.artifact_id, "target": target, "filename": filename,
                           "content_type": content_type, "source_path": path, "sha256": sha256}}


REPORT_MAX_DESCRIPTION = 20_000
REPORT_FOLDERS = {"bug": "bug_reports", "feature": "feature_requests"}  # the original's relpath prefixes
REPORT_FIELDS = ("active_run_id", "workflow_id", "client", "client_version", "user_agent", "url", "provider", "model",
                 "template")


def _report_title(description: str, report_type: str) -> str:
    first = " ".join(description.strip().splitlines()[0].split())
    command = "/bug" if report_type == "bug" else "/feature"
    if first.lower().startswith(command):
        first = first[len(command):].strip()
    return first[:120].rstrip() or ("Bug report" if report_type == "bug" else "Feature request")


def _report_slug(title: str, report_type: str) -> str:
    slug = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in title.lower())
    slug = "-".join(part for part in slug.split("-") if part)[:80].strip("-")
    return slug or report_type


def file_report(stores: Stores, report_type: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """File a bug report or feature request as a Markdown document in the reports inbox."""
    import platform

    session_id = str(body.get("session_id") or "").strip()
    if not session_id:
        raise GatewayError("session_id is required", code="validation_error")
    description = str(body.get("description") or "")
    if not description.strip():
        raise GatewayError("description is required", code="validation_error")
    if len(description) > REPORT_MAX_DESCRIPTION:
        raise GatewayError(f"description is too large (max {REPORT_MAX_DESCRIPTION:,} chars)", code="too_large")
    fields = {name: str(body.get(name) or "").strip() for name in REPORT_FIELDS}
    context = body.get("context") if isinstance(body.get("context"), dict) else {}
    created_at = utc_now_iso()
    report_id = str(uuid.uuid4())
    title = _report_title(description, report_type)
    owner = ensure_session_memory_run(stores.runs, session_id)
    attachments = [m for m in stores.artifacts.list_by_run(owner) if (m.tags or {}).get("kind") == "attachment"]
    attachments.sort(key=lambda m: m.created_at, reverse=True)
    attachment_lines = [f"- `{(m.tags or {}).get('path') or (m.tags or {}).get('filename') or m.artifact_id}` "
                        f"({(m.tags or {}).get('target', '')}, {m.size_bytes} B) artifact `{m.artifact_id}`"
                        for m in attachments[:50]] or ["(none)"]
    replay_run = fields["active_run_id"] or "<RUN_ID>"
    context_json = json.dumps({**{k: v or None for k, v in fields.items()}, "session_memory_run_id": owner,
                               "created_at": created_at, f"{report_type}_id": report_id, "client_context": context},
                              ensure_ascii=False, indent=2, sort_keys=True, default=str)[:80_000]
    kind = "Bug" if report_type == "bug" else "Feature"
    content = "\n".join([
        f"# {kind}: {title}", "",
        f"> Created: {created_at}", f"> {kind} ID: {report_id}", f"> Session ID: {session_id}",
        f"> Session memory run ID: {owner}", f"> Active run ID: {fields['active_run_id']}",
        f"> Workflow ID: {fields['workflow_id']}", "",
        "## Description", "\n".join("    " + line for line in description.replace("\r\n", "\n").split("\n")), "",
        "## Attachments (session-scoped)", *attachment_lines, "",
        "## Replay", f"- Runs of the session: `GET /api/gateway/runs?session_id={session_id}`",
        f"- History bundle: `GET /api/gateway/runs/{replay_run}/history_bundle"
        "?include_subruns=true&include_session=true`",
        f"- Attachments: `GET /api/gateway/runs/{owner}/artifacts`", "",
        "## Environment", f"- Client: {fields['client']} {fields['client_version']}".rstrip(),
        f"- User agent: {fields['user_agent']}", f"- Page URL: {fields['url']}",
        f"- Provider / model: {fields['provider']} / {fields['model']}", f"- Template: {fields['template']}",
        f"- Gateway: abstractgateway {__version__}", f"- Server: {platform.system()} {platform.release()} "
        f"({platform.machine()}), Python {sys.version.split()[0]}", "",
        "## Client context (JSON)", "```json", context_json, "```", ""])
    stem = f"{created_at[:10]}_{_report_slug(title, report_type)}"
    filename = stores.reports.add(report_type, stem, title=title, created_at=created_at, session_id=session_id,
                                  workflow_id=fields["workflow_id"], active_run_id=fields["active_run_id"],
                                  content=content)
    folder = REPORT_FOLDERS[report_type]
    return {"ok": True, "filename": filename, "path": f"{folder}/{filename}", "template_path": f"{folder}/template.md",
            "created_at": created_at, "session_id": session_id, "session_memory_run_id": owner,
            "active_run_id": fields["active_run_id"] or None, "proposed_backlog_relpath": "",
            "proposed_backlog_item_id": None}


def report_filename_ok(filename: str) -> bool:
    """A report handle as clients send it back: `<safe chars>.md`, no path separators."""
    stem = filename[:-3] if filename.lower().endswith(".md") else ""
    return 0 < len(stem) <= 180 and _is_safe_id(stem, ".") and filename != "template.md"


KG_SCOPES = ("run", "session", "global", "all")


def global_memory_owner_id() -> str:
    """The global memory owner (the runtime's default, or ABSTRACTRUNTIME_GLOBAL_MEMORY_RUN_ID)."""
    configured = os.environ.get("ABSTRACTRUNTIME_GLOBAL_MEMORY_RUN_ID", "").strip()
    return configured if _is_safe_id(configured) else "global_memory"


class KnowledgeGraph:
    """The original's `/kg/query` over the gateway's triple store (the one `memory_kg_*` nodes write)."""

    def __init__(self, store: TripleStoreHandle, runs: Any) -> None:
        self.store = store
        self.runs = runs

    def _run(self, run_id: str) -> RunState:
        run = self.runs.load(run_id)
        if run is None:
            raise run_not_found(run_id)
        return run

    def _owners(self, body: Dict[str, Any], scope: str,
                warnings: List[str]) -> Tuple[List[Tuple[str, Optional[str]]], Optional[str]]:
        """The (scope, owner id) pairs to query, and the owner id to report (single scope only)."""
        run_id, session_id, owner = (str(body.get(k) or "").strip() or None for k in ("run_id", "session_id",
                                                                                      "owner_id"))
        if body.get("all_owners"):
            return [(s, None) for s in (KG_SCOPES[:3] if scope == "all" else (scope,))], None
        if scope == "all":
            return self._owners_of_all_scopes(run_id, session_id, warnings), None
        resolved = self._owner_of_scope(scope, run_id, session_id, owner)
        return [(scope, resolved)], resolved

    def _owners_of_all_scopes(self, run_id: Optional[str], session_id: Optional[str],
                              warnings: List[str]) -> List[Tuple[str, Optional[str]]]:
        """scope=all: the run's own owners of run, session and global scope, else the session's and global."""
        from abstractruntime.integrations.abstractmemory.effect_handlers import resolve_scope_owner_id

        if run_id:
            try:
                run = self._run(run_id)
            except NotFound:
                if not session_id:
                    raise
                warnings.append(f"Run '{run_id}' not found; querying session+global only"
                                f" for session_id='{session_id}'")
            else:
                return [(s, resolve_scope_owner_id(run, scope=s, run_store=self.runs)) for s in KG_SCOPES[:3]]
        if not session_id:
            raise GatewayError("run_id or session_id is required when scope=all (or set all_owners=true)",
                               code="validation_error")
        warnings.append("run scope omitted (no run_id available)")
        return [("session", session_memory_run_id(session_id)), ("global", global_memory_owner_id())]

    def _owner_of_scope(self, scope: str, run_id: Optional[str], session_id: Optional[str],
                        owner: Optional[str]) -> str:
        """The one owner id a single-scope query reads: owner_id if given, else derived from the scope."""
        from abstractruntime.integrations.abstractmemory.effect_handlers import resolve_scope_owner_id

        if owner:
            resolved = owner
        elif scope == "global":
            resolved = global_memory_owner_id()
        elif scope == "run":
            if not run_id:
                raise GatewayError("run_id is required for scope=run (or provide owner_id)", code="validation_error")
            resolved = run_id
        elif session_id:
            resolved = session_memory_run_id(session_id)
        elif run_id:
            resolved = resolve_scope_owner_id(self._run(run_id), scope="session", run_store=self.runs)
        else:
            raise GatewayError("run_id or session_id is required for scope=session (or provide owner_id)",
                               code="validation_error")
        return resolved

    def query(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """The original's `/kg/query`: assertions of the resolved owners, newest first (or `order=asc`)."""
        scope = str(body.get("scope") or "session").strip().lower() or "session"
        if scope not in KG_SCOPES:
            raise GatewayError("scope must be one of run|session|global|all", code="validation_error")
        limit = 500 if body.get("limit") is None else body["limit"]
        if not -1 <= limit <= 10_000:
            raise Unprocessable("Field 'limit' must be between -1 and 10000", code="validation_error")
        order = "asc" if str(body.get("order") or "").strip().lower() == "asc" else "desc"
        owner = str(body.get("owner_id") or "").strip()
        if scope == "all" and owner:
            raise GatewayError("owner_id is not supported when scope=all", code="validation_error")
        if owner and body.get("all_owners"):
            raise GatewayError("all_owners cannot be combined with owner_id", code="validation_error")
        if not self.store.path.is_file():  # nothing stored yet: the original answers before resolving owners
            return {"ok": True, "scope": scope, "owner_id": None, "count": 0, "items": [],
                    "warnings": ["KG store does not exist yet"
                                 " (no persisted assertions in <data dir>/abstractmemory/kg.sqlite3)."]}
        warnings: List[str] = []
        owners, reported_owner = self._owners(body, scope, warnings)
        from abstractmemory import TripleQuery

        items: List[Dict[str, Any]] = []
        for label, owner_id in owners:
            query = TripleQuery(subject=body.get("subject"), predicate=body.get("predicate"), object=body.get("object"),
                                scope=label, owner_id=owner_id, since=body.get("since"), until=body.get("until"),
                                active_at=body.get("active_at"), query_text=body.get("query_text"),
                                min_score=body.get("min_score"), limit=int(limit), order=order)
            try:
                items.extend(row.to_dict() for row in self.store.query(query))
            except (ValueError, RuntimeError) as exc:  # e.g. query_text without an embedder
                warnings.append(f"{label}: {exc}" if len(owners) > 1 else str(exc))
        items.sort(key=lambda d: str(d.get("observed_at") or ""), reverse=order != "asc")
        if limit > 0:
            items = items[:limit]
        return {"ok": True, "scope": scope, "owner_id": reported_owner, "count": len(items), "items": items,
                "warnings": warnings or None}


# =====================================================================================
# 5. HTTP (routes, SSE, OpenAPI)
# =====================================================================================

if TYPE_CHECKING:
    from werkzeug.wrappers import Request, Response


def _response(*args: Any, **kwargs: Any) -> "Response":
    """A werkzeug Response; werkzeug is imported on first use (`runner` and the storage
    commands never load it, which keeps their start-up short)."""
    from werkzeug.wrappers import Response

    return Response(*args, **kwargs)

API = "/api/gateway"
SSE_RETRY_MS = 2000
MAX_CURSOR = 2**63 - 1  # SQLite's INTEGER range
MULTIPART_OVERHEAD = 2 * 1024 * 1024
SSE_BATCH = 500
TERMINAL_RECORD_MARK = '"system:terminal_status:'  # idempotency key of the runtime's last record of a run
_ARTIFACT_CHUNK = 1 << 20


@dataclass(frozen=True)
class Param:
    """A query parameter: parsed, range-checked, and documented from this one declaration."""

    name: str
    kind: str  # str | int | float | bool
    default: Any = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    description: str = ""
    choices: Tuple[str, ...] = ()
    required: bool = False  # absent: 422; present but empty: passed on as ""
    exclusive_minimum: bool = False  # `minimum` itself is out of range


AUTH_KINDS = ("none", "read", "write")  # a route's token check: none, or by ABSTRACTGATEWAY_PROTECT_READ/_WRITE
BODY_CAPS = ("max_body_bytes", "max_bundle_bytes", "max_attachment_bytes")  # the settings a route's body cap names


@dataclass(frozen=True)
class Route:
    """One endpoint: method, path, handler, what OpenAPI says about it, and the security and limits
    the middlewares apply to it (`auth`, `max_body`, `stream`; read from the matched route)."""

    method: str
    path: str  # werkzeug rule syntax: /api/gateway/runs/<run_id>
    handler: str
    summary: str
    tag: str
    query: Tuple[Param, ...] = ()
    body: Optional[Dict[str, Any]] = None  # JSON schema of the request body
    multipart: Optional[Dict[str, Any]] = None  # schema of a multipart/form-data body
    response: Dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    content_type: str = "application/json"
    errors: Tuple[int, ...] = ()
    auth: str = ""  # one of AUTH_KINDS; "" takes it from the method: GET reads, anything else writes
    max_body: str = "max_body_bytes"  # the setting (one of BODY_CAPS) that caps the request body
    stream: bool = False  # an SSE stream: counted against ABSTRACTGATEWAY_MAX_SSE, not MAX_CONCURRENCY
    # A GET that reads by key (never a network call nor a page): the server answers it on its selector
    # thread, without the hand-off to a worker (a path whose answer proves costly goes to workers after).
    quick: bool = False
    # A write whose few small writes all happen on the request's thread, answered only once they commit:
    # the server may run several such requests in one transaction and acknowledge them with one commit.
    shared_commit: bool = False

    def __post_init__(self) -> None:
        if not self.auth:
            object.__setattr__(self, "auth", "read" if self.method == "GET" else "write")
        if self.auth not in AUTH_KINDS or self.max_body not in BODY_CAPS:
            raise ValueError(f"{self.method} {self.path}: auth is one of {AUTH_KINDS}, max_body one of {BODY_CAPS}")
        if self.quick and (self.method != "GET" or self.stream):
            raise ValueError(f"{self.method} {self.path}: only a GET that is not a stream can be quick")
        if self.shared_commit and self.method != "POST":
            raise ValueError(f"{self.method} {self.path}: only a POST can share a commit")

    @property
    def api(self) -> bool:
        """Under /api/gateway, where the security middlewares apply (pages, health and OpenAPI are public)."""
        return self.path.startswith(API + "/")


def _obj(required: Sequence[str] = (), **props: Any) -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


_S, _I, _B, _O = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "object"}
_NS = {"type": ["string", "null"]}
_ERROR = _obj(("detail", "code"), detail=_S, code=_S, field=_S, request_id=_S)
_RUN = _obj(("run_id", "workflow_id", "status"), run_id=_S, workflow_id=_S,
            status={"type": "string", "enum": ["running", "waiting", "completed", "failed", "cancelled"]},
            current_node=_NS, created_at=_NS, updated_at=_NS, actor_id=_NS, session_id=_NS, parent_run_id=_NS,
            error=_NS, paused=_B, pause_reason=_NS, paused_at=_NS, resumed_at=_NS,
            waiting={"type": ["object", "null"]}, is_scheduled=_B, schedule={"type": ["object", "null"]},
            limits={"type": ["object", "null"]}, ledger_len={"type": ["integer", "null"]},
            **{name: {"type": ["integer", "null"]} for name in ("steps", "llm_calls", "tool_calls", "tokens_total")})
_LEDGER_PAGE = _obj(("items", "next_after"), items={"type": "array", "items": _O}, next_after=_I)
_ENTRYPOINT = _obj(("flow_id",), flow_id=_S, workflow_id=_S, name=_NS, description=_S,
                   interfaces={"type": "array", "items": _S}, deprecated=_B, deprecated_at=_NS, deprecated_reason=_NS)
_BUNDLE = _obj(("bundle_id", "bundle_version", "bundle_ref"), bundle_id=_S, bundle_version=_S, bundle_ref=_S,
               created_at=_S, default_entrypoint=_NS, entrypoints={"type": "array", "items": _ENTRYPOINT},
               load_error=_NS, needs={"type": "array", "items": _S}, origin=_S)
_COMMAND_STATUS = _obj(("command_id", "seq", "status"), command_id=_S, seq=_I, run_id=_S, type=_S, ts=_S,
                       status={"type": "string", "enum": ["pending", "applied", "failed"]}, error=_NS, applied_at=_NS)
_ARTIFACT = _obj(("artifact_id",), artifact_id=_S, content_type=_S, size_bytes=_I, created_at=_S, blob_id=_NS,
                 run_id=_NS, tags=_O)
_RELOAD = dict(gateway_reloaded=_B, gateway_reload_error=_NS)
_FILE_TEXT = _obj(("path", "content"), path=_S, content=_S)
_ATTACHMENT = _obj(("ok", "run_id", "attachment"), ok=_B, run_id=_S, metadata=_ARTIFACT, attachment=_obj(
    ("$artifact",), **{"$artifact": _S}, target=_S, filename=_S, content_type=_S, source_path=_S, sha256=_S))
_REPORT_REQUEST = _obj(("session_id", "description"), session_id=_S, description=_S, active_run_id=_NS,
                       workflow_id=_NS, client=_NS, client_version=_NS, user_agent=_NS, url=_NS, provider=_NS,
                       model=_NS, template=_NS, context=_O)
_REPORT_FILED = _obj(("ok", "filename", "path"), ok=_B, filename=_S, path=_S, template_path=_S, created_at=_S,
                     session_id=_S, session_memory_run_id=_S, active_run_id=_NS, proposed_backlog_relpath=_S,
                     proposed_backlog_item_id={"type": ["integer", "null"]})
_REPORT_LIST = _obj(("items",), items={"type": "array", "items": _obj(
    ("report_type", "filename", "relpath", "title"), report_type=_S, filename=_S, relpath=_S, title=_S, created_at=_S,
    session_id=_S, workflow_id=_S, active_run_id=_S, decision_id=_S, triage_status=_S)})
_REPORT_CONTENT = _obj(("report_type", "filename", "relpath", "content"), report_type=_S, filename=_S, relpath=_S,
                       content=_S)

ROUTES: Tuple[Route, ...] = (
    Route("GET", "/api/health", "health", "Liveness plus store and runner state (never authenticated).", "meta",
          response=_obj(("status",), status=_S, service=_S, version=_S, store=_O, runner=_O), auth="none"),
    Route("GET", "/openapi.json", "openapi", "This OpenAPI document.", "meta", auth="none"),
    Route("GET", "/docs", "docs", "Offline API reference with a request console.", "meta", content_type="text/html",
          response={"type": "string"}, auth="none"),
    Route("GET", "/", "console_root", "The operator console page (same as /console).", "console",
          content_type="text/html", response={"type": "string"}, errors=(404,), auth="none"),
    Route("GET", "/console", "console_page", "The operator console: one offline page that drives this API.", "console",
          content_type="text/html", response={"type": "string"}, errors=(404,), auth="none"),
    Route("GET", "/console/console.js", "console_script", "The console's script.", "console",
          content_type="text/javascript", response={"type": "string"}, errors=(404,), auth="none"),
    Route("GET", "/console/console.css", "console_style", "The console's style sheet.", "console",
          content_type="text/css", response={"type": "string"}, errors=(404,), auth="none"),
    Route("GET", f"{API}/ping", "ping", "Authenticated connectivity probe (with the store backend and database path).",
          "meta", response=_obj(("ok",), ok=_B, status=_S, service=_S, time=_S, backend=_S, db_path=_S), quick=True),
    # bundles
    Route("GET", f"{API}/bundles", "list_bundles", "List bundles (latest version of each by default).", "bundles",
          query=(Param("all_versions", "bool", False), Param("include_deprecated", "bool", False)),
          response=_obj(("items",), items={"type": "array", "items": _BUNDLE}, default_bundle_id=_NS)),
    Route("POST", f"{API}/bundles/upload", "upload_bundle", "Upload a .flow bundle (stored in the database).",
          "bundles", multipart=_obj(("file",), file={"type": "string", "format": "binary"}, overwrite=_B, reload=_B),
          max_body="max_bundle_bytes",
          response=_obj(("ok", "bundle_id"), ok=_B, bundle_id=_S, bundle_version=_S, bundle_ref=_S, sha256=_S,
                        default_entrypoint=_NS, entrypoints={"type": "array", "items": _O}, **_RELOAD),
          errors=(400, 409, 413)),
    Route("POST", f"{API}/bundles/reload", "reload_bundles", "Reload every bundle (atomic swap).", "bundles",
          response=_obj(("ok",), ok=_B, bundle_ids={"type": "array", "items": _S}, count=_I,
                        errors={"type": "array", "items": _S})),
    Route("GET", f"{API}/bundles/<bundle_id>", "get_bundle", "One bundle with its entrypoints and inputs.", "bundles",
          query=(Param("bundle_version", "str"),), response=_BUNDLE, errors=(404,)),
    Route("DELETE", f"{API}/bundles/<bundle_id>", "delete_bundle",
          "Remove a bundle (or one version): uploads and `.flow` files of the flows dir.",
          "bundles", query=(Param("bundle_version", "str"), Param("reload", "bool", True)),
          response=_obj(("ok", "removed"), ok=_B, bundle_ref=_S, removed=_I, **_RELOAD), errors=(404,)),
    Route("POST", f"{API}/bundles/<bundle_id>/deprecate", "deprecate_bundle", "Deprecate a bundle or one entrypoint.",
          "bundles", body=_obj((), flow_id=_NS, reason=_NS),
          response=_obj(("ok",), ok=_B, bundle_id=_S, flow_id=_S, deprecated_at=_S, reason=_NS), errors=(404,)),
    Route("POST", f"{API}/bundles/<bundle_id>/undeprecate", "undeprecate_bundle", "Lift a deprecation.", "bundles",
          body=_obj((), flow_id=_NS), response=_obj(("ok",), ok=_B, bundle_id=_S, flow_id=_S, removed=_B)),
    Route("GET", f"{API}/bundles/<bundle_id>/flows/<flow_id>", "get_bundle_flow", "One flow's VisualFlow JSON.",
          "bundles", query=(Param("bundle_version", "str"),),
          response=_obj(("flow",), bundle_id=_S, bundle_version=_S, bundle_ref=_S, flow_id=_S, workflow_id=_S, flow=_O),
          errors=(404,)),
    Route("GET", f"{API}/workflows/<workflow_id>/flow", "get_workflow_flow", "VisualFlow JSON of a workflow id.",
          "bundles", response=_obj(("workflow_id", "flow"), workflow_id=_S, flow=_O, source=_S, bundle_id=_S,
                                   bundle_version=_S, bundle_ref=_S, flow_id=_S), errors=(404,)),
    # runs
    Route("POST", f"{API}/runs/start", "start_run", "Start a run (durable before this returns).", "runs",
          body=_obj((), bundle_id=_NS, bundle_version=_NS, flow_id=_NS, input_data=_O, session_id=_NS),
          response=_obj(("run_id",), run_id=_S), errors=(404, 409, 422)),
    Route("POST", f"{API}/runs/schedule", "schedule_run",
          "Run a flow on a timetable (as child runs of a scheduled parent).",
          "runs", body=_obj(("bundle_id", "flow_id"), bundle_id=_S, bundle_version=_NS, flow_id=_S, input_data=_O,
                            start_at=_NS, interval=_NS, repeat_count={"type": ["integer", "null"]}, repeat_until=_NS,
                            share_context=_B, session_id=_NS),
          response=_obj(("run_id",), run_id=_S), errors=(404, 409, 422)),
    Route("GET", f"{API}/runs", "list_runs", "List runs, most recently updated first, with a page cursor.", "runs",
          query=(Param("limit", "int", 50, 1, 500), Param("status", "str", choices=tuple(s.value for s in RunStatus)),
                 Param("workflow_id", "str"), Param("session_id", "str"), Param("root_only", "bool", False),
                 Param("include_ledger_len", "bool", True),
                 Param("cursor", "str", description="next_cursor of the previous page"),
                 Param("include_metrics", "bool", False,
                       description="add steps, llm_calls, tool_calls, tokens_total per run (from indexed counters)")),
          response=_obj(("items",), items={"type": "array", "items": _RUN}, next_cursor=_NS)),
    Route("GET", f"{API}/runs/<run_id>", "get_run", "Run summary.", "runs", response=_RUN, errors=(404,),
          quick=True),
    Route("GET", f"{API}/runs/<run_id>/input_data", "get_run_input", "The inputs a run was started with.", "runs",
          response=_obj(("run_id", "input_data"), run_id=_S, workflow_id=_S, bundle_id=_NS, bundle_version=_NS,
                        flow_id=_NS, pin_ids={"type": "array", "items": _S}, input_data=_O), errors=(404,)),
    Route("GET", f"{API}/runs/<run_id>/history_bundle", "get_history_bundle", "Portable export of a run.", "runs",
          query=(Param("include_subruns", "bool", True), Param("include_session", "bool", False),
                 Param("session_turn_limit", "int", 200, 1, 500),
                 Param("ledger_mode", "str", "tail", choices=("tail", "full")),
                 Param("ledger_max_items", "int", 2000, 0, 20000)), errors=(404,)),
    Route("GET", f"{API}/runs/<run_id>/commands", "list_run_commands", "Outcomes of the commands sent to a run.",
          "commands", query=(Param("limit", "int", 200, 1, 2000),),
          response=_obj(("items",), items={"type": "array", "items": _COMMAND_STATUS}), errors=(404,)),
    Route("GET", f"{API}/runs/<run_id>/artifacts", "list_artifacts", "A run's artifacts, newest first.", "artifacts",
          query=(Param("limit", "int", 200, 1, 2000),),
          response=_obj(("items",), items={"type": "array", "items": _ARTIFACT}),
          errors=(404,)),
    Route("GET", f"{API}/runs/<run_id>/artifacts/<artifact_id>", "get_artifact", "Artifact metadata.", "artifacts",
          response=_ARTIFACT, errors=(400, 404)),
    Route("GET", f"{API}/runs/<run_id>/artifacts/<artifact_id>/content", "get_artifact_content",
          "Artifact bytes, streamed; honours Range.", "artifacts", content_type="application/octet-stream",
          response={"type": "string", "format": "binary"}, errors=(400, 404, 416)),
    Route("POST", f"{API}/runs/<run_id>/summary", "summarize_run",
          "Ask the model for a summary of the run's ledger; appends an `abstract.summary` record.", "runs",
          body=_obj((), provider=_NS, model=_NS, include_subruns=_B),
          response=_obj(("ok", "run_id", "summary"), ok=_B, run_id=_S, provider=_S, model=_S, generated_at=_S,
                        summary=_S), errors=(404, 422, 502)),
    Route("POST", f"{API}/runs/<run_id>/chat", "chat_about_run",
          "Read-only chat about the run, grounded on its ledger (persist: append an `abstract.chat` record).",
          "runs", body=_obj((), messages={"type": "array", "items": _O},
                            provider=_NS, model=_NS, include_subruns=_B, persist=_B),
          response=_obj(("ok", "run_id", "answer"), ok=_B, run_id=_S, provider=_S, model=_S, generated_at=_S,
                        answer=_S), errors=(400, 404, 422, 502)),
    # ledger
    Route("GET", f"{API}/runs/<run_id>/ledger", "get_ledger", "Replay the ledger: records after `after`.", "ledger",
          query=(Param("after", "int", 0, 0, MAX_CURSOR), Param("limit", "int", 200, 1, 2000)), response=_LEDGER_PAGE),
    Route("POST", f"{API}/runs/ledger/batch", "ledger_batch", "Replay several ledgers at once.", "ledger",
          body=_obj((), runs={"type": "array", "items": _obj(("run_id",), run_id=_S, after=_I)},
                    limit={"type": "integer", "minimum": 1, "maximum": 2000}),
          response=_obj(("runs",), runs={"type": "object", "additionalProperties": _LEDGER_PAGE})),
    Route("GET", f"{API}/runs/<run_id>/ledger/stream", "stream_ledger",
          "Server-Sent Events: `step` per record, `done` when terminal; resumes from Last-Event-ID or `after`.",
          "ledger", query=(Param("after", "int", 0, 0, MAX_CURSOR), Param("heartbeat_s", "float", 5.0, 0.1, 60.0,
                                                                                exclusive_minimum=True)),
          content_type="text/event-stream", response={"type": "string"}, errors=(404,), stream=True),
    # commands
    Route("POST", f"{API}/commands", "submit_command", "Append a command to the durable inbox (idempotent).",
          "commands", body=_obj(("command_id", "run_id", "type"), command_id=_S, run_id=_S,
                                type={"type": "string", "enum": list(COMMAND_TYPES)}, payload=_O, ts=_NS,
                                client_id=_NS),
          response=_obj(("accepted", "duplicate", "seq"), accepted=_B, duplicate=_B, seq=_I), shared_commit=True),
    Route("GET", f"{API}/audit/tail", "audit_tail",
          "The audit log of write requests: its newest JSONL lines within `max_bytes` (the original's shape), "
          "plus the newest `limit` rows as objects, newest first.", "meta",
          query=(Param("limit", "int", 100, 1, 1000), Param("max_bytes", "int", 80_000, 1024, 400_000)),
          response=_obj(("ok", "bytes", "truncated", "content"), ok=_B, bytes=_I, truncated=_B, content=_S,
                        items={"type": "array", "items": _obj((), id=_I, ts=_S, request_id=_S, client_ip=_NS, method=_S,
                                                              path=_S, status=_I, duration_ms={"type": "number"},
                                                              token_fp=_NS, headers=_O, query=_S, auth_required=_B,
                                                              origin=_NS, user_agent=_NS,
                                                              bytes_in={"type": ["integer", "null"]}, error=_NS)})),
    Route("GET", f"{API}/commands/<command_id>", "get_command", "A command's outcome: pending, applied or failed.",
          "commands", response=_COMMAND_STATUS, errors=(404,), quick=True),
    # thin clients: workspace files, attachments, knowledge graph, reports inbox
    Route("GET", f"{API}/workspace/policy", "workspace_policy",
          "The operator's workspace policy: mount names (never server paths) and the attachment cap.", "workspace",
          response=_obj(("ok", "policy"), ok=_B, policy=_obj(
              ("target", "mounts", "max_attachment_bytes"), target=_S,
              mounts={"type": "array", "items": _obj(("name",), name=_S)},
              max_attachment_bytes=_I, client_workspace_scope_overrides=_B,
              allowed_access_modes={"type": "array", "items": _S}))),
    Route("GET", f"{API}/files/search", "files_search", "Find workspace files by a substring of their path.",
          "workspace",
          query=(Param("query", "str", description="case-insensitive substring of the path", required=True),
                              Param("limit", "int", 20, 1, 200)),
          response=_obj(("items",),
                        items={"type": "array", "items": _obj(("path",), path=_S, mount=_S, size_bytes=_I)})),
    Route("GET", f"{API}/files/read", "files_read", "A workspace text file's lines, numbered (capped per call).",
          "workspace", query=(Param("path", "str", description="`mount/relative/path`", required=True),
                              Param("start_line", "int", 1, 1), Param("end_line", "int", None, 1)),
          response=_FILE_TEXT, errors=(403,)),
    Route("GET", f"{API}/files/skim", "files_skim", "Numbered excerpts of a workspace text file.", "workspace",
          query=(Param("path", "str", description="`mount/relative/path`", required=True),
                 Param("target_percent", "float", 8.0, 1.0, 25.0), Param("head_lines", "int", 25, 0, 500),
                 Param("tail_lines", "int", 25, 0, 500)),
          response=_FILE_TEXT, errors=(403,)),
    Route("POST", f"{API}/attachments/upload", "attachments_upload",
          "Store an uploaded file as an attachment of a session (an artifact of its memory run).", "attachments",
          multipart=_obj(("session_id", "file"), session_id=_S, file={"type": "string", "format": "binary"},
                         filename=_S, content_type=_S),
          response=_ATTACHMENT, errors=(413,), max_body="max_attachment_bytes"),
    Route("POST", f"{API}/attachments/ingest", "attachments_ingest",
          "Store a workspace file as an attachment of a session.", "attachments",
          body=_obj(("session_id", "path"), session_id=_S, path=_S, filename=_NS, content_type=_NS),
          response=_ATTACHMENT, errors=(403, 404, 413)),
    Route("POST", f"{API}/kg/query", "kg_query",
          "Query AbstractMemory's knowledge graph (run, session or global scope).",
          "memory", body=_obj((), run_id=_NS, session_id=_NS, scope=_NS,
                              owner_id=_NS, subject=_NS, predicate=_NS, object=_NS, since=_NS, until=_NS,
                              active_at=_NS, query_text=_NS, min_score={"type": ["number", "null"]}, all_owners=_B,
                              limit={"type": "integer", "minimum": -1, "maximum": 10_000},
                              order=_NS),
          response=_obj(("ok", "scope", "count", "items"), ok=_B, scope=_S, owner_id=_NS, count=_I,
                        items={"type": "array", "items": _O}, warnings={"type": ["array", "null"], "items": _S}),
          errors=(404,)),
    Route("POST", f"{API}/bugs/report", "bugs_report", "File a bug report in the reports inbox.", "reports",
          body=_REPORT_REQUEST, response=_REPORT_FILED, errors=(413,)),
    Route("POST", f"{API}/features/report", "features_report", "File a feature request in the reports inbox.",
          "reports", body=_REPORT_REQUEST, response=_REPORT_FILED, errors=(413,)),
    Route("GET", f"{API}/reports/bugs", "list_bug_reports", "Bug reports, newest first.", "reports",
          response=_REPORT_LIST),
    Route("GET", f"{API}/reports/features", "list_feature_reports", "Feature requests, newest first.", "reports",
          response=_REPORT_LIST),
    Route("GET", f"{API}/reports/bugs/<filename>/content", "bug_report_content", "One bug report's Markdown.",
          "reports", response=_REPORT_CONTENT, errors=(404,)),
    Route("GET", f"{API}/reports/features/<filename>/content", "feature_report_content",
          "One feature request's Markdown.", "reports", response=_REPORT_CONTENT, errors=(404,)),
    # discovery (for thin clients' pickers; `error` says why a list is empty)
    Route("GET", f"{API}/discovery/providers", "discovery_providers",
          "LLM providers (with their models when include_models; that asks each provider) and the default pair.",
          "discovery", query=(Param("include_models", "bool", False),),
          response=_obj(("items",), items={"type": "array", "items": _O}, default_provider=_NS, default_model=_NS,
                        configured={"type": "array", "items": _S}, error=_S)),
    Route("GET", f"{API}/discovery/providers/<provider_name>/models", "discovery_provider_models",
          "The models a provider lists right now.", "discovery",
          response=_obj(("provider", "models"), provider=_S, models={"type": "array", "items": _S}, error=_S)),
    Route("GET", f"{API}/discovery/tools", "discovery_tools", "The tools agents are offered (and `local` mode runs).",
          "discovery", response=_obj(("items",), items={"type": "array", "items": _O}, tool_mode=_S, error=_S)),
    Route("GET", f"{API}/discovery/capabilities", "discovery_capabilities",
          "Optional capabilities (LLM, agents, vision, voice, music, tools): installed or how to install.",
          "discovery", response=_obj(("capabilities",), capabilities=_O)),
)

ROUTE_KEY = "abstractgateway.route"  # environ: the request's RouteMatch, set by the first layer that asks
# environ: why the shared transaction holding this request's writes did not commit (the app answers it)
FAILED_COMMIT_KEY = "abstractgateway.failed_commit"
# environ, with it: writes to make once the replies are sent, together, best effort (the audit rows: the
# database just refused a commit, so one blocking write per request could hold every reply back)
DEFERRED_WRITES_KEY = "abstractgateway.deferred_writes"


@dataclass(frozen=True)
class RouteMatch:
    """What a request matched: its route (None: an unknown path outside the API), the path's variables,
    and, when no route has this path and method, the 404 or 405 to answer."""

    route: Optional[Route]
    args: Dict[str, Any]  # shared by every request of the same path: read, never changed
    error: Optional[Exception]


# An unknown path or method under the API passes the API's checks before its 404/405, so a caller without
# a token cannot probe which paths exist: GET and HEAD as reads, body-carrying methods as writes.
_API_FALLBACK = {kind: Route(method, f"{API}/<path:rest>", "", "Any other path under the API.", "meta", auth=kind)
                 for method, kind in (("GET", "read"), ("POST", "write"), ("OPTIONS", "none"))}
_FALLBACK_KIND = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write", "DELETE": "write"}


@functools.lru_cache(maxsize=1)
def _route_urls() -> Any:
    """ROUTES as one bound werkzeug MapAdapter (built on first use): rules match on path and method only."""
    from werkzeug.routing import Map, Rule

    url_map = Map([Rule(r.path, endpoint=i, methods=[r.method]) for i, r in enumerate(ROUTES)],
                  strict_slashes=False, merge_slashes=False)
    return url_map.bind("gateway")


_REMEMBERED_PATH_MAX = 200  # longer paths are matched afresh: a client cannot pin memory with long ones


@functools.lru_cache(maxsize=1024)
def _matched_route(method: str, path: str) -> RouteMatch:
    """werkzeug's match of a path that has a route, remembered: clients poll the same few paths."""
    index, args = _route_urls().match(path, method)
    return RouteMatch(ROUTES[index], args, None)


def route_match(environ: Dict[str, Any]) -> RouteMatch:
    """The request's route, matched once per request and kept in the environ under `ROUTE_KEY`: every
    security middleware reads its policy from it, and `GatewayApp` dispatches to its handler."""
    match = environ.get(ROUTE_KEY)
    if match is None:
        from werkzeug.exceptions import HTTPException

        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "").encode("latin-1", "replace").decode("utf-8", "replace")
        try:
            match = (_matched_route if len(path) <= _REMEMBERED_PATH_MAX else _matched_route.__wrapped__)(method, path)
        except HTTPException as exc:  # not remembered: each request gets its own 404 or 405
            api = path == API or path.startswith(API + "/")
            match = RouteMatch(_API_FALLBACK[_FALLBACK_KIND.get(method, "none")] if api else None, {}, exc)
        environ[ROUTE_KEY] = match
    return match


def is_quick_request(environ: Dict[str, Any]) -> bool:
    """Whether the request's route is `quick` (the server may answer it on its selector thread)."""
    match = route_match(environ)
    return match.error is None and match.route is not None and match.route.quick


class CommitGroup(NamedTuple):
    """POSTs that may share one transaction (`accepts(path, content_length)`) and the transaction they
    share, whose exit commits it or raises: then no request of the group was stored, and each is told why."""

    accepts: Callable[[str, int], bool]
    transaction: Callable[[], Any]


def commit_group(config: Config, transaction: Callable[[], Any]) -> CommitGroup:
    """The POSTs of `shared_commit` routes whose body is within their route's cap setting (0: none);
    a larger one is refused up front by its Content-Length, on the usual path."""
    def accepts(path: str, length: int) -> bool:
        match = route_match({"REQUEST_METHOD": "POST", "PATH_INFO": path})
        route = match.route
        cap = getattr(config, route.max_body) if route is not None else 0
        return (match.error is None and route is not None and route.shared_commit
                and (cap <= 0 or length <= cap))

    return CommitGroup(accepts, transaction)


_WHOLE_NUMBER = re.compile(r"\s*([+-]?\d+)(?:\.0+)?\s*", re.ASCII)
_DECIMAL = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)


def _parse_whole_number(text: str) -> int:
    """An integer in ASCII digits, also written as an integral decimal (`2.0`), as pydantic's lax mode
    reads one (not `1e3`, nor other scripts' digits)."""
    match = _WHOLE_NUMBER.fullmatch(text)
    if match is None:
        raise ValueError(f"not an integer: {text[:80]!r}")
    return int(match.group(1))


def _parse_decimal(text: str) -> float:
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"not a number: {text[:80]!r}")
    return float(text)


def _parse_param(param: Param, raw: Optional[str]) -> Any:
    """One query value, read as the original reads it: a flag or number must be well-formed (an empty
    one is a 422), a choice is matched ignoring case and surrounding space, and an optional text
    filter is trimmed (blank: absent)."""
    if param.required and raw is None:
        raise Unprocessable(f"Query parameter '{param.name}' is required", code="validation_error")
    if param.required and raw == "":
        return raw
    if raw is not None and param.kind == "str" and not param.required:
        raw = raw.strip().lower() if param.choices else raw.strip()
    if raw is None or (raw == "" and param.kind == "str"):
        return param.default
    try:
        if param.kind == "int":
            value: Any = _parse_whole_number(raw)
        elif param.kind == "float":
            value = _parse_decimal(raw)
        elif param.kind == "bool":
            value = _parse_flag(raw)
        else:
            value = raw
    except ValueError:
        raise Unprocessable(f"Query parameter '{param.name}' must be a {param.kind}", code="validation_error") from None
    if param.kind == "float" and not math.isfinite(value):
        raise Unprocessable(f"Query parameter '{param.name}' must be a finite number", code="validation_error")
    low = param.minimum is not None and (value <= param.minimum if param.exclusive_minimum else value < param.minimum)
    if low or param.maximum is not None and value > param.maximum:
        floor = "above" if param.exclusive_minimum else "at least"
        bounds = [f"{floor} {param.minimum}"] if param.minimum is not None else []
        bounds += [f"at most {param.maximum}"] if param.maximum is not None else []
        raise Unprocessable(f"Query parameter '{param.name}' must be {' and '.join(bounds)}", code="validation_error")
    if param.choices and value not in param.choices:
        raise GatewayError(f"Invalid {param.name} (expected: {', '.join(param.choices)})", code="validation_error")
    return value


_JSON_TYPES = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list, "number": (int, float),
               "null": type(None)}


def _lax_scalar(value: Any, json_type: str) -> Any:
    """`value` read as `json_type` the way pydantic's lax mode reads a request field: a number or flag
    may come as its text (`"2"`, `"yes"`), a whole number as `2.0`, a flag as 0 or 1. ValueError if not."""
    if json_type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            return _parse_flag(value)
    elif json_type == "integer":
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
            return int(value)
        if isinstance(value, str) and len(value) <= 64:
            return _parse_whole_number(value)
        if isinstance(value, bool):
            return int(value)
    elif json_type == "number":
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and len(value) <= 64 and math.isfinite(number := _parse_decimal(value)):
            return number
    raise ValueError(f"not a {json_type}")


def _typed_field(name: str, prop: Dict[str, Any], value: Any) -> Any:
    """`value` if it has (one of) the field's JSON types, else as `_lax_scalar` reads it; 422 if neither."""
    types = prop.get("type")
    types = types if isinstance(types, list) else [types]
    if any(isinstance(value, _JSON_TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
           for t in types):
        return value
    for json_type in types:
        if json_type in ("boolean", "integer", "number"):
            try:
                return _lax_scalar(value, json_type)
            except (ValueError, OverflowError):
                continue
    raise Unprocessable(f"Field '{name}' must be {' or '.join(types)}", code="validation_error")


def _check_body(schema: Dict[str, Any], body: Any) -> Dict[str, Any]:
    """Validate a JSON body against a route's (flat) schema, reading numbers and flags as the original
    does (`_lax_scalar`, written back); 422 naming the field on mismatch."""
    if not isinstance(body, dict):
        raise Unprocessable("Request body must be a JSON object", code="validation_error")
    for name in schema.get("required", ()):
        if body.get(name) is None:
            raise Unprocessable(f"Field '{name}' is required", code="validation_error")
    for name, prop in schema.get("properties", {}).items():
        if body.get(name) is None:
            continue
        value = body[name] = _typed_field(name, prop, body[name])
        if isinstance(value, list) and prop.get("items", {}).get("type") == "object" and not all(
                isinstance(item, dict) for item in value):
            raise Unprocessable(f"Field '{name}' must be a list of objects", code="validation_error")
        if "enum" in prop and isinstance(value, str):
            value = body[name] = value.strip()  # `" pause "` is `pause`, as the original reads it
        if "enum" in prop and value not in prop["enum"]:
            raise GatewayError(f"{name} must be one of {'|'.join(prop['enum'])}", code="validation_error")
    return body


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf: not JSON, and not storable as such
        raise ValueError(f"number {text} is out of range")
    return value


# Request bodies: strict JSON (no NaN or Infinity, no number out of float range), one decoder for all.
_BODY_DECODER = json.JSONDecoder(parse_constant=_reject_json_constant, parse_float=_finite_float)


class InvalidText(GatewayError):
    """Text that cannot be stored: invalid UTF-8 or a lone surrogate (e.g. a JSON `\\ud800` escape)."""

    code = "invalid_text"


def _unencodable_path(value: Any) -> Optional[str]:
    """Where in a parsed JSON value a string (or key) is not encodable as UTF-8, e.g. `input_data.a[2]`;
    None if it all is. Iterative: a body nested as deep as the parser allows cannot overflow the stack."""
    stack: List[Tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not _is_utf8_text(item):
                return where or "(body)"
        elif isinstance(item, dict):
            for key, sub in item.items():
                name = f"{where}.{key}" if where else str(key)
                if not _is_utf8_text(key):
                    return where or "(body)"
                stack.append((name, sub))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", sub) for i, sub in enumerate(item))
    return None


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_request_text(environ: Dict[str, Any]) -> None:
    """Refuse a path or query string that is not valid UTF-8. Checked on the raw request target:
    werkzeug's server has already turned invalid bytes in PATH_INFO into U+FFFD, so the id a client
    sent and the one the gateway would store or report would silently differ."""
    target = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if target:
        raw = target.encode("latin-1", "replace")
        try:  # undo werkzeug's "encoding dance" (latin-1 request line re-encoded as UTF-8 text)
            raw = raw.decode("utf-8").encode("latin-1")
        except UnicodeError:
            pass  # a PEP 3333 server: the text already is the latin-1 view of the raw bytes
        path, _, query = raw.partition(b"?")
    else:
        path = environ.get("PATH_INFO", "").encode("latin-1", "replace")
        query = environ.get("QUERY_STRING", "").encode("latin-1", "replace")
    for name, data in (("path", path), ("query string", query.replace(b"+", b" "))):
        try:
            urllib.parse.unquote_to_bytes(data).decode("utf-8")
        except UnicodeError:
            raise InvalidText(f"The request {name} is not valid UTF-8 text") from None


def _safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot carry replaced by U+FFFD: for messages that echo client input."""
    return text if _is_utf8_text(text) else "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


@functools.lru_cache(maxsize=None)
def _status_line(status: int) -> str:
    """WSGI status line of a code ("200 OK"), looked up once per code."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class JsonResponse:
    """A JSON body as a minimal WSGI response: werkzeug's `Response` costs more than most bodies."""

    __slots__ = ("body", "status_code", "headers")

    def __init__(self, body: bytes, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self.body = body
        self.status_code = status
        self.headers = dict(headers or {})

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        start_response(_status_line(self.status_code), [("Content-Type", "application/json"),
                                                         ("Content-Length", str(len(self.body))),
                                                         *self.headers.items()])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [self.body]


def json_response(data: Any, status: int = 200, headers: Optional[Dict[str, str]] = None) -> JsonResponse:
    return JsonResponse(_json_dumps(data).encode("utf-8"), status, headers)


def error_response(status: int, code: str, detail: str, headers: Optional[Dict[str, str]] = None,
                   **extra: Any) -> JsonResponse:
    """The one error shape of the API: `{"detail": ..., "code": ...}` (a detail that echoes client input
    is made encodable, so an error can never turn into a 500 itself)."""
    return json_response({"detail": _safe_text(detail), "code": code, **extra}, status, headers)


# The HTTP status of each error the sections below HTTP raise, which carry a code only: by code first,
# then by the error's class. Storage: busy and I/O trouble may pass (503), a full disk needs the operator (507).
ERROR_STATUS = {
    "database_busy": 503, "disk_full": 507, "storage_error": 503,
    "workspace_not_configured": 403, "path_outside_workspace": 403, "path_escape": 403, "permission_denied": 403,
    "request_timeout": 408, "too_large": 413, "invalid_text": 422, "streams_unsupported": 501, "llm_failed": 502,
}
_CLASS_STATUS = ((NotFound, 404), (Conflict, 409), (Unprocessable, 422), (GatewayError, 400), (StorageError, 503))


def error_status(exc: GatewayError | StorageError) -> int:
    """The HTTP status that answers `exc`."""
    status = ERROR_STATUS.get(exc.code)
    if status is None:
        status = next(code for cls, code in _CLASS_STATUS if isinstance(exc, cls))
    return status


def _require_boundary(request: Request) -> None:
    """400 for a multipart body whose Content-Type names no boundary (it cannot be split into parts)."""
    if request.mimetype == "multipart/form-data" and not request.mimetype_params.get("boundary"):
        raise GatewayError("Missing boundary in multipart.", code="invalid_multipart")


class GatewayApp:
    """The WSGI application: dispatches `ROUTES` to handler methods."""

    def __init__(self, gateway: Gateway, runner: Optional[Runner] = None) -> None:
        self.gateway = gateway
        self.runner = runner
        self.stopping = threading.Event()
        self._streams = 0
        self._streams_changed = threading.Condition()
        self._openapi: Optional[bytes] = None
        config = gateway.config
        private = (Path(config.data_dir), *(Path(f"{config.db_path}{end}") for end in ("", "-wal", "-shm")))
        self.workspace = Workspace(config.workspace_mounts, config.workspace_dir, private=private)
        self.knowledge_graph = KnowledgeGraph(gateway.knowledge_graph, gateway.stores.runs)

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        from werkzeug.exceptions import HTTPException
        from werkzeug.wrappers import Request

        request = Request(environ)
        request_id = environ.get("abstractgateway.request_id") or os.urandom(8).hex()
        try:
            failed_commit = environ.get(FAILED_COMMIT_KEY)
            if failed_commit is not None:  # its writes were rolled back with a shared transaction (HttpServer)
                raise failed_commit
            _check_request_text(environ)
            match = route_match(environ)
            if match.error is not None:
                raise match.error
            route = match.route
            # a repeated parameter: the last value counts, as on the original
            query = {p.name: _parse_param(p, (request.args.getlist(p.name) or [None])[-1]) for p in route.query}
            body = None
            if route.body is not None:
                body = _check_body(route.body, self._json_body(request))
            response = getattr(self, route.handler)(request, *match.args.values(), **query,
                                                    **({"body": body} if route.body else {}))
        except GatewayError as exc:
            response = error_response(error_status(exc), exc.code, exc.detail)
        except (StorageError, *_STORAGE_FAILURES) as exc:  # a passing condition of the disk, not a bug
            err = storage_error(exc)
            response = error_response(error_status(err), err.code, err.detail)
            if err.retry_after_s:
                response.headers["Retry-After"] = str(err.retry_after_s)
        except HTTPException as exc:
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.code or 500, "http_error")
            allowed = getattr(exc, "valid_methods", None)  # a 405 says which methods the path does take
            response = error_response(exc.code or 500, code, exc.description or exc.name,
                                      {"Allow": ", ".join(sorted(allowed))} if allowed else None)
        except Exception as exc:  # noqa: BLE001 - a 500 is a bug: log it with the request id
            import traceback

            _log(f"500 on {request.method} {request.path} request_id={request_id}: {type(exc).__name__}: {exc}\n"
                 + traceback.format_exc())
            response = error_response(500, "internal_error", f"Internal error (request id {request_id})",
                                      request_id=request_id)
        response.headers["X-Request-Id"] = request_id
        return response(environ, start_response)

    def stream_started(self) -> None:
        """Count an SSE stream as open (the stream writer calls this, and `stream_ended` once it closes)."""
        with self._streams_changed:
            self._streams += 1

    def stream_ended(self) -> None:
        with self._streams_changed:
            self._streams -= 1
            self._streams_changed.notify_all()

    def drain(self, timeout: float) -> bool:
        """Tell streams to finish (each sends a final `server_stopping` event) and wait for them; True if all ended."""
        self.stopping.set()
        with self._streams_changed:
            return self._streams_changed.wait_for(lambda: self._streams == 0, timeout)

    @staticmethod
    def _json_body(request: Request) -> Any:
        # Read until the stream says it ended: a capped stream (BodyLimitMiddleware) raises 413 on the
        # read past its cap, where one `read()` would stop at the cap and hand back a truncated body.
        raw = b"".join(iter(functools.partial(request.stream.read, 1 << 16), b""))
        if not raw.strip():  # as the original (a required body model): even a route whose fields are all optional
            raise Unprocessable("Request body is required (a JSON object)", code="validation_error")
        if not request.is_json:  # as the original: a body that does not say it is JSON is not read as JSON
            raise Unprocessable("Request body must be sent as JSON (Content-Type: application/json)",
                                code="validation_error")
        try:
            body = _BODY_DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads
        except (ValueError, RecursionError) as exc:
            raise Unprocessable(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        where = _unencodable_path(body)
        if where is not None:
            raise InvalidText(f"Field '{_safe_text(where)}' holds text that cannot be stored "
                              "(a lone surrogate or invalid UTF-8)")
        return body

    # -- meta -------------------------------------------------------------------------------------

    def health(self, request: Request) -> Response:
        """Liveness plus what an operator needs to trust it: can the store be read, did a write fail
        lately (disk full, busy, I/O), who holds the runner lease and since when."""
        db = self.gateway.stores.db
        store: Dict[str, Any] = {"backend": self.gateway.stores.backend, "ok": True}
        try:
            db.query_one("SELECT 1 FROM runs LIMIT 1")
            problem = db.file_problem()
            if problem is not None:
                raise StorageError(problem)
        except (apsw.Error, StorageError) as exc:
            err = storage_error(exc)
            store.update(ok=False, error=err.detail, code=err.code)
        failure = db.write_failure
        if failure is not None:
            store.update(ok=False, write_failure=failure)
        if db.wal_damage is not None:  # found when the file was opened: an operator must look, once
            store["wal_damage"] = db.wal_damage
        runner: Dict[str, Any] = {"enabled": self.runner is not None}
        holder = None
        try:
            holder = self.gateway.stores.leases.holder(Runner.LEASE)
        except (apsw.Error, StorageError):
            pass
        if holder is not None:
            runner["lease"] = {"owner": holder["owner"], "live": holder["live"], "epoch": holder["epoch"],
                               "held_for_s": holder["age_s"], "heartbeat_age_s": holder["heartbeat_age_s"]}
        if self.runner is not None:
            runner.update(alive=self.runner.alive, has_lease=self.runner.has_lease, last_error=self.runner.last_error)
        else:
            runner.update(external_lease_live=bool(holder and holder["live"]))
        ok = store["ok"] and (self.runner is None or self.runner.alive)
        return json_response({"status": "healthy" if ok else "degraded", "ok": ok, "service": "abstractgateway",
                              "version": __version__, "store": store, "runner": runner})

    def ping(self, request: Request) -> Response:
        # The database path is told only to token holders (the console shows it after sign-in).
        return json_response({"ok": True, "status": "healthy", "service": "abstractgateway", "time": utc_now_iso(),
                              **self.gateway.stores.describe()})

    def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = _json_dumps(openapi_document()).encode()
        return _response(self._openapi, content_type="application/json")

    def docs(self, request: Request) -> Response:
        return _response(DOCS_HTML, content_type="text/html; charset=utf-8")

    # -- console --------------------------------------------------------------------------------------

    def console_root(self, request: Request) -> Response:
        return self.console_page(request)

    def console_page(self, request: Request) -> Response:
        return self._console_file("abstractgateway_console.html", "text/html; charset=utf-8")

    def console_script(self, request: Request) -> Response:
        return self._console_file("abstractgateway_console.js", "text/javascript; charset=utf-8")

    def console_style(self, request: Request) -> Response:
        return self._console_file("abstractgateway_console.css", "text/css; charset=utf-8")

    def _console_file(self, name: str, content_type: str) -> Response:
        """One console file with the page's security headers; 404 when the console is turned off.

        The page holds no secret (the user pastes the token, kept in sessionStorage), so it is
        served without auth; the CSP lets it load only its own script and style and talk only
        to this origin, and it may not be framed.
        """
        if not self.gateway.config.console:
            raise NotFound("The console is turned off (ABSTRACTGATEWAY_CONSOLE=0)", code="not_found")
        return _response(read_console_file(name), content_type=content_type, headers=CONSOLE_HEADERS)

    # -- bundles ------------------------------------------------------------------------------------

    def _entrypoint(self, bundle: LoadedBundle, entry: Any, detail: bool = False) -> Dict[str, Any]:
        mark = self.gateway.host.deprecation(bundle.bundle_id, entry.flow_id)
        out = {"flow_id": entry.flow_id,
               "workflow_id": workflow_id_for(bundle.bundle_id, bundle.bundle_version, entry.flow_id),
               "name": entry.name, "description": entry.description, "interfaces": list(entry.interfaces),
               "deprecated": mark is not None, "deprecated_at": mark["deprecated_at"] if mark else None,
               "deprecated_reason": mark["reason"] if mark else None}
        if detail:
            flow = bundle.flows.get(entry.flow_id) or {}
            out["inputs"] = _start_pins(flow)
            out["node_index"] = _node_index(flow)
        return out

    def _bundle_view(self, bundle: LoadedBundle, detail: bool = False,
                     include_deprecated: bool = True) -> Dict[str, Any]:
        entries = [self._entrypoint(bundle, e, detail) for e in bundle.entrypoints]
        if not include_deprecated:
            entries = [e for e in entries if not e["deprecated"]]
        view = {"bundle_id": bundle.bundle_id, "bundle_version": bundle.bundle_version, "bundle_ref": bundle.ref,
                "created_at": bundle.created_at, "default_entrypoint": bundle.default_entrypoint,
                "entrypoints": entries,
                "origin": "upload" if bundle.origin == "upload" else "flows_dir", "load_error": bundle.load_error,
                "needs": [f"llm:{t}" for t in bundle.needs]
                + sorted({f"capability:{CAPABILITY_PACKAGES[t][1]}" for t in bundle.needs if t in CAPABILITY_PACKAGES})}
        if detail:
            view["flows"] = sorted(bundle.flows)
            view["metadata"] = dict(getattr(bundle.manifest, "metadata", None) or {})
        return view

    def list_bundles(self, request: Request, all_versions: bool, include_deprecated: bool) -> Response:
        host = self.gateway.host
        host.require_bundle_source()
        items = []
        for bundle_id in sorted(host.catalog.bundles):
            chosen = sorted(host.catalog.bundles[bundle_id].values(), key=lambda b: b.bundle_version) \
                if all_versions else [host.latest(bundle_id)]
            for bundle in chosen:
                view = self._bundle_view(bundle, include_deprecated=include_deprecated)
                if view["entrypoints"] or bundle.load_error:
                    items.append(view)
        default = host.default_bundle_id()
        if default is not None and not any(i["bundle_id"] == default for i in items):
            default = None
        return json_response({"items": items, "default_bundle_id": default})

    def get_bundle(self, request: Request, bundle_id: str, bundle_version: Optional[str]) -> Response:
        self.gateway.host.require_bundle_source()
        return json_response(self._bundle_view(self.gateway.host.bundle(bundle_id, bundle_version), detail=True))

    def upload_bundle(self, request: Request) -> Response:
        host = self.gateway.host
        host.require_bundle_source()
        cap = self.gateway.config.max_bundle_bytes
        if request.content_length is not None and request.content_length > cap + MULTIPART_OVERHEAD:
            raise GatewayError(f"Bundle too large ({request.content_length} bytes > {cap} bytes)",
                               code="too_large")
        request.max_content_length = cap + MULTIPART_OVERHEAD
        _require_boundary(request)
        uploads = request.files.getlist("file")
        if not uploads:
            raise Unprocessable("Field 'file' is required (multipart/form-data)", code="validation_error")
        content = uploads[-1].read(cap + 1)  # a repeated field: the last one counts, as on the original
        if len(content) > cap:
            raise GatewayError(f"Bundle too large (> {cap} bytes)", code="too_large")
        # an empty form flag is its default (as FastAPI reads forms)
        flags = {name: _parse_param(Param(name, "bool", default), (request.form.getlist(name) or [""])[-1] or None)
                 for name, default in (("overwrite", False), ("reload", True))}
        bundle = host.install(content, overwrite=flags["overwrite"])
        reloaded, reload_error = self._reload(flags["reload"])
        return json_response({"ok": True, "bundle_id": bundle.bundle_id, "bundle_version": bundle.bundle_version,
                              "bundle_ref": bundle.ref, "sha256": bundle.sha256,
                              "default_entrypoint": bundle.default_entrypoint,
                              "entrypoints": [{"flow_id": e.flow_id, "name": e.name, "description": e.description,
                                               "interfaces": list(e.interfaces)} for e in bundle.entrypoints],
                              "gateway_reloaded": reloaded, "gateway_reload_error": reload_error})

    def _reload(self, wanted: bool) -> Tuple[bool, Optional[str]]:
        if not wanted:
            return False, None
        try:
            self.gateway.host.reload()
        except Exception as exc:  # noqa: BLE001 - reported in the response, the upload itself stands
            return False, f"{type(exc).__name__}: {exc}"
        return True, None

    def reload_bundles(self, request: Request) -> Response:
        catalog = self.gateway.host.reload()
        return json_response({"ok": True, "bundle_ids": sorted(catalog.bundles), "count": len(catalog.bundles),
                              "errors": catalog.errors})

    def delete_bundle(self, request: Request, bundle_id: str, bundle_version: Optional[str], reload: bool) -> Response:
        self.gateway.host.require_bundle_source()
        bid, version = split_bundle_ref(bundle_id, bundle_version)
        try:
            removed = self.gateway.host.remove(bid, version)
        except GatewayError:
            self.gateway.host.reload()  # files removed before the failure are gone: list what is left
            raise
        ref = f"{bid}@{version}" if version else bid
        if not removed:
            raise NotFound(f"Bundle '{ref}' not found", code="bundle_not_found")
        reloaded, reload_error = self._reload(reload)
        return json_response({"ok": True, "bundle_ref": ref, "removed": removed, "gateway_reloaded": reloaded,
                              "gateway_reload_error": reload_error})

    def deprecate_bundle(self, request: Request, bundle_id: str, body: Dict[str, Any]) -> Response:
        bundle, flow_id = self._deprecation_target(bundle_id, body)
        reason = str(body.get("reason") or "").strip() or None
        at = self.gateway.stores.deprecations.set(bundle.bundle_id, flow_id, reason)
        return json_response({"ok": True, "bundle_id": bundle.bundle_id, "flow_id": flow_id, "deprecated_at": at,
                              "reason": reason})

    def undeprecate_bundle(self, request: Request, bundle_id: str, body: Dict[str, Any]) -> Response:
        """Clear a deprecation. The bundle need not be installed (as on the original): a deprecation left
        by a removed bundle can be cleared, and making sure one is gone never fails."""
        self.gateway.host.require_bundle_source()
        bundle_id = bundle_id.strip()
        if not bundle_id:
            raise GatewayError("bundle_id is required", code="validation_error")
        flow_id = (body.get("flow_id") or "").strip() or "*"
        removed = self.gateway.stores.deprecations.clear(bundle_id, flow_id)
        return json_response({"ok": True, "bundle_id": bundle_id, "flow_id": flow_id, "removed": removed})

    def _deprecation_target(self, bundle_id: str, body: Dict[str, Any]) -> Tuple[LoadedBundle, str]:
        """A deprecation names a bundle id (every version of it): `id@version` is no bundle id (404)."""
        self.gateway.host.require_bundle_source()
        if "@" in bundle_id:
            raise NotFound(f"Bundle '{bundle_id.strip()}' not found", code="bundle_not_found")
        bundle = self.gateway.host.bundle(bundle_id)
        flow_id = (body.get("flow_id") or "").strip() or "*"
        if flow_id != "*" and flow_id not in {e.flow_id for e in bundle.entrypoints}:
            raise NotFound(f"Entrypoint '{bundle.bundle_id}:{flow_id}' not found", code="flow_not_found")
        return bundle, flow_id

    def get_bundle_flow(self, request: Request, bundle_id: str, flow_id: str,
                        bundle_version: Optional[str]) -> Response:
        self.gateway.host.require_bundle_source()
        bid, version = split_bundle_ref(bundle_id, bundle_version)
        if ":" in flow_id:
            prefix, _, flow_id = flow_id.partition(":")
            pid, pversion = split_bundle_ref(prefix, None)
            if pid != bid or (pversion and version and pversion != version):
                raise GatewayError(f"flow_id prefix '{prefix}' does not match bundle '{bundle_id}'",
                                   code="version_conflict")
            version = version or pversion
        return json_response(self._bundle_flow_view(self.gateway.host.bundle(bid, version), flow_id))

    @staticmethod
    def _bundle_flow_view(bundle: LoadedBundle, flow_id: str) -> Dict[str, Any]:
        """A bundle flow exactly as authored (editors round-trip it), with the ids that name it."""
        flow = bundle.flows.get(flow_id)
        if flow is None:
            raise NotFound(f"Flow '{flow_id}' not found in bundle '{bundle.ref}'", code="flow_not_found")
        return {"bundle_id": bundle.bundle_id, "bundle_version": bundle.bundle_version, "bundle_ref": bundle.ref,
                "flow_id": flow_id, "workflow_id": workflow_id_for(bundle.bundle_id, bundle.bundle_version, flow_id),
                "flow": flow}

    def get_workflow_flow(self, request: Request, workflow_id: str) -> Response:
        host = self.gateway.host
        if workflow_id.startswith(SCHEDULE_PREFIX):  # read from the store: an update_schedule shows at once
            definition = self.gateway.stores.dynamic_flows.get(workflow_id)
            if definition is not None:
                return json_response({"workflow_id": workflow_id, "flow": schedule_visualflow(workflow_id, definition),
                                      "source": "dynamic"})
        elif host.source == "visualflow":
            flow = host.catalog.flows.get(workflow_id)
            if flow is not None:
                return json_response({"workflow_id": workflow_id, "flow": flow, "source": "visualflow"})
        elif ":" in workflow_id:  # bundle@version:flow_id, or bundle:flow_id for the latest version
            prefix, _, flow_id = workflow_id.partition(":")
            try:
                return json_response({**self._bundle_flow_view(host.bundle(prefix), flow_id), "source": "bundle"})
            except NotFound:
                pass
        raise NotFound(f"Workflow '{workflow_id}' not found", code="workflow_not_found")

    # -- runs ---------------------------------------------------------------------------------------

    def start_run(self, request: Request, body: Dict[str, Any]) -> Response:
        run_id = self.gateway.start_run(bundle_id=body.get("bundle_id"), bundle_version=body.get("bundle_version"),
                                        flow_id=body.get("flow_id"), input_data=body.get("input_data") or {},
                                        session_id=body.get("session_id"))
        return json_response({"run_id": run_id})

    def schedule_run(self, request: Request, body: Dict[str, Any]) -> Response:
        run_id = self.gateway.schedule_run(
            bundle_id=body.get("bundle_id"), bundle_version=body.get("bundle_version"), flow_id=body.get("flow_id"),
            input_data=body.get("input_data") or {}, start_at=body.get("start_at"), interval=body.get("interval"),
            repeat_count=body.get("repeat_count"), repeat_until=body.get("repeat_until"),
            share_context=body.get("share_context", True), session_id=body.get("session_id"))
        return json_response({"run_id": run_id})

    def list_runs(self, request: Request, limit: int, status: Optional[str], workflow_id: Optional[str],
                  session_id: Optional[str], root_only: bool, include_ledger_len: bool, cursor: Optional[str],
                  include_metrics: bool) -> Response:
        before = _decode_cursor(cursor) if cursor else None
        runs, next_before = self.gateway.stores.runs.list_run_page(
            status=RunStatus(status) if status else None, workflow_id=workflow_id, session_id=session_id,
            root_only=root_only, limit=limit, before=before, exclude_internal=workflow_id is None)
        ids = [run.run_id for run in runs]
        counts = self.gateway.stores.ledger.count_many(ids) if include_ledger_len else {}
        metrics = self.gateway.stores.ledger.metrics_many(ids) if include_metrics else {}
        items = []
        for run in runs:
            item = run_summary(run)  # the shape of `GET /runs/{id}`: one summary, not two
            if include_ledger_len:
                item["ledger_len"] = counts.get(run.run_id, 0)
            if include_metrics:  # like the original: null for a run with no completed step yet
                item.update(metrics.get(run.run_id) or dict.fromkeys(("steps", "llm_calls", "tool_calls",
                                                                     "tokens_total")))
            items.append(item)
        next_cursor = _encode_cursor(*next_before) if next_before else None
        return json_response({"items": items, "next_cursor": next_cursor})

    def get_run(self, request: Request, run_id: str) -> Response:
        text = self.gateway.stores.runs.load_json(run_id)
        summarize = _summary_body if text is None or len(text) > _SUMMARY_TEXT_MAX else _cached_summary_body
        body = None if text is None else summarize(text)
        if body is None:
            raise run_not_found(run_id)
        return JsonResponse(body)

    def get_run_input(self, request: Request, run_id: str) -> Response:
        state = self.gateway.load_run(run_id)
        run_vars = state.vars if isinstance(state.vars, dict) else {}
        workflow_id = state.workflow_id
        sched = schedule_of(state)
        if sched is not None:  # a scheduled parent: its target and the payload it passes on (its own workflow_id)
            workflow_id, run_vars = sched["target_workflow_id"], run_vars.get("vars") or {}
        flow = self.gateway.host.catalog.flows.get(workflow_id)
        bundle_id = bundle_version = flow_id = None
        if ":" in workflow_id:
            ref, _, flow_id = workflow_id.partition(":")
            bundle_id, _, bundle_version = ref.partition("@")
        pins = [p["id"] for p in _start_pins(flow)] if flow is not None else []
        if pins:
            data = {k: run_vars[k] for k in pins if k in run_vars}
        elif sched is not None:  # the target's flow is gone, or takes no pins: the payload it was given
            data = dict(run_vars)
        else:  # the flow is gone (its bundle removed) or takes no pins: its public vars are all there is
            data = {k: v for k, v in run_vars.items() if not k.startswith("_")}
        return json_response({"run_id": state.run_id, "workflow_id": state.workflow_id, "bundle_id": bundle_id,
                              "bundle_version": bundle_version or None, "flow_id": flow_id, "pin_ids": pins,
                              "input_data": data})

    def get_history_bundle(self, request: Request, run_id: str, include_subruns: bool, include_session: bool,
                           session_turn_limit: int, ledger_mode: str, ledger_max_items: int) -> Response:
        from abstractruntime.history_bundle import export_run_history_bundle

        self.gateway.load_run(run_id)
        stores = self.gateway.stores
        return json_response(export_run_history_bundle(
            run_id=run_id, run_store=stores.runs, ledger_store=stores.ledger, artifact_store=stores.artifacts,
            include_subruns=include_subruns, include_session=include_session, session_turn_limit=session_turn_limit,
            ledger_mode=ledger_mode, ledger_max_items=ledger_max_items))

    def list_run_commands(self, request: Request, run_id: str, limit: int) -> Response:
        self.gateway.load_run(run_id)
        records = self.gateway.stores.commands.for_run(run_id, limit=limit)
        return json_response({"items": [self.gateway.command_status(r.command_id, r) for r in records]})

    # -- artifacts ------------------------------------------------------------------------------------

    def _artifact_meta(self, run_id: str, artifact_id: str) -> ArtifactMetadata:
        self.gateway.load_run(run_id)
        try:
            validate_artifact_id(artifact_id)
        except ValueError:
            raise GatewayError(f"Invalid artifact id: {artifact_id!r}", code="invalid_artifact_id") from None
        meta = self.gateway.stores.artifacts.get_metadata(artifact_id)
        if meta is None or (meta.run_id and meta.run_id != run_id):
            raise NotFound(f"Artifact '{artifact_id}' not found", code="artifact_not_found")
        return meta

    def list_artifacts(self, request: Request, run_id: str, limit: int) -> Response:
        if run_id.startswith("session_memory_") and not self.gateway.stores.runs.exists(run_id):
            return json_response({"items": []})  # a session without attachments yet (the original: empty too)
        self.gateway.load_run(run_id)
        metas = sorted(self.gateway.stores.artifacts.list_by_run(run_id), key=lambda m: m.created_at, reverse=True)
        return json_response({"items": [{"artifact_id": m.artifact_id, "content_type": m.content_type,
                                         "size_bytes": m.size_bytes, "created_at": m.created_at, "tags": m.tags or {}}
                                        for m in metas[:limit]]})

    def get_artifact(self, request: Request, run_id: str, artifact_id: str) -> Response:
        return json_response(self._artifact_meta(run_id, artifact_id).to_dict())

    def get_artifact_content(self, request: Request, run_id: str, artifact_id: str) -> Response:
        meta = self._artifact_meta(run_id, artifact_id)
        size = int(meta.size_bytes)
        start, end, status = 0, size, 200
        byte_range = request.range
        if byte_range is not None:
            bounds = byte_range.range_for_length(size)
            if bounds is None:
                return _response(status=416, headers={"Content-Range": f"bytes */{size}"})
            (start, end), status = bounds, 206
        store = self.gateway.stores.artifacts

        def chunks() -> Iterator[bytes]:
            for offset in range(start, end, _ARTIFACT_CHUNK):
                yield store.read_range(artifact_id, offset, min(_ARTIFACT_CHUNK, end - offset))

        # An artifact is whatever a run or a client stored (an uploaded or agent-read `.html`, an SVG):
        # opened in a browser, it must not run script on the gateway's origin, where the console's
        # token lives. A sandboxed document has an origin of its own and runs no script.
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start), "Content-Security-Policy": "sandbox"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        content_type = meta.content_type or "application/octet-stream"
        if content_type.lower().startswith("text/") and "charset" not in content_type.lower():
            content_type += "; charset=utf-8"  # as the original (Starlette) labels text
        return _response(chunks(), status=status, headers=headers, content_type=content_type,
                         direct_passthrough=True)

    # -- ledger ---------------------------------------------------------------------------------------

    def _require_run(self, run_id: str) -> None:
        if not self.gateway.stores.runs.exists(run_id):
            raise run_not_found(run_id)

    def summarize_run(self, request: Request, run_id: str, body: Dict[str, Any]) -> Response:
        return json_response(self.gateway.summarize_run(run_id, provider=body.get("provider"), model=body.get("model"),
                                                        include_subruns=body.get("include_subruns", True)))

    def chat_about_run(self, request: Request, run_id: str, body: Dict[str, Any]) -> Response:
        return json_response(self.gateway.chat_about_run(
            run_id, body.get("messages") or [], provider=body.get("provider"), model=body.get("model"),
            include_subruns=body.get("include_subruns", True), persist=body.get("persist", False)))

    def get_ledger(self, request: Request, run_id: str, after: int, limit: int) -> Response:
        """A page of the ledger; an unknown run's is empty, as on the original (a replay loop may start
        before the run is visible to it)."""
        rows = self.gateway.stores.ledger.page_json(run_id, after, limit)
        body = '{"items":[' + ",".join(rows) + '],"next_after":' + str(after + len(rows)) + "}"
        return _response(body, content_type="application/json")

    def ledger_batch(self, request: Request, body: Dict[str, Any]) -> Response:
        """Pages of several ledgers, as on the original: blank run ids are skipped, an unknown run's page is
        empty, a run asked for twice is answered once (its last entry)."""
        limit = 200 if body.get("limit") is None else body["limit"]
        if not 1 <= limit <= 2000:
            raise Unprocessable("Field 'limit' must be between 1 and 2000", code="validation_error")
        pages: Dict[str, str] = {}
        for entry in body.get("runs") or []:
            if not isinstance(entry, dict):
                raise Unprocessable("Field 'runs' must be a list of {run_id, after}", code="validation_error")
            run_id = entry.get("run_id")
            if not isinstance(run_id, str):
                raise Unprocessable("Field 'runs[].run_id' must be a string", code="validation_error")
            run_id = run_id.strip()
            if not run_id:
                continue
            after = entry.get("after") or 0
            try:  # read as the original reads it ("3", 3.0 and true are numbers); past any cursor, a last page
                after = after if type(after) is int else _lax_scalar(after, "integer")
            except ValueError:
                after = -1
            if after < 0:
                raise Unprocessable("Field 'runs[].after' must be a non-negative integer", code="validation_error")
            rows = self.gateway.stores.ledger.page_json(run_id, min(after, MAX_CURSOR), limit)
            pages[run_id] = '{"items":[' + ",".join(rows) + '],"next_after":' + str(after + len(rows)) + "}"
        parts = (_json_dumps(run_id) + ":" + page for run_id, page in pages.items())
        return _response('{"runs":{' + ",".join(parts) + "}}", content_type="application/json")

    def stream_ledger(self, request: Request, run_id: str, after: int, heartbeat_s: float) -> Response:
        self._require_run(run_id)
        # A browser EventSource reconnects to the same URL with the last id it saw: the cursor, when the
        # URL gives none. An explicit `after` wins, and a header that is no cursor is ignored.
        last_event_id = request.headers.get("Last-Event-ID", "").strip()
        if "after" not in request.args and len(last_event_id) <= 18 and last_event_id.isascii() \
                and last_event_id.isdigit():  # 18 digits: always within MAX_CURSOR
            after = int(last_event_id)
        if not request.environ.get("abstractgateway.streams"):
            raise GatewayError("SSE needs the gateway's own server (`abstractgateway serve`)",
                               code="streams_unsupported")
        # The server hands the connection to its stream writer once the middlewares let this 200 through.
        request.environ["abstractgateway.sse"] = LedgerStream(self.gateway, run_id, after, heartbeat_s, self)
        return _response(iter(()), content_type="text/event-stream; charset=utf-8",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- commands -------------------------------------------------------------------------------------

    def submit_command(self, request: Request, body: Dict[str, Any]) -> Response:
        result = self.gateway.submit_command(command_id=body["command_id"], run_id=body["run_id"], type=body["type"],
                                             payload=body.get("payload") or {}, ts=body.get("ts"),
                                             client_id=body.get("client_id"))
        return json_response({"accepted": result.accepted, "duplicate": result.duplicate, "seq": result.seq})

    def audit_tail(self, request: Request, limit: int, max_bytes: int) -> Response:
        """Whole JSONL lines, oldest first, as many of the newest as fit in `max_bytes` (the original
        served the file's last bytes; whole lines are the same text without a cut first line)."""
        audit = self.gateway.stores.audit
        lines: List[bytes] = []
        size, truncated, before = 0, False, None
        while not truncated:
            rows = audit.tail(500, before_id=before)
            if not rows:
                break
            for row in rows:
                line = _json_dumps(AuditStore.jsonl_entry(row)).encode("utf-8") + b"\n"
                if size + len(line) > max_bytes:
                    truncated = True
                    break
                lines.append(line)
                size += len(line)
            before = rows[-1]["id"]
        content = b"".join(reversed(lines)).decode("utf-8")
        return json_response({"ok": True, "bytes": size, "truncated": truncated, "content": content,
                              "items": audit.tail(limit)})

    def get_command(self, request: Request, command_id: str) -> Response:
        return json_response(self.gateway.command_status(command_id))

    # -- workspace files and attachments ---------------------------------------------------------

    def workspace_policy(self, request: Request) -> Response:
        trusted = self.gateway.config.tool_mode == "local"  # see `_workspace_scope_within`
        return json_response({"ok": True, "policy": {
            "target": "server", "mounts": [{"name": name} for name in sorted(self.workspace.mounts)],
            "max_attachment_bytes": self.gateway.config.max_attachment_bytes,
            "client_workspace_scope_overrides": trusted,
            "allowed_access_modes": ["workspace_only", "workspace_or_allowed"] + ["all_except_ignored"] * trusted}})

    def files_search(self, request: Request, query: str, limit: int) -> Response:
        return json_response({"items": self.workspace.search(query, limit)})

    def files_read(self, request: Request, path: str, start_line: int, end_line: Optional[int]) -> Response:
        return json_response(self.workspace.read(path, start_line, end_line))

    def files_skim(self, request: Request, path: str, target_percent: float, head_lines: int,
                   tail_lines: int) -> Response:
        return json_response(self.workspace.skim(path, target_percent, head_lines, tail_lines))

    def attachments_upload(self, request: Request) -> Response:
        cap = self.gateway.config.max_attachment_bytes
        if request.content_length is not None and request.content_length > cap + MULTIPART_OVERHEAD:
            raise GatewayError(f"Attachment too large ({request.content_length} bytes > {cap} bytes)",
                               code="too_large")
        request.max_content_length = cap + MULTIPART_OVERHEAD  # also bounds chunked bodies, while parsing
        _require_boundary(request)
        uploads = request.files.getlist("file")
        if not uploads:
            raise Unprocessable("Field 'file' is required (multipart/form-data)", code="validation_error")
        upload = uploads[-1]
        session_id = request.form.get("session_id")
        if session_id is None:
            raise Unprocessable("Field 'session_id' is required", code="validation_error")
        if not session_id.strip():
            raise GatewayError("session_id is required", code="validation_error")
        content = upload.read(cap + 1)
        if len(content) > cap:
            raise GatewayError(f"Attachment too large (more than {cap} bytes)", code="too_large")
        filename = (request.form.get("filename") or "").strip() or (upload.filename or "").strip() or "upload.bin"
        content_type = (request.form.get("content_type") or "").strip() or (upload.mimetype or "")
        return json_response(store_attachment(
            self.gateway.stores, session_id=session_id.strip(), content=content, filename=filename,
            content_type=content_type, target="client", source="upload", path=f"client:{filename}"))

    def attachments_ingest(self, request: Request, body: Dict[str, Any]) -> Response:
        session_id = str(body["session_id"]).strip()
        if not session_id:
            raise GatewayError("session_id is required", code="validation_error")
        real, name = self.workspace.resolve(body["path"])
        if not real.exists():
            raise NotFound("File not found", code="file_not_found")
        if not real.is_file():
            raise GatewayError("Path is not a file", code="not_a_file")
        cap = self.gateway.config.max_attachment_bytes
        try:
            size = real.stat().st_size
            if size > cap:
                raise GatewayError(f"Attachment too large ({size} bytes > {cap} bytes)", code="too_large")
            with open(real, "rb") as fh:
                content = fh.read(cap + 1)
        except PermissionError:
            raise GatewayError(f"Permission denied reading '{name}'", code="permission_denied") from None
        if len(content) > cap:  # it grew since the stat
            raise GatewayError(f"Attachment too large (more than {cap} bytes)", code="too_large")
        filename = str(body.get("filename") or "").strip() or real.name
        return json_response(store_attachment(
            self.gateway.stores, session_id=session_id, content=content, filename=filename,
            content_type=str(body.get("content_type") or ""), target="server", source="workspace", path=name))

    # -- knowledge graph and reports inbox --------------------------------------------------------

    def kg_query(self, request: Request, body: Dict[str, Any]) -> Response:
        return json_response(self.knowledge_graph.query(body))

    def bugs_report(self, request: Request, body: Dict[str, Any]) -> Response:
        return json_response(file_report(self.gateway.stores, "bug", body))

    def features_report(self, request: Request, body: Dict[str, Any]) -> Response:
        return json_response(file_report(self.gateway.stores, "feature", body))

    def _report_list(self, report_type: str) -> Response:
        folder = REPORT_FOLDERS[report_type]
        return json_response({"items": [{**row, "relpath": f"{folder}/{row['filename']}", "decision_id": "",
                                         "triage_status": ""}
                                        for row in self.gateway.stores.reports.list(report_type)]})

    def list_bug_reports(self, request: Request) -> Response:
        return self._report_list("bug")

    def list_feature_reports(self, request: Request) -> Response:
        return self._report_list("feature")

    def _report_content(self, report_type: str, filename: str) -> Response:
        if not report_filename_ok(filename):
            raise GatewayError("Invalid filename", code="invalid_filename")
        content = self.gateway.stores.reports.content(report_type, filename)
        if content is None:
            what = "Bug report" if report_type == "bug" else "Feature request"
            raise NotFound(f"{what} not found", code="report_not_found")
        return json_response({"report_type": report_type, "filename": filename,
                              "relpath": f"{REPORT_FOLDERS[report_type]}/{filename}", "content": content})

    def bug_report_content(self, request: Request, filename: str) -> Response:
        return self._report_content("bug", filename)

    def feature_report_content(self, request: Request, filename: str) -> Response:
        return self._report_content("feature", filename)


    # -- discovery ----------------------------------------------------------------------------------

    def discovery_providers(self, request: Request, include_models: bool) -> Response:
        default = self.gateway.host.default_llm("") or ("", "")
        out: Dict[str, Any] = {"items": [], "default_provider": default[0] or None, "default_model": default[1] or None,
                               "configured": sorted(configured_providers())}
        if not llm_integration_available():
            return json_response(dict(out, error=f"the LLM integration is not installed ({LLM_EXTRA})"))
        try:
            out["items"] = provider_catalog(include_models)
        except Exception as exc:  # noqa: BLE001 - a provider plugin failing must not break discovery
            out["error"] = f"{type(exc).__name__}: {exc}"
        return json_response(out)

    def discovery_provider_models(self, request: Request, provider_name: str) -> Response:
        if not llm_integration_available():
            return json_response({"provider": provider_name, "models": [],
                                  "error": f"the LLM integration is not installed ({LLM_EXTRA})"})
        from abstractcore.providers.registry import list_available_providers

        name = provider_name.strip().lower()  # `OpenAI` is `openai`, as on the original
        if name not in list_available_providers():  # an answer, as the original gives (no models)
            return json_response({"provider": provider_name, "models": [], "error": (
                f"Provider '{provider_name}' is not known (GET {API}/discovery/providers lists them)")})
        try:
            return json_response({"provider": provider_name, "models": provider_models(name)})
        except Exception as exc:  # noqa: BLE001 - unknown provider, no answer, timeout: say which
            return json_response({"provider": provider_name, "models": [], "error": f"{type(exc).__name__}: {exc}"})

    def discovery_tools(self, request: Request) -> Response:
        mode = self.gateway.config.tool_mode
        if not llm_integration_available():
            return json_response({"items": [], "tool_mode": mode,
                                  "error": f"the LLM integration is not installed ({LLM_EXTRA})"})
        return json_response({"items": tool_specs(), "tool_mode": mode})

    def discovery_capabilities(self, request: Request) -> Response:
        return json_response({"capabilities": capabilities()})


def _node_index(flow: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{node id: {type, label[, headerColor]}} of a flow, for clients that name and colour ledger
    records by node; a node without a label is called by its id, as on the original."""
    index: Dict[str, Dict[str, Any]] = {}
    for node in flow.get("nodes") or []:
        node_id = str(node.get("id") or "").strip() if isinstance(node, dict) else ""
        if not node_id:
            continue
        data = node.get("data") if isinstance(node.get("data"), dict) else {}
        entry = {"type": str(data.get("nodeType") or _enum_value(node.get("type")) or "").strip() or "unknown",
                 "label": str(data.get("label") or node.get("label") or node_id).strip() or node_id}
        color = data.get("headerColor") or node.get("headerColor")
        if isinstance(color, str) and color.strip():
            entry["headerColor"] = color.strip()
        index[node_id] = entry
    return index


def _start_pins(flow: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The non-execution output pins of a flow's `on_flow_start` node (its inputs)."""
    for node in flow.get("nodes") or []:
        if isinstance(node, dict) and node.get("type") == "on_flow_start":
            data = node.get("data") or {}
            defaults = data.get("pinDefaults") or {}
            pins = []
            for pin in data.get("outputs") or []:
                if pin.get("type") == "execution":
                    continue
                item = {"id": pin.get("id"), "label": pin.get("label"), "type": pin.get("type")}
                if pin.get("id") in defaults:
                    item["default"] = defaults[pin.get("id")]
                pins.append(item)
            return pins
    return []


def _encode_cursor(updated_at: str, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{updated_at}\n{run_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> Tuple[str, str]:
    try:
        updated_at, run_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("\n", 1)
    except (ValueError, UnicodeDecodeError):
        raise Unprocessable("Query parameter 'cursor' is not a cursor from a previous page",
                            code="validation_error") from None
    return updated_at, run_id


def run_summary(state: RunState) -> Dict[str, Any]:
    """The run summary shape of `GET /runs/{id}` (same keys always present)."""
    run_vars = state.vars if isinstance(state.vars, dict) else {}
    runtime_ns = run_vars.get("_runtime") if isinstance(run_vars.get("_runtime"), dict) else {}
    control = runtime_ns.get("control") if isinstance(runtime_ns.get("control"), dict) else {}
    limits = run_vars.get("_limits") if isinstance(run_vars.get("_limits"), dict) else {}
    sched = schedule_of(state)
    waiting = None
    if state.waiting is not None:
        w = state.waiting
        waiting = {"reason": _enum_value(w.reason), "wait_key": w.wait_key, "until": w.until, "prompt": w.prompt,
                   "choices": w.choices, "allow_free_text": w.allow_free_text, "details": w.details}
    return {
        "run_id": state.run_id, "workflow_id": state.workflow_id, "status": _enum_value(state.status),
        "current_node": state.current_node, "created_at": state.created_at, "updated_at": state.updated_at,
        "actor_id": state.actor_id, "session_id": state.session_id, "parent_run_id": state.parent_run_id,
        "error": state.error, "paused": bool(control.get("paused")), "pause_reason": control.get("pause_reason"),
        "paused_at": control.get("paused_at"), "resumed_at": control.get("resumed_at"), "waiting": waiting,
        "is_scheduled": sched is not None,
        "schedule": {k: v for k, v in sched.items() if k != "target_bundle_id"} if sched else None,
        "limits": {"tokens": {"estimated_used": limits.get("estimated_tokens_used"),
                              "max_tokens": limits.get("max_tokens"),
                              "max_input_tokens": limits.get("max_input_tokens"), "pct": _token_share(limits),
                              "warn_tokens_pct": limits.get("warn_tokens_pct")}},
    }


def _token_share(limits: Dict[str, Any]) -> Optional[float]:
    """The run's estimated tokens as a fraction (not a percentage) of its input budget, else of
    `max_tokens`, as the original reports it; None when either is not a number."""
    budget = limits.get("max_input_tokens")
    used, budget = _whole_number(limits.get("estimated_tokens_used")), _whole_number(
        limits.get("max_tokens") if budget is None else budget)
    if used is None or budget is None or budget <= 0:
        return None
    try:
        return used / budget
    except OverflowError:
        return None


def _whole_number(value: Any) -> Optional[int]:
    """`int(value)` as the original takes it (a number, or digits as text), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return int(value[:40] if isinstance(value, str) else value)
    except (ValueError, OverflowError):  # not a number, nan, inf
        return None


def _summary_body(run_json: str) -> Optional[bytes]:
    """`GET /runs/{id}`'s body from the run's stored JSON (None when it cannot be read as a run)."""
    states = _run_rows_to_states([(run_json,)])
    return _json_dumps(run_summary(states[0])).encode("utf-8") if states else None


# A run polled while unchanged is answered from its stored text without parsing it again; only
# checkpoints up to _SUMMARY_TEXT_MAX characters are remembered, so the cache stays a few MB at most.
_SUMMARY_TEXT_MAX = 16_384
_cached_summary_body = functools.lru_cache(maxsize=256)(_summary_body)


class LedgerStream:
    """One SSE subscription to a run's ledger: its cursor, its frames and when it is finished.

    The server's stream writer (`_StreamWriter`) drives it once the response head is decided: it
    fetches records after `cursor` whenever a commit touches the run (or another process may have
    written), sends heartbeats when idle, and ends with a `done` event once the run is terminal and
    its closing record is sent, or when the server stops.
    """

    FLUSH_GRACE_S = 0.5

    def __init__(self, gateway: Gateway, run_id: str, after: int, heartbeat_s: float, app: "GatewayApp") -> None:
        self.gateway = gateway
        self.run_id = run_id
        self.cursor = after
        self.heartbeat_s = heartbeat_s
        self.app = app
        self.stopping = app.stopping
        self.last_record: Optional[str] = None
        self.terminal_seen: Optional[float] = None

    @staticmethod
    def opening() -> bytes:
        return b"retry: %d\n\n" % SSE_RETRY_MS

    @staticmethod
    def step_frames(cursor: int, rows: List[str]) -> bytes:
        """The `step` events of `rows`, the records right after `cursor` (built once per cursor, shared)."""
        return b"".join(b"id: %d\nevent: step\ndata: {\"cursor\": %d, \"record\": %s}\n\n"
                        % (cursor + i, cursor + i, raw.encode()) for i, raw in enumerate(rows, 1))

    def advance(self, rows: List[str]) -> None:
        self.cursor += len(rows)
        self.last_record = rows[-1]

    @staticmethod
    def is_terminal(status: Optional[str]) -> bool:
        return status is None or status in TERMINAL_STATUSES

    def flushed(self) -> bool:
        """True once the run's closing records are streamed.

        The runtime saves the terminal status first and appends its `abstract.status` record
        right after, so a stream that saw the status waits (briefly) for that record too.
        """
        if self.last_record is not None and TERMINAL_RECORD_MARK in self.last_record:
            return True
        if self.terminal_seen is None:
            self.terminal_seen = time.monotonic()
        return time.monotonic() - self.terminal_seen >= self.FLUSH_GRACE_S

    def writes_elsewhere(self) -> bool:
        """Whether ledger records may come from another process (then watch SQLite's data_version)."""
        runner = self.app.runner
        return runner is None or not runner.has_lease

    def done_frame(self, status: str) -> bytes:
        """The last frame: `done` when the run is terminal. A gateway that stops ends a live run's stream
        with an event of another name, `server_stopping`: a client that takes `done` to mean the run
        finished (as the original only sends it then) must not stop following a run that goes on."""
        event = b"done" if status == "terminal" else status.encode()
        return (b"event: %s\ndata: {\"run_id\": %s, \"cursor\": %d, \"status\": \"%s\"}\n\n"
                % (event, json.dumps(self.run_id).encode(), self.cursor, status.encode()))


def openapi_document() -> Dict[str, Any]:
    """OpenAPI 3.1 built from `ROUTES` (the same table that drives dispatch)."""
    import re

    paths: Dict[str, Any] = {}
    for route in ROUTES:
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", route.path)
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{([a-z_]+)}", path)]
        for p in route.query:
            schema: Dict[str, Any] = {
                "type": {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}[p.kind]}
            if p.default is not None:
                schema["default"] = p.default
            if p.minimum is not None:
                schema["exclusiveMinimum" if p.exclusive_minimum else "minimum"] = p.minimum
            if p.maximum is not None:
                schema["maximum"] = p.maximum
            if p.choices:
                schema["enum"] = list(p.choices)
            params.append({"name": p.name, "in": "query", "required": p.required, "schema": schema,
                           **({"description": p.description} if p.description else {})})
        op: Dict[str, Any] = {"operationId": route.handler, "summary": route.summary, "tags": [route.tag],
                              "responses": {"200": {"description": "OK",
                                                    "content": {route.content_type: {"schema": route.response}}}}}
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
        if route.multipart is not None:
            op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": route.multipart}}}
        codes = set(route.errors) | ({400, 422} if route.body or route.query or route.multipart else set())
        if route.auth != "none":
            codes |= {401, 403, 429}
            op["security"] = [{"bearerAuth": []}]
        for code in sorted(codes):
            op["responses"][str(code)] = {
                "description": HTTP_REASONS.get(code, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "AbstractGateway", "version": __version__,
                 "description": "Durable run gateway for AbstractRuntime workflows."},
        "paths": paths,
        "components": {"schemas": {"Error": _ERROR},
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


HTTP_REASONS = {400: "Bad request", 401: "Missing or invalid token", 403: "Forbidden", 404: "Not found",
                409: "Conflict", 413: "Too large", 416: "Range not satisfiable", 422: "Validation error",
                429: "Too many requests"}

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AbstractGateway API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:14px 24px;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
header h1{font-size:18px;margin:0} header input{padding:6px;width:320px;border-radius:4px;border:0}
main{max-width:1000px;margin:0 auto;padding:16px 24px} h2{margin:28px 0 8px;text-transform:capitalize}
details{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:6px 0}
summary{cursor:pointer;padding:8px 12px;display:flex;gap:12px;align-items:center}
.m{font:600 12px monospace;padding:2px 8px;border-radius:3px;color:#fff;min-width:52px;text-align:center}
.GET{background:#2f7d32}.POST{background:#1565c0}.DELETE{background:#c62828}
code,pre,textarea{font:12px/1.4 ui-monospace,monospace} .body{padding:4px 14px 14px}
pre{background:#0f1720;color:#d7e0ea;padding:10px;border-radius:4px;overflow:auto;max-height:360px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #e3e6ea;padding:3px 8px;text-align:left}
input.p{width:220px} textarea{width:100%;height:90px} button{padding:5px 14px;margin-top:6px}
</style></head><body>
<header><h1>AbstractGateway API</h1>
<label>Bearer token <input id="token" type="password" placeholder="paste the gateway token"></label>
<span id="ver"></span></header><main id="main">Loading the OpenAPI document&hellip;</main>
<script>
const $ = (t, a = {}, ...kids) => { const e = document.createElement(t); Object.assign(e, a);
  kids.forEach(k => e.append(k)); return e; };
const token = document.getElementById('token');
token.value = sessionStorage.getItem('gwtoken') || '';
token.onchange = () => sessionStorage.setItem('gwtoken', token.value);
async function tryIt(path, method, op, form, out) {
  let url = path; const q = new URLSearchParams();
  for (const p of op.parameters || []) { const v = form.elements[p.name].value; if (!v) continue;
    if (p.in === 'path') url = url.replace('{' + p.name + '}', encodeURIComponent(v)); else q.set(p.name, v); }
  if ([...q].length) url += '?' + q;
  const init = {method, headers: {}};
  if (token.value) init.headers.Authorization = 'Bearer ' + token.value;
  if (form.elements.body) {
    if (op.requestBody.content['multipart/form-data']) { init.body = new FormData(form); }
    else { init.headers['Content-Type'] = 'application/json'; init.body = form.elements.body.value; } }
  out.textContent = method + ' ' + url + '\\n...';
  try { const r = await fetch(url, init); const text = await r.text();
    let shown = text; try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) {}
    out.textContent = r.status + ' ' + r.statusText + '\\n' + shown;
  } catch (e) { out.textContent = String(e); }
}
function render(spec) {
  document.getElementById('ver').textContent = 'v' + spec.info.version;
  const main = document.getElementById('main'); main.textContent = '';
  const byTag = {};
  for (const [path, ops] of Object.entries(spec.paths)) for (const [m, op] of Object.entries(ops))
    (byTag[op.tags[0]] = byTag[op.tags[0]] || []).push([path, m.toUpperCase(), op]);
  for (const [tag, ops] of Object.entries(byTag)) {
    main.append($('h2', {textContent: tag}));
    for (const [path, method, op] of ops) {
      const form = $('form'); const out = $('pre', {textContent: ''});
      const rows = (op.parameters || []).map(p => $('tr', {}, $('td', {}, $('code', {textContent: p.name})),
        $('td', {textContent: p.in}),
        $('td', {textContent: (p.schema.type || '')
          + (p.schema.default !== undefined ? ' = ' + p.schema.default : '')}),
        $('td', {}, $('input', {className: 'p', name: p.name}))));
      if (rows.length) form.append($('table', {}, ...rows));
      if (op.requestBody) { const c = op.requestBody.content;
        if (c['multipart/form-data']) form.append($('input', {type: 'file', name: 'file'}));
        else form.append($('textarea', {name: 'body', value: '{}'}));
        form.append($('pre', {textContent: JSON.stringify(Object.values(c)[0].schema, null, 2)})); }
      const btn = $('button', {type: 'submit', textContent: 'Send'}); form.append(btn);
      form.onsubmit = ev => { ev.preventDefault(); tryIt(path, method, op, form, out); };
      main.append($('details', {}, $('summary', {}, $('span', {className: 'm ' + method, textContent: method}),
        $('code', {textContent: path}), $('span', {textContent: op.summary})),
        $('div', {className: 'body'}, $('p', {textContent: 'Responses: ' + Object.keys(op.responses).join(', ')}),
          form, out)));
    }
  }
}
fetch('/openapi.json').then(r => r.json()).then(render)
  .catch(e => { document.getElementById('main').textContent = 'Could not load /openapi.json: ' + e; });
</script></body></html>
"""


class JsonErrors:
    """Outermost WSGI wrapper: an exception that escapes the stack (a middleware, or a streamed body
    failing before its first byte) still answers the API's JSON 500, never the server's HTML page."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        try:
            body = self.app(environ, start_response)
        except Exception:  # noqa: BLE001 - logged with the request id, answered in the error shape
            return self._internal_error(environ, start_response, sys.exc_info())
        return _FirstChunkGuard(body, lambda exc_info: self._internal_error(environ, start_response, exc_info))

    @staticmethod
    def _internal_error(environ: Dict[str, Any], start_response: Callable, exc_info: Any) -> Iterable[bytes]:
        import traceback

        request_id = environ.get("abstractgateway.request_id") or os.urandom(8).hex()
        _log(f"500 on {environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')} request_id={request_id}: "
             + "".join(traceback.format_exception(*exc_info)))
        body = error_response(500, "internal_error", f"Internal error (request id {request_id})",
                              request_id=request_id).body
        start_response("500 Internal Server Error", [("Content-Type", "application/json"),
                                                     ("Content-Length", str(len(body))), ("X-Request-Id", request_id)],
                       exc_info)
        return [body]


class _FirstChunkGuard:
    """A response body whose first chunk, if it fails, is replaced by `on_error`'s (headers are not
    sent before the first chunk, so the status can still change); `close()` always reaches the body."""

    def __init__(self, body: Iterable[bytes], on_error: Callable[[Any], Iterable[bytes]]) -> None:
        self._body = body
        self._on_error = on_error

    def __iter__(self) -> Iterator[bytes]:
        iterator = iter(self._body)
        try:
            first = next(iterator)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - answered as the JSON 500 (and logged) by on_error
            yield from self._on_error(sys.exc_info())
            return
        yield first
        yield from iterator

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_console_files: Dict[str, bytes] = {}


def read_console_file(name: str) -> bytes:
    """A console file shipped beside this module (from the source tree, a wheel or the .pyz), cached."""
    if name not in _console_files:
        here = Path(__file__).resolve().parent
        path = here / name
        if path.is_file():
            data = path.read_bytes()
        else:  # running from a zip: ask the loader
            get_data = getattr(globals().get("__loader__"), "get_data", None)
            try:
                data = get_data(str(path)) if get_data is not None else None
            except OSError:
                data = None
            if data is None:
                raise NotFound(f"Console file '{name}' is not installed beside {Path(__file__).name}",
                               code="console_missing")
        _console_files[name] = data
    return _console_files[name]


MAX_HEADER_BYTES = 16 * 1024
_MIN_BODY_RATE = 64 * 1024  # bytes/s a request body must average once `request_timeout_s` has passed
_DRAIN_LIMIT = 64 * 1024  # an unread body known to be longer: the connection is closed, not drained
_DRAIN_WAIT_S = 0.1  # how long a worker waits for the rest of an unread body before closing instead
_PREREAD_LIMIT = 64 * 1024  # when workers run short, Content-Length bodies up to this arrive whole first
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                         "proxy-connection"})
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class BadRequestBody(GatewayError):
    code = "bad_request_body"


class RequestTimeout(GatewayError):
    code = "request_timeout"


class _Connection:
    """One client socket and the bytes read from it but not yet consumed."""

    __slots__ = ("sock", "addr", "buf", "since", "started", "keep_alive", "parsed", "unsent", "request", "flushed")

    def __init__(self, sock: Any, addr: Any) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.since = time.monotonic()  # idle since (no request in progress)
        self.started = 0.0  # first byte of the request being read (0: none yet)
        self.keep_alive = True
        self.parsed: Optional[Tuple[Dict[str, Any], "_BodyReader", bool]] = None  # head parsed by the selector
        self.unsent = b""  # the rest of an answer its client is slow to read (see `HttpServer._send_or_keep`)
        self.flushed = 0  # bytes of such rests sent since the selector took the first one (for its rate)
        self.request: Optional[Tuple[bytes, bytes]] = None  # head and body of a request in a shared transaction

    def head_end(self) -> int:
        """Offset just past the request head in `buf` (0 while it is incomplete)."""
        buf = self.buf
        while buf and (buf[0] == 10 or (buf[0] == 13 and buf[1:2] == b"\n")):  # blank lines between requests
            del buf[:1 if buf[0] == 10 else 2]
        crlf = buf.find(b"\n\r\n")
        lf = buf.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(buf))  # only one that ends earlier
        return lf + 2 if lf >= 0 else crlf + 3 if crlf >= 0 else 0


class _NotArrived(Exception):
    """Draining reached the end of what the client has sent so far."""


class _BodyReader:
    """`wsgi.input` of one request, read off the socket under a deadline.

    Handles Content-Length and chunked framing. A body that stalls, or trickles slower than
    `_MIN_BODY_RATE` past `request_timeout_s`, raises `RequestTimeout` (408); bad chunk framing
    raises `BadRequestBody` (400). Neither can hold a worker for long or reach the client as a 500.
    """

    def __init__(self, conn: _Connection, length: int, chunked: bool, timeout_s: float) -> None:
        self._conn = conn
        self._chunked = chunked
        self._left = 0 if chunked else length  # bytes left in this chunk (or in the whole body)
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._received = 0
        self.done = not chunked and length == 0
        self.failed = False
        self._drain_until: Optional[float] = None  # draining: wait for the rest until then, no longer

    def _recv(self) -> None:
        if self._drain_until is not None:
            self._recv_while_draining()
            return
        left = min(self._deadline + self._received / _MIN_BODY_RATE - time.monotonic(), self._timeout_s)
        try:
            if left <= 0:
                raise TimeoutError
            self._conn.sock.settimeout(left)
            data = self._conn.sock.recv(65536)
        except (TimeoutError, OSError) as exc:
            self.failed = True
            if isinstance(exc, TimeoutError):
                raise RequestTimeout("Request body not received in time") from None
            raise BadRequestBody("Connection failed while reading the request body") from None
        if not data:
            self.failed = True
            raise BadRequestBody("Request body ended early")
        self._received += len(data)
        self._conn.buf += data

    def _recv_while_draining(self) -> None:
        left = self._drain_until - time.monotonic()
        if left <= 0:
            raise _NotArrived
        sock = self._conn.sock
        timeout = sock.gettimeout()  # the answer is sent under it next
        try:
            sock.settimeout(left)
            data = sock.recv(65536)
        except OSError:  # (a timeout too)
            raise _NotArrived from None
        finally:
            sock.settimeout(timeout)
        if not data:
            raise _NotArrived
        self._conn.buf += data

    def _line(self, limit: int = 4096) -> bytes:
        buf = self._conn.buf
        while True:
            end = buf.find(b"\n", 0, limit)
            if end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                if not line.endswith(b"\r\n") or b"\r" in line[:-2]:  # a bare LF or CR: a proxy may frame it otherwise
                    self.failed = True
                    raise BadRequestBody("A line of the chunked request body does not end in CRLF")
                return line[:-2]
            if len(buf) >= limit:
                self.failed = True
                raise BadRequestBody("Chunk size line too long")
            self._recv()

    def _next_chunk(self) -> None:
        size_text = self._line().split(b";", 1)[0].rstrip(b" \t")  # (whitespace only before an extension)
        if not size_text or len(size_text) > 15 or not set(size_text.decode("latin-1")) <= _HEX_DIGITS:
            self.failed = True
            raise BadRequestBody("Bad chunk size line in a chunked request body")
        self._left = int(size_text, 16)
        if self._left == 0:
            trailer = 0
            while line := self._line():  # trailer fields are ignored; a blank line ends the body
                trailer += 1
                # Each must be a field line: one that is not (a request line, say) ends the message
                # here for a strict front proxy, which would pass what follows on as a request.
                if line[:1] in (b" ", b"\t") or _field_line(line.decode("latin-1")) is None:
                    self.failed = True
                    raise BadRequestBody("A malformed trailer line in a chunked request body")
                if trailer > 64:
                    self.failed = True
                    raise BadRequestBody("Too many trailer fields in a chunked request body")
            self.done = True

    def _take(self, size: int) -> bytes:
        buf = self._conn.buf
        if not buf:
            self._recv()
        data = bytes(buf[:size])
        del buf[:len(data)]
        self._left -= len(data)
        if self._chunked and self._left == 0:
            while len(buf) < 2:
                self._recv()
            if buf[:2] != b"\r\n":
                self.failed = True
                raise BadRequestBody("Chunk data not followed by CRLF in a chunked request body")
            del buf[:2]
        elif not self._chunked and self._left == 0:
            self.done = True
        return data

    def read(self, size: Optional[int] = -1) -> bytes:
        want = math.inf if size is None or size < 0 else size
        parts: List[bytes] = []
        got = 0
        while got < want and not self.done:
            if self._left == 0:
                self._next_chunk()
                continue
            data = self._take(int(min(want - got, self._left)))
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readline(self, size: Optional[int] = -1) -> bytes:
        limit = math.inf if size is None or size < 0 else size
        parts: List[bytes] = []
        got = 0
        while got < limit and not self.done:
            if self._left == 0:
                self._next_chunk()
                continue
            buf = self._conn.buf
            if not buf:
                self._recv()
            end = buf.find(b"\n", 0, int(min(len(buf), self._left, limit - got)))
            data = self._take(end + 1 if end >= 0 else int(min(len(buf), self._left, limit - got)))
            parts.append(data)
            got += len(data)
            if data.endswith(b"\n"):
                break
        return b"".join(parts)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def too_big_to_drain(self) -> bool:
        """Whether the unread rest is known to exceed what the server drains to keep the connection."""
        return not self.done and not self._chunked and self._left > _DRAIN_LIMIT

    def drain(self) -> bool:
        """Drop what the app left unread; False when the connection cannot be reused.

        A worker waits `_DRAIN_WAIT_S` at most for the rest (a client's body often follows its head by
        a moment; the selector's thread never waits): waiting out the request's deadline, a body
        trickled to a route that did not read it (a 401, a 404, no token needed) held a worker, and a
        few such clients held them all. Such a connection is closed instead, gently
        (`HttpServer._close_gently`), and the answer's head says so (`_ResponseWriter.head`)."""
        if self.failed:
            return False
        if self.done:
            return True
        self._drain_until = time.monotonic() + (_DRAIN_WAIT_S if self._conn.sock.gettimeout() != 0.0 else 0.0)
        try:
            while not self.done:
                self.read(65536)
        except (GatewayError, _NotArrived):
            self.failed = True
            return False
        return True


_date_cache: List[Any] = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        from email.utils import formatdate

        _date_cache[:] = [now, formatdate(now, usegmt=True).encode()]
    return _date_cache[1]


def _error_head(status: int, reason: str, code: str, detail: str) -> bytes:
    """A complete JSON error response that closes the connection, for faults found outside the app."""
    body = _json_dumps({"detail": detail, "code": code}).encode()
    retry = b"Retry-After: 1\r\n" if status == 503 else b""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
            b"%sDate: %s\r\n\r\n%s" % (status, reason.encode(), len(body), retry, _http_date(), body))


def _preread_length(head: bytes | bytearray) -> int:
    """How many body bytes the selector thread waits for when workers run short: a Content-Length
    body up to `_PREREAD_LIMIT` (not chunked ones, nor an `Expect: 100-continue` body, which the
    client sends only once a worker has answered)."""
    lower = head.lower()
    start = lower.find(b"\ncontent-length:")
    if start < 0 or b"\ntransfer-encoding:" in lower or b"\nexpect:" in lower:
        return 0
    value = lower[start + 16:lower.find(b"\n", start + 1)].strip()
    return int(value) if value.isdigit() and int(value) <= _PREREAD_LIMIT else 0


def _unquote_path(path: str) -> str:
    """PATH_INFO of a request target's path: percent-decoded UTF-8 bytes as latin-1 text (WSGI)."""
    if "%" not in path:
        return path  # the request line is ASCII
    from urllib.parse import unquote

    return unquote(path).encode().decode("latin-1")


class _BadRequest(Exception):
    """A request head the server refuses before the app runs (answered, then the connection closes)."""

    def __init__(self, status: int, reason: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.response = _error_head(status, reason, code, detail)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _ResponseWriter:
    """`start_response` and the socket writes of one response: Content-Length when the app gives
    one, else chunked (HTTP/1.1) or close-delimited (HTTP/1.0). Head and first data go out in one send."""

    def __init__(self, conn: _Connection, body: _BodyReader, head_only: bool, http10: bool,
                 send: Optional[Callable[[bytes], Any]] = None) -> None:
        self.conn = conn
        self._send = send or conn.sock.sendall
        self.body = body
        self.head_only = head_only
        self.http10 = http10
        self.status = ""
        self.headers: List[Tuple[str, str]] = []
        self.head_sent = False
        self.length: Optional[int] = None
        self.chunked = False
        self.sent = 0

    @property
    def status_code(self) -> int:
        try:
            return int(self.status.split(" ", 1)[0])
        except ValueError:
            return 500

    def start_response(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
        if exc_info is not None and self.head_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status, self.headers = status, headers
        return self.write

    def head(self, *, stream: bool = False, empty: bool = False) -> bytes:
        """The response head; fixes the framing of the body that follows."""
        code = self.status_code
        no_body = self.head_only or code in (204, 304) or 100 <= code < 200
        lines = [b"HTTP/1.1 " + self.status.encode("latin-1")] + self._app_header_lines(stream)
        if self.body.failed or self.body.too_big_to_drain() or not (stream or self.body.drain()):
            self.conn.keep_alive = False  # the request's framing is lost, or its unread body too costly or slow
        if not no_body and self.length is None:
            if empty and not stream:
                self.length = 0
                lines.append(b"Content-Length: 0")
            elif self.http10:
                self.conn.keep_alive = False  # the end of the body is the end of the connection
            else:
                self.chunked = True
                lines.append(b"Transfer-Encoding: chunked")
        if no_body:
            self.length = 0
        lines.append(b"Date: " + _http_date())
        if not self.conn.keep_alive or stream:
            lines.append(b"Connection: close")
        elif self.http10:
            lines.append(b"Connection: keep-alive")
        self.head_sent = True
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _app_header_lines(self, stream: bool) -> List[bytes]:
        """The application's header lines, less hop-by-hop ones (this server frames the body itself);
        a valid Content-Length of a non-streamed response is kept and noted in `length`."""
        lines = []
        for name, value in self.headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                continue
            if lower == "content-length":
                if stream:
                    continue
                try:
                    self.length = int(value)
                except ValueError:
                    continue
            lines.append(b"%s: %s" % (name.encode("latin-1"), value.encode("latin-1")))
        return lines

    def write(self, data: bytes) -> None:
        head = b"" if self.head_sent else self.head()
        if self.head_only or (self.length == 0 and not self.chunked):
            data = b""
        elif self.chunked:
            data = _chunk(data) if data else b""
        elif self.length is not None and self.sent + len(data) > self.length:
            data = data[:self.length - self.sent]
            self.conn.keep_alive = False
        self.sent += len(data)
        if head or data:
            self._send(head + data)

    def finish(self) -> None:
        if not self.head_sent:
            self._send(self.head(empty=True))
        elif self.chunked and not self.head_only:
            self._send(b"0\r\n\r\n")
        elif self.length is not None and self.sent < self.length and not self.head_only:
            self.conn.keep_alive = False  # the app sent less than it announced: the framing is broken


class _Subscriber:
    """An SSE stream held by the stream writer: its socket and the bytes not yet sent."""

    __slots__ = ("sock", "stream", "app_iter", "chunked", "out", "out_bytes", "offset", "last_sent", "progress_at",
                 "finished", "writing", "topic")

    def __init__(self, sock: Any, stream: "LedgerStream", app_iter: Any, chunked: bool) -> None:
        from collections import deque

        self.sock = sock
        self.chunked = chunked  # HTTP/1.1; an HTTP/1.0 stream is close-delimited, its frames sent as they are
        self.stream = stream
        self.app_iter = app_iter
        self.out: "deque[bytes]" = deque()
        self.out_bytes = 0
        self.offset = 0
        self.last_sent = self.progress_at = time.monotonic()
        self.finished = False  # its last frame is queued: close once sent
        self.writing = False  # registered for EVENT_WRITE
        self.topic = ledger_topic(stream.run_id)

    def queue(self, data: bytes, now: float) -> None:
        if not self.out:
            self.progress_at = now
        self.out.append(data)
        self.out_bytes += len(data)
        self.last_sent = now

    def framed(self, data: bytes) -> bytes:
        """`data` as this stream's body carries it."""
        return _chunk(data) if self.chunked else data

    def finish(self, frame: bytes, now: float) -> None:
        self.queue((_chunk(frame) + b"0\r\n\r\n") if self.chunked else frame, now)
        self.finished = True


class _StreamWriter:
    """One thread that serves every open SSE stream once its response head is decided.

    It is woken by ledger commits (`Signals.watch`), pages records with its own single database
    connection (one query per run and cursor, shared by every subscriber at that cursor), and writes
    with non-blocking sends. A subscriber gets more records only while its unsent bytes are under
    `max_buffer_bytes`; one whose client accepts nothing for `stall_s` while data waits is dropped
    (it resumes with `Last-Event-ID`), so a slow reader never stalls the others.
    """

    POLL_S = 0.25  # commits of other processes are noticed through `data_version` this often
    SCAN_S = 0.05  # heartbeats, terminal grace, stops and stalls are checked this often

    def __init__(self, max_buffer_bytes: int, stall_s: float) -> None:
        import selectors
        import socket

        self.max_buffer_bytes = max_buffer_bytes
        self.stall_s = stall_s
        self._selectors = selectors
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._incoming: List[_Subscriber] = []
        self._dirty: set = set()  # topics committed to since the last loop
        self._subs: set = set()
        self._by_topic: Dict[str, set] = {}
        self._pending: set = set()  # subscribers that may have records to fetch
        self._to_flush: set = set()
        self._versions: Dict[int, int] = {}
        self._next_poll = self._next_scan = 0.0
        self._closing = False
        self._thread: Optional[threading.Thread] = None

    def __len__(self) -> int:
        return len(self._subs)

    def add(self, sock: Any, stream: "LedgerStream", app_iter: Any, head: bytes, chunked: bool) -> None:
        """Take over a stream whose response head is `head` (`chunked`: the body framing it set); the
        socket is the writer's from now on."""
        sock.setblocking(False)
        sub = _Subscriber(sock, stream, app_iter, chunked)
        sub.queue(head + sub.framed(stream.opening()), time.monotonic())
        stream.app.stream_started()
        with self._lock:
            self._incoming.append(sub)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sse-writer", daemon=True)
                self._thread.start()
        self._wake()

    def close(self, timeout: float = 1.0) -> None:
        """Drop every stream still open and stop the thread."""
        self._closing = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full: a wake-up is already pending (or the writer is closed)
            pass

    def _on_commit(self, topic: str) -> None:
        with self._lock:
            self._dirty.add(topic)
        self._wake()

    def _run(self) -> None:
        while not self._closing:
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - e.g. a busy database: streams wait, the writer lives on
                _log(f"sse writer: {type(exc).__name__}: {exc}")
                time.sleep(0.05)
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sub in incoming:
            self._adopt(sub)
        for sub in list(self._subs):
            self._drop(sub)
        self._selector.close()
        self._wake_r.close()

    def _step(self) -> None:
        """One pass: socket events, new streams, commits, fetches, timers, sends."""
        now = time.monotonic()
        timeout = max(0.0, min(self._next_scan, self._next_poll) - now) if self._subs else self.POLL_S
        self._socket_events(0 if self._pending and self._can_fetch() else timeout)
        with self._lock:
            incoming, self._incoming = self._incoming, []
            dirty, self._dirty = self._dirty, set()
        for sub in incoming:
            self._adopt(sub)
        for topic in dirty:
            self._pending.update(self._by_topic.get(topic, ()))
        now = time.monotonic()
        if now >= self._next_poll:
            self._poll_other_writers()
            self._next_poll = now + self.POLL_S
        self._pump(now)
        if now >= self._next_scan:
            self._scan(now)
            self._next_scan = now + self.SCAN_S
        flush, self._to_flush = self._to_flush, set()
        for sub in flush:
            if sub in self._subs:
                self._flush(sub, now)

    def _socket_events(self, timeout: float) -> None:
        """Wait up to `timeout` for socket events: drain the wake-up pipe, drop streams whose client
        went away, and queue writable ones for a flush."""
        for key, mask in self._selector.select(timeout):
            sub = key.data
            if sub is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                continue
            if mask & self._selectors.EVENT_READ:
                self._check_gone(sub)
            if mask & self._selectors.EVENT_WRITE and sub in self._subs:
                self._to_flush.add(sub)

    def _can_fetch(self) -> bool:
        return any(s.out_bytes < self.max_buffer_bytes for s in self._pending)

    def _adopt(self, sub: _Subscriber) -> None:
        self._subs.add(sub)
        self._selector.register(sub.sock, self._selectors.EVENT_READ, sub)
        subs = self._by_topic.get(sub.topic)
        if subs is None:
            subs = self._by_topic[sub.topic] = set()
            sub.stream.gateway.stores.db.signals.watch(sub.topic, self._on_commit)
        subs.add(sub)
        self._pending.add(sub)  # watched before the first read: no commit can slip between
        self._to_flush.add(sub)

    def _poll_other_writers(self) -> None:
        """Mark streams pending when another process committed (only where records may come from one)."""
        dbs: Dict[int, Any] = {}
        for sub in self._subs:
            if sub.stream.writes_elsewhere():
                dbs.setdefault(id(sub.stream.gateway.stores.db), [sub.stream.gateway.stores.db, []])[1].append(sub)
        for key, (db, subs) in dbs.items():
            version = db.data_version()
            if self._versions.get(key) != version:
                self._versions[key] = version
                self._pending.update(subs)

    def _pump(self, now: float) -> None:
        """Fetch new records for pending subscribers: one query per (run, cursor)."""
        groups: Dict[Tuple[str, int], List[_Subscriber]] = {}
        for sub in list(self._pending):
            if sub.finished:
                self._pending.discard(sub)
            elif sub.out_bytes < self.max_buffer_bytes:
                groups.setdefault((sub.stream.run_id, sub.stream.cursor), []).append(sub)
        statuses: Dict[str, Optional[str]] = {}
        for (run_id, cursor), subs in groups.items():
            stores = subs[0].stream.gateway.stores
            rows = stores.ledger.page_json(run_id, cursor, SSE_BATCH)
            frames = LedgerStream.step_frames(cursor, rows) if rows else b""
            chunk = _chunk(frames) if rows else b""
            for sub in subs:
                if rows:
                    data = chunk if sub.chunked else frames
                    if sub.out_bytes and sub.out_bytes + len(data) > self.max_buffer_bytes:
                        continue  # stays pending: fetched again once its client has read more
                    sub.stream.advance(rows)
                    sub.queue(data, now)
                    self._to_flush.add(sub)
                    if len(rows) == SSE_BATCH:
                        continue  # more to page
                self._pending.discard(sub)
                if run_id not in statuses:
                    statuses[run_id] = stores.runs.status_of(run_id)
                if LedgerStream.is_terminal(statuses[run_id]):
                    if sub.stream.flushed():
                        sub.finish(sub.stream.done_frame("terminal"), now)
                        self._to_flush.add(sub)

    def _scan(self, now: float) -> None:
        for sub in list(self._subs):
            stream = sub.stream
            if sub.finished:
                pass
            elif stream.stopping.is_set():
                sub.finish(stream.done_frame("server_stopping"), now)
                self._to_flush.add(sub)
                continue
            elif stream.terminal_seen is not None:
                self._pending.add(sub)  # the closing record's grace period: look again
            elif not sub.out and now - sub.last_sent >= stream.heartbeat_s:
                sub.queue(sub.framed(b": keep-alive\n\n"), now)
                self._to_flush.add(sub)
            if sub.out and now - sub.progress_at > self.stall_s:
                self._drop(sub)  # its client stopped reading: it reconnects with Last-Event-ID

    def _flush(self, sub: _Subscriber, now: float) -> None:
        while sub.out:
            first = sub.out[0]
            try:
                sent = sub.sock.send(memoryview(first)[sub.offset:])
            except BlockingIOError:
                break
            except OSError:
                self._drop(sub)
                return
            sub.progress_at = now
            sub.out_bytes -= sent
            sub.offset += sent
            if sub.offset < len(first):
                break
            sub.out.popleft()
            sub.offset = 0
        if not sub.out and sub.finished:
            self._drop(sub)
            return
        if bool(sub.out) != sub.writing:
            sub.writing = bool(sub.out)
            events = self._selectors.EVENT_READ | (self._selectors.EVENT_WRITE if sub.writing else 0)
            self._selector.modify(sub.sock, events, sub)

    def _check_gone(self, sub: _Subscriber) -> None:
        try:
            data = sub.sock.recv(4096)  # a client says nothing on a stream: only EOF matters
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sub)

    def _drop(self, sub: _Subscriber) -> None:
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        self._pending.discard(sub)
        self._to_flush.discard(sub)
        try:
            self._selector.unregister(sub.sock)
        except (KeyError, ValueError):
            pass
        subs = self._by_topic.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_topic[sub.topic]
                sub.stream.gateway.stores.db.signals.unwatch(sub.topic, self._on_commit)
        try:
            sub.sock.close()
        finally:
            try:
                close = getattr(sub.app_iter, "close", None)
                if close is not None:
                    close()  # the middlewares' end-of-response work (e.g. freeing the SSE slot)
            except Exception as exc:  # noqa: BLE001 - one stream's cleanup never stops the writer
                _log(f"stream close failed: {type(exc).__name__}: {exc}")
            sub.stream.app.stream_ended()


# -- request heads, parsed into a WSGI environ (by the selector thread or a worker) ------------------


def _request_line(line: str) -> Tuple[str, str, str]:
    """Method, target and version of a request line (400/505 when malformed or not HTTP/1.x)."""
    line = line[:-1] if line.endswith("\r") else line
    parts = line.split(" ")
    if len(parts) != 3 or "\r" in line:
        raise _BadRequest(400, "Bad Request", "bad_request", "Malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise _BadRequest(505, "HTTP Version Not Supported", "http_version", "HTTP version not supported")
        raise _BadRequest(400, "Bad Request", "bad_request", "Malformed request line")
    if (not method or not set(method) <= _TOKEN_CHARS or not target
            or not (target.isascii() and target.isprintable())):
        raise _BadRequest(400, "Bad Request", "bad_request", "Malformed request line")
    return method, target, version


_FIELD_VALUE_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but HTAB (RFC 9110 5.5)
_HEAD_CTL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")  # ...in a head: but its line ends


def _field_line(line: str) -> Optional[Tuple[str, str]]:
    """(name, value) of a header or trailer line (`token ":" OWS value OWS`, no CR or LF left), or None.

    A control character in a value is refused, not passed on: a bare CR a proxy may read as a line
    break, a NUL that ends a C string early (`Connection: close\x00` is not `close`), or bytes a
    response header would echo (an `Origin`)."""
    name, sep, value = line.partition(":")
    if not sep or not name or not set(name) <= _TOKEN_CHARS or _FIELD_VALUE_CTL.search(value):
        return None
    return name, value.strip(" \t")


def _header_fields(lines: List[str]) -> List[Tuple[str, str]]:
    """(name, value) of each header line (400 for folded or malformed lines, 431 past MAX_HEADER_BYTES)."""
    headers: List[Tuple[str, str]] = []
    size = 0
    for line in lines:
        line = line[:-1] if line.endswith("\r") else line
        if not line:
            continue
        if line[0] in " \t":
            raise _BadRequest(400, "Bad Request", "bad_request", "Folded header lines are not accepted")
        name, sep, value = line.partition(":")  # (control characters: refused for the whole head at once)
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise _BadRequest(400, "Bad Request", "bad_request", "Malformed header line")
        headers.append((name, value.strip(" \t")))
        size += len(name) + len(value) + 4
    if size > MAX_HEADER_BYTES:
        raise _BadRequest(431, "Request Header Fields Too Large", "headers_too_large",
                          "Request header fields too large")
    return headers


def _body_framing(environ: Dict[str, Any], lengths: List[str], http10: bool) -> Tuple[bool, int]:
    """(chunked, length) of the request body from its Transfer-Encoding or Content-Length headers.

    Ambiguous framing (both headers, chunked on HTTP/1.0, differing lengths) is refused with a 400
    rather than guessed, and other transfer codings with a 501."""
    chunked, length = False, 0
    if "HTTP_TRANSFER_ENCODING" in environ:
        # Only SP and HTAB are whitespace here (RFC 9110 5.6.3): "\x0bchunked" is no coding this server
        # knows, so a front proxy that reads it as something else can't frame the body differently.
        codings = [c.strip(" \t").lower() for c in environ["HTTP_TRANSFER_ENCODING"].split(",") if c.strip(" \t")]
        if lengths or http10:
            raise _BadRequest(400, "Bad Request", "bad_request",
                              "Transfer-Encoding with Content-Length (or on HTTP/1.0) is refused")
        if codings != ["chunked"]:
            raise _BadRequest(501, "Not Implemented", "unsupported_transfer_encoding",
                              "Only the chunked transfer coding is supported")
        chunked = True
    elif lengths:
        if len(set(lengths)) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()) or len(lengths[0]) > 18:
            raise _BadRequest(400, "Bad Request", "bad_request", "Bad Content-Length header")
        length = int(lengths[0])
        environ["CONTENT_LENGTH"] = str(length)
    return chunked, length


_HOST_VALUE = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=-]*(:[0-9]*)?|\[[0-9A-Fa-f:.]+\](:[0-9]*)?")  # uri-host [":" port]


def _wsgi_environ(conn: _Connection, head: bytes, server_address: Tuple[Any, ...], timeout_s: float
                  ) -> Tuple[Dict[str, Any], _BodyReader, bool]:
    """The WSGI environ of a request head (400/431/501/505 for what cannot be served)."""
    text = head.decode("latin-1")
    if _HEAD_CTL.search(text):  # see `_field_line`
        raise _BadRequest(400, "Bad Request", "bad_request", "A control character in the request head")
    lines = text.split("\n")
    method, target, version = _request_line(lines[0])
    headers = _header_fields(lines[1:])
    hosts = [value for name, value in headers if name.lower() == "host"]
    if len(hosts) > 1 or (not hosts and version == "HTTP/1.1") or not _HOST_VALUE.fullmatch(hosts[0] if hosts else ""):
        raise _BadRequest(400, "Bad Request", "bad_request",  # RFC 9112 3.2, as proxies expect
                          "A request needs exactly one valid Host header (HTTP/1.0: at most one)")
    if target.startswith(("http://", "https://")):  # absolute form: its authority is the Host (RFC 9112 3.2.2)
        authority, slash, rest = target.split("://", 1)[1].partition("/")
        target = slash + rest
        headers = [(name, value) for name, value in headers if name.lower() != "host"] + [("Host", authority)]
    path, _, query = target.partition("?")
    environ: Dict[str, Any] = {
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "wsgi.input_terminated": True, "abstractgateway.streams": True,
        "SERVER_SOFTWARE": "abstractgateway", "REQUEST_METHOD": method, "SCRIPT_NAME": "",
        "PATH_INFO": _unquote_path(path), "QUERY_STRING": query,
        "REQUEST_URI": target, "RAW_URI": target, "REMOTE_ADDR": str(conn.addr[0]),
        "REMOTE_PORT": conn.addr[1], "SERVER_NAME": str(server_address[0]),
        "SERVER_PORT": str(server_address[1]), "SERVER_PROTOCOL": version,
    }
    lengths: List[str] = []
    for name, value in headers:
        if "_" in name:
            continue  # would collide with a dash-spelled header in the environ
        key = name.upper().replace("-", "_")
        if key == "CONTENT_LENGTH":
            lengths.extend(v.strip(" \t") for v in value.split(","))
            continue
        if key != "CONTENT_TYPE":
            key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    http10 = version == "HTTP/1.0"
    tokens = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    conn.keep_alive = ("keep-alive" in tokens) if http10 else ("close" not in tokens)
    chunked, length = _body_framing(environ, lengths, http10)
    body = _BodyReader(conn, length, chunked, timeout_s)
    environ["wsgi.input"] = body
    return environ, body, http10


_GROUP_TURN = object()  # in a worker's queue: serve the requests waiting for a shared transaction


class HttpServer:
    """The gateway's HTTP/1.1 server: werkzeug's WSGI stack on a standard-library core.

    - One selector thread accepts connections and reads request heads without blocking. Only a
      connection whose head is complete goes to a worker, so idle keep-alive sockets and clients
      that trickle their headers cost a file descriptor and a buffer, never a thread.
    - A fixed pool of long-lived workers runs the WSGI app (each keeps its SQLite connection warm),
      drains or refuses the body the app left unread, serves pipelined requests already buffered,
      and hands the connection back to the selector for the next request.
    - A bodiless GET that `quick(environ)` accepts (a route whose cost is small and bounded) is
      answered by the selector thread itself: under the GIL, handing it to a worker costs more
      (thread switches, selector re-registration) than serving it. A response the socket cannot
      take at once is finished by a worker, so a client that does not read cannot stall the loop.
    - Requests that `group.accepts` (small writes, bodies read whole by the selector) queue for one
      worker, which serves those waiting in one transaction and answers them after its one commit.
      While it commits, the next arrivals queue: the group commit of an event loop, with one thread
      in the app instead of one per request contending for the GIL.
    - SSE streams move to one `_StreamWriter` thread after their head.

    Limits: a connection with no request in progress closes after `idle_timeout_s`; a head must
    arrive within `request_timeout_s` of its first byte (slowloris), and a body must keep coming
    (408 otherwise); at most `max_requests` requests are in progress (heads being read and requests
    at workers; more get an immediate 503); at most `max_connections` sockets are open. When either
    is full, the longest-idle connection (for sockets), else a request whose head is still arriving
    (`_evict_slow_head`), is closed to admit a new client: trickling sockets never lock others out.
    An answer sent before closing is not lost to a reset (`_close_gently`).
    """

    SLOW_HEAD_S = 1.0
    FLUSH_MAX_BYTES = 1 << 20  # the unsent rest of one answer the selector takes over (more: the worker sends it)
    FLUSH_TOTAL_BYTES = 64 << 20  # ...and of all answers it holds
    # A client that sends its whole body before reading (http.client, requests) must get to read the 413
    # sent before it: the rest of the largest body a route takes is drained (the bundle cap, 75 MiB).
    CLOSE_LINGER_S = 10.0
    CLOSE_LINGER_BYTES = 128 << 20
    CLOSE_LINGER_MAX = 128

    def __init__(self, app: Callable, host: str, port: int, *, workers: int = 8, max_workers: Optional[int] = None,
                 request_timeout_s: float = 15.0, idle_timeout_s: float = 5.0, max_requests: int = 256,
                 max_connections: int = 4096,
                 sse_max_buffer_bytes: int = 1 << 20,
                 quick: Optional[Callable[[Dict[str, Any]], bool]] = None,
                 group: Optional[CommitGroup] = None) -> None:
        import queue
        import selectors
        import socket
        from collections import OrderedDict, deque

        self.app = app
        self.quick = quick
        self.group = group
        self.workers = workers
        self.max_workers = 4 * workers if max_workers is None else max(workers, max_workers)  # see `_add_workers`
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_requests = max_requests
        self.max_connections = max_connections
        self._socket_mod = socket
        self._selectors = selectors
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        self.server_port: int = self.server_address[1]
        self.streams = _StreamWriter(sse_max_buffer_bytes, request_timeout_s)
        self._costly: "OrderedDict[str, int]" = OrderedDict()  # quick-route path -> answers over budget in a row
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._accept_paused_until = 0.0
        self._lock = threading.Lock()
        # Kept-alive connections a worker put back in the selector itself (no wake-up of the selector
        # thread per request); the selector thread takes up their bookkeeping before its next events.
        self._returned: "deque[_Connection]" = deque()
        self._to_close: "deque[Any]" = deque()  # sockets a worker is done with, to close gently
        self._sink = bytearray(1 << 18)  # where what a closing client still sends is read and dropped
        self._to_flush: "deque[_Connection]" = deque()  # answered connections whose client is slow to read
        self._flushing: "OrderedDict[int, _Connection]" = OrderedDict()  # fd: connection, least recent progress first
        self._flush_bytes = 0  # unsent bytes the selector holds (`FLUSH_TOTAL_BYTES`)
        self._closing: "OrderedDict[int, Tuple[Any, float, int]]" = OrderedDict()  # fd: socket, deadline, bytes left
        self._selector_closed = False
        self._ready: "queue.SimpleQueue[Any]" = queue.SimpleQueue()  # a connection, _GROUP_TURN or None (stop)
        self._grouped: List[_Connection] = []  # requests waiting for the next shared transaction
        self._group_busy = False  # a worker is serving groups (it takes the next one when done)
        self._idle: "OrderedDict[int, _Connection]" = OrderedDict()  # in the selector, nothing read; oldest first
        self._partial: "OrderedDict[int, _Connection]" = OrderedDict()  # in the selector, request arriving
        self._in_progress = 0  # partial heads + connections at workers
        self._idle_workers = 0  # workers waiting for a connection
        self._open = 0  # connections the selector or a worker holds (streams belong to the writer)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._threads: List[threading.Thread] = []
        self._taken = 0  # how many times workers took work from `_ready`
        self._stall = (time.monotonic(), 0)  # since when work waits while `_taken` stays at this count

    # -- selector thread -----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the selector loop (and start the workers) until `shutdown()`."""
        self._threads = [threading.Thread(target=self._work, name=f"http-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()
        try:
            while not self._stop.is_set():
                try:
                    events = self._selector.select(0.1 if self._ready.qsize() else 0.25)
                    self._adopt_returned()  # before their events: a returned connection is idle
                    for key, _mask in events:
                        if key.data == "accept":
                            self._accept()
                        elif key.data == "wake":
                            self._drain_wake()
                        elif key.data == "closing":
                            self._drain_closing(key.fileobj)
                        elif key.fileobj.fileno() in self._flushing:
                            self._flush_more(key.data)
                        else:
                            self._on_readable(key.data)
                    now = time.monotonic()
                    self._sweep(now)
                    self._add_workers(now)
                except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the server
                    _log(f"http selector: {type(exc).__name__}: {exc}")
                    time.sleep(0.01)
        finally:
            self._close_all()
            self._stopped.set()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _accept(self) -> None:
        import errno

        while True:
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and (self._evict_closing() or self._evict_idle()):
                    continue
                # out of descriptors and nothing idle to free: stop accepting for a moment
                self._selector.unregister(self.socket)
                self._accept_paused_until = time.monotonic() + 0.1
                return
            if self._open >= self.max_connections and not (self._evict_idle() or self._evict_closing()
                                                           or self._evict_slow_head(gently=False)):
                self._refuse(sock, 503, "Service Unavailable", "busy", "Server busy (connection limit)")
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(self._socket_mod.IPPROTO_TCP, self._socket_mod.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._lock:
                self._open += 1
            self._watch(_Connection(sock, addr))

    def _refuse(self, sock: Any, status: int, reason: str, code: str, detail: str) -> None:
        """Answer a connection not taken on (the connection limit) and close it."""
        self._send_last_words(sock, _error_head(status, reason, code, detail))
        sock.close()

    @staticmethod
    def _send_last_words(sock: Any, data: bytes) -> None:
        try:
            sock.setblocking(False)
            sock.send(data)
        except OSError:
            pass

    def _close_gently(self, sock: Any) -> None:
        """Close a connection (counted in `_open`) without losing the answer just sent to it.

        Closing a socket with unread input makes the kernel reset the connection, and the peer's
        kernel then drops the answer it has not read yet (a 413 sent before a large body, a 431).
        So the write side is shut (FIN after the answer) and input is read and dropped until the
        peer closes, for at most `CLOSE_LINGER_S` and `CLOSE_LINGER_BYTES`, on this thread."""
        if len(self._closing) >= self.CLOSE_LINGER_MAX:  # bounded: closing sockets hold descriptors
            self._evict_closing()
        try:
            sock.setblocking(False)
            sock.shutdown(self._socket_mod.SHUT_WR)
            self._selector.register(sock, self._selectors.EVENT_READ, "closing")
        except (OSError, ValueError, KeyError):
            self._end_closing(sock)
            return
        self._closing[sock.fileno()] = (sock, time.monotonic() + self.CLOSE_LINGER_S, self.CLOSE_LINGER_BYTES)

    def _drain_closing(self, sock: Any) -> None:
        entry = self._closing.get(sock.fileno())
        if entry is None:
            return
        try:
            got = sock.recv_into(self._sink)
        except BlockingIOError:
            return
        except OSError:
            got = 0
        left = entry[2] - got
        if not got or left <= 0:
            self._end_closing(sock)
        else:
            self._closing[sock.fileno()] = (sock, entry[1], left)

    def _end_closing(self, sock: Any) -> None:
        fd = sock.fileno()
        if self._closing.pop(fd, None) is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        sock.close()
        with self._lock:
            self._open -= 1

    def _watch(self, conn: _Connection) -> None:
        """Put a new connection in the selector, idle until its first request arrives."""
        self._selector.register(conn.sock, self._selectors.EVENT_READ, conn)
        self._idle[conn.sock.fileno()] = conn

    # -- answers to clients slow to read them ---------------------------------------------------

    def _send_or_keep(self, conn: _Connection) -> Callable[[bytes], None]:
        """A worker's send: what the socket takes at once goes out; the rest of an answer its client
        is slow to read is kept in `conn.unsent` for the selector to send (`_start_flush`), so clients
        that pipeline requests and never read the answers cannot hold the workers. An answer too big
        to keep (`FLUSH_MAX_BYTES`) is sent by the worker, under the request timeout."""
        def send(data: bytes) -> None:
            if not conn.unsent:
                sent = self._send_now(conn.sock, data)
                data = data[sent:]
                if not data:
                    return
            if len(conn.unsent) + len(data) > self.FLUSH_MAX_BYTES:
                conn.sock.sendall(conn.unsent + data)
                conn.unsent = b""
                return
            conn.unsent += data

        return send

    @staticmethod
    def _send_now(sock: Any, data: bytes) -> int:
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0
        finally:
            sock.settimeout(timeout)

    def _hand_over_to_flush(self, conn: _Connection) -> None:
        """From a worker: the selector sends the rest of the connection's answer."""
        with self._lock:
            if not self._selector_closed:
                self._to_flush.append(conn)
                self._wake()
                return
        conn.sock.close()
        with self._lock:
            self._open -= 1

    def _start_flush(self, conn: _Connection) -> None:
        """Send the rest of `conn`'s answer as its client reads. Over `FLUSH_TOTAL_BYTES` in all, the
        connections that went longest without taking anything are dropped to make room."""
        conn.sock.setblocking(False)
        conn.since = conn.started = time.monotonic()  # (last progress; `started`: when the flush began)
        conn.flushed = 0
        conn.unsent = bytearray(conn.unsent)  # (sent from the front: `del` there moves no bytes)
        while self._flushing and self._flush_bytes + len(conn.unsent) > self.FLUSH_TOTAL_BYTES:
            stalest = next(iter(self._flushing.values()))
            self._end_flush(stalest)
            self._forget(stalest)
        self._flushing[conn.sock.fileno()] = conn
        self._flush_bytes += len(conn.unsent)
        try:
            self._selector.register(conn.sock, self._selectors.EVENT_WRITE, conn)
        except (OSError, ValueError, KeyError):
            self._end_flush(conn)
            self._forget(conn)

    def _end_flush(self, conn: _Connection) -> None:
        self._flush_bytes -= len(conn.unsent)
        conn.unsent = b""
        self._flushing.pop(conn.sock.fileno(), None)

    def _flush_more(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.unsent)
        except BlockingIOError:
            return
        except OSError:
            self._end_flush(conn)
            self._forget(conn)
            return
        del conn.unsent[:sent]
        self._flush_bytes -= sent
        conn.flushed += sent
        fd = conn.sock.fileno()
        self._flushing.move_to_end(fd)
        conn.since = now = time.monotonic()
        if conn.unsent:
            if conn.flushed < (now - conn.started - self.request_timeout_s) * _MIN_BODY_RATE:
                self._end_flush(conn)  # reading, but too slowly to ever free its share: as a stalled body
                self._forget(conn)
            return
        self._end_flush(conn)
        self._selector.unregister(conn.sock)
        if not conn.keep_alive or self._stop.is_set():
            self._close_gently(conn.sock)
            return
        self._selector.register(conn.sock, self._selectors.EVENT_READ, conn)  # as a worker gives one back
        conn.started = 0.0
        if conn.buf:
            if self._begin(conn, capped=False):
                self._check_head(conn)
        else:
            self._idle[fd] = conn

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _give_back(self, conn: _Connection) -> None:
        """A worker puts a kept-alive connection back into the selector (or closes it when the
        selector is gone). Queued before it is registered, so the selector thread, which takes up
        the queue after each `select`, has it on its books before it sees any event of it."""
        conn.started = 0.0
        conn.since = time.monotonic()
        with self._lock:
            if not self._selector_closed and conn.sock.fileno() >= 0:
                conn.sock.setblocking(False)
                self._returned.append(conn)
                try:
                    self._selector.register(conn.sock, self._selectors.EVENT_READ, conn)
                except (OSError, ValueError, KeyError):
                    conn.buf.clear()  # a broken socket: on the books as idle (never begun), closed by the idle sweep
                    return
                if conn.buf:
                    self._wake()  # part of the next request is here already: its head deadline runs
                return
        conn.sock.close()
        with self._lock:
            self._open -= 1

    def _adopt_returned(self) -> None:
        while self._to_close:
            self._close_gently(self._to_close.popleft())
        while self._to_flush:
            self._start_flush(self._to_flush.popleft())
        while self._returned:
            conn = self._returned.popleft()
            if conn.buf:
                self._begin(conn, capped=False)
                self._check_head(conn)
            else:
                self._idle[conn.sock.fileno()] = conn

    def _on_readable(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._idle.get(fd) is not conn and self._partial.get(fd) is not conn:
            return  # an event of this `select` for a connection handed to a worker meanwhile
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        fd = conn.sock.fileno()
        if not data:  # the client is done sending: a request whose head is in but not its body is told so
            waiting = self._partial.get(fd) is conn and conn.head_end()
            self._forget(conn, _error_head(400, "Bad Request", BadRequestBody.code, "Request body ended early")
                         if waiting else b"")
            return
        conn.buf += data
        if fd in self._idle:
            del self._idle[fd]
            if not self._begin(conn, capped=True):
                return
        self._check_head(conn)

    def _begin(self, conn: _Connection, capped: bool) -> bool:
        """A request starts arriving: count it against `max_requests` (503 when full)."""
        with self._lock:
            full = capped and self._in_progress >= self.max_requests
        if full and self._evict_slow_head(whole_head=bool(conn.head_end())):
            full = False
        if not full:
            with self._lock:
                self._in_progress += 1
        else:
            self._forget(conn, _error_head(503, "Service Unavailable", "busy", "Server busy (request limit)"))
            return False
        conn.started = time.monotonic()
        self._partial[conn.sock.fileno()] = conn
        return True

    def _check_head(self, conn: _Connection) -> None:
        """Once the head is complete: answer a quick read here, queue a command for the next shared
        transaction, or queue the connection for a worker. When workers run short, a small
        Content-Length body must have arrived too, so clients that stall mid-body cannot take the
        last workers (the head's deadline covers the wait)."""
        fd = conn.sock.fileno()
        end = conn.head_end()
        if end:
            if self.quick is not None and self._serve_here(conn, end):
                return
            if self.group is not None and self._join_group(conn, end):
                return
            short = self._idle_workers - self._ready.qsize() <= max(1, self.workers // 4)
            if short and len(conn.buf) < end + _preread_length(conn.buf[:end]):
                return
            self._to_worker(conn)
        elif len(conn.buf) > MAX_HEADER_BYTES + 8192:
            self._partial.pop(fd, None)
            self._end_request()
            self._forget(conn, _error_head(431, "Request Header Fields Too Large", "headers_too_large",
                                           "Request header fields too large"))

    def _to_worker(self, conn: _Connection) -> None:
        """Hand a connection with a request in progress from the selector to a worker."""
        self._partial.pop(conn.sock.fileno(), None)
        self._selector.unregister(conn.sock)
        self._ready.put(conn)

    def _serve_here(self, conn: _Connection, end: int) -> bool:
        """Answer a quick request on this thread; False leaves the connection to the usual path.

        Only a bodiless GET or HEAD is parsed here; one the `quick` predicate refuses goes to a
        worker with its parsed head. The response is built in memory and sent without blocking.
        """
        buf = conn.buf
        if not (buf.startswith(b"GET ") or buf.startswith(b"HEAD ")):
            return False
        head = bytes(buf[:end])
        lower = head.lower()
        if b"\ncontent-length:" in lower or b"\ntransfer-encoding:" in lower:
            return False
        if not self._parse_here(conn, head):
            return True
        path = conn.parsed[0]["PATH_INFO"]
        if self._costly.get(path, 0) >= 2 or not self.quick(conn.parsed[0]):
            self._to_worker(conn)
            return True
        (environ, body, http10), conn.parsed = conn.parsed, None
        started = time.thread_time()  # CPU, as waiting for the GIL or the disk is no proof of a costly path
        data = self._respond_in_memory(conn, environ, body, http10)
        self._note_cost(path, time.thread_time() - started, data.startswith(b"HTTP/1.1 2"))
        self._send_here(conn, data)
        return True

    def _note_cost(self, path: str, spent: float, served: bool) -> None:
        """Send a quick path to workers once two of its answers in a row took over `QUICK_BUDGET_S` of
        CPU (a run grown to megabytes); one alone may be a garbage collection that fell on it. Only a
        cheap successful answer clears the count (a cheap refusal, e.g. a 401, proves nothing)."""
        if spent <= self.QUICK_BUDGET_S:
            if served:
                self._costly.pop(path, None)
            return
        self._costly[path] = self._costly.get(path, 0) + 1
        if self._costly[path] == 2:
            _log(f"http: {path[:200]} took {spent * 1000:.0f} ms of CPU on the selector thread; workers serve it now")
        if len(self._costly) > 1024:
            self._costly.popitem(last=False)

    def _parse_here(self, conn: _Connection, head: bytes) -> bool:
        """Take the head off the buffer and parse it into `conn.parsed`; False when it is refused
        (answered with its 4xx and closed)."""
        del conn.buf[:len(head)]
        try:
            conn.parsed = self._environ(conn, head)
        except _BadRequest as exc:
            self._forget(conn, exc.response)
            return False
        return True

    def _respond_in_memory(self, conn: _Connection, environ: Dict[str, Any], body: _BodyReader,
                           http10: bool) -> bytes:
        """Run one request through the app; its whole response, for the caller to send."""
        out: List[bytes] = []
        response = _ResponseWriter(conn, body, environ["REQUEST_METHOD"] == "HEAD", http10, out.append)
        try:
            self._write_out(response, self.app(environ, response.start_response))
        except Exception as exc:  # noqa: BLE001 - the app's own errors are JSON already; this is a last resort
            _log(f"500 from the WSGI stack: {type(exc).__name__}: {exc}")
            conn.keep_alive = False
            return _error_head(500, "Internal Server Error", "internal_error", "Internal error")
        if not body.drain():
            conn.keep_alive = False
        return b"".join(out)

    def _join_group(self, conn: _Connection, end: int) -> bool:
        """Queue a POST for the next shared transaction if `group.accepts` its path and body length;
        False leaves the connection to the usual path. Its small body is awaited here, under the head's
        deadline: the app must never wait for a client while others' writes wait on its transaction."""
        buf = conn.buf
        if not buf.startswith(b"POST "):
            return False
        length = _preread_length(buf[:end])
        target = bytes(buf[5:buf.find(b" ", 5)]).decode("latin-1").partition("?")[0]
        if not length or not self.group.accepts(_unquote_path(target), length):
            return False
        if len(buf) < end + length:
            return True
        head = bytes(buf[:end])
        conn.request = (head, bytes(buf[end:end + length]))  # to answer again should the commit fail
        if not self._parse_here(conn, head):
            return True
        self._partial.pop(conn.sock.fileno(), None)
        self._selector.unregister(conn.sock)
        with self._lock:
            self._grouped.append(conn)
            start, self._group_busy = not self._group_busy, True
        if start:
            self._ready.put(_GROUP_TURN)
        return True

    def _send_here(self, conn: _Connection, data: bytes) -> None:
        """Send a response built on the selector thread and put the connection back among the idle."""
        buf = conn.buf
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._forget(conn)
            return
        if sent < len(data):
            conn.unsent = data[sent:]
            if len(conn.unsent) > self.FLUSH_MAX_BYTES:  # too big to keep: a worker sends it, as it would
                self._to_worker(conn)
                return
            self._partial.pop(conn.sock.fileno(), None)
            self._end_request()
            self._selector.unregister(conn.sock)
            self._start_flush(conn)
            return
        if not conn.keep_alive:
            self._forget(conn)
            return
        self._partial.pop(conn.sock.fileno(), None)
        self._end_request()
        conn.started = 0.0
        conn.since = time.monotonic()
        if not buf:
            self._idle[conn.sock.fileno()] = conn
        elif self._begin(conn, capped=False) and conn.head_end():
            self._to_worker(conn)  # pipelined requests: a worker serves them in turn

    def _forget(self, conn: _Connection, last_words: bytes = b"", gently: bool = True) -> None:
        """Close a connection the selector holds (after `last_words`, `gently`: see `_close_gently`)."""
        fd = conn.sock.fileno()
        self._idle.pop(fd, None)
        if self._partial.pop(fd, None) is not None:
            self._end_request()
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if last_words:
            self._send_last_words(conn.sock, last_words)
            if gently:
                self._close_gently(conn.sock)
                return
        conn.sock.close()
        with self._lock:
            self._open -= 1

    def _end_request(self) -> None:
        with self._lock:
            self._in_progress -= 1

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection to make room; False when none is idle."""
        if not self._idle:
            return False
        _fd, conn = next(iter(self._idle.items()))
        self._forget(conn)
        return True

    def _evict_closing(self) -> bool:
        """Close the connection that has been closing longest, at once, to make room; False when none is."""
        if not self._closing:
            return False
        self._end_closing(next(iter(self._closing.values()))[0])
        return True

    def _evict_slow_head(self, whole_head: bool = False, gently: bool = True) -> bool:
        """Close the request whose head has been arriving longest to make room; False when none may go.

        A client sends its head at once; one that trickles it holds a slot for nothing (slowloris). So
        a newcomer whose head is whole takes the slot of a head incomplete for over a twentieth of
        `SLOW_HEAD_S`, and any newcomer that of one incomplete for over `SLOW_HEAD_S`: trickling
        sockets, however many and however often they reconnect, never keep out a client that sends
        its request. A request whose head is whole and whose body is arriving keeps its slot. Not
        `gently` (making room for a socket), the evicted one is closed at once, so the socket count
        never overshoots."""
        oldest = time.monotonic() - (self.SLOW_HEAD_S / 20 if whole_head else self.SLOW_HEAD_S)
        for conn in itertools.islice(self._partial.values(), 256):
            if conn.started > oldest:
                return False  # the oldest come first: none is slow enough
            if not conn.head_end():
                self._forget(conn, _error_head(408, "Request Timeout", "request_timeout",
                                               "Request too slow to arrive"), gently=gently)
                return True
        return False

    def _sweep(self, now: float) -> None:
        while self._idle:
            conn = next(iter(self._idle.values()))
            if now - conn.since < self.idle_timeout_s:
                break
            self._forget(conn)
        while self._partial:
            conn = next(iter(self._partial.values()))
            if now - conn.started < self.request_timeout_s:
                break
            self._forget(conn, _error_head(408, "Request Timeout", "request_timeout",
                                           "Request not received in time"))
        while self._closing:
            sock, deadline, _left = next(iter(self._closing.values()))
            if now < deadline:
                break
            self._end_closing(sock)
        while self._flushing:
            conn = next(iter(self._flushing.values()))
            if now - conn.since < self.request_timeout_s:
                break
            self._end_flush(conn)
            self._forget(conn)  # it took nothing for that long
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self.socket, self._selectors.EVENT_READ, "accept")

    def _close_all(self) -> None:
        with self._lock:
            self._selector_closed = True
        self._adopt_returned()
        for conn in list(self._flushing.values()):  # (`_adopt_returned` has taken up `_to_flush`)
            self._end_flush(conn)
            self._forget(conn)
        for conn in list(self._idle.values()) + list(self._partial.values()):
            self._forget(conn)
        for sock in list(self._to_close) + [entry[0] for entry in self._closing.values()]:
            sock.close()
            with self._lock:
                self._open -= 1
        self._to_close.clear()
        self._closing.clear()
        self._selector.close()
        self.socket.close()

    def shutdown(self) -> None:
        """Stop accepting, close idle connections and let workers finish what they serve.

        Open SSE streams are left to `GatewayApp.drain` (each gets a final event); `server_close`
        ends whatever is left.
        """
        self._stop.set()
        self._wake()
        if self._threads:
            self._stopped.wait(5.0)
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._ready.put(None)
        deadline = time.monotonic() + 5.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left: List[Any] = self._grouped
            self._grouped = []
        while not self._ready.empty():  # queued after the workers' stop: an unsent rest, a group's turn
            left.append(self._ready.get())
        for conn in left:  # never to be served: closed, not left open
            if isinstance(conn, _Connection):
                conn.sock.close()

    def server_close(self) -> None:
        """End the streams still open (after `shutdown` and `GatewayApp.drain`) and free the sockets."""
        self.streams.close()
        self.socket.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- workers ---------------------------------------------------------------------------------

    LINGER_S = 0.002  # a free worker waits this long for a client's next request before handing it back
    QUICK_BUDGET_S = 0.02  # a quick read that took more CPU on the selector thread: its path goes to workers
    # Work waiting this long while no worker takes any (every one is held that long): more workers are
    # started. Well above what a burst of quick requests (a thousand streams opened at once) holds them.
    ELASTIC_AFTER_S = 0.5
    ELASTIC_IDLE_S = 10.0  # ...each of which ends after this long without work

    def _add_workers(self, now: float) -> None:
        """Requests wait while every worker is held by a slow one (a model answering an observer request,
        a large upload): start a worker per waiting request, at most `workers` at a time and up to
        `max_workers`, rather than keep every other client waiting behind them. The extra workers end
        once idle for `ELASTIC_IDLE_S`. (Bounded well below the thread budget: each model call takes a
        thread of its own too, and under a process or address-space limit extra workers would take
        the threads those calls need.)"""
        waiting, taken = self._ready.qsize(), self._taken
        if not waiting or taken != self._stall[1]:
            self._stall = (now, taken)
            return
        if now - self._stall[0] < self.ELASTIC_AFTER_S or self._stop.is_set():
            return
        self._stall = (now, taken)
        with self._lock:
            added = [threading.Thread(target=self._work, args=(True,), name="http-worker-extra", daemon=True)
                     for _ in range(min(waiting, self.workers, self.max_workers - len(self._threads)))]
            self._threads.extend(added)
        for thread in added:
            try:
                thread.start()
            except RuntimeError:  # no thread to be had (a process or memory limit): the others go on
                with self._lock:
                    self._threads = [t for t in self._threads if t.is_alive() or t not in added]
                return

    def _work(self, extra: bool = False) -> None:
        import queue
        import select

        poller = select.poll()
        while True:
            with self._lock:
                self._idle_workers += 1
            try:
                conn = self._ready.get(timeout=self.ELASTIC_IDLE_S if extra else None)
            except queue.Empty:
                with self._lock:
                    self._idle_workers -= 1
                    self._threads.remove(threading.current_thread())
                return
            with self._lock:
                self._idle_workers -= 1
                self._taken += 1
            if conn is None:
                return
            if conn is _GROUP_TURN:
                self._serve_groups()
                continue
            outcome = self._serve_connection(conn, poller)
            if outcome == "keep" and not self._stop.is_set():
                self._give_back(conn)
                continue
            if outcome == "flush":
                self._hand_over_to_flush(conn)
                continue
            if outcome == "close" and self._hand_over_to_close(conn.sock):
                continue
            if outcome != "stream":
                conn.sock.close()
            with self._lock:
                self._open -= 1

    def _hand_over_to_close(self, sock: Any) -> bool:
        """Queue a socket a worker is done with for the selector to close gently (and count closed);
        False once the selector is gone."""
        with self._lock:
            if self._selector_closed:
                return False
            self._to_close.append(sock)
        self._wake()
        return True

    def _serve_connection(self, conn: _Connection, poller: Any) -> str:
        """Serve the request handed over, then those that follow at once: "keep", "close", "stream" or
        "flush" (its client is slow to read the answer: the selector sends the rest, see
        `_send_or_keep`). A request counts in `_in_progress` only while it is served: a worker
        lingering for the next one holds none, so lingering workers never fill `max_requests`."""
        counted = True  # the selector counted the request it handed over
        try:
            conn.sock.settimeout(self.request_timeout_s)
            if conn.unsent:  # an answer the selector began, too big for it to keep (see `_send_here`)
                conn.sock.sendall(conn.unsent)
                conn.unsent = b""
                outcome = "keep" if conn.keep_alive else "close"
            else:
                outcome = self._serve_one(conn)
            while outcome == "keep" and not conn.unsent and not self._stop.is_set():
                self._end_request()
                counted = False
                if not (conn.head_end() or (self._ready.empty() and self._linger(poller, conn))):
                    break
                with self._lock:
                    self._in_progress += 1
                counted = True
                outcome = self._serve_one(conn)  # pipelined, or sent right away
        except Exception as exc:  # noqa: BLE001 - a broken connection never kills a worker
            if not isinstance(exc, OSError):
                _log(f"http worker: {type(exc).__name__}: {exc}")
            outcome, conn.unsent = "close", b""  # (an answer cut short is not sent on)
        if counted:
            self._end_request()
        if conn.unsent and outcome in ("keep", "close"):
            conn.keep_alive = conn.keep_alive and outcome == "keep"
            return "flush"
        return outcome

    def _serve_groups(self) -> None:
        """Serve the queued `group` requests, a transaction at a time, until none is waiting."""
        while True:
            with self._lock:
                conns, self._grouped = self._grouped, []
                if not conns:
                    self._group_busy = False
                    return
            deferred: List[Callable[[], Any]] = []
            try:
                replies, deferred = self._replies_of_group(conns)
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop every later command
                _log(f"http group: {type(exc).__name__}: {exc}")
                replies = [_error_head(500, "Internal Server Error", "internal_error", "Internal error")] * len(conns)
                for conn in conns:
                    conn.keep_alive = False
            for conn, data in zip(conns, replies, strict=True):
                self._release_from_group(conn, data)
            if deferred:
                self._write_deferred(deferred)

    def _replies_of_group(self, conns: List[_Connection]) -> Tuple[List[bytes], List[Callable[[], Any]]]:
        """Run the group's requests in one transaction; their responses, to send once it committed.

        If it does not commit, none of their writes stands: each request is run through the app
        again with the reason (`FAILED_COMMIT_KEY`), so its error answer is the app's usual one
        (status, error shape, request id, CORS), and its connection closes. The writes those runs
        defer (their audit rows) are returned, to be made after the replies are sent."""
        try:
            with self.group.transaction():
                return [self._respond_in_memory(conn, *self._take_parsed(conn)) for conn in conns], []
        except Exception as exc:  # noqa: BLE001 - answered below, request by request
            failure = exc
        replies, deferred = [], []
        for conn in conns:
            if conn.parsed is not None:  # not run yet
                environ, reader, http10 = self._take_parsed(conn)
            else:  # run: read its body again
                head, body = conn.request
                conn.buf[:0] = body
                environ, reader, http10 = self._environ(conn, head)
            environ[FAILED_COMMIT_KEY], environ[DEFERRED_WRITES_KEY] = failure, deferred
            conn.keep_alive = False
            replies.append(self._respond_in_memory(conn, environ, reader, http10))
        return replies, deferred

    def _write_deferred(self, deferred: List[Callable[[], Any]]) -> None:
        """The writes a failed group's requests deferred (`DEFERRED_WRITES_KEY`), in one transaction."""
        try:
            with self.group.transaction():
                for write in deferred:
                    write()
        except Exception as exc:  # noqa: BLE001 - best effort: the database refused the group's commit already
            _log(f"http: {len(deferred)} write(s) of a failed shared commit not made: {type(exc).__name__}: {exc}")

    @staticmethod
    def _take_parsed(conn: _Connection) -> Tuple[Dict[str, Any], _BodyReader, bool]:
        parsed, conn.parsed = conn.parsed, None
        return parsed

    def _release_from_group(self, conn: _Connection, data: bytes) -> None:
        """Send a group's reply without waiting (a worker finishes what the socket does not take),
        then hand the connection back to the selector, or close it."""
        conn.request = None
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent, conn.keep_alive = len(data), False
        self._end_request()
        if sent < len(data):
            conn.unsent = data[sent:]
            self._hand_over_to_flush(conn)
            return
        if conn.keep_alive and not self._stop.is_set():
            self._give_back(conn)
            return
        conn.sock.close()
        with self._lock:
            self._open -= 1

    def _linger(self, poller: Any, conn: _Connection) -> bool:
        """Wait briefly for the connection's next request head: a client that sends requests back to
        back is then served without the round trip through the selector thread."""
        fd = conn.sock.fileno()
        poller.register(fd, 1)  # POLLIN
        try:
            if not poller.poll(self.LINGER_S * 1000):
                return False
        finally:
            poller.unregister(fd)
        data = conn.sock.recv(65536)
        if not data:
            raise ConnectionResetError("client closed the connection")
        conn.buf += data
        return bool(conn.head_end())

    def _serve_one(self, conn: _Connection) -> str:
        """Serve the request whose head is buffered (or parsed already): "keep", "close" or "stream"
        (handed to the writer)."""
        if conn.parsed is not None:
            (environ, body, http10), conn.parsed = conn.parsed, None
        else:
            end = conn.head_end()
            head = bytes(conn.buf[:end])
            del conn.buf[:end]
            try:
                environ, body, http10 = self._environ(conn, head)
            except _BadRequest as exc:
                conn.sock.sendall(exc.response)
                return "close"
        if environ.get("HTTP_EXPECT", "").lower() == "100-continue" and not body.done and not http10:
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        response = _ResponseWriter(conn, body, environ["REQUEST_METHOD"] == "HEAD", http10, self._send_or_keep(conn))
        try:
            result = self.app(environ, response.start_response)
        except Exception as exc:  # noqa: BLE001 - the app's own errors are JSON already; this is a last resort
            _log(f"500 from the WSGI stack: {type(exc).__name__}: {exc}")
            conn.sock.sendall(_error_head(500, "Internal Server Error", "internal_error", "Internal error"))
            return "close"
        if body._received:
            conn.sock.settimeout(self.request_timeout_s)  # reading the body may have shortened it
        stream = environ.get("abstractgateway.sse")
        if stream is not None and response.status_code == 200 and environ["REQUEST_METHOD"] == "GET":
            head = response.head(stream=True)  # decides the body's framing: `chunked` is read after it
            self.streams.add(conn.sock, stream, result, head, response.chunked)
            return "stream"
        self._write_out(response, result)
        if not conn.keep_alive or not body.drain():
            return "close"
        return "keep"

    @staticmethod
    def _write_out(response: _ResponseWriter, result: Iterable[bytes]) -> None:
        """Write the app's response body, then close its iterable (WSGI's `close`), whatever happens."""
        try:
            for data in result:
                if data:
                    response.write(data)
            response.finish()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _environ(self, conn: _Connection, head: bytes) -> Tuple[Dict[str, Any], _BodyReader, bool]:
        return _wsgi_environ(conn, head, self.server_address, self.request_timeout_s)


def server_options(gateway: Gateway) -> Dict[str, Any]:
    """`HttpServer` keyword arguments for `gateway`: its settings, and what the route table lets the
    server do itself: quick reads where stores read by key, commands acknowledged by one shared
    commit where one transaction covers the stores (SQLite)."""
    config, stores = gateway.config, gateway.stores
    group = (commit_group(config, functools.partial(stores.db.transaction, isolate_writes=True))
             if stores.atomic else None)
    return {"workers": config.http_workers, "request_timeout_s": config.request_timeout_s,
            "idle_timeout_s": config.idle_timeout_s, "max_requests": config.max_threads,
            "max_connections": config.max_connections, "sse_max_buffer_bytes": config.sse_max_buffer_bytes,
            "quick": is_quick_request if stores.keyed_reads else None, "group": group}


# =====================================================================================
# 6. Security middleware
# =====================================================================================
#
# Each middleware is a small WSGI class with one job. `secure_app()` stacks them, outermost
# first: (the trusted-proxy address, when configured) -> CORS (so even rejections carry CORS headers) ->
# request id and response hardening -> audit (so rejected writes are audited too) -> origin ->
# lockout -> auth -> body limit -> concurrency/SSE caps -> the app. Each one reads what applies
# from the request's matched route (`route_match`): its auth kind, body cap and whether it is a
# stream. Only routes under `/api/gateway` (and unknown paths there) are guarded.

WEAK_TOKENS = frozenset({"dev-token", "devtoken", "token", "changeme", "password", "admin", "god", "zeus", "root",
                         "superuser"})
MIN_TOKEN_LENGTH = 15
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
TOKEN_SETTING = "auth_token"


def guarded_route(environ: Dict[str, Any]) -> Optional[Route]:
    """The route whose policy the middlewares apply to this request; None for a public request."""
    route = route_match(environ).route
    return route if route is not None and route.api else None


def client_ip(environ: Dict[str, Any]) -> str:
    """The client's address: the socket peer, or behind a trusted proxy the one it appended to X-Forwarded-For."""
    return environ.get("REMOTE_ADDR") or "unknown"


def token_fingerprint(token: str) -> str:
    """First 12 hex chars of the token's SHA-256: identifies a token in logs without revealing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def is_weak_token(token: str) -> bool:
    return len(token) < MIN_TOKEN_LENGTH or token.lower() in WEAK_TOKENS


@dataclass
class SecurityPolicy:
    """Everything the middlewares decide with, resolved once from `Config` (and the DB token)."""

    enabled: bool
    tokens: Tuple[str, ...]
    protect_read: bool
    protect_write: bool
    dev_read_no_auth: bool
    allowed_origins: Tuple[str, ...]
    max_body_bytes: int
    max_upload_body_bytes: int
    max_attachment_bytes: int
    max_bundle_bytes: int
    max_concurrency: int
    max_sse: int
    lockout_after: int
    lockout_base_s: float
    lockout_max_s: float
    lockout_decay_s: float
    trust_proxy: bool
    audit: bool
    audit_max_bytes: int
    audit_headers: Tuple[str, ...]
    token_source: str = "env"

    @classmethod
    def from_config(cls, config: Config, settings: Optional[SettingsStore] = None) -> "SecurityPolicy":
        tokens = _split_csv(config.auth_token) + _split_csv(config.auth_tokens)
        source = "env"
        if not tokens and settings is not None:
            stored = settings.get(TOKEN_SETTING)
            tokens, source = ([stored], "database") if stored else ([], "none")
        return cls(
            enabled=config.security, tokens=tuple(dict.fromkeys(tokens)), protect_read=config.protect_read,
            protect_write=config.protect_write, dev_read_no_auth=config.dev_read_no_auth,
            allowed_origins=tuple(_split_csv(config.allowed_origins)), max_body_bytes=config.max_body_bytes,
            max_upload_body_bytes=config.max_upload_body_bytes, max_attachment_bytes=config.max_attachment_bytes,
            max_bundle_bytes=config.max_bundle_bytes, max_concurrency=config.max_concurrency, max_sse=config.max_sse,
            lockout_after=config.lockout_after, lockout_base_s=config.lockout_base_s,
            lockout_max_s=config.lockout_max_s, lockout_decay_s=config.lockout_decay_s, trust_proxy=config.trust_proxy,
            audit=config.audit_log, audit_max_bytes=config.audit_log_max_bytes * (config.audit_log_rotations + 1),
            audit_headers=tuple(h.lower() for h in _split_csv(config.audit_log_headers)
                                if h.lower() != "authorization"),
            token_source=source,
        )

    def body_cap(self, route: Route) -> int:
        """The largest body a request to `route` may carry (0: no cap): the setting it names, plus the
        multipart overhead for an upload (then lowered to `max_upload_body_bytes` when that is set)."""
        cap = max(0, getattr(self, route.max_body))
        if route.multipart is None:
            return cap
        cap += MULTIPART_OVERHEAD
        return min(cap, self.max_upload_body_bytes) if self.max_upload_body_bytes > 0 else cap


def _split_csv(text: str) -> List[str]:
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


def _reject(environ: Dict[str, Any], start_response: Callable, status: int, code: str, detail: str,
            headers: Optional[Dict[str, str]] = None) -> Iterable[bytes]:
    return json_response({"detail": detail, "code": code}, status, headers)(environ, start_response)


class _Middleware:
    def __init__(self, app: Callable, policy: SecurityPolicy) -> None:
        self.app = app
        self.policy = policy


class TrustedProxyMiddleware(_Middleware):
    """Behind a trusted proxy: the client is the last X-Forwarded-For entry, the one the proxy appended.

    Not werkzeug's ProxyFix: it parses the header as a quoted list, and a client-sent unbalanced quote
    makes the whole header unparseable, so the request would keep the proxy's own (loopback) address
    and pass for a local client.
    """

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", 1)[-1].strip()
        if forwarded:
            environ["REMOTE_ADDR"] = forwarded
        return self.app(environ, start_response)


class CORSMiddleware(_Middleware):
    """Outermost: CORS headers on every response (rejections included); answers preflights."""

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        origin = environ.get("HTTP_ORIGIN")
        if not origin:
            return self.app(environ, start_response)
        cors = [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"),
                ("Access-Control-Expose-Headers", "X-Request-Id, Retry-After, Content-Range"), ("Vary", "Origin")]
        if environ.get("REQUEST_METHOD") == "OPTIONS" and environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
            requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "Authorization, Content-Type")
            # the answer echoes the requested headers: a cache must key it on them too
            cors[-1] = ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
                                "Access-Control-Request-Private-Network")
            start_response("200 OK", cors + [  # as the original (Starlette): 200, "OK"
                ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", requested), ("Access-Control-Max-Age", "600"),
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "2")])
            return [b"OK"]

        def _start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
            return start_response(status, headers + cors, exc_info)

        return self.app(environ, _start)


class RequestIdMiddleware(_Middleware):
    """Gives every in-scope request an id (client's `X-Request-Id` if sane) and hardens response headers."""

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        incoming = environ.get("HTTP_X_REQUEST_ID", "").strip()
        request_id = incoming if incoming and len(incoming) <= 64 and incoming.isprintable() else os.urandom(16).hex()
        environ["abstractgateway.request_id"] = request_id
        api = guarded_route(environ) is not None

        def _start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
            names = {k.lower() for k, _ in headers}
            extra = [] if "x-content-type-options" in names else [("X-Content-Type-Options", "nosniff")]
            if api and "cache-control" not in names:
                extra.append(("Cache-Control", "no-store"))
            if api and "x-request-id" not in names:
                extra.append(("X-Request-Id", request_id))
            return start_response(status, headers + extra, exc_info)

        return self.app(environ, _start)


AUTH_REQUIRED_KEY = "abstractgateway.auth_required"  # set by AuthMiddleware, read by the audit


def _redacted_query(query_string: str) -> str:
    """The query's parameter names only (`k=<redacted>`): values may carry secrets."""
    keys = [part.split("=", 1)[0].strip() for part in query_string.split("&")]
    return "&".join([f"{k}=<redacted>" for k in keys if k][:50])


class AuditMiddleware(_Middleware):
    """Records every in-scope write request (rejected ones too) once its response is finished."""

    def __init__(self, app: Callable, policy: SecurityPolicy, store: AuditStore) -> None:
        super().__init__(app, policy)
        self.store = store

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        from werkzeug.wsgi import ClosingIterator

        route = guarded_route(environ)
        if not (self.policy.audit and route is not None and route.auth == "write"):
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "").upper()
        path = environ.get("PATH_INFO", "")
        started = time.perf_counter()
        status_box = [0]

        def _start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
            status_box[0] = int(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        token = _bearer(environ)
        fingerprint = token_fingerprint(token) if token else None
        headers_json = _json_dumps({h: environ[f"HTTP_{h.upper().replace('-', '_')}"] for h in self.policy.audit_headers
                                    if f"HTTP_{h.upper().replace('-', '_')}" in environ})
        length = environ.get("CONTENT_LENGTH", "").strip()

        def _row(status: int, error: Optional[str] = None) -> Tuple[Any, ...]:
            return (utc_now_iso(), environ.get("abstractgateway.request_id", ""), client_ip(environ),
                    method, path, status, round((time.perf_counter() - started) * 1000, 3), fingerprint, headers_json,
                    _redacted_query(environ.get("QUERY_STRING", "")), bool(environ.get(AUTH_REQUIRED_KEY)),
                    environ.get("HTTP_ORIGIN"), environ.get("HTTP_USER_AGENT"),
                    int(length) if length.isdigit() else None, error)

        # The row rides on the request's first database write (written as a success, the usual end of
        # a request that writes); `settle` fixes it in the rare case the request ends otherwise.
        deferred = environ.get(DEFERRED_WRITES_KEY)
        box = self.store.append_with_next_write(lambda: _row(200)) if deferred is None else []

        def _record(error: Optional[str] = None) -> None:
            if deferred is not None:  # answered again after a failed shared commit: the server writes it later
                deferred.append(functools.partial(self.store.append, _row(status_box[0] or 500, error)))
                return
            try:
                self.store.settle(box, _row(status_box[0] or 500, error), 200)
            except Exception as exc:  # noqa: BLE001 - auditing never breaks a request
                _log(f"audit write failed: {type(exc).__name__}: {exc}")

        try:
            return ClosingIterator(self.app(environ, _start), _record)
        except BaseException as exc:
            _record(f"{type(exc).__name__}: {exc}")
            raise


class OriginMiddleware(_Middleware):
    """403 for a browser `Origin` outside the allowlist (clients without Origin are not affected)."""

    def allowed(self, origin: str) -> bool:
        import fnmatch

        for pattern in self.policy.allowed_origins:
            if pattern == "*" or (any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(origin, pattern)) \
                    or origin == pattern:
                return True
        return False

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        origin = environ.get("HTTP_ORIGIN", "")
        if origin and guarded_route(environ) is not None and not self.allowed(origin):
            return _reject(environ, start_response, 403, "origin_not_allowed", "Forbidden (origin not allowed)")
        return self.app(environ, start_response)


@dataclass
class _Strikes:
    """One client's failed attempts: a count that decays with time, the last one's time, the lock's end."""

    failures: float
    last_failure: float
    locked_until: float = 0.0


class LockoutTracker:
    """Per-IP auth failures with exponential lockout; counts decay with a half-life; table is bounded."""

    def __init__(self, after: int, base_s: float, max_s: float, decay_s: float, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from collections import OrderedDict

        self.after, self.base_s, self.max_s, self.decay_s = after, base_s, max_s, decay_s
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, _Strikes]" = OrderedDict()  # least recently failed first

    def remaining(self, ip: str) -> float:
        """Seconds `ip` stays locked (0 when it is not)."""
        with self._lock:
            entry = self._entries.get(ip)
            left = entry.locked_until - self.clock() if entry else 0.0
        return left if left >= 1.0 else 0.0

    def failure(self, ip: str) -> float:
        """Record a failed attempt; return the lock length it triggers (0: none yet)."""
        with self._lock:
            now = self.clock()
            entry = self._entries.pop(ip, None) or _Strikes(0.0, now)
            entry.failures = entry.failures * 0.5 ** ((now - entry.last_failure) / self.decay_s) + 1.0
            entry.last_failure = now
            lock_s = 0.0
            failures = round(entry.failures)  # decayed counts are fractional; a fresh streak stays whole
            if failures >= self.after and self.base_s > 0:
                lock_s = self.base_s * 2 ** (failures - self.after)
                if self.max_s > 0:
                    lock_s = min(lock_s, self.max_s)
                entry.locked_until = now + lock_s
            self._entries[ip] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return lock_s

    def success(self, ip: str) -> None:
        with self._lock:
            self._entries.pop(ip, None)


def _bearer(environ: Dict[str, Any]) -> Optional[str]:
    from werkzeug.datastructures import Authorization

    auth = Authorization.from_header(environ.get("HTTP_AUTHORIZATION"))
    return auth.token or None if auth is not None and auth.type == "bearer" else None


class LockoutMiddleware(_Middleware):
    """429 with Retry-After while the client IP is locked out."""

    def __init__(self, app: Callable, policy: SecurityPolicy, tracker: LockoutTracker) -> None:
        super().__init__(app, policy)
        self.tracker = tracker

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if guarded_route(environ) is not None:
            left = self.tracker.remaining(client_ip(environ))
            if left:
                return _reject(environ, start_response, 429, "auth_lockout", "Too Many Requests (auth lockout)",
                               {"Retry-After": str(int(left))})
        return self.app(environ, start_response)


class AuthMiddleware(_Middleware):
    """Bearer-token check (constant time against every configured token)."""

    def __init__(self, app: Callable, policy: SecurityPolicy, tracker: LockoutTracker) -> None:
        super().__init__(app, policy)
        self.tracker = tracker

    def required(self, environ: Dict[str, Any], route: Route) -> bool:
        if route.auth == "write":
            return self.policy.protect_write
        if route.auth == "read" and self.policy.protect_read:
            # the dev escape hatch trusts only the socket peer (or XFF when trust-proxy is on)
            return not (self.policy.dev_read_no_auth and client_ip(environ) in LOOPBACK)
        return False

    def valid(self, token: Optional[str]) -> bool:
        import hmac

        matched = False
        for candidate in self.policy.tokens:  # no early exit: timing does not reveal which token matched
            matched |= hmac.compare_digest(candidate.encode(), (token or "").encode())
        return matched and bool(token)

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        route = guarded_route(environ)
        required = route is not None and self.required(environ, route)
        environ[AUTH_REQUIRED_KEY] = required
        if not required:
            return self.app(environ, start_response)
        if not self.policy.tokens:
            return _reject(environ, start_response, 503, "no_token_configured",
                           "Gateway auth required but no token configured")
        ip = client_ip(environ)
        if not self.valid(_bearer(environ)):
            # a request answered again after a failed shared commit was counted the first time
            lock_s = self.tracker.remaining(ip) if FAILED_COMMIT_KEY in environ else self.tracker.failure(ip)
            if int(lock_s) > 0:
                return _reject(environ, start_response, 429, "auth_lockout", "Too Many Requests (auth lockout)",
                               {"Retry-After": str(int(lock_s))})
            return _reject(environ, start_response, 401, "unauthorized", "Unauthorized",
                           {"WWW-Authenticate": "Bearer"})
        self.tracker.success(ip)
        return self.app(environ, start_response)


@functools.lru_cache(maxsize=None)
def _capped_body_type() -> type:
    """werkzeug's `LimitedStream`, whose 413 says what the cap is (built once, werkzeug imported lazily)."""
    from werkzeug.exceptions import RequestEntityTooLarge
    from werkzeug.wsgi import LimitedStream

    class CappedBody(LimitedStream):
        def on_exhausted(self) -> None:
            raise RequestEntityTooLarge(f"Payload Too Large (more than {self.limit - 1} bytes)")

    return CappedBody


class BodyLimitMiddleware(_Middleware):
    """413 for a body over its route's cap: by Content-Length up front, and while reading, since a
    chunked body has no length to check (werkzeug's LimitedStream raises 413 when a read passes it)."""

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        from werkzeug.wsgi import get_content_length

        route = guarded_route(environ)
        cap = self.policy.body_cap(route) if route is not None else 0
        if cap:
            declared = get_content_length(environ)
            if declared is not None and declared > cap:
                return _reject(environ, start_response, 413, "too_large",
                               f"Payload Too Large ({declared} bytes > {cap} bytes)")
            # cap + 1: the read that finds the end of a body of exactly `cap` bytes is not past the cap
            environ["wsgi.input"] = _capped_body_type()(environ["wsgi.input"], cap + 1, is_max=True)
        return self.app(environ, start_response)


class ConcurrencyMiddleware(_Middleware):
    """Caps concurrent API requests and SSE streams separately; 429 + Retry-After when full."""

    def __init__(self, app: Callable, policy: SecurityPolicy) -> None:
        super().__init__(app, policy)
        self.requests = threading.BoundedSemaphore(policy.max_concurrency)
        self.streams = threading.BoundedSemaphore(policy.max_sse)

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        from werkzeug.wsgi import ClosingIterator

        route = guarded_route(environ)
        if route is None or environ.get("REQUEST_METHOD", "").upper() == "OPTIONS":
            return self.app(environ, start_response)
        pool = self.streams if route.stream else self.requests
        if not pool.acquire(timeout=0.01):
            return _reject(environ, start_response, 429, "concurrency_limit", "Too Many Requests (concurrency limit)",
                           {"Retry-After": "1"})
        try:
            return ClosingIterator(self.app(environ, start_response), pool.release)
        except BaseException:
            pool.release()
            raise


def secure_app(app: Callable, policy: SecurityPolicy, audit: Optional[AuditStore]) -> Callable:
    """Wrap the WSGI app in the security middlewares (no-op wrapping when security is off)."""
    if not policy.enabled:
        return CORSMiddleware(RequestIdMiddleware(app, policy), policy)
    tracker = LockoutTracker(policy.lockout_after, policy.lockout_base_s, policy.lockout_max_s, policy.lockout_decay_s)
    inner = ConcurrencyMiddleware(app, policy)
    inner = BodyLimitMiddleware(inner, policy)
    inner = AuthMiddleware(inner, policy, tracker)
    inner = LockoutMiddleware(inner, policy, tracker)
    inner = OriginMiddleware(inner, policy)
    if audit is not None:
        inner = AuditMiddleware(inner, policy, audit)
    outer = CORSMiddleware(RequestIdMiddleware(inner, policy), policy)
    if policy.trust_proxy:
        outer = TrustedProxyMiddleware(outer, policy)
    return outer


def build_wsgi(gateway: Gateway, runner: Optional[Runner] = None) -> Tuple[Callable, GatewayApp, SecurityPolicy]:
    """The full WSGI stack for `gateway`: (secured app, inner GatewayApp, policy in force)."""
    app = GatewayApp(gateway, runner)
    policy = SecurityPolicy.from_config(gateway.config, gateway.stores.settings)
    audit = gateway.stores.audit if policy.audit else None
    if audit is not None:
        audit.max_bytes = policy.audit_max_bytes
    return JsonErrors(secure_app(app, policy, audit)), app, policy


def ensure_token(config: Config, settings: SettingsStore) -> Tuple[Optional[str], bool]:
    """The token to announce on first start: (generated token, True) the first time, else (None, False).

    Explicit env tokens always win; otherwise a strong token is generated once and stored in the DB.
    """
    import secrets

    if not config.security or _split_csv(config.auth_token) or _split_csv(config.auth_tokens):
        return None, False
    if settings.get(TOKEN_SETTING):
        return None, False
    token = secrets.token_urlsafe(32)
    if not settings.set_if_absent(TOKEN_SETTING, token):  # another process's first start stored its own
        return None, False
    return token, True


def startup_problem(config: Config, policy: SecurityPolicy) -> Optional[str]:
    """Why `serve` must refuse to start with this configuration (None if it may)."""
    public = config.host not in LOOPBACK
    if public and config.tool_mode == "local" and not config.allow_local_tools_on_network:
        return (f"Refusing to bind {config.host} with ABSTRACTGATEWAY_TOOL_MODE=local: anyone who can start a run "
                "could run shell commands and write files on this machine. Bind 127.0.0.1, use the default "
                "`passthrough` tool mode, or set ABSTRACTGATEWAY_ALLOW_LOCAL_TOOLS_ON_NETWORK=1 if you accept that.")
    if not policy.enabled:
        return None
    if any(_bearer({"HTTP_AUTHORIZATION": f"Bearer {t}"}) != t for t in policy.tokens):
        return ("A configured auth token cannot be sent in an `Authorization: Bearer` header (it has an `=` "
                "before its end), so every request would be refused. Generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    weak = [t for t in policy.tokens if is_weak_token(t)]
    if public and weak:
        return (f"Refusing to bind {config.host}: a weak auth token is configured (shorter than {MIN_TOKEN_LENGTH} "
                "characters or a common word). Set ABSTRACTGATEWAY_AUTH_TOKEN to a long random value, e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`, or bind 127.0.0.1.")
    if policy.protect_write and not policy.tokens:
        return "No auth token configured: set ABSTRACTGATEWAY_AUTH_TOKEN or run `abstractgateway token rotate`."
    return None


# =====================================================================================
# 7. CLI
# =====================================================================================


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for setting in SETTINGS:
        if setting.name in names and setting.flag:
            kwargs: Dict[str, Any] = {"dest": setting.name, "default": None,
                                      "help": f"{setting.help} [env {setting.env}]"}
            if setting.choices:
                kwargs["choices"] = setting.choices
            parser.add_argument(setting.flag, **kwargs)


def _config_from_args(args: argparse.Namespace) -> Config:
    return Config.load(overrides={s.name: getattr(args, s.name, None) for s in SETTINGS})


def _cmd_migrate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    stores = open_stores(config.replace(store_backend="sqlite"))
    try:
        report = migrate(args.source, stores, data_dir=config.data_dir, source_db=args.source_db)
    except (FileNotFoundError, ValueError) as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2
    finally:
        stores.close()
    print(report.render())
    return 0 if report.ok else 1


def _cmd_backup(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    db = None
    try:
        db = Database(config.db_path, synchronous=config.synchronous, migrate=False)
        dest = db.backup_to(args.dest)
    except (ValueError, SchemaError, StorageError, apsw.Error) as exc:
        print(f"backup: {type(exc).__name__}: {exc}" if isinstance(exc, apsw.Error) else f"backup: {exc}",
              file=sys.stderr)
        return 1
    finally:
        if db is not None:
            db.close()
    print(f"backup written to {dest} (integrity_check ok)")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    try:
        db = Database(config.db_path, synchronous=config.synchronous, migrate=False)
    except (SchemaError, apsw.Error) as exc:
        print(f"check: problem: {exc}", file=sys.stderr)
        return 1
    try:
        facts, problems = check_database(db)
    finally:
        db.close()
    print(json.dumps({**facts, "problems": problems}, indent=2))
    for problem in problems:
        print(f"check: problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM, SIGINT or SIGHUP (a closed terminal; not under `nohup`): a clean stop,
    which releases the runner lease at once. Installed first thing, so a signal during start-up (a schema upgrade, say)
    ends in the same clean stop once start-up is done, not in a traceback."""
    import signal

    stop = threading.Event()

    def _handle(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal while stopping: no more waiting (nothing acknowledged is lost)
            print("abstractgateway: stopping now (second signal)", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup` says: keep running
            signal.signal(sig, _handle)
    return stop


def _open_gateway(config: Config, command: str) -> Optional[Gateway]:
    """The gateway on the configured database, or None after saying why it can't be opened
    (damaged, foreign or too new a file, a store that does not answer)."""
    try:
        gateway = Gateway(config)
    except (SchemaError, StorageError, apsw.Error) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None
    damage = gateway.stores.db.wal_damage
    if damage is not None:
        kept = f"a copy is kept at {damage['copy']}" if damage["copy"] else "no copy could be kept"
        print(f"{command}: WARNING: the WAL was damaged, {damage['detail']}: the writes in it are lost ({kept}; "
              f"`abstractgateway check` lists the damage, a backup has them)", file=sys.stderr, flush=True)
    return gateway


def _ignore_file_size_signal() -> None:
    """A file-size limit (RLIMIT_FSIZE) must fail the write (reported as a full disk), not kill us."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _return_big_blocks_to_the_os() -> None:
    """Keep multi-megabyte blocks out of the malloc heap, so memory freed after a big model answer
    goes back to the system.

    glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB): after one
    3 MB answer, every later one is allocated on the heap, whose freed middle is never returned (RSS
    grew by 270 MB per such run, to 1 GB). A fixed threshold (glibc's initial 128 KiB) keeps big
    blocks mmapped, unmapped on free. Skipped when MALLOC_MMAP_THRESHOLD_ is set; a no-op off glibc.

    And at most 4 malloc arenas: glibc gives threads up to 8 per core, each reserving 64 MiB of
    address space, which under an address-space limit (`ulimit -v`) ran out with RSS under 100 MB.
    The GIL serialises Python's allocations anyway. Skipped when MALLOC_ARENA_MAX is set.
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS has no mallopt)
        return
    m_mmap_threshold, m_arena_max = -3, -8  # <malloc.h>
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(128 * 1024))
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(4))


def _exit_leaving_model_calls() -> None:
    """End the process now, after a clean stop that left ticks waiting on a model: the interpreter's
    own exit would wait for those threads (a stalled model server: up to `llm_timeout_s`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _close_gateway(gateway: Gateway) -> None:
    """The end of a clean stop: the WAL folded into the file (or a line saying why not), then closed."""
    problem = gateway.stores.db.checkpoint()
    if problem:
        print(f"abstractgateway: the WAL stays (checkpoint failed: {problem}); it is folded in on the next start",
              file=sys.stderr, flush=True)
    gateway.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    stop = _stop_on_signals()
    config = _config_from_args(args)
    _ignore_file_size_signal()
    _return_big_blocks_to_the_os()
    gateway = _open_gateway(config, "serve")
    if gateway is None:
        return 2
    new_token, _ = ensure_token(config, gateway.stores.settings)
    wsgi, app, policy = build_wsgi(gateway)
    problem = startup_problem(config, policy)
    if problem:
        print(f"serve: {problem}", file=sys.stderr)
        gateway.close()
        return 2
    try:
        server = HttpServer(wsgi, config.host, config.port, **server_options(gateway))
    except OSError as exc:
        print(f"serve: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        gateway.close()
        return 1
    runner = Runner(gateway).start() if config.runner and not args.no_runner else None
    app.runner = runner
    url = f"http://{config.host}:{server.server_port}"
    catalog = gateway.host.catalog
    failed = [b for versions in catalog.bundles.values() for b in versions.values() if b.load_error]
    print(f"AbstractGateway {__version__} listening on {url}", flush=True)
    print(f"  database : {config.db_path} ({gateway.stores.backend} backend)")
    if not policy.enabled:
        print("  security : OFF (ABSTRACTGATEWAY_SECURITY=0): anyone who can reach this port can act")
    elif new_token:
        print(f"  token    : generated and stored in the database (shown once; `abstractgateway token show`):\n"
              f"             {new_token}\n"
              f"             curl -H 'Authorization: Bearer {new_token}' {url}/api/gateway/ping")
    else:
        print(f"  token    : from {policy.token_source}"
              f" ({len(policy.tokens)} configured; `abstractgateway token show`)")
    print(f"  bundles  : {sum(len(v) for v in catalog.bundles.values())} loaded from {config.flows_dir} and uploads"
          f"{f', {len(failed)} failed' if failed else ''}")
    for bundle in failed:
        print(f"    ! {bundle.ref}: {bundle.load_error}")
    print(f"  runner   : {'in this process' if runner else 'external (--no-runner)'}", flush=True)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    stop.wait()
    print("abstractgateway: stopping (draining streams and ticks)", file=sys.stderr, flush=True)
    server.shutdown()  # stop accepting; requests in progress finish
    app.drain(timeout=5.0)  # open streams send a final event and end
    server.server_close()
    left = runner.stop() if runner is not None else 0
    _close_gateway(gateway)
    if left:
        _exit_leaving_model_calls()
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    db = Database(config.db_path, synchronous=config.synchronous)
    try:
        settings = SettingsStore(db)
        env_tokens = _split_csv(config.auth_token) + _split_csv(config.auth_tokens)
        if args.action == "rotate":
            import secrets

            settings.set(TOKEN_SETTING, secrets.token_urlsafe(32))
            print(settings.get(TOKEN_SETTING))
            if env_tokens:
                print("note: ABSTRACTGATEWAY_AUTH_TOKEN(S) is set and wins over the stored token", file=sys.stderr)
            else:
                print("restart `abstractgateway serve` to use it", file=sys.stderr)
            return 0
        if env_tokens:
            print("token(s) come from the environment (ABSTRACTGATEWAY_AUTH_TOKEN/S); fingerprints: "
                  + ", ".join(token_fingerprint(t) for t in env_tokens))
            return 0
        stored = settings.get(TOKEN_SETTING)
        if not stored:
            print("no token yet: `abstractgateway serve` generates one, or run `abstractgateway token rotate`",
                  file=sys.stderr)
            return 1
        print(stored)
        return 0
    finally:
        db.close()


def _cmd_audit(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    db = Database(config.db_path, synchronous=config.synchronous)
    try:
        for row in reversed(AuditStore(db).tail(args.lines)):
            print(_json_dumps(row))
    finally:
        db.close()
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    problems: List[str] = []
    print("configuration (value [source]):")
    for setting in SETTINGS:
        value = getattr(config, setting.name)
        if setting.name in ("auth_token", "auth_tokens") and value:
            value = f"<{len(_split_csv(value))} token(s), fingerprints " \
                    f"{', '.join(token_fingerprint(t) for t in _split_csv(value))}>"
        print(f"  {setting.env:<40} {value}  [{config.sources[setting.name]}]")
    data_dir = Path(config.data_dir)
    print("paths:")
    writable = os.access(data_dir if data_dir.exists() else data_dir.parent, os.W_OK)
    print(f"  data dir  {data_dir} ({'exists' if data_dir.exists() else 'missing'}, "
          f"{'writable' if writable else 'NOT writable'})")
    if not writable:
        problems.append(f"data dir {data_dir} is not writable")
    print(f"  flows dir {config.flows_dir} ({'exists' if Path(config.flows_dir).exists() else 'missing'})")
    print(f"  database  {config.db_path}")
    if Path(config.db_path).exists():
        try:
            stores = open_stores(config, inspect_only=True)
        except (SchemaError, apsw.Error) as exc:
            problems.append(f"database: {exc}")
        else:
            try:
                facts, db_problems = check_database(stores.db)
                problems.extend(db_problems)
                print(f"  schema version {facts['schema_version']} (this gateway: {SCHEMA_VERSION}), "
                      f"journal {facts['journal_mode']}")
                print("  counts    " + ", ".join(f"{k}={v}" for k, v in (facts["counts"] or {}).items()))
                catalog = WorkflowHost(stores, flows_dir=config.flows_dir, source=config.workflow_source).reload()
                loaded = [b for versions in catalog.bundles.values() for b in versions.values()]
                print(f"bundles: {len(loaded)} loaded, {sum(1 for b in loaded if b.load_error)} failed, "
                      f"{sum(1 for b in loaded if b.needs)} use LLM, agent or tool nodes")
                for bundle in loaded:
                    if bundle.load_error:
                        print(f"  ! {bundle.ref}: {bundle.load_error}")
                policy = SecurityPolicy.from_config(config, stores.settings)
                print(f"security: {'on' if policy.enabled else 'OFF'}, token from {policy.token_source}")
            except apsw.Error as exc:  # damage check_database did not already name
                problems.append(f"database: {type(exc).__name__}: {exc}")
            finally:
                stores.close()
    else:
        print("  (no database yet: the first `serve` creates it)")
    llm_present = llm_integration_available()
    print(f"extras: llm ({LLM_EXTRA} + abstractagent): {'present' if llm_present else 'absent'}")
    _doctor_providers(config, llm_present)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def _doctor_providers(config: Config, llm_present: bool) -> None:
    """Print the providers configured through their own env vars and whether each lists its models now
    (variable names only: a key's value is never printed)."""
    configured = configured_providers()
    default = f"{config.provider or '(inferred from the flows)'} / {config.model or '(inferred from the flows)'}"
    print(f"llm: default provider/model {default}; tool mode {config.tool_mode}; "
          f"{config.llm_concurrency} concurrent model call(s)")
    if config.provider and config.provider not in configured:
        configured[config.provider] = []
    if not configured:
        print("  no provider configured"
              " (set e.g. OPENAI_BASE_URL / OPENAI_API_KEY, LMSTUDIO_BASE_URL, OLLAMA_BASE_URL)")
    for name, variables in sorted(configured.items()):
        if not llm_present:
            answer = "not checked (LLM extra absent)"
        else:
            try:
                answer = f"answers: {len(provider_models(name, timeout_s=10.0))} model(s)"
            except Exception as exc:  # noqa: BLE001 - doctor reports every failure, whatever its type
                answer = f"NO ANSWER: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"  {name:<18} via {', '.join(variables) or 'its defaults'}: {answer}")


def _cmd_runner(args: argparse.Namespace) -> int:
    stop = _stop_on_signals()
    config = _config_from_args(args)
    _ignore_file_size_signal()
    _return_big_blocks_to_the_os()
    gateway = _open_gateway(config, "runner")
    if gateway is None:
        return 2
    runner = Runner(gateway).start()
    print(f"abstractgateway runner {runner.owner} on {config.db_path}", flush=True)
    stop.wait()
    left = runner.stop()
    _close_gateway(gateway)
    if left:
        _exit_leaving_model_calls()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `abstractgateway` command line (every subcommand with its flags)."""
    parser = argparse.ArgumentParser(
        prog="abstractgateway", description="Durable run gateway for AbstractRuntime workflows.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="environment (flags win over env vars, env vars over defaults):\n" + settings_table(markdown=False))
    parser.add_argument("--version", action="version", version=f"abstractgateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    storage_flags = ("data_dir", "db_path", "synchronous")
    runtime_flags = (*storage_flags, "store_backend", "flows_dir", "workflow_source", "poll_s", "tick_workers",
                     "provider", "model", "llm_concurrency", "tool_mode")

    p = sub.add_parser("serve", help="Serve the HTTP API (and run the runner unless --no-runner).")
    _add_setting_flags(p, (*runtime_flags, "host", "port"))
    p.add_argument("--no-runner", action="store_true", help="Only serve HTTP; a separate `abstractgateway runner` "
                   "process applies commands and ticks runs.")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("runner", help="Run only the runner (pair with `serve --no-runner` on the same database).")
    _add_setting_flags(p, runtime_flags)
    p.set_defaults(func=_cmd_runner)

    p = sub.add_parser("doctor", help="Print the resolved configuration, paths, schema, counts and extras; "
                                      "exit 1 on a problem.")
    _add_setting_flags(p, (*runtime_flags, "host", "port"))
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("token", help="Show or rotate the API token kept in the database.")
    p.add_argument("action", choices=("show", "rotate"))
    _add_setting_flags(p, storage_flags)
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("audit", help="Read the audit log of write requests.")
    p.add_argument("action", choices=("tail",))
    p.add_argument("-n", "--lines", type=int, default=20, help="How many of the newest rows (default 20).")
    _add_setting_flags(p, storage_flags)
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("migrate", help="Import an upstream file data dir or SQLite DB into the gateway database.")
    p.add_argument("--from", dest="source", required=True, choices=("file", "sqlite-upstream"))
    p.add_argument("--to", default="sqlite", choices=("sqlite",))
    p.add_argument("--source-db", type=Path, help="With --from=sqlite-upstream: the upstream database file.")
    _add_setting_flags(p, storage_flags)
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("backup", help="Online backup of the database to DEST (verified with integrity_check).")
    p.add_argument("dest", type=Path)
    _add_setting_flags(p, storage_flags)
    p.set_defaults(func=_cmd_backup)

    p = sub.add_parser("check", help="Integrity, schema version and counts; exit 1 on problems.")
    _add_setting_flags(p, storage_flags)
    p.set_defaults(func=_cmd_check)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, SchemaError, StorageError) as exc:
        print(f"abstractgateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
