"""OpenAPI details drf-spectacular cannot guess: the bearer key scheme and canonical paths."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "agentrun.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An agentrun API key: `Authorization: Bearer ar_…`"}


def canonical_paths(endpoints, **kwargs):
    """Routes answer with or without a trailing slash; document them without it, as clients call them."""
    return [(path.rstrip("/") if path != "/" else path, regex, method, view) for path, regex, method, view in endpoints]
