"""Every configuration value is checked when the configuration is loaded.

``lethedb serve`` loads it before it binds or creates anything, so a bad value
ends the start with one line naming the option, and no data directory.
"""

from __future__ import annotations

import pytest

from lethedb_server.errors import ValidationError
from lethedb_server.ops import config

BAD_VALUES = [
    ("subject_id_pattern", "([a-z]"),
    ("subject_id_pattern", "*"),
    ("listen", "localhost"),
    ("listen", "127.0.0.1:"),
    ("listen", "127.0.0.1:65536"),
    ("listen", "127.0.0.1:http"),
    ("listen", "::1:50051"),
    ("listen", "unix:"),
    ("data", ""),
    ("dek_cache_size", "-1"),
    ("dek_max_uses", "0"),
    ("max_event_bytes", "0"),
    ("max_events_per_append", "0"),
    ("max_append_bytes", "-5"),
    ("max_message_bytes", "10"),
    ("idempotency_window_s", "-1"),
    ("batch_max_commands", "0"),
    ("batch_max_bytes", "0"),
    ("shutdown_grace_s", "-0.5"),
    ("shred_interval_s", "-1"),
    ("max_subscribers", "0"),
    ("subscription_heartbeat_s", "0"),
    ("log_level", "loud"),
    ("log_format", "xml"),
    ("metrics_port", "65536"),
    ("dek_cache_size", "many"),
    ("ready_file", "/nonexistent-directory/ready"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_value_is_refused_naming_the_option(name, value):
    with pytest.raises(ValidationError) as refused:
        config.load({name: value}, environ={})
    assert name in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES[:3])
def test_a_bad_value_from_the_environment_is_refused_too(name, value):
    with pytest.raises(ValidationError, match=name):
        config.load(environ={config.ENV_PREFIX + name.upper(): value})


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:0", "127.0.0.1:50051", "[::1]:50051", "localhost:1", "unix:/run/l.sock"]
)
def test_good_listen_addresses_are_accepted(listen):
    assert config.load({"listen": listen}, environ={}).listen == listen


def test_the_defaults_are_valid():
    config.check(config.Config())
