from django.apps import AppConfig


class AgentrunConfig(AppConfig):
    name = "agentrun"
    verbose_name = "agentrun"

    def ready(self):
        from agentrun import openapi  # noqa: F401 - registers the OpenAPI auth extension
