"""No request to the Hub waits forever: a bound on every request huggingface_hub's shared client sends (fp8q's own
range requests, downloads, whoami, repo info, trees, preuploads, LFS uploads, commits), and the words for a Hub
that did not answer within it, and for a disk that filled while a file downloaded.

Imports: errors, httpx, huggingface_hub. huggingface_hub's client has no timeout of its own (`timeout=None`), and
many of its calls pass `timeout=None` explicitly, which overrides a client default: so the bound is set on each
request as it leaves (a request hook), replacing only what is unbounded (a finite timeout a call chose stays). It
bounds connecting and each wait for bytes, not a whole transfer: a slow link that keeps sending never times out.
The client's own retries still apply (downloads and uploads retry a timed-out request up to 5 times). hf_xet's client
(Xet uploads) gets the same bound through its environment (HF_XET_CLIENT_CONNECT_TIMEOUT, HF_XET_CLIENT_READ_TIMEOUT,
and its retries at most 6 bounds in all), unless the user set those.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import httpx
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    get_session,
)

from fp8q.errors import UsageError

TIMEOUT_ENV = "FP8Q_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
XET_TRIES = 6
# What talking to the Hub raises: HTTP and connection errors (httpx's are not OSErrors), Hub errors, cache errors.
NETWORK_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, OSError)
HUB_ERRORS: tuple[type[Exception], ...] = (*NETWORK_ERRORS, ValueError)
OFFLINE_FIX = "download it first or unset HF_HUB_OFFLINE"


def hub_timeout() -> float:
    """Seconds a request to the Hub may wait to connect, or for its next bytes ($FP8Q_HUB_TIMEOUT, default 60).

    Raises:
        UsageError: the variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: give the seconds a Hub request may wait, a positive number")
    return value


def _bounded(request: httpx.Request) -> None:
    limit = hub_timeout()
    chosen = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        key: limit if chosen.get(key) is None else chosen[key] for key in ("connect", "read", "write", "pool")
    }


def bound_requests() -> None:
    """Bound every request of huggingface_hub's shared client from now on (idempotent; checks FP8Q_HUB_TIMEOUT).

    Raises:
        UsageError: FP8Q_HUB_TIMEOUT is not a positive number.
    """
    limit = hub_timeout()
    # hf_xet (the Xet uploads, and the write tokens it asks for itself) has an HTTP client of its own, read from the
    # environment when its first session starts: the same bound, unless the user set hf_xet's own.
    for name, seconds in (
        ("HF_XET_CLIENT_CONNECT_TIMEOUT", limit),
        ("HF_XET_CLIENT_READ_TIMEOUT", limit),
        ("HF_XET_CLIENT_RETRY_MAX_DURATION", XET_TRIES * limit),  # its retries, as huggingface_hub's: 6 tries
    ):
        os.environ.setdefault(name, f"{seconds:g}s")
    session = get_session()
    hooks = session.event_hooks
    if _bounded not in hooks["request"]:
        session.event_hooks = {**hooks, "request": [*hooks["request"], _bounded]}


def no_answer(error: BaseException) -> str | None:
    """'no answer from GET https://.../api/whoami-v2 within 60 s ...' when a timeout ended `error` (anywhere in its
    chain: huggingface_hub wraps some), else None."""
    seen = _in_chain(error, lambda e: isinstance(e, httpx.TimeoutException))
    if not isinstance(seen, httpx.TimeoutException):
        return None
    try:
        request = seen.request
        where = f"{request.method} {request.url.copy_with(query=None)}"
    except RuntimeError:  # a timeout raised without its request
        where = "the Hub"
    return (
        f"no answer from {where} within {hub_timeout():g} s ({type(seen).__name__}): the Hub or a proxy on the way "
        f"is stalled; try again later, or raise {TIMEOUT_ENV}"
    )


def disk_full(error: BaseException) -> str | None:
    """'the disk is full ...' when a full disk (ENOSPC, anywhere in the chain) ended a download, else None."""
    seen = _in_chain(error, lambda e: isinstance(e, OSError) and e.errno == errno.ENOSPC)
    if not isinstance(seen, OSError):
        return None
    where = f" at {seen.filename}" if seen.filename else ""
    return f"the disk is full{where}: free some space there, then run again"


def _in_chain(error: BaseException, matches: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in `error`'s chain (itself, then what caused it) that `matches`, or None."""
    seen: BaseException | None = error
    while seen is not None and not matches(seen):
        seen = seen.__cause__ or seen.__context__
    return seen


def explain(error: Exception) -> str:
    """What went wrong and what to do, in one line, for an exception out of snapshot_download."""
    silent = no_answer(error)
    if silent is not None:
        return silent
    full = disk_full(error)
    if full is not None:
        return full
    if isinstance(error, GatedRepoError):
        return "the repo is gated; accept its terms on huggingface.co, then log in (`hf auth login` or HF_TOKEN)"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repo on the Hub, or it is private; check the id, or log in (`hf auth login` or HF_TOKEN)"
    if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
        return "no such file in the repo at that revision (its index lists it): the repo is incomplete; try again later"
    if isinstance(error, RevisionNotFoundError):
        return "the repo has no such revision; give an existing branch, tag or commit hash"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return f"access denied (HTTP {status}); log in (`hf auth login` or HF_TOKEN) with a token that can read it"
        return f"the Hub answered HTTP {status}: {first_line(error)}; try again later"
    if isinstance(error, OfflineModeIsEnabled):
        return f"not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; {OFFLINE_FIX}"
    if isinstance(error, (LocalEntryNotFoundError, *NETWORK_ERRORS)):
        cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ else error
        return (
            f"cannot download it ({type(cause).__name__}: {first_line(cause)}) and it is not in the local "
            "Hugging Face cache; check the network (or HF_ENDPOINT, proxy), or download it first"
        )
    return f"{type(error).__name__}: {first_line(error)}"


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no details"


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HUB_ERRORS",
    "NETWORK_ERRORS",
    "OFFLINE_FIX",
    "TIMEOUT_ENV",
    "bound_requests",
    "disk_full",
    "explain",
    "first_line",
    "hub_timeout",
    "no_answer",
]
