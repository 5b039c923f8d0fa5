"""docker-compose.yml / Dockerfile agree with the code, checked without docker.

Docker cannot run where the tests run, so the stack is checked statically: service names and
ports, image versions against the installed prefect, every `distill ...` command against the real
CLI (`python -m flows.cli SUB --help`), env var names against the sources, URLs against the
services they name, S3 credentials against the SeaweedFS identities file, and the Dockerfile's
install order and COPY sources against the tree.
"""
from __future__ import annotations

import json
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
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = {"postgres", "prefect-server", "s3", "s3-bootstrap", "worker", "worker-gpu", "deploy"}
ALLOWED_HOST_PORTS = {4200: "prefect-server", 8333: "s3"}
DISTILL_SERVICES = ("worker", "worker-gpu", "deploy")  # built from our Dockerfile
TORCH_PIN = "torch==2.13.0"


# ---------------------------------------------------------------- helpers

@lru_cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


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
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


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
    named = [tok for cmd in distill_commands().values() for tok in cmd[2:]
             if tok.endswith((".yaml", ".yml"))]
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
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
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


def test_seaweedfs_identities_grant_the_compose_credentials():
    cfg = option(_s3_command(), "-s3.config") or next(
        (t.split("=", 1)[1] for t in _s3_command() if t.startswith("-s3.config=")), None)
    assert cfg, "s3 is started without -s3.config"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services()["s3"]["volumes"]}
    assert cfg in mounts, f"{cfg} is not mounted into the s3 service"
    identities = json.loads((ROOT / mounts[cfg]).read_text())["identities"]
    env = distill_env()
    granted = [ident for ident in identities
               for c in ident.get("credentials", [])
               if (c.get("accessKey"), c.get("secretKey"))
               == (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])]
    assert granted, "no SeaweedFS identity has the compose AWS credentials"
    assert {"Read", "Write", "List"} <= set(granted[0]["actions"]) or "Admin" in granted[0]["actions"]


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_installs_torch_first_then_the_project_with_constraints():
    runs = [arg for ins, arg in dockerfile_instructions() if ins == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "pip install" in r and TORCH_PIN in r)
    project_at = next(i for i, r in enumerate(runs)
                      if re.search(r"pip install\b.*-c constraints\.txt\s+\.(\s|$)", r))
    assert torch_at < project_at
    assert "--index-url" in runs[torch_at] and "TORCH_INDEX" in runs[torch_at]
    # the pin the image installs is the pin the constraints verify
    assert TORCH_PIN in (ROOT / "constraints.txt").read_text().split()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None
            for ins, a in dockerfile_instructions() if ins == "ARG"}
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
    # every package setuptools installs is copied in
    pkgs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(pkgs) <= set(copied)


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
