from django.apps import AppConfig


class AgentSessionsConfig(AppConfig):
    # `sessions` is django.contrib.sessions' label.
    name = "sessions"
    label = "agent_sessions"
    verbose_name = "agent sessions"
