"""`impasto serve`: one Engine, one app, one uvicorn server that drains on SIGTERM.

On SIGTERM (or SIGINT) the server stops accepting connections, lets in-flight requests and
jobs finish within `grace_seconds`, cancels what is left, closes the engine and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
import time

import uvicorn

from .auth import ConfigError, check_binding, read_key_file


def run(args, *, out=sys.stdout) -> int:
    """Semantics: check the configuration, load the engine and its adapters, bind, serve until
    a signal, drain, return 0. ConfigError before anything is loaded."""
    check_binding(args.host, args.api_key_file)
    api_keys = read_key_file(args.api_key_file) if args.api_key_file else ()
    admin_keys = read_key_file(args.admin_key_file) if args.admin_key_file else ()
    limits = dict(_limit(spec) for spec in args.limit or ())

    import impasto

    from .app import Settings, create_app
    from .backend import LocalBackend

    engine = impasto.Engine.from_pretrained(args.model, adapter_root=args.adapters, **limits)
    refused = engine.adapters.register_dir(args.adapters)
    for path, error in refused.items():
        print(f"impasto serve: adapter {path} refused: {type(error).__name__}: {error}", file=out, flush=True)
    # The first forward of a fresh process pays one-time setup (allocations, kernel selection):
    # pay it now, so that /ready means ready and the first client is not the slow one.
    engine.generate("warm up", steps=1, seed=0, output_type="latent")
    model_name = "tiny" if args.model == "tiny" else None
    settings = Settings(api_keys=tuple(api_keys), admin_keys=tuple(admin_keys), adapter_root=args.adapters,
                        grace_seconds=args.grace_seconds, max_body_bytes=args.max_body_bytes,
                        max_upload_bytes=args.max_upload_bytes)
    app = create_app(LocalBackend(engine, model_name=model_name), settings)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    # listen before announcing the address: a bound socket that is not yet listening refuses
    # connections, and uvicorn only listens once its loop has started
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.grace_seconds,
                            access_log=False)
    server = _DrainingServer(config, settings)
    url_host = f"[{host}]" if ":" in host else host
    print(f"impasto serve: {len(engine.adapters.names())} adapters, listening on http://{url_host}:{port}"
          + ("" if api_keys else " (no --api-key-file: loopback only, no authentication)"), file=out, flush=True)
    server.run(sockets=[sock])
    print("impasto serve: stopped", file=out, flush=True)
    return 0


class _DrainingServer(uvicorn.Server):
    """A uvicorn.Server whose signals start a drain with a deadline and end in exit status 0
    (uvicorn re-raises a caught SIGTERM after shutdown, which would end the process by the
    signal, status 143)."""

    def __init__(self, config, settings):
        super().__init__(config)
        self.settings = settings

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig, frame) -> None:
        self.settings.drain.setdefault("deadline", time.monotonic() + self.settings.grace_seconds)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop now
        self.should_exit = True
        # Stop listening now rather than at uvicorn's next tick (0.1 s or later under load):
        # /ready turns 503 at once, so new connections must be refused from the same moment.
        # Scheduled on the loop, since a signal handler may interrupt any loop callback.
        with contextlib.suppress(RuntimeError):  # no loop running: nothing listens yet
            asyncio.get_running_loop().call_soon_threadsafe(self._close_listeners)

    def _close_listeners(self) -> None:
        for listener in getattr(self, "servers", ()):
            listener.close()  # idempotent: uvicorn's shutdown closes them again


def _limit(spec: str) -> tuple[str, int]:
    """NAME=VALUE of an operator limit (impasto.LIMITS)."""
    from ..engine import LIMITS

    name, sep, value = spec.partition("=")
    if not sep or name not in LIMITS or not value.isdigit():
        raise ConfigError(f"--limit {spec!r}: expected NAME=INTEGER with NAME one of {', '.join(sorted(LIMITS))}")
    return name, int(value)
