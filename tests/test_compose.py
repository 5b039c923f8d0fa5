"""docker-compose.yml / Dockerfile agree with the code, checked without docker.

Docker cannot run where the tests run, so the stack is checked statically: service names and
ports, image versions against the installed prefect, every `distill ...` command against the real
CLI (`python -m flows.cli SUB --help`), env var names against the sources, URLs against the
services they name, S3 credentials against the SeaweedFS identities file (rendered by the real
script), and the Dockerfile's install order and COPY sources against the tree.

The file is read as compose reads it: `${VAR...}` interpolated from an environment (TEST_ENV,
what a filled-in .env gives), so the checks see what `docker compose up` would run. Security:
published ports bind 127.0.0.1 unless DISTILL_BIND says otherwise, and no credential is
written in the compose files; they come from .env (documented by .env.example).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
EXPOSE = ROOT / "docker" / "compose.expose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = {"postgres", "prefect-server", "s3", "s3-bootstrap", "worker", "worker-gpu", "deploy"}
ALLOWED_HOST_PORTS = {4200: "prefect-server", 8333: "s3"}
DISTILL_SERVICES = ("worker", "worker-gpu", "deploy")  # built from our Dockerfile
TORCH_PIN = "torch==2.14.1"
CREDENTIALS = {"DISTILL_S3_ACCESS_KEY", "DISTILL_S3_SECRET_KEY", "DISTILL_POSTGRES_PASSWORD"}
# what a filled-in .env gives (the values are only for these checks)
TEST_ENV = {
    "DISTILL_S3_ACCESS_KEY": "test-access",
    "DISTILL_S3_SECRET_KEY": "test/secret+1=",
    "DISTILL_POSTGRES_PASSWORD": "0123abcd",
}


# ---------------------------------------------------------------- helpers


class MissingVariable(Exception):
    pass


_VAR = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation on every string of a parsed file: $$, $NAME, ${NAME},
    ${NAME:-default} / ${NAME-default}, ${NAME:?error} / ${NAME?error}, ${NAME:+alt}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        val = env.get(name)
        unset_or_empty = not val if op and op.startswith(":") else val is None
        if op in (":-", "-"):
            return arg if unset_or_empty else val
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return val
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return val or ""

    return _VAR.sub(sub, value)


def variables(value) -> set[str]:
    """Names of the variables a parsed file refers to."""
    text = json.dumps(value).replace("$$", "")
    return {m.group("name") or m.group("bare") for m in _VAR.finditer(text) if m.group(0) != "$$"}


@lru_cache
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_with(env: dict[str, str]) -> dict:
    return interpolate(raw_compose(), env)


@lru_cache
def compose() -> dict:
    return compose_with(TEST_ENV)


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file; commented-out `# KEY=VALUE` lines too (documented options)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def services() -> dict:
    return compose()["services"]


def env_of(name: str) -> dict[str, str]:
    env = services()[name].get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def distill_env() -> dict[str, str]:
    return env_of("worker")


def argv(value) -> list[str]:
    """A compose command/entrypoint (string or list) as argv."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def distill_commands() -> dict[str, list[str]]:
    """service -> argv of every `distill ...` command in the compose file."""
    out = {}
    for name, svc in services().items():
        cmd = argv(svc.get("command"))
        if cmd and cmd[0] == "distill":
            out[name] = cmd
    return out


