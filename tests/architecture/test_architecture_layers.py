"""The layering rules of issue 9 and STYLE.md §8, checked on the installed package.

Each rule is checked twice, as tests/protocol/test_protocol_isolation.py does:
on the import statements (AST, so a function-local or TYPE_CHECKING import
counts) and, where importing is meaningful, in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from arch_graph import ImportGraph

#: Modules of fleetpush.client that compose the updater and so may import it:
#: the package's public face, the agent front end and the thread wrapper.
#: Every other client module is a step that receives what it needs.
CLIENT_FRONT_ENDS = frozenset(
    {
        "fleetpush.client",
        "fleetpush.client.agent",
        "fleetpush.client.thread_handle",
        "fleetpush.client.updater",
    }
)

#: Modules of fleetpush.server that may hold a Session: the session itself and
#: the listener that makes one per connection. Every other module is a handler
#: or a service and gets what it needs passed in.
SERVER_SESSION_OWNERS = frozenset({"fleetpush.server.session", "fleetpush.server.app"})

FRONT_ENDS = ("fleetpush.cli", "fleetpush.demo", "fleetpush.bench")

#: The trio layer may use itself and the sans-IO core, nothing else of fleetpush.
NET_MAY_USE = ("fleetpush.net", "fleetpush.protocol")


def _imports_in_fresh_interpreter(module: str) -> list[str]:
    """The fleetpush modules loaded by ``import module`` in a new interpreter (-P: no cwd)."""
    code = (
        f"import sys, {module}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('fleetpush'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def _in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_covers_every_layer(graph: ImportGraph) -> None:
    # Guards the guard: a mapping change that hid a layer would make every rule pass.
    for layer in ("protocol", "net", "server", "client", "cli", "demo", "bench"):
        assert len(graph.under(f"fleetpush.{layer}")) >= 2, layer
    assert "fleetpush.net.peer" in graph.reachable("fleetpush.server.app")


def test_net_imports_only_protocol(graph: ImportGraph) -> None:
    # issue 9: the trio layer sits under client and server and above the sans-IO core only.
    offenders = [
        f"{name} imports {target}"
        for name in graph.under("fleetpush.net")
        for target in sorted(graph.edges[name])
        if not _in(target, NET_MAY_USE)
    ]
    assert offenders == []


def test_net_import_loads_only_protocol() -> None:
    loaded = _imports_in_fresh_interpreter("fleetpush.net")
    assert "fleetpush.net" in loaded  # the check ran
    outside = [m for m in loaded if m != "fleetpush" and not _in(m, NET_MAY_USE)]
    assert outside == []


def test_no_client_step_imports_the_updater(graph: ImportGraph) -> None:
    # STYLE.md §8: a step module gets a context, never the orchestrator that calls it.
    # The package itself counts too: its __init__ re-exports the Updater.
    assert set(graph.modules) >= CLIENT_FRONT_ENDS
    forbidden = {"fleetpush.client.updater", "fleetpush.client"}
    offenders = [
        f"{name} imports {target}"
        for name in graph.under("fleetpush.client")
        if name not in CLIENT_FRONT_ENDS
        for target in sorted(graph.edges[name] & forbidden)
    ]
    assert offenders == []


def test_no_server_handler_imports_the_session(graph: ImportGraph) -> None:
    # issue 9: handlers take (services, call, params), never a Session. The package
    # counts too: its __init__ imports app, which imports session.
    assert set(graph.modules) >= SERVER_SESSION_OWNERS
    forbidden = {"fleetpush.server.session", "fleetpush.server"}
    offenders = [
        f"{name} imports {target}"
        for name in graph.under("fleetpush.server")
        if name not in SERVER_SESSION_OWNERS
        for target in sorted(graph.edges[name] & forbidden)
    ]
    assert offenders == []


@pytest.mark.parametrize("package", ["fleetpush.server", "fleetpush.client"])
def test_server_and_client_never_reach_the_front_ends(graph: ImportGraph, package: str) -> None:
    # cli, demo and bench are built on server and client, never the other way round;
    # checked transitively, so a detour through another module is caught too.
    offenders = sorted(
        " -> ".join(graph.path(name, target))
        for name in graph.under(package)
        for target in graph.reachable(name)
        if _in(target, FRONT_ENDS)
    )
    assert offenders == []


@pytest.mark.parametrize("package", ["fleetpush.server", "fleetpush.client"])
def test_server_and_client_import_loads_no_front_end(package: str) -> None:
    loaded = _imports_in_fresh_interpreter(package)
    assert [m for m in loaded if _in(m, FRONT_ENDS)] == []


#: Server modules handlers are built on: they may not import any handler either.
SERVER_SERVICES = ("fleetpush.server.services", "fleetpush.server.fleet", "fleetpush.server.call")
SERVER_HANDLERS = frozenset(
    {"fleetpush.server.device_api", "fleetpush.server.operator_api", *SERVER_SESSION_OWNERS}
)


def test_server_services_do_not_import_the_handlers(graph: ImportGraph) -> None:
    # What handlers share sits below them: services, fleet and call import no handler.
    assert set(graph.modules) >= SERVER_HANDLERS | set(SERVER_SERVICES)
    offenders = [
        f"{name} imports {target}"
        for name in SERVER_SERVICES
        for target in sorted(graph.edges[name] & SERVER_HANDLERS)
    ]
    assert offenders == []


def test_one_operator_module(graph: ImportGraph) -> None:
    # One name for one thing: the server's handlers are operator_api; operator.py is the client.
    assert "fleetpush.server.operator" not in graph.modules
    assert "fleetpush.operator" in graph.modules


def test_importing_the_client_steps_does_not_load_the_updater(graph: ImportGraph) -> None:
    # fleetpush/client/__init__.py imports the updater, so the package is stubbed
    # and the steps are loaded as a new step module would be.
    steps = sorted(
        name
        for name in graph.under("fleetpush.client")
        if name not in CLIENT_FRONT_ENDS and name != "fleetpush.client.agent"
    )
    assert "fleetpush.client.trial_watch" in steps and "fleetpush.client.context" in steps
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('fleetpush.client')\n"
        "pkg = types.ModuleType('fleetpush.client')\n"
        "pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['fleetpush.client'] = pkg\n"
        f"import {', '.join(steps)}\n"
        "print('fleetpush.client.updater' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
