"""Real services for the cluster tests, started from nothing in a folder and stopped afterwards (as root, no
systemd; tests/services/install.sh installs the Debian packages):

    postgres()      PostgreSQL 15 on 127.0.0.1: a database and a user with a password, for `mlflow server`
    mlflow_server() `mlflow server --app-name basic-auth` over it, listening beyond loopback, with an admin user
    slurm()         a single-node SLURM cluster with accounting: munged, MariaDB, slurmdbd, slurmctld, slurmd,
                    one partition; clients (sbatch, submitit) find it through SLURM_CONF

Each yields what a client needs and tears its processes down, leaving nothing running.
"""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"))), "")
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sacctmgr")


def missing(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not (shutil.which(n) or Path("/usr/sbin", n).exists())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_address() -> str:
    """This machine's address on its network (not loopback): where jobs on other nodes would reach a server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent: only picks the outgoing interface
        return s.getsockname()[0]


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s\n{tail}")
        time.sleep(0.3)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


def as_user(user: str, *cmd: str) -> subprocess.CompletedProcess:
    return run("su", "-s", "/bin/sh", user, "-c", " ".join(f"'{c}'" for c in cmd))


def kill_pidfile(path: Path, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(Exception):
        pid = int(path.read_text().split()[0])
        os.kill(pid, sig)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL in root/pg on a free port; yields (the URI of database 'mlflow' for user 'mlflow', without its
    password; the password, for PGPASSWORD: a password in a URI would show on a command line). A second
    database, 'mlflow2', is there for a second server."""
    data, port, password = root / "pg", free_port(), secrets.token_hex(8)
    data.mkdir(parents=True)
    shutil.chown(data, "postgres", "postgres")
    pwfile = root / "pgpass"
    pwfile.write_text(password)
    shutil.chown(pwfile, "postgres", "postgres")
    as_user("postgres", f"{PG_BIN}/initdb", "-D", str(data), "-A", "scram-sha-256", "-U", "postgres",
            f"--pwfile={pwfile}")
    as_user("postgres", f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(data / "log"), "-w", "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        env = {**os.environ, "PGPASSWORD": password}
        for sql in (f"CREATE USER mlflow PASSWORD '{password}'", "CREATE DATABASE mlflow OWNER mlflow",
                    "CREATE DATABASE mlflow2 OWNER mlflow"):
            run("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", sql, env=env)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow", password
    finally:
        with contextlib.suppress(Exception):
            as_user("postgres", f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str, db_password: str = "", auth: bool = True,
                  host: str = "0.0.0.0", auth_cache_s: int = 60) -> Iterator[dict]:
    """`mlflow server` over `backend` (its password in PGPASSWORD), artifacts under root/artifacts, bound to
    `host` (every interface by default: jobs on other nodes reach it), with MLflow's basic-auth app and a
    generated admin password (auth=False: open, for loopback only). Yields uri, username, password and the log
    path. Its own users live in root/auth.db. auth_cache_s: MLflow's auth_cache_ttl_seconds, as the README
    advises (a worker checks a password's hash once in that time, not on every request; 0: MLflow's default,
    every request)."""
    port, password = free_port(), secrets.token_urlsafe(12)
    ini = root / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\n"
                   "admin_username = admin\n"
                   f"admin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   f"auth_cache_ttl_seconds = {auth_cache_s}\n")
    log = root / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
           str(root / "artifacts"), "--host", host, "--port", str(port), "--workers", "2",
           "--allowed-hosts", "*"]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
                                env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "PGPASSWORD": db_password,
                                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no GenAI job workers
                                     "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    uri = f"http://{host_address() if host == '0.0.0.0' else host}:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            return True
        except OSError:
            return False
    try:
        wait_for(up, "mlflow server", 120, log)
        yield {"uri": uri, "username": "admin", "password": password, "log": log, "pid": proc.pid}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)  # uvicorn drains keep-alive connections for a while: no need here
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


