"""Where a run's servers and ranks listen: 127.0.0.1, unless POSTTRAIN_BIND_ADDRESS names another
address; and the wrapper that starts torchrun / accelerate launch listening there only.

torch's TCPStore server listens on every interface (`::`, else 0.0.0.0) whatever host it is
given (torch 2.13, both backends), and a launcher hosts the stores its ranks meet in: torchrun
two (the c10d rendezvous store and the store its ranks share), accelerate launch one. Under
`python -m flows.loopback ADDRESS MODULE ARGS...` every store the launcher hosts gets a socket
already bound to ADDRESS (`master_listen_fd`) and the ranks are its clients; gloo and NCCL take
the loopback interface (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, unless set) when ADDRESS is a
loopback one. A wildcard ADDRESS (0.0.0.0, ::) leaves torch's own behaviour.

Light to import (no torch): the runners and `flows/run.py` read `bind_address()`.

Run: ``python -m flows.loopback 127.0.0.1 torch.distributed.run --nproc_per_node 2 ...``, what
`flows/run.py` builds for a stage under `launch: {processes: N}`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import runpy
import socket
import sys
from typing import Any

BIND_ENV = "POSTTRAIN_BIND_ADDRESS"
LOOPBACK = "127.0.0.1"


def bind_address() -> str:
    """The address a run's servers and ranks listen on: POSTTRAIN_BIND_ADDRESS or 127.0.0.1."""
    return os.environ.get(BIND_ENV, "").strip() or LOOPBACK


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def is_wildcard(address: str) -> bool:
    """0.0.0.0 or ::: listen everywhere (torch's and Ray's own behaviour)."""
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(address).is_unspecified
    return False


def reach(address: str) -> str:
    """The host that local clients connect to when servers listen on `address`."""
    return LOOPBACK if is_wildcard(address) else address


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str) -> int:
    """A port free on `host` now (bound then released: another process may take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    with contextlib.suppress(OSError):
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    return "lo"


_STORE_ARGS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers",
               "multi_tenant", "master_listen_fd", "use_libuv")


def bind_stores(address: str) -> None:
    """Every TCPStore server this process creates from now on listens on `address` only."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import (
        c10d_rendezvous_backend,
        static_tcp_rendezvous,
    )

    base: Any = dist.TCPStore
    if getattr(base, "bound_to", None) is not None:
        return

    class BoundTCPStore(base):  # type: ignore[misc, valid-type]
        bound_to = address

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(zip(_STORE_ARGS, args, strict=False))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                port = int(kwargs.get("port") or 0)
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((address, port))
                    sock.listen(socket.SOMAXCONN)
                except OSError as e:  # RuntimeError: what torch's launchers retry or report
                    sock.close()
                    raise RuntimeError(f"cannot listen on {host_port(address, port)}: {e}") from e
                kwargs["port"] = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.detach()  # the store owns it now
            super().__init__(**kwargs)

    for module in (dist, c10d_rendezvous_backend, static_tcp_rendezvous):
        module.TCPStore = BoundTCPStore  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.exit("usage: python -m flows.loopback ADDRESS MODULE [ARGS...]")
    address, module, rest = args[0], args[1], args[2:]
    if is_loopback(address):
        iface = loopback_interface()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    if not is_wildcard(address):
        bind_stores(address)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
