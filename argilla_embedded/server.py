"""Launcher for the embedded Argilla server: Redis + rq worker + argilla-server, one state dir.

Runs in the main venv with the stdlib only; the server and worker run with `.venv-argilla`'s
Python. Layout of the state dir (default `<repo>/.state/argilla`, or `$STEPWISE_ARGILLA_STATE`):

    home/            ARGILLA_HOME_PATH: argilla.db (server database), search-index.sqlite
    redis/           Redis data (append-only file: queued jobs survive a Redis restart)
    tmp/<process>/   TMPDIR of each process (argilla-server copies its UI there); cleaned on start
    logs/            server.log, worker.log, redis.log, admin.log
    server.json      pids, ports, URL and search engine of the running server
    credentials.json the owner's username, password and API key (mode 0600)
    auth_secret      the key signing UI session tokens (mode 0600)

`serve()` starts whatever is not running (so after a crash it restarts only the dead parts, on
the same ports) and returns once `/api/v1/status` answers; a second call reuses the running one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
ENGINE_NAME = "stepwise-sqlite"
SearchEngineKind = Literal["embedded", "elasticsearch", "opensearch"]


class ServerError(RuntimeError):
    """The embedded server could not be started or reached; the message says what to do."""


def default_state_dir() -> Path:
    return Path(os.environ.get("STEPWISE_ARGILLA_STATE") or REPO / ".state" / "argilla")


def argilla_python() -> Path:
    return Path(os.environ.get("STEPWISE_ARGILLA_PYTHON") or REPO / ".venv-argilla" / "bin" / "python")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class ServerInfo:
    url: str
    host: str
    port: int
    redis_port: int
    search_engine: str
    search_url: str | None
    pids: dict[str, int] = field(default_factory=dict)
    started: float = 0.0


@dataclass
class Credentials:
    username: str
    password: str
    api_key: str
    workspace: str


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """True when `pid` runs and (if given) its command line contains `marker`."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if ") Z " in stat:  # a zombie is not running
        return False
    return marker is None or marker in cmd


