"""Ray Jobs: run a search on a cluster (``evomerge submit / status / logs / stop``).

Together with ``ray_pool.py`` the only module importing ``ray`` (it needs only
the Jobs HTTP client, ``ray.job_submission``). The experiment is validated
here first, then staged — resolved, with its search space inlined — as the
job's working dir, and the entrypoint runs ``python -m evomerge.cli run`` on
the cluster (whose Python must have evomerge installed, e.g. the project's
image). Inside the job the controller joins the cluster through
``RAY_ADDRESS`` and starts its workers there.

Token authentication (on by default for a Ray 2.60 head that has a token): every request
carries ``Authorization: Bearer <token>``, the token found where Ray keeps it (``auth_token``).
Ray's own client adds it only when ``RAY_AUTH_MODE=token`` is set in this process; passing the
header ourselves needs no extra environment and leaves Ray's process-wide mode alone.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from evomerge.errors import EvomergeError

STAGED_EXPERIMENT = "experiment.yaml"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
PRINT_TOKEN = "`ray get-auth-token` on the head prints it"


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    run_dir: str
    address: str


def _client(address: Optional[str]) -> JobSubmissionClient:
    """A Jobs API client that sends the cluster's auth token, if there is one."""
    token, _ = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise _auth_error(address) from None
    except Exception as exc:  # connection refused, bad URL: one clear line
        where = address or "$RAY_ADDRESS"
        raise EvomergeError(f"cannot reach the Ray Jobs API at {where}: {exc} "
                            "(pass --address http://HEAD:8265, the dashboard address)") from None


def auth_token() -> tuple[Optional[str], str]:
    """The cluster's auth token where Ray keeps it, and where it came from (or where we looked).

    Ray's order: ``$RAY_AUTH_TOKEN``; else the file ``$RAY_AUTH_TOKEN_PATH`` names, which must
    then hold the token; else ``~/.ray/auth_token`` (where ``ray get-auth-token --generate`` and a
    local ``ray.init()`` write it). No token is fine for a cluster without authentication.
    """
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return value, f"${TOKEN_ENV}"
    named = os.environ.get(TOKEN_PATH_ENV, "").strip()
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    value = _read_token(path)
    if named and not value:
        raise EvomergeError(f"${TOKEN_PATH_ENV} names {path}, which is missing or empty: put the cluster's "
                            f"auth token there ({PRINT_TOKEN}), or unset {TOKEN_PATH_ENV}")
    if value:
        return value, str(path)
    return None, f"${TOKEN_ENV}, ${TOKEN_PATH_ENV} or {path}"


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # absent or unreadable: the same as no token
        return ""


def _auth_error(address: Optional[str]) -> EvomergeError:
    """Ray's 401/403 as one line: where the token was looked for or came from, and the fix."""
    where = address or "$RAY_ADDRESS"
    token, source = auth_token()
    if token:
        return EvomergeError(f"the Ray cluster at {where} rejected the auth token from {source}: put this "
                             f"cluster's token there instead ({PRINT_TOKEN}; it is the head's ~/.ray/auth_token)")
    return EvomergeError(f"the Ray cluster at {where} requires an auth token and none was found in {source}: "
                         f"copy the head's ~/.ray/auth_token to the same path here, or set {TOKEN_ENV} "
                         f"({PRINT_TOKEN})")


def submit(address: Optional[str], experiment_yaml: str, run_id: str, *, run_dir: Optional[str] = None,
           env: Optional[Mapping[str, str]] = None, python: str = "python",
           files: Optional[Mapping[str, Path]] = None) -> SubmittedJob:
    """Submit a validated experiment (as resolved YAML text) as a Ray Job; returns its id and run dir.

    ``files`` (``{relative path: local file or dir}``, see ``config.portable_experiment``) are
    staged next to the experiment in the job's working dir.
    """
    run_dir = run_dir or f"~/evomerge-runs/{run_id}"
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="evomerge-job-") as staging:
        (Path(staging) / STAGED_EXPERIMENT).write_text(experiment_yaml)
        stage_files(Path(staging), files or {})
        # a leading ~ must stay unquoted for the shell to expand it
        target = run_dir if run_dir.startswith("~/") and " " not in run_dir else shlex.quote(run_dir)
        entrypoint = f"{shlex.quote(python)} -m evomerge.cli run {STAGED_EXPERIMENT} --run-dir {target}"
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=f"evomerge-{run_id}",
                runtime_env={"working_dir": staging, "env_vars": {"TQDM_DISABLE": "1", **dict(env or {})}},
                metadata={"evomerge.run_id": run_id, "evomerge.run_dir": run_dir},
            )
        except AuthenticationError:
            raise _auth_error(address) from None
        except Exception as exc:
            raise EvomergeError(f"the Ray Jobs API refused the job: {exc}") from None
    return SubmittedJob(job_id=job_id, run_dir=run_dir, address=address or "")


def stage_files(staging: Path, files: Mapping[str, Path]) -> None:
    """Copy each local file or directory to ``staging / relative path``."""
    for rel, src in files.items():
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest)


def job_info(address: Optional[str], job_id: str) -> dict:
    """Status, message, times, entrypoint and the evomerge run dir of a job."""
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except AuthenticationError:
        raise _auth_error(address) from None
    except Exception as exc:
        raise EvomergeError(f"no job {job_id!r} at {address or '$RAY_ADDRESS'}: {_last_line(exc)}") from None
    return {
        "job_id": info.submission_id or job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "run_dir": (info.metadata or {}).get("evomerge.run_dir"),
        "terminal": info.status.is_terminal(),
    }


def job_logs(address: Optional[str], job_id: str) -> str:
    job_info(address, job_id)  # a clear error for an unknown job
    return _client(address).get_job_logs(job_id)


def follow_logs(address: Optional[str], job_id: str) -> Iterator[str]:
    """Log chunks as the job writes them, until it ends."""
    job_info(address, job_id)
    client = _client(address)
    queue: list[str] = []

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            queue.append(chunk)

    # tail_job_logs is async; hand its chunks over one event loop run at a time
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(_tail())
        while not task.done():
            loop.run_until_complete(asyncio.wait([task], timeout=0.5))
            while queue:
                yield queue.pop(0)
        task.result()
    finally:
        loop.close()
    while queue:
        yield queue.pop(0)


def stop(address: Optional[str], job_id: str) -> bool:
    """Ask the job to stop (SIGTERM to the controller, which marks the run killed); False if it had ended."""
    job_info(address, job_id)
    return bool(_client(address).stop_job(job_id))


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
