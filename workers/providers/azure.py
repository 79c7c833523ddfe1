"""Azure OpenAI: OpenAI's wire format at deployment URLs, keyed with an ``api-key`` header.

The target's model is the deployment name: ``azure/my-gpt4o`` calls
``<base_url>/openai/deployments/my-gpt4o/chat/completions?api-version=<version>``, where the
base URL is the resource (``https://<resource>.openai.azure.com``) and the version is the
provider's ``api_version`` setting (default ``DEFAULT_API_VERSION``). Bodies, results and
error bodies are OpenAI's, so only the request's address and key differ from the family's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from app.jobs import RequestType, UploadedFile
from app.providers import ProviderEndpoint
from workers.providers.base import HttpRequest
from workers.providers.openai_compat import PATHS, OpenAICompatAdapter, build_http_request

DEFAULT_API_VERSION = "2024-10-21"  # the newest generally available data-plane version


class AzureAdapter(OpenAICompatAdapter):
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any], files: Sequence[UploadedFile] = ()) -> HttpRequest:
        version = endpoint.api_version or DEFAULT_API_VERSION
        url = (f"{endpoint.base_url}/openai/deployments/{quote(model, safe='')}{PATHS[request_type]}"
               f"?api-version={quote(version, safe='')}")
        auth = {"api-key": endpoint.api_key} if endpoint.api_key else {}
        # The deployment in the URL names the model; the body does not carry one.
        return build_http_request(url, auth, None, body, files)
