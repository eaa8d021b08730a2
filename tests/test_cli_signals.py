"""SIGTERM unwinds an oaml command like Ctrl-C: the staging folder goes, files oaml did not write stay."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from oaml.cli.main import sigterm_unwinds

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from oaml.cli.main import Terminated, sigterm_unwinds
    from oaml.utils.io import replace_outputs

    try:
        with sigterm_unwinds():
            with replace_outputs(sys.argv[1]) as stage:
                (Path(stage) / "results.json").write_text("{}")
                print("ready", flush=True)
                time.sleep(120)
    except Terminated:
        print("unwound", flush=True)
        sys.exit(143)
""")


def test_sigterm_removes_the_staging_folder_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("not oaml's")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert any(p.name.startswith(".oaml-staging-") for p in out.iterdir())
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "unwound" in rest
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # no staging folder, nothing half-published


def test_sigterm_handler_is_restored_and_a_foreign_one_left_alone():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_unwinds():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    mine = lambda *a: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    try:
        with sigterm_unwinds():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
