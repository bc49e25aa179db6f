"""Every default is defined once: an option the engine also has takes the engine's.

A default written twice drifts (``max_inflight_appends`` once differed between
Config and WriterLimits): the server then ran with one value while the engine's
own callers, and its tests, assumed another.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields

import pytest

import lethedb_contract
from lethedb_server.api.validation import Limits
from lethedb_server.engine.store import StoreOptions
from lethedb_server.engine.subscriptions import SubscriptionLimits
from lethedb_server.engine.writer import WriterLimits
from lethedb_server.ops import config
from lethedb_server.storage.keys import DEFAULT_MAX_USES, KeyStore

#: Config option -> the engine default it configures.
ENGINE_DEFAULTS = {
    "dek_cache_size": StoreOptions().dek_cache_size,
    "dek_max_uses": StoreOptions().dek_max_uses,
    "max_event_bytes": Limits().max_event_bytes,
    "max_events_per_append": Limits().max_events_per_append,
    "max_append_bytes": Limits().max_append_bytes,
    "max_request_events": Limits().max_request_events,
    "max_request_bytes": Limits().max_request_bytes,
    "max_message_bytes": lethedb_contract.DEFAULT_MAX_MESSAGE_BYTES,
    "idempotency_window_s": WriterLimits().idempotency_window_ns / 1e9,
    "batch_max_commands": WriterLimits().max_batch_commands,
    "batch_max_bytes": WriterLimits().max_batch_bytes,
    "max_inflight_appends": WriterLimits().max_inflight_appends,
    "max_inflight_events": WriterLimits().max_inflight_events,
    "max_inflight_bytes": WriterLimits().max_inflight_bytes,
    "max_subscribers": SubscriptionLimits().max_subscribers,
    "subscription_heartbeat_s": SubscriptionLimits().heartbeat_interval_s,
    "max_consumer_groups": SubscriptionLimits().max_consumer_groups,
}


def test_the_default_configuration_builds_the_engines_defaults():
    defaults = config.Config()
    assert defaults.store_options().writer == WriterLimits()
    assert defaults.limits() == Limits()
    assert defaults.subscription_limits() == SubscriptionLimits()
    options = defaults.store_options()
    for field in fields(StoreOptions):
        if field.name not in {"keyring_path", "writer"}:
            assert getattr(options, field.name) == getattr(StoreOptions(), field.name), field.name
    assert {name: getattr(defaults, name) for name in ENGINE_DEFAULTS} == ENGINE_DEFAULTS


def test_the_key_store_caches_as_many_keys_as_a_default_store():
    signature = inspect.signature(KeyStore)
    assert signature.parameters["cache_size"].default == StoreOptions().dek_cache_size
    assert signature.parameters["max_uses"].default == DEFAULT_MAX_USES


def _config_defaults() -> dict[str, ast.expr]:
    tree = ast.parse(inspect.getsource(config))
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"]
    return {
        node.target.id: node.value
        for node in cls.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.value is not None
    }


@pytest.mark.parametrize("name", sorted(ENGINE_DEFAULTS))
def test_config_names_the_engine_default_instead_of_writing_a_number(name):
    """A literal (``1024``, ``16 << 20``) in Config would be a second copy."""
    default = _config_defaults()[name]
    assert any(isinstance(n, ast.Name) for n in ast.walk(default)), ast.unparse(default)
