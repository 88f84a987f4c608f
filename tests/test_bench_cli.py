"""bench.py's command line says what each flag does and which subcommands exist, and its ratio rows read one
way: nanopali's speed relative to the peer, in words that cannot be misread."""
import bench
from benchmarks.tables import speed, speed_row


def test_every_flag_has_help_and_every_subcommand_is_listed():
    parser = bench.build_parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    listed = parser.format_help()
    assert all(f"  {name} " in listed for name in bench.SUBCOMMANDS)


def test_a_slower_ratio_says_slower_and_never_a_fraction_faster():
    assert speed(1.25) == "1.25x faster"
    assert speed(1 / 1.12) == "1.12x slower"
    assert speed(float("nan")) == "n/a"


def test_first_token_and_decode_ratios_point_the_same_way():
    # {batch: (time to first token s, decode tok/s)}: nanopali takes half the time and decodes twice as fast
    ours, peer = {1: (0.5, 20.0), 4: (1.0, 60.0)}, {1: (1.0, 10.0), 4: (2.0, 30.0)}
    assert speed_row(ours, peer, [1, 4]) == ["2.00x faster"] * 3
    assert speed_row(peer, ours, [1, 4]) == ["2.00x slower"] * 3
