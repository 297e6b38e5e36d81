"""Health and backend views."""

from __future__ import annotations

from django.http import JsonResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from agentrun.backends import backend_list
from agentrun.health import store_health


class HealthView(APIView):
    authentication_classes = []
    permission_classes = []

    @extend_schema(
        responses=inline_serializer(
            "StoreHealth",
            {
                "adapter": serializers.CharField(),
                "ready": serializers.BooleanField(),
                "reachable": serializers.BooleanField(),
                "migrationReady": serializers.BooleanField(),
                "migrationId": serializers.CharField(allow_null=True),
                "failureKind": serializers.CharField(allow_null=True),
                "message": serializers.CharField(allow_null=True),
                "credentialValuesPrinted": serializers.BooleanField(),
            },
        )
    )
    def get(self, request):
        record, code = store_health()
        return Response(record, status=code)


class BackendsView(APIView):
    roles = {"get": {"client", "runner"}}

    @extend_schema(
        responses=inline_serializer(
            "BackendList", {"items": serializers.ListField(child=serializers.DictField()), "count": serializers.IntegerField()}
        )
    )
    def get(self, request):
        items = backend_list()
        return Response({"items": items, "count": len(items)})


def livez(request):
    return JsonResponse({"status": "ok"})


def readyz(request):
    record, code = store_health()
    return JsonResponse({"status": "ready" if record["ready"] else "not-ready", "message": record["message"]}, status=code)
