"""Section 3, Workflows: `read_bundle` against hostile input, `WorkflowHost` (load, compile, resolve,
deprecate), the latest-version rule and the order in which a default provider and model are found."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import zipfile
from pathlib import Path

import pytest

import abstractgateway as gw
from conftest import FIXTURE_BUNDLES, FLOWS, make_gateway, pack_bundle

ECHO_FLOW = json.loads((FLOWS / "echo.json").read_text())
LLM_FIXTURE = FIXTURE_BUNDLES / "basic-llm-test@0.0.0.flow"


def _manifest(bundle_id: str = "b", version: str = "1.0.0", created_at: str = "", **over) -> dict:
    manifest = {"bundle_format_version": "1", "bundle_id": bundle_id, "bundle_version": version,
                "created_at": created_at, "entrypoints": [{"flow_id": "echo"}], "default_entrypoint": "echo",
                "flows": {"echo": "flows/echo.json"}}
    manifest.update(over)
    return manifest


def _zip(entries: dict, *, symlink: str | None = None, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data if isinstance(data, (str, bytes)) else json.dumps(data))
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _bundle(bundle_id: str = "b", version: str = "1.0.0", created_at: str = "", flow: dict | None = None) -> bytes:
    return _zip({"manifest.json": _manifest(bundle_id, version, created_at), "flows/echo.json": flow or ECHO_FLOW})


def _host(stores: gw.Stores, flows_dir: Path, **kw) -> gw.WorkflowHost:
    host = gw.WorkflowHost(stores, flows_dir=flows_dir, **kw)
    host.reload()
    return host


# -- read_bundle -----------------------------------------------------------------------------------------


def test_a_valid_bundle_is_read_with_its_flows_as_authored():
    content = _bundle("echo-b", "2.1.0", "2026-01-01T00:00:00+00:00")
    bundle = gw.read_bundle(content, "upload")
    assert (bundle.bundle_id, bundle.bundle_version, bundle.ref, bundle.origin) == ("echo-b", "2.1.0",
                                                                                     "echo-b@2.1.0", "upload")
    assert bundle.flows == {"echo": ECHO_FLOW} and bundle.needs == [] and bundle.load_error is None
    assert bundle.default_entrypoint == "echo" and [e.flow_id for e in bundle.entrypoints] == ["echo"]
    import hashlib

    assert bundle.sha256 == hashlib.sha256(content).hexdigest()


def test_the_llm_node_types_a_bundle_needs_are_found():
    bundle = gw.read_bundle(LLM_FIXTURE.read_bytes(), str(LLM_FIXTURE))
    assert bundle.needs == ["llm_call"]
    agent = gw.read_bundle((FIXTURE_BUNDLES / "basic-agent@0.0.1.flow").read_bytes(), "upload")
    assert "agent" in agent.needs and set(agent.needs) <= gw.LLM_NODE_TYPES


def _many_files() -> bytes:
    return _zip({"manifest.json": _manifest(), "flows/echo.json": ECHO_FLOW,
                 **{f"f{i}": "" for i in range(gw.MAX_BUNDLE_FILES)}})


HOSTILE = {
    "empty": (lambda: b"", "bundle_empty"),
    "not a zip": (lambda: b"PK\x03\x04 definitely not a zip", "bundle_invalid"),
    "zip slip entry": (lambda: _zip({"manifest.json": _manifest(), "flows/echo.json": ECHO_FLOW,
                                     "../../escape.txt": "x"}), "bundle_unsafe"),
    "absolute entry": (lambda: _zip({"manifest.json": _manifest(), "/etc/cron.d/x": "x"}), "bundle_unsafe"),
    "drive letter entry": (lambda: _zip({"manifest.json": _manifest(), "C:/x": "x"}), "bundle_unsafe"),
    "backslash slip": (lambda: _zip({"manifest.json": _manifest(), "a\\..\\..\\x": "x"}), "bundle_unsafe"),
    "symlink": (lambda: _zip({"manifest.json": _manifest(), "flows/echo.json": ECHO_FLOW},
                             symlink="flows/link.json"), "bundle_unsafe"),
    "too many files": (_many_files, "bundle_unsafe"),
    "zip bomb": (lambda: _zip({"manifest.json": _manifest(), "flows/echo.json": ECHO_FLOW,
                               "bomb.bin": b"\0" * (gw.MAX_BUNDLE_UNCOMPRESSED // 4)}), "bundle_unsafe"),
    "no manifest": (lambda: _zip({"flows/echo.json": ECHO_FLOW}), "bundle_invalid"),
    "manifest not json": (lambda: _zip({"manifest.json": "{nope"}), "bundle_invalid"),
    "manifest not an object": (lambda: _zip({"manifest.json": "[1, 2]"}), "bundle_invalid"),
    "manifest names a missing flow": (lambda: _zip({"manifest.json": _manifest()}), "bundle_invalid"),
    "manifest path outside": (lambda: _zip({"manifest.json": _manifest(flows={"echo": "../outside.json"}),
                                            "flows/echo.json": ECHO_FLOW}), "bundle_invalid"),
    "unsafe id": (lambda: _zip({"manifest.json": _manifest("../../x"), "flows/echo.json": ECHO_FLOW}),
                  "bundle_invalid"),
    "unsafe version": (lambda: _zip({"manifest.json": _manifest(version="1.0/../../x"),
                                     "flows/echo.json": ECHO_FLOW}), "bundle_invalid"),
    "flow not json": (lambda: _zip({"manifest.json": _manifest(), "flows/echo.json": "{nope"}), "bundle_invalid"),
    "flow not an object": (lambda: _zip({"manifest.json": _manifest(), "flows/echo.json": "[]"}), "bundle_invalid"),
    "damaged member": (lambda: _damaged(), "bundle_invalid"),
}


def _damaged() -> bytes:
    content = bytearray(_bundle())
    start = content.index(b"PK\x03\x04", 1)  # the second local header: the flow's compressed bytes follow it
    for i in range(start + 60, start + 90):
        content[i] ^= 0xFF
    return bytes(content)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bundles_are_refused_with_a_code_and_a_sentence(case):
    make, code = HOSTILE[case]
    with pytest.raises(gw.GatewayError) as caught:
        gw.read_bundle(make(), "upload")
    assert caught.value.code == code, caught.value.detail
    assert caught.value.detail and "Traceback" not in caught.value.detail


def test_a_zip_bomb_is_refused_before_anything_is_decompressed(monkeypatch):
    content = HOSTILE["zip bomb"][0]()
    assert len(content) < 1_000_000  # it compresses to almost nothing
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **kw: opened.append(a) or real_open(self, *a, **kw))
    with pytest.raises(gw.GatewayError, match="zip bomb"):
        gw.read_bundle(content, "upload")
    assert opened == []


# -- WorkflowHost: load and compile -------------------------------------------------------------------------


def test_flows_dir_and_uploads_load_and_a_broken_bundle_does_not_stop_the_others(stores, tmp_path):
    flows = tmp_path / "flows"
    pack_bundle(flows, "echo")
    (flows / "broken@1.0.0.flow").write_bytes(b"not a zip at all")
    (flows / "notes.txt").write_text("not a bundle, not a .flow: ignored")
    stores.bundles.put("up", "1.0.0", _bundle("up"), overwrite=False)
    host = _host(stores, flows)
    catalog = host.catalog
    assert set(catalog.bundles) == {"echo", "broken", "up"}
    assert catalog.bundles["up"]["1.0.0"].origin == "upload"
    assert catalog.bundles["echo"]["1.0.0"].origin == str(flows / "echo@1.0.0.flow")
    assert "echo@1.0.0:echo" in catalog.specs and "up@1.0.0:echo" in catalog.specs
    broken = catalog.bundles["broken"]["1.0.0"]
    assert broken.load_error and any(str(flows / "broken@1.0.0.flow") in e for e in catalog.errors)
    with pytest.raises(gw.Unprocessable) as caught:
        host.resolve(bundle_id="broken", bundle_version=None, flow_id=None)
    assert caught.value.code == "bundle_load_error"
    assert host.get("echo@1.0.0:echo") is catalog.specs["echo@1.0.0:echo"]
    with pytest.raises(KeyError):
        host.get_or_raise("nope@1:nope")


def test_special_files_named_flow_are_load_errors_never_a_hang_or_a_flood(stores, tmp_path):
    """A FIFO (whose open would block), a symlink to an endless device, an oversized file: each is
    reported as that file's load error; the good bundle loads, and a reload never hangs."""
    flows = tmp_path / "flows"
    pack_bundle(flows, "echo")
    os.mkfifo(flows / "fifo@1.0.0.flow")
    (flows / "zero@1.0.0.flow").symlink_to("/dev/zero")
    with open(flows / "huge@1.0.0.flow", "wb") as huge:  # sparse: no disk used, never read
        huge.truncate(gw.MAX_BUNDLE_UNCOMPRESSED + 1)
    outcome: dict = {}
    loader = threading.Thread(target=lambda: outcome.setdefault("host", _host(stores, flows)), daemon=True)
    loader.start()
    loader.join(10)
    assert "host" in outcome, "the reload hung"
    catalog = outcome["host"].catalog
    assert set(catalog.bundles) == {"echo"}
    errors = "\n".join(catalog.errors)
    assert "fifo@1.0.0.flow: [Errno 22] not a regular file" in errors
    assert "zero@1.0.0.flow: [Errno 22] not a regular file" in errors
    assert f"huge@1.0.0.flow: [Errno 27] larger than {gw.MAX_BUNDLE_UNCOMPRESSED} bytes" in errors
    assert outcome["host"].remove("fifo") == 0 and (flows / "fifo@1.0.0.flow").exists()  # never read, never ours


