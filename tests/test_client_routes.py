"""Routes thin clients call: workspace files, attachments, knowledge graph, reports inbox, history bundles.

Every test talks HTTP to a live gateway on a loopback port over a real SQLite file.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import abstractgateway as gw
from conftest import LiveServer, multipart, wait_for

API = "/api/gateway"
SECRET = "TOP-SECRET-OUTSIDE-THE-MOUNT"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A mount `proj` with text, binary and hostile entries, next to a secret file outside it."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "deep.txt").write_text(SECRET + "\n")
    root = tmp_path / "proj"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text("# Guide\n\nintro\n## Install\nrun it\n")
    (root / "hello.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("hidden\n")
    os.symlink(tmp_path / "secret.txt", root / "link_out.txt")
    os.symlink(tmp_path / "outside", root / "linkdir")
    os.symlink(root / "hello.txt", root / "link_in.txt")
    os.symlink("/etc/passwd", root / "passwd")
    (root / b"bad\xffname.txt".decode("utf-8", "surrogateescape")).write_text("not utf-8 name\n")
    return root


@pytest.fixture
def server(data_dir: Path, workspace: Path):
    s = LiveServer(data_dir, workspace_mounts=f"proj={workspace}", max_attachment_bytes="4096")
    yield s
    s.close()


def _upload(server: LiveServer, fields: dict, files: dict):
    body, content_type = multipart(fields, files)
    return server.request("POST", f"{API}/attachments/upload", raw=body, headers={"Content-Type": content_type})


def _attachments(server: LiveServer, session_id: str):
    status, _, data = server.get(f"{API}/runs/{gw.session_memory_run_id(session_id)}/artifacts")
    return data["items"] if status == 200 else []


# -- workspace policy and files ----------------------------------------------------------------------


def test_without_mounts_the_policy_is_empty_and_file_access_is_refused(live_server):
    status, _, data = live_server.get(f"{API}/workspace/policy")
    assert status == 200 and data["ok"] is True
    assert data["policy"]["mounts"] == [] and data["policy"]["max_attachment_bytes"] == 26_214_400
    assert live_server.get(f"{API}/files/search?query=passwd")[2] == {"items": []}
    for route in ("read", "skim"):
        status, _, data = live_server.get(f"{API}/files/{route}?path=" + quote("/etc/passwd"))
        assert status == 403 and data["code"] == "workspace_not_configured"
    status, _, data = live_server.post(f"{API}/attachments/ingest", {"session_id": "s", "path": "/etc/passwd"})
    assert status == 403 and data["code"] == "workspace_not_configured"


def test_policy_names_mounts_but_never_server_paths(server, workspace):
    status, _, data = server.get(f"{API}/workspace/policy")
    assert status == 200 and data["policy"]["mounts"] == [{"name": "proj"}]
    assert data["policy"]["max_attachment_bytes"] == 4096 and str(workspace) not in repr(data)


def test_files_search(server, workspace):
    status, _, data = server.get(f"{API}/files/search?query=GUI")
    size = (workspace / "docs" / "guide.md").stat().st_size
    assert status == 200 and data["items"] == [{"path": "proj/docs/guide.md", "mount": "proj", "size_bytes": size}]
    paths = [i["path"] for i in server.get(f"{API}/files/search?query=.txt&limit=200")[2]["items"]]
    assert "proj/hello.txt" in paths and "proj/link_in.txt" in paths  # a symlink that stays inside is fine
    assert not any("link_out" in p or "linkdir" in p or "passwd" in p or ".git" in p for p in paths)
    assert all("bad" not in p for p in paths)  # a non-UTF-8 name cannot be named in a URL: skipped, no 500
    assert [i["path"] for i in server.get(f"{API}/files/search?query=txt&limit=1")[2]["items"]] == ["proj/hello.txt"]
    assert server.get(f"{API}/files/search")[0] == 422
    assert server.get(f"{API}/files/search?query=x&limit=0")[0] == 422


def test_files_read_and_skim(server, workspace):
    status, _, data = server.get(f"{API}/files/read?path=proj/hello.txt")
    assert status == 200 and data["path"] == "proj/hello.txt"
    assert data["content"].startswith("File: proj/hello.txt (10 lines)\n\n 1: line 1\n")
    assert "10: line 10" in data["content"]
    data = server.get(f"{API}/files/read?path=@proj/hello.txt&start_line=3&end_line=4")[2]
    assert data["content"] == "File: proj/hello.txt (2 lines)\n\n3: line 3\n4: line 4"
    absolute = quote(str(workspace / "docs" / "guide.md"))
    assert server.get(f"{API}/files/read?path={absolute}")[2]["path"] == "proj/docs/guide.md"
    assert server.get(f"{API}/files/read?path=proj/link_in.txt")[2]["path"] == "proj/hello.txt"
    # missing, directory, binary and non-UTF-8 content: reported in `content`, as the original does
    for path, text in (("proj/nope.txt", "does not exist"), ("proj/docs", "is not a file"),
                       ("proj/logo.png", "appears to be binary"), ("proj/latin1.txt", "appears to be binary")):
        status, _, data = server.get(f"{API}/files/read?path={path}")
        assert status == 200 and data["content"].startswith("Error:") and text in data["content"], data
    assert "exceeds file length" in server.get(f"{API}/files/read?path=proj/hello.txt&start_line=99")[2]["content"]
    assert server.get(f"{API}/files/read?path=proj/hello.txt&start_line=0")[0] == 422
    assert server.get(f"{API}/files/read")[0] == 422
    status, _, data = server.get(f"{API}/files/skim?path=proj/docs/guide.md")
    assert status == 200 and data["path"] == "proj/docs/guide.md" and "1: # Guide" in data["content"]
    assert server.get(f"{API}/files/skim?path=proj/guide.md&target_percent=30")[0] == 422
    assert "binary" in server.get(f"{API}/files/skim?path=proj/logo.png")[2]["content"]


HOSTILE_PATHS = [
    "proj/../secret.txt", "proj/docs/../../secret.txt", "../secret.txt", "proj/..", "@proj/../secret.txt",
    "proj\\..\\secret.txt", "..\\secret.txt", "proj/./../secret.txt",
    "proj/link_out.txt", "proj/linkdir/deep.txt", "proj/linkdir", "proj/passwd",
    "/etc/passwd", "SECRET_ABS", "SECRET_VIA_MOUNT_DOTDOT", "other/secret.txt", "secret.txt",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_paths_never_leave_the_mount(server, workspace, path):
    path = {"SECRET_ABS": str(workspace.parent / "secret.txt"),
            "SECRET_VIA_MOUNT_DOTDOT": f"{workspace}/../secret.txt"}.get(path, path)
    for route in ("read", "skim"):
        status, _, data = server.get(f"{API}/files/{route}?path={quote(path)}")
        assert status == 403 and data["code"] in ("path_escape", "path_outside_workspace"), (route, path, data)
        assert SECRET not in repr(data) and "root:" not in repr(data)
    status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": path})
    assert status == 403 and SECRET not in repr(data)
    assert _attachments(server, "s1") == []


def test_a_workspace_root_serves_plain_paths_and_keeps_its_confinement(data_dir, workspace, tmp_path):
    """ABSTRACTGATEWAY_WORKSPACE_DIR, as on the original: files named relative to it (or absolute inside
    it), next to the mounts, which win for their own names; nothing outside it is reached."""
    other = tmp_path / "other-docs"
    other.mkdir()
    (other / "guide.md").write_text("mounted guide\n")
    server = LiveServer(data_dir, workspace_dir=str(workspace), workspace_mounts=f"docs={other}")
    try:
        for path in ("hello.txt", "./hello.txt", "@hello.txt", str(workspace / "hello.txt")):
            status, _, data = server.get(f"{API}/files/read?path={quote(path)}&end_line=2")
            assert status == 200 and data["path"] == "hello.txt", (path, data)
            assert data["content"].startswith("File: hello.txt (2 lines)") and str(workspace) not in data["content"]
        status, _, data = server.get(f"{API}/files/read?path=docs/guide.md")  # the mount named `docs`
        assert status == 200 and "mounted guide" in data["content"] and data["path"] == "docs/guide.md"
        # the root's own docs/, by absolute path or through a symlink: its name would read the mount instead
        os.symlink(workspace / "docs", workspace / "alias")
        for path in (str(workspace / "docs" / "guide.md"), "alias/guide.md"):
            status, _, data = server.get(f"{API}/files/read?path={quote(path)}")
            assert status == 403 and data["code"] == "path_outside_workspace", (path, data)
        for path in ("../secret.txt", "link_out.txt", "linkdir/deep.txt", str(workspace.parent / "secret.txt"),
                     f"{workspace}/../secret.txt", "/etc/passwd"):
            status, _, data = server.get(f"{API}/files/read?path={quote(path)}")
            assert status == 403 and SECRET not in repr(data), (path, data)
        items = server.get(f"{API}/files/search?query=hello")[2]["items"]
        assert {"path": "hello.txt", "size_bytes": 71} in items and all("mount" not in i for i in items)
        assert {i["path"]: i.get("mount") for i in server.get(f"{API}/files/search?query=guide")[2]["items"]} == {
            "docs/guide.md": "docs"}  # the mount's; the root's own docs/ folder is hidden behind it
        status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": "hello.txt"})
        assert status == 200, data
    finally:
        server.close()
    with pytest.raises(gw.ConfigError, match="not a directory"):
        gw.Config.load(environ={"ABSTRACTGATEWAY_WORKSPACE_DIR": str(tmp_path / "missing")})
    for setting in ("ABSTRACTGATEWAY_WORKSPACE_DIR", "ABSTRACTGATEWAY_WORKSPACE_MOUNTS"):
        with pytest.raises(gw.ConfigError, match="filesystem root"):
            gw.Config.load(environ={setting: "/" if setting.endswith("DIR") else "all=/"})


def test_a_workspace_root_around_the_data_dir_never_serves_the_gateway_s_own_files(data_dir):
    """A root such as the home directory holds the data dir (the database, its WAL): those stay unread."""
    server = LiveServer(data_dir, workspace_dir=str(data_dir.parent))
    try:
        (data_dir / "notes.txt").write_text("inside the data dir\n")
        (data_dir.parent / "mine.txt").write_text("the user's\n")
        assert server.get(f"{API}/files/read?path=mine.txt")[0] == 200
        for path in (f"{data_dir.name}/notes.txt", f"{data_dir.name}/gateway.sqlite3", str(data_dir / "notes.txt")):
            status, _, data = server.get(f"{API}/files/read?path={quote(path)}")
            assert status == 403 and data["code"] == "path_outside_workspace", (path, data)
        for query in ("sqlite", "notes", "mine"):  # nor listed
            found = [item["path"] for item in server.get(f"{API}/files/search?query={query}")[2]["items"]]
            assert found == (["mine.txt"] if query == "mine" else []), (query, found)
    finally:
        server.close()


def test_encoded_and_malformed_paths(server):
    # %2e%2e is decoded once by the server, then refused like `..`
    for raw in ("proj/%2e%2e/secret.txt", "proj%2F..%2Fsecret.txt", "proj/%2E%2E%2Fsecret.txt"):
        status, _, data = server.get(f"{API}/files/read?path={raw}")
        assert status == 403 and data["code"] == "path_escape", (raw, data)
    # decoded only once: a double-encoded `..` is a plain (missing) name inside the mount
    status, _, data = server.get(f"{API}/files/read?path=proj/%252e%252e/secret.txt")
    assert status == 200 and "does not exist" in data["content"] and SECRET not in data["content"]
    status, _, data = server.get(f"{API}/files/read?path=proj/hello.txt%00.png")
    assert status == 400 and data["code"] == "invalid_path"
    status, _, data = server.get(f"{API}/files/read?path=proj/bad%FFname.txt")  # non-UTF-8 bytes in the URL
    assert status == 422 and data["code"] == "invalid_text"  # refused in one place, for every route
    status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": "proj/bad\udcffname.txt"})
    assert status == 422 and data["code"] == "invalid_text"  # a lone surrogate cannot name a file here
    status, _, data = server.get(f"{API}/files/read?path=")  # present but empty: 400, as on the original
    assert status == 400 and data["detail"] == "path is required"


def test_huge_files_are_read_within_caps(server, workspace):
    with open(workspace / "big.log", "wb") as fh:  # 24 MiB of short lines: more than a read or skim scans
        line = b"0123456789abcdef" * 3 + b"\n"
        fh.write(line * (24 * 1024 * 1024 // len(line)))
    (workspace / "minified.js").write_bytes(b"x" * (3 * 1024 * 1024))  # one 3 MiB line
    status, _, data = server.get(f"{API}/files/read?path=proj/big.log")
    assert status == 200 and len(data["content"]) < gw.FILES_READ_MAX_BYTES + 10_000
    assert f"({gw.FILES_READ_MAX_LINES} lines)" in data["content"] and "[truncated: " in data["content"]
    assert f"start_line={gw.FILES_READ_MAX_LINES + 1}]" in data["content"]
    data = server.get(f"{API}/files/read?path=proj/big.log&start_line=400000&end_line=400001")[2]
    assert "Error:" in data["content"] and "scans" in data["content"]  # beyond the scan cap: refused, labelled
    data = server.get(f"{API}/files/read?path=proj/minified.js")[2]
    assert len(data["content"]) < gw.FILES_READ_MAX_BYTES + 1000 and "line cut at" in data["content"]
    data = server.get(f"{API}/files/skim?path=proj/big.log&target_percent=25")[2]
    assert data["content"].startswith("File: proj/big.log (first ")
    assert data["content"].count("\n") < gw.FILES_SKIM_MAX_LINES * 2 + 5
    status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": "proj/big.log"})
    assert status == 413 and data["code"] == "too_large"


# -- attachments ---------------------------------------------------------------------------------------


def test_attachment_upload_and_ingest_are_session_artifacts(server):
    status, _, data = _upload(server, {"session_id": "s1", "content_type": "text/markdown"},
                              {"file": ("notes.md", b"# notes\n")})
    assert status == 200 and data["ok"] is True and data["run_id"] == "session_memory_s1", data
    ref = data["attachment"]
    assert ref["target"] == "client" and ref["filename"] == "notes.md" and ref["source_path"] == "client:notes.md"
    assert ref["content_type"] == "text/markdown" and len(ref["sha256"]) == 64
    assert data["metadata"]["tags"]["session_id"] == "s1" and data["metadata"]["tags"]["kind"] == "attachment"
    status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": "proj/docs/guide.md"})
    assert status == 200 and data["attachment"]["target"] == "server"
    assert data["attachment"]["source_path"] == "proj/docs/guide.md"
    assert data["attachment"]["content_type"] == "text/markdown"
    items = _attachments(server, "s1")
    assert {i["tags"]["path"] for i in items} == {"client:notes.md", "proj/docs/guide.md"}
    artifact = ref["$artifact"]
    status, _, content = server.get(f"{API}/runs/session_memory_s1/artifacts/{artifact}/content")
    assert status == 200 and content == b"# notes\n"
    # the owner run is internal: not listed with user runs, but readable
    assert all(r["run_id"] != "session_memory_s1" for r in server.get(f"{API}/runs")[2]["items"])
    assert server.get(f"{API}/runs/session_memory_s1")[2]["status"] == "completed"
    # ids outside [A-Za-z0-9_-] get a hashed owner run id
    status, _, data = _upload(server, {"session_id": "a b/c"}, {"file": ("x.bin", b"x")})
    assert status == 200 and data["run_id"].startswith("session_memory_sha_")


def test_session_memory_run_is_the_attachment_owner(server):
    # before any upload, a session's attachment list is empty, not a 404 (as on the original)
    assert server.get(f"{API}/runs/session_memory_fresh/artifacts")[:3:2] == (200, {"items": []})
    assert server.get(f"{API}/runs/not-a-run/artifacts")[0] == 404
    # starting a run in a session creates the session's owner run, as the original does
    server.post(f"{API}/runs/start", {"bundle_id": "echo", "session_id": "s5"})
    status, _, owner = server.get(f"{API}/runs/session_memory_s5")
    assert status == 200 and owner["workflow_id"] == "__session_memory__" and owner["session_id"] == "s5"
    assert [r["workflow_id"] for r in server.get(f"{API}/runs?session_id=s5")[2]["items"]] == ["echo@1.0.0:echo"]


def test_attachment_request_errors(server):
    assert _upload(server, {}, {"file": ("a.txt", b"a")})[0] == 422
    assert _upload(server, {"session_id": "s1"}, {})[0] == 422
    status, _, data = _upload(server, {"session_id": "  "}, {"file": ("a.txt", b"a")})
    assert status == 400 and data["code"] == "validation_error"
    status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": "proj/missing.txt"})
    assert status == 404 and data["code"] == "file_not_found"
    status, _, data = server.post(f"{API}/attachments/ingest", {"session_id": "s1", "path": "proj/docs"})
    assert status == 400 and data["code"] == "not_a_file"
    assert server.post(f"{API}/attachments/ingest", {"path": "proj/hello.txt"})[0] == 422


def _raw_upload(server: LiveServer, body_chunks, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", f"{API}/attachments/upload")
        conn.putheader("Authorization", f"Bearer {LiveServer.TOKEN}")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        chunked = headers.get("Transfer-Encoding") == "chunked"
        try:
            for chunk in body_chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before the whole body was sent
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("security", ["1", "0"])
def test_attachment_cap_for_honest_lying_and_chunked_bodies(data_dir, workspace, security):
    cap = 4096
    server = LiveServer(data_dir, security=security, max_attachment_bytes=str(cap))
    try:
        exact, _ = multipart({"session_id": "cap"}, {"file": ("exact.bin", b"e" * cap)})
        body, content_type = multipart({"session_id": "cap"}, {"file": ("big.bin", b"b" * (cap + 1))})
        headers = {"Content-Type": content_type}
        # honest, at the cap: accepted; one byte over: 413 from the route (the body is within the overhead)
        status, _, data = server.request("POST", f"{API}/attachments/upload", raw=exact,
                                         headers={"Content-Type": multipart_type(exact)})
        assert status == 200 and data["metadata"]["size_bytes"] == cap
        status, _, data = server.request("POST", f"{API}/attachments/upload", raw=body, headers=headers)
        assert status == 413 and data["code"] == "too_large"
        # honest Content-Length far above the cap: refused before the body is read
        huge = cap + gw.MULTIPART_OVERHEAD + 1
        status, raw = _raw_upload(server, [b"x" * 65536] * (huge // 65536 + 1),
                                  {**headers, "Content-Length": str(huge)})
        assert status == 413 and b"too_large" in raw
        # lying Content-Length (smaller than what follows): only the declared bytes are read; nothing stored
        status, raw = _raw_upload(server, [body], {**headers, "Content-Length": "200"})
        assert status in (400, 413, 422), raw
        # chunked, no Content-Length: counted while reading
        big = b"z" * (cap + gw.MULTIPART_OVERHEAD + 65536)
        chunked_body, chunked_type = multipart({"session_id": "cap"}, {"file": ("chunked.bin", big)})
        pieces = [chunked_body[i:i + 65536] for i in range(0, len(chunked_body), 65536)]
        status, raw = _raw_upload(server, pieces, {"Content-Type": chunked_type, "Transfer-Encoding": "chunked"})
        assert status == 413 and b"too_large" in raw
        small_body, small_type = multipart({"session_id": "cap"}, {"file": ("small.bin", b"s" * 100)})
        status, raw = _raw_upload(server, [small_body[:50], small_body[50:]],
                                  {"Content-Type": small_type, "Transfer-Encoding": "chunked"})
        assert status == 200, raw
        stored = {i["tags"]["filename"]: i["size_bytes"] for i in _attachments(server, "cap")}
        assert stored == {"exact.bin": cap, "small.bin": 100}
    finally:
        server.close()


def multipart_type(body: bytes) -> str:
    return "multipart/form-data; boundary=" + body[2:body.index(b"\r\n")].decode()


# -- knowledge graph ---------------------------------------------------------------------------------------


def _seed_kg(data_dir: Path, run_id: str) -> None:
    """Write assertions the way a run's memory_kg handlers would, into the gateway's KG store."""
    from abstractmemory import SQLiteTripleStore, TripleAssertion

    store = SQLiteTripleStore(data_dir / "abstractmemory" / "kg.sqlite3")
    try:
        store.add([
            TripleAssertion("alice", "schema:knows", "bob", scope="run", owner_id=run_id,
                            observed_at="2026-01-01T00:00:01+00:00"),
            TripleAssertion("alice", "schema:likes", "tea", scope="session", owner_id="session_memory_s1",
                            observed_at="2026-01-01T00:00:02+00:00"),
            TripleAssertion("bob", "schema:likes", "coffee", scope="session", owner_id="session_memory_s2",
                            observed_at="2026-01-01T00:00:03+00:00"),
            TripleAssertion("earth", "schema:orbits", "sun", scope="global", owner_id="global_memory",
                            observed_at="2026-01-01T00:00:04+00:00"),
        ])
    finally:
        store.close()


def _kg(server: LiveServer, **body):
    return server.post(f"{API}/kg/query", body)


def test_kg_query_scopes(server, data_dir):
    status, _, data = _kg(server, session_id="s1")
    assert status == 200 and data["count"] == 0 and data["items"] == [] and "does not exist" in data["warnings"][0]
    run_id = server.post(f"{API}/runs/start", {"bundle_id": "echo", "session_id": "s1"})[2]["run_id"]
    _seed_kg(data_dir, run_id)

    data = _kg(server, scope="run", run_id=run_id)[2]
    assert data["owner_id"] == run_id and [i["object"] for i in data["items"]] == ["bob"]
    assert set(data["items"][0]) >= {"subject", "predicate", "object", "scope", "owner_id", "observed_at"}
    data = _kg(server, session_id="s1")[2]  # scope defaults to session
    assert data["scope"] == "session" and data["owner_id"] == "session_memory_s1"
    assert [i["object"] for i in data["items"]] == ["tea"] and data["warnings"] is None
    data = _kg(server, scope="session", run_id=run_id)[2]  # resolved from the run's session
    assert data["owner_id"] == "session_memory_s1" and data["count"] == 1
    data = _kg(server, scope="global")[2]
    assert data["owner_id"] == "global_memory" and [i["object"] for i in data["items"]] == ["sun"]
    data = _kg(server, scope="all", run_id=run_id)[2]
    assert data["owner_id"] is None and [i["object"] for i in data["items"]] == ["sun", "tea", "bob"]
    data = _kg(server, scope="all", run_id=run_id, order="asc", limit=2)[2]
    assert [i["object"] for i in data["items"]] == ["bob", "tea"] and data["count"] == 2
    data = _kg(server, scope="all", session_id="s1")[2]
    assert [i["object"] for i in data["items"]] == ["sun", "tea"] and "run scope omitted" in data["warnings"][0]
    data = _kg(server, scope="all", run_id="missing", session_id="s1")[2]
    assert data["count"] == 2 and "not found" in data["warnings"][0]
    data = _kg(server, scope="session", all_owners=True)[2]
    assert {i["object"] for i in data["items"]} == {"tea", "coffee"}
    data = _kg(server, scope="all", all_owners=True, predicate="schema:likes")[2]
    assert {i["object"] for i in data["items"]} == {"tea", "coffee"}
    data = _kg(server, scope="session", owner_id="session_memory_s2", subject="BOB")[2]
    assert data["owner_id"] == "session_memory_s2" and [i["object"] for i in data["items"]] == ["coffee"]
    data = _kg(server, session_id="s1", query_text="drinks")[2]  # no embedder: a warning, not an error
    assert data["items"] == [] and "embedder" in data["warnings"][0]


def test_kg_query_errors(server, data_dir):
    # before anything is stored the original answers empty, without resolving owners
    status, _, data = _kg(server, scope="run")
    assert status == 200 and data["count"] == 0 and data["warnings"]
    assert _kg(server, scope="all", owner_id="x")[0] == 400
    _seed_kg(data_dir, "r0")
    for body, status, text in (({"scope": "nope"}, 400, "scope must be one of"),
                               ({"scope": "run"}, 400, "run_id is required"),
                               ({"scope": "session"}, 400, "run_id or session_id is required"),
                               ({"scope": "all"}, 400, "run_id or session_id is required"),
                               ({"scope": "all", "session_id": "s", "owner_id": "x"}, 400, "owner_id is not supported"),
                               ({"owner_id": "x", "all_owners": True}, 400, "all_owners cannot be combined"),
                               ({"scope": "session", "run_id": "missing"}, 404, "not found"),
                               ({"limit": 10_001, "session_id": "s"}, 422, "limit"),
                               ({"limit": "ten", "session_id": "s"}, 422, "limit")):
        got, _, data = _kg(server, **body)
        assert got == status and text in data["detail"], (body, data)


# -- reports inbox -----------------------------------------------------------------------------------------


def test_reports_inbox_is_stored_in_sqlite(data_dir, workspace):
    server = LiveServer(data_dir)
    try:
        _upload(server, {"session_id": "s9"}, {"file": ("trace.txt", b"boom")})
        status, _, bug = server.post(f"{API}/bugs/report", {
            "session_id": "s9", "description": "/bug Saving fails!\nsteps: click save", "active_run_id": "r1",
            "workflow_id": "echo@1.0.0:echo", "client": "abstractcode-web", "context": {"tab": "chat"}})
        assert status == 200 and bug["ok"] is True and bug["session_memory_run_id"] == "session_memory_s9"
        assert bug["filename"].endswith("_saving-fails.md") and bug["path"] == f"bug_reports/{bug['filename']}"
        assert bug["active_run_id"] == "r1" and bug["proposed_backlog_item_id"] is None
        second = server.post(f"{API}/bugs/report", {"session_id": "s9", "description": "Saving fails"})[2]
        assert second["filename"] == bug["filename"].replace(".md", "_2.md")
        status, _, feature = server.post(f"{API}/features/report", {"session_id": "s9", "description": "Dark mode"})
        assert status == 200 and feature["path"] == f"feature_requests/{feature['filename']}"
    finally:
        server.close()
    server = LiveServer(data_dir)  # a restart: the inbox is durable
    try:
        items = server.get(f"{API}/reports/bugs")[2]["items"]
        assert [i["filename"] for i in items] == [second["filename"], bug["filename"]]
        assert items[1]["title"] == "Saving fails!" and items[1]["workflow_id"] == "echo@1.0.0:echo"
        assert items[1]["active_run_id"] == "r1" and items[1]["relpath"] == bug["path"]
        status, _, data = server.get(f"{API}/reports/bugs/{bug['filename']}/content")
        assert status == 200 and data["report_type"] == "bug" and data["relpath"] == bug["path"]
        content = data["content"]
        assert content.startswith("# Bug: Saving fails!") and "    steps: click save" in content
        assert "client:trace.txt" in content and '"tab": "chat"' in content and "abstractcode-web" in content
        assert [i["title"] for i in server.get(f"{API}/reports/features")[2]["items"]] == ["Dark mode"]
        content = server.get(f"{API}/reports/features/{feature['filename']}/content")[2]["content"]
        assert content.startswith("# Feature:")
        assert server.get(f"{API}/reports/features/{bug['filename']}/content")[0] == 404
        for bad in ("template.md", "x.txt", "..%2Fsecret.md", "a%20b.md"):
            status, _, data = server.get(f"{API}/reports/bugs/{bad}/content")
            assert status in (400, 404) and data["code"] in ("invalid_filename", "not_found"), (bad, data)
        status, _, data = server.get(f"{API}/reports/bugs/missing.md/content")
        assert status == 404 and data["code"] == "report_not_found"
        for body, status in (({"session_id": "s", "description": " "}, 400),
                             ({"session_id": " ", "description": "x"}, 400),
                             ({"description": "x"}, 422),
                             ({"session_id": "s", "description": "x" * 20_001}, 413)):
            assert server.post(f"{API}/bugs/report", body)[0] == status, body
        rows = server.gateway.stores.db.query("SELECT report_type, COUNT(*) FROM reports GROUP BY report_type")
        assert dict(rows) == {"bug": 2, "feature": 1}
        assert not (data_dir / "bug_reports").exists() and not (data_dir / "feature_requests").exists()
    finally:
        server.close()


# -- history bundle ------------------------------------------------------------------------------------------


def test_history_bundle_has_subrun_ledgers_timeline_and_snapshot(server):
    run_id = server.post(f"{API}/runs/start", {"bundle_id": "parent"})[2]["run_id"]
    # wait for the run's last record, not only its status (which can be seen a moment before it)
    wait_for(lambda: any(str(r.get("idempotency_key") or "").startswith("system:terminal_status:")
                         for r in server.get(f"{API}/runs/{run_id}/ledger?limit=2000")[2]["items"]))
    status, _, bundle = server.get(f"{API}/runs/{run_id}/history_bundle?include_session=true")
    assert status == 200 and bundle["version"] == 1 and bundle["root_run_id"] == run_id
    child_ids = [r for r in bundle["ledgers"] if r != run_id]
    assert len(child_ids) == 1, bundle["ledgers"].keys()
    for rid, ledger in bundle["ledgers"].items():
        total = server.get(f"{API}/runs/{rid}/ledger?limit=2000")[2]["items"]
        assert ledger["total"] == len(total) > 0 and ledger["cursor_start"] == 1 and ledger["cursor_end"] == len(total)
        assert [i["cursor"] for i in ledger["items"]] == list(range(1, len(total) + 1))
    assert {t["run_id"] for t in bundle["timeline"]} == {run_id, child_ids[0]}
    assert sum(len(v["items"]) for v in bundle["ledgers"].values()) == len(bundle["timeline"])
    snapshot = bundle["workflow_snapshot"]
    assert snapshot["workflow_id"] == "parent@1.0.0:parent" and snapshot["format"] == "visualflow_json"
    status, headers, stored = server.get(f"{API}/runs/{run_id}/artifacts/{snapshot['artifact_id']}/content")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert stored["kind"] == "visualflow_json" and stored["visualflow"]["nodes"]
    assert bundle["session"]["session_id"] == run_id
    tail = server.get(f"{API}/runs/{run_id}/history_bundle?ledger_max_items=1&include_subruns=false")[2]
    assert list(tail["ledgers"]) == [run_id] and len(tail["ledgers"][run_id]["items"]) == 1
    assert tail["ledgers"][run_id]["cursor_start"] == tail["ledgers"][run_id]["total"]
    assert server.get(f"{API}/runs/{run_id}/history_bundle?ledger_mode=bogus")[0] == 400
    assert server.get(f"{API}/runs/missing/history_bundle")[0] == 404


# -- the routes are in the one route table --------------------------------------------------------------------


def test_new_routes_are_in_openapi_and_behind_auth(server):
    paths = gw.openapi_document()["paths"]
    for path, method in (("/api/gateway/workspace/policy", "get"), ("/api/gateway/files/search", "get"),
                         ("/api/gateway/files/read", "get"), ("/api/gateway/files/skim", "get"),
                         ("/api/gateway/attachments/upload", "post"), ("/api/gateway/attachments/ingest", "post"),
                         ("/api/gateway/kg/query", "post"), ("/api/gateway/bugs/report", "post"),
                         ("/api/gateway/features/report", "post"), ("/api/gateway/reports/bugs", "get"),
                         ("/api/gateway/reports/features", "get"),
                         ("/api/gateway/reports/bugs/{filename}/content", "get"),
                         ("/api/gateway/reports/features/{filename}/content", "get")):
        assert paths[path][method]["security"] == [{"bearerAuth": []}], path
    required = {(path, p["name"]) for path in ("/api/gateway/files/search", "/api/gateway/files/read",
                                                "/api/gateway/files/skim")
                for p in paths[path]["get"]["parameters"] if p["required"]}
    assert required == {("/api/gateway/files/search", "query"), ("/api/gateway/files/read", "path"),
                        ("/api/gateway/files/skim", "path")}
    assert server.get(f"{API}/files/read?path=proj/hello.txt", token=None)[0] == 401
    assert server.post(f"{API}/kg/query", {"session_id": "s"}, token=None)[0] == 401


# -- abstractcode's stdlib client against a live gateway -------------------------------------------------------


def _abstractcode_gateway_cli(tmp_path: Path, monkeypatch):
    """abstractcode 0.3.8's `gateway_cli.py` from its wheel (downloaded now), or skip with the reason."""
    import importlib.util
    import zipfile

    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", "-d", str(tmp_path), "abstractcode==0.3.8"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not download abstractcode==0.3.8 (no network?): {exc}")
    wheels = list(tmp_path.glob("abstractcode-0.3.8-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"could not download abstractcode==0.3.8 (no network?): {proc.stderr.strip()[-300:]}")
    source = tmp_path / "gateway_cli.py"
    with zipfile.ZipFile(wheels[0]) as wheel:
        source.write_bytes(wheel.read("abstractcode/gateway_cli.py"))
    spec = importlib.util.spec_from_file_location("abstractcode_gateway_cli", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up by name
    spec.loader.exec_module(module)  # stdlib only: it imports nothing from abstractcode
    return module


def test_abstractcode_download_failure_skips(tmp_path, monkeypatch):
    """No network must mean a skip with the reason, never a failure."""
    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found for abstractcode==0.3.8")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(pytest.skip.Exception, match="could not download abstractcode==0.3.8"):
        _abstractcode_gateway_cli(tmp_path, monkeypatch)

    def hangs(*args, **kwargs):
        raise subprocess.TimeoutExpired(args, 120)

    monkeypatch.setattr(subprocess, "run", hangs)
    with pytest.raises(pytest.skip.Exception, match="no network"):
        _abstractcode_gateway_cli(tmp_path, monkeypatch)


def test_abstractcode_gateway_api_drives_a_live_gateway(server, data_dir, tmp_path, monkeypatch):
    cli = _abstractcode_gateway_cli(tmp_path / "wheel", monkeypatch)
    api = cli.GatewayApi(base_url=server.base, token=LiveServer.TOKEN)

    bundles = api.list_bundles()
    assert "ask" in {b["bundle_id"] for b in bundles["items"]}
    assert api.get_bundle(bundle_id="ask")["entrypoints"][0]["workflow_id"] == "ask@1.0.0:ask"
    run_id = api.start_run(flow_id="ask", bundle_id="ask", input_data={})
    waiting = wait_for(lambda: (r := api.get_run(run_id))["status"] == "waiting" and r)
    assert waiting["waiting"]["reason"] == "user"
    ledger = api.get_ledger(run_id, after=0)
    assert ledger["items"] and ledger["next_after"] == len(ledger["items"])
    accepted = api.submit_command(run_id=run_id, typ="resume", payload={"payload": {"response": "me"}})
    assert accepted["accepted"] is True
    wait_for(lambda: api.get_run(run_id)["status"] == "completed")
    assert len(api.get_ledger(run_id, after=0)["items"]) > len(ledger["items"])
    with pytest.raises(RuntimeError, match="Gateway HTTP 404"):
        api.get_run("missing-run")

    session_id = api.get_run(run_id)["session_id"]
    uploaded = cli._request_multipart(url=f"{server.base}/api/gateway/attachments/upload", token=api.token,
                                      fields={"session_id": session_id}, file_field="file", filename="notes.txt",
                                      content=b"from abstractcode", content_type="text/plain")
    assert uploaded["ok"] is True and uploaded["attachment"]["filename"] == "notes.txt"

    assert api.kg_query(session_id=session_id)["count"] == 0
    _seed_kg(data_dir, run_id)
    result = api.kg_query(run_id=run_id, scope="all")
    assert result["ok"] is True and [i["object"] for i in result["items"]] == ["sun", "bob"]
    assert api.kg_query(scope="global", predicate="schema:orbits")["items"][0]["subject"] == "earth"


def test_a_run_writes_the_knowledge_graph_kg_query_reads(server, bundle_builder):
    body, content_type = multipart({}, {"file": ("kg.flow", bundle_builder("kg_assert").read_bytes())})
    status, _, data = server.request("POST", f"{API}/bundles/upload", raw=body, headers={"Content-Type": content_type})
    assert status == 200, data
    run_ids = {}
    for scope in ("session", "run", "global"):
        run_ids[scope] = server.post(f"{API}/runs/start", {"bundle_id": "kg-assert", "session_id": "s7",
                                                           "input_data": {"scope": scope}})[2]["run_id"]
    for run_id in run_ids.values():
        done = wait_for(lambda run_id=run_id: (r := server.get(f"{API}/runs/{run_id}")[2])["status"]
                        in ("completed", "failed") and r)
        assert done["status"] == "completed", done
    data = _kg(server, scope="all", run_id=run_ids["run"])[2]
    assert sorted((i["scope"], i["owner_id"]) for i in data["items"]) == [
        ("global", "global_memory"), ("run", run_ids["run"]), ("session", "session_memory_s7")]
    assert [i["observed_at"] for i in data["items"]] == sorted((i["observed_at"] for i in data["items"]), reverse=True)
    assert {(i["subject"], i["predicate"], i["object"]) for i in data["items"]} == {
        ("alice", "schema:knowsabout", "bob")}
    session = _kg(server, session_id="s7")[2]["items"]
    assert session[0]["provenance"]["writer_run_id"] == run_ids["session"]
