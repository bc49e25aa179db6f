"""The coordinator's pure rules: endpoints, key ranges, options, and who may campaign.

The election itself runs against a real etcd in
tests/integration/test_etcd_election.py; these are the decisions it takes on
what it read.
"""

from __future__ import annotations

import pytest

from lethedb_server.coord.election import (
    ClusterKeys,
    ElectionOptions,
    NodeInfo,
    Outcome,
    Progress,
    PublishedNode,
    campaign_refusal,
    decode_leader,
    encode_node,
)
from lethedb_server.coord.endpoints import parse_endpoints
from lethedb_server.coord.etcd import KeyValue, prefix_end

ME = NodeInfo("me", "127.0.0.1:1")


def published(
    node_id: str, term: int, commit: int, after_term: int = 7, position: int = 0
) -> PublishedNode:
    return PublishedNode(
        NodeInfo(node_id, "127.0.0.1:2"), Progress(term, commit, position), after_term
    )


@pytest.mark.parametrize(
    ("given", "addresses"),
    [
        ("http://127.0.0.1:2379", ["127.0.0.1:2379"]),
        ("https://etcd-a:2379, etcd-b:2379,", ["etcd-a:2379", "etcd-b:2379"]),
        (["http://[::1]:2379/"], ["[::1]:2379"]),
    ],
)
def test_endpoints_are_host_port_pairs(given: str | list[str], addresses: list[str]):
    assert parse_endpoints(given) == addresses


@pytest.mark.parametrize("given", ["", "etcd-a", "http://etcd-a:port", ":2379", " , "])
def test_an_endpoint_without_host_and_port_is_refused(given: str):
    with pytest.raises(ValueError, match="etcd endpoint"):
        parse_endpoints(given)


def test_a_prefix_range_ends_after_every_key_under_it():
    assert prefix_end(b"/lethedb/c/nodes/") == b"/lethedb/c/nodes0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"


def test_a_cluster_s_keys_live_under_its_name():
    keys = ClusterKeys("prod")

    assert keys.leader == b"/lethedb/prod/leader"
    assert keys.term == b"/lethedb/prod/term"
    assert keys.node("n1") == b"/lethedb/prod/nodes/n1"
    assert keys.node("n1").startswith(keys.nodes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cluster": ""}, "cluster name"),
        ({"cluster": "a/b"}, "cluster name"),
        ({"cluster": "c", "ttl_s": 0}, "TTL"),
        ({"cluster": "c", "ttl_s": 2, "margin_s": 2.0}, "margin"),
        ({"cluster": "c", "margin_s": 0.0}, "margin"),
        ({"cluster": "c", "quorum": 0}, "quorum"),
    ],
)
def test_election_options_refuse_what_cannot_work(options: dict[str, object], message: str):
    with pytest.raises(ValueError, match=message):
        ElectionOptions(**options)  # type: ignore[arg-type]


def test_renewals_default_to_three_per_ttl():
    assert ElectionOptions("c", ttl_s=6).renew_interval_s == 2.0
    assert ElectionOptions("c", ttl_s=6, renew_every_s=0.5).renew_interval_s == 0.5


def test_a_node_behind_a_live_node_does_not_campaign():
    nodes = [published("me", 3, 9), published("other", 3, 10)]

    refusal = campaign_refusal(ME, Progress(3, 9, 0), nodes, last_term=7, quorum=1)

    assert refusal is not None
    assert refusal.outcome is Outcome.BEHIND
    assert "other" in refusal.reason


def test_a_later_term_counts_before_a_longer_log():
    nodes = [published("me", 4, 50), published("other", 5, 1)]

    refusal = campaign_refusal(ME, Progress(4, 50, 0), nodes, last_term=7, quorum=1)

    assert refusal is not None
    assert refusal.outcome is Outcome.BEHIND


def test_an_empty_node_does_not_campaign_against_an_upgraded_node_with_history():
    """A store that predates the journal has commit 0 like an empty node; its head tells."""
    nodes = [published("me", 0, 0), published("upgraded", 0, 0, position=50_000)]

    refusal = campaign_refusal(ME, Progress(0, 0, 0), nodes, last_term=7, quorum=1)

    assert refusal is not None
    assert refusal.outcome is Outcome.BEHIND


def test_a_stale_publication_still_holds_back_a_node_behind_it():
    """Progress only grows: an old publication is a lower bound, enough to refuse."""
    nodes = [published("me", 3, 9), published("other", 3, 10, after_term=2)]

    refusal = campaign_refusal(ME, Progress(3, 9, 0), nodes, last_term=7, quorum=1)

    assert refusal is not None
    assert refusal.outcome is Outcome.BEHIND


def test_equal_nodes_may_both_campaign():
    nodes = [published("me", 3, 9), published("other", 3, 9)]

    assert campaign_refusal(ME, Progress(3, 9, 0), nodes, last_term=7, quorum=2) is None


def test_only_positions_read_after_the_last_term_count_toward_the_quorum():
    nodes = [published("me", 3, 9), published("b", 3, 8, after_term=5), published("c", 3, 8)]

    two = campaign_refusal(ME, Progress(3, 9, 0), nodes, last_term=7, quorum=2)
    three = campaign_refusal(ME, Progress(3, 9, 0), nodes, last_term=7, quorum=3)

    assert two is None
    assert three is not None
    assert three.outcome is Outcome.TOO_FEW
    assert "2 of the 3" in three.reason


def test_followers_dial_the_leader_at_its_replication_address_when_it_has_one():
    """A node may publish a separate address for replication (another network, a proxy)."""
    proxied = NodeInfo("a", "127.0.0.1:1", "127.0.0.1:9")
    for node, dialled in ((proxied, "127.0.0.1:9"), (ME, "127.0.0.1:1")):
        kv = KeyValue(b"/lethedb/c/leader", encode_node(node), 5, 5, 1, 0)
        leader = decode_leader(kv)
        assert (leader.node, leader.term) == (node, 5)
        assert leader.node.replication_address == dialled
