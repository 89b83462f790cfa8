"""Request-field rules that the HTTP routes (``cosyjax.server``) and the gRPC service
(``cosyjax.serving.grpc_service``) share; each protocol turns the ``ValueError`` into its own refusal
(a 400, ``INVALID_ARGUMENT``)."""

from __future__ import annotations

DEFAULT_MAX_TEXT_CHARS = 2000  # per text field of one request; longer text is split over requests


def check_text_length(name: str, value: str, max_chars: int) -> str:
    """``value`` if it has at most ``max_chars`` characters, else ValueError naming the field ``name``."""
    if len(value) > max_chars:
        raise ValueError(f"{name} has {len(value)} characters; this server accepts at most {max_chars} per request "
                         "(split the text over several requests)")
    return value


__all__ = ["DEFAULT_MAX_TEXT_CHARS", "check_text_length"]