class EmbeddedServer:
    def __init__(self, state_dir: Path | str | None = None, web_workers: int | None = None):
        self.state = Path(state_dir) if state_dir else default_state_dir()
        # Web worker processes: the server's per-request work is CPU-bound Python (ORM, validation);
        # two processes use two cores, SQLite (WAL) serialises only the commits.
        self.web_workers = web_workers or int(os.environ.get("STEPWISE_ARGILLA_WEB_WORKERS", "2"))
        self.home = self.state / "home"
        self.redis_dir = self.state / "redis"
        self.logs = self.state / "logs"
        self.info_path = self.state / "server.json"
        self.credentials_path = self.state / "credentials.json"

    # -- files ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        if not self.state.exists():
            self.state.mkdir(parents=True)
            os.chmod(self.state, 0o700)  # databases, Redis data and secrets: the owner only
        with open(self.state / ".serve.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_info(self) -> ServerInfo | None:
        if not self.info_path.exists():
            return None
        try:
            return ServerInfo(**json.loads(self.info_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write_info(self, info: ServerInfo) -> None:
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        os.replace(tmp, self.info_path)

    def credentials(self) -> Credentials | None:
        if not self.credentials_path.exists():
            return None
        return Credentials(**json.loads(self.credentials_path.read_text()))

    def _new_credentials(self, workspace: str) -> Credentials:
        creds = Credentials(
            username="owner", password=secrets.token_urlsafe(12), api_key=secrets.token_urlsafe(32), workspace=workspace
        )
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(creds), fh, indent=2)
        os.chmod(self.credentials_path, 0o600)
        return creds

    def _secret_key(self) -> str:
        """The key that signs UI session tokens: one per state dir (0600), so every web worker and
        every restart accept the same logins."""
        path = self.state / "auth_secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        return path.read_text().strip()

    def _env(self, info: ServerInfo, process: str) -> dict[str, str]:
        tmp = self.state / "tmp" / process
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARGILLA_")}
        # `stepwise.argilla_embedded` comes from the package installed into the server's venv (without
        # dependencies, by scripts/setup_argilla.sh), not from a path into this venv's libraries.
        env.update(
            TMPDIR=str(tmp),
            ARGILLA_HOME_PATH=str(self.home),
            ARGILLA_REDIS_URL=f"redis://127.0.0.1:{info.redis_port}/0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_OFFLINE="1",
            STEPWISE_ARGILLA_INDEX=str(self.home / "search-index.sqlite"),
            ARGILLA_DATABASE_SQLITE_TIMEOUT="60",
            ARGILLA_AUTH_SECRET_KEY=self._secret_key(),
        )
        if info.search_engine == "embedded":
            env["ARGILLA_SEARCH_ENGINE"] = ENGINE_NAME
        else:
            env["ARGILLA_SEARCH_ENGINE"] = info.search_engine
            env["ARGILLA_ELASTICSEARCH"] = info.search_url or "http://localhost:9200"
        return env

    # -- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, env=env, cwd=self.state, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc.pid

    def _markers(self, info: ServerInfo) -> dict[str, str]:
        return {
            "redis": f"127.0.0.1:{info.redis_port}",
            "worker": "stepwise.argilla_embedded.worker",
            "server": "stepwise.argilla_embedded.asgi",
        }

    def alive(self, info: ServerInfo | None = None) -> dict[str, bool]:
        info = info or self.read_info()
        if info is None:
            return {}
        markers = self._markers(info)
        return {name: pid_alive(info.pids.get(name), markers[name]) for name in markers}

    def healthy(self, info: ServerInfo | None = None, timeout: float = 3.0) -> bool:
        info = info or self.read_info()
        if info is None:
            return False
        try:
            with urllib.request.urlopen(f"{info.url}/api/v1/status", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _start_redis(self, info: ServerInfo) -> None:
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(redis).exists():
            raise ServerError("redis-server not found: run `make setup` (scripts/setup_argilla.sh installs it)")
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis, "--bind", "127.0.0.1", "--port", str(info.redis_port), "--dir", str(self.redis_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
            "--daemonize", "no", "--logfile", "",
        ]
        info.pids["redis"] = self._spawn("redis", argv, dict(os.environ))
        deadline = time.time() + 20
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", info.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            if not pid_alive(info.pids["redis"]):
                break
            time.sleep(0.1)
        raise ServerError(f"redis-server did not start; see {self.logs / 'redis.log'}")

    def _init_database(self, info: ServerInfo, creds: Credentials) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = self._env(info, "admin")
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / "admin.log", "ab") as log:
            proc = subprocess.run(
                [str(argilla_python()), "-m", "stepwise.argilla_embedded.admin", "init"],
                input=json.dumps(asdict(creds)).encode(), env=env, cwd=self.state, stdout=log, stderr=subprocess.STDOUT,
                timeout=600,
            )
        shutil.rmtree(self.state / "tmp" / "admin", ignore_errors=True)
        if proc.returncode != 0:
            raise ServerError(f"database setup failed; see {self.logs / 'admin.log'}")

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        search_engine: SearchEngineKind = "embedded",
        search_url: str | None = None,
        workspace: str = "stepwise",
        timeout: float = 180.0,
    ) -> tuple[ServerInfo, bool]:
        """Start (or reuse) the server; returns (info, started_now)."""
        py = argilla_python()
        if not py.exists():
            raise ServerError(f"{py} not found: run `make setup` (scripts/setup_argilla.sh creates .venv-argilla)")
        if search_engine != "embedded" and not search_url:
            raise ServerError(f"--search-engine {search_engine} needs --search-url (e.g. http://localhost:9200)")
        with self._lock():
            info = self.read_info()
            alive = self.alive(info) if info else {}
            if info and all(alive.values()) and self.healthy(info):
                return info, False
            if info is None:
                port = port or (6900 if port_is_free(host, 6900) else free_port(host))
                info = ServerInfo(
                    url=f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", host=host, port=port,
                    redis_port=free_port(), search_engine=search_engine, search_url=search_url,
                )
            creds = self.credentials() or self._new_credentials(workspace)
            if not alive.get("redis"):
                self._start_redis(info)
            self._init_database(info, creds)
            if not alive.get("worker"):
                info.pids["worker"] = self._spawn(
                    "worker", [str(py), "-m", "stepwise.argilla_embedded.worker"], self._env(info, "worker")
                )
            if not alive.get("server"):
                self._kill(info.pids.get("server"), "stepwise.argilla_embedded.asgi")
                argv = [
                    str(py), "-m", "uvicorn", "stepwise.argilla_embedded.asgi:app", "--host", info.host, "--port", str(info.port),
                    "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5",
                    "--workers", str(self.web_workers),
                ]
                info.pids["server"] = self._spawn("server", argv, self._env(info, "server"))
            info.started = time.time()
            self._write_info(info)
            deadline = time.time() + timeout
            while time.time() < deadline:
                if self.healthy(info, timeout=2):
                    return info, True
                if not pid_alive(info.pids["server"]):
                    raise ServerError(f"the Argilla server exited during startup; see {self.logs / 'server.log'}")
                time.sleep(0.25)
            raise ServerError(f"the Argilla server did not answer within {timeout:.0f}s; see {self.logs / 'server.log'}")

    @staticmethod
    def _kill(pid: int | None, marker: str, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        if not pid_alive(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig) if _is_group_leader(pid) else os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and pid_alive(pid, marker):
            time.sleep(0.05)
        if pid_alive(pid, marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def kill(self, component: str, sig: int = signal.SIGKILL) -> None:
        """Kill one component (`server`, `worker` or `redis`) without cleanup: crash tests."""
        info = self.read_info()
        if info is None:
            return
        self._kill(info.pids.get(component), self._markers(info)[component], sig=sig)

    def stop(self) -> bool:
        """Stop everything this state dir started; False when nothing was running."""
        with self._lock():
            info = self.read_info()
            if info is None:
                return False
            markers = self._markers(info)
            was_running = any(self.alive(info).values())
            for name in ("server", "worker", "redis"):
                self._kill(info.pids.get(name), markers[name])
            with contextlib.suppress(FileNotFoundError):
                self.info_path.unlink()
            shutil.rmtree(self.state / "tmp", ignore_errors=True)
            return was_running

    def status(self) -> dict[str, Any]:
        info = self.read_info()
        if info is None:
            return {"running": False, "state_dir": str(self.state)}
        alive = self.alive(info)
        return {
            "running": all(alive.values()) and self.healthy(info),
            "url": info.url,
            "processes": {k: {"pid": info.pids.get(k), "alive": v} for k, v in alive.items()},
            "search_engine": info.search_engine if info.search_engine != "embedded" else f"embedded ({ENGINE_NAME})",
            "state_dir": str(self.state),
            "credentials": str(self.credentials_path),
        }


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def login_help(info: ServerInfo, creds: Credentials, credentials_path: Path) -> str:
    return (
        f"Argilla is running at {info.url}\n"
        f"  log in as: {creds.username}\n"
        f"  password:  {creds.password}\n"
        f"  (stored in {credentials_path}, mode 0600)\n"
        f"SDK / stepwise review push|pull: export ARGILLA_API_URL={info.url} ARGILLA_API_KEY=$(python -c "
        f"\"import json;print(json.load(open('{credentials_path}'))['api_key'])\")"
    )


if __name__ == "__main__":  # pragma: no cover - manual use
    srv = EmbeddedServer()
    if sys.argv[1:] == ["stop"]:
        print("stopped" if srv.stop() else "not running")
    else:
        i, _ = srv.serve()
        c = srv.credentials()
        assert c is not None
        print(login_help(i, c, srv.credentials_path))
