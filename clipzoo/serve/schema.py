"""The OpenAPI 3.1 document of the service, written by hand (served at ``GET /openapi.json``)."""

from __future__ import annotations

from clipzoo import __version__

_ERROR = {"description": "Refused, with a one-line reason",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_OPTIONS = {
    "top_k": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1,
              "description": "routing weights reported per image (avg and fusion need 2 or more)"},
    "mode": {"type": "string", "enum": ["top1", "avg", "fusion"], "default": "top1"},
    "fallback": {"type": "boolean", "default": True,
                 "description": "answer images of no known task with zero-shot CLIP"},
    "classes": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                "description": "class names for the zero-shot fallback (list, or comma-separated)"},
    "task": {"type": "string", "description": "use this expert for every image (no routing)"},
}

PREDICTION = {
    "type": "object",
    "description": "One image's answer, as `clipzoo predict --json` gives it",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "description": "the uploaded file name, or `<image i>`"},
        "task": {"type": ["string", "null"], "description": "the expert that answered (null: zero-shot fallback)"},
        "label": {"type": "string"}, "score": {"type": "number"},
        "routing": {"type": "object", "additionalProperties": {"type": "number"}},
        "fallback": {"type": "boolean"}, "ood_score": {"type": "number"},
        "fusion": {"type": "object", "additionalProperties": {"type": "number"}},
        "sources": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}


def openapi() -> dict:
    """The service's OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "clipzoo serve", "version": __version__,
                 "description": "Routed predictions from a zoo of per-task experts on a frozen CLIP."},
        "paths": {
            "/predict": {"post": {
                "summary": "Predict labels for images, each routed to its task",
                "parameters": [{"name": k, "in": "query", "required": False, "schema": v}
                               for k, v in _OPTIONS.items()],
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
                        "names": {"type": "array", "items": {"type": "string"}}, **_OPTIONS}}},
                    "image/*": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "200": {"description": "One answer per image, all from one registry version",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}},
                    "400": _ERROR, "413": _ERROR, "415": _ERROR, "503": _ERROR}}},
            "/health": {"get": {"summary": "Liveness and queue state", "responses": {
                "200": {"description": "serving"}, "503": {"description": "the batch worker is down"}}}},
            "/version": {"get": {"summary": "The zoo version being served and its experts", "responses": {
                "200": {"description": "zoo_version, experts, router, backbone, reloads"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        },
        "components": {"schemas": {
            "Prediction": PREDICTION,
            "Answer": {"type": "object", "required": ["zoo_version", "predictions"], "properties": {
                "zoo_version": {"type": "integer", "description": "the registry (router) version that answered"},
                "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        }},
    }
