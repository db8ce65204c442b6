"""Field types of Roost's configuration: each value's check, declared once.

Role: every scalar a configuration file can hold (durations, sizes, names,
paths, URLs, ...) as an ``Annotated`` type whose ``BeforeValidator`` takes the raw
value and returns it validated, or raises ``ValueError`` with the text shown
after ``file: key: `` in a :class:`roost.errors.ConfigError`.

Invariants:
- Checks never echo environment values (they may be secrets): ``env`` errors name
  the variable, never its value.
- Every check accepts its own output, so a stored spec (JSON of validated
  values) validates again to the same thing.
- Durations are float seconds, never negative: a number, or a string such as
  ``"90s"``, ``"5m"``, ``"1h30m"``, ``"250ms"`` or ``"2"``. Sizes are int bytes in
  binary units (``"256m"`` = 256 MiB, as Docker reads them).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import BeforeValidator

from roost.config.sources import split_listen
from roost.core import routing

__all__ = [
    "DOCKER_MIN_MEMORY",
    "AbsolutePath",
    "AgentListen",
    "AgentName",
    "AtLeastOne",
    "Backend",
    "Command",
    "Count",
    "Cpus",
    "Delivery",
    "DockerName",
    "Env",
    "EnvNames",
    "EventPatterns",
    "Flag",
    "HostPort",
    "HttpUrl",
    "IdleAction",
    "Image",
    "IpAddress",
    "IpAddressOrEmpty",
    "Listen",
    "LogLevel",
    "MemorySize",
    "NodeHosts",
    "OptionalUrlPath",
    "Placement",
    "Port",
    "PositiveSeconds",
    "PositiveSize",
    "RequiredImage",
    "Seconds",
    "Size",
    "Strings",
    "Text",
    "UrlPath",
    "parse_capabilities",
    "parse_duration",
    "parse_size",
    "split_listen",
    "validate_agent_name",
]

#: Docker refuses memory limits below 6 MiB ("Minimum memory limit allowed is 6MB").
DOCKER_MIN_MEMORY = 6 * 1024 * 1024

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_NAME = re.compile(r"^[^=\x00]+$")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_DOCKER_OBJECT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_CAPABILITY = re.compile(r"^[^,\s]+$")
#: A Swarm placement constraint: an attribute Swarm knows, ``==`` or ``!=``, a value.
_CONSTRAINT = re.compile(
    r"^(node\.(id|hostname|role|platform\.os|platform\.arch)"
    r"|(node|engine)\.labels\.[A-Za-z0-9_.\-]+)\s*(==|!=)\s*\S+$"
)
_BACKENDS = ("engine", "swarm")

Check = Callable[[object], Any]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: object) -> float:
    """Float seconds from a number or a string like ``"90s"``, ``"5m"``, ``"1h30m"``,
    ``"250ms"``, ``"2d"`` or ``"30"``. Raises ValueError on anything else."""
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            return float(text)
        except ValueError:
            pass
        if text and _DURATION_PART.sub("", text) == "":
            return sum(
                float(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_PART.findall(text)
            )
    raise ValueError(
        f"must be a number of seconds or a duration like '90s', '5m', '1h30m', got {value!r}"
    )


def _seconds(value: object, *, positive: bool) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    seconds = parse_duration(value)
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if positive and seconds == 0:
        raise ValueError(f"must be > 0 seconds, got {value!r}")
    return seconds


def _int_between(minimum: int, maximum: int | None = None) -> Check:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}, got {value}")
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _idle_action(value: object) -> str:
    if value not in ("pause", "stop"):
        raise ValueError(f"must be 'pause' or 'stop', got {value!r}")
    return str(value)


def parse_size(value: object) -> int:
    """Bytes from ``1024``, ``"1024"``, ``"512k"``, ``"256m"``, ``"1g"``, ``"1.5g"``.

    Units are binary (``m`` = MiB), as Docker reads them; ``b``/``ib`` suffixes
    and upper case are accepted. Raises ValueError on anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value.strip())
        if match:
            number, unit = match.groups()
            return int(float(number) * _SIZE_UNITS[unit.lower()])
    raise ValueError(f"invalid size {value!r} (use e.g. 256m, 1g)")


def _memory(value: object) -> int:
    size = parse_size(value)
    if 0 < size < DOCKER_MIN_MEMORY:
        raise ValueError(f"{value!r} is below Docker's minimum of 6m (use 0 for no limit)")
    return size


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return size


