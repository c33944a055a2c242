"""Balancing with reachability: a stage is not left served only through relays while direct peers could move."""

from __future__ import annotations

from swarm.training.balancing import BalanceConfig, StagePeer, choose_move, choose_stage

CFG = BalanceConfig()


def test_a_direct_node_joins_the_stage_served_only_through_relays() -> None:
    peers = [
        StagePeer(peer="a", stage=0, throughput=1.0),
        StagePeer(peer="b", stage=1, throughput=5.0, relayed=True),
        StagePeer(peer="c", stage=1, throughput=5.0, relayed=True),
    ]
    assert choose_stage(peers, 2, my_speed=1.0) == 1  # relay-only stage 1 counts as empty to a direct node
    assert choose_stage(peers, 2, my_speed=1.0, relayed=True) == 0  # a relayed node: throughput as measured


def test_a_direct_node_moves_to_a_relay_only_stage_and_never_leaves_one() -> None:
    peers = [
        StagePeer(peer="a", stage=0, throughput=1.0),
        StagePeer(peer="d", stage=0, throughput=1.0),
        StagePeer(peer="b", stage=1, throughput=5.0, relayed=True),
    ]
    assert choose_move(peers, 2, me="a", cfg=CFG) == 1
    assert choose_move([*peers[:2], StagePeer(peer="b", stage=1, throughput=5.0)], 2, me="a", cfg=CFG) is None
    # the last direct peer of a stage whose other peers are relayed stays, even when another stage is weaker
    stay = [
        StagePeer(peer="a", stage=0, throughput=9.0),
        StagePeer(peer="r", stage=0, throughput=9.0, relayed=True),
        StagePeer(peer="x", stage=1, throughput=1.0),
    ]
    assert choose_move(stay, 2, me="a", cfg=CFG) is None
    assert choose_move([*stay[:1], StagePeer(peer="r", stage=0, throughput=9.0), stay[2]], 2, me="a", cfg=CFG) == 1
