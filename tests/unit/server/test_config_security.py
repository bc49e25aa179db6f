"""The security and operations options: flags, variables, validation, masking."""

from __future__ import annotations

import pytest

from lethedb_server.errors import ValidationError
from lethedb_server.ops import config
from lethedb_server.ops.cli import build_parser


def test_defaults_are_secure_and_local():
    defaults = config.load(environ={})
    assert defaults.listen.startswith("127.0.0.1:")
    assert not defaults.insecure
    assert defaults.metrics_port == 0
    assert defaults.tokens_file == ""
    assert defaults.tls_cert == ""


def test_every_option_has_help_and_the_boolean_ones_are_switches():
    assert set(config.HELP) == set(config.field_names())
    assert {"insecure", "keepalive_permit_without_calls"} <= config.switches()
    args = build_parser().parse_args(["serve", "--insecure", "--metrics-port", "9100"])
    cfg = config.load({n: getattr(args, n) for n in config.field_names()}, environ={})
    assert cfg.insecure is True
    assert cfg.metrics_port == 9100
    args = build_parser().parse_args(["serve", "--keepalive-permit-without-calls", "false"])
    cfg = config.load({n: getattr(args, n) for n in config.field_names()}, environ={})
    assert cfg.keepalive_permit_without_calls is False


def test_options_come_from_variables_too():
    cfg = config.load(
        environ={"LETHEDB_INSECURE": "true", "LETHEDB_TOKENS_FILE": "/etc/t.json"},
    )
    assert cfg.insecure is True
    assert cfg.tokens_file == "/etc/t.json"


@pytest.mark.parametrize(
    "flags",
    [
        {"metrics_port": "70000"},
        {"max_concurrent_streams": "0"},
        {"max_inflight_appends": "-1"},
        {"keepalive_time_s": "0"},
    ],
)
def test_out_of_range_values_are_refused(flags):
    with pytest.raises(ValidationError, match="configuration"):
        config.load(flags, environ={})


def test_print_config_shows_paths_and_masks_anything_token_like():
    token = "lethedb_" + "q" * 43
    cfg = config.load(
        {"tokens_file": "/etc/lethedb/tokens.json", "subject_id_pattern": token}, environ={}
    )
    text = config.render(cfg)
    assert 'tokens_file = "/etc/lethedb/tokens.json"' in text
    assert token not in text
    assert f'subject_id_pattern = "{config.MASK}"' in text
