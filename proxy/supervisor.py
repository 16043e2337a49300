"""``fhircrypt serve --workers N``: N forked worker processes sharing the port, kept alive by a small supervisor.

Why not gunicorn's aiohttp worker: gunicorn's SIGHUP starts new workers from the new
configuration and stops the old ones, so a policy that fails to compile is only found out by
workers that then fail to boot - the "old policy keeps serving" guarantee would rest on
gunicorn's boot-failure handling. Here each worker reloads itself (:func:`proxy.server.reload`)
and refuses a bad policy while it keeps serving, the supervisor only forwards signals, restarts
dead workers and owns the metrics directory; about a hundred lines and no further dependency.

The kernel spreads new connections over the workers (SO_REUSEPORT). The policy is compiled once
here before forking, so a broken configuration fails at once with exit code 2 instead of a
restart loop, and the workers share the imported code copy-on-write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from proxy.policy.compiler import compile_file
from proxy.settings import Settings

log = logging.getLogger("fhircrypt")
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_QUICK_EXIT = 2.0  # a worker that dies within this many seconds of starting is crashing, not failing
_MAX_QUICK_EXITS = 5  # in a row: give up instead of looping


def _prepare_metrics() -> tuple[str, bool]:
    env = "PROMETHEUS_MULTIPROC_DIR"  # = proxy.web.metrics.MULTIPROC_ENV, which must not be imported before this
    given = os.environ.get(env)
    path = given or tempfile.mkdtemp(prefix="fhircrypt-metrics-")
    Path(path).mkdir(parents=True, exist_ok=True)
    for stale in Path(path).glob("*.db"):  # samples of a previous run would be summed in
        stale.unlink()
    os.environ[env] = path
    return path, given is None


def _spawn(settings: Settings) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        from proxy.server import die_with_parent, run_worker

        die_with_parent()
        code = run_worker(settings, reuse_port=True)
    except BaseException as exc:  # a worker never returns into the supervisor's loop
        log.error("worker failed", extra={"event": "worker-failed", "error": type(exc).__name__})
    finally:
        logging.shutdown()
        os._exit(code)


def supervise(settings: Settings) -> int:
    compile_file(settings.policy).require_configured()  # fail fast (exit 2) rather than N crashing workers
    metrics_path, owned = _prepare_metrics()
    import proxy.web.app  # noqa: F401 - loaded once here, shared copy-on-write by the workers
    from proxy.web.metrics import worker_exited

    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    workers: dict[int, float] = {}  # pid -> start time
    quick_exits, stopping, deadline, code = 0, False, 0.0, 0
    for _ in range(settings.workers):
        pid = _spawn(settings)
        workers[pid] = time.monotonic()
    log.info("supervisor started", extra={"event": "supervisor-start", "workers": sorted(workers)})
    try:
        while workers:
            info = signal.sigtimedwait(_SIGNALS, 1.0)
            signo = info.si_signo if info else None
            if signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping, deadline = True, time.monotonic() + settings.shutdown_timeout + 5
                log.info("stopping workers", extra={"event": "supervisor-stop", "workers": sorted(workers)})
                _signal_all(workers, signal.SIGTERM)
            elif signo == signal.SIGHUP:
                log.info("reload: forwarding SIGHUP", extra={"event": "supervisor-reload"})
                _signal_all(workers, signal.SIGHUP)
            for pid, status in _reap():
                started = workers.pop(pid, None)
                if started is None:
                    continue
                worker_exited(pid)
                exit_code = os.waitstatus_to_exitcode(status)
                if stopping:
                    continue
                quick_exits = quick_exits + 1 if time.monotonic() - started < _QUICK_EXIT else 0
                log.warning(
                    "worker exited; starting a new one",
                    extra={"event": "worker-exit", "worker": pid, "exit_code": exit_code},
                )
                if quick_exits >= _MAX_QUICK_EXITS:
                    log.error("workers keep failing at start-up; giving up", extra={"event": "crash-loop"})
                    stopping, deadline, code = True, time.monotonic() + settings.shutdown_timeout + 5, 1
                    _signal_all(workers, signal.SIGTERM)
                    continue
                new = _spawn(settings)
                workers[new] = time.monotonic()
                log.info("worker started", extra={"event": "worker-start", "worker": new})
            if stopping and workers and time.monotonic() > deadline:
                _signal_all(workers, signal.SIGKILL)
    finally:
        if owned:
            shutil.rmtree(metrics_path, ignore_errors=True)
    log.info("supervisor stopped", extra={"event": "supervisor-stopped"})
    return code


def _signal_all(workers: dict[int, float], sig: int) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap() -> list[tuple[int, int]]:
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.append((pid, status))
    return done
