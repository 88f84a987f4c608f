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


def test_threads_past_the_usable_cores_are_clamped_and_the_machine_line_names_cpu_features_and_threads(capsys):
    import torch
    from nanopali.cpu import machine

    before = torch.get_num_threads()
    try:
        line = bench.set_up_machine(10000)
        assert torch.get_num_threads() == machine.usable_cores()
    finally:
        torch.set_num_threads(before)
    assert "10000 threads requested" in capsys.readouterr().err
    assert line.startswith(f"CPU: {machine.cpu_model()}") and "avx512_bf16" in line and "amx" in line
    assert f"torch {torch.__version__}, {machine.usable_cores()} threads" in line and "load average" in line


def test_help_says_threads_default_to_the_cores_this_process_may_use():
    help_text = " ".join(bench.build_parser().format_help().split())
    assert "--threads THREADS torch CPU threads (default: the cores this process may use" in help_text


def test_threads_below_one_is_a_usage_error_not_silently_the_default():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench.py"), "--threads", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--threads must be ≥ 1, got 0" in r.stderr and "Traceback" not in r.stderr
