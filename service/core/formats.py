"""File names and naming rules of the adapter store that both sides write or read (the trainer writes an
adapter directory, the store and the gateway read it). The formats themselves must not change."""

from __future__ import annotations

import re

REGISTRY = "registry.json"
STORE_RECORD = "presafe-store.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CLASSIFIER = "classifier"  # the decision classifier's folder inside a published adapter
CLASSIFIER_ONNX = "model.onnx"  # its ONNX export (what the gateway runs, through ONNX Runtime)
ADAPTER_CHAT_TEMPLATE = "chat_template.jinja"  # the base template an adapter was trained with, if not the model's
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A publish name (``publish.name``, the prefix of ``<name>-v<N>``): at most 48 characters, so every
# version's store name still matches NAME_RE (64). The one pattern the config, the admin and the store use.
PREFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$"
PREFIX_RE = re.compile(PREFIX_PATTERN)
VERSIONED_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9._-]*)-v(?P<version>[0-9]+)$")
