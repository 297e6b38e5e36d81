"""The top of the house: every app's routes under /api/v1/, the probes and the admin. It sits
above every app (settings/ may import them all; no app imports settings/)."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from agentrun.api import BackendsView, HealthView, livez, readyz
from queues.api import QueueTaskViewSet, QueueViewSet
from queues.metrics import metrics_view
from runs.api import CommandViewSet, RunnerViewSet, RunViewSet, SessionEventViewSet
from sessions.api import SessionViewSet

router = SimpleRouter()
# Routes answer with or without a trailing slash.
router.trailing_slash = "/?"
router.register("runs", RunViewSet, basename="run")
router.register("commands", CommandViewSet, basename="command")
router.register("runners", RunnerViewSet, basename="runner")
router.register("sessions", SessionViewSet, basename="session")
router.register("sessions", SessionEventViewSet, basename="session-events")
router.register("queue-tasks", QueueTaskViewSet, basename="queue-task")
router.register("queues", QueueViewSet, basename="queue")

api_v1 = [
    path("health", HealthView.as_view(), name="health"),
    path("backends", BackendsView.as_view(), name="backends"),
    path("schema/", SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]), name="schema"),
    path(
        "docs/",
        SpectacularSwaggerView.as_view(url_name="schema", authentication_classes=[], permission_classes=[]),
        name="docs",
    ),
    *router.urls,
]

urlpatterns = [
    path("api/v1/", include(api_v1)),
    path("livez", livez),
    path("readyz", readyz),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
]

handler400 = "agentrun.errors.handler400"
handler403 = "agentrun.errors.handler403"
handler404 = "agentrun.errors.handler404"
handler500 = "agentrun.errors.handler500"