def test_an_upload_of_the_same_version_wins_over_the_flows_dir_copy(stores, tmp_path):
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "b@1.0.0.flow").write_bytes(_bundle("b", "1.0.0", flow={**ECHO_FLOW, "name": "from the dir"}))
    stores.bundles.put("b", "1.0.0", _bundle("b", "1.0.0", flow={**ECHO_FLOW, "name": "uploaded"}), overwrite=False)
    loaded = _host(stores, flows).catalog.bundles["b"]["1.0.0"]
    assert loaded.origin == "upload" and loaded.flows["echo"]["name"] == "uploaded"


def test_a_flows_dir_may_be_a_single_file(stores, tmp_path):
    single = pack_bundle(tmp_path / "one", "echo")
    assert set(_host(stores, single).catalog.bundles) == {"echo"}


def test_a_flow_that_does_not_compile_is_a_load_error_not_a_crash(stores, tmp_path):
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "bad@1.0.0.flow").write_bytes(_bundle("bad", flow={"id": "echo", "nodes": "not a list"}))
    pack_bundle(flows, "echo")
    host = _host(stores, flows)
    assert host.catalog.bundles["bad"]["1.0.0"].load_error.startswith("compile failed: ")
    assert "bad@1.0.0:echo" not in host.catalog.specs and "echo@1.0.0:echo" in host.catalog.specs
    with pytest.raises(gw.Unprocessable) as caught:
        host.startable_spec("bad@1.0.0:echo")
    assert caught.value.code == "bundle_load_error"


