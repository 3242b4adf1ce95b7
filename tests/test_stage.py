"""The stage runner: key, skip, force, crash-safe commit (SIGKILL between its steps), the
run-directory lock, and keys that survive a moved run directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hetray.stage import MANIFEST, RunDirBusy, Stage, locked, read_manifest, recover, run_stage

# A stage with two output folders (as convert has three): "a" holds the manifest.
SCRIPT = textwrap.dedent("""
    import os, shutil, sys, time
    from pathlib import Path
    from hetray.stage import Stage, run_stage

    run_dir, version, kill_at, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    real_replace, real_rmtree, calls = os.replace, shutil.rmtree, [0]

    def step():  # the commit's steps: os.replace (moves, the manifest), then shutil.rmtree
        calls[0] += 1
        if calls[0] == kill_at:
            marker.write_text(str(os.getpid()))
            time.sleep(600)  # the test kills us here, between two commit steps

    def replace(src, dst):
        step()
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        step()
        return real_rmtree(path, *args, **kwargs)

    def work(tmp):
        for name in ("a", "b"):
            for i in range(3):
                (tmp / name / f"part-{i}.txt").write_text(f"{version} {name} {i}")
        return {"version": version}

    os.replace, shutil.rmtree = replace, rmtree
    run_stage(Stage("demo", run_dir, outputs=("a", "b"), config={"version": version}), work)
