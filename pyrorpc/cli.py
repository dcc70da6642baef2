"""The ``pyrorpc`` command: name server, workers, calls and the demo, as one click group."""

from __future__ import annotations

import ast
import base64
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from .compat import remote_traceback
from .config import MAX_TIMEOUT, MIN_TIMEOUT, Address, Addresses, Settings

NS_HELP = ("name server HOST:PORT, or several: HOST:PORT,HOST:PORT (the first that answers; several name servers "
           "share one registry only over etcd storage; env PYRORPC_NS, default 127.0.0.1:9090)")


class HostPort(click.ParamType):
    """``HOST:PORT`` as a click parameter type."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: Any, ctx: Any) -> Address:
        if isinstance(value, Address):
            return value
        try:
            return Address.parse(value, what=param.name if param is not None else "address")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


HOST_PORT = HostPort()


class HostPorts(click.ParamType):
    """``HOST:PORT[,HOST:PORT...]`` (name servers) as a click parameter type."""

    name = "HOST:PORT[,...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Addresses:
        try:
            return Addresses.parse(value, what=param.name if param is not None else "ns")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


HOST_PORTS = HostPorts()


class Seconds(click.FloatRange):
    """A finite number of seconds in a range (``inf`` and ``nan`` are refused, not passed on)."""

    name = "seconds"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return number


TIMEOUT_SECONDS = Seconds(MIN_TIMEOUT, MAX_TIMEOUT)


_SECURITY = ("secret", "tls_cert", "tls_key", "tls_ca", "tls_mutual")


def security_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--secret / --tls-cert / --tls-key / --tls-ca (env PYRORPC_*), handed to settings_for()."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        security = {k: kwargs.pop(k) for k in _SECURITY}
        security["tls_mutual"] = security["tls_mutual"] or None  # unset: leave it to PYRORPC_TLS_MUTUAL
        click.get_current_context().meta["pyrorpc.security"] = security
        return func(*args, **kwargs)

    file = click.Path(exists=True, dir_okay=False)
    for option in reversed([
        click.option("--secret", default=None, help="shared secret (env PYRORPC_SECRET; prefer the env var)"),
        click.option("--tls-cert", type=file, default=None, help="PEM certificate (env PYRORPC_TLS_CERT)"),
        click.option("--tls-key", type=file, default=None, help="PEM key for --tls-cert (env PYRORPC_TLS_KEY)"),
        click.option("--tls-ca", type=file, default=None, help="CA bundle to verify peers (env PYRORPC_TLS_CA)"),
        click.option("--tls-mutual", is_flag=True, default=False,
                     help="servers require client certificates signed by --tls-ca (env PYRORPC_TLS_MUTUAL)"),
    ]):
        wrapper = option(wrapper)
    return wrapper


def ns_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--ns plus the security options: what every networked command takes."""
    return click.option("--ns", type=HOST_PORTS, envvar="PYRORPC_NS", default=None, help=NS_HELP)(
        security_options(func))


def log_format_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                        help="json: log records (INFO and up: failed calls, lease events, drains) to stderr as one "
                             "JSON object a line (ts, level, logger, message, service, worker, method, outcome, "
                             "duration_ms...)")(func)


