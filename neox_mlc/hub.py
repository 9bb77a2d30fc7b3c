"""Hugging Face hub calls with timeouts and bounded retries, failing with one line.

Why a module of its own: only the fetch step talks to the hub, so only its environment needs
huggingface_hub and its HTTP client (httpx2); every other step imports ``common`` without them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx2  # huggingface_hub's HTTP client: its errors are what a silent or unreachable hub raises
from huggingface_hub import constants, set_client_factory
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils._http import default_client_factory

from neox_mlc.common import WorkflowError

HUB_ATTEMPTS = 3  # tries per hub call; with the default 10 s timeout a silent hub fails in ~33 s


def configure_hub() -> float:
    """Give every huggingface_hub request a connect and read timeout; return it in seconds.

    Why: huggingface_hub's shared HTTP client has no timeout of its own (only file downloads use
    ``HF_HUB_DOWNLOAD_TIMEOUT``), so a hub that accepts the connection and never answers hangs the
    fetch forever. The timeout is huggingface_hub's own setting ``HF_HUB_ETAG_TIMEOUT`` (default 10 s).
    """
    seconds = float(constants.HF_HUB_ETAG_TIMEOUT)

    def client() -> Any:
        made = default_client_factory()
        made.timeout = seconds
        return made

    set_client_factory(client)
    return seconds


def hub_call(call: Callable[[], Any], what: str, timeout_s: float, attempts: int = HUB_ATTEMPTS) -> Any:
    """Run one hub request with bounded retries; a network failure becomes one line naming the hub.

    Why: a transient network error deserves a retry, a dead or silent hub a prompt, clear stop.
    """
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (HfHubHTTPError, OfflineModeIsEnabled) as err:  # an answer, not silence: no retry
            raise WorkflowError(f"{what}: {str(err).splitlines()[0]}") from None
        except (httpx2.TransportError, OSError) as err:
            last = err
            if attempt < attempts:
                time.sleep(attempt)
    detail = str(last).splitlines()[0] if last is not None and str(last) else type(last).__name__
    raise WorkflowError(
        f"{what}: the Hugging Face hub at {constants.ENDPOINT} could not be reached or did not answer "
        f"({type(last).__name__}: {detail}) in {attempts} attempts with a {timeout_s:g} s timeout (HF_HUB_ETAG_TIMEOUT); check the network or HF_ENDPOINT"
    )
