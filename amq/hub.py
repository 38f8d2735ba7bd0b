"""Fail fast when the Hugging Face hub is unreachable, instead of minutes of client retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint (HF_ENDPOINT or huggingface.co:443) opens."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_mode(kind: str) -> bool:
    """True when the user asked the HF clients to use their local caches only."""
    flags = ["HF_HUB_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if kind == "dataset" else ["TRANSFORMERS_OFFLINE"])
    return any(os.environ.get(f, "").lower() in ("1", "true", "yes") for f in flags)
