"""bench.py cold-start's pieces on the bundled model, so the benchmark cannot rot: its profiled child
reports every phase it names, and its sample.py command is one a user runs."""
import os
import sys

from benchmarks import cold_start

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanopali", "assets", "tiny-shapes")
ENV = dict(os.environ, PYTHONPATH=cold_start.ROOT)


def test_the_profiled_child_reports_quantizing_packing_and_the_first_token():
    wall, phases = cold_start.run([sys.executable, "-c", cold_start.BREAKDOWN, TINY, "1", "int4",
                                   cold_start.image_path()], ENV)
    assert set(phases) == {"import", "load", "quantize", "pack", "measure", "first token"}
    assert phases["quantize"] > 0 and phases["pack"] > 0          # the functions it names exist and ran
    assert 0 < phases["quantize"] + phases["pack"] <= phases["load"] < wall


def test_the_timed_command_is_sample_py_answering_on_its_last_line():
    wall, phases = cold_start.run(cold_start.sample_cmd(TINY, 1, "int8"), ENV)
    assert wall > 0 and phases == {}
