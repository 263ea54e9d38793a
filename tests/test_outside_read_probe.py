"""Temporary: a test that reads a file beside the checkout (must make .ci/run fail)."""
from conftest import ROOT


def test_reads_outside_the_repository():
    assert (ROOT.parent / "shared" / "reference" / "official_state_dict_r50.txt").read_text()
