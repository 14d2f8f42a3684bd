"""A throwaway PostgreSQL server for the tests: a real one, started from Debian's binaries.

``initdb`` refuses to run as root, so as root the cluster is made and run by the
``postgres`` user the package creates (``runuser``). It listens on a Unix socket in a
temporary folder only (no TCP port to collide with), with fsync off: the tests kill hubs,
never the database server. Each test gets a database of its own (``new_database``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL's server binaries (initdb, pg_ctl) are missing: `make test` installs them "
                       "(Debian: apt-get install postgresql)")


class PgCluster:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="kiri-pg-"))
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self._n = 0
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "start", "-o",
                  f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=200")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr or out.stdout}")

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@/{dbname}?host={self.dir}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        self._n += 1
        name = f"kiri_{os.getpid()}_{self._n}"
        with psycopg.connect(host=str(self.dir), user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