def test_install_validates_and_stores_then_reload_loads(stores, tmp_path):
    host = _host(stores, tmp_path / "none")
    bundle = host.install(_bundle("b", "1.0.0"))
    assert bundle.ref == "b@1.0.0" and "b" not in host.catalog.bundles  # stored, not yet loaded
    with pytest.raises(gw.GatewayError) as caught:
        host.install(_bundle("b", "1.0.0"))
    assert caught.value.code == "bundle_exists" and not isinstance(caught.value, gw.Conflict)  # 400, as the original
    with pytest.raises(gw.GatewayError):
        host.install(b"junk")
    assert [s.bundle_version for s in stores.bundles.list()] == ["1.0.0"]
    host.install(_bundle("b", "1.0.0", flow={**ECHO_FLOW, "name": "v2"}), overwrite=True)
    host.reload()
    assert host.catalog.bundles["b"]["1.0.0"].flows["echo"]["name"] == "v2"
    assert host.remove("b") == 1 and host.reload().bundles == {}


def test_the_visualflow_source_loads_json_flows_and_refuses_bundle_operations(stores, tmp_path):
    flows = tmp_path / "vf"
    flows.mkdir()
    (flows / "echo.json").write_text(json.dumps(ECHO_FLOW))
    (flows / "bad.json").write_text("{nope")
    host = _host(stores, flows, source="visualflow")
    assert ECHO_FLOW["id"] in host.catalog.specs and any("bad.json" in e for e in host.catalog.errors)
    assert host.resolve(bundle_id=None, bundle_version=None, flow_id=ECHO_FLOW["id"]) == ECHO_FLOW["id"]
    with pytest.raises(gw.NotFound):
        host.resolve(bundle_id=None, bundle_version=None, flow_id="nope")
    with pytest.raises(gw.GatewayError) as caught:
        host.install(_bundle())
    assert caught.value.code == "not_bundle_source"


