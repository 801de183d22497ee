"""An OpenAI-compatible HTTP server over local models (``local-llm-kit serve``; extra ``server``).

>>> from local_llm_kit import AsyncLLMClient
>>> from local_llm_kit.server import create_app
>>> app = create_app(AsyncLLMClient("smollm2-135m-instruct"), api_key="secret")   # any ASGI server

Any OpenAI client can then use the model: ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1",
api_key="secret")``.
"""

from __future__ import annotations

from local_llm_kit.server.app import create_app
from local_llm_kit.server.limits import ServerLimits
from local_llm_kit.server.run import check_bind, is_loopback, serve

__all__ = ["ServerLimits", "check_bind", "create_app", "is_loopback", "serve"]
