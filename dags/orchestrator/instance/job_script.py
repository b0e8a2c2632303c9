"""The remote job's files and the shell that starts, checks and kills it: pure builders, text in and text out.

Layout on the instance, one directory per job key (stable across task retries of the same DAG run):
    <state_dir>/jobs/<job_key>/  job.sh, job.env (secrets, deleted by the job as soon as it has read them),
                                 source.tar and source/ (the commit's tree, when the job is given one: unpacked
                                 by the job before its command runs), output.log, pid (the job's process-group id),
                                 exit_code, started.lock/, cost-deadline (train's, for the guard)
The job runs under `setsid nohup`, so it survives SSH drops and worker restarts; `exit_code` is written atomically
after the command ends and is the only trusted sign of completion.

Tested without SSH; instance.remote_job runs them.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.errors import ConfigError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SLUG_CHARS = 48
# 64 bits of the run's identity: the slug is cut, so two runs sharing a long prefix differ only here.
_DIGEST_CHARS = 16
# Signal exit codes (128 + signal): SIGTERM is recorded by the job's wrapper, or by kill() when it could not.
EXIT_SIGTERM = 143
EXIT_SIGKILL = 137
# How long kill() waits for a job that was just started to write its pid file.
PID_WAIT_S = 5
# How long a job with a cost cap waits for the instance's guard to hold its deadline (the guard looks every 5 s).
GUARD_WAIT_S = 60


@dataclass(frozen=True)
class JobPaths:
    """The files of one remote job (POSIX paths on the instance)."""

    job_dir: str

    @property
    def script(self) -> str:
        return posixpath.join(self.job_dir, "job.sh")

    @property
    def env_file(self) -> str:
        return posixpath.join(self.job_dir, "job.env")

    @property
    def source_tar(self) -> str:
        return posixpath.join(self.job_dir, "source.tar")

    @property
    def source_dir(self) -> str:
        """Where the job unpacks source.tar (the commit's tree: the folder `mlflow run` is given)."""
        return posixpath.join(self.job_dir, "source")

    @property
    def log(self) -> str:
        return posixpath.join(self.job_dir, "output.log")

    @property
    def pid(self) -> str:
        return posixpath.join(self.job_dir, "pid")

    @property
    def exit_code(self) -> str:
        return posixpath.join(self.job_dir, "exit_code")

    @property
    def cost_deadline(self) -> str:
        """When the run's cost would pass training.max_cost_usd, and why: read by the instance's guard."""
        return posixpath.join(self.job_dir, "cost-deadline")

    @property
    def started(self) -> str:
        """A directory: `mkdir` is atomic, so only the first starter creates it."""
        return posixpath.join(self.job_dir, "started.lock")

    def upload(self, path: str, suffix: str) -> str:
        """A per-caller temporary name for an upload, renamed into place only by the caller that starts the job."""
        return f"{path}.upload-{suffix}"


def job_key(dag_id: str, run_id: str) -> str:
    """A file-name-safe key for one DAG run: the same for every try of its tasks, different across runs."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:_DIGEST_CHARS]
    slug = _UNSAFE.sub("-", f"{dag_id}--{run_id}").strip("-.")[:_SLUG_CHARS].strip("-.")
    return f"{slug}-{digest}" if slug else digest


def job_dir_for(state_dir: str, key: str) -> JobPaths:
    if not key or _UNSAFE.search(key) or key.startswith("."):
        raise ConfigError(f"Job key {key!r} must be made of letters, digits, '.', '_' and '-'; use job_key().")
    return JobPaths(posixpath.join(state_dir, "jobs", key))


def build_env_file(env: Mapping[str, str]) -> str:
    """`KEY='value'` lines for `set -a; . file`; names are validated, values shell-quoted (never interpreted)."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"Environment variable name {name!r} for the remote job is invalid: use letters, digits and "
                "underscores, not starting with a digit."
            )
        if "\0" in value:
            # The message names the variable only, never its value.
            raise ConfigError(f"Environment variable {name} for the remote job contains a NUL byte; remove it.")
        lines.append(f"{name}={shlex.quote(value)}")
    return "".join(f"{line}\n" for line in lines)