SLURM_CONF = """ClusterName=cifartest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={host}
AccountingStoragePort={dbd_port}
KillWait=5
{node} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
SLURMDBD_CONF = """AuthType=auth/munge
DbdHost={host}
DbdPort={dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass={db_password}
StorageLoc=slurm_acct_db
PidFile={root}/slurmdbd.pid
LogFile={root}/slurmdbd.log
"""


@contextlib.contextmanager
def slurm(root: Path) -> Iterator[dict[str, str]]:
    """A single-node cluster 'cifartest' with partition 'test' and accounting (submitit needs sacct: without
    it a cancelled job stays UNKNOWN). Yields the environment a client needs (SLURM_CONF)."""
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    node = run("slurmd", "-C").stdout.splitlines()[0]  # NodeName=… CPUs=… RealMemory=…
    ports = {"ctld_port": free_port(), "d_port": free_port(), "dbd_port": free_port(), "db_port": free_port()}
    fill = {"root": root, "host": host, "node": node, "db_password": secrets.token_hex(8), **ports}
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(**fill))
    (root / "slurmdbd.conf").write_text(SLURMDBD_CONF.format(**fill))
    (root / "slurmdbd.conf").chmod(0o600)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    stops: list[Callable[[], None]] = []
    try:
        stops.append(_munge())
        stops.append(_mariadb(root, fill))
        run("slurmdbd", env=env)
        stops.append(lambda: kill_pidfile(root / "slurmdbd.pid"))
        wait_for(lambda: subprocess.run(["sacctmgr", "-n", "list", "cluster"], env=env,
                                        capture_output=True).returncode == 0, "slurmdbd", 60, root / "slurmdbd.log")
        run("sacctmgr", "-i", "add", "cluster", "cifartest", env=env)
        run("slurmctld", env=env)
        stops.append(lambda: kill_pidfile(root / "slurmctld.pid"))
        run("slurmd", env=env)
        stops.append(lambda: kill_pidfile(root / "slurmd.pid"))
        wait_for(lambda: "idle" in run("sinfo", "-h", "-o", "%T", env=env).stdout, "the SLURM node", 60,
                 root / "slurmctld.log")
        yield {"SLURM_CONF": str(conf)}
    finally:
        with contextlib.suppress(Exception):
            run("scancel", "--full", "-u", "root", env=env)
        for stop in reversed(stops):
            stop()


def _munge() -> Callable[[], None]:
    """munged as user munge, unless one runs already (it may serve other clients: then it is left alone)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return lambda: None
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        run("install", "-d", "-o", "munge", "-g", "munge", d)
    as_user("munge", "/usr/sbin/munged")
    return lambda: kill_pidfile(Path("/run/munge/munged.pid"))


def _mariadb(root: Path, fill: dict) -> Callable[[], None]:
    """MariaDB for slurmdbd, in root/mysql on 127.0.0.1:db_port, with user slurm."""
    data, run_dir = root / "mysql", root / "mysqlrun"
    for d in (data, run_dir):
        d.mkdir()
        shutil.chown(d, "mysql", "mysql")
    run("mariadb-install-db", "--user=mysql", f"--datadir={data}", "--auth-root-authentication-method=normal",
        "--skip-test-db")
    sock = run_dir / "mysql.sock"
    proc = subprocess.Popen(["mariadbd", "--user=mysql", f"--datadir={data}", f"--socket={sock}",
                             "--bind-address=127.0.0.1", f"--port={fill['db_port']}", f"--pid-file={run_dir / 'pid'}",
                             f"--log-error={run_dir / 'err'}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def stop() -> None:  # our own child: wait() reaps it (a zombie would look alive to a pid poll)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    wait_for(sock.exists, "MariaDB", 60, run_dir / "err")
    pw = fill["db_password"]
    run("mariadb", f"--socket={sock}", "-uroot", "-e",
        "CREATE DATABASE slurm_acct_db; "
        f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        f"CREATE USER 'slurm'@'localhost' IDENTIFIED BY '{pw}'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';")
    return stop