def option(cmd: list[str], flag: str) -> str | None:
    for i, tok in enumerate(cmd):
        if tok == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def port_bindings(svc: dict) -> list[tuple[str | None, int]]:
    """(host address or None, host port) of each published port."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), int(str(p["published"]).split("-")[0])))
            continue
        parts = str(p).split("/")[0].rsplit(":", 2)
        out.append((parts[0] if len(parts) == 3 else None, int(parts[-2].split("-")[0]) if len(parts) > 1 else 0))
    return out


def host_ports(svc: dict) -> list[int]:
    """Host ports a service publishes (short "H:C", "IP:H:C", "C" and long syntax)."""
    ports = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            if p.get("published") is not None:
                ports.append(int(str(p["published"]).split("-")[0]))
            continue
        spec = str(p).split("/")[0]  # drop /tcp
        parts = spec.rsplit(":", 2)
        if len(parts) == 1:
            raise AssertionError(f"port {p!r} publishes a random host port; use HOST:CONTAINER")
        host = parts[-2]
        ports.append(int(host.split("-")[0]))
    return ports


@lru_cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        ins, _, rest = buf.partition(" ")
        out.append((ins.upper(), rest.strip()))
        buf = ""
    return out


def code_sources() -> str:
    text = []
    for pkg in ("flows", "pipeline"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            text.append(f.read_text(errors="replace"))
    return "\n".join(text)


@lru_cache
def cli_help(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


# ---------------------------------------------------------------- structure


def test_compose_parses_and_has_the_services():
    data = compose()
    assert "version" not in data, "compose spec files carry no top-level `version:`"
    assert set(services()) == SERVICES


def test_only_ui_and_s3_ports_are_published():
    published = {}
    for name, svc in services().items():
        for port in host_ports(svc):
            assert port in ALLOWED_HOST_PORTS, f"{name} binds host port {port}"
            published[port] = name
    assert published == ALLOWED_HOST_PORTS


def test_depends_on_and_volumes_resolve():
    declared_volumes = set(compose().get("volumes") or {})
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services(), f"{name} depends on unknown service {dep}"
        for v in svc.get("volumes") or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source")
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in declared_volumes, f"{name} uses undeclared volume {src}"


def test_one_shot_services_and_gpu_profile():
    s = services()
    for name in ("s3-bootstrap", "deploy"):
        assert str(s[name].get("restart")) == "no"
    assert s["worker"]["depends_on"]["s3-bootstrap"]["condition"] == "service_completed_successfully"
    assert s["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert s["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "worker" in s["deploy"]["depends_on"]
    assert s["worker-gpu"].get("profiles") == ["gpu"]
    for name in SERVICES - {"worker-gpu"}:
        assert not s[name].get("profiles"), f"{name} would not start with a plain `docker compose up`"
    devices = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


# ---------------------------------------------------------------- versions


def test_prefect_server_image_matches_installed_prefect_and_python():
    import prefect
    from packaging.specifiers import SpecifierSet

    image = services()["prefect-server"]["image"]
    m = re.fullmatch(r"prefecthq/prefect:(\d+\.\d+\.\d+)-python(\d+\.\d+)", image)
    assert m, image
    assert m.group(1) == prefect.__version__
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(m.group(2)), (m.group(2), requires)
    # the worker image runs the same Python minor as the server image
    base = next(arg for ins, arg in dockerfile_instructions() if ins == "FROM")
    assert re.match(rf"python:{re.escape(m.group(2))}(-|$)", base), base


# ---------------------------------------------------------------- CLI


def test_console_script_points_at_flows_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["distill"] == "flows.cli:main"


def test_compose_runs_distill_commands():
    cmds = distill_commands()
    assert set(cmds) == set(DISTILL_SERVICES), cmds


def _subcommands() -> list[str]:
    try:
        return sorted({cmd[1] for cmd in distill_commands().values() if len(cmd) > 1})
    except Exception:  # a broken compose file is reported by the structure tests
        return []


def test_distill_cli_top_level_help():
    res = cli_help()
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("sub", _subcommands())
def test_distill_subcommand_exists(sub):
    res = cli_help(sub)
    assert res.returncode == 0, f"`distill {sub} --help` exited {res.returncode}:\n{res.stderr[-3000:]}"
    # every --option the compose file passes to this subcommand is one it documents
    for svc, cmd in distill_commands().items():
        if cmd[1] != sub:
            continue
        for tok in cmd[2:]:
            if tok.startswith("--"):
                flag = tok.split("=", 1)[0]
                assert flag in res.stdout, f"{svc}: `distill {sub}` has no {flag} option"


def test_config_files_named_by_commands_exist():
    named = [tok for cmd in distill_commands().values() for tok in cmd[2:] if tok.endswith((".yaml", ".yml"))]
    assert "configs/quickstart.yaml" in named
    for path in named:
        assert (ROOT / path).is_file(), f"{path} is named in docker-compose.yml but missing"


def test_worker_pools_serve_the_deployed_pool():
    cmds = distill_commands()
    worker_pools = {}
    for name, cmd in cmds.items():
        if cmd[1] == "worker":
            pool = option(cmd, "--pool")
            assert pool, f"{name} starts a worker without --pool"
            worker_pools[name] = pool
    assert worker_pools == {"worker": "distill-process", "worker-gpu": "distill-gpu"}
    # the image installs the package into site-packages, so the deployment must name the
    # checkout inside the image (WORKDIR) as its source, which the workers share
    workdir = [a for i, a in dockerfile_instructions() if i == "WORKDIR"][-1]
    assert option(cmds["deploy"], "--source") == workdir
    deploy_pool = option(cmds["deploy"], "--pool")
    # the deployment's pool is served by a worker that starts without a profile
    assert deploy_pool == worker_pools["worker"]


# ---------------------------------------------------------------- environment


def test_distill_services_share_one_environment():
    envs = [env_of(name) for name in DISTILL_SERVICES]
    assert all(e == envs[0] for e in envs), "worker, worker-gpu and deploy must share x-distill-env"
    assert {k: str(v) for k, v in compose()["x-distill-env"].items()} == envs[0]


def test_distill_env_vars_are_read_by_the_code():
    names = [k for k in distill_env() if k.startswith("DISTILL_")]
    assert {"DISTILL_STORAGE_ROOT", "DISTILL_RUNS_DIR"} <= set(names)
    src = code_sources()
    unread = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", src)]
    assert not unread, f"set in docker-compose.yml but read nowhere in flows/ or pipeline/: {unread}"


def test_runs_volume_is_mounted_at_runs_dir():
    runs_dir = distill_env()["DISTILL_RUNS_DIR"]
    for name in DISTILL_SERVICES:
        targets = [v.split(":")[1] for v in services()[name].get("volumes") or [] if isinstance(v, str)]
        assert runs_dir in targets, f"{name} does not mount a volume at {runs_dir}"


def test_prefect_api_url_points_at_the_server():
    url = urlparse(distill_env()["PREFECT_API_URL"])
    assert url.hostname == "prefect-server" and url.hostname in services()
    assert url.port == 4200 and url.path.rstrip("/") == "/api"
    server_cmd = argv(services()["prefect-server"]["command"])
    assert option(server_cmd, "--port") == str(url.port)
    assert option(server_cmd, "--host") == "0.0.0.0"
    server_env = env_of("prefect-server")
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    db = urlparse(server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    pg = env_of("postgres")
    assert db.hostname == "postgres" and db.port == 5432
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    for key in ("PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL"):
        ui = urlparse(server_env[key])
        assert (ui.hostname, ui.port, ui.path.rstrip("/")) == ("localhost", 4200, "/api")


def _s3_command() -> list[str]:
    return argv(services()["s3"]["command"])


def _bootstrap_script() -> str:
    svc = services()["s3-bootstrap"]
    return " ".join(argv(svc.get("entrypoint")) + argv(svc.get("command")))


def test_s3_endpoint_points_at_the_s3_service():
    env = distill_env()
    url = urlparse(env["AWS_ENDPOINT_URL"])
    assert url.hostname == "s3" and url.hostname in services()
    assert url.port == 8333
    assert f"-s3.port={url.port}" in _s3_command()
    assert f"--endpoint-url {env['AWS_ENDPOINT_URL']}" in _bootstrap_script()
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"


def test_bootstrap_bucket_is_the_storage_root_bucket():
    root = urlparse(distill_env()["DISTILL_STORAGE_ROOT"])
    assert root.scheme == "s3"
    made = re.findall(r"s3 mb s3://([A-Za-z0-9.\-_]+)", _bootstrap_script())
    assert made == [root.netloc]


def _s3_mounts() -> dict[str, str]:
    """container path -> repository path of the s3 service's bind mounts."""
    return {v.split(":")[1]: v.split(":")[0] for v in services()["s3"]["volumes"] if v.startswith(".")}