def build_job_script(
    command: list[str],
    paths: JobPaths,
    workdir: str | None,
    env_sh: str | None,
    *,
    source: bool = False,
    guard_cost_held: str | None = None,
) -> str:
    """The bash wrapper that runs `command` with its output appended to the log and records its exit code.

    `source`: first unpack the uploaded source.tar into the source folder (a failure is the job's failure, in its
    log); the tar is kept, so a job started again from the same directory unpacks the same tree.
    `guard_cost_held`: the guard's file naming the job whose cost deadline it holds; the job waits (up to
    GUARD_WAIT_S) until it names this job before anything else runs, and fails saying so otherwise. The job's user
    owns the job folder: without the wait, the job could remove its cost-deadline before the guard's first read."""
    if not command:
        raise ConfigError("The remote job's command is empty; give the program and its arguments as a list.")
    q = shlex.quote
    exit_tmp = q(paths.exit_code + ".tmp")
    lines = [
        "#!/usr/bin/env bash",
        "# Written by the ec2-trainer orchestrator; started once per DAG run under setsid.",
        "set -uo pipefail",
        # Debian bash re-sources ~/.bashrc for anything it believes sshd started; with these gone it does not.
        "unset SSH_CLIENT SSH2_CLIENT SSH_CONNECTION",
        # The wrapper leads its own process group: its pid is the group id kill() signals.
        f"echo $$ > {q(paths.pid + '.tmp')} && mv -f {q(paths.pid + '.tmp')} {q(paths.pid)}",
        f'record_exit() {{ echo "$1" > {exit_tmp} && mv -f {exit_tmp} {q(paths.exit_code)}; }}',
        # An OS shutdown (EC2 terminate, spot reclaim) SIGTERMs every process, this wrapper too: record why the job
        # ended instead of dying silently, and never go on to a next step. Runs once the foreground command ends.
        f"trap 'record_exit {EXIT_SIGTERM}; exit {EXIT_SIGTERM}' TERM",
    ]
    if guard_cost_held:
        message = q(
            f"job: the instance's guard did not take up the cost deadline within {GUARD_WAIT_S} s, so "
            "training.max_cost_usd could not hold: the job does not start (see guard.log in the state folder)"
        )
        lines += [
            "waited=0",
            # -ef: the same folder, however its path is spelt (instance.state_dir may end in '/').
            f'until held="$(cat {q(guard_cost_held)} 2>/dev/null)" && [ "$held" -ef {q(paths.job_dir)} ]; do',
            f"  if [ $waited -ge {GUARD_WAIT_S} ]; then echo {message} >> {q(paths.log)}; record_exit 1; exit 1; fi",
            "  sleep 1; waited=$((waited + 1))",
            "done",
        ]
    if env_sh:
        lines.append(f"if [ -f {q(env_sh)} ]; then . {q(env_sh)}; fi")
    env_file = q(paths.env_file)
    # Secrets arrive in a 0600 file, never in argv; it is removed as soon as it has been read.
    lines.append(f"if [ -f {env_file} ]; then set -a; . {env_file}; set +a; rm -f {env_file}; fi")
    if source:
        src = q(paths.source_dir)
        unpack = f"rm -rf {src} && mkdir {src} && tar -xf {q(paths.source_tar)} -C {src} --no-same-owner"
        message = q("job: cannot unpack the source tree (is tar installed, the disk full?)")
        lines.append(
            f"{{ {unpack}; }} >> {q(paths.log)} 2>&1 || {{ echo {message} >> {q(paths.log)}; record_exit 1; exit 1; }}"
        )
    if workdir:
        # Quoted as a whole: a workdir holding a quote must not end the message's quoting and run as a command.
        message = q(f"job: cannot cd to {workdir}")
        lines.append(f"cd {q(workdir)} || {{ echo {message} >> {q(paths.log)}; record_exit 1; exit 1; }}")
    lines += [
        f"{shlex.join(command)} >> {q(paths.log)} 2>&1 < /dev/null",
        "rc=$?",
        'record_exit "$rc"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def build_start_command(paths: JobPaths, upload_suffix: str) -> str:
    """Start the job unless it was ever started for this key; prints `started` or `attached`.

    The caller uploaded the script (and maybe the env file, the source tree and the cost deadline) under per-caller
    temporary names; only the caller that wins the atomic `mkdir` of the lock moves them into place and starts the
    job, the others delete theirs.
    """
    q = shlex.quote
    script_tmp = q(paths.upload(paths.script, upload_suffix))
    env_tmp = q(paths.upload(paths.env_file, upload_suffix))
    source_tmp = q(paths.upload(paths.source_tar, upload_suffix))
    deadline_tmp = q(paths.upload(paths.cost_deadline, upload_suffix))
    launch = (
        "env -u SSH_CLIENT -u SSH2_CLIENT -u SSH_CONNECTION "
        f"nohup setsid bash {q(paths.script)} > /dev/null 2>&1 < /dev/null &"
    )
    return (
        f"if mkdir {q(paths.started)} 2>/dev/null; then "
        f"mv -f {script_tmp} {q(paths.script)} && "
        f"{{ [ ! -e {env_tmp} ] || mv -f {env_tmp} {q(paths.env_file)}; }} && "
        f"{{ [ ! -e {source_tmp} ] || mv -f {source_tmp} {q(paths.source_tar)}; }} && "
        f"{{ [ ! -e {deadline_tmp} ] || mv -f {deadline_tmp} {q(paths.cost_deadline)}; }} && "
        f"{{ {launch} }} && echo started; "
        f"else rm -f {script_tmp} {env_tmp} {source_tmp} {deadline_tmp}; echo attached; fi"
    )


def _alive_test(pgid_var: str) -> str:
    """A shell test, true while a non-zombie process of the group exists (zombies would fool `kill -0`)."""
    return f"ps -e -o pgid=,stat= | awk -v g=\"${pgid_var}\" '$1 == g && $2 !~ /^Z/ {{f = 1}} END {{exit !f}}'"


def build_alive_command(paths: JobPaths) -> str:
    """Prints `alive`, `gone`, or `unknown` (no pid file yet) for the job's process group."""
    return (
        f"pg=$(cat {shlex.quote(paths.pid)} 2>/dev/null) || {{ echo unknown; exit 0; }}; "
        f"if {_alive_test('pg')}; then echo alive; else echo gone; fi"
    )


def build_kill_command(paths: JobPaths, grace_s: float) -> str:
    """SIGTERM the job's process group, SIGKILL it after `grace_s`, and record an exit code if the job could not.

    Harmless to repeat: a finished or already killed job is left as it is.
    """
    q = shlex.quote
    grace_ticks = max(int(grace_s * 5), 1)
    exit_tmp = q(paths.exit_code + ".tmp")
    alive = _alive_test("pg")
    return "\n".join(
        [
            f"pidfile={q(paths.pid)}",
            # A job started a moment ago may not have written its pid yet.
            f'for _ in $(seq {PID_WAIT_S * 10}); do [ -s "$pidfile" ] && break; '
            f"[ -d {q(paths.started)} ] || break; sleep 0.1; done",
            'pg=$(cat "$pidfile" 2>/dev/null) || { echo "no job"; exit 0; }',
            "sig=",
            f"if {alive}; then",
            '  kill -TERM -- "-$pg" 2>/dev/null; sig=' + str(EXIT_SIGTERM),
            f"  for _ in $(seq {grace_ticks}); do {alive} || break; sleep 0.2; done",
            f'  if {alive}; then kill -KILL -- "-$pg" 2>/dev/null; sig={EXIT_SIGKILL}; fi',
            "fi",
            f'if [ -n "$sig" ] && [ ! -e {q(paths.exit_code)} ]; then',
            f'  echo "$sig" > {exit_tmp} && mv -f {exit_tmp} {q(paths.exit_code)}',
            "fi",
            'echo "killed ${sig:-none}"',
        ]
    )
