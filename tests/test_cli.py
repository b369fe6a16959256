"""`cds-service evaluate | serve | demo` as a user runs them (real processes, real HTTP)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cds_service.render.cards import DEFAULT_BASE_URL

from .conftest import FIXTURES, SERVICE_URL, hook_body, load

CLI = [sys.executable, "-m", "cds_service.cli"]
# Evidence links are absolute: the CLI has no request URL, so it uses CDS_PUBLIC_BASE_URL, else where
# the last `serve`/`demo` on its database answers, else DEFAULT_BASE_URL; where no server ran on its
# database, the HTTP side of a comparison is given the same base.
HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"
OUT_OF_SCOPE = FIXTURES / "16-out-peritoneal-only.json"


def run(*args: str, cwd: Path | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CDS_AUTH_REQUIRED": "false", **(extra_env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def strip_uuids(value):
    if isinstance(value, dict):
        return {k: strip_uuids(v) for k, v in value.items() if k != "uuid"}
    if isinstance(value, list):
        return [strip_uuids(v) for v in value]
    return value


@pytest.mark.slow
def test_evaluate_two_bundles_prints_one_document_each(tmp_path):
    from cds_service.cli.commands import request_from_bundle
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    proc = run("evaluate", str(HIGH_RISK), str(OUT_OF_SCOPE), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(docs) == 2
    body = {**request_from_bundle(load(HIGH_RISK)), "hookInstance": "some-other-call"}
    http = (
        create_app(Settings(auth_required=False, public_base_url=DEFAULT_BASE_URL))
        .test_client()
        .post(SERVICE_URL, json=body)
        .get_json()
    )
    assert docs[0]["cards"] and strip_uuids(docs[0]["cards"]) == strip_uuids(http["cards"])
    assert docs[1] == {"cards": []}


@pytest.mark.slow
def test_evaluate_reads_a_bundle_linked_by_urn_uuid_full_urls(tmp_path):
    # A transaction-style Bundle (Synthea's shape): resources point at each other by fullUrl.
    import uuid

    bundle = load(HIGH_RISK)
    urls = {}
    for entry in bundle["entry"]:
        r = entry["resource"]
        entry["fullUrl"] = urls[f"{r['resourceType']}/{r['id']}"] = f"urn:uuid:{uuid.uuid4()}"
    text = json.dumps(bundle)
    for ref, url in urls.items():
        text = text.replace(f'"reference": "{ref}"', f'"reference": "{url}"')
    assert '"reference": "urn:uuid:' in text and '"reference": "Patient/' not in text
    path = tmp_path / "urn.json"
    path.write_text(text)
    linked = run("evaluate", str(path), cwd=tmp_path)
    plain = run("evaluate", str(HIGH_RISK), cwd=tmp_path)
    assert linked.returncode == 0, linked.stderr
    assert json.loads(linked.stdout)["cards"] and strip_uuids(json.loads(linked.stdout)) == strip_uuids(
        json.loads(plain.stdout)
    )


@pytest.mark.slow
def test_evaluate_request_prints_exactly_the_http_answer(tmp_path):
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    body = hook_body(load(HIGH_RISK))
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body))
    # One CDS_AUDIT_KEY for both: evaluate signs the card uuids with it, as the service does.
    proc = run("evaluate", str(path), cwd=tmp_path, extra_env={"CDS_AUDIT_KEY": "a" * 40})
    assert proc.returncode == 0, proc.stderr
    app = create_app(
        Settings(
            auth_required=False,
            public_base_url=DEFAULT_BASE_URL,
            audit_key="a" * 40,
            database_url=f"sqlite:///{tmp_path / 'http.db'}",
        )
    )  # today's date, as the CLI uses
    http = app.test_client().post(SERVICE_URL, json=body).get_data(as_text=True)
    assert proc.stdout.strip() == http
    unsigned = run("evaluate", str(path), cwd=tmp_path)  # no key, no server on its database: uuid5
    assert json.loads(unsigned.stdout)["cards"][0]["uuid"] != json.loads(http)["cards"][0]["uuid"]


@pytest.mark.parametrize(
    "content,label",
    [
        (None, "missing file"),
        ('{"resourceType": "Bundle", "entry": [', "invalid JSON"),
        ('{"resourceType": "Patient", "id": "x"}', "not a Bundle"),
        ('{"resourceType": "Bundle", "type": "collection", "entry": []}', "Bundle without a Patient"),
        ('{"hook": "patient-view", "hookInstance": "x", "context": {}}', "invalid request"),
    ],
)
@pytest.mark.slow
def test_evaluate_bad_input_exits_2_with_one_line(tmp_path, content, label):
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    proc = run("evaluate", str(path), cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, label
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, *args, "--port", str(port)],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{args[0]} did not start: {proc.stdout.read().decode()[-2000:] if proc.stdout else ''}")


def _stop(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out.decode() if out else ""


@pytest.mark.slow
def test_serve_answers_over_real_http_and_refuses_oversize_bodies(tmp_path):
    proc, base = _start(
        ["serve", "--workers", "1"], {"CDS_AUTH_REQUIRED": "false", "CDS_MAX_BODY_BYTES": "200000"}, tmp_path
    )
    try:
        assert requests.get(f"{base}/cds-services", timeout=5).json()["services"][0]["id"] == "crc-metastases"
        resp = requests.post(f"{base}{SERVICE_URL}", json=hook_body(load(HIGH_RISK)), timeout=10)
        assert resp.status_code == 200 and len(resp.json()["cards"]) == 1
        # Oversize body over a raw socket: the answer comes before the body is read.
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(
                f"POST {SERVICE_URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 400000\r\n\r\n".encode()
                + b"{"
                + b" " * 1000
            )
            head = sock.recv(4096).decode(errors="replace")
        assert head.startswith("HTTP/1.1 413"), head[:200]
        assert "OperationOutcome" in head or "too-long" in head or "Content-Length" in head
    finally:
        log = _stop(proc)
    assert "Traceback" not in log


@pytest.mark.slow
def test_evaluate_beside_a_running_server_prints_its_answer_byte_for_byte(tmp_path):
    """Same working directory, same database: evaluate links the evidence pages where `serve` answers,
    so a saved hook request gives exactly the bytes the server sent (the server's port is no default)."""
    proc, base = _start(["serve", "--workers", "1"], {"CDS_AUTH_REQUIRED": "false"}, tmp_path)
    try:
        body = hook_body(load(HIGH_RISK))
        http = requests.post(f"{base}{SERVICE_URL}", json=body, timeout=10)
        assert http.status_code == 200 and f"{base}/evidence/cai-2025-lung" in http.text
        path = tmp_path / "request.json"
        path.write_text(json.dumps(body))
        cli = run("evaluate", str(path), cwd=tmp_path)
    finally:
        _stop(proc)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == http.text.strip()


@pytest.mark.slow
def test_demo_serves_discovery_and_prints_example_calls(tmp_path):
    proc, base = _start(["demo"], {}, tmp_path)
    try:
        assert requests.get(f"{base}/cds-services", timeout=5).status_code == 200
    finally:
        out = _stop(proc)
    assert "DEMO MODE" in out and "curl -s -X POST" in out


def _in_child(script: str, stdin: bytes = b"") -> bytes:
    """What `script` prints, run in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", script], input=stdin, capture_output=True, check=True, timeout=60
    ).stdout


@pytest.mark.slow
def test_serving_heap_is_frozen_and_young_collections_spaced_out():
    # In a child interpreter: freezing the heap of the test process would outlive this test.
    script = (
        "import gc, json\n"
        "from cds_service.cli.server import prepare_heap_for_serving, YOUNG_GC_THRESHOLD\n"
        "before = gc.get_threshold()\n"
        "prepare_heap_for_serving()\n"
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold(), before, YOUNG_GC_THRESHOLD]))\n"
    )
    frozen, after, before, young = json.loads(_in_child(script))
    assert frozen > 10_000  # the imported service's modules and models
    assert after == [young, before[1], before[2]] and young > before[0]
    # Every thread of a worker holding a parsed 500-resource chart starts no young collection
    # (each one walks all the charts in flight, only to find them alive).
    resources = [e["resource"] for path in sorted(FIXTURES.glob("[0-9]*.json")) for e in load(path)["entry"]]
    raw = json.dumps({"entry": [{"resource": r} for r in (resources * 500)[:500]]}).encode()
    script = (
        "import gc, json, sys\n"
        "from cds_service.jsonio import loads\n"
        "raw = sys.stdin.buffer.read()\n"
        "gc.disable()\n"
        "before = gc.get_count()[0]\n"
        "chart = loads(raw)\n"
        "print(gc.get_count()[0] - before)\n"
    )
    containers = int(_in_child(script, stdin=raw))
    assert containers > 4_000  # what a parsed chart of that size holds
    from cds_service.settings import Settings

    assert young >= Settings.model_fields["threads"].default * containers


# --- configuration and --help (in-process: main() returns before it sets up logging or serves) ------

BAD_SETTINGS = [
    ("CDS_WORKERS", "abc"),
    ("CDS_THREADS", "0"),
    ("CDS_LOG_LEVEL", "loud"),
    ("CDS_LOG_FORMAT", "xml"),
    ("CDS_FHIR_TIMEOUT_S", "soon"),
    ("CDS_TRUSTED_ISSUERS", "{not json"),
    ("CDS_DATABASE_URL", "mysql://db.example/cds"),
]
EVERY_COMMAND = [
    ["serve"],
    ["demo"],
    ["evaluate", str(HIGH_RISK)],
    ["evaluate", "--fhir-server", "http://127.0.0.1:9/fhir", "--patient", "p"],
    ["report"],
    ["migrate"],
    ["fixtures", "export", "out"],
    ["fixtures", "load", "http://127.0.0.1:9/fhir"],
]


@pytest.mark.parametrize("var,value", BAD_SETTINGS)
@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda a: "-".join(a[:2]).replace("/", ""))
def test_a_bad_setting_is_one_line_and_exit_2_for_every_command(
    monkeypatch, capsys, tmp_path, argv, var, value
):
    from cds_service.cli.main import main

    monkeypatch.chdir(tmp_path)  # migrate must not leave a database behind, should it get that far
    monkeypatch.setenv(var, value)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cds-service {argv[0]}: invalid configuration") and var in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_bad_setting_stops_evaluate_as_a_user_runs_it(tmp_path):
    env = {**os.environ, "CDS_WORKERS": "abc"}
    proc = subprocess.run(
        [*CLI, "evaluate", str(HIGH_RISK)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "cds-service evaluate: invalid configuration CDS_WORKERS: "
        "Input should be a valid integer, unable to parse string as an integer\n"
    )


def test_workers_threads_and_log_settings_come_from_settings(monkeypatch):
    from cds_service.cli import server
    from cds_service.cli.main import _parser
    from cds_service.settings import Settings

    calls = []
    monkeypatch.setattr(server, "create_served_app", lambda settings, **kw: "app")
    monkeypatch.setattr(server, "run_gunicorn", lambda app, settings, command, **kw: calls.append(kw))
    monkeypatch.setenv("CDS_AUTH_REQUIRED", "false")
    monkeypatch.setenv("CDS_WORKERS", "3")
    monkeypatch.setenv("CDS_THREADS", "5")
    settings = Settings()
    server.serve(_parser().parse_args(["serve"]), settings)
    server.serve(_parser().parse_args(["serve", "--workers", "1", "--threads", "2"]), settings)
    assert [(c["workers"], c["threads"]) for c in calls] == [(3, 5), (1, 2)]
    monkeypatch.setenv("CDS_LOG_LEVEL", " debug")
    assert Settings().level_for("evaluate") == "DEBUG"
    monkeypatch.delenv("CDS_LOG_LEVEL")
    assert [Settings().level_for(c) for c in ("serve", "demo", "migrate", "evaluate", "report")] == [
        "INFO",
        "INFO",
        "INFO",
        "WARNING",
        "WARNING",
    ]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_worker_counts_on_the_command_line_are_usage_errors(capsys, value):
    from cds_service.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--workers", value])
    assert exit_.value.code == 2 and "--workers" in capsys.readouterr().err


def test_help_describes_every_option_and_its_default():
    from cds_service.cli.main import _parser

    def commands(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}", sub
                    yield from commands(sub, f"{prefix}{name} ")

    found = dict(commands(_parser()))
    assert set(found) >= {
        "serve",
        "demo",
        "evaluate",
        "report",
        "migrate",
        "fixtures export",
        "fixtures load",
    }
    for name, sub in found.items():
        assert sub.description, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.option_strings:
                assert "default" in action.help, (
                    f"{name} {action.option_strings[0]} does not give its default"
                )
        text = sub.format_help()
        assert "exit status" in text and "Traceback" not in text
