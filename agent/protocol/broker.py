"""Where the broker is and how to talk TLS to it: the one parser and TLS setup for agent, CLI and console.

Before this module the agent and the console each parsed broker URLs and built TLS contexts, and
their rules drifted (one accepted port 0). Both now call these functions: `parse_broker_url`,
`tls_context`, and `client_tls` / `credentials` for a client with a URL plus settings (CA, client
certificate and key, user name and password). `redact_url` is how a URL is shown: never with its
password, in a log line, an error message or a status.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

SCHEMES_PLAIN = ("mqtt", "tcp")
SCHEMES_TLS = ("mqtts", "ssl")


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the message names the URL and what is wrong."""


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed `mqtt://` / `mqtts://` URL. The scheme decides TLS."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


# `scheme://userinfo@` anywhere in a text, or `userinfo@` at its start (a URL given without a scheme).
# The user info runs to the last "@" before a space: an unquoted "/" or ":" in a password stays in it.
_USERINFO = re.compile(r"(?P<start>\b[A-Za-z][A-Za-z0-9+.-]*://|^)(?P<userinfo>[^\s@]*)@")


def redact_url(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (the user name stays: it says
    which account was used). For URLs and for messages that may quote one."""

    def hide(match: re.Match[str]) -> str:
        user, colon, _password = match["userinfo"].partition(":")
        return f"{match['start']}{user}{':***' if colon else ''}@"

    return _USERINFO.sub(hide, text)


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pw@]host[:port]`, `mqtts://...` or `host[:port]` -> where to connect.

    Default ports 1883 (plain) and 8883 (TLS); port 0 and out-of-range ports are errors. Error
    messages show the URL without its password.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        parts.hostname  # noqa: B018 (parses the netloc: raises on a malformed IPv6 literal)
    except ValueError as exc:
        raise BrokerUrlError(f"broker {shown!r}: {exc}") from exc
    if parts.scheme not in SCHEMES_PLAIN + SCHEMES_TLS:
        raise BrokerUrlError(f"broker {shown!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise BrokerUrlError(f"broker {shown!r}: no host")
    tls = parts.scheme in SCHEMES_TLS
    try:
        port = parts.port if parts.port is not None else (8883 if tls else 1883)
    except ValueError as exc:
        raise BrokerUrlError(f"broker {shown!r}: {exc}") from exc
    if port == 0:
        raise BrokerUrlError(f"broker {shown!r}: port 0 is not a port")
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def tls_context(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A client TLS context: the CA file (else the system store), an optional client certificate.

    Reads certificate files, so callers on an event loop run it in a thread. `insecure` skips the
    hostname check only (self-signed lab brokers); the chain is still verified.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if insecure:
        ctx.check_hostname = False
    return ctx


def client_tls(
    address: BrokerAddress,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    insecure: bool = False,
) -> ssl.SSLContext | None:
    """The TLS context for `address`: None for `mqtt://`; else `tls_context` with these files.

    A client certificate or key for a plain URL is an error rather than silently unused (the broker
    would then see neither TLS nor the certificate). Reads files: run it off the event loop.
    """
    if not address.tls:
        if cert_file or key_file:
            raise BrokerUrlError(
                f"a client certificate/key is set but the broker {address.host}:{address.port} is"
                " plain mqtt://: use mqtts:// (TLS) for mutual TLS"
            )
        return None
    if key_file and not cert_file:
        raise BrokerUrlError("a client key without a client certificate: set the certificate too")
    try:
        return tls_context(ca_file, cert_file, key_file, insecure)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUrlError(
            f"TLS files (CA {ca_file}, certificate {cert_file}, key {key_file}): {exc}"
        ) from exc


def credentials(
    address: BrokerAddress, username: str | None = None, password: str | None = None
) -> tuple[str | None, str | None]:
    """User name and password: those in the URL win over the settings'."""
    if address.username:
        return address.username, address.password
    return username, password


MQTT_VERSIONS = ("auto", "5", "3.1.1")


def refuses_mqtt5(exc: BaseException) -> bool:
    """A CONNACK that says the broker does not speak MQTT 5: return code 1 (an MQTT 3.1.1 broker's
    "unacceptable protocol version") or reason 0x84 (MQTT 5's "unsupported protocol version").
    Some 3.1.1 brokers never answer an MQTT 5 CONNECT instead: callers treat repeated connect
    timeouts the same way."""
    rc = getattr(exc, "rc", None)
    return getattr(rc, "value", rc) in (1, 0x84) or "protocol version" in str(exc).lower()


async def tcp_reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the broker opens. A CONNECT that timed out counts as "this broker
    does not answer MQTT 5" only when the broker is reachable at all: a host that is down, or a
    network not up yet at boot, must not switch a device to MQTT 3.1.1."""
    import asyncio

    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
