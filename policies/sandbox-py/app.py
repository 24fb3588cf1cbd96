"""sandbox-py: a test policy that tries what a policy must not do, and says
whether it could. weir gives a policy's WASI imports no capabilities: no
preopened directory, no socket, no environment, no arguments, stdout and
stderr to the gateway's log. The test `policy::a_python_policy_gets_no_capabilities`
runs it.

On each pick it tries to read the file named by the route option
`probe-file`, to connect to the `host:port` in `probe-addr`, and to read the
environment. Each attempt must fail with an error (not a trap); then it picks
candidate 0 and logs what each attempt got. If any attempt succeeds, the
pick fails, naming it, and the call falls back (counted in the fallback
metric the test watches).
"""

import os
import socket
import sys

import wit_world
from wit_world.imports import call, env
from componentize_py_types import Err, Some


def option(key: str) -> str | None:
    value = call.route_option(key)
    return value.value if isinstance(value, Some) else value


def attempt(what, action) -> tuple[bool, str]:
    """Runs `action`; says whether it succeeded and what it got."""
    try:
        return True, f"{what}: succeeded: {action()!r}"
    except Exception as error:  # the sandbox's answer
        return False, f"{what}: {type(error).__name__}: {error}"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def connect(addr: str) -> str:
    # A numeric address and a plain socket: no name lookup in the way.
    host, port = addr.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.connect((host, int(port)))
        return str(s.getpeername())


def environment() -> str:
    if not os.environ:
        raise LookupError("the environment is empty")
    return ",".join(sorted(os.environ))


class WitWorld(wit_world.WitWorld):
    def pick(self, count: int, generation: int, random: int) -> int:
        results = [
            attempt("open", lambda: read(option("probe-file") or "/etc/hostname")),
            attempt("connect", lambda: connect(option("probe-addr") or "127.0.0.1:1")),
            attempt("environ", environment),
        ]
        print("sandbox-py: printed to stdout")
        print("sandbox-py: printed to stderr", file=sys.stderr)
        granted = [text for ok, text in results if ok]
        if granted:
            raise Err("sandbox let through: " + "; ".join(granted))
        env.log(2, "sandbox held: " + "; ".join(text for _, text in results))
        return 0
