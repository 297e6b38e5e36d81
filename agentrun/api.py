"""Health and backend views."""

from __future__ import annotations

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from agentrun.auth import Role
from agentrun.backends import PROFILES, backend_list
from agentrun.health import store_health


class StoreHealthOut(serializers.Serializer):
    """SPEC §1.8 StoreHealth; `details` when no database is configured."""

    adapter = serializers.CharField(max_length=32)
    ready = serializers.BooleanField()
    reachable = serializers.BooleanField()
    migrationReady = serializers.BooleanField()
    migrationId = serializers.CharField(allow_null=True, max_length=400)
    failureKind = serializers.ChoiceField(choices=["infra-failed"], allow_null=True)
    message = serializers.CharField(allow_null=True, max_length=200)
    credentialValuesPrinted = serializers.BooleanField()
    details = serializers.DictField(required=False)


class CapabilitiesOut(serializers.Serializer):
    steer = serializers.BooleanField()
    threads = serializers.BooleanField()
    resume = serializers.BooleanField()
    diffs = serializers.BooleanField()
    sandbox = serializers.BooleanField()


class BackendOut(serializers.Serializer):
    profile = serializers.ChoiceField(choices=list(PROFILES))
    capabilities = CapabilitiesOut()


class BackendListOut(serializers.Serializer):
    items = BackendOut(many=True)
    count = serializers.IntegerField(min_value=0)


class HealthView(APIView):
    authentication_classes = []
    permission_classes = []

    @extend_schema(
        responses={
            200: StoreHealthOut,
            503: OpenApiResponse(
                StoreHealthOut, description="Not ready: the record says why (`failureKind` infra-failed)."
            ),
        }
    )
    def get(self, request):
        record, code = store_health()
        return Response(record, status=code)


class BackendsView(APIView):
    roles = {"get": {Role.CLIENT, Role.RUNNER}}

    @extend_schema(responses=BackendListOut)
    def get(self, request):
        items = backend_list()
        return Response({"items": items, "count": len(items)})


# Probes answer GET and HEAD; any other method is 405 (no CSRF check: they change nothing).
@csrf_exempt
@require_safe
def livez(request):
    return JsonResponse({"status": "ok"})


@csrf_exempt
@require_safe
def readyz(request):
    record, code = store_health()
    return JsonResponse(
        {"status": "ready" if record["ready"] else "not-ready", "message": record["message"]}, status=code
    )
