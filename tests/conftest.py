"""Shared fixtures: a temp data dir, opened stores, a tiny no-LLM workflow."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

import abstractgateway as gw
from abstractruntime import Effect, EffectType, StepPlan, WorkflowSpec


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def make_config(data_dir: Path, **env: str) -> gw.Config:
    environ = {"ABSTRACTGATEWAY_DATA_DIR": str(data_dir)}
    environ.update({f"ABSTRACTGATEWAY_{k.upper()}": v for k, v in env.items()})
    return gw.Config.load(environ=environ)


@pytest.fixture
def stores(data_dir: Path) -> Iterator[gw.Stores]:
    s = gw.open_stores(make_config(data_dir))
    yield s
    s.close()


@pytest.fixture
def file_stores(data_dir: Path) -> Iterator[gw.Stores]:
    s = gw.open_stores(make_config(data_dir, store_backend="file"))
    yield s
    s.close()


def ask_then_echo_workflow() -> WorkflowSpec:
    """start -> ask the user (WAITING) -> echo the answer -> complete. No LLM involved."""

    def start(run, ctx):
        run.vars["greeting"] = "hello " + str(run.vars.get("name", "world"))
        return StepPlan(node_id="start", next_node="ask")

    def ask(run, ctx):
        return StepPlan(
            node_id="ask",
            effect=Effect(type=EffectType.ASK_USER, payload={"prompt": "who are you?"}, result_key="answer"),
            next_node="done",
        )

    def done(run, ctx):
        return StepPlan(node_id="done", complete_output={"greeting": run.vars["greeting"], "answer": run.vars.get("answer")})

    return WorkflowSpec(workflow_id="test:ask_echo", entry_node="start", nodes={"start": start, "ask": ask, "done": done})