# -- resolve ---------------------------------------------------------------------------------------------


def test_resolution_rules(gateway):
    wid = gateway.host.resolve(bundle_id="echo", bundle_version=None, flow_id=None)
    assert wid == "echo@1.0.0:echo"
    assert gateway.host.resolve(bundle_id=None, bundle_version=None, flow_id="echo@1.0.0:echo") == wid
    assert gateway.host.resolve(bundle_id="echo@1.0.0", bundle_version=None, flow_id="echo") == wid
    assert gateway.host.resolve(bundle_id=" echo ", bundle_version="1.0.0", flow_id=" echo ") == wid
    assert gateway.host.resolve(bundle_id=None, bundle_version=None, flow_id="echo:echo") == wid
    with pytest.raises(gw.GatewayError, match="flow_id is required"):
        gateway.host.resolve(bundle_id=None, bundle_version=None, flow_id=None)  # several bundles loaded
    with pytest.raises(gw.GatewayError, match="bundle_id is required"):
        gateway.host.resolve(bundle_id=None, bundle_version=None, flow_id="echo")  # several bundles loaded
    with pytest.raises(gw.NotFound):
        gateway.host.resolve(bundle_id="echo", bundle_version=None, flow_id="nope")
    with pytest.raises(gw.NotFound):
        gateway.host.resolve(bundle_id="echo", bundle_version="9.9.9", flow_id=None)
    with pytest.raises(gw.NotFound):
        gateway.host.resolve(bundle_id="nope", bundle_version=None, flow_id=None)
    with pytest.raises(gw.GatewayError, match="conflicts"):
        gateway.host.resolve(bundle_id="echo@1.0.0", bundle_version="2.0.0", flow_id=None)
    with pytest.raises(gw.GatewayError, match="belongs to bundle 'echo'"):
        gateway.host.resolve(bundle_id="ask", bundle_version=None, flow_id="echo:echo")
    with pytest.raises(gw.GatewayError, match="conflicts"):
        gateway.host.resolve(bundle_id=None, bundle_version="2.0.0", flow_id="echo@1.0.0:echo")


def test_a_single_loaded_bundle_needs_no_bundle_id(stores, tmp_path):
    host = _host(stores, pack_bundle(tmp_path / "one", "echo"))
    assert host.resolve(bundle_id=None, bundle_version=None, flow_id=None) == "echo@1.0.0:echo"
    assert host.resolve(bundle_id=None, bundle_version=None, flow_id="echo") == "echo@1.0.0:echo"