""")


def outputs(run_dir: Path) -> dict:
    """Every file of the two output folders (manifest excluded) -> its text."""
    return {p.relative_to(run_dir).as_posix(): p.read_text()
            for name in ("a", "b") for p in sorted((run_dir / name).glob("*.txt"))}


def run_script(tmp_path: Path, run_dir: Path, version: str, kill_at: int = 0) -> subprocess.Popen:
    script = tmp_path / "stage_script.py"
    script.write_text(SCRIPT)
    marker = tmp_path / f"marker-{version}-{kill_at}"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), version, str(kill_at), str(marker)])
    if kill_at:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the stage never reached the kill point"
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)
    assert proc.wait(timeout=120) == (-signal.SIGKILL if kill_at else 0)
    return proc


def demo(run_dir, version="v1", outputs=("a", "b"), inputs=()):
    return Stage("demo", run_dir, outputs=outputs, config={"version": version}, inputs=list(inputs))


def write(version):
    def work(tmp):
        for name in ("a", "b"):
            (tmp / name / "part-0.txt").write_text(f"{version} {name}")
        return {"version": version}
    return work


def test_skip_force_and_a_failed_stage_keeps_the_old_outputs(tmp_path):
    run = tmp_path / "run"
    first = run_stage(demo(run), write("v1"))
    assert first["version"] == "v1" and read_manifest(run / "a")["key"] == first["key"]
    assert outputs(run) == {"a/part-0.txt": "v1 a", "b/part-0.txt": "v1 b"}

    calls = []
    again = run_stage(demo(run), lambda tmp: calls.append(tmp))
    assert calls == [] and again["created"] == first["created"]  # up to date: skipped

    forced = run_stage(demo(run), write("v1-again"), force=True)
    assert forced["key"] == first["key"] and outputs(run)["a/part-0.txt"] == "v1-again a"

    def fails(tmp):
        (tmp / "a" / "part-0.txt").write_text("half written")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(demo(run, "v2"), fails)
    assert outputs(run)["a/part-0.txt"] == "v1-again a"  # the old outputs, whole
    assert not list(run.glob(".stage-*"))  # and no temporary folder left behind

    # a removed output folder makes the stage out of date even with a matching manifest
    shutil.rmtree(run / "b")
    calls.clear()
    run_stage(demo(run), lambda tmp: calls.append(1) or write("v1")(tmp))
    assert calls == [1] and (run / "b" / "part-0.txt").read_text() == "v1 b"


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_a_stage_killed_between_commit_steps_leaves_old_or_new_whole(tmp_path, kill_at):
    """The commit's steps: 1-2 set a/ and b/ aside, 3-4 move the new ones in, 5 writes the
    manifest (the commit point). SIGKILL before each; the next start repairs."""
    run = tmp_path / "run"
    run_script(tmp_path, run, "v1")
    old = outputs(run)
    old_manifest = (run / "a" / MANIFEST).read_text()
    assert old == {f"{n}/part-{i}.txt": f"v1 {n} {i}" for n in ("a", "b") for i in range(3)}

    run_script(tmp_path, run, "v2", kill_at=kill_at)
    stale = list(run.glob(".stage-*"))
    assert len(stale) == 1  # the journal and the set-aside outputs wait for the next start
    for rel, text in old.items():  # nothing was deleted: every old file is in place or set aside, whole
        here, aside = run / rel, stale[0] / "old" / rel
        assert (here.is_file() and here.read_text() == text) or aside.read_text() == text

    with locked(run):  # the next start repairs: back to the whole old state
        pass
    assert not list(run.glob(".stage-*"))
    assert outputs(run) == old and (run / "a" / MANIFEST).read_text() == old_manifest

    run_script(tmp_path, run, "v2")  # and a new run commits the new state
    assert outputs(run) == {f"{n}/part-{i}.txt": f"v2 {n} {i}" for n in ("a", "b") for i in range(3)}
    assert json.loads((run / "a" / MANIFEST).read_text())["version"] == "v2"


def test_a_commit_killed_after_its_manifest_is_completed_not_rolled_back(tmp_path):
    run = tmp_path / "run"
    run_script(tmp_path, run, "v1")
    run_script(tmp_path, run, "v2", kill_at=6)  # after the manifest, before the old outputs are removed
    assert read_manifest(run / "a")["version"] == "v2"
    done = recover(run)
    assert len(done) == 1 and "had finished" in done[0]
    assert outputs(run) == {f"{n}/part-{i}.txt": f"v2 {n} {i}" for n in ("a", "b") for i in range(3)}


def test_a_second_process_on_the_same_run_dir_fails_at_once(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from hetray.stage import locked
        with locked({str(run)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        with pytest.raises(RunDirBusy, match=rf"another hetray process \(pid {holder.pid}"):
            run_stage(demo(run), write("v1"))
        assert time.time() - started < 5
        assert not (run / "a").exists()
    finally:
        holder.kill()
        holder.wait()
    run_stage(demo(run), write("v1"))  # the lock went with its holder
    assert outputs(run) == {"a/part-0.txt": "v1 a", "b/part-0.txt": "v1 b"}


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    run = tmp_path / "run"
    with locked(run):
        with locked(run):
            run_stage(demo(run), write("v1"))
        assert (run / ".hetray.lock").read_text().strip() == str(os.getpid())
    assert (run / ".hetray.lock").read_text() == ""


def test_keys_use_paths_relative_to_the_run_dir_and_content(tmp_path):
    outside = tmp_path / "data.jsonl"
    outside.write_text('{"x": 1}\n')
    run = tmp_path / "run"
    up = run_stage(Stage("up", run, outputs=("up",), config={}), lambda tmp: (tmp / "up" / "f").write_text("1") and None)
    plain = run / "plain"
    plain.mkdir()
    (plain / "x.parquet").write_text("x")
    stage = demo(run, inputs=[outside, run / "up", plain, "some-org/some-model"])
    key = stage.key()
    prints = stage.fingerprints()
    assert prints[0]["file"] == "data.jsonl" and "path" not in json.dumps(prints)
    assert prints[1] == {"stage": "up", "key": up["key"]}
    assert prints[2]["folder"] == "plain" and prints[3] == "some-org/some-model"

    moved = tmp_path / "elsewhere" / "run2"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert demo(moved, inputs=[outside, moved / "up", moved / "plain", "some-org/some-model"]).key() == key
    outside.write_text('{"x": 2}\n')  # same size, new content: a new key
    assert demo(moved, inputs=[outside, moved / "up", moved / "plain", "some-org/some-model"]).key() != key


def test_a_new_hetray_version_changes_every_key(tmp_path, monkeypatch):
    import hetray

    key = demo(tmp_path / "run").key()
    monkeypatch.setattr(hetray, "__version__", "999.0")
    assert demo(tmp_path / "run").key() != key
