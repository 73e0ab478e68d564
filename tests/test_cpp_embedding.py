"""The C++ embedding (docs/cpp.md) against the Python package: adapters saved by Python and merged
by the C++ app `apply_adapter` equal Python's merge; adapters written by C++ load in Python; an
adapter for another base is refused; swaps do not drift; and the reader's regression inputs
(tests/data/adapter_fuzz/) get the same verdict from both readers.

The app is built with CMake in the build directory `make ctest` uses (build/cmake, or
$LOLDU_CMAKE_BUILD), configured as `make ctest` configures it, so the two share one build.
"""
import copy
import fcntl
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import loldu
from loldu import LoLDUConfig, spec
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from loldu.errors import AdapterError
from loldu.layer import LoLDULayer

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("LOLDU_CMAKE_BUILD", ROOT / "build" / "cmake"))
FUZZ_CASES = ROOT / "tests" / "data" / "adapter_fuzz"


@pytest.fixture(scope="session")
def app() -> Path:
    """The apply_adapter executable, configured and built like `make ctest` does (locked: one build at a time)."""
    # The venv's bin first, as `make ctest` runs CMake: its ninja, and the python3 whose nlohmann-json CMake finds.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if shutil.which("cmake", path=env["PATH"]) is None or shutil.which("ninja", path=env["PATH"]) is None:
        pytest.fail("the C++ embedding tests need cmake and ninja on PATH")
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (BUILD / "CMakeCache.txt").exists():
            cmd = ["cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                   f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
            subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        res = subprocess.run(["cmake", "--build", str(BUILD), "--target", "apply_adapter", "-j2"], env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return BUILD / "apply_adapter"


def run(app, *args, ok=True):
    res = subprocess.run([str(app), *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


class Net(nn.Module):
    """A little of every kind LoLDU adapts: linear, embedding, conv2d and transformers' Conv1D."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 10)
        self.conv = nn.Conv2d(3, 5, 3)
        self.proj = Conv1D(9, 10)  # weight stored (in=10, out=9)


TARGETS = ["emb", "fc1", "fc2", "conv", "proj"]


def randomize(model, scale=0.3):
    """Trained-looking z and sigma: fresh random values, away from the c = 0 of initialisation."""
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoLDULayer):
                for name in m.loldu_z:
                    z = m.loldu_z[name]
                    z.add_(scale * torch.randn_like(z) * (z.abs() + 0.1))
                    m.loldu_sigma[name].mul_(1 + 0.2 * torch.randn(()).item())


def merged_weights(model):
    """{'<layer>.weight': merged weight} of every LoLDU layer, after loldu.merge."""
    return {f"{n}.weight": m.base_layer.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, LoLDULayer)}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _with_weights(base):
    """A fresh Net holding base's weights (in base's dtype)."""
    net = Net().to(next(base.parameters()).dtype)
    net.load_state_dict(base.state_dict())
    return net


def save_base(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("dtype,options", [
    (torch.float32, {}),
    (torch.float32, {"parametrization": "relative"}),
    (torch.float32, {"factor_storage": "cur", "alpha": 4.0}),
    (torch.float64, {"sigma0": 0.7}),
])
def test_python_adapter_merged_by_cpp_equals_python_merge(app, tmp_path, dtype, options):
    base = Net().to(dtype)
    save_base(base, tmp_path / "base.safetensors")
    model = loldu.inject(_with_weights(base), LoLDUConfig(rank=3, target_modules=TARGETS, train_scale=True, **options))
    randomize(model)
    loldu.save_adapter(model, tmp_path / "adapter")
    # Python's merge of the adapter as saved (z and sigma are fp32 in the file, also for fp64 weights).
    model = loldu.merge(loldu.load_adapter(_with_weights(base), tmp_path / "adapter"))
    want = merged_weights(model)

    run(app, tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    original = load_file(tmp_path / "base.safetensors")
    assert set(got) == set(original)
    # Same formula and kernels on both sides, but separate runs of the factorization and GEMMs:
    # bounded, not bit-compared. fp32: 1e-6 of the weight's largest entry; fp64: 1e-13.
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for key, w in want.items():
        assert got[key].dtype == dtype
        assert max_rel(got[key], w) <= tol, key
        assert not torch.equal(got[key], original[key])  # the adapter did change it
    for key in set(original) - set(want):  # biases: not adapted, copied byte for byte
        assert torch.equal(got[key], original[key]), key


def test_saved_head_and_merge_equal_python_merge_and_unload(app, tmp_path):
    """Format 3: a head trained fully (modules_to_save) replaces the base's entries, as in
    loldu.merge_and_unload's plain model."""
    base = nn.ModuleDict({"net": Net(), "head": nn.Linear(10, 3)})
    save_base(base, tmp_path / "base.safetensors")
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=2, target_modules=[f"net.{t}" for t in TARGETS],
                                                          modules_to_save=["head"], train_scale=True))
    randomize(model)
    with torch.no_grad():  # the head's trained copy
        for p in model.get_submodule("head").modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p))
    loldu.save_adapter(model, tmp_path / "adapter")
    want = loldu.merge_and_unload(loldu.load_adapter(copy.deepcopy(base), tmp_path / "adapter")).state_dict()

    check = run(app, "--check", tmp_path / "adapter")
    assert "5 layers, 2 saved tensors" in check.stdout
    run(app, tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    assert set(got) == set(want)
    for key, w in want.items():
        if key.endswith(".weight") and key.removesuffix(".weight")[4:] in TARGETS:
            assert max_rel(got[key], w) <= 1e-6, key  # merged: bounded, as above
        else:
            assert torch.equal(got[key], w), key  # the head's saved values and untouched entries: copied
    assert not torch.equal(got["head.weight"], base.state_dict()["head.weight"])


def test_minilm_adapter_merged_by_cpp_equals_python_merge(app, tmp_path, minilm_path):
    from transformers import AutoModel

    from loldu.presets import BERT_LINEARS

    model = AutoModel.from_pretrained(minilm_path)
    model = loldu.inject(model, LoLDUConfig(rank=8, target_modules=BERT_LINEARS, train_scale=True), progress=False)
    randomize(model, scale=0.5)
    loldu.save_adapter(model, tmp_path / "adapter")
    model = loldu.merge(loldu.load_adapter(AutoModel.from_pretrained(minilm_path), tmp_path / "adapter", progress=False))
    want = merged_weights(model)
    assert len(want) == 36

    run(app, minilm_path / "model.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    for key, w in want.items():
        assert max_rel(got[key], w) <= 1e-6, key


def test_cpp_written_adapter_loads_in_python(app, tmp_path):
    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    seed = torch.randint(0, 2**31, ()).item()
    out = run(app, "--create", tmp_path / "base.safetensors", tmp_path / "adapter", "--rank", 4, "--alpha", 2.0,
              "--seed", seed, "--name", "native", "fc1:linear", "emb:embedding", "conv:conv2d", "proj:conv1d")
    assert "wrote adapter 'native' (4 layers, rank 4)" in out.stdout
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the readable copy must match the stored config exactly
        stored = read_adapter(tmp_path / "adapter")
    header, config, tensors = stored
    assert header["format_version"] == spec.FORMAT_VERSION and header["adapter_name"] == "native"
    assert config.rank == 4 and config.alpha == 2.0 and [e["name"] for e in header["layers"]] == [
        "fc1", "emb", "conv", "proj"]
    with pytest.raises(AdapterError, match="fingerprint"):  # another base (fresh random weights)
        loldu.load_adapter(Net(), tmp_path / "adapter")
    model = loldu.load_adapter(_with_weights(base), tmp_path / "adapter")  # the base it was written for
    for i, name in enumerate(["fc1", "emb", "conv", "proj"]):
        layer = model.get_submodule(name)
        assert torch.equal(layer.loldu_z["native"], stored.layer(i)["z"])
        assert torch.equal(layer.loldu_sigma["native"], stored.layer(i)["sigma"])
        # The pivots C++ chose are the ones the Python factorization chooses on this base.
        assert torch.equal(layer.loldu_pivots, loldu.ops.ldu(layer.base_matrix(), 4).pivots)
    loldu.merge(model)
    want = merged_weights(model)
    run(app, tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    for key, w in want.items():
        assert max_rel(got[key], w) <= 1e-6, key


def test_adapter_for_another_base_is_refused_before_anything_is_written(app, tmp_path):
    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    model = loldu.inject(_with_weights(base), LoLDUConfig(rank=2, target_modules=TARGETS))
    randomize(model)
    loldu.save_adapter(model, tmp_path / "adapter")
    # Another checkpoint: one entry of a pivot row of the last layer differs.
    other = load_file(tmp_path / "base.safetensors")
    pivot = int(model.get_submodule("proj").loldu_pivots[0])
    other["proj.weight"][-1, pivot] += 1e-3  # proj's (d, k) matrix is weight^T: row `pivot` is column `pivot`
    save_file(other, str(tmp_path / "other.safetensors"))
    res = run(app, tmp_path / "other.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors", ok=False)
    assert res.returncode == 1
    assert "layer 'proj'" in res.stderr and "fingerprint" in res.stderr and "adapter_model.safetensors" in res.stderr
    assert not (tmp_path / "out.safetensors").exists()
    # Python refuses the same pair.
    with pytest.raises(AdapterError, match="fingerprint"):
        net = Net()
        net.load_state_dict(other)
        loldu.load_adapter(net, tmp_path / "adapter")


def test_swaps_between_two_adapters_do_not_drift(app, tmp_path):
    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    for name, rank in (("a", 2), ("b", 5)):
        model = loldu.inject(_with_weights(base), LoLDUConfig(rank=rank, target_modules=TARGETS, train_scale=True),
                             adapter_name=name)
        randomize(model)
        loldu.save_adapter(model, tmp_path / name)
    res = run(app, "--swap", tmp_path / "base.safetensors", tmp_path / "a", tmp_path / "b", "--swaps", 1000)
    assert re.search(r"time per swap: mean [0-9.]+ ms", res.stdout), res.stdout
    drift = float(re.search(r"max drift after 1000 swaps and unmerge: (\S+)", res.stdout).group(1))
    assert drift == 0.0, res.stdout


def _cases():
    return sorted(FUZZ_CASES.glob("*.safetensors"))


def test_fuzz_regression_cases_get_the_same_verdict_from_both_readers(app, tmp_path):
    cases = _cases()
    assert len(cases) >= 20 and any(c.name.startswith("accept-") for c in cases)
    dirs = []
    for case in cases:
        d = tmp_path / case.stem
        d.mkdir()
        shutil.copy(case, d / WEIGHTS_NAME)
        dirs.append(d)
    res = run(app, "--check", *dirs, ok=False)
    cpp = {}
    for line in res.stdout.splitlines():
        m = re.match(r"(\S+): (ok|refused): (.*)", line)
        if m:
            cpp[Path(m.group(1)).name] = (m.group(2), m.group(3))
    assert len(cpp) == len(cases), res.stdout[-2000:] + res.stderr[-2000:]
    for case, d in zip(cases, dirs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no readable copy beside the file: warned, not needed
            try:
                read_adapter(d)
                python = "ok"
            except AdapterError:
                python = "refused"
        want = "ok" if case.name.startswith("accept-") else "refused"
        assert python == want, f"{case.name}: Python {python}"
        assert cpp[d.name][0] == want, f"{case.name}: C++ {cpp[d.name]}"


def test_docs_cpp_example_session_runs_as_written(app, tmp_path):
    """docs/cpp.md's example session (Python, then the app) prints what the page shows."""
    text = (ROOT / "docs" / "cpp.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    i = next(i for i, (lang, body) in enumerate(blocks) if lang == "sh" and "python - <<'EOF'" in body)
    script, shown = blocks[i][1], blocks[i + 1][1]
    script = script.replace("build/cpp/apply_adapter", str(app))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    timing = re.compile(r"time per swap: mean [0-9.]+ ms, median [0-9.]+ ms, max [0-9.]+ ms")
    got, want = res.stdout.splitlines(), shown.strip().splitlines()
    assert len(got) == len(want), res.stdout
    for g, w in zip(got, want):
        assert (timing.fullmatch(g) and timing.fullmatch(w)) or g == w, (g, w)


def test_cpp_reader_knows_every_config_key():
    """The C++ reader refuses unknown config keys as LoLDUConfig.from_dict does: it must know them all."""
    header = (ROOT / "cpp" / "include" / "loldu" / "spec.h").read_text()
    known = re.search(r"kConfigKeys\[\] = \{(.*?)\};", header, re.S).group(1)
    fields = {f for f in LoLDUConfig.__dataclass_fields__ if not f.startswith("_")} - {"r"}
    missing = sorted(f for f in fields if f'{{"{f}",' not in known)
    assert not missing, f"cpp/include/loldu/spec.h does not know the config keys {missing}"
    assert "spec::kConfigKeys" in (ROOT / "cpp" / "adapter_file.cpp").read_text()


def test_readme_cpp_section_is_the_tested_build():
    """The README's C++ section shows docs/cpp.md's build commands verbatim (the build is run by `make ctest`;
    docs/cpp.md's example session by test_docs_cpp_example_session_runs_as_written)."""
    blocks = lambda text: [b for _, b in re.findall(r"```(\w*)\n(.*?)```", text, re.S)]  # noqa: E731
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## C++\n"):readme.index("## What loldu guarantees")]
    doc = blocks((ROOT / "docs" / "cpp.md").read_text())
    for b in blocks(section):
        assert b in doc, b
    assert len(blocks(section)) == 1  # the build; docs/cpp.md has the example session and its output


def test_task_model_adapter_into_bare_weights_names_the_prefix(app, tmp_path):
    """An adapter trained on a task model ('body.'-prefixed names) merged into its bare body's weights is
    refused, nothing written, and the message says which prefix the weights lack (as Python's loader does)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6))
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    task = nn.Module()
    task.body = body
    model = loldu.inject(task, LoLDUConfig(rank=2, target_modules=["0", "2"]))
    randomize(model)
    loldu.save_adapter(model, tmp_path / "adapter")
    res = run(app, tmp_path / "bare.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors", ok=False)
    assert res.returncode == 1 and "prefix 'body.'" in res.stderr, res.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_app_refuses_special_and_oversized_files_without_waiting(app, tmp_path):
    """A FIFO (as the adapter or the base) and /dev/zero are refused by their type, before they are
    opened; a sparse 12 GB adapter by its header, before it is read (each under a timeout: a hang fails)."""
    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    run(app, "--create", tmp_path / "base.safetensors", tmp_path / "good", "--rank", 2, "fc1:linear")
    fifo, zero, big = tmp_path / "fifo", tmp_path / "zero", tmp_path / "big"
    for d in (fifo, zero, big):
        d.mkdir()
    os.mkfifo(fifo / WEIGHTS_NAME)
    os.symlink("/dev/zero", zero / WEIGHTS_NAME)
    shutil.copy(tmp_path / "good" / WEIGHTS_NAME, big / WEIGHTS_NAME)
    os.truncate(big / WEIGHTS_NAME, 12 << 30)
    for d, why in ((fifo, "not a regular file (a FIFO)"), (zero, "not a regular file (a character device)"),
                   (big, "trailing bytes")):
        res = subprocess.run([str(app), "--check", str(d)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and why in res.stdout, res.stdout + res.stderr
    os.mkfifo(tmp_path / "base.fifo")
    res = subprocess.run([str(app), str(tmp_path / "base.fifo"), str(tmp_path / "good"), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "base.fifo: not a regular file (a FIFO)" in res.stderr


def test_app_file_size_limit_fails_cleanly(app, tmp_path):
    """Under ulimit -f the merge fails with exit 1 (not SIGXFSZ) and leaves no temporary behind."""
    import resource

    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    run(app, "--create", tmp_path / "base.safetensors", tmp_path / "a", "--rank", 2, "fc1:linear")
    out = tmp_path / "out"
    out.mkdir()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # the merged file is about 4 KB

    res = subprocess.run([str(app), str(tmp_path / "base.safetensors"), str(tmp_path / "a"), str(out / "m.safetensors")],
                         capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode == 1 and "File too large" in res.stderr, res.stderr
    assert os.listdir(out) == []


def test_app_numbers_and_names_out_of_range_are_usage_errors(app, tmp_path):
    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    b = tmp_path / "base.safetensors"
    run(app, "--create", b, tmp_path / "a", "--rank", 2, "fc1:linear")
    cases = [
        (["--swap", b, tmp_path / "a", tmp_path / "a", "--swaps", "-5"], "--swaps must be an integer from 0"),
        (["--create", b, tmp_path / "x", "--rank", "99999999999999999999", "fc1:linear"], "--rank must be an integer"),
        (["--create", b, tmp_path / "x", "--rank", "2", "--seed", "-1", "fc1:linear"], "--seed must be an integer"),
        (["--create", b, tmp_path / "x", "--rank", "2", "--alpha", "nan", "fc1:linear"], "got 'nan'"),
        (["--create", b, tmp_path / "x", "--rank", "2", "--name", "../../x", "fc1:linear"], "--name must match"),
    ]
    for args, why in cases:
        res = run(app, *args, ok=False)
        assert res.returncode == 2 and why in res.stderr, (args, res.returncode, res.stderr)
    assert not (tmp_path / "x").exists()


def test_long_output_names_write_and_either_language_cleans_the_others_temporaries(app, tmp_path):
    """A 250-byte output name (valid: NAME_MAX is 255) is written, since temporaries keep only the name's
    first 233 bytes; a dead writer's temporary under that naming is removed by the next write of either
    language."""
    from loldu.atomic import TEMP_NAME_BYTES, clean_stale_temps

    base = Net()
    save_base(base, tmp_path / "base.safetensors")
    run(app, "--create", tmp_path / "base.safetensors", tmp_path / "a", "--rank", 2, "fc1:linear")
    out = tmp_path / "out"
    out.mkdir()
    name = "m" * (250 - len(".safetensors")) + ".safetensors"
    dead = f".{name[:TEMP_NAME_BYTES]}.9999999-abcd1234.tmp"  # no such pid: a killed writer's leftover
    (out / dead).write_bytes(b"partial")
    run(app, tmp_path / "base.safetensors", tmp_path / "a", out / name)
    assert sorted(os.listdir(out)) == [name]
    assert set(load_file(out / name)) == set(load_file(tmp_path / "base.safetensors"))
    (out / dead).write_bytes(b"partial")  # now cleaned by Python, as its own writer does before writing
    assert clean_stale_temps(out / name) and sorted(os.listdir(out)) == [name]