def test_several_entrypoints_and_no_default_need_a_flow_id(stores):
    stores.bundles.put("two", "1.0.0", _zip({
        "manifest.json": _manifest("two", entrypoints=[{"flow_id": "echo"}, {"flow_id": "again"}],
                                   default_entrypoint=None, flows={"echo": "flows/echo.json", "again": "flows/a.json"}),
        "flows/echo.json": ECHO_FLOW, "flows/a.json": {**ECHO_FLOW, "id": "again"}}), overwrite=False)
    host = _host(stores, Path("/nonexistent"))
    with pytest.raises(gw.GatewayError, match="2 entrypoints and no default_entrypoint") as caught:
        host.resolve(bundle_id="two", bundle_version=None, flow_id=None)
    assert caught.value.code == "flow_id_required"
    assert host.resolve(bundle_id="two", bundle_version=None, flow_id="again") == "two@1.0.0:again"


# -- latest version --------------------------------------------------------------------------------------


def _versions(stores, *bundles: bytes) -> gw.WorkflowHost:
    for content in bundles:
        b = gw.read_bundle(content, "upload")
        stores.bundles.put(b.bundle_id, b.bundle_version, content, overwrite=False)
    return _host(stores, Path("/nonexistent"))


def test_latest_is_the_highest_numeric_version_not_the_lexicographic_one(stores):
    host = _versions(stores, _bundle("b", "1.2.0", "2026-03-01"), _bundle("b", "1.10.0", "2026-01-01"),
                     _bundle("b", "1.9", "2026-02-01"))
    assert host.latest("b").bundle_version == "1.10.0"
    assert host.resolve(bundle_id="b", bundle_version=None, flow_id=None) == "b@1.10.0:echo"
    assert host.bundle("b", "1.2.0").bundle_version == "1.2.0" and host.bundle("b@1.9").bundle_version == "1.9"
    with pytest.raises(gw.NotFound) as caught:
        host.latest("nope")
    assert caught.value.code == "bundle_not_found"


def test_latest_falls_back_to_the_newest_creation_when_a_version_is_not_numeric(stores):
    host = _versions(stores, _bundle("b", "1.10.0", "2026-01-01T00:00:00+00:00"),
                     _bundle("b", "dev", "2026-05-01T00:00:00+00:00"),
                     _bundle("b", "2.0.0", "2026-03-01T00:00:00+00:00"))
    assert host.latest("b").bundle_version == "dev"


def test_latest_version_and_deprecation(data_dir, bundle_builder):
    flows = data_dir / "flows"
    pack_bundle(flows, "echo", version="1.2.0")
    pack_bundle(flows, "echo", version="1.10.0")
    g = make_gateway(data_dir)
    try:
        assert g.host.latest("echo").bundle_version == "1.10.0"  # numeric, not lexicographic
        g.stores.deprecations.set("echo", "echo", "use v2")
        g.host.reload()
        with pytest.raises(gw.Conflict, match="deprecated: use v2"):
            g.start_run(bundle_id="echo")
        g.stores.deprecations.clear("echo", "echo")
        assert g.start_run(bundle_id="echo")
    finally:
        g.close()


# -- deprecation -----------------------------------------------------------------------------------------


def test_a_deprecation_blocks_every_version_of_the_flow_and_a_wildcard_the_whole_bundle(stores):
    host = _versions(stores, _bundle("b", "1.0.0"), _bundle("b", "2.0.0"), _bundle("c", "1.0.0"))
    stores.deprecations.set("b", "echo", "")
    for wid in ("b@1.0.0:echo", "b@2.0.0:echo"):
        with pytest.raises(gw.Conflict) as caught:
            host.startable_spec(wid)
        assert caught.value.code == "deprecated" and caught.value.detail == "Workflow 'b:echo' is deprecated"
    assert host.startable_spec("c@1.0.0:echo") is host.get("c@1.0.0:echo")
    stores.deprecations.set("c", "*", "gone")
    with pytest.raises(gw.Conflict, match="deprecated: gone"):
        host.startable_spec("c@1.0.0:echo")
    assert host.deprecation("c", "any-flow")["reason"] == "gone"
    stores.deprecations.clear("b", "echo")
    assert host.startable_spec("b@2.0.0:echo") is not None
    with pytest.raises(gw.NotFound) as caught:
        host.startable_spec("b@3.0.0:echo")
    assert caught.value.code == "workflow_not_found"


