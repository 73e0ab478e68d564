"""Progress output: plain lines in a log, a bar (cleared at the end) in a terminal."""
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

SCRIPT = r"""
import torch, torch.nn as nn, loldu
torch.manual_seed(0)
net = nn.Sequential(*[nn.Linear(12, 12) for _ in range(40)])
loldu.inject(net, loldu.LoLDUConfig(rank=3, target_modules=r"\d+"))
print("after inject", flush=True)
"""


def run(stderr, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "LOLDU_PROGRESS"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=stderr, env=env,
                          timeout=300)


def test_log_gets_two_plain_lines(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        r = run(f)
    assert r.returncode == 0 and r.stdout.decode() == "after inject\n"
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text, repr(text)
    assert len(lines) == 2, lines
    assert lines[0] == "loldu: factorizing: 40 layers..."
    assert lines[1].startswith("loldu: factorizing: 40/40 layers done in ") and lines[1].endswith(" s")


def test_terminal_gets_a_bar_that_is_cleared(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a sized terminal window
    env = {k: v for k, v in os.environ.items() if k != "LOLDU_PROGRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while True:  # read while the child runs: a pty drops unread output when its last writer closes
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child side is closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "loldu: factorizing" in text and "\r" in text  # drawn as a bar
    assert "done in" not in text  # no log lines in a terminal
    assert text.rstrip(" ").endswith("\r")  # the bar's line is blanked and the cursor back at its start


def test_override_off(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        r = run(f, {"LOLDU_PROGRESS": "off"})
    assert r.returncode == 0 and log.read_text() == ""
