"""Running the app: the bind-safety rule and uvicorn.

The server binds 127.0.0.1 unless told otherwise. Listening on any other address without an
API key would hand the model (and the machine's CPU) to the whole network, so it is refused
unless the operator says so explicitly with ``allow_insecure_no_key``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from local_llm_kit.client import AsyncLLMClient
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.server.app import create_app
from local_llm_kit.server.limits import ServerLimits

__all__ = ["check_bind", "is_loopback", "serve"]

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name or address is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name might resolve anywhere: treat it as public


def check_bind(host: str, api_key: str | None, allow_insecure_no_key: bool = False) -> None:
    """Refuse to listen beyond this machine without a key, unless explicitly allowed."""
    if not api_key and not is_loopback(host) and not allow_insecure_no_key:
        raise InvalidRequestError(
            f"refusing to listen on {host} without an API key: anyone who can reach it could use the "
            "model. Pass --api-key (or set LOCAL_LLM_KIT_API_KEY), bind 127.0.0.1, or pass "
            "--allow-insecure-no-key if that is really what you want", param="host")
    if not api_key and not is_loopback(host):
        logger.warning("listening on %s WITHOUT an API key (--allow-insecure-no-key)", host)


def serve(models: AsyncLLMClient | Sequence[AsyncLLMClient], *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, allow_insecure_no_key: bool = False, limits: ServerLimits | None = None,
          log_level: str = "info") -> None:
    """Serve ``models`` until interrupted (blocking). Load them first to fail before listening."""
    import uvicorn

    check_bind(host, api_key, allow_insecure_no_key)
    app = create_app(models, api_key=api_key, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