# -- the default provider and model ----------------------------------------------------------------------


def _llm_bundle(bundle_id: str, pin: tuple | None = None, start_pin: tuple | None = None) -> bytes:
    """The real basic-llm-test bundle under another id, with its LLM node (and/or its start node) pinned."""
    with zipfile.ZipFile(LLM_FIXTURE) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        [(flow_id, path)] = manifest["flows"].items()
        flow = json.loads(archive.read(path))
    for node in flow["nodes"]:
        if node["type"] == "llm_call" and pin:
            node["data"].setdefault("effectConfig", {}).update(provider=pin[0], model=pin[1])
        if node["type"] == "on_flow_start" and start_pin:
            node["data"]["pinDefaults"] = {"provider": start_pin[0], "model": start_pin[1]}
    manifest.update(bundle_id=bundle_id, bundle_version="1.0.0")
    return _zip({"manifest.json": manifest, path: flow})


def _llm_host(stores, *bundles: bytes, default=("", "")) -> gw.WorkflowHost:
    for content in bundles:
        b = gw.read_bundle(content, "upload")
        stores.bundles.put(b.bundle_id, b.bundle_version, content, overwrite=False)
    return _host(stores, Path("/nonexistent"), llm_default=default)


def _wid(host: gw.WorkflowHost, bundle_id: str) -> str:
    return host.resolve(bundle_id=bundle_id, bundle_version=None, flow_id=None)


def test_the_settings_win_over_every_pinned_pair(stores):
    host = _llm_host(stores, _llm_bundle("own", pin=("ollama", "pinned")), default=(" LMStudio ", " qwen "))
    assert host.default_llm(_wid(host, "own")) == ("lmstudio", "qwen")
    # only one of the two settings is no default: the bundle's pin is used
    host = _llm_host(stores, default=("lmstudio", ""))
    assert host.default_llm(_wid(host, "own")) == ("ollama", "pinned")


def test_the_own_bundle_pin_wins_then_any_bundle_in_id_order_then_none(stores):
    host = _llm_host(stores, _llm_bundle("a-other", pin=("openai", "a-model")),
                     _llm_bundle("b-other", pin=("ollama", "b-model")), _llm_bundle("own", pin=("lmstudio", "own")),
                     _llm_bundle("z-unpinned"))
    assert host.default_llm(_wid(host, "own")) == ("lmstudio", "own")
    assert host.default_llm(_wid(host, "z-unpinned")) == ("openai", "a-model")  # the first bundle by id
    assert host.startable_spec(_wid(host, "z-unpinned")) is not None


def test_a_node_config_pin_wins_over_a_start_node_default(stores):
    host = _llm_host(stores, _llm_bundle("own", pin=("ollama", "node"), start_pin=("openai", "start")))
    assert host.default_llm(_wid(host, "own")) == ("ollama", "node")
    flow = next(iter(host.catalog.bundles["own"]["1.0.0"].flows.values()))
    assert gw.pinned_llms(flow) == [("ollama", "node"), ("openai", "start")]


def test_a_start_node_default_counts_when_no_node_pins_one(stores):
    host = _llm_host(stores, _llm_bundle("own", start_pin=("OpenAI", " start ")))
    assert host.default_llm(_wid(host, "own")) == ("openai", "start")


def test_no_known_provider_refuses_the_start_naming_both_settings(stores):
    host = _llm_host(stores, _llm_bundle("own"))
    wid = _wid(host, "own")
    assert host.default_llm(wid) is None
    with pytest.raises(gw.Unprocessable) as caught:
        host.startable_spec(wid)
    assert caught.value.code == "llm_not_configured"
    assert "ABSTRACTGATEWAY_PROVIDER" in caught.value.detail and "ABSTRACTGATEWAY_MODEL" in caught.value.detail


