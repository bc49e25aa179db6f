"""Every configuration value is checked when the configuration is loaded.

``lethedb serve`` loads it before it binds or creates anything, so a bad value
ends the start with one line naming the option, and no data directory.
"""

from __future__ import annotations

import re

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


@pytest.mark.parametrize(
    ("flags", "option"),
    [
        ({"follow": "leader"}, "follow"),
        ({"follow": "leader:0"}, "follow"),
        ({"follow": "::1:50051"}, "follow"),
        ({"follow": "127.0.0.1:50051", "listen": "127.0.0.1:50051"}, "follow"),
        ({"follow": "localhost:7000", "listen": "0.0.0.0:7000"}, "follow"),
        ({"follow": "db-a:7000", "advertise": "db-a:7000"}, "follow"),
        ({"advertise": "db-a"}, "advertise"),
        ({"node_id": "a node"}, "node_id"),
        ({"sync_replicas": "-1"}, "sync_replicas"),
        ({"sync_timeout_s": "0"}, "sync_timeout_s"),
        ({"follow": "db-a:7000", "follow_tls_cert": "/nonexistent.pem"}, "follow_tls_cert"),
        ({"follow": "db-a:7000", "follow_token_file": "/nonexistent-token"}, "follow_token_file"),
    ],
)
def test_a_bad_replication_setting_is_refused_in_one_line(flags, option):
    with pytest.raises(ValidationError) as refused:
        config.load(flags, environ={})
    assert option in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_follower_refuses_to_follow_itself_with_a_clear_reason():
    with pytest.raises(ValidationError, match="cannot follow itself"):
        config.load({"follow": "127.0.0.1:50051"}, environ={})


def test_waiting_for_replicas_without_any_follower_configured_is_allowed():
    """Writes then wait and fail NotEnoughReplicas: a runtime state, not a bad configuration."""
    loaded = config.load({"sync_replicas": "2"}, environ={})
    options = loaded.store_options()
    assert (options.role, options.sync_replicas) == ("leader", 2)


def test_follow_makes_the_node_a_follower_of_that_leader():
    options = config.load({"follow": "db-a:7000"}, environ={}).store_options()
    assert (options.role, options.leader) == ("follower", "db-a:7000")


def test_the_client_tls_files_of_the_follower_go_together(tmp_path):
    cert = tmp_path / "node.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValidationError, match="follow_tls_key"):
        config.load({"follow": "db-a:7000", "follow_tls_cert": str(cert)}, environ={})


ETCD = "http://127.0.0.1:2379"


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        ({"cluster": "orders"}, "cluster needs etcd"),
        ({"etcd": ETCD}, "etcd is set without cluster"),
        ({"cluster": "orders", "etcd": ETCD, "follow": "db-a:7000"}, "exclude each other"),
        ({"cluster": "orders/eu", "etcd": ETCD}, "cluster is 'orders/eu'"),
        ({"cluster": "orders", "etcd": "etcd-without-port"}, "etcd: etcd endpoint"),
        ({"cluster": "orders", "etcd": ETCD, "listen": "0.0.0.0:50051"}, "--advertise"),
        ({"cluster": "orders", "etcd": ETCD, "listen": "127.0.0.1:0"}, "--advertise"),
        ({"cluster": "orders", "etcd": ETCD, "lease_ttl_s": 0}, "lease_ttl_s"),
    ],
)
def test_a_bad_cluster_setting_is_refused_in_one_line(flags, why):
    with pytest.raises(ValidationError, match=re.escape(why)) as refused:
        config.load(flags, environ={})
    assert "\n" not in str(refused.value)


def test_a_cluster_member_starts_as_a_follower_of_nobody():
    member = config.load(
        {"cluster": "orders", "etcd": f"{ETCD},http://127.0.0.2:2379", "advertise": "db-a:7000"},
        environ={},
    )
    options = member.store_options()
    assert (options.role, options.leader) == ("follower", "")
    assert member.lease_ttl_s == 5


CLUSTER = {"cluster": "c1", "etcd": "http://127.0.0.1:2379", "advertise": "127.0.0.1:7001"}


def test_a_replication_address_needs_a_cluster_and_a_dialable_address():
    with pytest.raises(ValidationError, match="replication_advertise is set without cluster"):
        config.load({"replication_advertise": "127.0.0.1:7101"}, environ={})
    with pytest.raises(ValidationError, match="replication_advertise"):
        config.load({**CLUSTER, "replication_advertise": "proxy"}, environ={})
    loaded = config.load({**CLUSTER, "replication_advertise": "127.0.0.1:7101"}, environ={})
    assert loaded.replication_advertise == "127.0.0.1:7101"