def timeout_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--timeout", type=TIMEOUT_SECONDS, default=None,
                        help=f"seconds before giving up, {MIN_TIMEOUT:g}-{MAX_TIMEOUT:g} (env PYRORPC_TIMEOUT)")(func)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one ``Error: ...`` line and exit status 1."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import Pyro5.errors
        try:
            return func(*args, **kwargs)
        except (Pyro5.errors.PyroError, ValueError, TypeError, OSError, ImportError) as exc:
            raise click.ClickException(_one_line(exc)) from None
    return wrapper


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and remote_traceback(exc) is None:
        # the system's words without "[Errno 98]"; the class name (OSError, gaierror...) tells a user nothing
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def settings_for(ns: Addresses | None = None, **overrides: Any) -> Settings:
    ctx = click.get_current_context(silent=True)
    security = ctx.meta.get("pyrorpc.security", {}) if ctx is not None else {}
    try:
        return Settings.from_env(ns=ns, **security, **overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON: tuples and sets as lists (sets sorted when they can be), bytes as serpent
    writes them (``{"data": BASE64, "encoding": "base64"}``), anything else JSON lacks as its ``str()``."""
    click.echo(json.dumps(_jsonable(data), indent=2, sort_keys=True, default=str))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        items = [_jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _jsonable(v)
                for k, v in value.items()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"data": base64.b64encode(bytes(value)).decode("ascii"), "encoding": "base64"}
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyrorpc")
def main() -> None:
    """pyrorpc: distributed objects on Pyro5 - named services, workers, load-balanced pools."""


# name server -----------------------------------------------------------------------------------------

@main.group()
def ns() -> None:
    """Run or query the name server."""


@ns.command("start")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind")
@click.option("--port", type=click.IntRange(0, 65535), default=9090, show_default=True, help="port (0 = any)")
@click.option("--storage", default="memory", show_default=True,
              help="memory, PATH.sqlite, or etcd://HOST:PORT[,HOST:PORT...] (several name servers, one registry)")
@click.option("--lease-ttl", type=Seconds(0.2, 86400), default=10.0, show_default=True,
              help="seconds a worker's lease lives without renewal")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus metrics on http://HOST:PORT/metrics (needs the metrics extra)")
@log_format_option
@security_options
@user_errors
def ns_start(host: str, port: int, storage: str, lease_ttl: float, metrics_port: int | None, log_format: str) -> None:
    """Run a name server in the foreground until SIGTERM/SIGINT."""
    from nameserver import run

    from .logs import setup_logging
    setup_logging(log_format)
    run(host, port, storage=storage, lease_ttl=lease_ttl, settings=settings_for(),
        echo=lambda line: click.echo(line), metrics_port=metrics_port)


@ns.command("list")
@click.argument("service", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@ns_option
@user_errors
def ns_list(service: str | None, as_json: bool, ns: Addresses | None) -> None:
    """List registrations (all, or the workers of SERVICE)."""
    from .naming import NameServerClient
    client = NameServerClient(settings_for(ns))
    entries: dict[str, tuple[str, set[str]]]
    if service:
        entries = {w.name: (w.uri, set(w.metadata)) for w in client.service_workers(service, with_metadata=True)}
        if not entries:
            raise click.ClickException(f"no workers registered for service {service!r}")
    else:
        entries = client.list()
    if as_json:
        emit_json({name: {"uri": uri, "metadata": sorted(meta)} for name, (uri, meta) in entries.items()})
        return
    width = max((len(n) for n in entries), default=4)
    for name, (uri, _meta) in sorted(entries.items()):
        click.echo(f"{name:<{width}}  {uri}")


@ns.command("lookup")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@ns_option
@user_errors
def ns_lookup(name: str, as_json: bool, ns: Addresses | None) -> None:
    """Show the URI and metadata registered under NAME."""
    import Pyro5.errors

    from .naming import NameServerClient
    client = NameServerClient(settings_for(ns))
    try:
        uri, meta = client.lookup(name)
    except Pyro5.errors.NamingError:
        if client.leasing and name in client.services():
            raise click.ClickException(f"{name!r} is a service, not a registered name; list its workers with "
                                       f"`pyrorpc workers {name}` (or `pyrorpc ns list {name}`)") from None
        raise
    if as_json:
        emit_json({"name": name, "uri": uri, "metadata": sorted(meta)})
    else:
        click.echo(uri)
        for tag in sorted(meta):
            click.echo(f"  {tag}")


@ns.command("remove")
@click.argument("name")
@ns_option
@user_errors
def ns_remove(name: str, ns: Addresses | None) -> None:
    """Remove the registration NAME."""
    import Pyro5.errors

    from .naming import SERVICE_TAG, NameServerClient
    client = NameServerClient(settings_for(ns))
    try:
        _uri, meta = client.lookup(name)
    except Pyro5.errors.NamingError:
        meta = set()
    service = next((tag[len(SERVICE_TAG):] for tag in sorted(meta) if tag.startswith(SERVICE_TAG)), None)
    ttl = next((w.ttl for w in client.service_workers(service) if w.name == name), None) if service else None
    if not client.remove(name):
        raise click.ClickException(f"unknown name: {name}")
    click.echo(f"removed {name}")
    if service is not None:
        when = f" (every {ttl / 3:g}s)" if ttl else ""
        click.echo(f"note: {name} is a worker of service {service!r}: it registers again at its next lease "
                   f"renewal{when} unless the worker is stopped")


@ns.command("ping")
@ns_option
@user_errors
def ns_ping(ns: Addresses | None) -> None:
    """Check that the name server answers."""
    from .naming import NameServerClient
    client = NameServerClient(settings_for(ns))
    started = time.perf_counter()
    client.ping()
    kind = "pyrorpc" if client.leasing else "stock Pyro5"
    click.echo(f"name server at {client.address} ({kind}) answered in "
               f"{(time.perf_counter() - started) * 1000:.1f} ms")


# workers ---------------------------------------------------------------------------------------------

@main.group()
def worker() -> None:
    """Run worker processes."""


def load_class(spec: str) -> type:
    """Import ``MODULE:CLASS`` (the current directory is importable, as for ``python -m``)."""
    import importlib
    import inspect

    from .errors import ConfigurationError
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigurationError(f"expected MODULE:CLASS, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigurationError(f"cannot import module {module_name!r}: {_one_line(exc)}") from None
    obj: Any = module
    for part in class_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigurationError(f"module {module_name!r} has no class {class_name!r}")
    if not inspect.isclass(obj):
        raise ConfigurationError(f"{spec!r} is not a class")
    return obj


@worker.command("start")
@click.argument("spec", metavar="MODULE:CLASS")
@click.option("--service", default=None, help="service name (default: the class's @service name)")
@click.option("--processes", type=click.IntRange(1, 256), default=1, show_default=True,
              help="worker processes, supervised and restarted on crash")
@click.option("--threads", type=click.IntRange(1, 4096), default=None,
              help="calls a worker runs at once (default 64; idle connections hold no thread)")
@click.option("--max-connections", type=click.IntRange(1, 1_000_000), default=None,
              help="client connections a worker keeps open (default 4096); more are refused")
@click.option("--idle-timeout", type=click.FloatRange(0.001), default=None,
              help="seconds before a worker closes an idle connection (default 300)")
@click.option("--host", default=None, help="interface to bind (default 127.0.0.1)")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="port (0 = any; needs --processes 1)")
@click.option("--instance-mode", type=click.Choice(["single", "session", "percall"]), default="single",
              show_default=True, help="one shared instance, one per connection, or one per call")
@click.option("--lease-ttl", type=click.FloatRange(0.2, 86400), default=None,
              help="lease TTL to ask for (default: the name server's)")
@click.option("--drain-timeout", type=click.FloatRange(0), default=None, help="seconds to finish calls on stop")
@click.option("--max-restarts", type=click.IntRange(0), default=5, show_default=True,
              help="with --processes > 1: the supervisor gives up (stops the rest, exits 1) when worker "
                   "processes exit more than this many times within --restart-window seconds")
@click.option("--restart-window", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="seconds over which --max-restarts counts worker exits")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus metrics on http://HOST:PORT/metrics (needs the metrics extra); with "
                   "--processes N one port per process: PORT, PORT+1, ... PORT+N-1")
@log_format_option
@click.option("--parent-fd", type=int, default=None, hidden=True,
              help="set by the supervisor: a pipe whose end-of-file means the supervisor is gone")
@ns_option
@user_errors
def worker_start(spec: str, service: str | None, processes: int, threads: int | None,
                 max_connections: int | None, idle_timeout: float | None, host: str | None,
                 port: int, instance_mode: str, lease_ttl: float | None, drain_timeout: float | None,
                 max_restarts: int, restart_window: float, metrics_port: int | None, log_format: str,
                 parent_fd: int | None, ns: Addresses | None) -> None:
    """Serve MODULE:CLASS as a service until SIGTERM/SIGINT (which drains calls first).

    With --processes N a supervisor runs N worker processes and restarts one that exits (after a backoff);
    its workers drain and exit by themselves if the supervisor dies, even by SIGKILL. A worker that cannot
    start (its class's __init__ raises) prints one Error line and exits 1; when workers keep failing the
    supervisor gives up and exits 1 (see --max-restarts).
    """
    supervisor_pid = os.getppid()  # with --parent-fd: a later getppid() that differs means it died
    from .logs import setup_logging
    setup_logging(log_format)
    cls = load_class(spec)
    settings = settings_for(ns, host=host, threads=threads, max_connections=max_connections,
                            idle_timeout=idle_timeout, lease_ttl=lease_ttl, drain_timeout=drain_timeout)
    # a service that calls other services (Pool/connect inside a method) finds the same name server and
    # credentials through the environment, as if they had been given as PYRORPC_* variables
    for key, value in (("NS", str(settings.ns)), ("SECRET", settings.secret), ("TLS_CERT", settings.tls_cert),
                       ("TLS_KEY", settings.tls_key), ("TLS_CA", settings.tls_ca)):
        if value:
            os.environ["PYRORPC_" + key] = value
    if processes > 1:
        if port:
            raise click.UsageError("--port needs --processes 1 (each process binds its own port)")
        from .supervisor import Supervisor
        argv = [sys.executable, "-m", "pyrorpc", "worker", "start", spec, "--ns", str(settings.ns),
                "--instance-mode", instance_mode, "--threads", str(settings.threads),
                "--max-connections", str(settings.max_connections), "--idle-timeout", str(settings.idle_timeout),
                "--host", settings.host, "--drain-timeout", str(settings.drain_timeout)]
        if service is not None:
            argv += ["--service", service]
        if settings.lease_ttl:
            argv += ["--lease-ttl", str(settings.lease_ttl)]
        for flag, value in (("--tls-cert", settings.tls_cert), ("--tls-key", settings.tls_key),
                            ("--tls-ca", settings.tls_ca)):
            if value:
                argv += [flag, value]
        if settings.tls_mutual:
            argv.append("--tls-mutual")
        argv += ["--log-format", log_format]
        if metrics_port is not None:
            _check_metrics_ports(settings.host, metrics_port, processes)
            argv += ["--metrics-port", str(metrics_port)]  # each child adds its slot (PYRORPC_WORKER_SLOT)
        env = dict(os.environ)
        if settings.secret:
            env["PYRORPC_SECRET"] = settings.secret  # not on the command line, where `ps` shows it
        if log_format == "json":  # (every line of the process is JSON then: the supervisor's through logging)
            import logging
            echo: Callable[[str], None] = logging.getLogger("pyrorpc.supervisor").info
        else:
            def echo(line: str) -> None:
                click.echo(line, err=True)
        sup = Supervisor(argv, processes, grace=settings.drain_timeout + 10, env=env, max_restarts=max_restarts,
                         restart_window=restart_window, echo=echo, heartbeats=settings)
        echo(f"supervisor {os.getpid()}: starting {processes} workers of {spec}")
        status = sup.run()
        if sup.failure:
            raise click.ClickException(f"{sup.failure} (--max-restarts {max_restarts}, "
                                       f"--restart-window {restart_window:g}); giving up")
        sys.exit(status)
    import Pyro5.errors

    from .worker import WorkerHost
    if metrics_port and parent_fd is not None:  # a supervisor's child: its own port of the range
        metrics_port += int(os.environ.get("PYRORPC_WORKER_SLOT", "0") or 0)
    host_obj = WorkerHost(cls, service=service, port=port, instance_mode=instance_mode, settings=settings,
                          metrics_port=metrics_port)
    try:
        host_obj.start()
    except (Pyro5.errors.PyroError, OSError):
        raise  # the worker's own errors (name server, bind): user_errors words them
    except Exception as exc:  # the service class's __init__ (instance_mode single) raised
        raise click.ClickException(f"cannot start {spec}: {_one_line(exc)}") from None
    click.echo(f"worker {host_obj.name} serving {host_obj.service} on {host_obj.uri} (pid {os.getpid()})")
    if host_obj.metrics is not None:
        click.echo(f"worker {host_obj.name} metrics on {host_obj.metrics.url}")
    sys.stdout.flush()
    if parent_fd is not None:
        # started by a supervisor: drain and exit when it dies, however it dies. Both only from here on, so a
        # worker never dies half-registered: the pipe's end-of-file waits until now, and the kernel's SIGTERM
        # (Linux) finds a draining handler (serve() installs the same one for good)
        import signal
        import threading

        from .supervisor import set_parent_death_signal, watch_parent

        def supervisor_gone() -> None:
            try:
                click.echo(f"worker {host_obj.name}: supervisor gone, draining")
            except OSError:  # its terminal or pipe may have gone with it: drain all the same
                pass
            host_obj.stop()
        watch_parent(parent_fd, supervisor_gone)
        signal.signal(signal.SIGTERM, lambda _signo, _frame: threading.Thread(target=host_obj.stop,
                                                                              daemon=True).start())
        set_parent_death_signal(signal.SIGTERM, parent=supervisor_pid)
    host_obj.serve()
    drained = host_obj.stop()
    click.echo(f"worker {host_obj.name} stopped{'' if drained else ' (drain timeout)'}")
    sys.exit(0 if drained else 1)


def _check_metrics_ports(host: str, first: int, processes: int) -> None:
    """Before starting N processes: the metrics extra is there and ports first..first+N-1 are free (port 0:
    each process takes any free one).

    Raises:
        ConfigurationError: the extra is missing, the range passes 65535 or a port is in use.
    """
    import socket

    from .errors import ConfigurationError
    from .metrics import require_prometheus
    require_prometheus()
    if not first:
        return
    if first + processes - 1 > 65535:
        raise ConfigurationError(f"--metrics-port {first} with --processes {processes} needs ports up to "
                                 f"{first + processes - 1}, past 65535")
    for port in range(first, first + processes):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


@main.command("workers")
@click.argument("service", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--watch", is_flag=True, help="refresh every second until Ctrl-C")
@ns_option
@user_errors
def workers_cmd(service: str | None, as_json: bool, watch: bool, ns: Addresses | None) -> None:
    """Table of workers (all services, or SERVICE) from their lease reports; --watch keeps it live."""
    from .errors import NameServerUnavailableError
    from .naming import NameServerClient
    client = NameServerClient(settings_for(ns))

    def fetch() -> list[Any]:
        services = [service] if service else sorted(client.services())
        return [w for s in services for w in client.service_workers(s)]

    def show(rows: list[Any]) -> None:
        if as_json:
            emit_json([w.as_dict() for w in rows])
        else:
            if watch:
                click.clear()  # (only on a terminal)
            click.echo(format_workers(rows))

    if not watch:
        rows = fetch()
        if service and not rows:
            raise click.ClickException(f"no live workers for service {service!r}")
        show(rows)
        return
    # Ctrl-C (SIGINT) ends the watch at the next refresh: a flag, not KeyboardInterrupt, which a name-server
    # call under way could take for its own failure
    import signal
    import threading
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda _signo, _frame: stop.set())
    try:
        while not stop.is_set():  # a name server that does not answer is shown, and asked again
            try:
                rows = fetch()
            except NameServerUnavailableError as exc:
                click.echo(f"{time.strftime('%H:%M:%S')} {exc}; retrying every second (Ctrl-C to stop)", err=True)
            else:
                if not stop.is_set():
                    show(rows)
            stop.wait(1.0)
    except KeyboardInterrupt:
        return
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        client.close()


def format_workers(rows: list[Any]) -> str:
    header = ("WORKER", "HOST", "PID", "IN-FLIGHT", "CALLS", "ERRORS", "UPTIME", "HEARTBEAT")
    table = [header] + [
        (w.name, w.host, str(w.pid), str(w.in_flight), str(w.calls), str(w.errors), _duration(w.uptime),
         "-" if w.last_heartbeat is None else f"{w.last_heartbeat:.1f}s ago") for w in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in table]
    return "\n".join(lines + [f"{len(rows)} worker(s)"])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# outbox ----------------------------------------------------------------------------------------------

@main.group()
def outbox() -> None:
    """Inspect durable outboxes (pyrorpc.Outbox journals)."""


@outbox.command("status")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@user_errors
def outbox_status_cmd(path: str, as_json: bool) -> None:
    """Pending, in-flight, accepted, failed and lost entries of the outbox at PATH (failed ones with errors)."""
    from .outbox import outbox_status
    status = outbox_status(path)
    if as_json:
        emit_json(status)
        return
    counts = ("pending", "in_flight", "accepted", "unconfirmed", "failed", "lost")
    click.echo("  ".join(f"{name.replace('_', '-')}: {status[name]}" for name in counts))
    for entry in status["entries"]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["created"]))
        click.echo(f"{entry['state'].upper():11} {entry['id']}  {entry['service']}.{entry['method']}  {created}  "
                   f"attempts {entry['attempts']}: {entry['error']}")


@main.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to serve the page on")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="port (0 = any)")
@click.option("--interval", type=Seconds(0.1, 60), default=1.0, show_default=True,
              help="seconds between polls of the name server and workers")
@ns_option
@user_errors
def dashboard_cmd(host: str, port: int, interval: float, ns: Addresses | None) -> None:
    """Serve a live, read-only web page of services and workers until Ctrl-C."""
    from .dashboard import Dashboard
    board = Dashboard(settings_for(ns), host=host, port=port, interval=interval)
    click.echo(f"dashboard on {board.url} (name server {board.fleet.settings.ns}); Ctrl-C to stop")
    board.serve_forever()


# calls -----------------------------------------------------------------------------------------------

_LITERAL_START = re.compile(r"""\s*[\[({'"]""")  # what only a literal starts with (127.0.0.1 is a string)


def parse_literal(text: str) -> Any:
    """A Python literal (``2``, ``'a'``, ``[1, 2]``, ``None``); a bare word that is not one is a string.

    Raises:
        ValueError: ``text`` starts as only a literal does (quote, bracket) but is not one (``[1,``,
            ``{'a': x}``): a typo, not a string. ``127.0.0.1`` or ``2024-01-01`` are strings.
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if _LITERAL_START.match(text):
            raise ValueError(f"{text!r} is not a Python literal (for a string, quote it: \"'...'\")") from None
        return text


@main.command("call", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("method")
@click.argument("args", nargs=-1)
@click.option("--kw", "kwargs", multiple=True, metavar="K=V", help="keyword argument (value a Python literal)")
@click.option("--oneway", is_flag=True, help="fire and forget: return once sent")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--traceback", "show_traceback", is_flag=True, help="print the remote traceback of a remote error")
@ns_option
@timeout_option
@user_errors
def call_cmd(target: str, method: str, args: tuple[str, ...], kwargs: tuple[str, ...], oneway: bool,
             as_json: bool, show_traceback: bool, ns: Addresses | None, timeout: float | None) -> None:
    """Call METHOD on TARGET (service, worker name or PYRO: URI); ARGs are Python literals."""
    from .proxy import connect
    kw: dict[str, Any] = {}
    for item in kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.UsageError(f"--kw expects NAME=VALUE, got {item!r}")
        if key in kw:
            raise click.UsageError(f"--kw {key} given more than once")
        try:
            kw[key] = parse_literal(value)
        except ValueError as exc:
            raise click.UsageError(f"--kw {key}: {exc}") from None
    if method.startswith("_"):
        raise click.UsageError(f"private methods cannot be called: {method!r}")
    settings = settings_for(ns, timeout=timeout)
    try:
        arg_values = [parse_literal(a) for a in args]
    except ValueError as exc:
        raise click.UsageError(f"argument {exc}") from None
    with connect(target, settings=settings) as proxy:
        remote = proxy.method(method)
        try:
            if oneway:
                remote.oneway(*arg_values, **kw)
                result: Any = None
            else:
                result = remote(*arg_values, **kw)
        except Exception as exc:
            tb = remote_traceback(exc)
            if tb is None:
                raise  # ours (timeout, no workers...): handled by user_errors
            if show_traceback:
                click.echo("".join(tb).rstrip(), err=True)
            raise click.ClickException(f"{target}.{method} raised {_one_line(exc)}") from None
    if as_json:
        emit_json(result)
    elif oneway:
        click.echo("sent (oneway)")
    else:
        click.echo(result if isinstance(result, str) else repr(result))


@main.command("demo")
@click.option("--workers", "n_workers", type=click.IntRange(1, 16), default=3, show_default=True,
              help="worker processes to start")
@click.option("--calls", type=click.IntRange(1, 100000), default=300, show_default=True, help="calls to make")
@click.option("--no-kill", is_flag=True, help="do not SIGKILL a worker mid-run")
@user_errors
def demo_cmd(n_workers: int, calls: int, no_kill: bool) -> None:
    """Embedded name server + worker processes + calls of every kind, with a summary."""
    from .demo import run_demo
    sys.exit(run_demo(n_workers=n_workers, calls=calls, kill=not no_kill, echo=click.echo))


if __name__ == "__main__":  # pragma: no cover
    main()