def _cpus(value: object) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"must be a number of CPUs (e.g. 0.5), got {value!r}")
    cpus = float(value)
    if cpus != 0 and cpus < 0.01:
        # Docker's range is 0.01 .. host CPUs; the upper bound is the host's business.
        raise ValueError(f"must be >= 0.01 (or 0 for no limit), got {value!r}")
    return cpus or None  # 0 is the explicit spelling of "no limit"


def _url_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be a path starting with '/', got {value!r}")
    return value


def _optional_url_path(value: object) -> str:
    return "" if value == "" else _url_path(value)


_DELIVERY_MODES = ("push", "pull", "websocket")


def _delivery(value: object) -> str:
    if value not in _DELIVERY_MODES:
        raise ValueError(f"must be one of {', '.join(map(repr, _DELIVERY_MODES))}; got {value!r}")
    return str(value)


def _event_patterns(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = _strings(value)
    for pattern in patterns:
        routing.check_pattern(pattern)
    return patterns


def _placement(value: object) -> tuple[str, ...]:
    constraints = _strings(value)
    for constraint in constraints:
        if not _CONSTRAINT.match(constraint.strip()):
            raise ValueError(
                f"invalid placement constraint {constraint!r}: use e.g. "
                "'node.labels.gpu==true', 'node.role!=manager' or 'node.id==ID' "
                "(node.id, node.hostname, node.role, node.platform.os|arch, "
                "node.labels.NAME, engine.labels.NAME; == or !=)"
            )
    return tuple(c.strip() for c in constraints)


def _backend(value: object) -> str:
    if value not in _BACKENDS:
        raise ValueError(f"must be one of {', '.join(map(repr, _BACKENDS))}; got {value!r}")
    return str(value)


def _node_hosts(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(
            'must be a table of NODE = "docker address", e.g. '
            '{ "10.0.0.2" = "tcp://10.0.0.2:2376" }'
        )
    hosts: dict[str, str] = {}
    for node, address in value.items():
        if not isinstance(node, str) or not node:
            raise ValueError(f"invalid node {node!r}: a node id or address")
        if not isinstance(address, str) or not re.match(
            r"^(unix|tcp|http|https|ssh)://\S+$", address
        ):
            raise ValueError(
                f"node {node!r}: must be a Docker address such as 'tcp://10.0.0.2:2376' "
                f"or 'unix:///path/docker.sock', got {address!r}"
            )
        hosts[node] = address
    return hosts


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _http_url(value: object) -> str:
    text = _text(value)
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return text.rstrip("/")


def _image(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an image reference, e.g. 'roost-mimic:latest'")
    return value.strip()


def _required_image(value: object) -> str:
    image = _image(value)
    if not image:
        raise ValueError("must be a non-empty image reference, e.g. 'roost-mimic:latest'")
    return image


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _env(value: object) -> object:
    # Values may be secrets: messages name the variable, never the value. Value
    # types are checked by the field's dict[str, str], so errors name env.NAME.
    if not isinstance(value, Mapping):
        raise ValueError('must be a table of NAME = "value"')
    for name in value:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"invalid variable name {name!r}")
    return dict(value)


def _command(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(arg, str) for arg in value):
        raise ValueError('must be a list of strings, e.g. ["python", "-m", "agent"]')
    return tuple(value)


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}; got {value!r}")
    return value.lower()


def _agent_listen(value: object) -> str:
    """``host:port`` where the host may be empty (the agents' network gateway) and
    the port 0 (any free port)."""
    if not isinstance(value, str):
        raise ValueError(f"must be 'host:port' (host may be empty), got {value!r}")
    split_listen(value, any_port=True)
    return value.strip()


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be 'host:port', got {value!r}")
    split_listen(value)
    return value.strip()


def _ip_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be an IP address, got {value!r}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address (e.g. 127.0.0.1), got {value!r}") from None
    return value


def _ip_address_or_empty(value: object) -> str:
    if value == "":
        return ""
    return _ip_address(value)


def _docker_object_name(value: object) -> str:
    """A network or volume name as Docker accepts it, or '' (none)."""
    text = _text(value).strip()
    if text and not _DOCKER_OBJECT_NAME.match(text):
        raise ValueError(
            f"invalid Docker name {value!r}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return text


def _absolute_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or ":" in value:
        raise ValueError(f"must be an absolute path without ':', got {value!r}")
    return value


def _env_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list of variable names, e.g. ["OPENAI_API_KEY"]')
    for name in value:
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid variable name {name!r}")
    return tuple(value)


def parse_capabilities(value: object) -> tuple[str, ...]:
    """Capabilities from ``"a, b"`` or ``["a", "b"]``: stripped, empty ones dropped,
    duplicates removed (first kept). Raises ValueError on anything else; a
    capability may not contain a comma or whitespace (they are passed on joined
    by commas)."""
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"capabilities must be 'a,b' or a list of strings, got {value!r}")
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"every capability must be a string, got {item!r}")
        capability = item.strip()
        if not capability:
            continue
        if not _CAPABILITY.match(capability):
            raise ValueError(f"invalid capability {capability!r}: no commas or whitespace")
        if capability not in found:
            found.append(capability)
    return tuple(found)