def _render_s3_config(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the s3 service's entrypoint script natively, as the container would (without the server)."""
    entry = argv(services()["s3"]["entrypoint"])
    mounts = _s3_mounts()
    assert entry[0] == "/bin/sh" and entry[1] in mounts and entry[2] in mounts, entry
    out = tmp_path / "s3.json"
    return subprocess.run(
        ["sh", str(ROOT / mounts[entry[1]]), str(ROOT / mounts[entry[2]]), str(out)],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=30,
    ), out


def test_seaweedfs_identities_grant_the_compose_credentials(tmp_path):
    # the server reads the file the entrypoint renders
    entry = argv(services()["s3"]["entrypoint"])
    cfg = option(_s3_command(), "-s3.config") or next(
        (t.split("=", 1)[1] for t in _s3_command() if t.startswith("-s3.config=")), None
    )
    assert cfg == entry[3], f"s3 starts with -s3.config={cfg}, but the entrypoint renders {entry[3]}"
    # ... from the template's placeholders only: the repository holds no credential
    template = json.loads((ROOT / _s3_mounts()[entry[2]]).read_text())
    assert {(c["accessKey"], c["secretKey"]) for i in template["identities"] for c in i["credentials"]} == {
        ("@S3_ACCESS_KEY@", "@S3_SECRET_KEY@")
    }
    r, out = _render_s3_config(tmp_path, env_of("s3"))
    assert r.returncode == 0, r.stderr
    identities = json.loads(out.read_text())["identities"]
    env = distill_env()
    granted = [
        ident
        for ident in identities
        for c in ident.get("credentials", [])
        if (c.get("accessKey"), c.get("secretKey")) == (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    ]
    assert granted, "no SeaweedFS identity has the compose AWS credentials"
    assert {"Read", "Write", "List"} <= set(granted[0]["actions"]) or "Admin" in granted[0]["actions"]
    assert (out.stat().st_mode & 0o077) == 0, "the rendered credentials file is readable by others"


def test_seaweedfs_render_refuses_empty_or_unsafe_secrets(tmp_path):
    for bad, said in (
        ({"S3_SECRET_KEY": ""}, "DISTILL_S3_SECRET_KEY"),
        ({"S3_SECRET_KEY": 'a"b'}, "may hold only"),
        ({"S3_ACCESS_KEY": "a|b&c"}, "may hold only"),
    ):
        r, out = _render_s3_config(tmp_path, {**env_of("s3"), **bad})
        assert r.returncode != 0 and said in r.stderr, (bad, r.stderr)
        assert not out.exists()


# ---------------------------------------------------------------- security


def test_compose_refuses_to_run_without_credentials():
    with pytest.raises(MissingVariable):
        compose_with({})
    missing = set()
    for name in CREDENTIALS:  # each one alone is required
        with pytest.raises(MissingVariable, match=rf"^{name}: set {name} in \.env"):
            compose_with({k: v for k, v in TEST_ENV.items() if k != name})
        missing.add(name)
    assert missing == set(TEST_ENV) == CREDENTIALS
    # copying .env.example without filling in its secrets does not start either
    example = {k: v for k, v in dotenv(ENV_EXAMPLE).items() if v}
    with pytest.raises(MissingVariable):
        compose_with(example)


def test_published_ports_bind_localhost_by_default():
    for name, svc in services().items():
        for host, port in port_bindings(svc):
            assert host == "127.0.0.1", f"{name} publishes {port} on {host or 'every interface'}"
    # exposing is one deliberate setting
    exposed = compose_with({**TEST_ENV, "DISTILL_BIND": "0.0.0.0"})["services"]
    assert {h for svc in exposed.values() for h, _ in port_bindings(svc)} == {"0.0.0.0"}


def _secret_key(key: str) -> bool:
    return bool(re.search(r"PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING", key))


def test_no_credential_literal_in_the_compose_files():
    raw = raw_compose()
    envs = [raw["x-distill-env"]] + [svc.get("environment") or {} for svc in raw["services"].values()]
    envs += [svc.get("environment") or {} for svc in yaml.safe_load(EXPOSE.read_text())["services"].values()]
    secret_keys = 0
    for env in envs:
        assert isinstance(env, dict), "environment as a mapping, so its values can be checked"
        for key, value in env.items():
            if _secret_key(key):
                secret_keys += 1
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), f"{key}: {value!r} is not ${{VAR:?...}}"
    assert secret_keys >= 6
    # the database URL carries the password: by reference too
    url = raw["services"]["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(
        r"postgresql\+asyncpg://prefect:\$\{DISTILL_POSTGRES_PASSWORD:\?[^}]+\}@postgres:5432/prefect", url
    )
    text = COMPOSE.read_text() + EXPOSE.read_text()
    for literal in ("distillery-secret", "prefect:prefect@", "POSTGRES_PASSWORD: prefect"):
        assert literal not in text


def test_env_example_documents_every_variable():
    used = variables(raw_compose()) | variables(yaml.safe_load(EXPOSE.read_text()))
    example = dotenv(ENV_EXAMPLE)
    assert used == set(example), (sorted(used - set(example)), sorted(set(example) - used))
    # no secret in the example: it is a template, not a credential
    assert all(not v for k, v in example.items() if _secret_key(k) and k != "DISTILL_S3_ACCESS_KEY")
    assert example.get("DISTILL_BIND") == "127.0.0.1"


def test_expose_override_adds_prefect_auth_everywhere():
    import prefect.settings

    over = yaml.safe_load(EXPOSE.read_text())["services"]
    assert set(over) <= set(services())
    server = over["prefect-server"]["environment"]
    assert set(server) == {"PREFECT_SERVER_API_AUTH_STRING"}
    for name in DISTILL_SERVICES:
        assert over[name]["environment"] == {"PREFECT_API_AUTH_STRING": server["PREFECT_SERVER_API_AUTH_STRING"]}
    # real settings of the installed prefect: the server checks one, clients send the other
    for setting in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        assert hasattr(prefect.settings, setting), setting
    assert variables(over) == {"DISTILL_PREFECT_AUTH"}


def test_prefect_auth_string_guards_the_api_but_not_the_healthcheck(tmp_path):
    """What the expose override turns on, on a real `prefect server start` (this prefect)."""
    import base64
    import urllib.error
    import urllib.request

    from conftest import free_port, stop_process, wait_http

    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_AUTH_STRING="admin:s3cret",
    )
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", proc=proc)  # the compose healthcheck's URL: no auth needed

        def post(auth=None):
            req = urllib.request.Request(
                f"{api}/flows/filter", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
            )
            if auth:
                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert post() == 401 and post("admin:wrong") == 401 and post("admin:s3cret") == 200
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_torch_first_then_the_project_with_constraints():
    runs = [arg for ins, arg in dockerfile_instructions() if ins == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "pip install" in r and TORCH_PIN in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install\b.*-c constraints\.txt\s+\.(\s|$)", r))
    assert torch_at < project_at
    assert "--index-url" in runs[torch_at] and "TORCH_INDEX" in runs[torch_at]
    # the pin the image installs is the pin the constraints verify
    assert TORCH_PIN in (ROOT / "constraints.txt").read_text().split()
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None
        for ins, a in dockerfile_instructions()
        if ins == "ARG"
    }
    assert args.get("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"
    gpu_args = services()["worker-gpu"]["build"]["args"]
    assert set(gpu_args) <= set(args)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu_args["TORCH_INDEX"])


