"""Bearer-token check for the OpenAI-compatible routes (enabled by WHISPER_API_KEY)."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.api.errors import AuthenticationError
from app.config import Settings


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer <WHISPER_API_KEY>` is sent."""
    settings: Settings = request.app.state.settings
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    # Constant-time comparison so response timing does not leak how much of the key matched.
    if not hmac.compare_digest(
        token.strip().encode(), settings.api_key.get_secret_value().encode()
    ):
        raise AuthenticationError("Incorrect API key provided.")
