"""save_adapter and loldu.export.to_onnx killed (SIGKILL) at random moments, many times over.

A worker process imports torch and loldu once, then forks one writer per round; the writer saves
adapter "a" and adapter "b" alternately over the same directory (or exports over the same .onnx
path) until the worker SIGKILLs it after a random delay. After every kill the directory must load
as exactly "a" or exactly "b" (bit-identical z and sigma), never be refused, and the temporary
files of killed writers must not pile up: the next save/export removes them.
"""
import copy
import importlib.util
import os
import random
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import loldu
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterWarning

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")

WORKER = textwrap.dedent('''
    """Forks writers on request and SIGKILLs each after the delay read from stdin."""
    import os
    import signal
    import sys
    import time

    import torch

    torch.set_num_threads(1)  # forked children must not inherit a busy thread pool
    import torch.nn as nn

    import loldu

    RANKS = {"a": 4, "b": 3}


    def make_base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


    def make_adapter(name):
        config = loldu.LoLDUConfig(rank=RANKS[name], target_modules=["0", "2", "4"], train_scale=name == "b")
        model = loldu.inject(make_base(), config, name)
        g = torch.Generator().manual_seed(RANKS[name])
        with torch.no_grad():
            for _, layer in loldu.adapted_layers(model):
                z = layer.loldu_z[name]
                z.add_(torch.randn(z.shape, generator=g))
                layer.loldu_sigma[name].mul_(1.5 if name == "b" else 1.0)
        return model.eval()


    def main(mode, target, refs):
        models = {n: make_adapter(n) for n in RANKS}
        x = torch.randn(3, 16)
        if mode == "save":
            for n, m in models.items():
                loldu.save_adapter(m, os.path.join(refs, n))
            loldu.save_adapter(models["a"], target)

            def work(i):
                loldu.save_adapter(models["ab"[i % 2]], target)
        else:
            import loldu.export as lx

            def work(i):
                lx.to_onnx(models["ab"[i % 2]], x, target)
        work(1)  # warm: every forked writer starts with the imports and caches done
        t = time.monotonic()
        work(1)
        print(f"ready {time.monotonic() - t}", flush=True)
        for line in sys.stdin:
            delay = float(line)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the writer: works until killed, reporting each completed save
                os.close(r)
                try:
                    i = 0
                    while True:
                        work(i)
                        os.write(w, b".")
                        i += 1
                finally:
                    os._exit(3)
            os.close(w)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            done = b""
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                done += chunk
            os.close(r)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            print(f"{len(done)} {int(killed)}", flush=True)


    if __name__ == "__main__":
        main(*sys.argv[1:])
''')


class Worker:
    def __init__(self, tmp_path, mode, target):
        self.script = tmp_path / "crash_worker.py"
        self.script.write_text(WORKER)
        self.refs = tmp_path / "refs"
        self.proc = subprocess.Popen([sys.executable, str(self.script), mode, str(target), str(self.refs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", f"worker failed to start: {line!r}"
        # How long one write takes on this machine now: kill delays scale with it, so the kills land
        # before, during and after writes however loaded the machine is.
        self.write_seconds = float(line[1])

    def kill_after(self, delay):
        """Runs one writer for `delay` seconds, SIGKILLs it; returns how many saves it completed."""
        self.proc.stdin.write(f"{delay}\n")
        self.proc.stdin.flush()
        done, killed = self.proc.stdout.readline().split()
        assert killed == "1", "the writer was not killed by SIGKILL"
        return int(done)

    def module(self):
        spec = importlib.util.spec_from_file_location("crash_worker", self.script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def temps(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".tmp"))


def zs(model):
    return [(n, layer.active_adapter, layer.loldu_z[layer.active_adapter].detach().clone(),
             layer.loldu_sigma[layer.active_adapter].detach().clone()) for n, layer in loldu.adapted_layers(model)]


def test_save_adapter_survives_sigkill_at_random_moments(tmp_path):
    target = tmp_path / "adapter"
    worker = Worker(tmp_path, "save", target)
    try:
        mod = worker.module()
        base = mod.make_base()
        refs = {n: zs(loldu.load_adapter(copy.deepcopy(base), worker.refs / n)) for n in ("a", "b")}
        rng = random.Random(int.from_bytes(os.urandom(4), "little"))
        seen, saves, stale_copy, most_temps, t0 = {"a": 0, "b": 0}, 0, 0, 0, time.monotonic()
        kills = 150
        for i in range(kills):
            saves += worker.kill_after(rng.uniform(0, 4 * worker.write_seconds))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = loldu.load_adapter(copy.deepcopy(base), target)  # never refused
            # killed between the two renames: the new weights file with the old config copy
            stale_copy += any(issubclass(w.category, AdapterWarning) for w in caught)
            got = zs(loaded)
            name = got[0][1]
            assert name in refs, name
            want = refs[name]
            assert [n for n, *_ in got] == [n for n, *_ in want]
            for (n, _, z, s), (_, _, z0, s0) in zip(got, want):
                assert torch.equal(z, z0) and torch.equal(s, s0), (i, name, n)  # bit-identical
            seen[name] += 1
            # a killed writer leaves at most its own two temporaries: it removed the earlier ones
            most_temps = max(most_temps, len(temps(target)))
            assert len(temps(target)) <= 2, (i, temps(target))
        print(f"{kills} kills in {time.monotonic() - t0:.1f} s, {saves} completed saves, loaded {seen}, "
              f"{stale_copy} times between the renames, at most {most_temps} temporaries at once")
        assert seen["a"] and seen["b"] and saves > 0
    finally:
        worker.close()
    # the next save leaves no temporary at all
    loldu.save_adapter(loldu.load_adapter(copy.deepcopy(base), worker.refs / "a"), target)
    assert sorted(os.listdir(target)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_export_survives_sigkill_and_next_export_cleans_up(tmp_path):
    onnx = pytest.importorskip("onnx")
    lx = pytest.importorskip("loldu.export")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "m.onnx"
    worker = Worker(tmp_path, "export", target)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    leftovers_seen, exports, kills, t0 = 0, 0, 20, time.monotonic()
    try:
        for i in range(kills):
            # the last kills come late enough that some exports complete
            late = 4 if i >= kills - 3 else 1
            exports += worker.kill_after(rng.uniform(0.0, 3 * late * worker.write_seconds))
            left = temps(out_dir)
            leftovers_seen = max(leftovers_seen, len(left))
            assert len(left) <= 2, left  # earlier writers' temporaries were removed by later exports
            assert sorted(set(os.listdir(out_dir)) - set(left)) in ([], ["m.onnx"])
            if target.exists():  # an export is renamed into place whole, or not at all
                onnx.checker.check_model(str(target))
        mod = worker.module()
    finally:
        worker.close()
    print(f"{kills} kills in {time.monotonic() - t0:.1f} s, {exports} completed exports, "
          f"at most {leftovers_seen} temporaries at once")
    assert exports > 0
    lx.to_onnx(mod.make_adapter("a"), torch.randn(2, 16), target)  # removes what the kills left
    assert os.listdir(out_dir) == ["m.onnx"]