def test_dockerfile_copy_sources_exist():
    copied = []
    for ins, arg in dockerfile_instructions():
        if ins not in ("COPY", "ADD"):
            continue
        toks = [t for t in shlex.split(arg) if not t.startswith("--")]
        for src in toks[:-1]:
            if any(ch in src for ch in "*?["):  # optional files via glob
                continue
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
            copied.append(src.rstrip("/"))
    assert {"constraints.txt", "pyproject.toml", "storage", "pipeline", "flows", "configs"} <= set(copied)
    # every package setuptools installs (sub-packages included, and `distillery`, mapped to
    # pipeline/api) lies in a copied folder
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pkg in tool["packages"]:
        folder = tool.get("package-dir", {}).get(pkg, pkg.replace(".", "/"))
        assert folder.split("/")[0] in copied, f"the Dockerfile does not copy {folder} (package {pkg})"


def test_dockerfile_user_workdir_cmd_and_dockerignore():
    ins = dockerfile_instructions()
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [a for i, a in ins if i == "WORKDIR"][-1] == "/app"
    assert json.loads([a for i, a in ins if i == "CMD"][-1]) == ["distill", "--help"]
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".git", "__pycache__", "benchmarks/out"} <= ignored
    # the runs volume target is where the image expects DISTILL_RUNS_DIR
    assert distill_env()["DISTILL_RUNS_DIR"].startswith("/app/")
