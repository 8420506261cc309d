"""Shared fixtures: a temp data dir, opened stores, a tiny no-LLM workflow."""

from __future__ import annotations

import time
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


FLOWS = Path(__file__).parent / "flows"
FIXTURE_BUNDLES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "bundles"


def pack_bundle(out_dir: Path, root: str, *, bundle_id: str | None = None, version: str = "1.0.0",
                flows_dir: Path = FLOWS) -> Path:
    """Pack `<flows_dir>/<root>.json` (and the subflows it references) into a `.flow` file."""
    from abstractruntime.workflow_bundle import pack_workflow_bundle

    out_dir.mkdir(parents=True, exist_ok=True)
    bid = bundle_id or root.replace("_", "-")
    out = out_dir / f"{bid}@{version}.flow"
    pack_workflow_bundle(root_flow_json=flows_dir / f"{root}.json", out_path=out, bundle_id=bid,
                         bundle_version=version, flows_dir=flows_dir)
    return out


@pytest.fixture
def bundle_builder(tmp_path: Path):
    """Packs small no-LLM test flows: `bundle_builder("echo")` -> path of a `.flow` file."""
    def build(root: str, **kwargs) -> Path:
        return pack_bundle(kwargs.pop("out_dir", tmp_path / "built"), root, **kwargs)
    return build


TEST_BUNDLES = ("echo", "ask", "event", "parent", "timer_loop", "wait_key")


def make_gateway(data_dir: Path, **env: str) -> gw.Gateway:
    flows = data_dir / "flows"
    if not flows.exists():
        for root in TEST_BUNDLES:
            pack_bundle(flows, root)
    return gw.Gateway(make_config(data_dir, **env))


@pytest.fixture
def gateway(data_dir: Path) -> Iterator[gw.Gateway]:
    g = make_gateway(data_dir)
    yield g
    g.close()


@pytest.fixture
def runner(gateway: gw.Gateway) -> Iterator[gw.Runner]:
    r = gw.Runner(gateway).start()
    yield r
    r.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
