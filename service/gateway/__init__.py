"""The PreSafe gateway: an OpenAI-compatible FastAPI proxy in front of vLLM with decision analysis."""

from service.gateway.app import Gateway, create_gateway_app

__all__ = ["Gateway", "create_gateway_app"]
