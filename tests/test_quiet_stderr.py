"""The driver's stderr filter (gradmm_ray.distributed.quiet_stderr): Ray's known false alarm is
dropped, everything else passes through unchanged and in order, also progress-bar updates that
have no newline yet, and what a dying driver wrote still comes out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from gradmm_ray.distributed.quiet_stderr import forward

ALARM = (
    b"[2026-12-01 06:44:26,144 E 26732 26732] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(AdmmSolver))' and ID: 'e241191ca9aafba6fe728b6d01000000' has "
    b"constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    b"object store go out of scope or are lost, the actor restart will fail. See "
    b"https://github.com/ray-project/ray/issues/53727 for more details.\n"
)
OTHER_ERROR = b"[2026-12-01 06:44:27,001 E 26732 26732] core_worker.cc:900: something else\n"


def _through_filter(*chunks: bytes) -> bytes:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    for chunk in chunks:
        os.write(w_in, chunk)
    os.close(w_in)
    forward(r_in, w_out)
    os.close(w_out)
    out = os.read(r_out, 1 << 20)
    os.close(r_in)
    os.close(r_out)
    return out


def test_forward_drops_only_the_false_alarm():
    bar = b"\rsolve:  50%|#####     | 8/16"
    out = _through_filter(b"first\n", ALARM[:40], ALARM[40:], bar, b"\n", OTHER_ERROR, b"end")
    assert out == b"first\n" + bar + b"\n" + OTHER_ERROR + b"end"


def test_a_line_that_only_names_the_file_is_kept():
    line = b"[2026-12-01 06:44:27,001 E 1 1] core_worker.cc:2465: Actor failed to start\n"
    assert _through_filter(line) == line


def test_driver_stderr_is_filtered_and_a_dying_driver_loses_nothing():
    """In a real process: C++-style writes to fd 2 and Python's sys.stderr both go through the
    filter; after os._exit (no clean-up at all) the last line still arrives."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from gradmm_ray.distributed.quiet_stderr import ray_false_alarms_filtered
        print("before", file=sys.stderr, flush=True)
        with ray_false_alarms_filtered():
            os.write(2, {ALARM!r})
            print("python line", file=sys.stderr, flush=True)
            os.write(2, {OTHER_ERROR!r})
        print("after", file=sys.stderr, flush=True)
        with ray_false_alarms_filtered():
            os.write(2, {ALARM!r} + b"dying words\\n")
            os._exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr == (b"before\npython line\n" + OTHER_ERROR + b"after\ndying words\n"), (
        done.stderr
    )


def test_the_filter_outlives_a_stop_signal_to_the_whole_group():
    """`ray job stop` sends SIGTERM to the driver and all its children (Ctrl-C: SIGINT to the
    terminal's group): the filter must keep forwarding what the driver writes as it stops."""
    script = textwrap.dedent(
        """
        import os, signal, subprocess, sys, time
        from gradmm_ray.distributed.quiet_stderr import ray_false_alarms_filtered
        # Handlers, as the driver has (an ignored signal would stay ignored in the child).
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        with ray_false_alarms_filtered():
            time.sleep(0.5)  # the child has set its handlers
            os.killpg(0, signal.SIGTERM)
            os.killpg(0, signal.SIGINT)
            time.sleep(0.2)
            print("stopping: what was kept", file=sys.stderr, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, start_new_session=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"stopping: what was kept\n", done.stderr
