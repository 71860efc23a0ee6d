"""incd's settings: every value of a --config file, and of the options, is
checked and a bad one named with the file and key in one line."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from incd import config
from incd.cli import build_config
from incd.config import Config, ConfigError


def write(tmp_path, data) -> str:
    p = tmp_path / "incd.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


GOOD = {"netns": "inc-sw", "ports": ["eth1", "eth2"], "listen": "0.0.0.0", "listen_port": 38100,
        "pool_slots": 4096, "hash_slots": 1024, "policy": "fifo", "partitions": 2, "rtt_us": 150,
        "link_gbps": 2.5, "allow": ["10.0.0.0/24", "10.1.0.1"], "register_timeout": 30, "rejoin_grace": 10,
        "key_file": None, "max_job_slots": 512, "max_host_slots": 1024,
        "switches": [{"name": "leaf1", "netns": "inc-leaf1", "role": "leaf", "ports": ["p1", "p2"],
                      "uplink": {"port": "up", "peer_port": "l1"}},
                     {"name": "spine", "netns": "inc-spine", "role": "spine", "ports": ["l1"], "uplink": None}]}  # a real key file: test_a_key_file_must_exist_and_hold_a_long_enough_key


def test_a_good_file_is_read_whole(tmp_path):
    assert set(GOOD) == set(config.FILE_KEYS)  # every key is exercised
    assert config.read_file(write(tmp_path, GOOD)) == GOOD
    # what a background start hands to the daemon process reads back as it was
    assert config.read_file(write(tmp_path, Config().file_values())) == Config().file_values()


BAD = {
    "pool_slots": ["16", 0, 1 << 21, 16.0, True, None],
    "hash_slots": ["8", 0, -1],
    "max_job_slots": [1, "64", 2.5],
    "max_host_slots": [1, "64", 2.5],
    "listen_port": [0, 65536, "38100"],
    "partitions": [0, "4", 1.5],
    "rtt_us": [0, -1, "200", float("inf"), 1e9, False],
    "link_gbps": [0, "10"],
    "register_timeout": [0, 601, "30"],
    "rejoin_grace": [0, 3601, None],
    "policy": ["lifo", 1],
    "ports": ["eth1", [1], ["x" * 16], [""]],
    "allow": ["10.0.0.0/24", ["not a net"], [10]],
    "netns": [1, "", "a/b"],
    "listen": [0, "", "0.0.0.0 x"],
    "switches": [[], "leaf1", [{"name": "leaf1", "netns": "n", "role": "leaf", "ports": ["p1"]}],  # no uplink
                 [{"name": "s", "netns": "n", "role": "spine", "ports": ["l1"]}] * 2,  # two spines
                 [{"name": "s", "netns": "n", "role": "core", "ports": ["l1"]}]],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD.items() for v in vs])
def test_each_bad_value_is_named_with_the_file_and_key(tmp_path, key, value):
    path = write(tmp_path, {**GOOD, key: value})
    with pytest.raises(ConfigError) as e:
        config.read_file(path)
    msg = str(e.value)
    assert msg.startswith(f"config {path}: '{key}' must be") and "\n" not in msg, msg
    assert repr(value)[:20] in msg


def test_not_a_settings_object_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config.read_file(write(tmp_path, "{nope"))
    with pytest.raises(ConfigError, match="cannot read config"):
        config.read_file(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="must be a JSON object of settings, got a list"):
        config.read_file(write(tmp_path, [1]))
    with pytest.raises(ConfigError, match=r"unknown keys \['pool'\]"):
        config.read_file(write(tmp_path, {"pool": 16}))
    with pytest.raises(ConfigError, match="unknown keys"):
        config.read_file(write(tmp_path, {"instance": "x"}))  # the instance is an option only


def args(**kw):
    base = dict(instance="t", config=None, ports="eth1", netns=None, lab="inc", listen=None, pool_slots=None,
                hash_slots=None, policy=None, partitions=None, rtt_us=None, link_gbps=None,
                register_timeout=None, rejoin_grace=None, key_file=None,
                max_job_slots=None, max_host_slots=None)
    return SimpleNamespace(**{**base, **kw})


def test_options_override_the_file_and_are_checked_too(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = build_config(args(config=path, pool_slots=2048))
    assert (cfg.pool_slots, cfg.hash_slots, cfg.policy, cfg.ports) == (2048, 1024, "fifo", ["eth1"])
    with pytest.raises(ConfigError, match=r"^config .*incd.json: 'hash_slots' must be at most the pool's 64 slots"):
        build_config(args(config=path, pool_slots=64))
    with pytest.raises(ConfigError, match=r"^--pool-slots must be an integer in 1\.\.1048576, got 0"):
        build_config(args(pool_slots=0))
    with pytest.raises(ConfigError, match=r"^--rejoin-grace must be a number in \(0, 3600\]"):
        build_config(args(rejoin_grace=-1))
    with pytest.raises(ConfigError, match=r"^--hash-slots must be at most the pool's 16 slots, got 32"):
        build_config(args(pool_slots=16, hash_slots=32))
    with pytest.raises(ConfigError, match=r"^--max-job-slots must be at most the pool's 16 slots, got 32"):
        build_config(args(pool_slots=16, max_job_slots=32))
    with pytest.raises(ConfigError, match=r"^--max-host-slots must be at most the pool's 16 slots, got 64"):
        build_config(args(pool_slots=16, max_host_slots=64))


def test_a_key_file_must_exist_and_hold_a_long_enough_key(tmp_path):
    from incd import config

    short = tmp_path / "short.key"
    short.write_text("abc")
    good = tmp_path / "good.key"
    good.write_text("x" * 16)
    config.check_value("key_file", str(good), "--key-file")
    for path, words in ((tmp_path / "none.key", "cannot read"), (short, "at least 16")):
        with pytest.raises(config.ConfigError) as e:
            config.check_value("key_file", str(path), "--key-file")
        assert words in str(e.value)