def test_configured_providers_name_their_variables_never_their_values():
    found = gw.configured_providers({"OPENAI_API_KEY": "sk-secret", "OLLAMA_HOST": "http://h:1",
                                     "LMSTUDIO_BASE_URL": "  ", "UNRELATED": "x"})
    assert found == {"openai": ["OPENAI_API_KEY"], "openai-compatible": ["OPENAI_API_KEY"],
                     "ollama": ["OLLAMA_HOST"]}
    assert "sk-secret" not in repr(found)


def test_a_client_s_workspace_settings_stay_within_the_operator_s_roots(tmp_path):
    """As the original clamps them when the gateway does not run the tools itself."""
    root, mount, outside = (tmp_path / name for name in ("root", "mount", "elsewhere"))
    for d in (root, mount, outside, root / "sub"):
        d.mkdir()
    roots = [root, mount]
    clamp = gw._workspace_scope_within
    assert "workspace_root" not in clamp({"workspace_root": "/etc"}, roots)  # the run gets its own
    assert "workspace_root" not in clamp({"workspace_root": str(root / ".." / "elsewhere")}, roots)
    assert clamp({"workspace_root": "sub"}, roots)["workspace_root"] == str(root / "sub")
    assert clamp({"workspace_root": str(mount)}, roots)["workspace_root"] == str(mount)
    assert "workspace_root" not in clamp({"workspace_root": str(root)}, [])  # no roots: none is the client's
    assert clamp({"workspaceAccessMode": "ALL_EXCEPT_IGNORED"}, roots) == {"workspace_access_mode": "workspace_only"}
    assert clamp({"workspace_access_mode": "workspace_or_allowed"}, roots)["workspace_access_mode"] == \
        "workspace_or_allowed"
    data = clamp({"workspace_allowed_paths": [str(outside), str(mount), "sub"]}, roots)
    assert data["workspace_allowed_paths"] == [str(mount), str(root / "sub")]
    assert clamp({"workspaceAllowedPaths": f"{outside}\n{mount}"}, roots)["workspace_allowed_paths"] == str(mount)
    assert "workspace_allowed_paths" not in clamp({"workspace_allowed_paths": ["/etc"]}, roots)
    assert clamp({"workspaceIgnoredPaths": '["a", " b "]'}, roots) == {"workspace_ignored_paths": "a\nb"}
    assert clamp({"prompt": "p"}, roots) == {"prompt": "p"}
    for hostile in ("/tmp/x\x00y", "~no-such-user-here", "~" * 5):  # no path at all: nothing the client's
        assert clamp({"workspace_root": hostile, "workspace_allowed_paths": [hostile]}, roots) == {}
    nested = clamp({"workspace_allowed_paths": "[" * 100_000}, roots)  # no JSON list: one (odd) relative path
    assert nested["workspace_allowed_paths"].startswith(str(root))


def test_a_run_s_workspace_root_from_a_client_is_kept_only_inside_the_roots(data_dir, tmp_path):
    inside = tmp_path / "ws"
    inside.mkdir()
    g = make_gateway(data_dir, workspace_dir=str(inside))
    try:
        kept = g.stores.runs.load(g.start_run(bundle_id="echo", input_data={"workspace_root": str(inside)}))
        dropped = g.stores.runs.load(g.start_run(bundle_id="echo", input_data={"workspace_root": "/etc"}))
        assert kept.vars["workspace_root"] == str(inside)
        assert Path(dropped.vars["workspace_root"]).parent == Path(g.config.data_dir) / "workspaces"
    finally:
        g.close()
    g = make_gateway(data_dir, tool_mode="local")  # the gateway runs the tools as its own user: trusted
    try:
        assert g.stores.runs.load(g.start_run(bundle_id="echo", input_data={"workspace_root": "/etc"})
                                  ).vars["workspace_root"] == "/etc"
    finally:
        g.close()