_LINUX_CAPABILITY = re.compile(r"^(?:CAP_)?([A-Z_]+)$")


def parse_capabilities_list(value: object) -> tuple[str, ...]:
    """Linux capability names (``NET_ADMIN``, ``cap_chown``, or ``ALL``), upper case,
    without the ``CAP_`` prefix."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list of capability names, e.g. ["NET_BIND_SERVICE"]')
    names = []
    for item in value:
        match = _LINUX_CAPABILITY.match(item.strip().upper())
        if not match:
            raise ValueError(f"invalid capability {item!r}")
        names.append(match.group(1))
    return tuple(dict.fromkeys(names))


def validate_agent_name(name: object) -> str:
    """A DNS label: 1–63 of a-z, 0-9 and '-', not starting or ending with '-'."""
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return name


Seconds = Annotated[float, BeforeValidator(lambda v: _seconds(v, positive=False))]
PositiveSeconds = Annotated[float, BeforeValidator(lambda v: _seconds(v, positive=True))]
Count = Annotated[int, BeforeValidator(_int_between(0))]
AtLeastOne = Annotated[int, BeforeValidator(_int_between(1))]
Port = Annotated[int, BeforeValidator(_int_between(1, 65535))]
#: A host port to publish on; 0 means "any free port" (Docker picks one).
HostPort = Annotated[int, BeforeValidator(_int_between(0, 65535))]
Flag = Annotated[bool, BeforeValidator(_boolean)]
IdleAction = Annotated[Literal["pause", "stop"], BeforeValidator(_idle_action)]
Size = Annotated[int, BeforeValidator(parse_size)]
PositiveSize = Annotated[int, BeforeValidator(_positive_size)]
MemorySize = Annotated[int, BeforeValidator(_memory)]
Cpus = Annotated[float | None, BeforeValidator(_cpus)]
UrlPath = Annotated[str, BeforeValidator(_url_path)]
Text = Annotated[str, BeforeValidator(_text)]
HttpUrl = Annotated[str, BeforeValidator(_http_url)]
#: An agent's image: may be empty in a table (then [defaults] must name one).
Image = Annotated[str, BeforeValidator(_image)]
RequiredImage = Annotated[str, BeforeValidator(_required_image)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_strings)]
Env = Annotated[dict[str, str], BeforeValidator(_env)]
EnvNames = Annotated[tuple[str, ...], BeforeValidator(_env_names)]
Command = Annotated[tuple[str, ...] | None, BeforeValidator(_command)]
LogLevel = Annotated[str, BeforeValidator(_log_level)]
Listen = Annotated[str, BeforeValidator(_listen)]
AgentListen = Annotated[str, BeforeValidator(_agent_listen)]
Delivery = Annotated[Literal["push", "pull", "websocket"], BeforeValidator(_delivery)]
EventPatterns = Annotated[tuple[str, ...] | None, BeforeValidator(_event_patterns)]
OptionalUrlPath = Annotated[str, BeforeValidator(_optional_url_path)]
IpAddress = Annotated[str, BeforeValidator(_ip_address)]
IpAddressOrEmpty = Annotated[str, BeforeValidator(_ip_address_or_empty)]
DockerName = Annotated[str, BeforeValidator(_docker_object_name)]
AbsolutePath = Annotated[str, BeforeValidator(_absolute_path)]
AgentName = Annotated[str, BeforeValidator(validate_agent_name)]
#: Swarm placement constraints (``docker.backend = "swarm"`` only).
Placement = Annotated[tuple[str, ...], BeforeValidator(_placement)]
Backend = Annotated[Literal["engine", "swarm"], BeforeValidator(_backend)]
#: The Docker API address of each Swarm node, keyed by node id or address.
NodeHosts = Annotated[dict[str, str], BeforeValidator(_node_hosts)]
